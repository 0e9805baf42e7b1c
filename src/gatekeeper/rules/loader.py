"""Rule files to a validated ``Ruleset``: the only place rule YAML is parsed.

Like Prometheus' ``rulefmt``, loading checks everything and reports every problem, each with
file, line, column, key path and rule id: YAML syntax, the rule schema
(``schemas/rules.schema.json``), every ``when`` expression (``gatekeeper.expr.compile_condition``),
notify message templates, approvals that cannot be met, duplicate rule ids across files, and,
when a ``Config`` is given, the targets and escrows that actions name (an escrow's currency
must match; a single release, or a ``max_amount``, above the escrow's limit could never be
sent; neither may have more decimals than the escrow's precision). A ruleset is
built only when there is no problem at all, so a reload is all-or-nothing.

Hashes (SHA-256, hex):

- ``Rule.content_hash`` is over the rule's canonical JSON (``json.dumps`` with sorted keys,
  compact separators, UTF-8) after defaults are applied: ``description`` ``""``, ``fire``
  ``"once"``, pipeline ``inputs`` ``{}``; ``when`` is stripped of leading and trailing
  whitespace. Writing a default out, reordering keys, changing comments, quoting or block
  style, or moving the rule to another file does not change the hash; any other change to
  what the rule says does (its description included). An absent ``approvals`` stays absent.
  The keys added with per-item rules (``for_each``, approvals' ``standing``, ``expires_after``,
  ``notify``, and ``mode``) enter the canonical form only when they say something
  (``standing: false`` and ``mode: live`` are dropped; ``expires_after`` is in seconds), so
  the rules written before them keep the hashes their databases recorded; set_fact ``data``
  defaults to ``{}``. ``mode: shadow`` is part of the hash: going live (removing it) is a
  change like any other.
- ``Ruleset.version`` is over the canonical JSON of the sorted ``[path, text]`` pairs of
  ``Ruleset.files``, so the same files always give the same version, whether they are read
  from a directory or from stored text.
"""

from __future__ import annotations

import codecs
import contextlib
import difflib
import gc
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar, cast

from gatekeeper.config import Config, Target
from gatekeeper.expr import (
    MAX_EXPRESSION_CHARS,
    Condition,
    ExpressionError,
    ExpressionProblem,
    compile_condition,
)
from gatekeeper.problems import Problem, format_path
from gatekeeper.rules.loops import LoopRule, loop_cycles, loop_message
from gatekeeper.rules.model import (
    FACT_ID,
    FACT_ID_RULE,
    Action,
    Approvals,
    FireMode,
    NotifyAction,
    PackedText,
    PackedTexts,
    PipelineAction,
    ReleaseAction,
    Rule,
    RuleMode,
    Ruleset,
    SetFactAction,
    kept_source,
    pack_data,
    pack_text,
    unpack_text,
)
from gatekeeper.rules.pipelines import pipeline_limit_problems
from gatekeeper.rules.templates import (
    TEMPLATE_FIELDS,
    TemplateScope,
    check_amount_template,
    check_template,
)
from gatekeeper.yamlsource import (
    PathParts,
    YamlDocument,
    parse_document,
    scalar_position,
    schema_problems,
    shorten,
    sorted_problems,
)

RULES_SCHEMA = "rules.schema.json"
RULE_SUFFIXES = (".yaml", ".yml")
TEST_SUFFIXES = (".test.yaml", ".test.yml")
GIT_TIMEOUT_S = 5.0
MAX_RULE_FILE_BYTES = 2 * 1024 * 1024
"""Largest rule file read (2 MiB, about 12,000 rules of five lines): a bigger one is a
problem of that file, found from its size before anything is read. The YAML of a file
without aliases is no bigger than its text, so this also bounds what parsing it takes."""

_ACTION_KINDS = ("release", "notify", "pipeline", "set_fact")
DURATION_UNITS_S = {"m": 60, "h": 3600, "d": 86400}
"""Seconds per unit of an ``expires_after`` duration (``30m``, ``12h``, ``7d``)."""
_GIT_COMMIT = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
_KIND = re.compile(r"[a-z][a-z0-9_]{0,63}")


@dataclass(frozen=True)
class LoadResult:
    """The outcome of loading rule files.

    ``ruleset`` is None exactly when ``problems`` is not empty. ``rule_count`` counts the rule
    mappings found (valid or not), ``file_count`` the rule files read.
    """

    ruleset: Ruleset | None
    problems: tuple[Problem, ...]
    rule_count: int
    file_count: int

    @property
    def ok(self) -> bool:
        """True when the rules are valid (there is a ruleset)."""
        return self.ruleset is not None


def load_rules_dir(
    rules_dir: Path, config: Config | None, cache: RuleFileCache | None = None
) -> LoadResult:
    """Load every rule file below ``rules_dir`` (see ``rule_files``).

    File names in problems and rules are relative to ``rules_dir``, ``/``-separated. The
    ruleset's ``git_commit`` is the HEAD commit when the directory is in a git checkout.
    With a ``cache`` (the daemon keeps one across reloads), a file whose bytes did not change
    since the previous load is neither parsed nor validated nor compiled again; the checks
    that span files or read the config run every time. Never raises for bad input: an
    unreadable or missing directory is a problem.
    """
    if not rules_dir.is_dir():
        return _failed(str(rules_dir), "rules directory does not exist or is not a directory")
    files = {name: os.path.join(rules_dir, name) for name in rule_file_names(rules_dir)}
    sources, problems = _read_files(files, dict.fromkeys(files, rules_dir))
    commit = git_commit_of(rules_dir)
    return _load(sources, problems, config, commit, where=str(rules_dir), cache=cache)


def load_rule_paths(paths: Sequence[Path], config: Config | None) -> LoadResult:
    """Load the rule files ``paths`` name, for ``gatekeeper check PATH...``.

    A directory stands for the rule files below it (see ``rule_files``); a file is read
    whatever its name. File names are as given (made relative to the cwd when possible).
    Never raises for bad input: a path that does not exist is a problem.
    """
    files: dict[str, str | Path] = {}
    roots: dict[str, Path] = {}
    problems: list[Problem] = []
    for path in paths:
        if path.is_dir():
            shown = _display_name(path)
            prefix = "" if shown == "." else shown.rstrip("/") + "/"
            found = rule_file_names(path)
            files.update({prefix + name: os.path.join(path, name) for name in found})
            roots.update(dict.fromkeys((prefix + name for name in found), path))
        elif path.exists():
            files[_display_name(path)] = path
        else:
            problems.append(Problem(_display_name(path), 0, 0, "no such file or directory"))
    sources, read_problems = _read_files(files, roots)
    where = ", ".join(_display_name(path) for path in paths)
    return _load(sources, problems + read_problems, config, None, where=where)


