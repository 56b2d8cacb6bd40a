from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from deployer import sandbox
from releases import services


class Command(BaseCommand):
    help = "Store (or update) the running sandbox's environment from its endpoints file."

    def add_arguments(self, parser):
        parser.add_argument("--file", default=str(settings.SANDBOX_FILE))

    def handle(self, *args, **options):
        try:
            info = sandbox.load(options["file"])
        except FileNotFoundError:
            raise CommandError(f"{options['file']} does not exist: is the sandbox running?") from None
        try:
            environment = services.environment_import_sandbox(info=info)
        except services.ServiceError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"environment {environment.name}: {environment.public_url}")
