import logging
import os

import asyncssh
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from deployer.sandbox import runner, timings
from deployer.sandbox.balancer import HealthSettings


class Command(BaseCommand):
    help = "Run the local stand-in for AWS, SSH hosts and the load balancer, on loopback."

    def add_arguments(self, parser):
        defaults = runner.Config(directory=Path(), file=Path())

        def default(name, value):  # SANDBOX_<NAME> in the environment overrides a default
            return type(value)(os.environ.get(f"SANDBOX_{name.upper()}", value))

        parser.add_argument("--directory", default=str(settings.VAR_DIR / "sandbox"), help="state (instances, images, AWS)")
        parser.add_argument("--file", default=str(settings.SANDBOX_FILE), help="where to write the endpoints")
        parser.add_argument("--host", default=default("host", defaults.host), help="where the AWS endpoint and load balancer listen")
        parser.add_argument("--aws-port", type=int, default=default("aws_port", defaults.aws_port), help="0 picks a free port")
        parser.add_argument("--lb-port", type=int, default=default("lb_port", defaults.lb_port),
                            help="the first environment's load balancer; the others get the next ports (0 picks free ports)")
        parser.add_argument("--smtp-port", type=int, default=default("smtp_port", defaults.smtp_port),
                            help="the inbox's mail catcher (0 picks a free port)")
        parser.add_argument("--inbox-port", type=int, default=default("inbox_port", defaults.inbox_port),
                            help="the inbox's page of received notifications, and its Slack and webhook receiver (0 picks a free port)")
        parser.add_argument("--network", default=default("network", defaults.network), help="loopback CIDR for instance addresses")
        parser.add_argument("--ssh-port", type=int, default=default("ssh_port", defaults.ssh_port))
        parser.add_argument("--app-port", type=int, default=default("app_port", defaults.app_port))
        parser.add_argument("--health-interval", type=float, default=defaults.health.interval, help="fast profile only")
        parser.add_argument("--healthy-threshold", type=int, default=defaults.health.healthy_threshold, help="fast profile only")
        parser.add_argument("--unhealthy-threshold", type=int, default=defaults.health.unhealthy_threshold, help="fast profile only")
        parser.add_argument("--draining-timeout", type=int, default=default("draining_timeout", defaults.draining_timeout),
                            help="the seeded load balancer's draining, fast profile only (aws: 300)")
        parser.add_argument("--timings", choices=timings.PROFILES, default=default("timings", defaults.timings_profile),
                            help="fast (moto's instant answers) or aws (AWS's own durations and behaviour)")
        parser.add_argument("--time-scale", type=float, default=default("time_scale", defaults.time_scale),
                            help="multiplies every sandbox delay: 0.02 plays a 300 s drain in 6 s")
        parser.add_argument("--timing", action="append", default=[], metavar="NAME=SECONDS",
                            help="override one entry of the timings table (unscaled); also SANDBOX_TIMING_<NAME>")
        parser.add_argument("--load-balancer", choices=("classic", "alb"), default=default("load_balancer", defaults.load_balancer),
                            help="a classic ELB, or an application load balancer with a target group")
        parser.add_argument("--environments", default=default("environments", ",".join(defaults.environments)),
                            help="comma-separated environments to seed, each behind its own load balancer")
        parser.add_argument("--seed-count", type=int, default=default("seed_count", defaults.seed_count), help="instances per environment")
        parser.add_argument("--no-seed", action="store_true", help="do not create the environments")
        parser.add_argument("--bastion", action="store_true", default=os.environ.get("SANDBOX_BASTION", "") == "true",
                            help="run a bastion host; the instances then accept SSH only through it (as ProxyJump)")

    def handle(self, *args, **options):
        logging.getLogger("sandbox").setLevel(logging.INFO)
        for chatty in ("asyncssh", "paramiko", "botocore", "werkzeug", "mail.log"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
        asyncssh.set_log_level(logging.WARNING)
        environments = tuple(name.strip() for name in options["environments"].split(",") if name.strip())
        if not environments or len(set(environments)) != len(environments):
            raise CommandError(f"--environments needs distinct names, not {options['environments']!r}")
        if options["time_scale"] <= 0:
            raise CommandError("--time-scale must be above 0")
        try:
            overrides = {**timings.from_environment(), **timings.parse_overrides(options["timing"])}
            table = timings.profile(options["timings"], draining_timeout=options["draining_timeout"], overrides=overrides)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        config = runner.Config(
            directory=Path(options["directory"]).resolve(),
            file=Path(options["file"]).resolve(),
            host=options["host"],
            aws_port=options["aws_port"],
            lb_port=options["lb_port"],
            smtp_port=options["smtp_port"],
            inbox_port=options["inbox_port"],
            network=options["network"],
            ssh_port=options["ssh_port"],
            app_port=options["app_port"],
            environments=environments,
            health=HealthSettings(
                interval=options["health_interval"],
                healthy_threshold=options["healthy_threshold"],
                unhealthy_threshold=options["unhealthy_threshold"],
            ),
            draining_timeout=options["draining_timeout"],
            seed=not options["no_seed"],
            seed_count=options["seed_count"],
            load_balancer=options["load_balancer"],
            timings_profile=options["timings"],
            timings=table,
            time_scale=options["time_scale"],
            bastion=options["bastion"],
        )
        if runner.run(config):
            raise CommandError("the sandbox stopped with an error (see above)")
