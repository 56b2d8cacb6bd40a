import secrets

from django.contrib.auth.models import Group, User
from django.core.management.base import BaseCommand, CommandError

from releases import roles


class Command(BaseCommand):
    help = "Give a person roles (viewer, deployer, approver, maintainer), creating them if needed."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("roles", nargs="+", choices=roles.ALL)

    def handle(self, *args, username, roles, **options):
        user, created = User.objects.get_or_create(username=username)
        if created:
            password = secrets.token_urlsafe(12)
            user.set_password(password)
            user.save()
            self.stdout.write(f"created {username} with password {password}")
        try:
            user.groups.add(*(Group.objects.get(name=role) for role in roles))
        except Group.DoesNotExist:
            raise CommandError("the role groups are missing: run `manage.py migrate`") from None
        self.stdout.write(f"{username}: {', '.join(sorted(user.groups.values_list('name', flat=True)))}")
