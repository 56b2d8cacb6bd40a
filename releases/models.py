"""The release domain: environments, recipes, releases and their steps.

State changes go through `releases.transitions` (conditional updates), never
through `save()` on a loaded row, so two workers can never both win.
"""

from __future__ import annotations

import re
import uuid

from django.conf import settings
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.db import models
from django.db.models import Q
from django.utils import timezone

from deployer import git
from deployer import recipe as recipes
from deployer.errors import AdapterError


class Recipe(models.Model):
    name = models.SlugField(max_length=100, unique=True)
    definition = models.JSONField(help_text="params, tasks and phases (see deployer/recipe.py)")
    updated_at = models.DateTimeField(auto_now=True)

    def clean(self):
        try:
            recipes.validate(self.definition)
        except recipes.RecipeError as exc:
            raise ValidationError({"definition": str(exc)}) from None

    def save(self, *args, **kwargs):
        self.full_clean()
        super().save(*args, **kwargs)

    def __str__(self):
        return self.name


class RecipeChange(models.Model):
    """A recipe definition a maintainer proposed for a recipe that an
    environment with four eyes uses: it takes effect only when someone else
    approves it, like a gate."""

    class Status(models.TextChoices):
        PENDING = "pending"
        APPROVED = "approved"  # applied to the recipe
        REJECTED = "rejected"

    recipe = models.ForeignKey(Recipe, on_delete=models.CASCADE, related_name="changes")
    definition = models.JSONField()
    proposed_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    decided_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING)
    at = models.DateTimeField(auto_now_add=True)
    decided_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-at", "-id"]


def validate_repository(value: str) -> None:
    try:
        git.check_repository(value, allow_file=settings.ALLOW_FILE_REPOSITORIES)
    except AdapterError as exc:
        raise ValidationError(str(exc)) from None


USER_DATA_LIMIT = 16 * 1024  # bytes: RunInstances refuses more (before base64)
# What RunInstances takes (AWS's limits): an instance profile by name or ARN, and root volume sizes by type
INSTANCE_PROFILE_NAME = re.compile(r"[\w+=,.@-]{1,128}", re.ASCII)
INSTANCE_PROFILE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:instance-profile/(?:[\w+=,.@-]+/)*[\w+=,.@-]{1,128}",
                                  re.ASCII)
VOLUME_SIZES = {"st1": (125, 16384), "sc1": (125, 16384), "standard": (1, 1024)}
APPROVALS_MAX = 10  # distinct approvals a gate may need
URL_FIELDS = ("private_ip", "public_ip", "public_dns", "address", "port", "name")


