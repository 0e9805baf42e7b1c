"""Inbound CI webhooks (``POST /v1/hooks/{source}``): verify, parse, map to facts.

A hook source in ``gatekeeper.yaml`` (``hooks:``) names its kind, the environment variable
holding its secret, the project its facts go to, and a declarative mapping from events to
facts. ``handle`` does the whole job for one request:

1. ``verify`` the request with the source's secret, before reading anything else:

   - ``github``: ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>``, as in
     GitHub's "Validating webhook deliveries"
     (https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries);
   - ``gitlab``: the ``X-Gitlab-Token`` header holds the secret token itself, as in GitLab's
     "Webhooks" documentation
     (https://docs.gitlab.com/user/project/integrations/webhooks/#create-a-webhook);
   - ``standard`` (any other sender): Standard Webhooks (https://www.standardwebhooks.com/),
     checked by the ``standardwebhooks`` library: ``webhook-signature`` holds
     ``v1,<base64 HMAC-SHA256 of "<webhook-id>.<webhook-timestamp>.<body>">`` and
     ``webhook-timestamp`` (Unix seconds) is within the library's tolerance, 5 minutes, of now.

   All comparisons are constant time (``hmac.compare_digest``).
2. Parse the body: ``application/json``, or (GitHub only) ``application/x-www-form-urlencoded``
   with the JSON in its ``payload`` field.
3. ``map_event``: the first mapping whose ``event`` is the event name (``X-GitHub-Event``,
   e.g. ``workflow_run``; ``X-Gitlab-Event``, e.g. ``Pipeline Hook``; for ``standard`` the
   payload's ``type``, as the spec's ``{"type", "timestamp", "data"}`` payload carries it)
   and whose ``match`` entries all hold produces one fact. No mapping fits: no fact (the
   route answers 202).

``delivery_id`` is the sender's id of a delivery, which the route makes the idempotency key
(``hook:<source>:<id>``): a redelivery applies nothing twice, and for ``standard`` a replayed
``webhook-id`` with another body is refused.

Templates (a fact's ``id`` and ``data`` values) use ``${dotted.path}`` placeholders over the
payload, with list indexes as path parts (``${workflow_run.pull_requests.0.number}``), and
``$$`` for a literal ``$``. A template that is exactly one placeholder keeps the JSON value's
type (``run_number`` stays an int); otherwise values are substituted as text. Substitution goes
through ``string.Template``, never ``str.format``.

Every failure is a ``HookRejected`` with an HTTP status: 401 bad or missing signature/token,
400 malformed payload or unsupported content type, 422 a mapping that cannot produce a valid
fact. Messages never contain the secret, nor the signature or token received.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import urllib.parse
from binascii import Error as Base64Error
from collections.abc import Mapping
from functools import cache
from string import Template
from typing import Any, Final

from standardwebhooks.webhooks import (
    EmptyWebhookSecretError,
    Webhook,
    WebhookVerificationError,
)

from gatekeeper.config import Config, Hook, HookFact
from gatekeeper.engine.model import FactInput
from gatekeeper.jsonwire import MAX_FACT_DEPTH, loads_strict, too_deep
from gatekeeper.problems import Problem
from gatekeeper.schemas import load_schema

GITHUB_SIGNATURE_HEADER: Final = "X-Hub-Signature-256"
GITHUB_EVENT_HEADER: Final = "X-GitHub-Event"
GITLAB_TOKEN_HEADER: Final = "X-Gitlab-Token"
GITLAB_EVENT_HEADER: Final = "X-Gitlab-Event"
GITHUB_DELIVERY_HEADER: Final = "X-GitHub-Delivery"
GITLAB_IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
STANDARD_ID_HEADER: Final = "webhook-id"
STANDARD_HEADERS: Final = (STANDARD_ID_HEADER, "webhook-timestamp", "webhook-signature")
STANDARD_TOLERANCE_S: Final = 300
"""The ``standardwebhooks`` library's timestamp tolerance (5 minutes), each way."""
STANDARD_EVENT_FIELD: Final = "type"

RESERVED_KINDS: Final = frozenset({"approval"})
"""Fact kinds a hook may not produce (approvals come only from authenticated approvers);
the same set ``POST /v1/facts`` refuses."""

