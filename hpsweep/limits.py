"""Bounds on what a sweep's input files may hold, checked before anything is built from them.

MLflow refuses some names and lengths outright (a permanent error, not an outage: it must never reach a
trial), and PyYAML builds whatever a document describes (a 322-byte alias bomb, a list 10,000 deep).
The MLflow limits are mirrored here, not imported: validation runs before MLflow is (a second and a
half); tests/test_input_limits.py holds them equal to ``mlflow.utils.validation``'s.
"""

from __future__ import annotations

import posixpath
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any

import yaml

# ---------------------------------------------------------------- MLflow's limits (mlflow.utils.validation)

MLFLOW_MAX_KEY_CHARS = 250  # MAX_ENTITY_KEY_LENGTH: a param's or tag's key
MLFLOW_MAX_PARAM_VALUE_CHARS = 6000  # MAX_PARAM_VAL_LENGTH (below PostgreSQL's varchar(8000) column)
MLFLOW_MAX_TAG_VALUE_CHARS = 8000  # MAX_TAG_VAL_LENGTH: the combination's JSON is a tag (hpsweep.hparams)
# validate_param_and_metric_name (POSIX): letters, digits, '_', '-', '.', ' ', ':' and '/'.
_MLFLOW_KEY_CHARS = re.compile(r"[/\w.\- :]*")

# ---------------------------------------------------------------- hpsweep's own bounds

# One hparam or setting value (its text): a value is a choice, not data. Well below MLflow's 6,000 so
# that several long values still fit the 8,000-character hparams tag, and run names, the leaderboard
# and the trainer's environment stay readable.
MAX_VALUE_CHARS = 1000
# Nested collections in a YAML document (a combinations file is 3 deep: mapping, list, mapping).
MAX_YAML_DEPTH = 8
# A document's nodes once aliases are expanded: far above any real sweep, far below an alias bomb.
MAX_YAML_NODES = 2_000_000
# A combinations, spec or params file (a 10 MiB CSV holds ~200,000 combinations).
MAX_INPUT_FILE_BYTES = 10 * 2**20
# Characters of a value that a message quotes.
QUOTE_CHARS = 200


def mlflow_key_problem(key: str) -> str | None:
    """Why MLflow would refuse ``key`` as a param key (None: it accepts it). The same checks as
    ``mlflow.utils.validation._validate_param``, in words a user can act on."""
    if len(key) > MLFLOW_MAX_KEY_CHARS:
        return f"a key of {len(key)} characters: MLflow's limit for a param key is {MLFLOW_MAX_KEY_CHARS}"
    if not key.strip():
        return "an empty key: MLflow needs a param name"
    if not _MLFLOW_KEY_CHARS.fullmatch(key):
        return ("MLflow param keys may only hold letters, digits, '_', '-', '.', ' ', ':' and '/'")
    normalized = posixpath.normpath(key)
    if normalized != key:
        return f"MLflow refuses path-like param keys: this one would resolve to {shown(normalized)}"
    if normalized == "." or normalized.startswith(("..", "/")):
        return "MLflow refuses path-like param keys: this one is '.' or starts with '..' or '/'"
    return None


# ---------------------------------------------------------------- quoting values in messages

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 3, 8, 8, 8
_REPR.maxstring, _REPR.maxother = 80, 80


