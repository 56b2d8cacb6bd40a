"""Sandbox instances as hosts: a directory, an SSH server, and processes.

Every EC2 instance in the moto server whose private address is on loopback
becomes a host: while it runs, an asyncssh server listens on its own
address, and commands run as subprocesses in its directory. Stopping the
instance ends its processes and its SSH server; starting it runs its boot
script (`etc/rc.local`), as a reboot would; in the `aws` timings profile that
happens only once the instance is running and has booted, never while it is
pending. An instance launched from one of
the sandbox's images starts with a copy of the directory the image was made
from.

Every process an instance runs carries two environment variables naming
the sandbox and the instance; that is how a stop finds all of them,
including daemons that detached from their SSH session.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path

import asyncssh

from .cloud import Cloud, InstanceView

log = logging.getLogger("sandbox.hosts")
SANDBOX_MARK = "GREENLIGHT_SANDBOX"
INSTANCE_MARK = "GREENLIGHT_INSTANCE"
RUNNING_STATES = ("pending", "running")


def processes_marked(sandbox_dir: Path, instance_id: str | None = None) -> list[int]:
    """Pids of processes started for this sandbox (and instance, if given)."""
    wanted = [f"{SANDBOX_MARK}={sandbox_dir}".encode()]
    if instance_id:
        wanted.append(f"{INSTANCE_MARK}={instance_id}".encode())
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(item in environ for item in wanted):
            pids.append(int(entry))
    return pids


def kill_marked(sandbox_dir: Path, instance_id: str | None = None, grace: float = 2.0) -> int:
    """End every marked process: TERM, then KILL what is left after `grace`."""
    killed = 0
    deadline = time.monotonic() + grace
    sig = signal.SIGTERM
    while pids := processes_marked(sandbox_dir, instance_id):
        for pid in pids:
            try:
                os.kill(pid, sig)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.05)
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        if time.monotonic() > deadline + 5:
            break
    return killed


class KeyOnlyServer(asyncssh.SSHServer):
    """Public-key authentication only (as an EC2 image's sshd), for whom `accepts` names."""

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return self.accepts(username, key)

    def accepts(self, username: str, key: asyncssh.SSHKey) -> bool:
        raise NotImplementedError


class _SSHServer(KeyOnlyServer):
    def __init__(self, host: Host):
        self.host = host

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        # behind a bastion, SSH is open to the bastion's address only (a security
        # group allowing port 22 from the bastion): anyone else is cut off at once
        allowed = self.host.hosts.ssh_from
        peer = (conn.get_extra_info("peername") or ("",))[0]
        if allowed and peer != allowed:
            log.info("%s refused SSH from %s: only the bastion %s may connect", self.host.id, peer, allowed)
            conn.abort()

    def accepts(self, username: str, key: asyncssh.SSHKey) -> bool:
        return username == self.host.ssh_user and key.public_data in self.host.authorized_keys()


class Host:
    def __init__(self, hosts: Hosts, view: InstanceView):
        self.hosts = hosts
        self.id = view.id
        self.ip = view.private_ip
        self.dir = hosts.dir / "instances" / view.id
        self.root = self.dir / "root"
        self.ssh_user = hosts.ssh_user
        self._server: asyncssh.SSHAcceptor | None = None
        self._detached: set[asyncio.Future] = set()  # commands whose client went away, until they end

    @property
    def up(self) -> bool:
        return self._server is not None

    def env(self) -> dict[str, str]:
        return {
            "PATH": f"{self.hosts.dir / 'bin'}:{os.environ.get('PATH', '/usr/local/bin:/usr/bin:/bin')}",
            "HOME": str(self.root),
            "USER": self.ssh_user,
            "LANG": "C.UTF-8",
            "INSTANCE_ID": self.id,
            "INSTANCE_IP": self.ip,
            SANDBOX_MARK: str(self.hosts.dir),
            INSTANCE_MARK: self.id,
        }

    def authorized_keys(self) -> set[bytes]:
        keys = set()
        try:
            lines = (self.root / ".ssh" / "authorized_keys").read_text().splitlines()
        except OSError:
            return keys
        for line in lines:
            if line.strip() and not line.startswith("#"):
                try:
                    keys.add(asyncssh.import_public_key(line).public_data)
                except (asyncssh.KeyImportError, ValueError):
                    continue
        return keys

    def host_key(self) -> asyncssh.SSHKey:
        path = self.dir / "ssh_host_ed25519_key"
        if not path.exists():
            key = asyncssh.generate_private_key("ssh-ed25519")
            key.write_private_key(path)
            path.chmod(0o600)
            (self.dir / "ssh_host_ed25519_key.pub").write_bytes(key.export_public_key())
        return asyncssh.read_private_key(path)

    def _first_boot(self, view: InstanceView) -> None:
        """Lay down the disk: the image's copy if it is ours, else an empty one."""
        image = self.hosts.dir / "images" / view.image_id
        partial = self.dir / "root.partial"  # renamed into place when complete
        shutil.rmtree(partial, ignore_errors=True)
        if image.is_dir():
            shutil.copytree(image, partial, symlinks=True)
        else:
            partial.mkdir(parents=True)
        # cloud-init's job on EC2: authorize the launch key pair's key
        ssh_dir = partial / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(self.hosts.cloud.public_key(view.key_name) + "\n")
        partial.rename(self.root)

    async def boot(self, view: InstanceView) -> None:
        if not self.root.exists():
            self._first_boot(view)
        self._server = await asyncssh.listen(
            host=self.ip,
            port=self.hosts.ssh_port,
            server_factory=lambda: _SSHServer(self),
            server_host_keys=[self.host_key()],
            process_factory=self._run,
            encoding=None,
            allow_scp=False,
            agent_forwarding=False,
            x11_forwarding=False,
            reuse_address=True,
        )
        if (self.root / "etc" / "rc.local").exists():
            await self._spawn("etc/rc.local", streams=asyncio.subprocess.DEVNULL)
        log.info("%s (%s) is up: ssh %s@%s -p %s", self.id, view.name or "-", self.ssh_user, self.ip, self.hosts.ssh_port)

    async def halt(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await asyncio.get_running_loop().run_in_executor(None, kill_marked, self.hosts.dir, self.id)
        log.info("%s is down", self.id)

    async def _spawn(self, *args: str, streams: int) -> asyncio.subprocess.Process:
        """A shell in the instance's directory, in a session of its own, marked as the instance's."""
        return await asyncio.create_subprocess_exec(
            "/bin/sh", *args, cwd=self.root, env=self.env(),
            stdin=streams, stdout=streams, stderr=streams, start_new_session=True,
        )

    async def _run(self, process: asyncssh.SSHServerProcess) -> None:
        command = process.command
        if not command:
            process.stderr.write(b"the sandbox runs commands only; no interactive shell\n")
            process.exit(1)
            return
        child = await self._spawn("-c", command, streams=asyncio.subprocess.PIPE)

        async def pump(source, sink):
            while chunk := await source.read(65536):
                sink.write(chunk)
                await sink.drain()

        async def feed():
            try:
                while chunk := await process.stdin.read(65536):
                    child.stdin.write(chunk)
                    await child.stdin.drain()
            except (OSError, asyncssh.Error):
                pass
            finally:
                child.stdin.close()

        feeder = asyncio.create_task(feed())
        try:
            await asyncio.gather(pump(child.stdout, process.stdout), pump(child.stderr, process.stderr))
            status = await child.wait()
            process.exit(status if status >= 0 else 128 - status)
        except (OSError, asyncssh.Error, asyncio.CancelledError):
            # The client went away. As under sshd with no terminal, the command
            # gets no signal: it keeps running, and its next write fails
            # (EPIPE, SIGPIPE). Ending a command it gave up on is the client's
            # job (deployer/ssh.py kills its process group); stopping the
            # instance ends everything.
            if child.returncode is None:
                self._detach(child)
            raise
        finally:
            feeder.cancel()


    def _detach(self, child: asyncio.subprocess.Process) -> None:
        """Close our ends of its output, and keep it referenced until it ends
        (a collected subprocess transport would kill it)."""
        for fd in (1, 2):
            if (pipe := child._transport.get_pipe_transport(fd)) is not None:
                pipe.close()
        waiting = asyncio.ensure_future(child.wait())
        self._detached.add(waiting)
        waiting.add_done_callback(self._detached.discard)


class Hosts:
    """Keeps the set of running SSH hosts in step with the moto server."""

    def __init__(self, *, cloud: Cloud, directory: Path, network: str, ssh_port: int, ssh_user: str, ssh_from: str = ""):
        self.cloud = cloud
        self.ssh_from = ssh_from  # the only address SSH is open to (a bastion's); empty: any
        self.dir = directory
        self.network = ipaddress.ip_network(network)
        self.ssh_port = ssh_port
        self.ssh_user = ssh_user
        self.hosts: dict[str, Host] = {}
        (self.dir / "instances").mkdir(parents=True, exist_ok=True)
        (self.dir / "images").mkdir(parents=True, exist_ok=True)
        self._write_id()
        cloud.on_image_created = self.snapshot
        cloud.host_keys = self.host_public_keys

    def _write_id(self) -> None:
        """An instance has its login user (ec2-user), which this machine may
        not: `id` on a sandbox instance knows it as an EC2 image does, and
        asks the real `id` about everything else."""
        bin_dir = self.dir / "bin"
        bin_dir.mkdir(exist_ok=True)
        user = self.ssh_user if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", self.ssh_user) else "ec2-user"
        script = bin_dir / "id"
        script.write_text(
            "#!/bin/sh\n"
            'case "$*" in\n'
            f'  "-u {user}"|"-u -- {user}") echo 1000; exit 0 ;;\n'
            f'  "-un"|"-u -n"|"-nu") echo {user}; exit 0 ;;\n'
            "esac\n"
            'PATH=/usr/bin:/bin exec id "$@"\n')
        script.chmod(0o755)

    def host_public_keys(self, instance_id: str) -> list[str]:
        path = self.dir / "instances" / instance_id / "ssh_host_ed25519_key.pub"
        return [path.read_text().strip()] if path.exists() else []

    def snapshot(self, image_id: str, instance_id: str) -> None:
        """Called inside CreateImage: the image is the instance's disk right now."""
        source = self.dir / "instances" / instance_id / "root"
        target = self.dir / "images" / image_id
        if source.is_dir() and not target.exists():
            shutil.copytree(source, target, symlinks=True)
            log.info("image %s made from %s", image_id, instance_id)

    def ours(self, view: InstanceView) -> bool:
        try:
            return ipaddress.ip_address(view.private_ip) in self.network
        except ValueError:
            return False

    async def reconcile(self) -> None:
        views = [v for v in self.cloud.instances() if self.ours(v)]
        for view in views:
            host = self.hosts.get(view.id) or self.hosts.setdefault(view.id, Host(self, view))
            if view.state in RUNNING_STATES and not host.up and self.cloud.ready_to_boot(view):
                try:
                    await host.boot(view)
                except OSError as exc:
                    log.error("%s cannot start its SSH server on %s:%s: %s", view.id, host.ip, self.ssh_port, exc)
            elif view.state not in RUNNING_STATES and host.up:
                await host.halt()
            if view.state == "terminated" and host.dir.exists() and not host.up:
                shutil.rmtree(host.dir, ignore_errors=True)
        images = self.cloud.image_ids()
        for image in (self.dir / "images").iterdir():
            if image.name not in images:  # deregistered
                shutil.rmtree(image, ignore_errors=True)

    async def run(self, stop: asyncio.Event, interval: float = 0.2) -> None:
        while not stop.is_set():
            try:
                await self.reconcile()
            except RuntimeError as exc:  # moto's dicts changed under our feet; look again
                log.debug("reconcile retried: %s", exc)
            except Exception:
                log.exception("reconciling instances failed; trying again")
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except asyncio.TimeoutError:
                pass

    async def shutdown(self) -> None:
        for host in self.hosts.values():
            if host.up:
                await host.halt()
        await asyncio.get_running_loop().run_in_executor(None, kill_marked, self.dir, None)
