"""The running gatekeeper: the live ruleset, ingest, hot reload, clock ticks, delivery.

``Daemon`` owns the in-memory mirror of the current facts and rule states and the one
write path into the store. Every change (a fact batch, a ruleset going live, the clock
making a time-dependent rule true) is planned by the pure ``Engine``, committed by the store
in one transaction, and only then applied in memory; a failed commit changes nothing.

Reloads are all-or-nothing: the whole rules directory (and ``gatekeeper.yaml``) is
validated; if anything is wrong the last good ruleset stays active and the problems are
logged and shown by ``GET /v1/rules``. Every ruleset that goes live is stored,
content-addressed, so a daemon restarted on a broken rules directory keeps running the last
good ruleset from its database (and says so loudly).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import watchfiles

from gatekeeper.clock import Clock, SystemClock, format_rfc3339
from gatekeeper.config import Config, ConfigError, Target, load_config, resolve_secrets
from gatekeeper.delivery import Dispatcher
from gatekeeper.engine import Engine, FactInput, FactTable, RuleState, Transition
from gatekeeper.loader import LoadResult, load_rule_texts, load_rules_dir
from gatekeeper.problems import Problem
from gatekeeper.rules import Rule, Ruleset
from gatekeeper.store import SqliteStore

log = logging.getLogger("gatekeeper.daemon")


class StartupError(Exception):
    """The daemon cannot start; the message says why (never a secret's value)."""


@dataclass
class ReloadStatus:
    """The outcome of the last reload attempt, for ``GET /v1/rules`` and the log."""

    ok: bool = True
    problems: list[Problem] = field(default_factory=list)
    attempted_at: str | None = None
    active_since: str | None = None
    source: str = "rules directory"

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": [p.to_json() for p in self.problems],
            "attempted_at": self.attempted_at,
            "active_since": self.active_since,
            "source": self.source,
        }


