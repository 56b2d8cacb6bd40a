import json

from django import forms

from . import plan
from .models import Environment, Recipe


class EnvironmentChoiceForm(forms.Form):
    environment = forms.ModelChoiceField(queryset=Environment.objects.order_by("name"), to_field_name="name",
                                         empty_label=None, help_text="the service to release")


class RevisionForm(forms.Form):
    revision = forms.CharField(max_length=200, help_text="a branch, tag or commit of the repository")


class OptionsForm(forms.Form):
    strategy = forms.ChoiceField(choices=[(s, s) for s in plan.STRATEGIES], widget=forms.RadioSelect,
                                 help_text="bake: provision a fresh instance; deploy_from_image: start from the last baked image")
    clone_count = forms.IntegerField(min_value=1, max_value=50, label="Fleet size",
                                     help_text="instances in the new fleet, the canary included")


class DecisionForm(forms.Form):
    comment = forms.CharField(required=False, max_length=2000, widget=forms.TextInput(attrs={"placeholder": "comment (optional)"}))


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


class EnvironmentForm(forms.ModelForm):
    class Meta:
        model = Environment
        # time_scale says how fast the cloud's clock runs; only an administrator sets it (in the admin)
        exclude = ["last_baked_ami", "time_scale"]
        widgets = {"security_group_ids": forms.TextInput()}


class AuditFilterForm(forms.Form):
    environment = forms.CharField(required=False)
    actor = forms.CharField(required=False)
    action = forms.CharField(required=False)
    since = forms.DateTimeField(required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))
    until = forms.DateTimeField(required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))
    release = forms.IntegerField(required=False, min_value=1)


class ImportLookupForm(forms.Form):
    region = forms.CharField(max_length=32, initial="us-west-1")
    aws_endpoint_url = forms.URLField(required=False, label="AWS endpoint URL", help_text="empty for AWS itself")
    aws_credentials = forms.CharField(required=False, max_length=200, label="Credentials reference",
                                      help_text='"", "profile:NAME", "env:PREFIX" or "sandbox"')
    load_balancer_name = forms.CharField(required=False, max_length=200, label="Classic load balancer name")
    target_group_arn = forms.CharField(required=False, max_length=400, label="or ELBv2 target group ARN",
                                       help_text="for an application load balancer: arn:aws:elasticloadbalancing:...:targetgroup/...")

    def clean(self):
        data = super().clean()
        if bool(data.get("load_balancer_name")) == bool(data.get("target_group_arn")):
            raise forms.ValidationError("Name a classic load balancer or a target group ARN (one of the two).")
        return data


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
            raise forms.ValidationError("That is not your password.")
        return password
