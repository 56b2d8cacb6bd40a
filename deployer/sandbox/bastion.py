"""A bastion (jump host) for the sandbox: an SSH server that only forwards.

It listens on an address of its own on the sandbox's network, with a host
key of its own and a key pair of its own, and opens the connections its
clients ask for ("direct-tcpip", as OpenSSH's ProxyJump asks) from that
address, to addresses on the sandbox's network only. The instances then
accept SSH only from it (hosts.py), as a security group that allows port 22
from the bastion's security group does on AWS. It runs no commands.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from pathlib import Path

import asyncssh
from asyncssh.forward import SSHForwarder

from .hosts import KeyOnlyServer

log = logging.getLogger("sandbox.bastion")


class _Server(KeyOnlyServer):
    def __init__(self, bastion: Bastion):
        self.bastion = bastion

    def accepts(self, username: str, key: asyncssh.SSHKey) -> bool:
        return username == self.bastion.user and key.public_data == self.bastion.client_key().public_data

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int):
        try:
            allowed = ipaddress.ip_address(dest_host) in self.bastion.network
        except ValueError:
            allowed = False
        if not allowed:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            f"the bastion forwards only to {self.bastion.network}")
        return self.bastion.forward(dest_host, dest_port)


class Bastion:
    def __init__(self, *, directory: Path, address: str, port: int, user: str, network: str):
        self.dir = directory / "bastion"
        self.address, self.port, self.user = address, port, user
        self.network = ipaddress.ip_network(network)
        self.key_file = directory / "keys" / "bastion.pem"  # the key pair its users log in with
        self._server: asyncssh.SSHAcceptor | None = None

    def host_key(self) -> asyncssh.SSHKey:
        path = self.dir / "ssh_host_ed25519_key"
        if not path.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            key = asyncssh.generate_private_key("ssh-ed25519")
            path.touch(mode=0o600)
            path.write_bytes(key.export_private_key())
        return asyncssh.read_private_key(path)

    def host_key_text(self) -> str:
        return " ".join(self.host_key().export_public_key().decode().split()[:2])

    def client_key(self) -> asyncssh.SSHKey:
        if not self.key_file.exists():
            self.key_file.parent.mkdir(parents=True, exist_ok=True)
            key = asyncssh.generate_private_key("ssh-ed25519")
            self.key_file.touch(mode=0o600)
            self.key_file.write_bytes(key.export_private_key("openssh"))
        return asyncssh.read_private_key(self.key_file)

    async def forward(self, host: str, port: int) -> SSHForwarder:
        """What asyncssh's own forwarding does, but from the bastion's address,
        so that an instance can tell the bastion's connections from others."""
        try:
            _, peer = await asyncio.get_running_loop().create_connection(
                SSHForwarder, host, port, local_addr=(self.address, 0))
        except OSError as exc:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(exc)) from None
        return SSHForwarder(peer)

    async def start(self) -> None:
        self.client_key()
        self._server = await asyncssh.listen(
            host=self.address,
            port=self.port,
            server_factory=lambda: _Server(self),
            server_host_keys=[self.host_key()],
            allow_scp=False,
            agent_forwarding=False,
            x11_forwarding=False,
            reuse_address=True,
        )
        log.info("bastion up: ssh -J %s@%s:%s", self.user, self.address, self.port)

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def endpoints(self) -> dict:
        return {"host": self.address, "port": self.port, "user": self.user, "key_file": str(self.key_file),
                "host_key": self.host_key_text()}
