"""The one way autoreg reads YAML (PAIR.yaml, recipes): PyYAML's safe loader, bounded.

A safe loader alone still lets a few lines of aliases expand into billions of values (an "alias bomb") once the
data is walked, and silently keeps the last of two equal keys. Here the composed document is measured with its
aliases expanded, before anything walks it, and a duplicate key is an error that names the key and its lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import UserError, excerpt, special_file

#: Larger files are refused unread: a PAIR.yaml or a recipe (with its provenance) is a few kB.
MAX_BYTES = 2_000_000
#: Values in the document once its aliases are expanded (a recipe with a 3D fingerprint holds a few hundred).
MAX_NODES = 100_000
#: Alias uses (``*name``) in one document.
MAX_ALIASES = 1_000


class _Refused(yaml.YAMLError):
    """A document this loader will not build; ``line`` is 1-based (0: the document as a whole)."""

    def __init__(self, message: str, line: int = 0, key: str | None = None):
        super().__init__(message)
        self.message, self.line, self.key = message, line, key


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts aliases, measures the expanded document and refuses duplicate keys."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise _Refused(f"more than {MAX_ALIASES} aliases", mark.line + 1)
        return super().compose_node(parent, index)

    def compose_document(self):  # type: ignore[no-untyped-def]
        node = super().compose_document()
        if node is not None:
            _check_expanded_size(node)
        return node

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the constructor below gives PyYAML's own error
                    continue
                if first is not None:
                    raise _Refused(
                        f"duplicate key {excerpt(key)} at line {line} (first at line {first}); "
                        "each key may appear once",
                        line,
                        key=excerpt(key, quote=False),
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the values the document holds with every alias expanded, without expanding anything (each node's
    size is computed once); refuse past ``MAX_NODES`` and refuse an alias to a node that contains itself."""
    size: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        ident = id(node)
        if children_done:
            open_nodes.discard(ident)
            total = 1 + sum(size[id(c)] for c in _children(node))
            if total > MAX_NODES:
                raise _Refused(
                    f"the document expands to more than {MAX_NODES} values (nested aliases?)",
                    node.start_mark.line + 1,
                )
            size[ident] = total
            continue
        if ident in size:
            continue
        if ident in open_nodes:
            raise _Refused(
                "an alias refers to a node that contains it (a recursive structure)", node.start_mark.line + 1
            )
        open_nodes.add(ident)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in open_nodes:
                raise _Refused(
                    "an alias refers to a node that contains it (a recursive structure)", child.start_mark.line + 1
                )
            if id(child) not in size:
                stack.append((child, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load_yaml_text(text: str, *, source: str | Path, what: str = "YAML") -> Any:
    """Parse one YAML document from ``text``; every problem is a one-line ``UserError`` naming ``source``."""
    if len(text) > MAX_BYTES:
        raise UserError(f"is {len(text)} characters long; expected a {what} file under {MAX_BYTES} bytes", file=source)
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except _Refused as err:
        where = f" (line {err.line})" if err.line and "line" not in err.message else ""
        raise UserError(f"{err.message}{where}", file=source, key=err.key) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = excerpt(getattr(err, "problem", None) or "syntax error", quote=False)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"not valid {what} ({problem}{where})", file=source) from None
    except RecursionError:
        raise UserError(f"not valid {what} (nested too deeply)", file=source) from None
    finally:
        loader.dispose()


def load_yaml_file(path: str | Path, *, what: str = "YAML", missing: str = "file not found") -> Any:
    """Read and parse a YAML file (size checked before reading); ``UserError`` for an unreadable file."""
    path = Path(path)
    special = special_file(path)
    if special:
        raise UserError(f"is {special}; expected a {what} file", file=path)
    try:
        size = path.stat().st_size
        if path.is_file() and size > MAX_BYTES:
            raise UserError(f"is {size} bytes; expected a {what} file under {MAX_BYTES} bytes", file=path)
        with path.open("r", encoding="utf-8") as fh:
            text = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise UserError(missing, file=path) from None
    except IsADirectoryError:
        raise UserError(f"cannot read (it is a folder; expected a {what} file)", file=path) from None
    except UnicodeDecodeError as err:
        raise UserError(f"not a UTF-8 text file (byte {err.start}); expected {what}", file=path) from None
    except OSError as err:
        raise UserError(f"cannot read ({err.strerror})", file=path) from None
    return load_yaml_text(text, source=path, what=what)
