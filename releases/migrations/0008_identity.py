"""Every release gets a random identity for its AWS resources, and the
installation an id of its own (issue 9, finding 5).

Releases made before keep their plans: their plan has no "identity", so they
go on finding their instances and image by their id, as they made them. The
uuid they get here names nothing in AWS."""

import uuid

from django.db import migrations, models


def give_every_release_a_uuid(apps, schema_editor):
    Release = apps.get_model("releases", "Release")
    for release in Release.objects.filter(uuid__isnull=True).only("pk").iterator():
        Release.objects.filter(pk=release.pk).update(uuid=uuid.uuid4())


def create_installation(apps, schema_editor):
    apps.get_model("releases", "Installation").objects.get_or_create(pk=1)


class Migration(migrations.Migration):

    dependencies = [
        ("releases", "0007_api_token"),
    ]

    operations = [
        migrations.AddField(
            model_name="release",
            name="uuid",
            field=models.UUIDField(editable=False, null=True),
        ),
        migrations.RunPython(give_every_release_a_uuid, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="release",
            name="uuid",
            field=models.UUIDField(default=uuid.uuid4, editable=False, unique=True),
        ),
        migrations.CreateModel(
            name="Installation",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("uuid", models.UUIDField(default=uuid.uuid4, editable=False, unique=True)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
            ],
        ),
        migrations.RunPython(create_installation, migrations.RunPython.noop),
    ]