_SIGNATURE_PREFIX: Final = "sha256="
_FORM_MAX_FIELDS: Final = 16
_MISSING: Final = object()
_HOW: Final = "write ${dotted.path} (e.g. ${workflow_run.conclusion}), or $$ for a literal $"


class HookRejected(Exception):
    """A webhook request that is not accepted; ``status`` is the HTTP status to answer with.

    401: bad or missing signature/token; 400: malformed payload or unsupported content type;
    422: the mapping produced no valid fact. ``message`` never holds the secret.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class PathTemplate(Template):
    """``string.Template`` whose placeholders are ``${dotted.path}`` (braced only).

    A bare ``$name`` is an invalid placeholder, so ``$workflow_run.name`` cannot silently mean
    "the whole ``workflow_run`` object, then ``.name``"; ``$$`` is a literal ``$``.
    """

    idpattern = r"(?!)"
    braceidpattern = r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*"


_SINGLE_PLACEHOLDER: Final = re.compile(r"\$\{(" + PathTemplate.braceidpattern + r")\}")


def handle(hook: Hook, secret: str, headers: Mapping[str, str], body: bytes) -> list[FactInput]:
    """The facts one webhook request yields: ``verify``, then parse, then ``map_event``.

    ``headers`` are looked up case-insensitively. Returns ``[]`` when no mapping fits the
    event (answer 202). Raises ``HookRejected`` (401, 400 or 422).
    """
    verify(hook, secret, headers, body)
    if hook.kind == "standard":
        payload = parse_payload(hook, headers, body)
        return map_event(hook, event_name(hook, headers, payload), payload)
    event = event_name(hook, headers)
    payload = parse_payload(hook, headers, body)
    return map_event(hook, event, payload)


def verify(hook: Hook, secret: str, headers: Mapping[str, str], body: bytes) -> None:
    """Raise ``HookRejected`` 401 unless the request carries ``hook``'s secret.

    GitHub ("Validating webhook deliveries"): ``X-Hub-Signature-256`` must be ``sha256=``
    followed by the hex HMAC-SHA256 of the raw ``body`` keyed with ``secret``.
    GitLab ("Webhooks", secret token): ``X-Gitlab-Token`` must equal ``secret``.
    Standard Webhooks: ``webhook-signature`` must hold a ``v1`` signature of ``webhook-id``,
    ``webhook-timestamp`` and ``body`` made with ``secret`` (``whsec_<base64>``, or any other
    text as raw key bytes), and the timestamp be within ``STANDARD_TOLERANCE_S`` of now.
    Compared in constant time; an empty ``secret`` verifies nothing.
    """
    if not secret:
        raise HookRejected(401, f"hook {hook.name!r} has no secret configured")
    if hook.kind == "github":
        _verify_github(secret, headers, body)
    elif hook.kind == "gitlab":
        _verify_gitlab(secret, headers)
    else:
        _verify_standard(hook, secret, headers, body)


def event_name(hook: Hook, headers: Mapping[str, str], payload: Any = None) -> str:
    """The event type: ``X-GitHub-Event`` (``workflow_run``), ``X-Gitlab-Event``
    (``Pipeline Hook``), or for ``standard`` the ``type`` string of ``payload``.
    Raises ``HookRejected`` 400 when it is missing or empty."""
    if hook.kind == "standard":
        event = payload.get(STANDARD_EVENT_FIELD) if isinstance(payload, dict) else None
        if not isinstance(event, str) or not event.strip():
            message = 'the payload has no "type" string (Standard Webhooks: type, timestamp, data)'
            raise HookRejected(400, message)
        return event.strip()
    name = GITHUB_EVENT_HEADER if hook.kind == "github" else GITLAB_EVENT_HEADER
    event = (header(headers, name) or "").strip()
    if not event:
        raise HookRejected(400, f"missing {name} header")
    return event


def parse_payload(hook: Hook, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """The JSON object in ``body``: ``application/json``, or for GitHub also
    ``application/x-www-form-urlencoded`` with the JSON in the ``payload`` field.

    Raises ``HookRejected`` 400 for another content type, bad JSON or a non-object payload.
    """
    media_type = (header(headers, "Content-Type") or "").split(";", 1)[0].strip().lower()
    if media_type == "application/json":
        return _json_object(body)
    if media_type == "application/x-www-form-urlencoded" and hook.kind == "github":
        return _json_object(_form_payload(body))
    accepted = "application/json"
    if hook.kind == "github":
        accepted += " or application/x-www-form-urlencoded"
    shown = media_type or "none"
    raise HookRejected(400, f"unsupported content type {shown!r} (send {accepted})")


def map_event(hook: Hook, event: str, payload: Any) -> list[FactInput]:
    """The fact the first fitting mapping of ``hook`` makes of ``payload``, as a list.

    A mapping fits when its ``event`` equals ``event`` and each ``match`` path holds exactly
    the required value (``true`` never equals ``1``). ``[]`` when none fits. Raises
    ``HookRejected`` 422 when a template is malformed, names a path the payload lacks, or
    the fact's id or kind is not valid.
    """
    for mapping in hook.facts:
        if mapping.event == event and _matches(mapping, payload):
            return [_make_fact(hook, mapping, payload)]
    return []


def delivery_id(hook: Hook, headers: Mapping[str, str]) -> str | None:
    """The sender's id of this delivery, the same on every redelivery of it, or ``None``.

    - ``github``: ``X-GitHub-Delivery``, a GUID that GitHub's "Redeliver" keeps.
    - ``gitlab``: ``Idempotency-Key``. GitLab's "Webhooks" documentation, section
      "Delivery headers" (doc/user/project/integrations/webhooks.md, GitLab 17.4+), gives it as
      "Unique ID consistent across webhook retries", and "Resend Request" sends "the same data
      and the same ``Idempotency-Key`` header". ``X-Gitlab-Event-UUID`` is no per-event key:
      a resend gets a fresh one, and "Recursive webhooks (triggered by earlier webhooks) share
      the same value", so two different events can carry it. A GitLab older than 17.4 sends
      no ``Idempotency-Key``: its deliveries are applied as they come, never deduplicated.

    - ``standard``: ``webhook-id``, which the Standard Webhooks spec keeps the same when a
      message is retried (and which the signature covers).

    An empty or blank header counts as absent.
    """
    names = {"github": GITHUB_DELIVERY_HEADER, "gitlab": GITLAB_IDEMPOTENCY_HEADER}
    name = names.get(hook.kind, STANDARD_ID_HEADER)
    value = (header(headers, name) or "").strip()
    return value or None


def header(headers: Mapping[str, str], name: str) -> str | None:
    """The value of header ``name`` in ``headers``, whatever the case of its key."""
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def lookup(payload: Any, path: str) -> Any:
    """The value at dotted ``path`` in ``payload`` (digits index lists: ``prs.0.number``).

    Raises ``KeyError(path)`` when a part is missing or indexes something that is neither
    an object nor a list.
    """
    value = payload
    for part in path.split("."):
        value = _step(value, part)
        if value is _MISSING:
            raise KeyError(path)
    return value


def render(template: str, payload: Any, *, keep_type: bool = True) -> Any:
    """``template`` rendered over ``payload``.

    Exactly one ``${path}`` (and ``keep_type``): the value itself, any JSON type.
    Otherwise a string: strings are inserted as they are, numbers and booleans as JSON
    (``true``); null, objects and lists are refused. Raises ``HookRejected`` 422.
    """
    single = _SINGLE_PLACEHOLDER.fullmatch(template)
    if single and keep_type:
        return _resolve(payload, single.group(1))
    parsed = PathTemplate(template)
    if not parsed.is_valid():
        raise HookRejected(422, f"template {template!r} has an invalid placeholder: {_HOW}")
    values = {path: _as_text(path, _resolve(payload, path)) for path in parsed.get_identifiers()}
    return parsed.substitute(values)


def hook_problems(config: Config) -> list[Problem]:
    """``check_hook`` for every hook of ``config``, as problems of the config file at path
    ``hooks.<source>.facts[i].<field>`` (no line: the config's schema was checked on load).
    A ``standard`` hook also needs ``idempotency_window_s`` of at least twice
    ``STANDARD_TOLERANCE_S`` (a timestamp may lie that far ahead of the first delivery
    and still be accepted that far behind a replay), or a replay still inside the
    tolerance could be forgotten. The daemon refuses a config with any at start or
    reload; ``gatekeeper check`` reports them."""
    file = str(config.path) if config.path else "gatekeeper.yaml"
    problems = [
        Problem(file, 0, 0, message.split(": ", 1)[1], f"hooks.{name}.{message.split(':', 1)[0]}")
        for name, hook in sorted(config.hooks.items())
        for message in check_hook(hook)
    ]
    standard = sorted(name for name, hook in config.hooks.items() if hook.kind == "standard")
    least = 2 * STANDARD_TOLERANCE_S
    if standard and config.idempotency_window_s < least:
        message = (
            f"is below {least} s, twice the timestamp tolerance (± {STANDARD_TOLERANCE_S} s) "
            f"of standard hooks ({', '.join(standard)}): a replayed webhook-id could be "
            "applied twice"
        )
        problems.append(Problem(file, 0, 0, message, "idempotency_window_s"))
    return problems


def check_hook(hook: Hook) -> list[str]:
    """What is wrong with ``hook``'s mappings before any event arrives: malformed templates
    and reserved fact kinds, each as ``facts[i].field: message``."""
    problems = []
    for index, mapping in enumerate(hook.facts):
        where = f"facts[{index}]"
        if mapping.kind in RESERVED_KINDS:
            problems.append(f"{where}.kind: fact kind {mapping.kind!r} is reserved")
        templates = {"id": mapping.id, **{f"data.{k}": v for k, v in mapping.data.items()}}
        for field, text in templates.items():
            if not PathTemplate(text).is_valid():
                problems.append(f"{where}.{field}: invalid placeholder in {text!r}: {_HOW}")
    return problems


def _verify_github(secret: str, headers: Mapping[str, str], body: bytes) -> None:
    received = header(headers, GITHUB_SIGNATURE_HEADER)
    if not received:
        raise HookRejected(401, f"missing {GITHUB_SIGNATURE_HEADER} header")
    if not received.startswith(_SIGNATURE_PREFIX):
        raise HookRejected(401, f"{GITHUB_SIGNATURE_HEADER} is not sha256=<hex digest>")
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    expected = _SIGNATURE_PREFIX + digest
    if not hmac.compare_digest(expected.encode(), _bytes(received.strip().lower())):
        raise HookRejected(401, f"{GITHUB_SIGNATURE_HEADER} does not match the body")


def _verify_gitlab(secret: str, headers: Mapping[str, str]) -> None:
    received = header(headers, GITLAB_TOKEN_HEADER)
    if not received:
        raise HookRejected(401, f"missing {GITLAB_TOKEN_HEADER} header")
    if not hmac.compare_digest(secret.encode("utf-8"), _bytes(received)):
        raise HookRejected(401, f"{GITLAB_TOKEN_HEADER} is not this hook's secret token")


def _verify_standard(hook: Hook, secret: str, headers: Mapping[str, str], body: bytes) -> None:
    verify_standard(secret, headers, body, sender=f"hook {hook.name!r}")


def verify_standard(secret: str, headers: Mapping[str, str], body: bytes, *, sender: str) -> None:
    """Raise ``HookRejected`` 401 unless ``body`` carries a Standard Webhooks signature
    made with ``secret`` (``whsec_<base64>``, or any other text as raw key bytes):
    ``webhook-id``, ``webhook-timestamp`` (within ``STANDARD_TOLERANCE_S`` of now) and
    ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``, one of
    several space-separated), checked by the ``standardwebhooks`` library in constant
    time. ``sender`` names who must have signed (``hook 'jenkins'``, ``target 'bank'``)
    in the message when its secret is empty or unusable. Used by inbound hooks and by the
    bank's settlement callbacks."""
    if not secret:
        raise HookRejected(401, f"{sender} has no secret configured")
    try:
        webhook = Webhook(secret if secret.startswith("whsec_") else secret.encode("utf-8"))
    except (EmptyWebhookSecretError, Base64Error, ValueError):
        raise HookRejected(401, f"{sender} has no usable secret configured") from None
    # only the three headers, as text that encodes: a lone surrogate cannot raise inside
    received = {
        name: _bytes(value).decode("utf-8")
        for name in STANDARD_HEADERS
        if (value := header(headers, name)) is not None
    }
    missing = [name for name in STANDARD_HEADERS if not received.get(name)]
    if missing:
        raise HookRejected(401, f"missing {', '.join(missing)} header(s) (Standard Webhooks)")
    try:
        webhook.verify(body, received, json_parse=False)
    except WebhookVerificationError as error:
        reason = {
            "Message timestamp too old": "webhook-timestamp is more than 5 minutes old",
            "Message timestamp too new": "webhook-timestamp is more than 5 minutes ahead",
            "Invalid Signature Headers": "webhook-timestamp is not a Unix time in seconds",
        }.get(str(error), "webhook-signature does not match the body")
        raise HookRejected(401, reason) from None