def launch_setting_errors(environment) -> dict[str, str]:
    """What is wrong with an environment's launch and access settings, by field."""
    import string

    errors = {}
    if len(environment.user_data.encode()) > USER_DATA_LIMIT:
        errors["user_data"] = f"at most {USER_DATA_LIMIT // 1024} KB (AWS refuses more)"
    tags = environment.extra_tags
    if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        errors["extra_tags"] = 'an object of names to values, both text: {"team": "web"}'
    elif bad := sorted(k for k in tags if k == "Name" or k.lower().startswith(("greenlight:", "aws:")) or not 0 < len(k) <= 128):
        errors["extra_tags"] = f"{bad[0]!r} is Greenlight's or AWS's own tag (or not 1 to 128 characters)"
    elif bad := sorted(k for k, v in tags.items() if len(v) > 256):
        errors["extra_tags"] = f"the value of {bad[0]!r} is longer than 256 characters"
    subnets = environment.extra_subnet_ids
    if not isinstance(subnets, list) or not all(isinstance(x, str) and x.startswith("subnet-") for x in subnets):
        errors["extra_subnet_ids"] = "subnet ids, such as subnet-0abc..., one per line"
    elif environment.subnet_id in subnets or len(set(subnets)) != len(subnets):
        errors["extra_subnet_ids"] = "each subnet once, and not the first subnet again"
    if environment.root_volume_size is not None and not 1 <= environment.root_volume_size <= 16384:
        errors["root_volume_size"] = "from 1 to 16384 GiB"
    elif environment.root_volume_size is not None and (bounds := VOLUME_SIZES.get(environment.root_volume_type)) and \
            not bounds[0] <= environment.root_volume_size <= bounds[1]:
        errors["root_volume_size"] = f"a {environment.root_volume_type} volume is from {bounds[0]} to {bounds[1]} GiB"
    if environment.root_volume_type in ("io1", "io2"):
        errors["root_volume_type"] = ("io1 and io2 volumes need provisioned IOPS, which Greenlight does not set: "
                                      "choose another type, or keep the image's own")
    if profile := environment.instance_profile:
        if profile.startswith("arn:"):
            if not INSTANCE_PROFILE_ARN.fullmatch(profile):
                errors["instance_profile"] = "an ARN as arn:aws:iam::123456789012:instance-profile/NAME"
        elif not INSTANCE_PROFILE_NAME.fullmatch(profile):
            errors["instance_profile"] = ("a name of 1 to 128 letters, digits and +=,.@_- "
                                          "(or the profile's ARN, arn:aws:iam::...:instance-profile/NAME)")
    if environment.bastion_host:
        if not environment.bastion_host_key.strip():
            errors["bastion_host_key"] = "a bastion's host key must be pinned: ssh-keyscan it, and check it, once"
        elif len(environment.bastion_host_key.split()) < 2:
            errors["bastion_host_key"] = 'a public key as "ssh-ed25519 AAAA..." (a known_hosts line without the host)'
    if not 1 <= environment.bastion_port <= 65535:
        errors["bastion_port"] = "a port from 1 to 65535"
    if template := environment.verify_url_template:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as exc:
            names, errors["verify_url_template"] = set(), f"not a template: {exc}"
        if unknown := sorted(names - set(URL_FIELDS)):
            errors["verify_url_template"] = f"{{{unknown[0]}}} is not one of {', '.join('{' + n + '}' for n in URL_FIELDS)}"
        elif not template.startswith(("http://", "https://")):
            errors.setdefault("verify_url_template", "an http:// or https:// URL")
    return errors