def load_rule_texts(
    files: Mapping[str, str],
    config: Config | None,
    git_commit: str | None = None,
    cache: RuleFileCache | None = None,
) -> LoadResult:
    """Load rules from stored text, ``{relative path: text}`` (e.g. the last good ruleset
    kept in the database); the same checks and the same version as from a directory."""
    sources = {name: (text, _text_digest(text)) for name, text in files.items()}
    return _load(sources, [], config, git_commit, where="the stored ruleset", cache=cache)


def rule_files(folder: Path) -> list[Path]:
    """The rule files below ``folder``, recursively, sorted by relative path.

    Rule files end in ``.yaml`` or ``.yml``; rule unit tests (``*.test.yaml``,
    ``*.test.yml``) and hidden files and folders (``.git`` included) are skipped.
    """
    return [folder / name for name in rule_file_names(folder)]


def rule_file_names(folder: Path) -> list[str]:
    """The names of ``rule_files(folder)`` relative to ``folder``, ``/``-separated, sorted."""
    found: list[str] = []
    root = os.fspath(folder)
    for current, dirs, names in os.walk(root):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        relative = os.path.relpath(current, root)
        prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
        found.extend(prefix + name for name in names if _is_rule_file_name(name))
    return sorted(found)


def git_commit_of(path: Path) -> str | None:
    """The HEAD commit (hex) of the git checkout holding ``path``; None when there is none,
    git is missing, or it does not answer within ``GIT_TIMEOUT_S`` seconds."""
    command = ["git", "-C", str(path), "rev-parse", "HEAD"]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and _GIT_COMMIT.match(commit) else None


