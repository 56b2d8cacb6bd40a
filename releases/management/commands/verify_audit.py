import sys

from django.core.management.base import BaseCommand

from releases import audit


class Command(BaseCommand):
    help = "Walk the audit chain from its first event and name the first broken link; exit 1 if there is one."

    def handle(self, *args, **options):
        verdict = audit.verify()
        if not verdict.ok:
            self.stderr.write(str(verdict))
            sys.exit(1)
        self.stdout.write(f"{verdict} (last position {verdict.seq}, hash {verdict.hash[:16]})")