class Environment(models.Model):
    class Address(models.TextChoices):
        PRIVATE = "private", "private IP (Greenlight runs inside the VPC)"
        PUBLIC = "public", "public DNS name"

    class VolumeType(models.TextChoices):
        IMAGE = "", "as the image says"
        GP3 = "gp3", "gp3 (general purpose SSD)"
        GP2 = "gp2", "gp2 (general purpose SSD, older)"
        IO1 = "io1", "io1 (provisioned IOPS SSD)"
        IO2 = "io2", "io2 (provisioned IOPS SSD)"
        ST1 = "st1", "st1 (throughput HDD)"
        SC1 = "sc1", "sc1 (cold HDD)"
        STANDARD = "standard", "standard (magnetic)"

    class PublicIp(models.TextChoices):
        SUBNET = "subnet", "as the subnet says"
        YES = "yes", "a public IP"
        NO = "no", "no public IP"

    name = models.SlugField(max_length=100, unique=True)
    region = models.CharField(max_length=32)
    aws_endpoint_url = models.URLField(blank=True, help_text="empty for AWS itself; the sandbox's endpoint otherwise")
    aws_credentials = models.CharField(
        max_length=200,
        blank=True,
        help_text='a reference, never the keys: "" (the worker\'s default chain), "profile:NAME", '
        '"env:PREFIX" (PREFIX_ACCESS_KEY_ID / PREFIX_SECRET_ACCESS_KEY), or "sandbox"',
    )
    load_balancer_name = models.CharField(max_length=200, blank=True, help_text="a classic ELB")
    target_group_arn = models.CharField(max_length=400, blank=True, help_text="or an ELBv2 target group")
    public_url = models.URLField(help_text="where users reach the service (the load balancer's address); checked after the swap")
    verify_security_group_id = models.CharField(max_length=64)
    verify_cidr = models.CharField(max_length=64, default="127.0.0.1/32", help_text="who may reach the canary directly")
    security_group_ids = models.JSONField(default=list, blank=True, help_text="security groups for new instances")
    app_port = models.PositiveIntegerField(default=80)
    health_path = models.CharField(max_length=200, default="/health")
    expected_text = models.CharField(max_length=200, blank=True, help_text="smoke checks expect / to contain this ({revision} allowed)")
    ssh_user = models.CharField(max_length=64, default="ec2-user")
    ssh_port = models.PositiveIntegerField(default=22)
    ssh_key_file = models.CharField(max_length=400, help_text="path on the workers to the key pair's private key")
    address = models.CharField(max_length=8, choices=Address.choices, default=Address.PRIVATE)
    instance_type = models.CharField(max_length=32, default="t3.micro")
    subnet_id = models.CharField(max_length=64)
    key_name = models.CharField(max_length=200)
    base_ami = models.CharField(max_length=64)
    last_baked_ami = models.CharField(max_length=64, blank=True)
    name_prefix = models.CharField(max_length=64, default="app-")
    desired_count = models.PositiveIntegerField(default=2)
    default_strategy = models.CharField(
        max_length=32, choices=[("bake", "bake"), ("deploy_from_image", "deploy_from_image")], default="bake",
        help_text="what the wizard and the API choose when a release names no strategy; "
                  "deploy_from_image needs a baked image, and is never chosen silently instead")
    repository = models.CharField(
        max_length=400, validators=[validate_repository],
        help_text="https://..., ssh://... or git@host:path (file:// only where ALLOW_FILE_REPOSITORIES is set)")
    recipe = models.ForeignKey(Recipe, on_delete=models.PROTECT)
    four_eyes = models.BooleanField(default=True, help_text="whoever starts a release cannot decide its gates")
    gate_timeout = models.PositiveIntegerField(default=3600, help_text="seconds before an open gate rejects itself")
    retention = models.PositiveIntegerField(default=86400, help_text="seconds old instances stay stopped before termination")
    # How long each wait on AWS may take (README: "How long a release may wait").
    # The load balancer's waits follow its own settings and are not listed here.
    instance_timeout = models.PositiveIntegerField(default=600, help_text="seconds an instance may take to be running or stopped")
    ssh_timeout = models.PositiveIntegerField(default=600, help_text="seconds a new instance may take to answer SSH")
    image_timeout = models.PositiveIntegerField(default=3600, help_text="seconds a new image may take to be available")
    smoke_timeout = models.PositiveIntegerField(default=300, help_text="seconds new instances may take to pass their smoke checks")
    command_timeout = models.PositiveIntegerField(default=1800, help_text="seconds one recipe command may run (a task's own timeout wins)")
    time_scale = models.FloatField(
        default=1.0,
        help_text="how fast this cloud's clock runs: 1 on AWS; a sandbox playing AWS's timings faster says its "
        "SANDBOX_TIME_SCALE. Multiplies every wait on AWS. Set by an administrator only.",
    )
    # -- what RunInstances gets (issue 10) ------------------------------------
    instance_profile = models.CharField(
        max_length=400, blank=True, help_text="IAM instance profile for new instances, by name or ARN; empty for none")
    user_data = models.TextField(
        blank=True, help_text="cloud-init user data for new instances (at most 16 KB); runs as root on them")
    root_volume_size = models.PositiveIntegerField(
        null=True, blank=True, help_text="GiB of the root volume; empty keeps the image's own size")
    root_volume_type = models.CharField(max_length=8, choices=VolumeType.choices, default=VolumeType.IMAGE, blank=True)
    root_volume_encrypted = models.BooleanField(default=True, help_text="encrypt the root volume (the account's default KMS key)")
    require_imdsv2 = models.BooleanField(
        default=True, help_text="instances answer metadata requests only with a session token (IMDSv2)")
    public_ip = models.CharField(max_length=8, choices=PublicIp.choices, default=PublicIp.SUBNET)
    extra_tags = models.JSONField(default=dict, blank=True, help_text="more tags for new instances, e.g. {\"team\": \"web\"}")
    extra_subnet_ids = models.JSONField(
        default=list, blank=True,
        help_text="more subnets, in other availability zones: the canary goes in the subnet above, clones are spread "
        "over all of them")
    # -- SSH through a jump host, and what a person opens at the direct check (issue 10)
    bastion_host = models.CharField(
        max_length=255, blank=True, help_text="a jump host the workers reach the instances through (as ProxyJump); "
        "empty: the workers reach them directly")
    bastion_port = models.PositiveIntegerField(default=22)
    bastion_user = models.CharField(max_length=64, blank=True, help_text="empty: the instances' SSH user")
    bastion_key_file = models.CharField(
        max_length=400, blank=True, help_text="path on the workers to the bastion's private key; empty: the instances' key")
    bastion_host_key = models.CharField(
        max_length=2000, blank=True, help_text="the bastion's public host key, pinned (\"ssh-ed25519 AAAA...\"); "
        "required with a bastion")
    verify_url_template = models.CharField(
        max_length=400, blank=True,
        help_text="the canary's URL for the direct check, if not http://{address}:{port}/ -- "
        "{private_ip}, {public_ip}, {public_dns}, {address}, {port} and {name} are filled in")
    # -- clean-up (issue 10)
    images_kept = models.PositiveIntegerField(
        default=5, help_text="baked images kept (with their snapshots); older ones are deleted, never one an instance "
        "or the rollback uses")
    # -- who may deploy and decide (issue 11): empty keeps the global roles
    deploy_groups = models.ManyToManyField(
        "auth.Group", blank=True, related_name="+",
        help_text="only deployers in one of these groups may start, cancel, retry or roll back here; none: every deployer")
    verify_groups = models.ManyToManyField(
        "auth.Group", blank=True, related_name="+",
        help_text="only approvers in one of these groups may decide the direct check (verify_directly); "
        "none: every approver")
    swap_groups = models.ManyToManyField(
        "auth.Group", blank=True, related_name="+",
        help_text="only approvers in one of these groups may decide the swap (swap_elb); none: every approver")
    approvals_required = models.PositiveSmallIntegerField(
        default=1, help_text="distinct people who must approve each gate (one rejection rejects it)")
    gate_reminder = models.PositiveIntegerField(
        default=600, help_text="seconds before an open gate's deadline to notify that it expires soon; 0: never")
    updated_at = models.DateTimeField(auto_now=True)

    def clean(self):
        # every error at once, never one per save
        errors = {}
        if bool(self.load_balancer_name) == bool(self.target_group_arn):
            errors[NON_FIELD_ERRORS] = "set either a classic load balancer name or an ELBv2 target group ARN, not both"
        if self.desired_count is not None and self.desired_count < 1:
            errors["desired_count"] = "at least one instance"
        # an empty box on the form means none
        self.extra_tags = {} if self.extra_tags is None else self.extra_tags
        self.extra_subnet_ids = [] if self.extra_subnet_ids is None else self.extra_subnet_ids
        errors |= launch_setting_errors(self)
        if not 1 <= (self.approvals_required or 0) <= APPROVALS_MAX:
            errors["approvals_required"] = f"from 1 to {APPROVALS_MAX} distinct people"
        if errors:
            raise ValidationError(errors)

    def __str__(self):
        return self.name


