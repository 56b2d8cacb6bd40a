"""boto3 clients, built in one place.

The endpoint comes from the caller (an environment's settings, or the
sandbox's file), so the sandbox and real AWS take exactly the same path.
"""

from __future__ import annotations

from dataclasses import dataclass

import boto3
from botocore.config import Config

# Bounded: a hung endpoint must fail a step, not hang a worker forever.
_CONFIG = Config(
    connect_timeout=10,
    read_timeout=60,
    retries={"max_attempts": 5, "mode": "standard"},
)


@dataclass(frozen=True)
class Account:
    region: str
    endpoint_url: str | None = None  # None means AWS itself
    access_key_id: str | None = None  # None means boto3's default chain
    secret_access_key: str | None = None

    def __repr__(self) -> str:  # never print the keys
        return f"Account(region={self.region!r}, endpoint_url={self.endpoint_url!r})"


def client(account: Account, service: str):
    return boto3.session.Session().client(
        service,
        region_name=account.region,
        endpoint_url=account.endpoint_url,
        aws_access_key_id=account.access_key_id,
        aws_secret_access_key=account.secret_access_key,
        config=_CONFIG,
    )
