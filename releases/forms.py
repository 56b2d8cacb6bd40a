import ipaddress
import json
import re

from django import forms
from django.contrib.auth.models import Group
from django.utils import timezone

from django.conf import settings

from deployer import aws, git
from deployer.errors import AdapterError

from . import permissions, plan
from .params import MAX_WHOLE
from .models import APPROVALS_MAX, Environment, NotificationChannel, Recipe
from .services import COMMENT_LIMIT


class EnvironmentChoiceForm(forms.Form):
    environment = forms.ModelChoiceField(queryset=Environment.objects.order_by("name"), to_field_name="name",
                                         empty_label=None, help_text="the service to release")

    def __init__(self, *args, user=None, **kwargs):
        super().__init__(*args, **kwargs)
        if user is not None:  # only where this person may start a release (an environment's deploy groups)
            self.fields["environment"].queryset = permissions.deployable(user, Environment.objects.order_by("name"))


class RevisionForm(forms.Form):
    revision = forms.CharField(max_length=200, help_text="a branch, tag or commit of the repository")


class _StrategyWidget(forms.RadioSelect):
    """Radio buttons where a strategy that cannot run is disabled (its reason is in its label)."""
    disabled_choices: set = set()

    def create_option(self, name, value, label, selected, index, subindex=None, attrs=None):
        option = super().create_option(name, value, label, selected, index, subindex, attrs)
        if value in self.disabled_choices:
            option["attrs"]["disabled"] = True
        return option