def shown(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` in at most about ``limit`` characters, built without walking the rest of it
    (quoting a 10 MB string or a deeply nested list costs nothing)."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        quoted = repr(value[:limit])
        return f"{quoted[:-1]}…{quoted[-1]}"
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int past Python's 4,300-digit limit for str()
        return f"<an integer of {value.bit_length():,} bits>"
    return text if len(text) <= limit else text[:limit] + "…"


def value_too_long(value: Any, length: int, limit: int = MAX_VALUE_CHARS) -> str:
    return f"value {shown(value)} is {length:,} characters long: the limit is {limit:,}"


def shortened(text: str, limit: int = QUOTE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def cut_at_word(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters, ending in "…" when cut; cut at a space when one is in
    the last fifth, so a reason never ends mid-word (``set the 'skops_trusted_types' p…``)."""
    if len(text) <= limit:
        return text
    head = text[:limit - 1]
    space = head.rfind(" ")
    return (head[:space] if space >= limit * 4 // 5 else head).rstrip() + "…"


# ---------------------------------------------------------------- YAML within bounds


@dataclass(frozen=True)
class YamlLimitHit:
    """A part of a YAML document past a bound: ``path`` is the keys/indexes down to it."""

    path: tuple[Any, ...]
    message: str


def yaml_limit_hit(text: str, max_depth: int = MAX_YAML_DEPTH, max_nodes: int = MAX_YAML_NODES
                   ) -> YamlLimitHit | None:
    """Where ``text`` first goes past a bound (depth, size after aliases, a recursive alias), from one
    pass over the parser's events: the parser is iterative and builds nothing, while PyYAML's composer
    recurses once per level and its constructor shares aliased values that whatever walks them then
    expands. None: within bounds, or not YAML up to a bound (the loader then says why, as ever)."""
    # libyaml's parser first (a tenth of the load's time, not as much again); where it finds an error
    # (its own nesting limit is 1,000) PyYAML's, which the loader uses, has the last word.
    for loader in dict.fromkeys([getattr(yaml, "CSafeLoader", yaml.SafeLoader), yaml.SafeLoader]):
        scan = _Scan(max_depth, max_nodes)
        try:
            for event in yaml.parse(text, Loader=loader):
                if scan.feed(event):
                    return scan.hit
            return None
        except yaml.YAMLError:
            continue
    return None


# An int's text past this stays text (then refused as too long): int() stops at 4,300 digits.
MAX_INT_CHARS = 4000


class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that never raises on an integer too long for int()."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> Any:
        text = self.construct_scalar(node)
        return text if len(text) > MAX_INT_CHARS else super().construct_yaml_int(node)


BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)


@dataclass
class _Open:
    """A mapping or sequence the scan is inside."""

    path: tuple[Any, ...]
    is_mapping: bool
    anchor: str | None
    nodes: int = 1  # its own and its children's, aliases expanded
    height: int = 1  # nesting levels from it down
    children: int = 0  # a mapping's keys and values alternate
    key: Any = "?"


@dataclass
class _Scan:
    max_depth: int
    max_nodes: int
    hit: YamlLimitHit | None = None
    stack: list[_Open] = field(default_factory=list)
    anchors: dict[str, tuple[int, int]] = field(default_factory=dict)  # anchor -> (nodes, height)
    total: int = 0

    def feed(self, event: yaml.Event) -> bool:
        """Account for one event; True: stop, a bound that ends the scan was hit."""
        if isinstance(event, yaml.CollectionEndEvent):
            done = self.stack.pop()
            if done.anchor is not None:
                self.anchors[done.anchor] = (done.nodes, done.height)
            self._close_child(done.nodes, done.height)
            return False
        if not isinstance(event, yaml.NodeEvent):
            return False
        path = self._child_path()
        if isinstance(event, yaml.CollectionStartEvent):
            self.total += 1
            if len(self.stack) >= self.max_depth:
                return self._stop(path, f"nested deeper than {self.max_depth} levels")
            self.stack.append(_Open(path, isinstance(event, yaml.MappingStartEvent), event.anchor))
            return False
        if isinstance(event, yaml.AliasEvent):
            if any(o.anchor == event.anchor for o in self.stack):
                return self._stop(path, f"the alias *{shortened(event.anchor, 40)} refers to a value that "
                                        "contains it (a recursive document)")
            nodes, height = self.anchors.get(event.anchor, (1, 0))  # an unknown alias: PyYAML names it
            if len(self.stack) + height > self.max_depth:
                return self._stop(path, f"nested deeper than {self.max_depth} levels once aliases are expanded")
        else:
            nodes, height = 1, 0
            if event.anchor is not None:
                self.anchors[event.anchor] = (1, 0)
        self.total += nodes
        if self.total > self.max_nodes:
            return self._stop(path, f"more than {self.max_nodes:,} values once aliases are expanded")
        self._close_child(nodes, height, event.value if isinstance(event, yaml.ScalarEvent) else "?")
        return False

    def _child_path(self) -> tuple[Any, ...]:
        if not self.stack:
            return ()
        parent = self.stack[-1]
        if not parent.is_mapping:
            return (*parent.path, parent.children)
        return parent.path if parent.children % 2 == 0 else (*parent.path, parent.key)

    def _close_child(self, nodes: int, height: int, key: Any = "?") -> None:
        if not self.stack:
            return
        parent = self.stack[-1]
        parent.nodes += nodes
        parent.height = max(parent.height, height + 1)
        if parent.is_mapping and parent.children % 2 == 0:
            parent.key = key
        parent.children += 1

    def _stop(self, path: tuple[Any, ...], message: str) -> bool:
        self.hit = YamlLimitHit(path, message)
        return True
