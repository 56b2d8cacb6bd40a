"""What a release's AWS resources are called and tagged with.

A step run again finds what it made by these names, so they must belong to
this release alone. A release id does not: a database started afresh, or
restored from a backup, hands out release 1 again, and release 1 of the lost
history may have left a stopped instance or an image behind. So a release is
known in AWS by its random uuid (`Release.uuid`); its id and the
installation's id are tags for people and for IAM conditions.

A release made before uuids has no "identity" in its frozen plan: it keeps
finding its instances and image by its id, as it made them.
"""

from __future__ import annotations

from dataclasses import dataclass

from deployer import aws

# AMI names: 3-128 characters; an environment's name is a slug of up to 100
AMI_NAME_ENVIRONMENT = 60


@dataclass(frozen=True)
class Identity:
    environment: str
    number: int  # the release's id in this database
    uuid: str  # "" for a release made before uuids
    installation: str = ""

    @property
    def legacy(self) -> bool:
        return not self.uuid

    @property
    def key(self) -> str:
        """The value of the release tag, by which its instances and image are found."""
        return str(self.number) if self.legacy else self.uuid

    def tags(self) -> dict[str, str]:
        """Tags on everything the release makes, beside its Name and revision."""
        tags = {aws.TAG_RELEASE: self.key, aws.TAG_ENVIRONMENT: self.environment}
        if not self.legacy:
            tags[aws.TAG_RELEASE_NUMBER] = str(self.number)
            if self.installation:
                tags[aws.TAG_INSTALLATION] = self.installation
        return tags

    def instance(self, slot: str) -> dict[str, str]:
        """The tags that find the instance in `slot` (canary, clone-N)."""
        return {aws.TAG_RELEASE: self.key, aws.TAG_SLOT: slot}

    def client_token(self, slot: str) -> str:
        """RunInstances' idempotency token (at most 64 characters). AWS keeps
        one for a day or more after its instance ends, so it too must not be
        a release id that another database may hand out again."""
        return f"greenlight-{self.number}-{slot}" if self.legacy else f"greenlight-{self.uuid.replace('-', '')}-{slot}"

    @property
    def image_name(self) -> str:
        if self.legacy:
            return f"greenlight-{self.environment}-release-{self.number}"
        return f"greenlight-{self.environment[:AMI_NAME_ENVIRONMENT]}-r{self.number}-{self.uuid.replace('-', '')}"


def of(release) -> Identity:
    """The identity a release was created with (frozen into its plan)."""
    environment = release.plan["environment"]["name"]
    frozen = release.plan.get("identity")
    if frozen is None:
        return Identity(environment, release.pk, "")
    return Identity(environment, release.pk, str(release.uuid), frozen.get("installation", ""))

