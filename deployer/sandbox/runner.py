"""Start, run and stop the whole sandbox in one process."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import aws, ssh
from . import repository, seed
from .balancer import Balancer, HealthSettings
from .bastion import Bastion
from .cloud import Cloud
from .demo_recipe import RECIPE, cookbook_recipe
from .hosts import Hosts, kill_marked
from .inbox import Inbox
from .timings import FAST, Timings

log = logging.getLogger("sandbox")

# how often the AWS state is saved while the sandbox runs (a clean stop saves it too)
CHECKPOINT_SECONDS = 2.0
# moto accepts any credentials; these are not secrets and reach nothing else.
CREDENTIALS = {"aws_access_key_id": "sandbox", "aws_secret_access_key": "sandbox"}


@dataclass
class Config:
    directory: Path  # instances, images, the repository, the saved AWS state
    file: Path  # where the endpoints are written once everything is up
    host: str = "127.0.0.1"
    aws_port: int = 5000
    lb_port: int = 8080  # the first environment's; the others get lb_port+i (or free ports, with 0)
    network: str = "127.77.0.0/16"  # instances get addresses here, on loopback
    ssh_port: int = 2222
    ssh_user: str = "ec2-user"
    app_port: int = 8080
    region: str = aws.SANDBOX_REGION
    environments: tuple[str, ...] = ("prepan",)
    instance_type: str = "t3.micro"
    health_path: str = "/health"
    health: HealthSettings = field(default_factory=HealthSettings)  # the fast profile's own checks
    draining_timeout: int = 5
    seed: bool = True
    seed_count: int = 2
    load_balancer: str = "classic"  # or "alb"
    timings_profile: str = "fast"  # or "aws"
    timings: Timings = FAST
    time_scale: float = 1.0
    bastion: bool = False  # the instances accept SSH only through a bastion of the sandbox's
    bastion_user: str = "bastion"
    smtp_port: int = 1025  # the inbox's mail catcher (0 picks a free port)
    inbox_port: int = 8025  # the inbox's page and its Slack / webhook receiver (0 picks a free port)

    @property
    def bastion_address(self) -> str:
        """The network's last address but one: never an environment's /24, which count from the first."""
        return str(ipaddress.ip_network(self.network)[-2])

    @property
    def environment(self) -> str:
        return self.environments[0]

    @property
    def subnet(self) -> str:
        return self.subnet_of(0)

    def subnet_of(self, index: int) -> str:
        """Each environment its own /24, so no two instances share an address."""
        subnets = ipaddress.ip_network(self.network).subnets(new_prefix=24)
        for _ in range(index):
            next(subnets)
        return str(next(subnets))

    def name_prefix(self, index: int) -> str:
        return "app-" if index == 0 else f"{self.environments[index]}-app-"

    def lb_port_of(self, index: int) -> int:
        return self.lb_port + index if self.lb_port else 0

    def scaled(self, name: str) -> float:
        return getattr(self.timings, name) * self.time_scale

    def patience(self) -> float:
        """How long seeding waits for a new instance to boot and answer SSH."""
        return 30 + sum(self.scaled(n) for n in ("not_found", "instance_pending", "boot"))

    def routable_timeout(self) -> float:
        """How long seeding waits for the instances to pass the health checks."""
        t = self.timings
        if self.timings_profile != "aws":
            return 60
        checks = (t.target_healthy_threshold * t.target_health_interval if self.load_balancer == "alb"
                  else t.elb_healthy_threshold * t.elb_health_interval)
        return 60 + checks * self.time_scale


@dataclass
class Environment:
    """One seeded environment: its plan, its balancer, and what seeding made."""
    plan: seed.Plan
    balancer: Balancer
    ids: dict = field(default_factory=dict)


class Sandbox:
    def __init__(self, config: Config):
        self.config = config
        self.ready = asyncio.Event()
        self.bastion: Bastion | None = None
        self.jump = None  # what seeding reaches the instances through: the bastion, if there is one
        self.inbox = Inbox(directory=config.directory, host=config.host, smtp_port=config.smtp_port, http_port=config.inbox_port)

    def _plan(self, index: int, repo_url: str) -> seed.Plan:
        config = self.config
        name = config.environments[index]
        return seed.Plan(
            environment=name,
            network=config.network,
            subnet=config.subnet_of(index),
            ssh_port=config.ssh_port,
            ssh_user=config.ssh_user,
            app_port=config.app_port,
            health_path=config.health_path,
            instance_type=config.instance_type,
            key_file=config.directory / "keys" / f"{name}.pem",
            host_keys_dir=config.directory / "instances",
            repository=repo_url,
            revision=repository.REVISIONS[0],
            seed_count=config.seed_count,
            name_prefix=config.name_prefix(index),
            load_balancer=config.load_balancer,
            timings=config.timings,
            patience=config.patience(),
            jump=self.jump,
        )

    def _balancer(self, index: int, account: aws.Account) -> Balancer:
        config = self.config
        name = config.environments[index]
        return Balancer(
            account=account,
            name=name,
            target_group_name=f"{name}-app" if config.load_balancer == "alb" else None,
            host=config.host,
            port=config.lb_port_of(index),
            health=config.health,
            health_from_lb=config.timings_profile == "aws",
            scale=config.time_scale,
        )

    def _connect(self, cloud: Cloud, balancers: list[Balancer]) -> None:
        """The health APIs answer from the sandbox's balancers."""
        by_name = {b.name: b for b in balancers if b.kind == "classic"}

        def by_arn(arn: str) -> Balancer | None:
            return next((b for b in balancers if b.target_group_arn == arn), None)

        def instance_health(lb: str, instance_id: str):
            balancer = by_name.get(lb)
            return balancer.state_of(instance_id) if balancer else None

        def target_health(arn: str, target_id: str, registered: bool):
            balancer = by_arn(arn)
            return balancer.target_state(target_id, registered) if balancer else None

        def draining_targets(arn: str, registered: set[str]):
            balancer = by_arn(arn)
            return balancer.draining(registered) if balancer else []

        cloud.instance_health = instance_health
        cloud.target_health = target_health
        cloud.draining_targets = draining_targets

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
        try:
            await self.inbox.start()
        except OSError as exc:
            log.error("%s", exc)
            return 1

        cloud = Cloud(host=config.host, port=config.aws_port, region=config.region, state_file=config.directory / "aws-state.pickle",
                      timings=config.timings, scale=config.time_scale, aws_behaviour=config.timings_profile == "aws")
        endpoint = cloud.start()
        account = aws.Account(region=config.region, endpoint_url=endpoint, **{
            "access_key_id": CREDENTIALS["aws_access_key_id"],
            "secret_access_key": CREDENTIALS["aws_secret_access_key"],
        })
        if config.bastion:
            self.bastion = Bastion(directory=config.directory, address=config.bastion_address, port=config.ssh_port,
                                   user=config.bastion_user, network=config.network)
            await self.bastion.start()
            self.jump = ssh.Target(host=self.bastion.address, port=self.bastion.port, user=self.bastion.user,
                                   private_key=self.bastion.key_file.read_text(), host_key=self.bastion.host_key_text())
        hosts = Hosts(cloud=cloud, directory=config.directory, network=config.network, ssh_port=config.ssh_port,
                      ssh_user=config.ssh_user, ssh_from=self.bastion.address if self.bastion else "")
        hosts_task = asyncio.create_task(hosts.run(stop))
        balancers = [self._balancer(i, account) for i in range(len(config.environments))]
        for balancer in balancers:
            balancer.start()
        self._connect(cloud, balancers)
        status = 0
        try:
            repo_url = await loop.run_in_executor(None, repository.ensure, config.directory / "repo.git")
            environments = [Environment(self._plan(i, repo_url), balancers[i]) for i in range(len(config.environments))]
            if config.seed:
                # threads of their own: seeding waits for hosts to boot, and booting needs the
                # loop's default executor (getaddrinfo), which six waiting seeds would fill
                seeders = ThreadPoolExecutor(max_workers=len(environments), thread_name_prefix="seed")
                seeding = asyncio.gather(*(loop.run_in_executor(seeders, self._seed, account, e, stop) for e in environments))
                stopping = asyncio.create_task(stop.wait())
                done, _ = await asyncio.wait({seeding, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if seeding not in done:
                    return 0
                for environment, ids in zip(environments, seeding.result()):
                    environment.ids = ids
            self._write_file(endpoint, repo_url, environments, cloud, hosts)
            self.ready.set()
            log.info("sandbox ready (%s timings, scale %g, %s load balancer): AWS %s, load balancer %s, inbox %s, endpoints in %s",
                     config.timings_profile, config.time_scale, config.load_balancer, endpoint, balancers[0].url, self.inbox.url,
                     config.file)
            known, checkpointed = None, time.monotonic()
            while not stop.is_set():  # keep the file's instance list current, and the saved state
                views = [v for v in cloud.instances() if hosts.ours(v)]
                if views != known:
                    known = views
                    self._write_file(endpoint, repo_url, environments, cloud, hosts)
                if time.monotonic() - checkpointed >= CHECKPOINT_SECONDS:
                    await loop.run_in_executor(None, cloud.checkpoint)
                    checkpointed = time.monotonic()
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
            for balancer in balancers:
                balancer.stop()
            await hosts.shutdown()
            if self.bastion:
                await self.bastion.stop()
            cloud.stop()
            await self.inbox.stop()
            log.info("sandbox stopped")
        return status

    def _seed(self, account: aws.Account, environment: Environment, stop: asyncio.Event) -> dict:
        balancer, timeout = environment.balancer, self.config.routable_timeout()

        def wait_until_routable(instance_ids: set[str]) -> None:
            deadline = time.monotonic() + timeout
            while not instance_ids <= set(balancer.routable()):
                if time.monotonic() > deadline or stop.is_set():
                    raise seed.SeedError(f"{sorted(instance_ids)} never became healthy behind {balancer.name}")
                time.sleep(0.1)

        return seed.ensure_environment(account, environment.plan, wait_until_routable)

    def _environment_entry(self, shared: dict, environment: Environment, instances: list[dict]) -> dict:
        config, plan = self.config, environment.plan
        subnet = ipaddress.ip_network(plan.subnet)
        return {
            **shared,
            "environment": plan.environment,
            "load_balancer_name": plan.environment,
            "load_balancer_url": environment.balancer.url,
            "ssh_key_file": str(plan.key_file),
            "name_prefix": plan.name_prefix,
            "desired_count": plan.seed_count,
            # what the seeded load balancer drains for, unscaled, as it is configured
            "draining_timeout": config.timings.deregistration_delay if config.load_balancer == "alb" else config.timings.connection_draining,
            **({"target_group_name": plan.target_group_name} if config.load_balancer == "alb" else {}),
            **environment.ids,
            "instances": [i for i in instances if ipaddress.ip_address(i["private_ip"]) in subnet],
        }

    def _write_file(self, endpoint, repo_url, environments: list[Environment], cloud, hosts) -> None:
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
        shared = {
            "ready": True,
            "aws_endpoint_url": endpoint,
            "region": config.region,
            **CREDENTIALS,
            "load_balancer_kind": config.load_balancer,
            "timings": config.timings_profile,
            "time_scale": config.time_scale,
            "timings_table": dict(config.timings.items()),
            "repository": repo_url,
            "revisions": list(repository.REVISIONS),
            "recipe": RECIPE,
            # more recipes the demo offers for the same app: provisioned from the worker's side
            "recipes": {"cookbook": cookbook_recipe()},
            "ssh_user": config.ssh_user,
            "ssh_port": config.ssh_port,
            "app_port": config.app_port,
            "health_path": config.health_path,
            "instance_type": config.instance_type,
            **({"bastion": self.bastion.endpoints()} if self.bastion else {}),
            # the mail catcher and Slack / webhook receiver, and channels for each environment pointing at them
            "inbox": self.inbox.endpoints(list(config.environments)),
        }
        entries = [self._environment_entry(shared, e, instances) for e in environments]
        data = {
            **entries[0],
            "instances": instances,  # every instance on the sandbox's network, as before
            "environments": entries,
            "addressing": "an instance is reached at its PrivateIpAddress: ssh on ssh_port, the app on app_port",
        }
        tmp = config.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(config.file)


def run(config: Config) -> int:
    return asyncio.run(Sandbox(config).main())
