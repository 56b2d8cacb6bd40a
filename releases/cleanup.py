"""What releases leave behind in AWS, deleted on a schedule.

Two kinds of leftovers, each announced on the environment page before it goes:

- Baked images (and their snapshots) beyond the last `images_kept` of an
  environment, deleted by `clean_up` (a periodic task of its own, not the
  sweep: it lists every environment's images in AWS, which the sweep, run
  every few seconds to hand steps on, has no business waiting for).
- Instances a rollback stopped (`stop_new`), terminated `retention` seconds
  after the rollback ended, as the old fleet is after a release succeeds;
  both are the sweep's (`engine.sweep`), which touches AWS only when one is due.

Never deleted: an image that an instance (running or stopped, of any
environment) was launched from, an environment's base or last baked image,
or one a release that could still roll back names (an active release, or a
succeeded one whose old fleet is not terminated yet); an image still being
made; an image of another installation of Greenlight (its own tag says so).

Each run is idempotent and does not wait: a deregistered image's snapshots
are tagged with its id first, so a run that dies between deregistering and
deleting the snapshots leaves them findable, and the next run deletes them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Q
from django.utils import timezone

from deployer import aws
from deployer.errors import AdapterError

from . import audit, plan
from .models import Environment, Installation, Instance, Release

log = logging.getLogger(__name__)
LIVE = ("pending", "running", "stopping", "stopped")
NEW = (Instance.Role.CANARY, Instance.Role.CLONE)
NEXT_CLEAN_UP = "deleted at the next clean-up"


@dataclass(frozen=True)
class ImageFate:
    id: str
    name: str
    created: str  # as AWS says it (ISO 8601)
    release_number: str
    delete: bool
    reason: str  # why it is kept, or when it goes


def environment_cloud(environment: Environment) -> aws.Cloud:
    """The environment's AWS as it is configured now, every mutation audited against it."""
    from .engine import cloud_for

    def on_mutation(action: str, resource: str, request_id: str) -> None:
        audit.record(f"aws:{action}", target=resource, environment=environment, request_id=request_id, source="clean-up")

    return cloud_for(plan.settings_of(environment), on_mutation)


def greenlight_images(cloud: aws.Cloud, environment: Environment) -> list[dict]:
    """The environment's images that this installation's releases baked,
    newest first. A release tags its image with the release and environment
    tags (releases/identity.py), and, since installations have ids, the
    installation's: an image tagged with another installation's id is that
    one's to keep or delete."""
    installation = Installation.current_id()
    images = cloud.images(tags={aws.TAG_ENVIRONMENT: environment.name}, tag_keys=[aws.TAG_RELEASE])
    mine = [i for i in images if _tags(i).get(aws.TAG_INSTALLATION, installation) == installation
            and i.get("Name", "").startswith("greenlight-")]
    return sorted(mine, key=lambda i: (i.get("CreationDate", ""), i["ImageId"]), reverse=True)


def protected_images() -> dict[str, str]:
    """Image id -> why no clean-up may delete it, from the database: what
    environments name, and what a release that could still roll back names."""
    protected: dict[str, str] = {}
    for name, base, last in Environment.objects.values_list("name", "base_ami", "last_baked_ami"):
        if last:
            protected.setdefault(last, f"{name}'s last baked image")
        if base:
            protected.setdefault(base, f"{name}'s base image")
    may_roll_back = Release.objects.filter(Q(status__in=Release.ACTIVE) | Q(status=Release.Status.SUCCEEDED)).exclude(
        state__has_key="old_terminated")
    for pk, frozen, state in may_roll_back.values_list("pk", "plan", "state"):
        environment = (frozen or {}).get("environment") or {}
        for image in (environment.get("image"), environment.get("last_baked_ami"), (state or {}).get("image")):
            if image:
                protected.setdefault(image, f"release #{pk} could still roll back to it")
    return protected


def image_fates(environment: Environment, images: list[dict], used: dict[str, str], protected: dict[str, str]) -> list[ImageFate]:
    """What happens to each of the environment's images (newest first):
    `used` maps an image to an instance launched from it."""
    fates = []
    for n, image in enumerate(images):
        image_id, reason = image["ImageId"], ""
        if n < environment.images_kept:
            reason = f"one of the last {environment.images_kept} baked images"
        elif image_id in protected:
            reason = protected[image_id]
        elif image_id in used:
            reason = f"{used[image_id]} was launched from it"
        elif image.get("State") != "available":
            reason = f"it is {image.get('State', 'unknown')}"
        fates.append(ImageFate(image_id, image.get("Name", ""), image.get("CreationDate", ""),
                               _tags(image).get(aws.TAG_RELEASE_NUMBER, ""), delete=not reason,
                               reason=reason or NEXT_CLEAN_UP))
    return fates


def image_schedule(environment: Environment, cloud: aws.Cloud | None = None) -> list[ImageFate]:
    """The environment's images and what the next clean-up does with each."""
    cloud = cloud or environment_cloud(environment)
    images = greenlight_images(cloud, environment)
    beyond = [i["ImageId"] for i in images[environment.images_kept:]]
    used = {}
    for instance in cloud.instances(image_ids=beyond, states=LIVE) if beyond else []:
        used.setdefault(instance.image_id, f"{instance.name or instance.id} ({instance.id}, {instance.state})")
    return image_fates(environment, images, used, protected_images())


