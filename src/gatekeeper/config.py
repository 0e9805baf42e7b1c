"""``gatekeeper.yaml``: where the daemon listens, its database, rules, targets and escrows.

Durations are seconds and say so in their names (``timeout_s``). URLs and secrets live here
and in the environment, never in rule files: a target names the environment variable that
holds its secret (``secret_env``), and ``resolve_secrets`` reads them at startup.

``load_config`` validates the file against ``schemas/config.schema.json`` (unknown keys are
errors) plus the checks a schema cannot express (``listen`` is ``host:port``, backoff base
not above its cap), and raises ``ConfigError`` with every problem, each with line and column.
Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import parse_qs, urlsplit

from gatekeeper.problems import Problem
from gatekeeper.yamlsource import (
    SECRET_NOT_NAME_MESSAGE,
    YamlDocument,
    parse_document,
    schema_problems,
    sorted_problems,
)

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_DATABASE = "gatekeeper.db"
DEFAULT_RULES_DIR = "rules"
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_HEADER_READ_TIMEOUT_S = 10.0
DEFAULT_BODY_READ_TIMEOUT_S = 30.0
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_MAX_CHAIN_DEPTH = 16
"""Default ``max_chain_depth``: how many ``set_fact`` steps one outside fact may set off."""
DEFAULT_DELIVERY_LEASE_S = 30.0
"""Default ``delivery_lease_s``: an action a dead daemon claimed is delivered elsewhere
within this many seconds."""
LEASE_MARGIN_S = 5.0
"""``delivery_lease_s`` exceeds every target's ``timeout_s`` by at least this much: a
claimed attempt is sent and answered (or timed out) well before its lease runs out."""
DEFAULT_CONFIG_NAME = "gatekeeper.yaml"
CONFIG_SCHEMA = "config.schema.json"


@dataclass(frozen=True)
class DeliveryPolicy:
    """How hard to try a target: attempts, total age, exponential backoff, per-request timeout.

    Delay before attempt n+1 is a random value in [0, min(backoff_cap_s, backoff_base_s * 2**(n-1))]
    ("full jitter"); an action is dead-lettered after ``max_attempts`` attempts or once it is
    older than ``max_age_s`` seconds.
    """

    max_attempts: int = 12
    max_age_s: float = 86400.0
    backoff_base_s: float = 5.0
    backoff_cap_s: float = 3600.0
    timeout_s: float = 15.0


TargetKind = Literal["webhook", "github_actions", "gitlab", "jenkins"]
GITHUB_API_URL = "https://api.github.com"
GITLAB_API_URL = "https://gitlab.com/api/v4"
DEFAULT_API_URLS: Mapping[str, str] = {"github_actions": GITHUB_API_URL, "gitlab": GITLAB_API_URL}


@dataclass(frozen=True)
class Target:
    """Where actions go, by ``kind``:

    - ``webhook`` (the default): a JSON POST to ``url`` signed per Standard Webhooks with the
      secret in the environment variable ``secret_env``; ``format: slack`` sends notify
      messages as ``{"text": ...}``. Takes release, notify and pipeline actions.
    - ``github_actions``: a ``workflow_dispatch`` of ``workflow`` (file name or numeric id) in
      ``repo`` (``owner/name``) through the REST API at ``api_url``, with the token in
      ``token_env``.
    - ``gitlab``: a pipeline trigger of project ``project_id`` (numeric id or path) through
      the REST API at ``api_url``, with the pipeline trigger token in ``token_env``.
    - ``jenkins``: ``buildWithParameters`` of ``job`` (folders as ``a/b``) on the Jenkins at
      ``url``, as ``user`` with the API token in ``token_env``; the rule's ``ref`` goes in
      the build parameter ``ref_parameter``.

    The three CI kinds take pipeline actions only (``refusal`` says why another is refused).
    """

    name: str
    url: str = ""
    secret_env: str = ""
    kind: TargetKind = "webhook"
    format: Literal["json", "slack"] = "json"
    delivery: DeliveryPolicy = field(default_factory=DeliveryPolicy)
    token_env: str = ""
    api_url: str = ""
    repo: str = ""
    workflow: str = ""
    project_id: str = ""
    job: str = ""
    user: str = ""
    ref_parameter: str = "ref"

    @property
    def secret_variable(self) -> str:
        """The environment variable this target's secret is read from: ``secret_env`` for a
        webhook (its signing secret), ``token_env`` for the CI kinds (their API token)."""
        return self.secret_env if self.kind == "webhook" else self.token_env

    @property
    def secret_field(self) -> str:
        """The config key naming :attr:`secret_variable` (``secret_env`` or ``token_env``)."""
        return "secret_env" if self.kind == "webhook" else "token_env"

    @property
    def base_url(self) -> str:
        """The API or server base URL without a trailing slash: ``url`` for webhook and
        jenkins targets, ``api_url`` (or the public service's default) for the others."""
        if self.kind in DEFAULT_API_URLS:
            return (self.api_url or DEFAULT_API_URLS[self.kind]).rstrip("/")
        return self.url.rstrip("/") if self.kind == "jenkins" else self.url

    def refusal(self, action_kind: str) -> str | None:
        """Why this target cannot take an action of ``action_kind``, or None when it can.

        Webhook targets take every kind; GitHub Actions, GitLab and Jenkins targets start
        pipelines only (their APIs have no notion of a release or a message)."""
        if self.kind == "webhook" or action_kind == "pipeline":
            return None
        return (
            f"target {self.name!r} is a {self.kind} target, which only starts pipelines; "
            f"a {action_kind} action needs a webhook target"
        )


@dataclass(frozen=True)
class Escrow:
    """An escrow account: its currency (ISO 4217 code) and release limit (a Decimal).
    ``decimals`` is its precision, ``gatekeeper.yaml``'s ``decimals`` (0 for JPY, 2 by
    default, at most ``MAX_ESCROW_DECIMALS``): a release amount from it, its ``limit`` and
    the ``max_amount`` of a release from it have at most this many decimals, and its
    figures are shown with this many."""

    name: str
    currency: str
    limit: Decimal
    decimals: int = 2


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: ``requests_per_s`` on average, at most ``burst`` requests at once."""

    requests_per_s: float
    burst: int


@dataclass(frozen=True)
class Tls:
    """HTTPS on ``listen``: PEM files of the certificate chain and its private key."""

    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class Token:
    """An API token as configured: only the SHA-256 (hex) of the token is kept.

    ``projects`` holds the projects it may act on, ``("*",)`` for all. ``rate_limit`` is the
    token's own or else the config's top-level one (None: unlimited).
    """

    subject: str
    sha256: str
    scopes: frozenset[str]
    projects: tuple[str, ...] = ("*",)
    rate_limit: RateLimit | None = None

    def allows_project(self, project: str) -> bool:
        return "*" in self.projects or project in self.projects


@dataclass(frozen=True)
class HookFact:
    """How one inbound event becomes a fact: ``id`` and ``data`` values are ``${path}``
    templates over the event's JSON payload; ``match`` maps payload paths to required values."""

    event: str
    kind: str
    id: str
    data: Mapping[str, str] = field(default_factory=dict)
    match: Mapping[str, str | int | float | bool | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Hook:
    """An inbound webhook source served at ``POST /v1/hooks/{name}``: GitHub events verified
    with ``X-Hub-Signature-256``, GitLab events with ``X-Gitlab-Token``, and any other sender
    (``standard``) with a Standard Webhooks signature (``webhook-id``, ``webhook-timestamp``,
    ``webhook-signature``), its event being the payload's ``type``."""

    name: str
    kind: Literal["github", "gitlab", "standard"]
    secret_env: str
    project: str
    facts: tuple[HookFact, ...]


@dataclass(frozen=True)
class Config:
    """A loaded ``gatekeeper.yaml``. Relative paths are resolved against the config's folder
    (or the working directory when there is no config file)."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    database: Path | str = Path(DEFAULT_DATABASE)
    """A file path, or a database URL as written (``sqlite:///...``; see
    ``gatekeeper.store.store_for``)."""
    rules_dir: Path = Path(DEFAULT_RULES_DIR)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    targets: Mapping[str, Target] = field(default_factory=dict)
    escrows: Mapping[str, Escrow] = field(default_factory=dict)
    path: Path | None = None
    alert_target: str | None = None
    idempotency_window_s: float = 86400.0
    shutdown_grace_s: float = 10.0
    ruleset_check_s: float = 5.0
    """How often, in seconds, a daemon on a shared database (PostgreSQL) checks the active
    ruleset version besides its notifications (``gatekeeper.runtime.rulesets``)."""
    tokens: tuple[Token, ...] = ()
    hooks: Mapping[str, Hook] = field(default_factory=dict)
    header_read_timeout_s: float = DEFAULT_HEADER_READ_TIMEOUT_S
    body_read_timeout_s: float = DEFAULT_BODY_READ_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    tls: Tls | None = None
    rate_limit: RateLimit | None = None
    max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH
    """How deep rules may chain through ``set_fact``: a fact posted from outside is depth 0,
    a fact a rule sets while evaluating a depth-n fact is depth n + 1; a ``set_fact`` that
    would go deeper is not recorded (the firing is blocked and the alert target told)."""
    daemon_id: str | None = None
    """This daemon's name among those sharing its database (None: made at start, see
    ``gatekeeper.runtime.identity``)."""
    delivery_lease_s: float = DEFAULT_DELIVERY_LEASE_S
    """How long a claim of an action to deliver it keeps other daemons off it (seconds)."""
    money_rule_approvals: int = 0
    """The two-person rule: a rule with a ``release`` action runs as if ``mode: shadow``
    (its effective mode ``awaiting_signoff``) until this many distinct admins signed off its
    exact content hash. 0 (the default): no sign-off is needed."""


class ConfigError(Exception):
    """Raised when a config cannot be used; ``problems`` says every place and what is wrong."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def find_default_config(cwd: Path) -> Path | None:
    """``cwd/gatekeeper.yaml`` when that file exists, else None."""
    candidate = cwd / DEFAULT_CONFIG_NAME
    return candidate if candidate.is_file() else None


def load_config(path: Path | None) -> Config:
    """Load and validate ``gatekeeper.yaml`` (``None``: the defaults, relative to the cwd).

    ``database`` and ``rules_dir`` come back absolute, resolved against the file's folder.
    An empty file means every default. Raises ``ConfigError`` listing every problem: an
    unreadable file, YAML syntax, schema errors (unknown keys included), a bad ``listen``.
    """
    if path is None:
        return _defaults(Path.cwd())
    text = _read_text(path)
    doc, problems = parse_document(text, str(path))
    if doc is None:
        raise ConfigError(problems)
    if doc.data is not None and not isinstance(doc.data, dict):
        message = "gatekeeper.yaml must be a mapping of settings (listen, database, targets, ...)"
        raise ConfigError([*problems, doc.problem((), message)])
    if doc.data is not None:
        problems += schema_problems(doc, CONFIG_SCHEMA)
    data = cast(dict[str, Any], doc.data or {})
    problems += _semantic_problems(doc, data)
    if problems:
        raise ConfigError(sorted_problems(problems))
    return _build(data, path)


def resolve_secrets(config: Config, environ: Mapping[str, str]) -> dict[str, str]:
    """Map each target name to the secret it needs, read from ``environ``: the signing
    secret (``secret_env``) of a webhook target, the API token (``token_env``) of a GitHub
    Actions, GitLab or Jenkins target.

    Raises ``ConfigError`` naming every missing or empty variable and the targets that need
    it; a secret's value never appears in a message.
    """
    secrets: dict[str, str] = {}
    needed_by: dict[str, list[Target]] = {}
    unusable: dict[str, list[str]] = {}
    for name, target in sorted(config.targets.items()):
        variable = target.secret_variable
        value = environ.get(variable)
        if value and target.kind == "webhook" and not _usable_secret(value):
            unusable.setdefault(variable, []).append(name)
        elif value:
            secrets[name] = value
        else:
            needed_by.setdefault(variable, []).append(target)
    file = str(config.path) if config.path else DEFAULT_CONFIG_NAME
    if unusable:
        raise ConfigError(
            [
                Problem(
                    file,
                    0,
                    0,
                    f"environment variable {variable} holds a whsec_ secret whose key is not "
                    f"valid base64 or is empty (needed by {', '.join(map(repr, names))})",
                    f"targets.{names[0]}.secret_env",
                )
                for variable, names in sorted(unusable.items())
            ]
        )
    if needed_by:
        problems = [
            _missing_secret_problem(file, variable, targets, variable in environ)
            for variable, targets in sorted(needed_by.items())
        ]
        raise ConfigError(problems)
    return secrets


def resolve_hook_secrets(config: Config, environ: Mapping[str, str]) -> dict[str, str]:
    """Map each inbound hook source to its secret (``secret_env``) read from ``environ``.

    Raises ``ConfigError`` naming every missing or empty variable (never a value)."""
    secrets: dict[str, str] = {}
    problems = []
    file = str(config.path) if config.path else DEFAULT_CONFIG_NAME
    for name, hook in sorted(config.hooks.items()):
        value = environ.get(hook.secret_env)
        if value and hook.kind == "standard" and not _usable_secret(value):
            message = (
                f"environment variable {hook.secret_env} holds a whsec_ secret that is not "
                f"base64 (needed by hook {name!r})"
            )
            problems.append(Problem(file, 0, 0, message, f"hooks.{name}.secret_env"))
        elif value:
            secrets[name] = value
        else:
            state = "is set but empty" if hook.secret_env in environ else "is not set"
            message = f"environment variable {hook.secret_env} {state} (needed by hook {name!r})"
            problems.append(Problem(file, 0, 0, message, f"hooks.{name}.secret_env"))
    if problems:
        raise ConfigError(problems)
    return secrets


def _usable_secret(value: str) -> bool:
    """A ``whsec_`` secret must hold non-empty base64 (Standard Webhooks); any other
    non-empty string is used as raw key bytes."""
    if not value.startswith("whsec_"):
        return True
    try:
        return len(base64.b64decode(value[len("whsec_") :] + "==")) > 0
    except (binascii.Error, ValueError):
        return False


def parse_listen(text: str) -> tuple[str, int]:
    """``"host:port"`` to ``(host, port)``; ``[::1]:8080`` gives ``("::1", 8080)``.

    Raises ``ValueError`` with a plain sentence when ``text`` is not ``host:port`` or the
    port is not in 0..65535 (0: any free port).
    """
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: put an IPv6 address in brackets, e.g. [::1]:8080")
    if not colon or not host or not port.isdigit() or any(c.isspace() for c in host):
        raise ValueError(f"{text!r} is not host:port (e.g. 127.0.0.1:8080)")
    if int(port) > 65535:
        raise ValueError(f"{text!r}: port {port} is not in 0..65535")
    return host, int(port)


def _defaults(folder: Path) -> Config:
    host, port = parse_listen(DEFAULT_LISTEN)
    return Config(
        listen_host=host,
        listen_port=port,
        database=folder.absolute() / DEFAULT_DATABASE,
        rules_dir=folder.absolute() / DEFAULT_RULES_DIR,
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError(
            [Problem(str(path), 0, 0, f"cannot read the config file: {reason}")]
        ) from None
    except UnicodeDecodeError as error:
        message = f"not UTF-8 text (bad byte at offset {error.start})"
        raise ConfigError([Problem(str(path), 0, 0, message)]) from None


def _semantic_problems(doc: YamlDocument, data: Mapping[str, Any]) -> list[Problem]:
    """What the schema cannot say: ``listen`` is host:port, backoff base <= cap, no
    password in a database URL."""
    problems = []
    listen = data.get("listen")
    if isinstance(listen, str) and listen:
        try:
            parse_listen(listen)
        except ValueError as error:
            problems.append(doc.problem(("listen",), str(error)))
    targets = data.get("targets")
    alert = data.get("alert_target")
    if isinstance(alert, str) and alert not in (targets if isinstance(targets, dict) else {}):
        known = ", ".join(sorted(targets)) if isinstance(targets, dict) and targets else "none"
        message = f"alert_target {alert!r} is not one of the targets (known: {known})"
        problems.append(doc.problem(("alert_target",), message))
    elif isinstance(alert, str) and isinstance(targets, dict):
        kind = targets[alert].get("kind", "webhook") if isinstance(targets[alert], dict) else None
        if isinstance(kind, str) and kind != "webhook":
            message = (
                f"alert_target {alert!r} is a {kind} target, which only starts pipelines; "
                "alerts are notify actions and need a webhook target"
            )
            problems.append(doc.problem(("alert_target",), message))
    database = data.get("database")
    if isinstance(database, str) and (problem := database_url_problem(database)) is not None:
        problems.append(doc.problem(("database",), f"the URL {problem}"))
    problems += _secret_like_name_problems(doc, data)
    problems += _escrow_problems(doc, data)
    lease_s = data.get("delivery_lease_s", DEFAULT_DELIVERY_LEASE_S)
    for name, target in targets.items() if isinstance(targets, dict) else []:
        delivery = target.get("delivery") if isinstance(target, dict) else None
        if isinstance(delivery, dict) and not _backoff_ok(delivery):
            path = ("targets", name, "delivery", "backoff_base_s")
            message = "backoff_base_s must not be greater than backoff_cap_s"
            problems.append(doc.problem(path, message))
        if isinstance(delivery, dict) and (problem := _lease_problem(lease_s, delivery)):
            problems.append(doc.problem(("targets", name, "delivery", "timeout_s"), problem))
    return problems


def _lease_problem(lease_s: object, delivery: Mapping[str, Any]) -> str | None:
    """Why a target's ``timeout_s`` does not fit in ``delivery_lease_s``, or None."""
    timeout_s = delivery.get("timeout_s", DeliveryPolicy.timeout_s)
    if not _numbers(lease_s, timeout_s) or timeout_s + LEASE_MARGIN_S <= lease_s:
        return None
    return (
        f"timeout_s {timeout_s} does not leave {LEASE_MARGIN_S:g} s of delivery_lease_s "
        f"({lease_s} s): another daemon could take the action over mid-attempt; raise "
        "delivery_lease_s or lower timeout_s"
    )


POSTGRESQL_SCHEMES = ("postgresql", "postgres")
"""The URL schemes of a PostgreSQL ``database:``."""


def database_url_problem(database: str) -> str | None:
    """What is wrong with a PostgreSQL ``database:`` URL (``postgresql://user@host:port/
    dbname``), as a clause ("holds a password: ..."), or None (also for anything that is
    not such a URL). A password in it (after the user, or as a ``password`` parameter) is
    refused: it would sit in the config file; libpq reads it from the environment
    (``PGPASSWORD``) or ``~/.pgpass``. The clause never repeats the URL."""
    scheme, sep, _ = database.partition("://")
    if not sep or scheme not in POSTGRESQL_SCHEMES:
        return None
    try:
        parts = urlsplit(database)
        has_password = parts.password is not None
    except ValueError:
        return "is not a valid URL; write postgresql://user@host:port/dbname"
    if has_password or "password" in parse_qs(parts.query):
        return (
            "holds a password; write postgresql://user@host:port/dbname and give the "
            "password in the environment (PGPASSWORD) or in ~/.pgpass, never in this file"
        )
    return None


def looks_like_secret(name: str) -> bool:
    """True when ``name``, written where an environment variable's name belongs, looks like
    a secret instead: not a variable name at all (``whsec_...``, ``ghp_...``, ``glpat-...``),
    an AWS access key id (``AKIA`` + 16), or a part between underscores of 24 characters or
    more, or of 16 or more holding at least 4 digits (names are words: ``BANK_SECRET``)."""
    if not _ENV_NAME.fullmatch(name) or _AWS_KEY_ID.fullmatch(name):
        return True
    return any(
        len(part) >= 24 or (len(part) >= 16 and sum(c.isdigit() for c in part) >= 4)
        for part in name.split("_")
    )


_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
_AWS_KEY_ID = re.compile(r"A[KS]IA[A-Z0-9]{16}")
_SECRET_NAME_KEYS = {"targets": ("secret_env", "token_env"), "hooks": ("secret_env",)}


def _secret_like_name_problems(doc: YamlDocument, data: Mapping[str, Any]) -> list[Problem]:
    """A problem (naming the key, never the value) for each variable name that is a valid
    name but looks like a secret; the schema reports those that are no names at all."""
    problems = []
    for section, keys in _SECRET_NAME_KEYS.items():
        entries = data.get(section)
        for name, entry in entries.items() if isinstance(entries, dict) else []:
            for key in keys:
                value = entry.get(key) if isinstance(entry, dict) else None
                named = isinstance(value, str) and _ENV_NAME.fullmatch(value) is not None
                if named and looks_like_secret(cast(str, value)):
                    problems.append(doc.problem((section, name, key), SECRET_NOT_NAME_MESSAGE))
    return problems


def _backoff_ok(delivery: Mapping[str, Any]) -> bool:
    base = delivery.get("backoff_base_s", DeliveryPolicy.backoff_base_s)
    cap = delivery.get("backoff_cap_s", DeliveryPolicy.backoff_cap_s)
    return not _numbers(base, cap) or base <= cap


def _numbers(*values: object) -> bool:
    """Whether every value is a number (the schema reports the others)."""
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _database(folder: Path, text: str) -> Path | str:
    """The ``database:`` setting: a path resolved against ``folder``; a URL kept as written,
    except that the path of a ``sqlite:///`` URL is resolved against ``folder`` as well."""
    if "://" not in text:
        return folder / Path(text).expanduser()
    prefix = "sqlite:///"
    if text.startswith(prefix) and text[len(prefix) :] not in ("", ":memory:"):
        return prefix + str(folder / Path(text[len(prefix) :]).expanduser())
    return text


def _build(data: Mapping[str, Any], path: Path) -> Config:
    """A ``Config`` from schema-valid ``data`` read from ``path``."""
    folder = path.absolute().parent
    host, port = parse_listen(data.get("listen", DEFAULT_LISTEN))
    rate_limit = _build_rate_limit(data.get("rate_limit"))
    tls = data.get("tls")
    return Config(
        listen_host=host,
        listen_port=port,
        database=_database(folder, data.get("database", DEFAULT_DATABASE)),
        rules_dir=folder / Path(data.get("rules_dir", DEFAULT_RULES_DIR)).expanduser(),
        max_body_bytes=int(data.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES)),
        targets={name: _build_target(name, t) for name, t in data.get("targets", {}).items()},
        escrows={name: _build_escrow(name, e) for name, e in data.get("escrows", {}).items()},
        path=path,
        alert_target=data.get("alert_target"),
        idempotency_window_s=float(data.get("idempotency_window_s", 86400.0)),
        shutdown_grace_s=float(data.get("shutdown_grace_s", 10.0)),
        ruleset_check_s=float(data.get("ruleset_check_s", 5.0)),
        tokens=tuple(_build_token(t, rate_limit) for t in data.get("tokens", [])),
        hooks={name: _build_hook(name, h) for name, h in data.get("hooks", {}).items()},
        header_read_timeout_s=float(
            data.get("header_read_timeout_s", DEFAULT_HEADER_READ_TIMEOUT_S)
        ),
        body_read_timeout_s=float(data.get("body_read_timeout_s", DEFAULT_BODY_READ_TIMEOUT_S)),
        max_connections=int(data.get("max_connections", DEFAULT_MAX_CONNECTIONS)),
        tls=Tls(
            folder / Path(tls["cert_file"]).expanduser(),
            folder / Path(tls["key_file"]).expanduser(),
        )
        if tls
        else None,
        rate_limit=rate_limit,
        max_chain_depth=int(data.get("max_chain_depth", DEFAULT_MAX_CHAIN_DEPTH)),
        money_rule_approvals=int(data.get("money_rule_approvals", 0)),
        daemon_id=data.get("daemon_id"),
        delivery_lease_s=float(data.get("delivery_lease_s", DEFAULT_DELIVERY_LEASE_S)),
    )


def _build_rate_limit(data: Mapping[str, Any] | None) -> RateLimit | None:
    """A ``RateLimit`` from a schema-valid ``rate_limit`` mapping (burst defaults to twice
    the rate, at least 1)."""
    if data is None:
        return None
    rate = float(data["requests_per_s"])
    return RateLimit(rate, int(data.get("burst", max(1, round(2 * rate)))))


def _build_token(data: Mapping[str, Any], default_rate_limit: RateLimit | None) -> Token:
    return Token(
        subject=data["subject"],
        sha256=data["sha256"],
        scopes=frozenset(data["scopes"]),
        projects=tuple(data.get("projects", ["*"])),
        rate_limit=_build_rate_limit(data.get("rate_limit")) or default_rate_limit,
    )


def _build_hook(name: str, data: Mapping[str, Any]) -> Hook:
    facts = tuple(
        HookFact(
            event=f["event"],
            kind=f["kind"],
            id=f["id"],
            data=dict(f.get("data", {})),
            match=dict(f.get("match", {})),
        )
        for f in data["facts"]
    )
    return Hook(name, data["kind"], data["secret_env"], data["project"], facts)


def _build_target(name: str, data: Mapping[str, Any]) -> Target:
    delivery = data.get("delivery", {})
    defaults = DeliveryPolicy()
    policy = DeliveryPolicy(
        max_attempts=int(delivery.get("max_attempts", defaults.max_attempts)),
        max_age_s=float(delivery.get("max_age_s", defaults.max_age_s)),
        backoff_base_s=float(delivery.get("backoff_base_s", defaults.backoff_base_s)),
        backoff_cap_s=float(delivery.get("backoff_cap_s", defaults.backoff_cap_s)),
        timeout_s=float(delivery.get("timeout_s", defaults.timeout_s)),
    )
    kind: TargetKind = data.get("kind", "webhook")
    return Target(
        name=name,
        url=data.get("url", ""),
        secret_env=data.get("secret_env", ""),
        kind=kind,
        format=data.get("format", "json"),
        delivery=policy,
        token_env=data.get("token_env", ""),
        api_url=data.get("api_url", DEFAULT_API_URLS.get(kind, "")),
        repo=data.get("repo", ""),
        workflow=str(data.get("workflow", "")),
        project_id=str(data.get("project_id", "")),
        job=data.get("job", ""),
        user=data.get("user", ""),
        ref_parameter=data.get("ref_parameter", "ref"),
    )


MAX_ESCROW_DECIMALS = 8
"""The most decimals an escrow's precision may have (the schema's bound too)."""


def _build_escrow(name: str, data: Mapping[str, Any]) -> Escrow:
    return Escrow(
        name=name,
        currency=data["currency"],
        limit=Decimal(data["limit"]),
        decimals=data.get("decimals", Escrow.decimals),
    )


def _escrow_problems(doc: YamlDocument, data: Mapping[str, Any]) -> list[Problem]:
    """A problem for each escrow whose ``limit`` has more decimals than its ``decimals``
    (the schema checks each one's shape, and reports a ``decimals`` out of bounds)."""
    problems = []
    escrows = data.get("escrows")
    for name, escrow in escrows.items() if isinstance(escrows, dict) else []:
        if not isinstance(escrow, dict) or not isinstance(escrow.get("limit"), str):
            continue
        decimals = escrow.get("decimals", Escrow.decimals)
        places = len(escrow["limit"].partition(".")[2])
        valid = isinstance(decimals, int) and 0 <= decimals <= MAX_ESCROW_DECIMALS
        if valid and decimals < places <= MAX_ESCROW_DECIMALS:  # more: the schema says
            message = (
                f"limit {escrow['limit']} has {places} decimals, more than the escrow's "
                f"decimals ({decimals})"
            )
            problems.append(doc.problem(("escrows", name, "limit"), message))
    return problems


def _missing_secret_problem(
    file: str, variable: str, targets: list[Target], empty: bool
) -> Problem:
    state = "is set but empty" if empty else "is not set"
    noun = "target" if len(targets) == 1 else "targets"
    needed = ", ".join(repr(target.name) for target in targets)
    message = f"environment variable {variable} {state} (needed by {noun} {needed})"
    first = targets[0]
    return Problem(file, 0, 0, message, f"targets.{first.name}.{first.secret_field}")
