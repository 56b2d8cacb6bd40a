"""Run commands on hosts over SSH (paramiko), streaming their output.

Host keys are pinned: pass the key recorded for the host and a different
key fails the connection (paramiko's RejectPolicy). With no key recorded
yet, the first contact's key is accepted and returned in the result so the
caller can pin it from then on ("trust on first use", as ssh does); the
release engine does that only where an operator opted in
(SSH_TRUST_FIRST_CONTACT), and never for a bastion.

A target may name a bastion (`jump`), reached first, as OpenSSH's
ProxyJump does: the connection to the host is a "direct-tcpip" channel
through the bastion, so the host sees the bastion's address, and the
bastion's own host key must be pinned.
"""

from __future__ import annotations

import base64
import io
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import paramiko

from .errors import AdapterError, Cancelled

LineCallback = Callable[[str, str], None]  # (stream, text)


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    user: str
    private_key: str = ""  # OpenSSH or PEM text; never logged
    host_key: str = ""  # "ssh-ed25519 AAAA..." once recorded
    jump: Target | None = None  # a bastion to reach the host through; its host_key is required

    def __repr__(self) -> str:  # keep the key out of tracebacks and logs
        via = f" via {self.jump.user}@{self.jump.host}:{self.jump.port}" if self.jump else ""
        return f"Target({self.user}@{self.host}:{self.port}{via})"


@dataclass(frozen=True)
class Result:
    exit_status: int
    host_key: str  # the key the host presented, to pin

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


class _RecordFirstContact(paramiko.MissingHostKeyPolicy):
    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)


def load_private_key(text: str) -> paramiko.PKey:
    for key_class in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return key_class.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError):
            continue
    raise AdapterError("the SSH private key is not a readable ed25519, ECDSA or RSA key")


def parse_host_key(text: str) -> paramiko.PKey:
    try:
        key_type, data = text.split()[:2]
        return paramiko.PKey.from_type_string(key_type, base64.b64decode(data))
    except Exception:
        raise AdapterError(f"the recorded host key is not a valid public key: {text[:40]!r}") from None


def host_key_text(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


def listening(host: str, port: int, *, jump: Target | None = None, timeout: float = 10) -> bool:
    """Whether something accepts connections on the SSH port: a look that
    says nothing to the server, made before its host key is pinned. Through
    a bastion, whether the bastion can open a connection to it; AdapterError
    when the bastion itself cannot be reached (or its key is not the pinned one)."""
    if jump is None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            return True
        except OSError:
            return False
    bastion = _bastion(jump, timeout)
    try:
        bastion.get_transport().open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=timeout).close()
        return True
    except (paramiko.ChannelException, paramiko.SSHException, OSError, EOFError):
        return False
    finally:
        bastion.close()


class _Client(paramiko.SSHClient):
    """A client that closes the bastion connection it goes through, too."""

    jump: paramiko.SSHClient | None = None

    def close(self) -> None:
        super().close()
        if self.jump is not None:
            self.jump.close()
            self.jump = None


def _bastion(jump: Target, timeout: float) -> paramiko.SSHClient:
    """A client of the bastion, whose key must be pinned: a jump host is never trusted on first use."""
    if not jump.host_key:
        raise AdapterError(f"the bastion {jump.host}:{jump.port} has no pinned host key; refusing to connect through it")
    return connect(jump, timeout=timeout, label="the bastion")[0]


def _through(target: Target, timeout: float) -> tuple[paramiko.SSHClient, paramiko.Channel]:
    """The bastion's client and a channel from it to the target's SSH port."""
    jump = target.jump
    bastion = _bastion(jump, timeout)
    try:
        channel = bastion.get_transport().open_channel(
            "direct-tcpip", (target.host, target.port), ("127.0.0.1", 0), timeout=timeout)
    except (paramiko.ChannelException, paramiko.SSHException, OSError, EOFError) as exc:
        bastion.close()
        raise AdapterError(f"cannot reach {target.host}:{target.port} over SSH through the bastion "
                           f"{jump.host}:{jump.port}: {exc}") from None
    return bastion, channel


def connect(target: Target, *, timeout: float = 15, label: str = "") -> tuple[paramiko.SSHClient, str]:
    """An authenticated client and the host key the server presented."""
    client = _Client()
    where = f"{label} {target.host}:{target.port}" if label else f"{target.host}:{target.port}"
    sock = None
    try:
        pkey = load_private_key(target.private_key)
    except AdapterError as exc:
        raise AdapterError(f"{exc} ({label or target.host})") from None
    known_as = target.host if target.port == 22 else f"[{target.host}]:{target.port}"
    if target.host_key:
        pinned = parse_host_key(target.host_key)
        client.get_host_keys().add(known_as, pinned.get_name(), pinned)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    else:
        client.set_missing_host_key_policy(_RecordFirstContact())
    if target.jump is not None:
        client.jump, sock = _through(target, timeout)
    try:
        client.connect(
            target.host,
            port=target.port,
            username=target.user,
            pkey=pkey,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            allow_agent=False,
            look_for_keys=False,
            sock=sock,
        )
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise AdapterError(
            f"host key of {where} changed (got {exc.key.get_name()} "
            f"{exc.key.get_fingerprint().hex()}); refusing to connect"
        ) from None
    except paramiko.AuthenticationException:
        client.close()
        raise AdapterError(f"{target.user}@{target.host}:{target.port}{f' ({label})' if label else ''} "
                           "refused our SSH key") from None
    except (OSError, paramiko.SSHException, EOFError) as exc:
        client.close()
        raise AdapterError(f"cannot reach {where} over SSH{' (through the bastion)' if sock else ''}: {exc}") from None
    return client, host_key_text(client.get_transport().get_remote_server_key())