def _bytes(text: str) -> bytes:
    """``text`` as UTF-8; a header holding lone surrogates cannot fail the comparison."""
    return text.encode("utf-8", "replace")


def _form_payload(body: bytes) -> bytes:
    try:
        fields = urllib.parse.parse_qs(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=True,
            max_num_fields=_FORM_MAX_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):
        raise HookRejected(400, "the form-encoded body is malformed") from None
    values = fields.get("payload", [])
    if len(values) != 1:
        raise HookRejected(400, "a form-encoded body must hold exactly one 'payload' field")
    return values[0].encode("utf-8")


def _json_object(text: bytes) -> dict[str, Any]:
    try:
        payload = loads_strict(text)
    except ValueError as error:
        raise HookRejected(400, f"the payload is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise HookRejected(400, "the payload must be a JSON object")
    return payload


def _step(value: Any, part: str) -> Any:
    if isinstance(value, dict):
        return value.get(part, _MISSING)
    if isinstance(value, list) and part.isdigit() and part.isascii():
        index = int(part)
        return value[index] if index < len(value) else _MISSING
    return _MISSING


def _resolve(payload: Any, path: str) -> Any:
    try:
        return lookup(payload, path)
    except KeyError:
        raise HookRejected(422, f"the payload has no value at {path!r}") from None


def _as_text(path: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    what = "null" if value is None else "an object" if isinstance(value, dict) else "a list"
    message = f"{path!r} is {what}, which cannot be part of a text; use ${{{path}}} alone"
    raise HookRejected(422, message)


def _matches(mapping: HookFact, payload: Any) -> bool:
    for path, required in mapping.match.items():
        try:
            value = lookup(payload, path)
        except KeyError:
            return False
        if not _same(value, required):
            return False
    return True


def _same(value: Any, required: Any) -> bool:
    """JSON equality: booleans equal only booleans, so ``true`` never matches ``1``."""
    if isinstance(value, bool) or isinstance(required, bool):
        return type(value) is type(required) and value == required
    return bool(value == required)


def _make_fact(hook: Hook, mapping: HookFact, payload: Any) -> FactInput:
    fact_id = render(mapping.id, payload, keep_type=False)
    data = {name: render(text, payload) for name, text in mapping.data.items()}
    if too_deep(data):  # the same limit as POST /v1/facts: only what can be served back
        message = f"the mapped fact data is nested more than {MAX_FACT_DEPTH} levels deep"
        raise HookRejected(422, message)
    _check_identifiers(hook.project, mapping.kind, fact_id)
    return FactInput(project=hook.project, kind=mapping.kind, id=fact_id, data=data)


def _check_identifiers(project: str, kind: str, fact_id: str) -> None:
    patterns = _fact_patterns()
    for field, value in (("project", project), ("kind", kind), ("id", fact_id)):
        if not re.search(patterns[field], value):
            message = f"fact {field} {value!r} is not valid (must match {patterns[field]})"
            raise HookRejected(422, message)
    if kind in RESERVED_KINDS:
        raise HookRejected(422, f"fact kind {kind!r} is reserved")


@cache
def _fact_patterns() -> dict[str, str]:
    """The ``project``, ``kind`` and ``id`` patterns of ``facts-request.schema.json``."""
    properties = load_schema("facts-request.schema.json")["$defs"]["fact"]["properties"]
    return {name: str(properties[name]["pattern"]) for name in ("project", "kind", "id")}