def clean_up_images(environment: Environment) -> list[str]:
    """Delete the environment's images beyond the last N (with their
    snapshots) that nothing uses; returns the ids deleted."""
    cloud = environment_cloud(environment)
    deleted = []
    for fate in image_schedule(environment, cloud):
        if not fate.delete:
            continue
        # looked at again right before: a release may have frozen it, or a person named it, a moment ago
        if fate.id in protected_images() or cloud.instances(image_ids=[fate.id], states=LIVE):
            continue
        image = cloud.image(fate.id)
        if image is None:
            continue
        snapshots = aws.Cloud.image_snapshots(image)
        cloud.tag(snapshots, {aws.TAG_DEREGISTERED_IMAGE: fate.id})  # findable if this run dies below
        cloud.deregister_image(fate.id)
        in_use = cloud.delete_snapshots(snapshots)
        audit.record("image.delete", target=fate.id, environment=environment, name=fate.name,
                     release_number=fate.release_number, snapshots=[s for s in snapshots if s not in in_use],
                     reason=f"older than the last {environment.images_kept} baked images of {environment.name}",
                     source="clean-up")
        deleted.append(fate.id)
    # snapshots of an image deregistered by a run that died before deleting them
    orphans = [s["SnapshotId"] for s in cloud.snapshots_tagged(aws.TAG_DEREGISTERED_IMAGE)
               if _tags(s).get(aws.TAG_DEREGISTERED_IMAGE) and cloud.image(_tags(s)[aws.TAG_DEREGISTERED_IMAGE]) is None]
    cloud.delete_snapshots(orphans)
    return deleted


def clean_up() -> dict:
    """Every environment's images beyond its last N; one environment's AWS
    failing is logged and does not stop the others."""
    deleted, failed = {}, {}
    for environment in Environment.objects.order_by("name"):
        try:
            if images := clean_up_images(environment):
                deleted[environment.name] = images
        except AdapterError as exc:
            log.warning("cannot clean up the images of %s: %s", environment.name, exc)
            failed[environment.name] = str(exc)
    return {"deleted": deleted, "failed": failed}


# -- instances after their retention -----------------------------------------------------


@dataclass(frozen=True)
class InstanceFate:
    id: str
    name: str
    release: int
    at: datetime  # when the sweep terminates it
    why: str


def retired_instances(release: Release) -> list[str]:
    """The old fleet a succeeded release stopped."""
    return sorted({*(i.instance_id for i in release.instances.all() if i.role == Instance.Role.OLD),
                   *release.state.get("old", [])})  # releases from before instance rows held the old fleet


def rolled_back_instances(release: Release) -> list[str]:
    """The new instances a rollback (or a cancel) stopped."""
    return sorted({i.instance_id for i in release.instances.all() if i.role in NEW})  # prefetched or one query


# What the sweep terminates after a release's retention: (the releases, their instances, the
# state key that says done, why). A rolled-back release that launched nothing is never looked at.
RETIRED = (
    # (only releases with an old fleet: a first release, with none, would be looked at on every sweep and page)
    (Q(status=Release.Status.SUCCEEDED) & (Q(instances__role=Instance.Role.OLD) | Q(state__has_key="old")),
     retired_instances, "old_terminated", "replaced by release #{pk}"),
    (Q(status__in=(Release.Status.ROLLED_BACK, Release.Status.CANCELLED), instances__role__in=NEW),
     rolled_back_instances, "new_terminated", "stopped by the rollback of release #{pk}"),
)


def releases_to_retire(which: Q, done: str, **more):
    return Release.objects.filter(which, finished_at__isnull=False, **more).exclude(state__has_key=done).distinct()


def due_at(release: Release) -> datetime:
    return release.finished_at + timedelta(seconds=release.plan["environment"]["retention"])


def instance_schedule(environment: Environment) -> list[InstanceFate]:
    """Instances of the environment that the sweep will terminate, and when."""
    fates = []
    for which, instances_of, done, why in RETIRED:
        for release in releases_to_retire(which, done, environment=environment).prefetch_related("instances"):
            names = {i.instance_id: i.name for i in release.instances.all()}
            fates += [InstanceFate(i, names.get(i, ""), release.pk, due_at(release), why.format(pk=release.pk))
                      for i in instances_of(release)]
    return sorted(fates, key=lambda f: (f.at, f.name))


def terminate_retired(now: datetime | None = None) -> int:
    """Terminate what each release left stopped once its retention is over;
    the number of releases done. Audited as the release's own AWS calls."""
    from .engine import release_cloud

    now = now or timezone.now()
    done_count = 0
    for which, instances_of, done, _ in RETIRED:
        for release in releases_to_retire(which, done):
            if due_at(release) >= now:
                continue
            ids = instances_of(release)
            if not ids:
                continue
            # marked first, on the condition that the release is still where it was: a rollback
            # asked for a moment ago (services refuse one once the mark is set) wins, or loses, whole
            marked = Release.objects.filter(pk=release.pk, status=release.status).exclude(state__has_key=done)
            if not marked.update(state={**release.state, done: True}):
                continue
            try:
                # an instance already terminated needs nothing; AWS answers a terminate of it anyway
                release_cloud(release).terminate(ids)
            except AdapterError as exc:
                log.warning("cannot terminate the instances release %s left stopped: %s", release.pk, exc)
                Release.objects.filter(pk=release.pk).update(state=release.state)  # the next sweep tries again
                continue
            done_count += 1
    return done_count


def _tags(resource: dict) -> dict:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}