class Release(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"  # created; no step has run yet
        RUNNING = "running"  # a worker is running (or about to run) a step
        AWAITING_APPROVAL = "awaiting_approval"  # a gate is open
        SUCCEEDED = "succeeded"  # every step done; the new fleet serves
        FAILED = "failed"  # a step failed; retry or roll back
        CANCELLED = "cancelled"  # stopped by a person, cleaned up
        ROLLING_BACK = "rolling_back"  # putting the old fleet back
        ROLLED_BACK = "rolled_back"  # the old fleet serves again

    ACTIVE = (Status.QUEUED, Status.RUNNING, Status.AWAITING_APPROVAL, Status.FAILED, Status.ROLLING_BACK)

    class Strategy(models.TextChoices):
        BAKE = "bake"
        DEPLOY_FROM_IMAGE = "deploy_from_image"

    environment = models.ForeignKey(Environment, on_delete=models.PROTECT, related_name="releases")
    # What names its AWS resources (releases/identity.py): random, so a release
    # made after a database was restored or started afresh never takes the
    # instances or image of another release that had the same id.
    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    revision = models.CharField(max_length=200)
    strategy = models.CharField(max_length=32, choices=Strategy.choices, default=Strategy.BAKE)
    fleet_size = models.PositiveIntegerField()
    plan = models.JSONField(help_text="the environment, recipe and steps, frozen at creation")
    state = models.JSONField(default=dict, help_text="what the steps made: instance ids, image id, rules")
    status = models.CharField(max_length=32, choices=Status.choices, default=Status.QUEUED)
    cancel_requested = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    log_seq = models.BigIntegerField(default=0, help_text="the last log line's sequence number")

    class Meta:
        constraints = [
            # a failed release still holds its environment: it must be retried,
            # rolled back or cancelled before another may start
            models.UniqueConstraint(
                fields=["environment"],
                condition=Q(status__in=["queued", "running", "awaiting_approval", "failed", "rolling_back"]),
                name="one_active_release_per_environment",
            )
        ]
        ordering = ["-created_at"]
        indexes = [
            # with 10,000 releases (0013_speed): the dashboard's recent releases and an environment's
            # last one, what it serves (its last succeeded), and the release before a rolled-back one
            models.Index(fields=["-created_at", "-id"], name="release_newest"),
            models.Index(fields=["environment", "-created_at", "-id"], name="release_environment_newest"),
            models.Index(fields=["environment", "status", "-finished_at", "-id"], name="release_environment_finished"),
        ]

    def __str__(self):
        return f"#{self.pk} {self.environment.name} {self.revision}"


class Step(models.Model):
    class Kind(models.TextChoices):
        ACTION = "action"
        GATE = "gate"
        ROLLBACK = "rollback"  # undoes what the actions did; added when the release rolls back

    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        AWAITING_APPROVAL = "awaiting_approval"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        SKIPPED = "skipped"

    release = models.ForeignKey(Release, on_delete=models.CASCADE, related_name="steps")
    position = models.PositiveIntegerField()
    key = models.CharField(max_length=64)
    kind = models.CharField(max_length=8, choices=Kind.choices)
    status = models.CharField(max_length=32, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    lease_owner = models.CharField(max_length=200, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    deadline = models.DateTimeField(
        null=True, blank=True, help_text="an open gate rejects itself after this; a waiting step fails after this")
    error = models.TextField(blank=True)
    result = models.JSONField(default=dict, blank=True)
    # A durable timer: the step waits on AWS holding no worker (lease_owner is
    # empty) and is nudged again at wake_at; `wait` keeps what the wait is and
    # since when, so a deadline survives every nudge.
    waiting_for = models.CharField(max_length=300, blank=True, help_text="what the step waits for, for people")
    wake_at = models.DateTimeField(null=True, blank=True, db_index=True)
    wait = models.JSONField(default=dict, blank=True, help_text="key, since and polls of the current wait")
    # A gate's taker ("Assign to me"): shown to the others and notified, not a lock
    assignee = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                 related_name="+")
    reminded_at = models.DateTimeField(null=True, blank=True, help_text="when 'expires soon' went out for this gate")

    class Meta:
        ordering = ["position"]
        constraints = [models.UniqueConstraint(fields=["release", "key"], name="one_step_per_key")]
        # the open gates (the dashboard's "waiting on you"): a few rows among 150,000 steps
        indexes = [models.Index(fields=["started_at"], condition=Q(status="awaiting_approval"), name="step_open_gates")]

    def __str__(self):
        return f"{self.release_id}:{self.key}"


class Instance(models.Model):
    """An EC2 instance a release created or replaced."""

    class Role(models.TextChoices):
        CANARY = "canary"
        CLONE = "clone"
        OLD = "old"

    release = models.ForeignKey(Release, on_delete=models.CASCADE, related_name="instances")
    instance_id = models.CharField(max_length=32)
    name = models.CharField(max_length=200, blank=True)
    role = models.CharField(max_length=8, choices=Role.choices)
    slot = models.CharField(max_length=32, blank=True, help_text="canary, clone-N; empty for an old instance")
    address = models.CharField(max_length=200, blank=True)
    host_key = models.TextField(blank=True)
    state = models.CharField(max_length=32, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["release", "instance_id"], name="one_row_per_instance")]


class StatusChange(models.Model):
    """One move of a release or a step between statuses: never overwritten,
    so a retried step keeps its failed attempt."""

    release = models.ForeignKey(Release, on_delete=models.CASCADE, related_name="history")
    step = models.ForeignKey(Step, null=True, blank=True, on_delete=models.CASCADE, related_name="history")
    action = models.CharField(max_length=32)
    from_status = models.CharField(max_length=32)
    to_status = models.CharField(max_length=32)
    reason = models.TextField(blank=True)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    actor_name = models.CharField(max_length=150, help_text="kept when the user is deleted; 'greenlight' for the engine")
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["at", "id"]


class Approval(models.Model):
    class Decision(models.TextChoices):
        APPROVE = "approve"
        REJECT = "reject"

    step = models.ForeignKey(Step, on_delete=models.CASCADE, related_name="approvals")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.PROTECT, related_name="+")
    decision = models.CharField(max_length=8, choices=Decision.choices)
    comment = models.TextField(blank=True)
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            # one decision per person per gate (a gate opens once: a rejected or expired one rolls back)
            models.UniqueConstraint(fields=["step", "user"], name="one_decision_per_person"),
        ]