class OptionsForm(forms.Form):
    strategy = forms.ChoiceField(choices=[(s, s) for s in plan.STRATEGIES], widget=_StrategyWidget,
                                 help_text="bake: provision a fresh instance; deploy_from_image: start from the last baked image")
    clone_count = forms.IntegerField(min_value=1, max_value=50, label="Fleet size",
                                     help_text="instances in the new fleet, the canary included")

    def __init__(self, *args, environment=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cannot_run = {}  # strategy -> why it cannot run for this environment
        if environment is not None and not environment.last_baked_ami:
            self.cannot_run["deploy_from_image"] = f"{environment.name} has no baked image yet; a bake release makes one"
        field = self.fields["strategy"]
        field.widget = _StrategyWidget()
        field.widget.disabled_choices = set(self.cannot_run)
        field.choices = [(s, f"{s} (cannot run: {self.cannot_run[s]})" if s in self.cannot_run else s)
                         for s in plan.STRATEGIES]
        if environment is not None:
            default = environment.default_strategy
            field.help_text += f". This environment's default: {default}"
            if default in self.cannot_run:
                field.help_text += f", which cannot run now ({self.cannot_run[default]}): choose another"

    def clean_strategy(self):
        strategy = self.cleaned_data["strategy"]
        if strategy in self.cannot_run:
            raise forms.ValidationError(f"{strategy} cannot run: {self.cannot_run[strategy]}")
        return strategy


class DecisionForm(forms.Form):
    comment = forms.CharField(
        required=False, max_length=COMMENT_LIMIT, widget=forms.TextInput(attrs={"placeholder": "comment (optional)"}),
        error_messages={"max_length": "A comment holds at most %(limit_value)d characters and this one has %(show_value)d: "
                                      "shorten it and decide again. Nothing was decided."})


class RecipeForm(forms.ModelForm):
    definition = forms.CharField(widget=forms.Textarea(attrs={"rows": 18, "class": "code"}),
                                 help_text="JSON: params, roles, tasks and phases")

    class Meta:
        model = Recipe
        fields = ["name", "definition"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk and not self.is_bound:
            self.initial["definition"] = json.dumps(self.instance.definition, indent=2)

    def clean_definition(self):
        try:
            return json.loads(self.cleaned_data["definition"])
        except json.JSONDecodeError as exc:
            raise forms.ValidationError(f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None


ACCESS_GROUPS = ("deploy_groups", "verify_groups", "swap_groups")
# What AWS ids look like: a prefix and 8 (older resources) or 17 hex digits
AWS_ID = {prefix: re.compile(rf"{prefix}-[0-9a-f]{{8,17}}") for prefix in ("ami", "subnet", "sg")}
AWS_ID_EXAMPLE = {"ami": "ami-0abcdef1234567890", "subnet": "subnet-0abcdef1234567890", "sg": "sg-0abcdef1234567890"}
CREDENTIALS_REFERENCE = re.compile(r"(?:profile:[\w.@+-]{1,64}|env:[A-Za-z_][A-Za-z0-9_]{0,63}|sandbox)?")
PORT_RANGE = (1, 65535)
REPOSITORY_TIMEOUT = 10  # seconds for `git ls-remote` when a repository is saved


def aws_id_error(prefix: str, value: str) -> str | None:
    if AWS_ID[prefix].fullmatch(value):
        return None
    return f"{value[:80]!r} is not shaped like {prefix}- and 8 or 17 hex digits, such as {AWS_ID_EXAMPLE[prefix]}"


class IdListField(forms.Field):
    """A list of AWS ids typed one per line or separated by commas (a JSON
    list, as scripts posted before, is read too); the model keeps a list."""

    widget = forms.Textarea(attrs={"rows": 2, "class": "code"})

    def __init__(self, *, prefix: str, **kwargs):
        self.prefix = prefix
        kwargs.setdefault("required", False)
        super().__init__(**kwargs)

    def prepare_value(self, value):
        if isinstance(value, list):
            return "\n".join(str(v) for v in value)
        return value

    def to_python(self, value) -> list[str]:
        if value in (None, ""):
            return []
        if isinstance(value, list):
            return [str(v) for v in value]
        text = str(value).strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, list):
                return [str(v).strip() for v in parsed if str(v).strip()]
            text = text.strip("[]")
        return [item.strip().strip("\"'") for item in re.split(r"[,\s]+", text) if item.strip().strip("\"'")]

    def validate(self, value: list[str]) -> None:
        super().validate(value)
        bad = [aws_id_error(self.prefix, v) for v in value if aws_id_error(self.prefix, v)]
        if bad:
            raise forms.ValidationError(bad[0] + (f" ({len(bad) - 1} more like it)" if len(bad) > 1 else ""))
        if len(set(value)) != len(value):
            raise forms.ValidationError("each id once")

    def has_changed(self, initial, data) -> bool:
        try:
            return self.to_python(initial) != self.to_python(data)
        except forms.ValidationError:
            return True


class CredentialsInput(forms.TextInput):
    """Never renders a value shaped like an access key, whether a person
    just typed it or it was stored before the form refused such values."""

    def format_value(self, value):
        if value and aws.looks_like_access_key(str(value)):
            return None
        return super().format_value(value)


class RepositoryInput(forms.TextInput):
    """Shows the stored repository with its password or token as *** (git.shown):
    sent back unchanged, EnvironmentForm keeps the stored URL. A URL with a
    credential that is not the stored one (a new one the form sent back with
    an error elsewhere) is never shown, as a password input would not: it is
    typed again."""

    def __init__(self, *args, stored: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.stored = stored

    def format_value(self, value):
        if value and value != self.stored and git.secrets(str(value)):
            return None
        return super().format_value(git.shown(value) if value else value)


def _credentials_shown(reference: str) -> str:
    if aws.looks_like_access_key(reference):
        return "an access key, not shown: replace it with a reference"
    return reference or "default credentials"


def _first_lower(label: str) -> str:
    return label if label[1:2].isupper() else label[:1].lower() + label[1:]


class EnvironmentForm(forms.ModelForm):
    """For a maintainer, every field; for a deployer, the harmless ones
    (permissions.ENVIRONMENT_DEPLOYER_FIELDS), the rest shown disabled. A
    request that sends a locked field with another value (a checkbox left
    unticked included) is refused with an error on that field, never
    saved and never silently dropped.

    Every field is checked in the one pass: the form's own rules below, the
    model's (Environment.clean), all reported together."""

    skip_repository_check = forms.BooleanField(
        required=False, label="Save without reaching the repository",
        help_text="only if the web server cannot reach it but the workers can: the first deploy will say whether it answers")
    security_group_ids = IdListField(prefix="sg", label="Security groups",
                                     help_text="for new instances: sg- ids, one per line or separated by commas")
    extra_subnet_ids = IdListField(prefix="subnet", label="More subnets",
                                   help_text="in other availability zones, one per line or separated by commas: the canary "
                                             "goes in the subnet above, clones are spread over all of them")

    # (legend, fields): the page shows the form in these groups, in this order
    FIELDSETS = (
        ("AWS", ("name", "region", "aws_endpoint_url", "aws_credentials")),
        ("Load balancer", ("load_balancer_name", "target_group_arn", "public_url")),
        ("Instances", ("base_ami", "instance_type", "key_name", "subnet_id", "extra_subnet_ids", "security_group_ids",
                       "name_prefix", "desired_count", "address", "public_ip", "instance_profile", "root_volume_size",
                       "root_volume_type", "root_volume_encrypted", "require_imdsv2", "extra_tags", "user_data")),
        ("SSH", ("ssh_user", "ssh_port", "ssh_key_file", "bastion_host", "bastion_port", "bastion_user", "bastion_key_file",
                 "bastion_host_key")),
        ("App and checks", ("repository", "skip_repository_check", "recipe", "app_port", "health_path", "expected_text", "verify_security_group_id",
                            "verify_cidr", "verify_url_template")),
        ("Gates and access", ("four_eyes", "approvals_required", "deploy_groups", "verify_groups", "swap_groups",
                              "gate_timeout", "gate_reminder")),
        ("Timeouts and clean-up", ("instance_timeout", "ssh_timeout", "image_timeout", "smoke_timeout", "command_timeout",
                                   "retention", "images_kept")),
    )

    class Meta:
        model = Environment
        # time_scale says how fast the cloud's clock runs; only an administrator sets it (in the admin)
        exclude = ["last_baked_ami", "time_scale"]
        widgets = {"extra_tags": forms.TextInput(attrs={"class": "code"}),
                   "region": forms.TextInput(attrs={"list": "aws-regions", "autocomplete": "off"}),
                   "aws_credentials": CredentialsInput(attrs={"autocomplete": "off"}),
                   "repository": RepositoryInput(attrs={"autocomplete": "off"}),
                   **{name: forms.CheckboxSelectMultiple(attrs={"class": "choices"}) for name in ACCESS_GROUPS},
                   "approvals_required": forms.NumberInput(attrs={"min": 1, "max": APPROVALS_MAX})}
        labels = {
            "name": "Name", "region": "AWS region", "aws_endpoint_url": "AWS endpoint URL",
            "aws_credentials": "Credentials reference", "load_balancer_name": "Classic load balancer name",
            "target_group_arn": "Target group ARN", "public_url": "Public URL",
            "verify_security_group_id": "Direct-check security group", "verify_cidr": "Direct-check allowed CIDR",
            "app_port": "App port", "health_path": "Health check path", "expected_text": "Expected text on /",
            "ssh_user": "SSH user", "ssh_port": "SSH port", "ssh_key_file": "SSH private key file",
            "address": "Reach instances at", "instance_type": "Instance type", "subnet_id": "Subnet",
            "key_name": "Key pair name", "base_ami": "Base image (AMI)", "name_prefix": "Name tag prefix",
            "desired_count": "Fleet size", "repository": "Git repository", "recipe": "Recipe", "four_eyes": "Four eyes",
            "gate_timeout": "Gate timeout (seconds)", "retention": "Keep old instances stopped for (seconds)",
            "instance_timeout": "Instance start and stop timeout (seconds)", "ssh_timeout": "SSH timeout (seconds)",
            "image_timeout": "Image timeout (seconds)", "smoke_timeout": "Smoke check timeout (seconds)",
            "command_timeout": "Command timeout (seconds)", "instance_profile": "IAM instance profile",
            "user_data": "User data", "root_volume_size": "Root volume size (GiB)", "root_volume_type": "Root volume type",
            "root_volume_encrypted": "Encrypt the root volume", "require_imdsv2": "Require IMDSv2",
            "public_ip": "Public IP address", "extra_tags": "Extra tags", "bastion_host": "Bastion host",
            "bastion_port": "Bastion SSH port", "bastion_user": "Bastion user", "bastion_key_file": "Bastion private key file",
            "bastion_host_key": "Bastion host key", "verify_url_template": "Direct-check URL",
            "images_kept": "Baked images kept", "deploy_groups": "Who may deploy",
            "verify_groups": "Who may decide the direct check", "swap_groups": "Who may decide the swap",
            "approvals_required": "Approvals per gate", "gate_reminder": "Gate reminder (seconds before the deadline)",
        }
        help_texts = {
            "name": "letters, digits, hyphens and underscores: it appears in URLs and tags",
            "region": "such as eu-west-1: an EC2 region botocore knows",
            "aws_credentials": 'a reference, never the keys: empty (the workers\' default chain), "profile:NAME", '
                               '"env:PREFIX" (PREFIX_ACCESS_KEY_ID / PREFIX_SECRET_ACCESS_KEY on the workers), or "sandbox"',
            "load_balancer_name": "a classic ELB; or leave it empty and give a target group",
            "target_group_arn": "an ELBv2 target group (application or network load balancer); or leave it empty and "
                                "name a classic load balancer",
            "verify_security_group_id": "sg- id: while a person checks the canary, Greenlight opens the app port here "
                                        "to the CIDR below",
            "verify_cidr": "who may reach the canary directly, such as 203.0.113.7/32",
            "app_port": "the port the app listens on, from 1 to 65535",
            "health_path": "starts with /; answers 200 when the app is healthy",
            "ssh_port": "from 1 to 65535",
            "subnet_id": "subnet- id: the canary's, and the first of the clones'",
            "key_name": "the EC2 key pair new instances get",
            "base_ami": "ami- id: what a bake starts from",
            "name_prefix": "new instances are tagged Name=<prefix><n>",
            "desired_count": "instances in the fleet, the canary included",
            "extra_tags": 'more tags for new instances, as JSON: {"team": "web"}',
        }

    # Settings added after the form's first scripts were written: left out of a
    # post, each takes its default rather than being required.
    OPTIONAL_WITH_DEFAULT = (*plan.LAUNCH_FIELDS, *plan.ACCESS_FIELDS, "images_kept", "approvals_required", "gate_reminder", "default_strategy")

    def __init__(self, *args, user=None, **kwargs):
        super().__init__(*args, **kwargs)
        stored = self.instance.repository if self.instance.pk else ""
        self.fields["repository"].widget.stored = stored
        self.fields["repository"].help_text += (". A password or token in it is never shown (***): leave *** as it is to "
                                                "keep the stored one")
        # the stored URL as the form shows it, sent back, is the stored URL, never "***"
        # (a write-only part, as a channel's URL and secret are)
        sent = self.add_prefix("repository")
        if stored and self.is_bound and self.data.get(sent) == git.shown(stored) != stored:
            self.data = self.data.copy()
            self.data[sent] = stored
        for name in self.OPTIONAL_WITH_DEFAULT:
            self.fields[name].required = False
        for name in ACCESS_GROUPS:
            self.fields[name].queryset = Group.objects.order_by("name")
        maintainer = user is not None and permissions.can_maintain(user)
        self.locked = [] if maintainer else [n for n in self.fields if n not in permissions.ENVIRONMENT_DEPLOYER_FIELDS]
        for name in self.locked:
            self.fields[name].disabled = True

    def fieldsets(self):
        """(legend, bound fields) in FIELDSETS' order; a field no group names comes last, under "More"."""
        named = {name for _, names in self.FIELDSETS for name in names}
        groups = [(legend, [self[name] for name in names if name in self.fields]) for legend, names in self.FIELDSETS]
        rest = [self[name] for name in self.fields if name not in named]
        return [(legend, fields) for legend, fields in groups + [("More", rest)] if fields]

    def regions(self) -> list[str]:
        return sorted(aws.ec2_regions())

    # -- the form's own rules: each field on its own, so every error shows at once.
    # A locked field keeps what is stored: a deployer cannot fix it, so it is not judged here.

    def _checked(self, name: str):
        return self.cleaned_data[name], name not in self.locked

    def clean_region(self):
        region, check = self._checked("region")
        if check and region not in aws.ec2_regions():
            raise forms.ValidationError(f"{region[:40]!r} is not an EC2 region: use one such as us-east-1 or eu-west-1.")
        return region

    def clean_aws_credentials(self):
        credentials, check = self._checked("aws_credentials")
        credentials = credentials.strip()
        if not check:
            return credentials
        if aws.looks_like_access_key(credentials):
            # never echoed, here or anywhere: it is a key
            raise forms.ValidationError("That is an access key, not a reference to one, and it was not saved: store the keys "
                                        'on the workers and name them here ("profile:NAME" or "env:PREFIX"). Consider the '
                                        "key exposed and rotate it.", code="access_key")
        if not CREDENTIALS_REFERENCE.fullmatch(credentials):
            raise forms.ValidationError('Not a credentials reference (it is not shown: it may be a secret): leave it empty, '
                                        'or use "profile:NAME", "env:PREFIX" or "sandbox".')
        return credentials

    def clean_verify_cidr(self):
        cidr, check = self._checked("verify_cidr")
        if check:
            try:
                # IPv4 only: the rule goes in IpRanges (CidrIp), which takes no IPv6
                ipaddress.IPv4Network(cidr.strip(), strict=True)
            except ValueError as exc:
                raise forms.ValidationError(f"{cidr[:60]!r} is not an IPv4 CIDR block ({exc}): such as 203.0.113.7/32.") from None
        return cidr.strip()

    def _port(self, name: str):
        port, check = self._checked(name)
        if check and port is not None and not PORT_RANGE[0] <= port <= PORT_RANGE[1]:
            raise forms.ValidationError(f"A port is from {PORT_RANGE[0]} to {PORT_RANGE[1]}.")
        return port

    def clean_app_port(self):
        return self._port("app_port")

    def clean_ssh_port(self):
        return self._port("ssh_port")

    def clean_health_path(self):
        path, check = self._checked("health_path")
        if check and not path.startswith("/"):
            raise forms.ValidationError(f"A path on the instance, starting with /: /{path.lstrip('/')[:60]}?")
        return path

    def clean_repository(self):
        """A new or changed repository must answer `git ls-remote` from here, unless the maintainer says only
        the workers can reach it (skip_repository_check): then the deploy step is the first to ask it.
        *** (git.shown's mask) is refused: the stored URL sent back as shown was made the stored one already."""
        repository, check = self._checked("repository")
        repository = repository.strip()
        if check and f"{git.MASK}@" in repository:
            # *** stands for the stored password or token only where the whole URL is the stored one (see __init__)
            raise forms.ValidationError(f"{git.MASK} stands for the stored password or token only when the rest of the URL "
                                        "is unchanged: type the URL with its password or token.")
        if not check or "repository" not in self.changed_data or self.data.get(self.add_prefix("skip_repository_check")):
            return repository
        try:
            git.check_repository(repository, allow_file=settings.ALLOW_FILE_REPOSITORIES)
        except AdapterError:
            return repository  # the model's rule says what is accepted, once
        try:
            git.revisions(repository, timeout=REPOSITORY_TIMEOUT, allow_file=settings.ALLOW_FILE_REPOSITORIES)
        except AdapterError as exc:
            raise forms.ValidationError(
                f"Greenlight cannot reach this repository ({exc}). Fix its address or its access; or, if only the "
                "workers can reach it, tick \"Save without reaching the repository\".", code="unreachable") from None
        return repository

    def _aws_id(self, name: str, prefix: str):
        value, check = self._checked(name)
        value = value.strip()
        if check and value and (error := aws_id_error(prefix, value)):
            raise forms.ValidationError(error)
        return value

    def clean_base_ami(self):
        return self._aws_id("base_ami", "ami")

    def clean_subnet_id(self):
        return self._aws_id("subnet_id", "subnet")

    def clean_verify_security_group_id(self):
        return self._aws_id("verify_security_group_id", "sg")

    def clean(self):
        data = super().clean()
        for name in self.OPTIONAL_WITH_DEFAULT:
            # (not a checkbox: a browser leaves an unticked one out, so left out is False)
            if data.get(name) in (None, "") and self.add_prefix(name) not in self.data \
                    and not isinstance(self.fields[name], forms.BooleanField):
                data[name] = Environment._meta.get_field(name).get_default()
        if not self.locked:
            return data
        if self.instance.pk is None:
            raise forms.ValidationError("Adding an environment needs the maintainer role.")
        # a browser never sends a disabled field: whoever sends one sends the whole form
        if any(self.add_prefix(name) in self.data for name in self.locked):
            for name in self.locked:
                field = self.fields[name]
                sent = field.widget.value_from_datadict(self.data, self.files, self.add_prefix(name))
                field.disabled = False  # a disabled field never reports a change
                try:
                    changed = field.has_changed(self.get_initial_for_field(field, name), sent)
                finally:
                    field.disabled = True
                if changed:
                    self.add_error(name, f"Only a maintainer may change {_first_lower(field.label)}.")
        return data


class AuditFilterForm(forms.Form):
    """The audit page's filters, all in the URL (a GET form). The dropdowns offer
    what the audit holds (selectors.audit_choices); an action family such as
    "release." picks every action of it."""

    VIEWS = [("people", "People's actions"), ("everything", "Everything")]

    view = forms.ChoiceField(choices=VIEWS, required=False, widget=forms.HiddenInput)
    search = forms.CharField(required=False, max_length=200, label="Search",
                             help_text="part of who, what, target or details, any case")
    environment = forms.ChoiceField(required=False)
    actor = forms.ChoiceField(required=False, label="Who")
    action = forms.ChoiceField(required=False)
    release = forms.IntegerField(required=False, min_value=1, max_value=MAX_WHOLE)
    since = forms.DateTimeField(required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local", "step": "1"}))
    until = forms.DateTimeField(required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local", "step": "1"}))

    def __init__(self, *args, choices: dict[str, list[str]], **kwargs):
        super().__init__(*args, **kwargs)
        for name in ("since", "until"):  # a naive time is read in the server's zone
            self.fields[name].help_text = timezone.get_current_timezone_name()
        self.fields["environment"].choices = [("", "any")] + [(v, v) for v in choices["environment"]]
        self.fields["actor"].choices = [("", "anyone")] + [(v, v) for v in choices["actor"]]
        families: dict[str, list[str]] = {}
        for action in choices["action"]:
            cut = min((action.index(c) for c in ".:" if c in action), default=len(action) - 1) + 1
            families.setdefault(action[:cut], []).append(action)
        options = [("", "any")]
        for family, actions in families.items():
            if len(actions) > 1:
                options.append((family, [(family, f"{family}* (all)")] + [(a, a) for a in actions]))
            else:
                options.append((actions[0], actions[0]))
        self.fields["action"].choices = options

    def filters(self) -> dict:
        """The filters that are valid (a wrong one is shown with its error and left out)."""
        self.is_valid()
        return {k: v for k, v in self.cleaned_data.items() if v and k != "view"}


AWS_ITSELF = "aws"


class ImportLookupForm(forms.Form):
    """Where to look comes only from what a maintainer already configured:
    AWS itself with the workers' default credentials, or an existing
    environment's endpoint and credentials. Never an endpoint or a
    credentials reference from the request, which would make the server
    send signed requests wherever a person points it."""

    account = forms.ChoiceField(label="AWS account", help_text="AWS itself, or the endpoint and credentials of an environment")
    region = forms.RegexField(regex=r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$", max_length=32, initial="us-west-1",
                              help_text="for AWS itself and environments on AWS; an environment with its own endpoint keeps its region",
                              error_messages={"invalid": "An AWS region, such as us-west-1."})
    load_balancer_name = forms.CharField(required=False, max_length=200, label="Classic load balancer name")
    target_group_arn = forms.CharField(required=False, max_length=400, label="or ELBv2 target group ARN",
                                       help_text="for an application load balancer: arn:aws:elasticloadbalancing:...:targetgroup/...")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["account"].choices = [(AWS_ITSELF, "AWS itself (the workers' default credentials)")] + [
            (f"environment:{e.name}", f"as {e.name} ({e.aws_endpoint_url or 'AWS'}, {_credentials_shown(e.aws_credentials)})")
            for e in Environment.objects.order_by("name")
        ]

    def clean(self):
        data = super().clean()
        if bool(data.get("load_balancer_name")) == bool(data.get("target_group_arn")):
            raise forms.ValidationError("Name a classic load balancer or a target group ARN (one of the two).")
        return data

    def where(self) -> dict:
        """region, aws_endpoint_url and aws_credentials of the chosen account (after is_valid)."""
        data = self.cleaned_data
        if data["account"] == AWS_ITSELF:
            return {"region": data["region"], "aws_endpoint_url": "", "aws_credentials": ""}
        environment = Environment.objects.get(name=data["account"].split(":", 1)[1])
        return {"region": environment.region if environment.aws_endpoint_url else data["region"],
                "aws_endpoint_url": environment.aws_endpoint_url, "aws_credentials": environment.aws_credentials}

class PasswordConfirmForm(forms.Form):
    """Creating or rotating a token asks for the password again: a session left
    open on a shared screen is not enough to mint a credential, and the check
    goes through the same sign-in throttle as the login page."""

    password = forms.CharField(widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}),
                               label="Your password")

    def __init__(self, *args, request, **kwargs):
        super().__init__(*args, **kwargs)
        self.request = request

    def clean_password(self):
        from django.contrib.auth import authenticate

        password = self.cleaned_data["password"]
        user = self.request.user
        if authenticate(self.request, username=user.get_username(), password=password) != user:
            raise forms.ValidationError("That is not your password.", code="wrong_password")
        return password


class ChannelForm(forms.ModelForm):
    """A notification channel. Its URL and secret are credentials: write-only,
    as a password is. The form never shows them back; left empty on an edit,
    the stored ones stay."""

    events = forms.MultipleChoiceField(
        required=False, widget=forms.CheckboxSelectMultiple,
        help_text="what to send; none ticked: every event")
    url = forms.CharField(
        required=False, max_length=1000, label="URL", widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
        help_text="Slack: the incoming webhook's URL; webhook: where to POST. Write-only: it is never shown again, "
                  "and left empty on an edit the stored one stays.")
    secret = forms.CharField(
        required=False, max_length=200, widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
        help_text="webhook: the key of its X-Greenlight-Signature (HMAC-SHA256), at least 16 characters. Write-only: it is "
                  "never shown again, and left empty on an edit the stored one stays.")

    class Meta:
        model = NotificationChannel
        fields = ["name", "kind", "recipients", "url", "secret", "events", "enabled"]
        widgets = {"recipients": forms.TextInput()}

    def __init__(self, *args, environment, **kwargs):
        super().__init__(*args, **kwargs)
        from .notifications import EVENTS

        self.environment = environment
        self.instance.environment = environment
        self.fields["events"].choices = [(name, f"{name}: {what}") for name, what in EVENTS.items()]
        self.fields["recipients"].help_text = "email: addresses, separated by commas"
        if self.instance.pk:
            self.fields["url"].help_text = ("(a URL is set) " if self.instance.url else "") + self.fields["url"].help_text
            self.fields["secret"].help_text = ("(a secret is set) " if self.instance.secret else "") + self.fields["secret"].help_text
        self.stored = {"url": self.instance.url, "secret": self.instance.secret}

    def clean_name(self):
        name = self.cleaned_data["name"].strip()
        taken = NotificationChannel.objects.filter(environment=self.environment, name=name).exclude(pk=self.instance.pk)
        if taken.exists():
            raise forms.ValidationError(f"{self.environment.name} has a channel named {name} already.")
        return name

    def clean_recipients(self):
        from django.core.validators import validate_email

        addresses = [a.strip() for a in self.cleaned_data["recipients"].split(",") if a.strip()]
        for address in addresses:
            try:
                validate_email(address)
            except forms.ValidationError:
                raise forms.ValidationError(f"{address[:100]!r} is not an email address.") from None
        return ", ".join(addresses)

    def clean_url(self):
        from django.core.validators import URLValidator

        url = self.cleaned_data["url"].strip()
        if url:
            try:
                URLValidator(schemes=["http", "https"])(url)
            except forms.ValidationError:
                # never echo it: it is a credential
                raise forms.ValidationError("That is not an http:// or https:// URL (it is not shown here: it may be a secret).") from None
        return url

    def clean_secret(self):
        secret = self.cleaned_data["secret"]
        if secret and len(secret) < 16:
            raise forms.ValidationError("A secret needs at least 16 characters.")
        return secret

    def clean(self):
        data = super().clean()
        kind = data.get("kind")
        # empty keeps what is stored; a kind that does not use one stores none
        url = data.get("url") or self.stored["url"]
        secret = data.get("secret") or self.stored["secret"]
        if kind == NotificationChannel.Kind.EMAIL:
            url = secret = ""
            if "recipients" in data and not data["recipients"]:
                self.add_error("recipients", "An email channel needs at least one address.")
        elif kind in (NotificationChannel.Kind.SLACK, NotificationChannel.Kind.WEBHOOK):
            data["recipients"] = ""
            if not url and "url" not in self.errors:
                self.add_error("url", f"A {kind} channel needs a URL.")
            if kind == NotificationChannel.Kind.SLACK:
                secret = ""
            elif not secret and "secret" not in self.errors:
                self.add_error("secret", "A webhook needs a secret: its receivers verify the signature with it.")
        data["url"], data["secret"] = url, secret
        return data

    def _post_clean(self):
        super()._post_clean()
        # the model's own values, so that an empty write-only field keeps the stored one
        if "url" in self.cleaned_data:
            self.instance.url = self.cleaned_data["url"]
        if "secret" in self.cleaned_data:
            self.instance.secret = self.cleaned_data["secret"]
        if "recipients" in self.cleaned_data:
            self.instance.recipients = self.cleaned_data["recipients"]