class Daemon:
    """gatekeeper's runtime. ``start()`` it, use ``ingest``, ``stop()`` it.

    ``environ`` supplies target secrets (``secret_env``); ``clock`` is injectable for tests.
    ``tick_s`` is how often time-dependent rules are re-evaluated without a new fact.
    """

    def __init__(
        self,
        config: Config,
        environ: Mapping[str, str],
        *,
        clock: Clock | None = None,
        tick_s: float = 1.0,
        watch: bool = True,
    ) -> None:
        self.config = config
        self.environ = dict(environ)
        self.clock: Clock = clock or SystemClock()
        self.tick_s = tick_s
        self.watch = watch
        self.store = SqliteStore(config.database)
        self.facts = FactTable()
        self.states: dict[str, RuleState] = {}
        self.engine: Engine | None = None
        self.reload_status = ReloadStatus()
        self.secrets: dict[str, str] = {}
        self.dispatcher = Dispatcher(
            self.store, lambda: self.config.targets, lambda: self.secrets, self.clock
        )
        self._write_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_watching = asyncio.Event()

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, load state and the ruleset, start delivery, watching and ticks.

        Raises ``StartupError`` when a secret is missing or no usable ruleset exists.
        """
        try:
            self.secrets = resolve_secrets(self.config, self.environ)
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
        await self.store.open()
        self.facts = FactTable(await self.store.load_facts())
        self.states = await self.store.load_rule_states()
        await self._load_initial_ruleset()
        self._tasks.append(asyncio.create_task(self.dispatcher.run(), name="dispatcher"))
        self._tasks.append(asyncio.create_task(self._tick_forever(), name="clock-ticks"))
        if self.watch:
            self._tasks.append(asyncio.create_task(self._watch_forever(), name="watcher"))

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop watching and ticking, let deliveries in progress finish, close the store."""
        self._stop_watching.set()
        await self.dispatcher.stop(grace_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        async with self._write_lock:
            await self.store.close()

    async def _load_initial_ruleset(self) -> None:
        result = load_rules_dir(self.config.rules_dir, self.config)
        if result.ruleset is not None:
            await self._activate(result.ruleset, trigger_source="rules directory")
            return
        self._report_refused(result)
        stored = await self.store.last_ruleset()
        if stored is None:
            raise StartupError(
                f"the rules in {self.config.rules_dir} are invalid and the database holds no "
                "earlier ruleset to fall back on:\n" + "\n".join(str(p) for p in result.problems)
            )
        fallback = load_rule_texts(stored.files, self.config, stored.git_commit)
        if fallback.ruleset is None:
            raise StartupError(
                f"the rules in {self.config.rules_dir} are invalid, and so is the last good "
                f"ruleset {stored.version[:12]} against the current config:\n"
                + "\n".join(str(p) for p in fallback.problems)
            )
        log.error(
            "RUNNING THE LAST GOOD RULESET %s (activated %s) FROM THE DATABASE: the rules "
            "directory %s is invalid; fix it and gatekeeper reloads it",
            stored.version[:12],
            stored.last_activated_at,
            self.config.rules_dir,
        )
        await self._activate(fallback.ruleset, trigger_source="database (last good ruleset)")
        self.reload_status.ok = False
        self.reload_status.problems = list(result.problems)

    # -- ingest -------------------------------------------------------------------------

    async def ingest(self, batch: list[FactInput], request_id: str | None = None) -> list[int]:
        """Apply a batch of facts atomically; return their sequence numbers once committed."""
        async with self._write_lock:
            engine = self._engine()
            transition = engine.plan_ingest(self.facts, self.states, batch, self.clock.now())
            transition.request_id = request_id
            seqs = await self.store.commit_transition(transition)
            self._apply(transition)
        for decision in transition.fired:
            log.info("rule fired: %s (%s)", decision.rule_id, decision.firing_id)
        return seqs

    def _apply(self, transition: Transition) -> None:
        for fact in transition.facts:
            self.facts.put(fact.key, fact.data)
        self.states.update(transition.rule_states)
        if transition.actions:
            self.dispatcher.wake()

    def _engine(self) -> Engine:
        if self.engine is None:
            raise RuntimeError("the daemon has not started")
        return self.engine

    # -- rulesets -------------------------------------------------------------------------

    async def _activate(self, ruleset: Ruleset, trigger_source: str) -> None:
        """Make ``ruleset`` live: store it and evaluate new and changed rules at once."""
        async with self._write_lock:
            engine = Engine(ruleset)
            changed = [
                rule
                for rule in ruleset.rules
                if self.states.get(rule.id, RuleState(rule.id)).rule_hash != rule.content_hash
            ]
            transition = engine.plan_rules(
                self.facts, self.states, changed, self.clock.now(), "reload"
            )
            transition.ruleset = ruleset
            await self.store.commit_transition(transition)
            self._apply(transition)
            previous = self.engine
            self.engine = engine
        now = format_rfc3339(self.clock.now())
        self.reload_status = ReloadStatus(
            ok=True, attempted_at=now, active_since=now, source=trigger_source
        )
        log.info(
            "ruleset %s loaded from %s: %d rules (%d new or changed)%s",
            ruleset.version[:12],
            trigger_source,
            len(ruleset.rules),
            len(changed),
            "" if previous is None else f", replacing {previous.ruleset.version[:12]}",
        )
        for decision in transition.fired:
            log.info("rule fired: %s (%s)", decision.rule_id, decision.firing_id)

    async def reload(self) -> bool:
        """Re-read ``gatekeeper.yaml`` (when there is one) and the rules directory.

        All-or-nothing: returns False, keeping the active ruleset and config, when anything
        is invalid; the problems are in ``reload_status``.
        """
        config = self.config
        if config.path is not None:
            try:
                config = load_config(config.path)
                secrets = resolve_secrets(config, self.environ)
            except ConfigError as exc:
                self._report_refused_problems(exc.problems)
                return False
            if (config.database, config.listen_host, config.listen_port) != (
                self.config.database,
                self.config.listen_host,
                self.config.listen_port,
            ):
                log.warning("listen and database changes in the config take effect on restart")
                config = _keep_listen_and_database(config, self.config)
        else:
            secrets = self.secrets
        result = load_rules_dir(config.rules_dir, config)
        if result.ruleset is None:
            self._report_refused(result)
            return False
        self.config = config
        self.secrets = secrets
        if self.engine is not None and self.engine.ruleset.version == result.ruleset.version:
            now = format_rfc3339(self.clock.now())
            self.reload_status = ReloadStatus(
                ok=True,
                attempted_at=now,
                active_since=self.reload_status.active_since,
                source="rules directory",
            )
            log.info("ruleset %s unchanged", result.ruleset.version[:12])
            return True
        await self._activate(result.ruleset, trigger_source="rules directory")
        return True

    def _report_refused(self, result: LoadResult) -> None:
        self._report_refused_problems(list(result.problems))

    def _report_refused_problems(self, problems: list[Problem]) -> None:
        now = format_rfc3339(self.clock.now())
        self.reload_status.ok = False
        self.reload_status.problems = problems
        self.reload_status.attempted_at = now
        log.error(
            "ruleset refused, %d problem(s); the last good ruleset stays active",
            len(problems),
        )
        for problem in problems:
            log.error("  %s", problem)

    async def _watch_forever(self) -> None:
        paths = [self.config.rules_dir]
        if self.config.path is not None:
            paths.append(self.config.path)
        async for _changes in watchfiles.awatch(
            *paths, stop_event=self._stop_watching, debounce=200, step=50, recursive=True
        ):
            try:
                await self.reload()
            except Exception:
                log.exception("reload failed; the last good ruleset stays active")

    # -- time ---------------------------------------------------------------------------

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                await self.tick()
            except Exception:
                log.exception("evaluating time-dependent rules failed; retrying next tick")

    async def tick(self) -> Transition:
        """Re-evaluate time-dependent rules (those calling days_since, now, ...)."""
        async with self._write_lock:
            engine = self._engine()
            transition = engine.plan_rules(
                self.facts,
                self.states,
                engine.time_dependent,
                self.clock.now(),
                "time",
                record_unchanged=False,
            )
            if transition.decisions:
                await self.store.commit_transition(transition)
                self._apply(transition)
        for decision in transition.fired:
            log.info("rule fired: %s (%s) as time passed", decision.rule_id, decision.firing_id)
        return transition

    # -- views ----------------------------------------------------------------------------

    def rule_view(self, rule: Rule, *, explain: bool) -> dict[str, Any]:
        """A rule as ``GET /v1/rules`` shows it; with ``explain`` its current explanation."""
        state = self.states.get(rule.id)
        view: dict[str, Any] = {
            "id": rule.id,
            "project": rule.project,
            "description": rule.description,
            "when": rule.condition.text.strip(),
            "fire": rule.fire,
            "file": rule.file,
            "line": rule.line,
            "content_hash": rule.content_hash,
            "actions": [{a.kind: {"target": a.target}} for a in rule.actions],
            "fired_count": state.fired_count if state else 0,
            "last_fired_at": state.last_fired_at if state else None,
            "gate_open": state.gate_open if state else None,
        }
        if explain:
            view["source"] = dict(rule.source)
            view["explanation"] = self._engine().explain(rule, self.facts, state, self.clock.now())
        return view

    @property
    def targets(self) -> Mapping[str, Target]:
        return self.config.targets


def _keep_listen_and_database(new: Config, old: Config) -> Config:
    from dataclasses import replace

    return replace(
        new,
        database=old.database,
        listen_host=old.listen_host,
        listen_port=old.listen_port,
    )
