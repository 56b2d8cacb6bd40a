from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from releases import tokens


class Command(BaseCommand):
    help = ("Make a new API token for a person and print its key (only the key, for scripts). "
            "Any token they had stops working: keys are stored hashed, so an old one cannot be shown again.")

    def add_arguments(self, parser):
        parser.add_argument("username")

    def handle(self, *args, username, **options):
        User = get_user_model()
        try:
            user = User.objects.get(**{User.USERNAME_FIELD: username})
        except User.DoesNotExist:
            raise CommandError(f"there is no user {username!r} (`manage.py grant {username} ROLE` creates one)") from None
        self.stdout.write(tokens.token_rotate(user=user, actor=None))