MAX_LINE = 65536  # bytes of one line kept; the rest is counted, not held (a 10 MB line must not fill a worker)


class _LineSplitter:
    """Bytes in, lines out: decoded as UTF-8 with U+FFFD for what is not (NUL
    too, which no database text column holds), and cut at MAX_LINE bytes with
    a note of how much was cut, so no line holds more than that in memory."""

    def __init__(self, stream: str, on_line: LineCallback | None):
        self.stream, self.on_line, self.pending, self.cut = stream, on_line, b"", 0

    def feed(self, data: bytes) -> None:
        *lines, rest = (self.pending + data).split(b"\n")
        for line in lines:
            self._emit(line)
        if len(rest) > MAX_LINE:
            self.cut += len(rest) - MAX_LINE
            rest = rest[:MAX_LINE]
        self.pending = rest

    def flush(self) -> None:
        if self.pending or self.cut:
            self._emit(self.pending)
            self.pending = b""

    def _emit(self, line: bytes) -> None:
        cut, self.cut = self.cut + max(len(line) - MAX_LINE, 0), 0  # what was cut of the line `pending` began
        if self.on_line:
            text = line[:MAX_LINE].rstrip(b"\r").decode("utf-8", errors="replace").replace("\x00", "\ufffd")
            self.on_line(self.stream, f"{text} [{cut} more bytes cut]" if cut else text)


# Every command is run behind one printf that tells its process group: sshd
# makes each session's shell the leader of a group of its own (setsid), and
# closing the channel sends that group no signal when there is no terminal.
# So a command that times out, is cancelled, or whose worker lost its lease
# is ended by a `kill` of the group, sent on a channel of its own. A daemon
# the command started with setsid is in another group and stays.
_GROUP_MARK = "\x1egreenlight-pgid "
_TELL_GROUP = "printf '\\036greenlight-pgid %s\\n' \"$$\" >&2; "
END_GRACE = 3.0  # seconds between TERM and KILL


def _end_group(client: paramiko.SSHClient, group: int, grace: float = END_GRACE) -> None:
    """TERM the remote command's process group; KILL what is left after `grace`."""
    ticks = int(grace * 5)
    script = (f"kill -TERM -{group} 2>/dev/null; i=0; "
              f"while kill -0 -{group} 2>/dev/null && [ $i -lt {ticks} ]; do sleep 0.2; i=$((i+1)); done; "
              f"kill -KILL -{group} 2>/dev/null; true")
    try:
        channel = client.get_transport().open_session(timeout=10)
        channel.exec_command(script)
        channel.status_event.wait(grace + 10)
    except (OSError, paramiko.SSHException, EOFError, AttributeError):
        pass  # the host went away too: nothing left to end there