class LogLine(models.Model):
    release = models.ForeignKey(Release, on_delete=models.CASCADE, related_name="log_lines")
    seq = models.BigIntegerField()
    step = models.CharField(max_length=64)
    host = models.CharField(max_length=200, blank=True)
    stream = models.CharField(max_length=8)  # stdout, stderr, info
    text = models.TextField()
    at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["release", "seq"], name="one_line_per_seq")]
        ordering = ["seq"]


# The engine's AWS calls during a release (releases/audit.py ENGINE is its actor
# name), each caused by the action before it in that release: the audit's
# "people" view lists every other event and folds the calls under their cause.
AUDIT_ENGINE_CALL = models.Q(actor_name="greenlight", action__startswith="aws:", release__isnull=False)


class AuditEvent(models.Model):
    """One thing someone (or the engine) did. Append-only and chained: `hash` is an
    HMAC over the event's content, its position `seq` and the previous event's hash
    (releases/chain.py). The links to the actor, environment and release are plain
    ids with no database constraint and no cascade: the row says what they were
    when it was written, and deleting a user, environment or release never
    rewrites history (on PostgreSQL a trigger refuses UPDATE and DELETE)."""

    at = models.DateTimeField(db_index=True)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.DO_NOTHING,
                              db_constraint=False, related_name="+")
    actor_name = models.CharField(max_length=150, help_text="kept when the user is deleted; 'greenlight' for the engine")
    source_ip = models.GenericIPAddressField(null=True, blank=True)
    action = models.CharField(max_length=64, db_index=True)
    target = models.CharField(max_length=300, blank=True)
    environment = models.ForeignKey(Environment, null=True, blank=True, on_delete=models.DO_NOTHING, db_constraint=False,
                                    related_name="+")
    release = models.ForeignKey(Release, null=True, blank=True, on_delete=models.DO_NOTHING, db_constraint=False,
                                related_name="audit_events")
    details = models.JSONField(default=dict, blank=True)
    seq = models.PositiveBigIntegerField(unique=True, help_text="position in the chain, from 1, no gaps")
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [
            # the audit page: newest first, pages of 50, whatever the filters
            models.Index(fields=["-at", "-id"], name="audit_newest"),
            models.Index(fields=["-at", "-id"], condition=~AUDIT_ENGINE_CALL, name="audit_people_newest"),
            # its dropdown of who (a loose index scan, selectors._distinct), and a release's events in order
            models.Index(fields=["actor_name"], name="audit_actor"),
            models.Index(fields=["release", "seq"], name="audit_release_seq"),
        ]


