import logging
import os

import asyncssh
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from deployer.sandbox import runner
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
        parser.add_argument("--lb-port", type=int, default=default("lb_port", defaults.lb_port), help="0 picks a free port")
        parser.add_argument("--network", default=default("network", defaults.network), help="loopback CIDR for instance addresses")
        parser.add_argument("--ssh-port", type=int, default=default("ssh_port", defaults.ssh_port))
        parser.add_argument("--app-port", type=int, default=default("app_port", defaults.app_port))
        parser.add_argument("--health-interval", type=float, default=defaults.health.interval)
        parser.add_argument("--healthy-threshold", type=int, default=defaults.health.healthy_threshold)
        parser.add_argument("--unhealthy-threshold", type=int, default=defaults.health.unhealthy_threshold)
        parser.add_argument("--draining-timeout", type=int, default=default("draining_timeout", defaults.draining_timeout))
        parser.add_argument("--no-seed", action="store_true", help="do not create the prepan environment")

    def handle(self, *args, **options):
        logging.getLogger("sandbox").setLevel(logging.INFO)
        for chatty in ("asyncssh", "paramiko", "botocore", "werkzeug"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
        asyncssh.set_log_level(logging.WARNING)
        config = runner.Config(
            directory=Path(options["directory"]).resolve(),
            file=Path(options["file"]).resolve(),
            host=options["host"],
            aws_port=options["aws_port"],
            lb_port=options["lb_port"],
            network=options["network"],
            ssh_port=options["ssh_port"],
            app_port=options["app_port"],
            health=HealthSettings(
                interval=options["health_interval"],
                healthy_threshold=options["healthy_threshold"],
                unhealthy_threshold=options["unhealthy_threshold"],
            ),
            draining_timeout=options["draining_timeout"],
            seed=not options["no_seed"],
        )
        if runner.run(config):
            raise CommandError("the sandbox stopped with an error (see above)")
