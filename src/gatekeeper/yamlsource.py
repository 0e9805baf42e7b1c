"""YAML text to plain data plus located problems, shared by rule files and ``gatekeeper.yaml``.

The text is composed into a node tree (``yaml.compose``, with libyaml's ``CSafeLoader`` when
it is available) so every value keeps its line and column, then constructed into the same
plain data ``yaml.safe_load`` would give. Things YAML itself accepts but we refuse (a key
given twice, a key YAML reads as a boolean or number) become problems, as does every JSON
Schema error (draft 2020-12), reworded into a plain sentence and located at the node its
path names, or at the nearest node that exists on the way there (the Home Assistant habit).

Nothing here knows about rules or config: callers pass a schema file name and, for rule
files, a function naming the rule a path belongs to.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import yaml
from jsonschema import Draft202012Validator  # type: ignore[import-untyped, unused-ignore]

from gatekeeper.problems import Problem, format_path
from gatekeeper.schemas import load_schema

PathParts = tuple[str | int, ...]
"""A key path inside a document: mapping keys and list indexes, outermost first."""

RuleIdOf = Callable[[Any, PathParts], str | None]
"""Given a document's data and a path inside it, the id of the rule the path belongs to."""

YAML_LOADER: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(
    yaml, "CSafeLoader", yaml.SafeLoader
)
MAX_EXPANDED_NODES = 100_000
MAX_DEPTH = 64
MAX_SHOWN_CHARS = 60
SECRET_NOT_NAME_MESSAGE = (
    "this looks like a secret, not a variable name: give the name of the environment "
    "variable that holds it (capital letters, digits and _, not starting with a digit); "
    "the value is not shown"
)
"""The problem of a setting that names an environment variable holding a secret (a schema
property marked ``x-secret-name``) when its value is no such name: the value itself is
never shown, as it is likely the secret."""

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_TAG_WORDS = {
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:int": "a number",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:null": "null",
    "tag:yaml.org,2002:timestamp": "a timestamp",
}
_TYPE_WORDS = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


@dataclass(frozen=True)
class YamlDocument:
    """A parsed YAML file: its text, node tree (``None`` when empty) and plain data."""

    file: str
    text: str
    root: yaml.Node | None
    data: Any

    def node_at(self, path: PathParts) -> yaml.Node | None:
        """The value node at ``path``, or the nearest ancestor that exists (None: empty file)."""
        node = self.root
        for part in path:
            child = _child(node, part)
            if child is None:
                return node
            node = child[1]
        return node

    def key_node_at(self, path: PathParts) -> yaml.Node | None:
        """The key node of the last part of ``path`` when it names a mapping key, else None."""
        if not path:
            return None
        parent = self.node_at(path[:-1])
        child = _child(parent, path[-1]) if parent is not None else None
        return child[0] if child is not None else None

    def position(self, path: PathParts, *, at_key: bool = False) -> tuple[int, int]:
        """1-based (line, column) of the node at ``path`` (of its key when ``at_key``).

        Falls back to the nearest existing ancestor; (1, 1) for an empty document.
        """
        node = self.key_node_at(path) if at_key else None
        return node_position(node or self.node_at(path))

    def problem(
        self,
        path: PathParts,
        message: str,
        *,
        rule_id: str | None = None,
        at_key: bool = False,
    ) -> Problem:
        """A ``Problem`` in this file located at ``path`` (see ``position``)."""
        line, column = self.position(path, at_key=at_key)
        return Problem(self.file, line, column, message, format_path(path), rule_id)


def node_position(node: yaml.Node | None) -> tuple[int, int]:
    """1-based (line, column) where ``node`` starts; (1, 1) for ``None``."""
    if node is None or node.start_mark is None:
        return 1, 1
    return node.start_mark.line + 1, node.start_mark.column + 1


