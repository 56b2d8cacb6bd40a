"""A failed step in plain words: what failed, and whether retrying can help.

Known shapes of failure (git's, AWS's, SSH's) map to an explanation and a
verdict on retrying; anything else says which step failed and points to the
raw output, which the page keeps one click away. Pure text in, text out: the
step's error and the release's revision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Explanation:
    what: str  # what failed, in plain words
    retry: str  # one of RETRY
    advice: str  # what to do next

    @property
    def text(self) -> str:
        return f"{self.what}: {self.advice}"


# the verdicts on retrying (the API's schema lists them)
RETRY = ("may help", "will not help")

NEXT_IF_NOT = "retrying will not help; roll back or cancel"
NEXT_IF_MAYBE = "retrying may help"

# (pattern, what failed; {revision} and the pattern's groups may appear, retry verdict, advice)
RULES: tuple[tuple[re.Pattern, str, str, str], ...] = (
    (re.compile(r"did not match any file\(s\) known to git|--detach does not take a path argument|"
                r"unknown revision|invalid reference|couldn't find remote ref|not a commit|"
                r"reference is not a tree", re.I),
     "revision {revision} does not exist in the repository", "will not help", NEXT_IF_NOT),
    (re.compile(r"Could not resolve host|Could not read from remote repository|repository .* not found|"
                r"Authentication failed for", re.I),
     "the instance could not fetch the repository", "will not help",
     "retrying will not help until the repository or its access is fixed; roll back or cancel"),
    (re.compile(r"Permission denied \(publickey|Authentication failed|host key", re.I),
     "SSH refused Greenlight's connection to the instance", "will not help",
     "retrying will not help until the environment's SSH user, key or host key is fixed; roll back or cancel"),
    (re.compile(r"Throttl|RequestLimitExceeded|Rate exceeded|SlowDown|ServiceUnavailable|"
                r"InternalError|RequestTimeout|EndpointConnectionError", re.I),
     "AWS was busy or did not answer in time", "may help", NEXT_IF_MAYBE),
    (re.compile(r"InsufficientInstanceCapacity|InstanceLimitExceeded|VcpuLimitExceeded", re.I),
     "AWS had no capacity for the instance type (or the account's limit was reached)", "may help",
     "retrying may help later; or roll back"),
    (re.compile(r"UnauthorizedOperation|AccessDenied|not authorized to perform", re.I),
     "AWS refused: the environment's credentials lack a permission", "will not help",
     "retrying will not help until the IAM policy allows it; roll back or cancel"),
    (re.compile(r"timed out|timeout|connection (?:reset|refused|dropped)|exit 143|went down", re.I),
     "it did not finish in time, or the connection dropped", "may help", NEXT_IF_MAYBE),
)


def explain(error: str, *, step: str, revision: str = "") -> Explanation | None:
    """What the failure means, or None when there is no error."""
    if not error:
        return None
    for pattern, what, retry, advice in RULES:
        if pattern.search(error):
            return Explanation(what.format(revision=revision or "?"), retry, advice)
    return Explanation(f"{step} failed", "may help",
                       "the output below says why; retry once the cause is fixed, or roll back or cancel")
