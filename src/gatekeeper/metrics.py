"""Operational metrics in the Prometheus text format (``GET /metrics``), via prometheus-client.

Each ``Metrics`` owns its own ``CollectorRegistry`` (not the process-wide default), so
several daemons in one process (the tests) do not collide. Counters and histograms are
updated where things happen (cheap, no database access); the gauges that describe the
store (outbox depth, dead letters, escrows) and the deadline schedule are refreshed at
scrape time by ``refresh``, which the HTTP layer calls with plain values before rendering
(this module imports no other part of gatekeeper).

Label values are bounded: targets and escrows come from ``gatekeeper.yaml``, rule ids from
the ruleset, outcomes and results from fixed sets; never a fact id, a request id or a
secret. The item of a firing of a per-item rule, whose ids are unbounded, is never a label:
it rides as an OpenMetrics exemplar on ``gatekeeper_decisions_total`` (outcome fired or
blocked), which only the OpenMetrics exposition shows (``render(openmetrics=True)``, for a
scraper that asks for it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

EVALUATION_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
DELIVERY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The classic Prometheus text format, which every scraper reads."""
OPENMETRICS_CONTENT_TYPE: str = openmetrics.CONTENT_TYPE_LATEST
"""The OpenMetrics text format (with exemplars), for a scraper whose ``Accept`` asks for it."""
MAX_EXEMPLAR_CHARS = 128
"""OpenMetrics' bound on an exemplar's label names and values together, in characters."""
LAG_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class Metrics:
    """Every gatekeeper metric, registered in ``self.registry``."""

    def __init__(self) -> None:
        self.changes = 0
        """A plain count of what a status page may want to show anew: bumped by every
        committed transition (``changed``), delivery attempt and ruleset that went live.
        Not exported; pages poll it to know whether to render again."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.facts_accepted = Counter(
            "gatekeeper_facts_accepted", "Facts accepted and committed.", registry=r
        )
        self.facts_rejected = Counter(
            "gatekeeper_facts_rejected",
            "Fact requests refused, by reason (malformed, too_large, unsupported_media_type, "
            "invalid, ...).",
            ["reason"],
            registry=r,
        )
        self.evaluations = Counter(
            "gatekeeper_evaluations",
            "Rule evaluations recorded as decisions, by trigger "
            "(fact, reload, time, approval, admin).",
            ["trigger"],
            registry=r,
        )
        self.evaluation_seconds = Histogram(
            "gatekeeper_evaluation_seconds",
            "Time to plan one transition (evaluate the rules it touches), by trigger.",
            ["trigger"],
            buckets=EVALUATION_BUCKETS_S,
            registry=r,
        )
        self.decisions = Counter(
            "gatekeeper_decisions",
            "Committed decisions, by outcome (fired, blocked, paused, not_met, ...).",
            ["outcome"],
            registry=r,
        )
        self.actions = Counter(
            "gatekeeper_actions",
            "Actions by target and status: queued (committed to the outbox), delivered, dead.",
            ["target", "status"],
            registry=r,
        )
        self.shadowed_actions = Counter(
            "gatekeeper_shadowed_actions",
            "Actions queued by firings in shadow (mode: shadow, or a money rule awaiting "
            "sign-off), stored with status shadowed and never sent, by rule id and action kind "
            "(release, notify, pipeline, set_fact).",
            ["rule_id", "kind"],
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "gatekeeper_delivery_seconds",
            "Latency of one delivery attempt (request to answer or error), by target.",
            ["target"],
            buckets=DELIVERY_BUCKETS_S,
            registry=r,
        )
        self.delivery_attempts = Counter(
            "gatekeeper_delivery_attempts",
            "Delivery attempts by target and result (2xx, 3xx, 4xx, 5xx, error: no answer).",
            ["target", "result"],
            registry=r,
        )
        self.delivery_claims = Counter(
            "gatekeeper_delivery_claims",
            "Actions this daemon claimed to deliver (with a lease, from the shared outbox).",
            registry=r,
        )
        self.delivery_leases_expired = Counter(
            "gatekeeper_delivery_lease_expired",
            "Claims that took an action over from another daemon whose lease on it ran out "
            "(it died or stalled mid-delivery).",
            registry=r,
        )
        self.commits_behind = Counter(
            "gatekeeper_commits_behind",
            "Deciding writes the shared database refused because this daemon's memory was "
            "behind it (another daemon decided meanwhile): each one caught up and planned "
            "again.",
            registry=r,
        )
        self.catch_ups = Counter(
            "gatekeeper_catch_ups",
            "Times this daemon brought its memory up to the shared database's latest "
            "committed state, by how: incremental (what was committed since), or reload "
            "(the whole state read again: a database found older than memory).",
            ["how"],
            registry=r,
        )
        self.catch_up_seconds = Histogram(
            "gatekeeper_catch_up_seconds",
            "How long bringing memory up to the shared database took (reading what changed "
            "and applying it), when something had changed.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.daemon_info = Gauge(
            "gatekeeper_daemon_info",
            "This daemon: 1, labelled with its daemon_id (unique among the daemons sharing "
            "its database).",
            ["daemon_id"],
            registry=r,
        )
        self.outbox_pending = Gauge(
            "gatekeeper_outbox_pending",
            "Actions in the outbox not yet delivered (pending, retries included).",
            registry=r,
        )
        self.dead_letters = Gauge(
            "gatekeeper_dead_letters",
            "Actions that are dead letters (until requeued).",
            registry=r,
        )
        self.escrow_released = Gauge(
            "gatekeeper_escrow_released",
            "Amount released (delivered) from each escrow, in the escrow's currency units, "
            "as a float: for dashboards only; the exact decimal is in GET /v1/escrows.",
            ["escrow"],
            registry=r,
        )
        self.escrow_remaining = Gauge(
            "gatekeeper_escrow_remaining",
            "Amount left in each escrow (limit minus pending, delivered and unconfirmed "
            "releases), in the escrow's currency units, as a float: for dashboards only.",
            ["escrow"],
            registry=r,
        )
        self.ruleset_reloads = Counter(
            "gatekeeper_ruleset_reloads",
            "Ruleset load attempts, by result (success, failure); the initial load counts.",
            ["result"],
            registry=r,
        )
        self.ruleset_last_success = Gauge(
            "gatekeeper_ruleset_last_success_timestamp_seconds",
            "Unix time of the last successful ruleset load or reload.",
            registry=r,
        )
        self.ruleset_info = Gauge(
            "gatekeeper_ruleset_info",
            "The active ruleset: 1, labelled with its version (content hash).",
            ["version"],
            registry=r,
        )
        self.deadlines_pending = Gauge(
            "gatekeeper_deadlines_pending",
            "Time-dependent rules scheduled for evaluation at a future instant.",
            registry=r,
        )
        self.deadline_lag_seconds = Histogram(
            "gatekeeper_deadline_lag_seconds",
            "Delay between a deadline's due time and its evaluation (per deadline pass: the "
            "earliest rule due in it).",
            buckets=LAG_BUCKETS_S,
            registry=r,
        )
        for result in ("success", "failure"):
            self.ruleset_reloads.labels(result=result)

    # -- calls from the code that does the work -------------------------------------------

    def fact_rejected(self, reason: str) -> None:
        """A fact request was refused (the server: 400 ``malformed``, 413 ``too_large``,
        415 ``unsupported_media_type``, 422 ``invalid``). Keep ``reason`` to a fixed set."""
        self.facts_rejected.labels(reason=reason).inc()

    def ruleset_loaded(self, version: str, timestamp_s: float) -> None:
        """A ruleset load or reload succeeded (``version`` is now, or still, active)."""
        self.changes += 1
        self.ruleset_reloads.labels(result="success").inc()
        self.ruleset_last_success.set(timestamp_s)
        self.ruleset_info.clear()
        self.ruleset_info.labels(version=version).set(1)

    def changed(self) -> None:
        """Something a status page shows changed (see ``changes``)."""
        self.changes += 1

    def ruleset_refused(self) -> None:
        self.ruleset_reloads.labels(result="failure").inc()

    def attempt(self, target: str, status_code: int | None, latency_s: float) -> None:
        """One delivery attempt to ``target``: its HTTP status (None: no answer)."""
        result = "error" if status_code is None else f"{status_code // 100}xx"
        self.changes += 1
        self.delivery_attempts.labels(target=target, result=result).inc()
        self.delivery_seconds.labels(target=target).observe(latency_s)

    # -- scrape time ----------------------------------------------------------------------

    def refresh(
        self,
        *,
        deadlines_pending: int,
        action_counts: Mapping[str, int],
        escrows: Iterable[tuple[str, Decimal, Decimal | None]],
    ) -> None:
        """Set the scrape-time gauges from plain values.

        ``action_counts`` maps an outbox status (``pending``, ``dead``, ...) to its number of
        actions; ``escrows`` gives ``(escrow, released, remaining)`` per escrow, amounts as
        ``Decimal`` (``remaining`` None where the escrow has no configured limit).
        """
        self.deadlines_pending.set(deadlines_pending)
        self.outbox_pending.set(action_counts.get("pending", 0))
        self.dead_letters.set(action_counts.get("dead", 0))
        for escrow, released, remaining in escrows:
            self.escrow_released.labels(escrow=escrow).set(float(released))
            if remaining is not None:
                self.escrow_remaining.labels(escrow=escrow).set(float(remaining))

    def render(self, *, openmetrics_format: bool = False) -> bytes:
        """The registry in the Prometheus text format, or (``openmetrics_format``) in the
        OpenMetrics text format, which also shows the exemplars."""
        if openmetrics_format:
            return bytes(openmetrics.generate_latest(self.registry))  # type: ignore[no-untyped-call]
        return generate_latest(self.registry)


def exemplar(**labels: str) -> dict[str, str] | None:
    """Exemplar labels (e.g. ``rule_id`` and ``item``) within OpenMetrics' bound of
    ``MAX_EXEMPLAR_CHARS`` characters for names and values together: the first labels that
    fit, in the order given, or None when not even the first one fits (a value is never
    cut: a cut item id would name another item)."""
    kept: dict[str, str] = {}
    used = 0
    for name, value in labels.items():
        size = len(name) + len(value)
        if used + size > MAX_EXEMPLAR_CHARS:
            break
        kept[name] = value
        used += size
    return kept or None
