"""The ruleset manager: loads, activates, reloads and watches the rules and the config.

Reloads are all-or-nothing, like Prometheus' rules manager: the whole rules directory (and
``gatekeeper.yaml``) is validated; if anything is wrong the last good ruleset and config
stay active, the problems are logged and kept in ``status`` (``GET /v1/rules`` shows them).
Every ruleset that goes live is stored, content-addressed, so a daemon restarted on a broken
rules directory keeps running the last good ruleset from its database (and says so loudly).

The manager only loads and swaps: going live is a write like any other (planned by the
engine, committed, then applied) done through the ``Writer`` under its lock.

One active ruleset for every daemon of a database. The database records which version is
active (the last activated: ``RulesetReads.active_ruleset_version``); on a database several
daemons share (PostgreSQL, ``Store.shared``) each daemon decides with that version:

- Each daemon watches its own rules directory. When the directory's content changes and
  yields a valid ruleset other than the active one, the daemon activates it: the usual
  transition (the new and changed rules evaluated, the activation recorded), whose
  transaction also sends ``NOTIFY gatekeeper_ruleset, '<version>'`` (sent on commit only).
  The latest activation wins: two daemons activating at once end on the one committed last.
- Every daemon listens on ``gatekeeper_ruleset`` (``Store.ruleset_changes``), and checks
  the active version every ``ruleset_check_s`` seconds (default 5) as well, in case a
  notification was lost (the listening connection down). When the active version is not
  its own, it adopts it: reads its files FROM THE DATABASE (``get_ruleset``), loads them
  against its own config (``load_rule_texts``) and swaps engines as a reload does, without
  writing anything: the activating daemon has evaluated and recorded it; the adopting one
  reloads the committed state (facts, rule states, approvals, escrow totals) so it sees what
  that evaluation decided, and its clock ticks treat the new and changed rules as due. A
  version its config refuses stays unadopted (logged once, in ``status``): that daemon's
  decisions are refused (below) until its config is fixed.
- A directory that has not changed does not activate again: a reload of the config alone
  (``gatekeeper.yaml`` changed) reloads the active ruleset's files with the new config. So a
  daemon that adopted another's version goes on with it, whatever its own directory holds,
  until its directory changes.
- At start, the directory goes live unless it holds a version the database has activated
  before and another is active now: a stale checkout (a daemon restarted on an older
  directory) then adopts the active version, and says so. A directory never activated
  before (a deployment) is activated. An invalid directory: the active version, as on
  SQLite. To go back to an earlier version, change a running daemon's directory to it.

An activation is a deciding write like any other: planned on the latest committed state
(checked against the database's state version, caught up and planned again when another
daemon decided meanwhile, see ``gatekeeper.runtime.ingest``).

Every switch is logged with the version and its source (``rules directory``, ``database
(activated by another daemon)``); ``GET /v1/rules`` shows the version and the source.

No decision with a replaced ruleset: on a shared database every commit of the writer names
the version that planned it (``commit_transitions(planned_with=...)``); its transaction
reads the active version ``FOR SHARE`` first (an activation committing meanwhile waits for
it, and it for an activation in progress) and is refused (``RulesetChanged``, nothing
written) when another is active. The writer then adopts the active version at once
(``follow_active``) and plans a fact batch again with it; a refused approval, admin act or
clock tick fails (the caller or the next tick tries again). Left as it is: an activation
(``activate``, the directory or the config changed) is not checked, it wins, even over an
activation committed by another daemon while it was being planned.
On SQLite (one daemon per file) nothing is announced or followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import watchfiles

from gatekeeper.clock import Clock, format_rfc3339
from gatekeeper.config import (
    Config,
    ConfigError,
    load_config,
    resolve_hook_secrets,
    resolve_secrets,
)
from gatekeeper.engine.evaluate import Engine, releases_from
from gatekeeper.engine.ledger import EscrowBook
from gatekeeper.engine.model import RuleState, Transition
from gatekeeper.metrics import Metrics
from gatekeeper.problems import Problem
from gatekeeper.rules.loader import LoadResult, RuleFileCache, load_rule_texts, load_rules_dir
from gatekeeper.rules.model import Rule, Ruleset
from gatekeeper.runtime.hooks import hook_problems
from gatekeeper.runtime.ingest import Writer, log_firings
from gatekeeper.runtime.ticker import Ticker
from gatekeeper.store.errors import StoreError
from gatekeeper.store.records import StateFence

log = logging.getLogger("gatekeeper.runtime.rulesets")

FREEZE_AT_RULES = 1000
"""From this many rules, objects alive when a ruleset goes live are frozen (see
``freeze_long_lived``)."""


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


class Rulesets:
    """The live config, its secrets, and the ruleset going live through ``writer``.

    ``environ`` supplies target and hook secrets (``secret_env``); ``new_action_id`` is
    given to each engine built (see ``Engine``).
    """

    def __init__(
        self,
        config: Config,
        environ: Mapping[str, str],
        writer: Writer,
        ticker: Ticker,
        clock: Clock,
        metrics: Metrics,
        new_action_id: Callable[[], str],
    ) -> None:
        self.config = config
        self.environ = dict(environ)
        self.writer = writer
        self.ticker = ticker
        self.clock = clock
        self.metrics = metrics
        self.new_action_id = new_action_id
        self.secrets: dict[str, str] = {}
        self.hook_secrets: dict[str, str] = {}
        self.status = ReloadStatus()
        self.rule_cache = RuleFileCache()
        """Checked rule files by content hash: a reload parses and checks only what changed."""
        self._stop_watching = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._folder_version: str | None = None
        """The version the rules directory yielded at its last valid load."""
        self._unadoptable: str | None = None
        """The active version last found invalid against this daemon's config (logged once)."""
        writer.adopt_active = functools.partial(self.follow_active, locked=True)

    def resolve_secrets(self) -> None:
        """Read the config's target and hook secrets from ``environ`` and check the hook
        mappings; ``StartupError`` naming what is missing or broken (never a value)."""
        try:
            self.secrets = resolve_secrets(self.config, self.environ)
            self.hook_secrets = resolve_hook_secrets(self.config, self.environ)
            check_hooks(self.config)
        except ConfigError as exc:
            raise StartupError(str(exc)) from None

    async def load_initial(self) -> None:
        """Make the rules directory live, or when it is invalid the last good ruleset stored
        in the database (``status`` then says why). ``StartupError`` when neither is usable.
        """
        config = self.config
        result = load_rules_dir(config.rules_dir, config, self.rule_cache)
        if result.ruleset is not None:
            self._folder_version = result.ruleset.version
            if not await self._folder_is_stale(result.ruleset.version):
                await self.activate(result.ruleset, trigger_source="rules directory")
                return
            if await self.follow_active():
                return
            await self.activate(result.ruleset, trigger_source="rules directory")
            return
        self._report_refused(result)
        stored = await self.writer.store.last_ruleset()
        if stored is None:
            raise StartupError(
                f"the rules in {config.rules_dir} are invalid and the database holds no "
                "earlier ruleset to fall back on:\n" + "\n".join(str(p) for p in result.problems)
            )
        fallback = load_rule_texts(stored.files, config, stored.git_commit)
        if fallback.ruleset is None:
            raise StartupError(
                f"the rules in {config.rules_dir} are invalid, and so is the last good "
                f"ruleset {stored.version[:12]} against the current config:\n"
                + "\n".join(str(p) for p in fallback.problems)
            )
        log.error(
            "RUNNING THE LAST GOOD RULESET %s (activated %s) FROM THE DATABASE: the rules "
            "directory %s is invalid; fix it and gatekeeper reloads it",
            stored.version[:12],
            format_rfc3339(stored.last_activated_at),
            config.rules_dir,
        )
        await self.activate(fallback.ruleset, trigger_source="database (last good ruleset)")
        self.status.ok = False
        self.status.problems = list(result.problems)

    async def _folder_is_stale(self, version: str) -> bool:
        """Whether the rules directory's ``version`` was activated before and another is
        active now, on a shared database (a daemon restarted on an older checkout)."""
        store = self.writer.store
        if not store.shared:
            return False
        active = await store.active_ruleset_version()
        if active is None or active == version or await store.get_ruleset(version) is None:
            return False
        log.warning(
            "the rules directory %s holds ruleset %s, activated before and since replaced by "
            "%s, active in the database: adopting %s (change the rules directory to activate "
            "its version again)",
            self.config.rules_dir,
            version[:12],
            active[:12],
            active[:12],
        )
        return True

    async def activate(
        self,
        ruleset: Ruleset,
        trigger_source: str,
        config: Config | None = None,
        secrets: dict[str, str] | None = None,
    ) -> None:
        """Make ``ruleset`` (with ``config`` and its ``secrets``, when given) live: store it
        and evaluate, at once, the rules that are new, changed, or were not in the previous
        ruleset (a rule removed and put back may have missed facts meanwhile), and the rules
        releasing from an escrow whose limit or currency ``config`` changes. The blocked
        instances of those rules (a release refused, the gate still open) try their release
        again: they fire if it now fits (``Engine.plan_instances``, ``retry``).

        All or nothing: if the commit fails (the store's error is raised), the previous
        ruleset, config and secrets stay.
        """
        config = config or self.config
        writer = self.writer
        async with writer.lock:
            engine = Engine.for_config(
                ruleset, config, new_action_id=self.new_action_id, signed=writer.signed
            )
            escrows = changed_escrows(self.config, config)

            async def plan_and_commit(
                fence: StateFence | None,
            ) -> tuple[Transition, EscrowBook, list[Rule]]:
                book = EscrowBook(config.escrows, writer.book.committed)
                changed = changed_rules(ruleset, writer.engine, writer.states, escrows)
                t0 = time.perf_counter()
                transition = engine.plan_rules(
                    writer.facts,
                    writer.states,
                    changed,
                    self.clock.now(),
                    "reload",
                    book=book.copy(),
                    approvals=writer.approvals,
                    record_first=False,  # a rule over 100,000 items: states, not decisions
                    retry={rule.id for rule in changed if releases_from(rule, escrows)},
                )
                writer.counters.planned("reload", t0, len(changed))
                transition.ruleset = ruleset
                if fence is None:  # one daemon per database: nothing to check
                    await writer.store.commit_transition(transition)
                else:  # planned on the latest committed state: checked
                    await writer.store.commit_transitions([transition], fence=fence)
                return transition, book, changed

            transition, book, changed = await writer.checked(plan_and_commit)
            self.config = config
            self.secrets = secrets if secrets is not None else self.secrets
            writer.book = book
            writer.apply(transition)
            previous = writer.engine
            writer.engine = engine
            self.ticker.activated(engine, previous, changed, writer.facts)
        self._went_live(ruleset, trigger_source, previous, changed)
        log_firings(transition)

    async def follow_active(self, *, locked: bool = False) -> bool:
        """Adopt the database's active ruleset when this daemon decides with another (see
        the module): load its stored files against the live config and swap engines,
        writing nothing (``locked``: the caller holds the writer's lock). Returns whether
        it was adopted; False when it is this daemon's already, or invalid against the
        config (logged once per version, kept in ``status``). Raises what the store
        raises (the previous ruleset stays then)."""
        store = self.writer.store
        version = await store.active_ruleset_version()
        engine = self.writer.engine
        if version is None or (engine is not None and engine.ruleset.version == version):
            return False
        if version == self._unadoptable:
            return False
        stored = await store.get_ruleset(version)
        if stored is None:
            return False
        result = await asyncio.to_thread(
            load_rule_texts, stored.files, self.config, stored.git_commit, self.rule_cache
        )
        if result.ruleset is None:
            self._unadoptable = version
            log.error(
                "ruleset %s, active in the database, is invalid against this daemon's config; "
                "it cannot decide until the config is fixed",
                version[:12],
            )
            self._report_refused(result)
            return False
        if locked:
            await self._adopt(result.ruleset)
        else:
            async with self.writer.lock:
                await self._adopt(result.ruleset)
        return True

    async def _adopt(self, ruleset: Ruleset) -> None:
        """With the writer's lock held: make ``ruleset``, activated and evaluated by another
        daemon, live here: reload the committed state (what its activation decided), swap
        engines; nothing is written."""
        writer = self.writer
        previous = writer.engine
        if previous is not None and previous.ruleset.version == ruleset.version:
            return  # adopted meanwhile
        engine = Engine.for_config(
            ruleset, self.config, new_action_id=self.new_action_id, signed=writer.signed
        )
        changed = changed_rules(ruleset, previous, writer.states, set())
        await writer.load_state()
        writer.engine = engine
        self.ticker.activated(engine, previous, changed, writer.facts)
        self._went_live(ruleset, "database (activated by another daemon)", previous, changed)

    def _went_live(
        self, ruleset: Ruleset, trigger_source: str, previous: Engine | None, changed: list[Rule]
    ) -> None:
        """Status, metrics and log of ``ruleset`` gone live."""
        freeze_long_lived(ruleset)
        now = format_rfc3339(self.clock.now())
        self.status = ReloadStatus(
            ok=True, attempted_at=now, active_since=now, source=trigger_source
        )
        self.metrics.ruleset_loaded(ruleset.version, self.clock.now().timestamp())
        log.info(
            "ruleset %s loaded from %s: %d rules (%d new or changed)%s",
            ruleset.version[:12],
            trigger_source,
            len(ruleset.rules),
            len(changed),
            "" if previous is None else f", replacing {previous.ruleset.version[:12]}",
            extra={
                "ruleset_version": ruleset.version,
                "git_commit": ruleset.git_commit,
                "source": trigger_source,
                "rules": len(ruleset.rules),
                "changed": len(changed),
            },
        )

    async def reload(self) -> bool:
        """Re-read ``gatekeeper.yaml`` (when there is one) and the rules directory.

        All-or-nothing: returns False, keeping the active ruleset and config, when anything
        is invalid; the problems are in ``status``. The files are read and checked in a
        worker thread, so the event loop keeps serving meanwhile; reloads run one at a time.
        """
        async with self._reload_lock:
            return await self._reload()

    async def _reload(self) -> bool:
        config = self.config
        if config.path is not None:
            try:
                config = await asyncio.to_thread(load_config, config.path)
                secrets = resolve_secrets(config, self.environ)
                hook_secrets = resolve_hook_secrets(config, self.environ)
                check_hooks(config)
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
            secrets, hook_secrets = self.secrets, self.hook_secrets
        result = await asyncio.to_thread(load_rules_dir, config.rules_dir, config, self.rule_cache)
        if result.ruleset is None:
            self._report_refused(result)
            return False
        self._unadoptable = None  # the config may have changed: adopting may work now
        ruleset = result.ruleset
        folder_changed = ruleset.version != self._folder_version
        self._folder_version = ruleset.version
        engine = self.writer.engine
        if (
            self.writer.store.shared
            and not folder_changed
            and engine is not None
            and engine.ruleset.version != ruleset.version
        ):  # the directory did not change: the active ruleset (adopted) stays
            active = engine.ruleset
            result = await asyncio.to_thread(
                load_rule_texts, active.files, config, active.git_commit, self.rule_cache
            )
            if result.ruleset is None:
                self._report_refused(result)
                return False
            ruleset = result.ruleset
        unchanged = engine is not None and engine.ruleset.version == ruleset.version
        self.hook_secrets = hook_secrets  # hooks do not depend on the ruleset
        if unchanged and config == self.config and secrets == self.secrets:
            now = format_rfc3339(self.clock.now())
            self.status = ReloadStatus(
                ok=True,
                attempted_at=now,
                active_since=self.status.active_since,
                source="rules directory",
            )
            self.metrics.ruleset_loaded(ruleset.version, self.clock.now().timestamp())
            log.info(
                "ruleset %s unchanged",
                ruleset.version[:12],
                extra={"ruleset_version": ruleset.version},
            )
            return True
        try:
            await self.activate(ruleset, "rules directory", config, secrets)
        except Exception as exc:
            log.exception("activating the new ruleset failed")
            message = f"activating the ruleset failed ({type(exc).__name__}); nothing changed"
            self._report_refused_problems([Problem(str(config.rules_dir), 0, 0, message)])
            return False
        return True

    def _report_refused(self, result: LoadResult) -> None:
        self._report_refused_problems(list(result.problems))

    def _report_refused_problems(self, problems: list[Problem]) -> None:
        now = format_rfc3339(self.clock.now())
        self.status.ok = False
        self.status.problems = problems
        self.status.attempted_at = now
        self.metrics.ruleset_refused()
        log.error(
            "ruleset refused, %d problem(s); the last good ruleset stays active",
            len(problems),
            extra={"problems": [str(p) for p in problems]},
        )
        for problem in problems:
            log.error("  %s", problem)

    async def watch(self) -> None:
        """The watcher task: reload whenever the rules directory or ``gatekeeper.yaml``
        changes, until ``stop_watching()``."""
        paths = [self.config.rules_dir]
        if self.config.path is not None:
            paths.append(self.config.path)
        async for _changes in watchfiles.awatch(
            *paths, stop_event=self._stop_watching, debounce=200, step=20, recursive=True
        ):
            try:
                await self.reload()
            except Exception:
                log.exception("reload failed; the last good ruleset stays active")

    def stop_watching(self) -> None:
        """End ``watch()`` (at its next look at the files, within ``step`` ms) and
        ``follow()``."""
        self._stop_watching.set()

    async def follow(self) -> None:
        """The follower task on a shared database: adopt the active ruleset
        (``follow_active``) at each announced activation and every ``ruleset_check_s``
        seconds, and bring memory up to what the other daemons committed
        (``Writer.catch_up``: the views of a daemon that is not deciding follow within that
        time), until ``stop_watching()``. Returns at once on a database not shared."""
        if not self.writer.store.shared:
            return
        wake = asyncio.Event()
        listener = asyncio.create_task(self._listen(wake), name="ruleset-listener")
        try:
            while not self._stop_watching.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self.config.ruleset_check_s)
                wake.clear()
                try:
                    async with self._reload_lock:
                        await self.follow_active()
                    async with self.writer.lock:  # an idle daemon's memory follows too
                        await self.writer.catch_up()
                except Exception:
                    log.exception("following the database failed; trying again")
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _listen(self, wake: asyncio.Event) -> None:
        """Set ``wake`` at each activation announced, and when listening stops (a check
        then covers what was missed); listen again ``ruleset_check_s`` later."""
        while True:
            try:
                changes = self.writer.store.ruleset_changes()
                async with contextlib.aclosing(changes):
                    async for version in changes:
                        log.debug("ruleset %s activated", version[:12])
                        wake.set()
                reason = "the connection ended"
            except Exception as exc:  # never stop listening: the connection is made again
                reason = str(exc) if isinstance(exc, StoreError) else type(exc).__name__
            log.warning(
                "listening for ruleset activations stopped (%s); listening again in %s s, "
                "checking the active version meanwhile",
                reason,
                self.config.ruleset_check_s,
            )
            wake.set()  # an activation may have been missed: check now
            await asyncio.sleep(self.config.ruleset_check_s)