class AuditChainHead(models.Model):
    """The chain's last link (one row, id 1). Appending locks it, so two processes
    recording at once take turns instead of forking the chain; verifying compares
    the chain's end with it, so deleting the newest events shows."""

    seq = models.PositiveBigIntegerField(default=0)
    hash = models.CharField(max_length=64, default="0" * 64)


class Installation(models.Model):
    """This Greenlight installation (one row, id 1): its id, tagged on
    everything it makes in AWS, for people and IAM conditions to tell
    installations apart. A restored database keeps it; a new one gets its own."""

    ONE = 1
    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    @classmethod
    def current_id(cls) -> str:
        # made by migration 0008, and again here if a test database's flush emptied the table
        if (row := cls.objects.filter(pk=cls.ONE).first()) is None:
            cls.objects.bulk_create([cls(pk=cls.ONE)], ignore_conflicts=True)
            row = cls.objects.get(pk=cls.ONE)
        return str(row.uuid)

    def __str__(self):
        return f"installation {self.uuid}"


class ApiToken(models.Model):
    """A person's API key, kept as its SHA-256 digest: the key itself is shown
    once, to its owner, and stored nowhere (releases/tokens.py). `prefix` is its
    first characters, to tell two apart in the admin and on the profile page."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_token")
    prefix = models.CharField(max_length=8)
    digest = models.CharField(max_length=64, unique=True, help_text="SHA-256 of the key, hex")
    created = models.DateTimeField(default=timezone.now)
    last_used = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API token"

    def __str__(self):
        return f"{self.prefix}… ({self.user})"


class NotificationChannel(models.Model):
    """Where an environment's events go: an email list, a Slack incoming
    webhook or a generic webhook. `url` and `secret` are credentials: write-only
    on forms and the API, never in a log line, a page or the audit."""

    class Kind(models.TextChoices):
        EMAIL = "email"
        SLACK = "slack"
        WEBHOOK = "webhook"

    environment = models.ForeignKey(Environment, on_delete=models.CASCADE, related_name="channels")
    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=8, choices=Kind.choices)
    recipients = models.CharField(max_length=1000, blank=True, help_text="email: addresses, separated by commas")
    url = models.CharField(max_length=1000, blank=True, help_text="Slack or webhook: where to POST (write-only)")
    secret = models.CharField(max_length=200, blank=True, help_text="webhook: the HMAC-SHA256 key (write-only)")
    events = models.JSONField(default=list, blank=True, help_text="event names to send; empty: all of them")
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["environment", "name"]
        constraints = [models.UniqueConstraint(fields=["environment", "name"], name="one_channel_per_name")]

    def __str__(self):
        return f"{self.environment_id}:{self.name}"


class Notification(models.Model):
    """One event to tell people about, written in the same transaction as the
    change it reports (an outbox): `key` makes the event itself once-only."""

    key = models.CharField(max_length=200, unique=True, help_text="what makes the event once-only, e.g. gate.opened:<step>:<n>")
    event = models.CharField(max_length=40, db_index=True)
    environment = models.ForeignKey(Environment, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    release = models.ForeignKey(Release, null=True, blank=True, on_delete=models.CASCADE, related_name="notifications")
    payload = models.JSONField(default=dict)
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-at", "-id"]


class Delivery(models.Model):
    """One notification to one channel: at least once, and once as a rule.
    `sending` holds a lease: a worker that dies mid-send leaves it to expire,
    and the sweep sends again."""

    class Status(models.TextChoices):
        PENDING = "pending"
        SENDING = "sending"
        SENT = "sent"
        FAILED = "failed"  # gave up after the last attempt

    UNFINISHED = (Status.PENDING, Status.SENDING)  # still on its way

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False, help_text="X-Greenlight-Delivery")
    notification = models.ForeignKey(Notification, on_delete=models.CASCADE, related_name="deliveries")
    channel = models.ForeignKey(NotificationChannel, null=True, on_delete=models.SET_NULL, related_name="deliveries")
    channel_name = models.CharField(max_length=100, help_text="kept when the channel is deleted")
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True, db_index=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [models.UniqueConstraint(fields=["notification", "channel"], name="one_delivery_per_channel")]
