"""The documented limits of the CI services a pipeline action starts, checked when rules load.

A pipeline action whose request the service would refuse is a ``check`` problem, not a
dead letter found at run time. Each limit cites where the service states it:

- GitHub Actions, "Create a workflow dispatch event" (REST, ``inputs``): "The maximum
  number of properties is 25"
  (https://docs.github.com/en/rest/actions/workflows#create-a-workflow-dispatch-event, and
  the REST description in github/rest-api-description). The workflow syntax reference adds
  "The maximum payload for inputs is 65,535 characters"
  (https://docs.github.com/en/actions/writing-workflows/workflow-syntax-for-github-actions#onworkflow_dispatchinputs),
  counted here as the characters of the compact JSON of ``inputs``.
- GitLab, "Trigger a pipeline with a token" (``variables[KEY]``): a pipeline variable's key
  "can contain only letters, digits and '_'" and is at most 255 characters (the
  validation of ``Ci::HasVariable``, which ``Ci::PipelineVariable`` includes, in
  gitlab-org/gitlab ``app/models/concerns/ci/has_variable.rb``). GitLab documents no
  limit on the number of trigger variables that could be confirmed, so none is checked.
- Jenkins, ``buildWithParameters?KEY=value...``: the parameters travel in the request
  line, and Jenkins' servlet container (Winstone) refuses a request header over
  ``--requestHeaderSize``, "Default is 8192" bytes (jenkinsci/winstone README). The
  request target (path and query) must fit in that with ``JENKINS_HEADER_ALLOWANCE_BYTES``
  left for the method, the version and the other headers (Host, Authorization,
  User-Agent).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping

from gatekeeper.config import Target

GITHUB_MAX_INPUTS = 25
GITHUB_MAX_INPUTS_CHARS = 65_535
GITLAB_MAX_VARIABLE_KEY_CHARS = 255
JENKINS_MAX_REQUEST_HEADER_BYTES = 8192
JENKINS_HEADER_ALLOWANCE_BYTES = 1024
"""Bytes of Jenkins' request header budget kept for everything but the request target."""


def pipeline_limit_problems(
    target: Target, ref: str, inputs: Mapping[str, str]
) -> list[tuple[str, str]]:
    """(key of the pipeline action, message) for each documented limit of ``target``'s
    service that the action's ``ref`` and ``inputs`` exceed; [] for a webhook target."""
    if target.kind == "github_actions":
        return _github_problems(target, inputs)
    if target.kind == "gitlab":
        return _gitlab_problems(inputs)
    if target.kind == "jenkins":
        return _jenkins_problems(target, ref, inputs)
    return []


def jenkins_request_target(target: Target, ref: str, inputs: Mapping[str, str]) -> str:
    """``/job/{folder}/job/{name}/buildWithParameters?KEY=value...`` below the Jenkins base
    URL: the rule's inputs, and its ref as ``ref_parameter`` unless an input has that name."""
    job = "/".join(f"job/{urllib.parse.quote(part, safe='')}" for part in target.job.split("/"))
    parameters = {target.ref_parameter: ref, **inputs}
    query = urllib.parse.urlencode(parameters, quote_via=urllib.parse.quote)
    return f"/{job}/buildWithParameters?{query}"


def _github_problems(target: Target, inputs: Mapping[str, str]) -> list[tuple[str, str]]:
    found = []
    if len(inputs) > GITHUB_MAX_INPUTS:
        found.append(
            (
                "inputs",
                f"{len(inputs)} inputs; GitHub's workflow_dispatch takes at most "
                f"{GITHUB_MAX_INPUTS} (target {target.name!r})",
            )
        )
    size = len(json.dumps(dict(inputs), separators=(",", ":"), ensure_ascii=False))
    if size > GITHUB_MAX_INPUTS_CHARS:
        found.append(
            (
                "inputs",
                f"the inputs are {size:,} characters as JSON; GitHub's workflow_dispatch takes "
                f"at most {GITHUB_MAX_INPUTS_CHARS:,} (target {target.name!r})",
            )
        )
    return found


def _gitlab_problems(inputs: Mapping[str, str]) -> list[tuple[str, str]]:
    bad = [key for key in inputs if not _gitlab_key_ok(key)]
    if not bad:
        return []
    shown = ", ".join(repr(key[:40]) for key in bad[:5])
    return [
        (
            "inputs",
            f"GitLab pipeline variable names are letters, digits and _ (at most "
            f"{GITLAB_MAX_VARIABLE_KEY_CHARS} characters); not: {shown}",
        )
    ]


def _gitlab_key_ok(key: str) -> bool:
    return (
        0 < len(key) <= GITLAB_MAX_VARIABLE_KEY_CHARS
        and key.isascii()
        and all(c.isalnum() or c == "_" for c in key)
    )


def _jenkins_problems(target: Target, ref: str, inputs: Mapping[str, str]) -> list[tuple[str, str]]:
    base_path = urllib.parse.urlsplit(target.base_url).path.rstrip("/")
    size = len((base_path + jenkins_request_target(target, ref, inputs)).encode())
    budget = JENKINS_MAX_REQUEST_HEADER_BYTES - JENKINS_HEADER_ALLOWANCE_BYTES
    if size <= budget:
        return []
    return [
        (
            "inputs",
            f"the buildWithParameters URL would be {size:,} bytes; Jenkins refuses a request "
            f"header over {JENKINS_MAX_REQUEST_HEADER_BYTES:,} bytes by default, which leaves "
            f"{budget:,} for the URL (target {target.name!r})",
        )
    ]