def freeze_long_lived(ruleset: Ruleset) -> None:
    """With a large ruleset live, move every object then alive out of the cyclic
    collector's reach (``gc.freeze``): the rules, engine, facts and states are long-lived,
    and a full collection would walk them all again (about 800,000 objects and 1 to 2 s
    with 10,000 rules, a pause that hits a reload or a request). The collection run
    first walks only the objects made since the previous freeze (all of them at start),
    so cyclic garbage left by evaluations is not frozen with them; what a reload replaces
    is freed by reference counting (a reload leaves no cyclic garbage). Small rulesets
    (under ``FREEZE_AT_RULES``) are left alone."""
    if len(ruleset.rules) >= FREEZE_AT_RULES:
        started = time.perf_counter()
        gc.collect()  # walks only what is not frozen yet: what was made since the last time
        gc.freeze()
        log.debug("collected and froze in %.3f s", time.perf_counter() - started)


def changed_rules(
    ruleset: Ruleset,
    previous: Engine | None,
    states: Mapping[tuple[str, str], RuleState],
    escrows: set[str],
) -> list[Rule]:
    """The rules of ``ruleset`` to evaluate at once when it replaces ``previous``'s: new or
    changed ones (content hash), a rule without ``for_each`` whose state was left by another
    version (or has none), and those releasing from one of ``escrows``."""
    previous_rules = previous.rules if previous else {}
    return [
        rule
        for rule in ruleset.rules
        if rule.id not in previous_rules
        or previous_rules[rule.id].content_hash != rule.content_hash
        or (
            rule.for_each is None
            and (
                (state := states.get((rule.id, ""))) is None or state.rule_hash != rule.content_hash
            )
        )
        or releases_from(rule, escrows)
    ]


def check_hooks(config: Config) -> None:
    """Raise ``ConfigError`` when a hook mapping is broken (a malformed ``${path}`` template,
    a reserved fact kind), so it is refused at start or reload, not when an event arrives."""
    problems = hook_problems(config)
    if problems:
        raise ConfigError(problems)


def changed_escrows(old: Config, new: Config) -> set[str]:
    """The escrows whose limit or currency differ between ``old`` and ``new`` (added and
    removed ones included)."""
    names = set(old.escrows) | set(new.escrows)
    return {name for name in names if old.escrows.get(name) != new.escrows.get(name)}


def _keep_listen_and_database(new: Config, old: Config) -> Config:
    return replace(
        new,
        database=old.database,
        listen_host=old.listen_host,
        listen_port=old.listen_port,
    )
