"""Start, run and stop the whole sandbox in one process."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import aws
from . import repository, seed
from .balancer import Balancer, HealthSettings
from .cloud import Cloud
from .demo_recipe import RECIPE
from .hosts import Hosts, kill_marked

log = logging.getLogger("sandbox")

# moto accepts any credentials; these are not secrets and reach nothing else.
CREDENTIALS = {"aws_access_key_id": "sandbox", "aws_secret_access_key": "sandbox"}


@dataclass
class Config:
    directory: Path  # instances, images, the repository, the saved AWS state
    file: Path  # where the endpoints are written once everything is up
    host: str = "127.0.0.1"
    aws_port: int = 5000
    lb_port: int = 8080
    network: str = "127.77.0.0/16"  # instances get addresses here, on loopback
    ssh_port: int = 2222
    ssh_user: str = "ec2-user"
    app_port: int = 8080
    region: str = "us-west-1"
    environment: str = "prepan"
    instance_type: str = "t3.micro"
    health_path: str = "/health"
    health: HealthSettings = field(default_factory=HealthSettings)
    draining_timeout: int = 5
    seed: bool = True

    @property
    def subnet(self) -> str:
        return str(next(ipaddress.ip_network(self.network).subnets(new_prefix=24)))


class Sandbox:
    def __init__(self, config: Config):
        self.config = config
        self.ready = asyncio.Event()

    async def main(self) -> int:
        config = self.config
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        config.file.unlink(missing_ok=True)
        config.directory.mkdir(parents=True, exist_ok=True)
        leftovers = await loop.run_in_executor(None, kill_marked, config.directory, None)
        if leftovers:
            log.warning("ended %d processes left by an earlier sandbox run", leftovers)

        cloud = Cloud(host=config.host, port=config.aws_port, region=config.region, state_file=config.directory / "aws-state.pickle")
        endpoint = cloud.start()
        account = aws.Account(region=config.region, endpoint_url=endpoint, **{
            "access_key_id": CREDENTIALS["aws_access_key_id"],
            "secret_access_key": CREDENTIALS["aws_secret_access_key"],
        })
        hosts = Hosts(cloud=cloud, directory=config.directory, network=config.network, ssh_port=config.ssh_port, ssh_user=config.ssh_user)
        hosts_task = asyncio.create_task(hosts.run(stop))
        balancer = Balancer(account=account, name=config.environment, host=config.host, port=config.lb_port, health=config.health)
        balancer.start()
        cloud.instance_health = lambda lb, instance_id: balancer.state_of(instance_id) if lb == config.environment else None
        status = 0
        try:
            repo_url = await loop.run_in_executor(None, repository.ensure, config.directory / "repo.git")
            plan = seed.Plan(
                environment=config.environment,
                network=config.network,
                subnet=config.subnet,
                ssh_port=config.ssh_port,
                ssh_user=config.ssh_user,
                app_port=config.app_port,
                health_path=config.health_path,
                instance_type=config.instance_type,
                draining_timeout=config.draining_timeout,
                key_file=config.directory / "keys" / f"{config.environment}.pem",
                host_keys_dir=config.directory / "instances",
                repository=repo_url,
                revision=repository.REVISIONS[0],
            )

            def wait_until_routable(instance_ids: set[str], timeout: float = 60) -> None:
                deadline = time.monotonic() + timeout
                while not instance_ids <= set(balancer.routable()):
                    if time.monotonic() > deadline or stop.is_set():
                        raise seed.SeedError(f"{sorted(instance_ids)} never became healthy behind {config.environment}")
                    time.sleep(0.1)

            seeding = loop.run_in_executor(None, seed.ensure_environment, account, plan, wait_until_routable) if config.seed else None
            ids = {}
            if seeding:
                stopping = asyncio.create_task(stop.wait())
                done, _ = await asyncio.wait({seeding, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if seeding not in done:
                    return 0
                ids = seeding.result()
            self._write_file(endpoint, balancer.url, repo_url, plan, ids, cloud, hosts)
            self.ready.set()
            log.info("sandbox ready: AWS %s, load balancer %s, endpoints in %s", endpoint, balancer.url, config.file)
            known = None
            while not stop.is_set():  # keep the file's instance list current
                views = [v for v in cloud.instances() if hosts.ours(v)]
                if views != known:
                    known = views
                    self._write_file(endpoint, balancer.url, repo_url, plan, ids, cloud, hosts)
                try:
                    await asyncio.wait_for(stop.wait(), 1)
                except asyncio.TimeoutError:
                    pass
        except Exception:
            log.exception("the sandbox failed")
            status = 1
        finally:
            stop.set()
            config.file.unlink(missing_ok=True)
            await hosts_task
            balancer.stop()
            await hosts.shutdown()
            cloud.stop()
            log.info("sandbox stopped")
        return status

    def _write_file(self, endpoint, lb_url, repo_url, plan, ids, cloud, hosts) -> None:
        config = self.config
        instances = [
            {
                "id": view.id,
                "name": view.name,
                "state": view.state,
                "private_ip": view.private_ip,
                "ssh": f"{view.private_ip}:{config.ssh_port}",
                "url": f"http://{view.private_ip}:{config.app_port}/",
            }
            for view in cloud.instances()
            if hosts.ours(view)
        ]
        data = {
            "ready": True,
            "aws_endpoint_url": endpoint,
            "region": config.region,
            **CREDENTIALS,
            "environment": config.environment,
            "load_balancer_name": config.environment,
            "load_balancer_url": lb_url,
            "repository": repo_url,
            "revisions": list(repository.REVISIONS),
            "recipe": RECIPE,
            "ssh_user": config.ssh_user,
            "ssh_port": config.ssh_port,
            "ssh_key_file": str(plan.key_file),
            "app_port": config.app_port,
            "health_path": config.health_path,
            "draining_timeout": config.draining_timeout,
            "instance_type": config.instance_type,
            "name_prefix": plan.name_prefix,
            "desired_count": plan.seed_count,
            **ids,
            "instances": instances,
            "addressing": "an instance is reached at its PrivateIpAddress: ssh on ssh_port, the app on app_port",
        }
        tmp = config.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(config.file)


def run(config: Config) -> int:
    return asyncio.run(Sandbox(config).main())
