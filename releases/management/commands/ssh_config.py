from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from deployer.errors import AdapterError
from releases import selectors
from releases.models import Environment


class Command(BaseCommand):
    help = ("Write an OpenSSH config of an environment's instances (one Host per Name tag, the bastion as ProxyJump) "
            "and a known_hosts of their pinned keys: ssh -F <config> app-3")

    def add_arguments(self, parser):
        parser.add_argument("environment")
        parser.add_argument("--directory", help="where to write ssh_config and known_hosts (default: var/ssh/<environment>)")

    def handle(self, *args, **options):
        environment = Environment.objects.filter(name=options["environment"]).first()
        if environment is None:
            raise CommandError(f"no environment named {options['environment']!r}")
        directory = Path(options["directory"] or settings.VAR_DIR / "ssh" / environment.name).resolve()
        known_hosts = directory / "known_hosts"
        try:
            config, keys = selectors.environment_ssh_config(environment, known_hosts=str(known_hosts))
        except AdapterError as exc:
            raise CommandError(str(exc)) from None
        directory.mkdir(parents=True, exist_ok=True)
        config_file = directory / "ssh_config"
        config_file.write_text(config)
        known_hosts.write_text(keys)
        self.stdout.write(f"wrote {config_file} and {known_hosts}")
        self.stdout.write(f"use: ssh -F {config_file} <instance name>")
