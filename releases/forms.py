import json

from django import forms
from django.contrib.auth.models import Group

from . import permissions, plan
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


class EnvironmentForm(forms.ModelForm):
    """For a maintainer, every field; for a deployer, the harmless ones
    (permissions.ENVIRONMENT_DEPLOYER_FIELDS), the rest shown disabled. A
    request that sends a locked field with another value (a checkbox left
    unticked included) is refused with an error on that field, never
    saved and never silently dropped."""

    class Meta:
        model = Environment
        # time_scale says how fast the cloud's clock runs; only an administrator sets it (in the admin)
        exclude = ["last_baked_ami", "time_scale"]
        widgets = {"security_group_ids": forms.TextInput(), "extra_subnet_ids": forms.TextInput(), "extra_tags": forms.TextInput(),
                   **{name: forms.CheckboxSelectMultiple(attrs={"class": "choices"}) for name in ACCESS_GROUPS},
                   "approvals_required": forms.NumberInput(attrs={"min": 1, "max": APPROVALS_MAX})}

    # Settings added after the form's first scripts were written: left out of a
    # post, each takes its default rather than being required.
    OPTIONAL_WITH_DEFAULT = (*plan.LAUNCH_FIELDS, *plan.ACCESS_FIELDS, "images_kept", "approvals_required", "gate_reminder")

    def __init__(self, *args, user=None, **kwargs):
        super().__init__(*args, **kwargs)
        for name in self.OPTIONAL_WITH_DEFAULT:
            self.fields[name].required = False
        for name in ACCESS_GROUPS:
            self.fields[name].queryset = Group.objects.order_by("name")
        maintainer = user is not None and permissions.can_maintain(user)
        self.locked = [] if maintainer else [n for n in self.fields if n not in permissions.ENVIRONMENT_DEPLOYER_FIELDS]
        for name in self.locked:
            self.fields[name].disabled = True

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
                    self.add_error(name, f"Only a maintainer may change {field.label.lower()}.")
        return data


class AuditFilterForm(forms.Form):
    environment = forms.CharField(required=False)
    actor = forms.CharField(required=False)
    action = forms.CharField(required=False)
    since = forms.DateTimeField(required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))
    until = forms.DateTimeField(required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))
    release = forms.IntegerField(required=False, min_value=1)


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
            (f"environment:{e.name}", f"as {e.name} ({e.aws_endpoint_url or 'AWS'}, {e.aws_credentials or 'default credentials'})")
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