def rule_content_hash(rule: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of schema-valid ``rule`` with defaults applied."""
    canonical = json.dumps(
        canonical_rule(rule), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def canonical_rule(rule: Mapping[str, Any]) -> dict[str, Any]:
    """``rule`` with defaults written out (description ``""``, fire ``once``, pipeline inputs
    ``{}``, set_fact data ``{}``) and ``when`` stripped of surrounding whitespace (a ``>``
    block's final newline).

    The keys added later (``for_each``, approvals' ``standing``, ``expires_after`` and
    ``notify``, ``mode``) are the other way round: their defaults are left out (``standing:
    false`` and ``mode: live`` are dropped), so a rule that does not use them has the
    canonical form, and the hash, it always had. ``expires_after`` is written in seconds
    (``7d`` and ``604800`` are the same).
    """
    out = dict(rule)
    if isinstance(out.get("when"), str):
        out["when"] = out["when"].strip()
    out.setdefault("description", "")
    out.setdefault("fire", "once")
    if out.get("mode") == "live":
        del out["mode"]
    out["actions"] = [_canonical_action(action) for action in rule.get("actions", [])]
    approvals = out.get("approvals")
    if isinstance(approvals, dict):
        approvals = dict(approvals)
        if approvals.get("standing") is False:
            del approvals["standing"]
        seconds = duration_seconds(approvals.get("expires_after"))
        if seconds is not None:
            approvals["expires_after"] = seconds
        out["approvals"] = approvals
    return out


def duration_seconds(value: Any) -> int | None:
    """Seconds of a schema-valid ``expires_after`` (a whole number of seconds, or ``30m``,
    ``12h``, ``7d``); None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and len(value) > 1 and value[:-1].isdigit():
        unit = DURATION_UNITS_S.get(value[-1])
        return int(value[:-1]) * unit if unit is not None else None
    return None


_VERSION_CHUNK_CHARS = 1 << 20
"""``ruleset_version`` hashes the JSON of about this many characters of files at a time."""


def ruleset_version(files: Mapping[str, str]) -> str:
    """SHA-256 (hex) of the canonical JSON of the sorted ``[path, text]`` pairs (hashed a
    piece at a time, each piece the pairs of about ``_VERSION_CHUNK_CHARS`` characters of
    files: the JSON of every file at once is never built)."""
    pairs = sorted(files.items())
    digest = hashlib.sha256(b"[")
    start = 0
    while start < len(pairs):
        end, size = start + 1, len(pairs[start][1])
        while end < len(pairs) and size < _VERSION_CHUNK_CHARS:
            size += len(pairs[end][1])
            end += 1
        piece = json.dumps(pairs[start:end], separators=(",", ":"), ensure_ascii=False)[1:-1]
        digest.update((b"," if start else b"") + piece.encode("utf-8"))
        start = end
    digest.update(b"]")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading files


def _is_rule_file_name(name: str) -> bool:
    return (
        not name.startswith(".")
        and name.endswith(RULE_SUFFIXES)
        and not name.endswith(TEST_SUFFIXES)
    )


def _display_name(path: Path) -> str:
    """``path`` as given, or relative to the cwd when it is an absolute path below it."""
    if path.is_absolute():
        try:
            return path.relative_to(Path.cwd()).as_posix()
        except ValueError:
            return path.as_posix()
    return path.as_posix()


def _read_files(
    files: Mapping[str, str | Path], roots: Mapping[str, Path]
) -> tuple[dict[str, _Source], list[Problem]]:
    """{name: (text, SHA-256 hex of the bytes)} of the files that could be read, and a
    problem for each that could not (see ``_read_bytes``). A file found in a rules
    directory (its name is in ``roots``, which gives the directory) that is a symbolic
    link is read only when it leads to a file inside that directory."""
    sources: dict[str, _Source] = {}
    problems: list[Problem] = []
    for name, path in files.items():
        try:
            root = roots.get(name)
            if root is not None and not _resolves_inside(path, root):
                raise _Unreadable("a symbolic link to a file outside the rules directory")
            raw = _read_bytes(path)
            text = raw.decode("utf-8-sig" if raw.startswith(codecs.BOM_UTF8) else "utf-8")
            sources[name] = (text, hashlib.sha256(raw).hexdigest())
        except _Unreadable as error:
            problems.append(Problem(name, 0, 0, f"not read: {error}"))
        except OSError as error:
            reason = error.strerror or str(error)
            problems.append(Problem(name, 0, 0, f"cannot read the file: {reason}"))
        except UnicodeDecodeError as error:
            message = f"not UTF-8 text (bad byte at offset {error.start})"
            problems.append(Problem(name, 0, 0, message))
    return sources, problems


class _Unreadable(Exception):
    """A rule file that is not read at all: not a regular file, too big, a link outside."""


def _resolves_inside(path: str | Path, root: Path) -> bool:
    """True when ``path`` is no symbolic link, or resolves to a place below ``root``."""
    if not os.path.islink(path):
        return True
    return os.path.realpath(path).startswith(os.path.realpath(root).rstrip(os.sep) + os.sep)


def _read_bytes(path: str | Path) -> bytes:
    """The bytes of the regular file at ``path``, at most ``MAX_RULE_FILE_BYTES`` (read with
    ``os.read``: a third of the cost of ``Path.read_bytes`` for small files).

    The file is opened non-blocking (a FIFO cannot hang the reader) only after ``stat``
    says it is a regular file (a device is never opened), and checked again once open.
    Raises ``_Unreadable`` for anything else or a bigger file, ``OSError`` when it cannot
    be read."""
    _check_regular(os.stat(path))
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    try:
        _check_regular(os.fstat(fd))
        chunks = []
        size = 0
        while size <= MAX_RULE_FILE_BYTES and (chunk := os.read(fd, 1 << 20)):
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_RULE_FILE_BYTES:  # it grew after the check
            raise _Unreadable(_too_big(size))
        return b"".join(chunks)
    finally:
        os.close(fd)


def _check_regular(info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise _Unreadable(f"not a regular file ({_file_type(info.st_mode)})")
    if info.st_size > MAX_RULE_FILE_BYTES:
        raise _Unreadable(_too_big(info.st_size))


def _too_big(size: int) -> str:
    return f"{size:,} bytes, over the limit of {MAX_RULE_FILE_BYTES:,} bytes (2 MiB)"


def _file_type(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a directory" if stat.S_ISDIR(mode) else "a special file"


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _failed(file: str, message: str) -> LoadResult:
    return LoadResult(None, (Problem(file, 0, 0, message),), 0, 0)


# ---------------------------------------------------------------------------------------------
# Checking


_Source = tuple[str, str]
"""A rule file's text and the SHA-256 (hex) of its bytes."""


@dataclass(frozen=True, slots=True)
class CheckedRule:
    """A rule mapping of a ``CheckedFile``: where it is (``prefix``: its index in a list of
    rules, or ``()``; ``line``: 1-based), its data, its compiled condition (None when the
    ``when`` is not valid) and, when the file has no problem of its own, the built ``Rule``
    (then the rest is the rule's own: a file keeps only its rules, see ``CheckedFile``)."""

    prefix: PathParts
    data: Mapping[str, Any]
    """The rule's data as written, packed (``model.pack_data``): the rule's ``source``."""
    line: int
    condition: Condition | None
    rule: Rule | None
    rule_id: str | None
    """The rule's id when it is a string, else None."""


@dataclass(frozen=True)
class CheckedFile:
    """One rule file after every check that reads only the file itself: YAML, the schema,
    ``when`` expressions, message templates, approvals. ``problems`` are those checks'
    problems; what spans files or reads the config (duplicate ids, targets and escrows) is
    checked at each load. ``digest`` is the SHA-256 (hex) of the file's bytes; the text is
    kept compressed when it is long (``packed_text``, see ``model.pack_text``)."""

    name: str
    packed_text: PackedText
    digest: str
    checked: tuple[CheckedRule, ...]
    """The file's rule mappings when its rules are not built (it has a problem of its own);
    else empty."""
    problems: tuple[Problem, ...]
    built: tuple[Rule, ...] = ()
    """The file's rules when it has no problem of its own: all a file without problems
    keeps of its rules (``rules`` makes their ``CheckedRule`` when asked)."""
    listed: bool = True
    """Whether the file holds a list of rules (else one rule mapping)."""

    @property
    def text(self) -> str:
        """The file's text."""
        return unpack_text(self.packed_text)

    @property
    def count(self) -> int:
        """How many rule mappings the file holds."""
        return len(self.checked) + len(self.built)

    @property
    def rules(self) -> tuple[CheckedRule, ...]:
        """The file's rule mappings, in file order."""
        if not self.built:
            return self.checked
        return tuple(self.checked_rule(index) for index in range(len(self.built)))

    def checked_rule(self, index: int) -> CheckedRule:
        """The ``CheckedRule`` of the file's rule mapping at ``index`` (0-based)."""
        if not self.built:
            return self.checked[index]
        rule = self.built[index]
        prefix = _shared_prefix((index,)) if self.listed else ()
        return CheckedRule(prefix, rule.source, rule.line, rule.condition, rule, rule.id)

    def rule_ids(self) -> list[str | None]:
        """The id of each rule mapping, in file order (None when it is not a string)."""
        if not self.built:
            return [rule.rule_id for rule in self.checked]
        return [rule.id for rule in self.built]


class RuleFileCache:
    """Checked rule files kept between loads, by (file name, SHA-256 of its bytes).

    Only the files of the latest load are kept, so a file changed and changed back is
    checked again. ``checked`` counts the files parsed and checked (cache misses), ``reused``
    the files taken from the cache; both only grow. The problems of each file's target and
    escrow references are kept too, for as long as the config's targets and escrows stay
    the same. Not thread-safe.
    """

    def __init__(self) -> None:
        self._files: dict[tuple[str, str], CheckedFile] = {}
        self._references: dict[tuple[str, str], list[Problem]] = {}
        self._reference_scope: tuple[Any, ...] | None = None
        self.checked = 0
        self.reused = 0

    def __len__(self) -> int:
        return len(self._files)

    def check(self, name: str, source: _Source) -> CheckedFile:
        """The checked file ``name`` with ``source``, from the cache when its digest is known."""
        key = (name, source[1])
        found = self._files.get(key)
        if found is not None:
            self.reused += 1
            return found
        self.checked += 1
        return _check_file(name, *source)

    def keep(self, files: Sequence[CheckedFile]) -> None:
        """Keep exactly ``files`` (those of the latest load) for the next load."""
        self._files = {(file.name, file.digest): file for file in files}
        self._references = {
            key: found for key, found in self._references.items() if key in self._files
        }

    def use_config(self, config: Config) -> None:
        """Forget the reference problems unless ``config``'s targets, escrows and path are
        those they were found with (call once per load, before ``reference_problems``)."""
        scope = (config.path, config.targets, config.escrows)
        if scope != self._reference_scope:
            self._references = {}
            self._reference_scope = scope

    def reference_problems(
        self, file: CheckedFile, config: Config, docs: _Documents
    ) -> list[Problem]:
        """``_reference_problems`` of ``file``, from the cache when it was found for this
        file against the config given to ``use_config``."""
        key = (file.name, file.digest)
        found = self._references.get(key)
        if found is None:
            found = self._references[key] = _reference_problems(file, config, docs)
        return found


@dataclass
class _Candidate:
    """A rule mapping found in a file being checked, with what checking it produced."""

    doc: YamlDocument
    prefix: PathParts
    data: dict[str, Any]
    condition: Condition | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def rule_id(self) -> str | None:
        value = self.data.get("id")
        return value if isinstance(value, str) else None

    def problem(self, path: PathParts, message: str, *, at_key: bool = False) -> Problem:
        return self.doc.problem((*self.prefix, *path), message, rule_id=self.rule_id, at_key=at_key)

    def problem_inside(self, path: PathParts, offset: int, message: str) -> Problem:
        """A problem at character ``offset`` of the string value at ``path`` (an expression,
        a message template), located at that character's line and column in the file."""
        node = self.doc.node_at((*self.prefix, *path))
        line, column = scalar_position(self.doc.text, node, offset)
        return Problem(
            self.doc.file, line, column, message, format_path((*self.prefix, *path)), self.rule_id
        )


def _load(
    sources: Mapping[str, _Source],
    problems: list[Problem],
    config: Config | None,
    git_commit: str | None,
    where: str,
    cache: RuleFileCache | None = None,
) -> LoadResult:
    """Check every file of ``sources``; build the ruleset only when nothing is wrong."""
    with collector_paused():
        return _load_unpaused(sources, problems, config, git_commit, where, cache)


def _load_unpaused(
    sources: Mapping[str, _Source],
    problems: list[Problem],
    config: Config | None,
    git_commit: str | None,
    where: str,
    cache: RuleFileCache | None,
) -> LoadResult:
    problems = list(problems)
    files: list[CheckedFile] = []
    for name in sorted(sources):
        source = sources[name]
        files.append(cache.check(name, source) if cache is not None else _check_file(name, *source))
    if cache is not None:
        cache.keep(files)
    docs = _Documents()
    if cache is not None and config is not None:
        cache.use_config(config)
    for file in files:
        problems += file.problems
        if config is not None and cache is not None:
            problems += cache.reference_problems(file, config, docs)
        elif config is not None:
            problems += _reference_problems(file, config, docs)
    problems += _duplicate_id_problems(files, docs)
    problems += _loop_problems(files, docs)
    rule_count = sum(file.count for file in files)
    if not rule_count and not problems:
        problems.append(Problem(where, 0, 0, f"no rules found in {where}"))
    counts = (rule_count, len(sources))
    if problems:
        return LoadResult(None, tuple(sorted_problems(problems)), *counts)
    rules = tuple(rule for file in files for rule in file.built)
    version = ruleset_version({name: source[0] for name, source in sources.items()})
    texts = PackedTexts({file.name: file.packed_text for file in files})
    ruleset = Ruleset(rules, texts, version, git_commit)
    return LoadResult(ruleset, (), *counts)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block (nested blocks are fine). Loading rules
    allocates many small objects that live on (data, compiled conditions, rules), and every
    full collection meanwhile would walk all of them again: with 10,000 rule files, a
    quarter to a third of the time of ``gatekeeper check``. Cyclic garbage made inside the
    block is collected after it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Documents:
    """Files parsed again, once per load, to locate a problem found after their check."""

    def __init__(self) -> None:
        self._docs: dict[str, YamlDocument] = {}

    def of(self, file: CheckedFile) -> YamlDocument:
        doc = self._docs.get(file.name)
        if doc is None:
            parsed, _ = parse_document(file.text, file.name, _rule_id_of)
            assert parsed is not None  # it parsed when it was checked
            doc = self._docs[file.name] = parsed
        return doc

    def problem(
        self, file: CheckedFile, rule: CheckedRule, path: PathParts, message: str
    ) -> Problem:
        doc = self.of(file)
        return doc.problem((*rule.prefix, *path), message, rule_id=rule.rule_id)


def _rule_id_of(data: Any, path: PathParts) -> str | None:
    """The id of the rule ``path`` points into (a one-rule file or a list of rules)."""
    rule = data
    if isinstance(data, list):
        index = path[0] if path else None
        rule = data[index] if isinstance(index, int) and 0 <= index < len(data) else None
    value = rule.get("id") if isinstance(rule, dict) else None
    return value if isinstance(value, str) else None


def _check_file(name: str, text: str, digest: str) -> CheckedFile:
    """Check one file on its own (see ``CheckedFile``); its node tree is not kept. Never
    raises for bad input: data too deep for the checks to walk is a problem of the file."""
    try:
        return _check_file_contents(name, text, digest)
    except RecursionError:
        problem = Problem(name, 1, 1, "the file's data is nested too deeply to check")
        return CheckedFile(name, pack_text(text), digest, (), (problem,))


CHUNK_RULES = 64
"""A long list of rules (``CHUNK_MIN_CHARS`` characters or more) is parsed and checked
this many rules at a time (``_chunks``): the YAML node tree of a part, not of the whole
file, lives at once (about 8 KB per rule of a few lines: 8 MB for a file of 1,000 rules,
which would stay in the process's memory, reused but never returned)."""
CHUNK_MIN_CHARS = 32 * 1024

_ITEM_START = re.compile(r"^-(?=[ \t\r\n]|$)", re.MULTILINE)
"""A line starting an item of a list at column 0 (``- id: ...``, or ``-`` alone)."""
_DOCUMENT_LINE = re.compile(r"^(?:%|---|\.\.\.)", re.MULTILINE)
"""A directive, or a document start or end marker."""
_FIRST_LINE = re.compile(r"(?:[ \t]*(?:#[^\n]*)?\n)*-(?=[ \t\r\n]|$)")
"""Blank and comment lines, then an item of a list at column 0."""
_OTHER_BREAKS = ("\x85", "\u2028", "\u2029")
"""Line breaks YAML 1.1 knows besides ``\n`` and ``\r\n``."""


def _chunks(text: str) -> list[tuple[int, str]] | None:
    """``[(lines before it, text)]``: a long rule file that is a plain list of rules at
    column 0, cut before every ``CHUNK_RULES``-th item, each part a list of rules of its
    own; None for a short file, one of fewer items, or one whose parts might not mean what
    they mean in the whole: anchors (``&``: an alias could reach across parts, and the
    limit on what aliases expand is per document), directives, several documents, line
    breaks other than ``\n`` and ``\r\n``. A part cut inside a quoted or flow scalar
    does not parse, and the caller then checks the file whole."""
    if len(text) < CHUNK_MIN_CHARS or "&" in text or not _FIRST_LINE.match(text):
        return None
    if text.count("\r") != text.count("\r\n") or any(c in text for c in _OTHER_BREAKS):
        return None
    if _DOCUMENT_LINE.search(text):
        return None
    starts = [match.start() for match in _ITEM_START.finditer(text)][::CHUNK_RULES]
    if len(starts) < 2:
        return None
    starts[0] = 0  # the comments before the first rule go with it
    ends = [*starts[1:], len(text)]
    chunks = []
    lines = 0
    for start, end in zip(starts, ends, strict=True):
        chunks.append((lines, text[start:end]))
        lines += text.count("\n", start, end)
    return chunks


def _check_chunked(name: str, text: str, digest: str) -> CheckedFile | None:
    """The checked file of a long list of rules (see ``_chunks``), parsed and checked a
    part at a time, when every part is a list of rules without any problem; else None
    (the caller checks the file whole: its problems are found, worded and located as
    always)."""
    chunks = _chunks(text)
    if chunks is None:
        return None
    built: list[Rule] = []
    for lines, chunk in chunks:
        doc, problems = parse_document(chunk, name, _rule_id_of)
        if doc is None or problems or not isinstance(doc.data, list):
            return None
        if schema_problems(doc, RULES_SCHEMA, _rule_id_of):
            return None
        candidates = []
        for index, item in enumerate(doc.data):
            if not isinstance(item, dict):
                return None
            candidate = _Candidate(doc, (index,), item)
            _check_rule(candidate)
            if candidate.problems:
                return None
            candidates.append(candidate)
        for candidate in candidates:
            line = lines + doc.position(candidate.prefix)[0]
            built.append(_build_rule(candidate, pack_data(candidate.data), line))
        del doc, candidates  # this part's node tree goes before the next is made
    return CheckedFile(name, pack_text(text), digest, (), (), tuple(built), True)


def _check_file_contents(name: str, text: str, digest: str) -> CheckedFile:
    chunked = _check_chunked(name, text, digest)
    if chunked is not None:
        return chunked
    doc, problems = parse_document(text, name, _rule_id_of)
    if doc is None:
        return CheckedFile(name, pack_text(text), digest, (), tuple(problems))
    shape = _shape_problem(doc)
    if shape is not None:
        return CheckedFile(name, pack_text(text), digest, (), (*problems, shape))
    problems += _clearer_schema_problems(schema_problems(doc, RULES_SCHEMA, _rule_id_of))
    items = list(enumerate(doc.data)) if isinstance(doc.data, list) else [(None, doc.data)]
    candidates = []
    for index, item in items:
        if isinstance(item, dict):
            prefix: PathParts = () if index is None else (index,)
            candidate = _Candidate(doc, prefix, item)
            _check_rule(candidate)
            problems += candidate.problems
            candidates.append(candidate)
    packed = pack_text(text)
    listed = isinstance(doc.data, list)
    if problems:
        rules = tuple(_checked_rule(candidate) for candidate in candidates)
        return CheckedFile(name, packed, digest, rules, tuple(problems), listed=listed)
    built = tuple(_built_rule(candidate) for candidate in candidates)
    return CheckedFile(name, packed, digest, (), (), built, listed)


def _checked_rule(candidate: _Candidate) -> CheckedRule:
    """The ``CheckedRule`` of ``candidate`` in a file with problems (nothing is built)."""
    return CheckedRule(
        _shared_prefix(candidate.prefix),
        pack_data(candidate.data),
        candidate.doc.position(candidate.prefix)[0],
        candidate.condition,
        None,
        candidate.rule_id,
    )


def _built_rule(candidate: _Candidate) -> Rule:
    """The ``Rule`` of ``candidate`` in a file without problems."""
    line = candidate.doc.position(candidate.prefix)[0]
    return _build_rule(candidate, pack_data(candidate.data), line)


_LINES: dict[int, int] = {}
"""Rules' line numbers met lately: one ``int`` object for the rules at one line of
different files (Python keeps one only up to 256)."""


def _shared_line(line: int) -> int:
    """``line``, or the equal ``int`` kept before (see ``_LINES``)."""
    found = _LINES.get(line)
    if found is None:
        if len(_LINES) >= 8192:
            _LINES.clear()
        _LINES[line] = found = line
    return found


_PREFIXES: dict[PathParts, PathParts] = {}
"""The prefixes of checked rules, ``(index,)`` in a list of rules: one object for equal
ones (the rules at one index of different files)."""


def _shared_prefix(prefix: PathParts) -> PathParts:
    """``prefix``, or the equal prefix kept before (see ``_PREFIXES``)."""
    found = _PREFIXES.get(prefix)
    if found is None:
        if len(_PREFIXES) >= 4096:
            _PREFIXES.clear()
        _PREFIXES[prefix] = found = prefix
    return found


def _shape_problem(doc: YamlDocument) -> Problem | None:
    """A problem when the file is empty or holds neither a rule nor a list of rules."""
    if doc.data is None:
        return doc.problem((), "the file is empty: write a rule (a mapping) or a list of rules")
    if isinstance(doc.data, list) and not doc.data:
        return doc.problem((), "the list of rules is empty")
    if not isinstance(doc.data, dict | list):
        what = type(doc.data).__name__
        message = f"a rule file must hold a rule (a mapping) or a list of rules, not a {what}"
        return doc.problem((), message)
    return None


def _check_rule(candidate: _Candidate) -> None:
    """Check what the schema cannot, within the rule: ``when``, templates, approvals."""
    _check_when(candidate)
    _check_approvals(candidate)
    actions = candidate.data.get("actions")
    if not isinstance(actions, list):
        return
    has_release = any(isinstance(a, dict) and "release" in a for a in actions)
    for_each = candidate.data.get("for_each")
    condition = candidate.condition
    scope = TemplateScope.of(
        has_release=has_release,
        item_kind=for_each if isinstance(for_each, str) and _KIND.fullmatch(for_each) else None,
        reads=condition.reads if condition is not None else None,
    )
    for index, kind, body in _well_formed_actions(actions):
        for path, text in _body_templates(kind, body):
            where: PathParts = ("actions", index, kind, *path)
            for found in check_template(text, scope):
                problem = candidate.problem_inside(where, found.offset, found.message)
                candidate.problems.append(problem)
        if kind == "set_fact":
            _check_set_fact_id(candidate, ("actions", index, kind), body)
            _check_self_trigger(candidate, ("actions", index, kind), body)
        elif kind == "release":
            _check_release_amount(candidate, ("actions", index, kind), body, scope)


MAX_AMOUNT_EXAMPLE = '"10000.00"'
LITERAL_RELEASE_FIELDS = ("target", "escrow", "currency", "payee")
"""A release's fields that are never templates: who is paid, from where, in what."""


def _check_release_amount(
    candidate: _Candidate, path: PathParts, body: Mapping[str, Any], scope: TemplateScope
) -> None:
    """A release's target, escrow, currency and payee are literal (``LITERAL_RELEASE_FIELDS``);
    an ``amount`` that is a template must name a fact field the rule may use and
    come with a ``max_amount``; a literal amount must not be above its ``max_amount``; a
    ``max_amount`` must be above zero (its shape is the schema's to check)."""
    for name in LITERAL_RELEASE_FIELDS:
        value = body.get(name)
        if isinstance(value, str) and "${" in value:
            message = (
                f"a release's {name} is written as it is, never read from a fact (only its "
                "amount may be, under max_amount): a fact could otherwise send signed-off "
                "money elsewhere"
            )
            candidate.problems.append(candidate.problem((*path, name), message))
    amount, cap = body.get("amount"), body.get("max_amount")
    if not isinstance(amount, str):
        return
    if amount.startswith("$"):
        for found in check_amount_template(amount, scope):
            problem = candidate.problem_inside((*path, "amount"), found.offset, found.message)
            candidate.problems.append(problem)
        if cap is None:
            message = (
                "an amount read from a fact needs max_amount, the most one firing may "
                f"release (a decimal string such as {MAX_AMOUNT_EXAMPLE})"
            )
            candidate.problems.append(candidate.problem((*path, "amount"), message))
    limit = _decimal(cap)
    if limit is not None and limit <= 0:
        message = f"max_amount must be above zero (a decimal string such as {MAX_AMOUNT_EXAMPLE})"
        candidate.problems.append(candidate.problem((*path, "max_amount"), message))
        return
    literal = _decimal(amount)
    if literal is not None and limit is not None and literal > limit:
        message = f"amount {amount} is above this release's max_amount {cap}"
        candidate.problems.append(candidate.problem((*path, "amount"), message))


def _check_self_trigger(candidate: _Candidate, path: PathParts, body: Mapping[str, Any]) -> None:
    """A set_fact whose fact can fire its own rule again: an error (see
    ``self_trigger_problem``), at the action's ``kind``."""
    data = candidate.data
    condition = candidate.condition
    fact_kind, fact_id = body.get("kind"), body.get("id")
    if condition is None or not isinstance(fact_kind, str) or not isinstance(fact_id, str):
        return
    for_each = data.get("for_each")
    message = self_trigger_problem(
        fire=data.get("fire", "once"),
        for_each=for_each if isinstance(for_each, str) else None,
        read_kinds=frozenset(ref.kind for ref in condition.reads),
        fact_kind=fact_kind,
        fact_id=fact_id,
    )
    if message is not None:
        candidate.problems.append(candidate.problem((*path, "kind"), message))


def self_trigger_problem(
    *, fire: Any, for_each: str | None, read_kinds: frozenset[str], fact_kind: str, fact_id: str
) -> str | None:
    """Why a rule that sets a fact of ``fact_kind`` (id template ``fact_id``) can fire again
    because of that fact, or None when it cannot.

    A rule re-triggers itself when the kind it sets is its ``for_each`` kind or a kind its
    ``when`` reads. Whether that can make it fire again depends on ``fire``:

    - ``each_fact``: a per-item rule is triggered by facts of its ``for_each`` kind only, a
      plain one by every fact it reads; each such fact may fire it: always reported.
    - ``each_time``: every fact the rule reads re-evaluates it, and its own fact may close
      and reopen its condition: reported.
    - ``once``: an instance fires at most once, so a plain rule (one instance) is never
      reported, nor a per-item rule that sets its own item (``id: "${item.id}"``); a per-item
      rule setting another fact of its ``for_each`` kind makes a new instance, which may fire
      and set the next one: reported.

    Reported as an error, not a warning: such a chain is only stopped by
    ``max_chain_depth``, where the firing is blocked and alerted, so it is never what a
    rule means; a bounded sequence of steps is written as one rule per step, each setting
    a kind the next one reads.
    """
    read = fact_kind in read_kinds
    own = fact_kind == for_each
    if fire == "each_fact":
        hit = own if for_each is not None else read
    elif fire == "each_time":
        hit = own or read
    else:
        hit = own and fact_id.strip() != "${item.id}"
    if not hit:
        return None
    reads = "its for_each kind" if own else "a kind its 'when' reads"
    if fire == "once":
        why = "each fact it sets is a new item of this rule, which may fire and set the next one"
    elif fire == "each_fact":
        why = "each fact it sets can fire it again (fire: each_fact)"
    else:
        why = "the fact it sets can close and reopen its condition (fire: each_time)"
    return (
        f"this rule sets a fact of kind {fact_kind!r}, {reads}, so it can re-trigger itself: "
        f"{why}, a loop only max_chain_depth would stop; set a kind this rule does not read "
        "and let another rule read it"
    )


def _body_templates(kind: str, body: Mapping[str, Any]) -> list[tuple[PathParts, str]]:
    """(path inside the body, text) of each template of an action body as written (see
    ``templates.TEMPLATE_FIELDS``); values of the wrong type are left to the schema."""
    found: list[tuple[PathParts, str]] = []
    for field_name in TEMPLATE_FIELDS.get(kind, ()):
        if field_name.endswith(".*"):
            mapping = body.get(field_name[:-2])
            if isinstance(mapping, dict):
                found += [
                    ((field_name[:-2], str(key)), value)
                    for key, value in mapping.items()
                    if isinstance(value, str)
                ]
        elif isinstance(body.get(field_name), str):
            found.append(((field_name,), body[field_name]))
    return found


def _check_set_fact_id(candidate: _Candidate, path: PathParts, body: Mapping[str, Any]) -> None:
    """A set_fact ``id`` without placeholders must be a valid fact id as written."""
    fact_id = body.get("id")
    if not isinstance(fact_id, str) or "$" in fact_id or FACT_ID.fullmatch(fact_id):
        return
    message = f"{shorten(fact_id)!r} is not a valid fact id ({FACT_ID_RULE})"
    candidate.problems.append(candidate.problem((*path, "id"), message))


SET_FACT_PROJECT_MESSAGE = (
    "set_fact has no 'project' key: a rule records facts only in its own project "
    "(the rule's 'project'); to act on another project, post the fact to it from outside"
)
"""The problem of a ``project`` key in a ``set_fact`` action (instead of the schema's
"unknown key" wording)."""


def _clearer_schema_problems(problems: list[Problem]) -> list[Problem]:
    """``problems`` with the schema's wording replaced where a plainer sentence exists:
    a ``project`` key in a ``set_fact`` action."""
    out = []
    for problem in problems:
        if problem.path.endswith(".set_fact.project") and problem.message.startswith(
            "unknown key 'project'"
        ):
            problem = Problem(
                problem.file,
                problem.line,
                problem.column,
                SET_FACT_PROJECT_MESSAGE,
                problem.path,
                problem.rule_id,
            )
        out.append(problem)
    return out


def _reference_problems(file: CheckedFile, config: Config, docs: _Documents) -> list[Problem]:
    """The targets and escrows the file's rules name that ``config`` does not declare, or
    that cannot take the action (located by parsing the file again, only when there are)."""
    problems = []
    for rule in file.rules:
        approvals = rule.data.get("approvals")
        notify = approvals.get("notify") if isinstance(approvals, dict) else None
        if isinstance(notify, str):
            for _, message in _reference_findings("notify", {"target": notify}, config):
                problems.append(docs.problem(file, rule, ("approvals", "notify"), message))
        actions = rule.data.get("actions")
        if not isinstance(actions, list):
            continue
        for index, kind, body in _well_formed_actions(actions):
            for path, message in _reference_findings(kind, body, config):
                problems.append(docs.problem(file, rule, ("actions", index, kind, *path), message))
    return problems


def _well_formed_actions(actions: list[Any]) -> list[tuple[int, str, dict[str, Any]]]:
    """(index, kind, body) of each action shaped like ``{kind: {...}}``."""
    found = []
    for index, action in enumerate(actions):
        if isinstance(action, dict) and len(action) == 1:
            kind, body = next(iter(action.items()))
            if kind in _ACTION_KINDS and isinstance(body, dict):
                found.append((index, kind, body))
    return found


def _check_when(candidate: _Candidate) -> None:
    text = candidate.data.get("when")
    if not isinstance(text, str) or not text or len(text) > MAX_EXPRESSION_CHARS:
        return  # the schema says what is wrong
    for_each = candidate.data.get("for_each")
    item_kind = for_each if isinstance(for_each, str) and _KIND.fullmatch(for_each) else None
    try:
        candidate.condition = compile_condition(text, item_kind=item_kind)
    except ExpressionError as error:
        for found in error.problems:
            message = _expression_message(found)
            candidate.problems.append(candidate.problem_inside(("when",), found.offset, message))


def _expression_message(found: ExpressionProblem) -> str:
    fragment = found.fragment.strip()
    if not fragment or fragment in found.message:
        return found.message
    return f"{found.message} at {shorten(fragment)!r}"


def _check_approvals(candidate: _Candidate) -> None:
    approvals = candidate.data.get("approvals")
    if not isinstance(approvals, dict):
        return
    required, approvers = approvals.get("required"), approvals.get("from")
    if isinstance(required, int) and isinstance(approvers, list) and required > len(approvers):
        noun = "approver is" if len(approvers) == 1 else "approvers are"
        message = f"requires {required} approvals but only {len(approvers)} {noun} listed in 'from'"
        candidate.problems.append(candidate.problem(("approvals", "required"), message))


_Findings = list[tuple[PathParts, str]]


def _reference_findings(kind: str, body: Mapping[str, Any], config: Config) -> _Findings:
    """(path inside the action body, message) for each unknown or unfit target or escrow."""
    found: _Findings = []
    target = body.get("target")
    if isinstance(target, str) and target not in config.targets:
        message = _unknown_name_message("target", target, list(config.targets), config)
        found.append((("target",), message))
    elif isinstance(target, str) and (refusal := config.targets[target].refusal(kind)):
        found.append((("target",), refusal))
    elif isinstance(target, str) and kind == "pipeline":
        found += _pipeline_limit_findings(body, config.targets[target])
    if kind == "release":
        found += _escrow_findings(body, config)
    return found


def _pipeline_limit_findings(body: Mapping[str, Any], target: Target) -> _Findings:
    """The documented limits of ``target``'s CI service that the pipeline action exceeds
    (see ``gatekeeper.rules.pipelines``)."""
    ref, inputs = body.get("ref"), body.get("inputs", {})
    if not isinstance(ref, str) or not isinstance(inputs, dict):
        return []  # the schema reports these
    texts = {str(key): str(value) for key, value in inputs.items()}
    return [((key,), message) for key, message in pipeline_limit_problems(target, ref, texts)]


def _escrow_findings(body: Mapping[str, Any], config: Config) -> _Findings:
    name = body.get("escrow")
    if not isinstance(name, str):
        return []
    escrow = config.escrows.get(name)
    if escrow is None:
        message = _unknown_name_message("escrow", name, list(config.escrows), config)
        return [(("escrow",), message)]
    found: _Findings = []
    currency = body.get("currency")
    if isinstance(currency, str) and currency != escrow.currency:
        message = (
            f"currency {currency} does not match escrow {name!r}, which holds {escrow.currency}"
        )
        found.append((("currency",), message))
    for key in ("amount", "max_amount"):
        written = body.get(key)
        literal = isinstance(written, str) and _decimal(written) is not None
        places = len(cast(str, written).partition(".")[2]) if literal else 0
        if places > escrow.decimals:
            message = (
                f"{key} {written} has {places} decimals, more than escrow {name!r} allows "
                f"(decimals: {escrow.decimals}, {escrow.currency})"
            )
            found.append(((key,), message))
    amount = _decimal(body.get("amount"))
    if amount is not None and amount > escrow.limit:
        message = (
            f"amount {amount} is above the limit of escrow {name!r} "
            f"({escrow.limit} {escrow.currency}): this release could never be sent"
        )
        found.append((("amount",), message))
    cap = _decimal(body.get("max_amount"))
    if cap is not None and cap > escrow.limit:
        message = (
            f"max_amount {body['max_amount']} is above the limit of escrow {name!r} "
            f"({escrow.limit} {escrow.currency}): a release that large could never be sent; "
            f"lower max_amount to at most {escrow.limit}"
        )
        found.append((("max_amount",), message))
    return found


def _decimal(value: Any) -> Decimal | None:
    if not isinstance(value, str):
        return None
    try:
        amount = Decimal(value)
    except InvalidOperation:
        return None
    return amount if amount.is_finite() else None


def _unknown_name_message(what: str, name: str, known: list[str], config: Config) -> str:
    where = config.path.name if config.path is not None else "the config"
    message = f"unknown {what} {name!r}"
    if not known:
        return message + f": no {what}s are declared in {where}"
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    return message + f" ({what}s in {where}: {', '.join(sorted(known))})"


def _duplicate_id_problems(files: list[CheckedFile], docs: _Documents) -> list[Problem]:
    """A problem at each repeated rule id, naming where the id was first used."""
    first: dict[str, tuple[CheckedFile, int]] = {}
    problems = []
    for file in files:
        for index, rule_id in enumerate(file.rule_ids()):
            if rule_id is None:
                continue
            if rule_id not in first:
                first[rule_id] = (file, index)
                continue
            earlier_file, earlier_index = first[rule_id]
            earlier = earlier_file.checked_rule(earlier_index)
            line, column = docs.of(earlier_file).position((*earlier.prefix, "id"))
            where = f"{earlier_file.name}:{line}:{column}"
            message = f"duplicate rule id {rule_id!r}: already used at {where}"
            problems.append(docs.problem(file, file.checked_rule(index), ("id",), message))
    return problems


# ---------------------------------------------------------------------------------------------
# Loops across rules (the graph analysis is in ``loops``)


def _loop_rule(rule: CheckedRule) -> LoopRule | None:
    """The loop check's view of ``rule``, or None when it is not well formed enough to
    say (its own problems are reported)."""
    data, condition = rule.data, rule.condition
    rule_id, project = rule.rule_id, data.get("project")
    fire, for_each = data.get("fire", "once"), data.get("for_each")
    actions = data.get("actions")
    if (
        condition is None
        or rule_id is None
        or not isinstance(project, str)
        or fire not in ("once", "each_time", "each_fact")
        or not (for_each is None or isinstance(for_each, str))
        or not isinstance(actions, list)
    ):
        return None
    read_ids: dict[str, set[str]] = {}
    for ref in condition.reads:
        if ref.id is not None:
            read_ids.setdefault(ref.kind, set()).add(ref.id)
    sets = tuple(
        (index, body["kind"], body["id"])
        for index, kind, body in _well_formed_actions(actions)
        if kind == "set_fact" and isinstance(body.get("kind"), str)
        if isinstance(body.get("id"), str)
    )
    return LoopRule(
        id=rule_id,
        project=project,
        fire=fire,
        for_each=for_each,
        read_whole=frozenset(ref.kind for ref in condition.reads if ref.id is None),
        read_ids={kind: frozenset(ids) for kind, ids in read_ids.items()},
        sets=sets,
    )


def _loop_problems(files: Sequence[CheckedFile], docs: _Documents) -> list[Problem]:
    """A problem for each loop of rules feeding each other through set_fact (see
    ``loop_cycles``), at the ``kind`` of the set_fact action of its first rule (in file
    order) that feeds the next rule of the cycle."""
    if not any(_file_sets_a_fact(file) for file in files):
        return []  # the usual ruleset: nothing to walk
    built = [
        (file, rule, node) for file in files for rule in file.rules if (node := _loop_rule(rule))
    ]
    nodes = [node for _, _, node in built]
    problems = []
    for rules, edges in loop_cycles(nodes):
        file, checked, start = built[rules[0]]
        action_index = start.sets[edges[0][1]][0]
        path: PathParts = ("actions", action_index, "set_fact", "kind")
        message = loop_message(nodes, (rules, edges))
        problems.append(docs.problem(file, checked, path, message))
    return problems


def _file_sets_a_fact(file: CheckedFile) -> bool:
    """Whether a rule mapping of ``file`` has a ``set_fact`` action."""
    if file.built:
        return any(isinstance(a, SetFactAction) for rule in file.built for a in rule.actions)
    return any(_sets_a_fact(rule.data) for rule in file.checked)


def _sets_a_fact(data: Mapping[str, Any]) -> bool:
    """Whether the rule mapping ``data`` has a ``set_fact`` action."""
    actions = data.get("actions")
    return isinstance(actions, list) and any(
        isinstance(action, dict) and "set_fact" in action for action in actions
    )


# ---------------------------------------------------------------------------------------------
# Building


def _build_rule(candidate: _Candidate, source: Mapping[str, Any], line: int) -> Rule:
    """The typed ``Rule`` of a candidate that passed every check; ``source`` is its data as
    kept (packed), ``line`` where it starts (1-based)."""
    data = candidate.data
    assert candidate.condition is not None  # set by _check_when for every valid rule
    kept = kept_source(source, data["id"], candidate.condition.text)
    return Rule(
        id=data["id"],
        project=sys.intern(data["project"]),
        description=data.get("description", ""),
        condition=candidate.condition,
        fire=cast(FireMode, sys.intern(data.get("fire", "once"))),
        actions=_build_actions(data["actions"]),
        approvals=_build_approvals(data.get("approvals")),
        content_hash=rule_content_hash(data),
        file=candidate.doc.file,
        line=_shared_line(line),
        kept_source=kept,
        for_each=_shared(data.get("for_each")),
        mode=cast(RuleMode, data.get("mode", "live")),
    )


def _shared(value: Any) -> Any:
    """``value``, one object for all equal strings (``sys.intern``): the names and texts
    many rules repeat (projects, kinds, targets, templates) are kept once, not per rule."""
    return sys.intern(value) if isinstance(value, str) else value


_Shareable = TypeVar("_Shareable", ReleaseAction, NotifyAction, tuple[Action, ...])
_ACTIONS: dict[Any, Any] = {}
"""Release and notify actions already built, and the tuples of them rules hold: equal ones
(rules of one template notifying one target with one message) are one object, immutable."""
_MAX_ACTIONS = 4096


def _one_action(action: _Shareable) -> _Shareable:
    """``action`` (or a tuple of release and notify actions), or the equal one built before
    (see ``_ACTIONS``)."""
    found: _Shareable | None = _ACTIONS.get(action)
    if found is None:
        if len(_ACTIONS) >= _MAX_ACTIONS:
            _ACTIONS.clear()
        _ACTIONS[action] = found = action
    return found


def _build_actions(actions: list[Mapping[str, Any]]) -> tuple[Action, ...]:
    """A rule's actions; one tuple for equal tuples of release and notify actions."""
    built = tuple(_build_action(action) for action in actions)
    if all(isinstance(action, ReleaseAction | NotifyAction) for action in built):
        return _one_action(built)
    return built


def _build_action(action: Mapping[str, Any]) -> Action:
    kind, body = next(iter(action.items()))
    if kind == "release":
        fields = ("target", "escrow", "amount", "currency", "payee")
        release = ReleaseAction(
            **{name: _shared(body[name]) for name in fields}, max_amount=body.get("max_amount")
        )
        return _one_action(release)
    if kind == "notify":
        target, message = _shared(body["target"]), _shared(body["message"])
        return _one_action(NotifyAction(target=target, message=message))
    if kind == "set_fact":
        return SetFactAction(
            fact_kind=_shared(body["kind"]), fact_id=body["id"], data=dict(body.get("data", {}))
        )
    return PipelineAction(
        target=_shared(body["target"]), ref=body["ref"], inputs=dict(body.get("inputs", {}))
    )


def _build_approvals(data: Mapping[str, Any] | None) -> Approvals | None:
    if data is None:
        return None
    expires = duration_seconds(data.get("expires_after"))
    return Approvals(
        required=data["required"],
        from_=tuple(data["from"]),
        standing=bool(data.get("standing", False)),
        expires_after_s=float(expires) if expires is not None else None,
        notify=data.get("notify"),
    )


def _canonical_action(action: Any) -> Any:
    if isinstance(action, dict) and isinstance(action.get("pipeline"), dict):
        pipeline = dict(action["pipeline"])
        pipeline.setdefault("inputs", {})
        return {"pipeline": pipeline}
    if isinstance(action, dict) and isinstance(action.get("set_fact"), dict):
        set_fact = dict(action["set_fact"])
        set_fact.setdefault("data", {})
        return {"set_fact": set_fact}
    return action
