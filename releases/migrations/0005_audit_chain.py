"""The audit chain: each event is hashed with the one before it, and on PostgreSQL
the table refuses UPDATE and DELETE. Events written before this are chained here,
in id order."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

from releases import chain

APPEND_ONLY = """
CREATE FUNCTION releases_auditevent_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
        MESSAGE = 'audit events are append-only: ' || TG_OP || ' on releases_auditevent refused';
END $$;
CREATE TRIGGER releases_auditevent_append_only BEFORE UPDATE OR DELETE ON releases_auditevent
    FOR EACH ROW EXECUTE FUNCTION releases_auditevent_append_only();
"""
NOT_APPEND_ONLY = """
DROP TRIGGER IF EXISTS releases_auditevent_append_only ON releases_auditevent;
DROP FUNCTION IF EXISTS releases_auditevent_append_only();
"""


def chain_existing(apps, schema_editor):
    AuditEvent = apps.get_model("releases", "AuditEvent")
    AuditChainHead = apps.get_model("releases", "AuditChainHead")
    secret = chain.key()
    seq, prev = 0, chain.GENESIS
    for event in AuditEvent.objects.order_by("id").iterator(chunk_size=2000):
        seq += 1
        # what the JSON column gives back is what later verification hashes
        event.details = chain.canonical_details(event.details)
        event.seq, event.prev_hash = seq, prev
        event.hash = prev = chain.mac(event, secret=secret)
        event.save(update_fields=["details", "seq", "prev_hash", "hash"])
    AuditChainHead.objects.update_or_create(pk=1, defaults={"seq": seq, "hash": prev})


def append_only(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(APPEND_ONLY)


def not_append_only(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(NOT_APPEND_ONLY)


class Migration(migrations.Migration):

    dependencies = [
        ('releases', '0004_durable_waits'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name='AuditChainHead',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('seq', models.PositiveBigIntegerField(default=0)),
                ('hash', models.CharField(default='0000000000000000000000000000000000000000000000000000000000000000', max_length=64)),
            ],
        ),
        migrations.AlterField(
            model_name='auditevent',
            name='actor',
            field=models.ForeignKey(blank=True, db_constraint=False, null=True, on_delete=django.db.models.deletion.DO_NOTHING, related_name='+', to=settings.AUTH_USER_MODEL),
        ),
        migrations.AlterField(
            model_name='auditevent',
            name='at',
            field=models.DateTimeField(db_index=True),
        ),
        migrations.AlterField(
            model_name='auditevent',
            name='environment',
            field=models.ForeignKey(blank=True, db_constraint=False, null=True, on_delete=django.db.models.deletion.DO_NOTHING, related_name='+', to='releases.environment'),
        ),
        migrations.AlterField(
            model_name='auditevent',
            name='release',
            field=models.ForeignKey(blank=True, db_constraint=False, null=True, on_delete=django.db.models.deletion.DO_NOTHING, related_name='audit_events', to='releases.release'),
        ),
        migrations.AddField(
            model_name='auditevent',
            name='hash',
            field=models.CharField(default='', max_length=64),
            preserve_default=False,
        ),
        migrations.AddField(
            model_name='auditevent',
            name='prev_hash',
            field=models.CharField(default='', max_length=64),
            preserve_default=False,
        ),
        migrations.AddField(
            model_name='auditevent',
            name='seq',
            field=models.PositiveBigIntegerField(null=True),
        ),
        migrations.RunPython(chain_existing, migrations.RunPython.noop),
        migrations.AlterField(
            model_name='auditevent',
            name='seq',
            field=models.PositiveBigIntegerField(help_text='position in the chain, from 1, no gaps', unique=True),
        ),
        migrations.RunPython(append_only, not_append_only),
    ]