def run(
    target: Target,
    command: str,
    *,
    timeout: float = 600,
    on_line: LineCallback | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Result:
    """Run one command; stream its stdout and stderr lines as they come.

    Raises AdapterError when the host cannot be reached or the command
    outlives `timeout` seconds, and Cancelled (an AdapterError) when
    `cancelled()` turns true (a person cancelled, or the caller's engine
    lost its lease on the step); a non-zero exit is a Result, not an error,
    so the caller decides what it means. `cancelled()` is asked once more
    after connecting, before the command starts: connecting can take
    seconds, and a command that must not run is not started at all.
    """
    client, presented = connect(target)
    group: list[int] = []  # the remote command's process group, once it said it

    def on_err(stream: str, text: str) -> None:
        if not group and text.startswith(_GROUP_MARK) and text[len(_GROUP_MARK):].isdigit():
            group.append(int(text[len(_GROUP_MARK):]))
        elif on_line:
            on_line(stream, text)

    try:
        if cancelled and cancelled():
            raise Cancelled(f"command cancelled on {target.host} before it started")
        channel = client.get_transport().open_session()
        channel.exec_command(_TELL_GROUP + command)
        channel.shutdown_write()
        out, err = _LineSplitter("stdout", on_line), _LineSplitter("stderr", on_err)
        deadline = time.monotonic() + timeout
        try:
            return _pump(channel, out, err, deadline, target, timeout, cancelled, presented)
        except BaseException:
            if group and not channel.exit_status_ready():
                _end_group(client, group[0])
            raise
    except (OSError, paramiko.SSHException, socket.timeout, EOFError) as exc:
        raise AdapterError(f"SSH session to {target.host}:{target.port} failed: {exc}") from None
    finally:
        client.close()


def _pump(channel, out: _LineSplitter, err: _LineSplitter, deadline: float, target: Target, timeout: float,
          cancelled: Callable[[], bool] | None, presented: str) -> Result:
    """Read the command's output until it exits, the deadline passes or it is cancelled."""
    while True:
        busy = False
        while channel.recv_ready():
            out.feed(channel.recv(65536))
            busy = True
        while channel.recv_stderr_ready():
            err.feed(channel.recv_stderr(65536))
            busy = True
        if (
            channel.exit_status_ready()
            and not channel.recv_ready()
            and not channel.recv_stderr_ready()
            and (channel.eof_received or channel.closed)
        ):
            break
        if time.monotonic() > deadline:
            raise AdapterError(f"command timed out after {timeout:g}s on {target.host}")
        if cancelled and cancelled():
            raise Cancelled(f"command cancelled on {target.host}")
        if not busy:
            select.select([channel], [], [], 0.2)
    out.flush()
    err.flush()
    return Result(channel.recv_exit_status(), presented)


# -- an OpenSSH client configuration of hosts, with their pinned keys ------------------

_ALIAS_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True)
class ConfigHost:
    name: str  # the Name tag, the Host alias when it is a safe one
    address: str
    host_key: str  # "ssh-ed25519 AAAA...", or "" when none is pinned (ssh then refuses the host)
    instance_id: str = ""


def _alias(host: ConfigHost) -> str:
    """The Host alias: the Name tag, or the instance id when the tag is not a plain word (a tag is
    anyone's to set, and a newline in it would add a directive to the config)."""
    name = host.name
    return name if name and set(name) <= _ALIAS_CHARS and not name.startswith("-") else host.instance_id or host.address


def _value(text: str, what: str) -> str:
    """A config value, quoted when it holds spaces; never one that could end the line or the quotes."""
    text = str(text)
    if not text or any(c in text for c in '"\n\r\0') or any(ord(c) < 32 for c in text):
        raise AdapterError(f"{what} {text!r} cannot be written into an ssh config")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def known_hosts_line(address: str, port: int, host_key: str) -> str:
    key_type, data = host_key.split()[:2]
    return f"{address if port == 22 else f'[{address}]:{port}'} {key_type} {data}"


def openssh_config(
    hosts: list[ConfigHost],
    *,
    user: str,
    port: int,
    key_file: str,
    known_hosts: str,
    jump: Target | None = None,
    jump_key_file: str = "",
    jump_alias: str = "bastion",
    match_address: bool = False,
    batch: bool = False,
    heading: str = "",
) -> tuple[str, str]:
    """An ssh_config (one Host per host, its Name tag as the alias) and the
    known_hosts it points to, of the pinned keys only, with
    StrictHostKeyChecking: the client refuses a host whose key is not the
    pinned one, and a host with no pinned key. With `jump`, every host is
    reached through it (ProxyJump), and the bastion has a Host block of its
    own. `match_address`: the Host line names the address too, so
    `ssh -F file 10.0.1.5` finds the block. `batch`: for a tool, which must
    never stop to ask a question."""
    common = [f"    UserKnownHostsFile {_value(known_hosts, 'the known_hosts path')}",
              "    StrictHostKeyChecking yes", "    IdentitiesOnly yes", "    GlobalKnownHostsFile /dev/null",
              *(["    BatchMode yes"] if batch else [])]
    lines = [f"# {line}" for line in heading.splitlines()] + ([""] if heading else [])
    known = []
    if jump is not None:
        lines += [f"Host {_value(jump_alias, 'the bastion alias')}",
                  f"    HostName {_value(jump.host, 'the bastion address')}",
                  f"    User {_value(jump.user, 'the bastion user')}", f"    Port {int(jump.port)}",
                  f"    IdentityFile {_value(jump_key_file, 'the bastion key file')}", *common, ""]
        known.append(known_hosts_line(jump.host, jump.port, jump.host_key))
    for host in hosts:
        patterns = [_alias(host)] + ([host.address] if match_address and host.address != _alias(host) else [])
        if not host.host_key:
            lines.append("# no host key is pinned for this host yet: ssh refuses it until one is")
        lines += [f"Host {' '.join(_value(p, 'the host') for p in patterns)}",
                  f"    HostName {_value(host.address, 'the address')}",
                  f"    User {_value(user, 'the SSH user')}", f"    Port {int(port)}",
                  f"    IdentityFile {_value(key_file, 'the key file')}", *common]
        if jump is not None:
            lines.append(f"    ProxyJump {_value(jump_alias, 'the bastion alias')}")
        lines.append("")
        if host.host_key:
            known.append(known_hosts_line(host.address, port, host.host_key))
    return "\n".join(lines), "\n".join(known) + ("\n" if known else "")