def _child(node: yaml.Node | None, part: str | int) -> tuple[yaml.Node | None, yaml.Node] | None:
    """(key node, value node) of ``part`` inside ``node``; the last of repeated keys wins."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in reversed(node.value):
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(part):
                return key_node, value_node
    if (
        isinstance(node, yaml.SequenceNode)
        and isinstance(part, int)
        and 0 <= part < len(node.value)
    ):
        return None, node.value[part]
    return None


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_document(
    text: str, file: str, rule_id_of: RuleIdOf | None = None
) -> tuple[YamlDocument | None, list[Problem]]:
    """Parse ``text`` (the contents of ``file``) into a ``YamlDocument``.

    Returns ``(None, problems)`` when the text is not YAML (one problem at the error's mark),
    else the document and the problems found in its structure (duplicate keys, keys that are
    not strings, too many nodes once aliases are expanded). ``rule_id_of`` names the rule of
    each problem. Never raises for bad input.
    """
    root: yaml.Node | None = None
    try:
        # libyaml refuses nesting over 1,000 levels by itself, so its composer is safe to
        # run first; the pure-Python one is recursive, so the depth is checked before it
        c_composer = YAML_LOADER is getattr(yaml, "CSafeLoader", None)
        too_deep = None if c_composer else _first_too_deep(text, YAML_LOADER)
        root = None if too_deep else yaml.compose(text, Loader=YAML_LOADER)
    except yaml.YAMLError as error:
        too_deep = _first_too_deep_or_none(text)
        if too_deep is None:
            return None, [yaml_error_problem(file, error)]
    if root is not None and too_deep is None:
        scan = _scan(root)
        too_deep = scan.too_deep
    if too_deep is not None:
        line, column = too_deep
        return None, [Problem(file, line, column, f"nested more than {MAX_DEPTH} levels deep")]
    if root is None:
        return YamlDocument(file, text, None, None), []
    findings = scan.findings
    # without aliases the data is no bigger than the text (whose size the caller caps): only
    # the nodes that aliases add count against MAX_EXPANDED_NODES
    limit = scan.nodes + MAX_EXPANDED_NODES
    size, depth = _expanded_shape(root, {}, limit) if scan.shared else (scan.nodes, 0)
    if size > limit:
        message = (
            f"document is too large once aliases are expanded (they add over "
            f"{MAX_EXPANDED_NODES} nodes)"
        )
        return None, [Problem(file, 1, 1, message)]
    if depth > MAX_DEPTH:  # aliases chained into data deeper than the text shows
        message = f"nested more than {MAX_DEPTH} levels deep once aliases are expanded"
        return None, [Problem(file, 1, 1, message)]
    try:
        data = _Constructor().construct_document(root)
    except yaml.YAMLError as error:
        return None, [yaml_error_problem(file, error)]
    doc = YamlDocument(file, text, root, data)
    problems = [_finding_problem(doc, finding, rule_id_of) for finding in findings]
    return doc, sorted_problems(problems)


def _first_too_deep_or_none(text: str) -> tuple[int, int] | None:
    """``_first_too_deep`` with the pure-Python parser (which has no nesting limit of its
    own, so a document libyaml refused for its depth is located at level ``MAX_DEPTH`` + 1);
    None when the text is not YAML before that depth."""
    try:
        return _first_too_deep(text, yaml.SafeLoader)
    except yaml.YAMLError:
        return None


def _first_too_deep(text: str, loader: Any) -> tuple[int, int] | None:
    """1-based (line, column) where collections nest deeper than ``MAX_DEPTH``, else None.

    Checked on the event stream, which the parsers produce without recursion, so that
    composing and validating cannot exhaust the stack. Raises ``yaml.YAMLError``.
    """
    depth = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                mark = event.start_mark
                return (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return None


def yaml_error_problem(file: str, error: yaml.YAMLError) -> Problem:
    """One ``Problem`` for a PyYAML error, at its mark when it has one."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return Problem(file, 0, 0, f"invalid YAML: {shorten(str(error), 200)}")
    mark = error.problem_mark or error.context_mark
    message = f"invalid YAML: {error.problem or error.context or 'syntax error'}"
    if error.context and error.problem:
        message += f" {error.context}"
        if error.context_mark is not None and error.context_mark is not mark:
            context = error.context_mark
            message += f" (line {context.line + 1}, column {context.column + 1})"
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (0, 0)
    return Problem(file, line, column, message)


@dataclass(frozen=True)
class _Finding:
    path: PathParts
    node: yaml.Node
    message: str


def _finding_problem(doc: YamlDocument, finding: _Finding, rule_id_of: RuleIdOf | None) -> Problem:
    line, column = node_position(finding.node)
    rule_id = rule_id_of(doc.data, finding.path) if rule_id_of else None
    return Problem(doc.file, line, column, finding.message, format_path(finding.path), rule_id)


@dataclass
class _Scan:
    """What one pass over a node tree found (see ``_scan``)."""

    findings: list[_Finding]
    too_deep: tuple[int, int] | None = None
    nodes: int = 1
    shared: bool = False


def _scan(root: yaml.Node) -> _Scan:
    """One pass over the tree, each node once, in document order: duplicate and non-string
    keys; where collections first nest deeper than ``MAX_DEPTH`` (as on the event stream:
    an alias is not followed); the number of nodes; whether a node is reached twice (an
    alias or merge key, in which case ``nodes`` is not the expanded size)."""
    scan = _Scan([])
    visited: set[int] = set()
    stack: list[tuple[yaml.Node, PathParts, int]] = [(root, (), 1)]
    while stack:
        node, path, depth = stack.pop()
        if id(node) in visited:
            scan.shared = True
            continue
        visited.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            continue
        if depth > MAX_DEPTH:
            scan.too_deep = node_position(node)
            return scan
        children: list[tuple[yaml.Node, PathParts, int]] = []
        if isinstance(node, yaml.SequenceNode):
            children = [(child, (*path, i), depth + 1) for i, child in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            children = _mapping_children(node, path, depth, scan.findings)
            scan.shared = scan.shared or len(children) != 2 * len(node.value)
        scan.nodes += len(node.value) * (2 if isinstance(node, yaml.MappingNode) else 1)
        stack.extend(reversed(children))
    return scan


def _mapping_children(
    node: yaml.MappingNode, path: PathParts, depth: int, findings: list[_Finding]
) -> list[tuple[yaml.Node, PathParts, int]]:
    """The key and value nodes of a mapping, in order, to scan; its key problems to
    ``findings``. A merge key's value (``<<: *base``) is scanned at the mapping's path."""
    children: list[tuple[yaml.Node, PathParts, int]] = []
    seen: dict[str, yaml.Node] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE_TAG:
            children.append((value_node, path, depth + 1))
            continue
        key = _key_text(key_node)
        children.append((key_node, (*path, key), depth + 1))
        children.append((value_node, (*path, key), depth + 1))
        if key_node.tag != _STR_TAG:
            findings.append(_Finding((*path, key), key_node, _key_type_message(key_node, key)))
        if key in seen:
            first = node_position(seen[key])[0]
            message = f"duplicate key {key!r} (first given at line {first})"
            findings.append(_Finding((*path, key), key_node, message))
        else:
            seen[key] = key_node
    return children


def _key_text(key_node: yaml.Node) -> str:
    if isinstance(key_node, yaml.ScalarNode):
        return str(key_node.value)
    return "<mapping>" if isinstance(key_node, yaml.MappingNode) else "<list>"


def _key_type_message(key_node: yaml.Node, key: str) -> str:
    if not isinstance(key_node, yaml.ScalarNode):
        return "a key must be a plain string, not a mapping or a list"
    what = _TAG_WORDS.get(key_node.tag, f"type {key_node.tag}")
    return f"key {key!r} is read by YAML as {what}, not a string; quote it: '{key}'"


def _expanded_shape(
    node: yaml.Node, memo: dict[int, tuple[int, int]], limit: int
) -> tuple[int, int]:
    """(number of nodes, at most ``limit`` + 1; depth of nested collections) once aliases
    are expanded; recursive aliases count as too many nodes. Aliased nodes come before
    their aliases in a document, so with ``memo`` the recursion goes no deeper than the
    text itself nests."""
    known = memo.get(id(node))
    if known is not None:
        return known
    memo[id(node)] = (limit + 1, 0)  # in progress: a cycle means "too large"
    size, depth = 1, 0
    if isinstance(node, yaml.SequenceNode | yaml.MappingNode):
        children = (
            node.value
            if isinstance(node, yaml.SequenceNode)
            else [child for pair in node.value for child in pair]
        )
        for child in children:
            child_size, child_depth = _expanded_shape(child, memo, limit)
            size += child_size
            depth = max(depth, child_depth)
        depth += 1
    memo[id(node)] = (min(size, limit + 1), depth)
    return memo[id(node)]


class _Constructor(yaml.constructor.SafeConstructor):
    """``safe_load``'s constructor, except that every mapping key becomes its string text
    (problems about non-string keys are reported by ``_scan``)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        self.flatten_mapping(node)
        mapping: dict[Hashable, Any] = {}
        for key_node, value_node in node.value:
            mapping[_key_text(key_node)] = self.construct_object(value_node, deep=deep)
        return mapping

    def construct_pairs_as_lists(self, node: yaml.Node) -> Iterator[list[Any]]:
        """``!!pairs`` / ``!!omap`` as a list of ``[key, value]`` lists: JSON data, never
        tuples (which Python's jsonschema and Rust's take differently)."""
        pairs: list[list[Any]] = []
        yield pairs
        steps = self.construct_yaml_pairs(node)
        built = next(steps)
        for _ in steps:  # the second step fills ``built`` (or raises ConstructorError)
            pass
        pairs.extend([key, value] for key, value in built)


# types-PyYAML binds add_constructor to loader classes; a constructor subclass works the same
for _tag in ("tag:yaml.org,2002:pairs", "tag:yaml.org,2002:omap"):
    _Constructor.add_constructor(_tag, _Constructor.construct_pairs_as_lists)  # type: ignore[type-var]


# ---------------------------------------------------------------------------------------------
# Schema validation


@cache
def schema_validator(name: str) -> Draft202012Validator:
    """The compiled ``Draft202012Validator`` for ``schemas/<name>`` (compiled once, cached).

    Raises ``FileNotFoundError`` when the schema is not installed and
    ``jsonschema.SchemaError`` when it is not a valid schema.
    """
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


_FAITHFUL_ESCAPES = re.compile(r"\\[^.nrt\\/^$()\[\]{}*+?|-]")


@cache
def fast_schema_check(name: str) -> Callable[[Any], bool] | None:
    """A compiled ``jsonschema_rs`` (Rust) check of ``schemas/<name>``: True when the data is
    valid, 100 times faster than ``schema_validator``; None when ``jsonschema_rs`` is not
    installed or the schema has a pattern whose meaning could differ between Python's ``re``
    and Rust's regex engine (a class escape such as ``\\s``, ``\\w``, ``\\d``, ``\\b``).

    Only a yes is trusted: on False, or on data it cannot take (a YAML date, set or binary),
    ``schema_problems`` asks ``schema_validator``, whose errors it reports. Both implement
    draft 2020-12; formats are not asserted by either. Meant for data built by this module's
    YAML constructor (no tuples, which Rust would take as arrays: ``!!pairs`` and ``!!omap``
    are built as lists).
    """
    schema = load_schema(name)
    try:
        import jsonschema_rs  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    patterns = [value for key, value in _schema_items(schema) if key == "pattern"]
    if any(_FAITHFUL_ESCAPES.search(str(pattern)) for pattern in patterns):
        return None
    validator = jsonschema_rs.Draft202012Validator(schema, validate_formats=False)

    def check(data: Any) -> bool:
        try:
            return bool(validator.is_valid(data))
        except (ValueError, TypeError, OverflowError):
            return False

    return check


def _schema_items(schema: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair anywhere in a JSON schema document."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                yield str(key), value
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)


def schema_problems(
    doc: YamlDocument, schema_name: str, rule_id_of: RuleIdOf | None = None
) -> list[Problem]:
    """Every JSON Schema error of ``doc.data`` against ``schema_name``, as located problems.

    Errors are reworded (unknown key, missing key, enum, type, pattern, ...); when a value has
    the wrong type, other complaints about that same value are dropped.
    """
    fast = fast_schema_check(schema_name)
    if fast is not None and fast(doc.data):
        return []
    errors = list(schema_validator(schema_name).iter_errors(doc.data))
    wrong_type = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
    problems: dict[tuple[str, int, int, str], Problem] = {}
    for error in errors:
        path = tuple(error.absolute_path)
        if error.validator != "type" and path in wrong_type:
            continue
        for where, at_key, message in _reword(doc, error):
            rule_id = rule_id_of(doc.data, where) if rule_id_of else None
            problem = doc.problem(where, message, rule_id=rule_id, at_key=at_key)
            problems.setdefault((problem.path, problem.line, problem.column, message), problem)
    return sorted_problems(problems.values())


def sorted_problems(problems: Iterable[Problem]) -> list[Problem]:
    """``problems`` (any iterable of ``Problem``) in file, line, column order."""
    return sorted(problems, key=lambda p: (p.file, p.line, p.column, p.path, p.message))


_Reworded = list[tuple[PathParts, bool, str]]


def _reword(doc: YamlDocument, error: Any) -> _Reworded:
    """Plain sentences for one jsonschema error: [(path, at_key, message)]."""
    path: PathParts = tuple(error.absolute_path)
    if isinstance(error.schema, dict) and error.schema.get("x-secret-name"):
        return [(path, False, SECRET_NOT_NAME_MESSAGE)]  # never the value: it may be a secret
    if "propertyNames" in error.relative_schema_path:
        return [((*path, str(error.instance)), True, _pattern_message(error))]
    handler = _REWORDERS.get(str(error.validator))
    if handler is not None:
        return handler(doc, error, path)
    return [(path, False, shorten(str(error.message), 200))]


def _reword_additional(doc: YamlDocument, error: Any, path: PathParts) -> _Reworded:
    allowed = list(error.schema.get("properties", {}))
    out: _Reworded = []
    for extra in sorted(set(error.instance) - set(allowed), key=str):
        message = f"unknown key {shorten(str(extra))!r}"
        close = difflib.get_close_matches(str(extra), allowed, n=1)
        if close:
            message += f"; did you mean {close[0]!r}?"
        message += f" (allowed: {', '.join(allowed)})" if allowed else " (no keys are allowed here)"
        out.append(((*path, str(extra)), True, message))
    return out


def _reword_required(doc: YamlDocument, error: Any, path: PathParts) -> _Reworded:
    missing = [key for key in error.validator_value if key not in error.instance]
    return [(path, False, f"missing required key {key!r}") for key in missing]


def _reword_enum(doc: YamlDocument, error: Any, path: PathParts) -> _Reworded:
    options = ", ".join(str(option) for option in error.validator_value)
    return [(path, False, f"must be one of: {options} (got {describe(doc, path, error.instance)})")]


def _reword_const(doc: YamlDocument, error: Any, path: PathParts) -> _Reworded:
    got = describe(doc, path, error.instance)
    return [(path, False, f"must be {error.validator_value!r} (got {got})")]


def _reword_type(doc: YamlDocument, error: Any, path: PathParts) -> _Reworded:
    expected = error.validator_value
    names = [expected] if isinstance(expected, str) else list(expected)
    wanted = " or ".join(_TYPE_WORDS.get(name, name) for name in names)
    message = f"must be {wanted}, not {describe(doc, path, error.instance)}"
    node = doc.node_at(path)
    if "string" in names and isinstance(node, yaml.ScalarNode) and node.tag != _STR_TAG:
        written = shorten(str(node.value))
        if isinstance(error.instance, float):
            message += f" (YAML reads an unquoted {written} as a float)"
        message += f'; quote it: "{written}"'
    return [(path, False, message)]


def _reword_pattern(doc: YamlDocument, error: Any, path: PathParts) -> _Reworded:
    return [(path, False, _pattern_message(error))]


def _pattern_message(error: Any) -> str:
    """``'X' is not a valid rule id (...)`` from the schema's ``x-pattern-message``."""
    shown = repr(shorten(str(error.instance)))
    if error.validator != "pattern":
        return f"{shown}: {shorten(str(error.message), 200)}"
    explained = error.schema.get("x-pattern-message")
    if explained:
        return f"{shown} {explained}"
    return f"{shown} does not match the pattern {error.validator_value}"


def _reword_length(doc: YamlDocument, error: Any, path: PathParts) -> _Reworded:
    limit = error.validator_value
    if error.validator == "minLength":
        message = "must not be empty" if limit == 1 else f"must be at least {limit} characters long"
    else:
        message = f"is too long ({len(error.instance)} characters; at most {limit})"
    return [(path, False, message)]


def _reword_items(doc: YamlDocument, error: Any, path: PathParts) -> _Reworded:
    limit = error.validator_value
    noun = "item" if limit == 1 else "items"
    if error.validator == "minItems":
        message = "must not be empty" if limit == 1 else f"must list at least {limit} {noun}"
    else:
        message = f"must list at most {limit} {noun} (got {len(error.instance)})"
    return [(path, False, message)]


def _reword_unique(doc: YamlDocument, error: Any, path: PathParts) -> _Reworded:
    seen: list[Any] = []
    for index, item in enumerate(error.instance):
        if item in seen:
            shown = shorten(json.dumps(item, default=str))
            return [((*path, index), False, f"repeats {shown} (each item must be different)")]
        seen.append(item)
    return [(path, False, "items must all be different")]


def _reword_bound(doc: YamlDocument, error: Any, path: PathParts) -> _Reworded:
    words = {
        "minimum": "at least",
        "maximum": "at most",
        "exclusiveMinimum": "greater than",
        "exclusiveMaximum": "less than",
    }
    bound = f"{words[str(error.validator)]} {error.validator_value}"
    return [(path, False, f"must be {bound} (got {error.instance})")]


def _reword_properties_count(doc: YamlDocument, error: Any, path: PathParts) -> _Reworded:
    schema = error.schema
    names = list(schema.get("properties", {}))
    found = ", ".join(str(key) for key in error.instance) or "nothing"
    if schema.get("minProperties") == schema.get("maxProperties") == 1 and names:
        message = f"must hold exactly one of: {', '.join(names)} (found: {found})"
    elif error.validator == "minProperties":
        message = f"must hold at least {error.validator_value} keys (found: {found})"
    else:
        message = f"must hold at most {error.validator_value} keys (found: {found})"
    return [(path, False, message)]


_REWORDERS: dict[str, Callable[[YamlDocument, Any, PathParts], _Reworded]] = {
    "additionalProperties": _reword_additional,
    "required": _reword_required,
    "enum": _reword_enum,
    "const": _reword_const,
    "type": _reword_type,
    "pattern": _reword_pattern,
    "minLength": _reword_length,
    "maxLength": _reword_length,
    "minItems": _reword_items,
    "maxItems": _reword_items,
    "uniqueItems": _reword_unique,
    "minimum": _reword_bound,
    "maximum": _reword_bound,
    "exclusiveMinimum": _reword_bound,
    "exclusiveMaximum": _reword_bound,
    "minProperties": _reword_properties_count,
    "maxProperties": _reword_properties_count,
}


# ---------------------------------------------------------------------------------------------
# Values and positions


def shorten(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters, ending in ``…`` when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(doc: YamlDocument, path: PathParts, value: Any) -> str:
    """A short phrase for a value as written, e.g. ``the number 5000.00`` or ``a mapping``."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {shorten(value)!r}"
    node = doc.node_at(path)
    written = str(node.value) if isinstance(node, yaml.ScalarNode) else str(value)
    if value is None:
        return "an empty value (null)"
    if isinstance(value, bool):
        return f"the boolean {shorten(written)}"
    if isinstance(value, int | float):
        return f"the number {shorten(written)}"
    return f"the {type(value).__name__} {shorten(written)}"


def scalar_position(text: str, node: yaml.Node | None, offset: int) -> tuple[int, int]:
    """1-based (line, column) in the file of character ``offset`` of scalar ``node``'s value.

    Exact for single-line plain and quoted scalars and for literal (``|``) and folded (``>``)
    block scalars; for quoted scalars with escapes it is a best effort that still names the
    right line. Falls back to where the node starts.
    """
    if not isinstance(node, yaml.ScalarNode) or node.start_mark is None:
        return node_position(node)
    best: tuple[int, int, int] | None = None
    for value_start, line, column in _scalar_segments(text.splitlines(), node):
        if value_start > offset:
            break
        best = (value_start, line, column)
    if best is None:
        return node_position(node)
    value_start, line, column = best
    return line + 1, column + (offset - value_start) + 1


def _scalar_segments(lines: list[str], node: yaml.ScalarNode) -> Iterator[tuple[int, int, int]]:
    """For each source line of ``node``: (offset in the value, 0-based line, 0-based column)
    where that line's text starts."""
    value = str(node.value)
    style = node.style or ""
    first, last = node.start_mark.line, node.end_mark.line
    if node.end_mark.column == 0 and last > first:
        last -= 1
    cursor = 0
    for number in range(first, min(last, len(lines) - 1) + 1):
        source = lines[number]
        if number == first and style in ("|", ">"):
            continue  # the indicator line holds no content
        if number == first:
            start = node.start_mark.column + (1 if style in ('"', "'") else 0)
        else:
            start = len(source) - len(source.lstrip(" \t"))
        piece = source[start:]
        if not piece.strip():
            continue
        found = _align(value, cursor, piece)
        if found is None:
            continue
        position, length = found
        yield position, number, start
        cursor = position + length


def _align(value: str, cursor: int, piece: str) -> tuple[int, int] | None:
    """Where ``piece`` (a source line's text) continues ``value`` at or after ``cursor``."""
    position = cursor
    while position < len(value) and value[position] in " \t\n":
        position += 1
    length = _common_prefix(value, position, piece)
    if length == 0:
        probe = piece[:12].strip()
        position = value.find(probe, cursor) if probe else -1
        if position < 0:
            return None
        length = _common_prefix(value, position, piece)
    return position, length


def _common_prefix(value: str, position: int, piece: str) -> int:
    length = 0
    while (
        length < len(piece)
        and position + length < len(value)
        and value[position + length] == piece[length]
    ):
        length += 1
    return length
