import sys

from django.core.management.base import BaseCommand, CommandError

from releases import preflight
from releases.models import Environment


class Command(BaseCommand):
    help = ("Run every check a release of ENVIRONMENT depends on (AWS, the repository, SSH to one current instance), "
            "changing nothing: one line per check; exit 1 if any failed. Run it where the workers run.")

    def add_arguments(self, parser):
        parser.add_argument("environment")
        parser.add_argument("--revision", default="", help="also check that the repository has this branch, tag or commit")
        parser.add_argument("--strategy", default="", choices=["", "bake", "deploy_from_image"],
                            help="the image this strategy launches from must be available")

    def handle(self, *args, environment, revision, strategy, **options):
        found = Environment.objects.select_related("recipe").filter(name=environment).first()
        if found is None:
            raise CommandError(f"there is no environment {environment!r}")
        checks = preflight.run(found, revision=revision, strategy=strategy)
        for check in checks:
            (self.stderr if check.status == preflight.FAILED else self.stdout).write(str(check))
        failed = preflight.failed(checks)
        if failed:
            self.stderr.write(f"{len(failed)} of {len(checks)} checks failed: {', '.join(c.name for c in failed)}")
            sys.exit(1)
        warnings = sum(c.status == preflight.WARNING for c in checks)
        self.stdout.write(f"{len(checks)} checks passed" + (f", {warnings} with a warning" if warnings else ""))
