"""Reading a policy file's YAML nodes: shapes and scalars, each problem kept with its line.

YAML subtleties handled here: files are composed to nodes (``yaml.SafeLoader``'s composer, so
every value keeps its line), duplicate mapping keys are errors (PyYAML would keep the last
one), and time-of-day values are read from the source text (YAML 1.1 reads ``18:00`` as the
base-60 integer 1080).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

__all__ = ["FileReader", "PolicyIssue", "compose", "describe"]

_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MAX_TEXT = 500


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.key}: {self.message}"


def describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    tag = node.tag.rsplit(":", 1)[-1]
    shown = node.value if len(node.value) <= 40 else node.value[:40] + "..."
    return {"str": f"string {shown!r}", "null": "null", "bool": f"boolean {shown}",
            "int": f"integer {shown}", "float": f"number {shown}"}.get(tag, f"{tag} {shown!r}")


class FileReader:
    """Reads one file's nodes, recording every problem with its line."""

    def __init__(self, name: str, issues: list[PolicyIssue]) -> None:
        self.name = name
        self.issues = issues

    def err(self, node: yaml.Node | None, key: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.issues.append(PolicyIssue(self.name, line, key, message))

    # -- shapes -------------------------------------------------------------------------------
    def mapping(self, node: yaml.Node, key: str, allowed: Sequence[str] | None,
                required: Sequence[str] = ()) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        if not isinstance(node, yaml.MappingNode):
            self.err(node, key or "(top level)", f"expected a mapping, got {describe(node)}")
            return None
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for knode, vnode in node.value:
            if isinstance(knode, yaml.ScalarNode) and knode.value == "<<":
                self.err(knode, f"{key}.<<" if key else "<<", "YAML merge keys (<<) are not supported")
                continue
            if not (isinstance(knode, yaml.ScalarNode) and knode.tag.endswith(":str")):
                self.err(knode, key or "(top level)", f"expected string keys, got {describe(knode)}")
                continue
            k = knode.value
            sub = f"{key}.{k}" if key else k
            if k in out:
                self.err(knode, sub, f"duplicate key (first at line {out[k][0].start_mark.line + 1})")
                continue
            if allowed is not None and k not in allowed:
                self.err(knode, sub, f"unknown key; expected one of {', '.join(allowed)}")
                continue
            out[k] = (knode, vnode)
        for k in required:
            if k not in out:
                self.err(node, f"{key}.{k}" if key else k, "required key is missing")
        return out

    def _scalar(self, node: yaml.Node) -> Any:
        return _SCALAR_LOADER.yaml_constructors[node.tag](_SCALAR_LOADER, node)

    def string(self, node: yaml.Node, key: str, *, pattern: re.Pattern[str] | None = None,
               what: str = "a string", max_len: int = _MAX_TEXT, multiline: bool = False) -> str | None:
        if not (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":str")):
            hint = ""
            if isinstance(node, yaml.ScalarNode) and not node.style and not node.tag.endswith(":null"):
                hint = f' (quote it: "{node.value}")'
            self.err(node, key, f"expected {what}, got {describe(node)}{hint}")
            return None
        value: str = node.value
        if pattern is not None and not pattern.fullmatch(value):
            self.err(node, key, f"expected {what}, got {value[:60]!r}")
            return None
        if not value.strip():
            self.err(node, key, f"expected {what}, got an empty string")
            return None
        if len(value) > max_len:
            self.err(node, key, f"expected at most {max_len} characters, got {len(value)}")
            return None
        if any(ord(c) < 0x20 and c != "\t" and not (multiline and c == "\n") for c in value):
            self.err(node, key, "control characters are not allowed")
            return None
        return value

    def boolean(self, node: yaml.Node, key: str) -> bool | None:
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":bool"):
            return bool(self._scalar(node))
        self.err(node, key, f"expected true or false, got {describe(node)}")
        return None

    def number(self, node: yaml.Node, key: str, *, integer: bool, lo: float, hi: float) -> float | None:
        ok_tags = (":int",) if integer else (":int", ":float")
        if not (isinstance(node, yaml.ScalarNode) and node.tag.endswith(ok_tags)):
            self.err(node, key, f"expected {'an integer' if integer else 'a number'}, got {describe(node)}")
            return None
        value = self._scalar(node)
        if not (lo <= value <= hi):  # NaN fails this too
            self.err(node, key, f"expected a value in [{lo:g}, {hi:g}], got {node.value}")
            return None
        return value  # type: ignore[no-any-return]

    def strings(self, node: yaml.Node, key: str, **kw: Any) -> list[tuple[str, yaml.Node]] | None:
        """A string or a non-empty list of distinct strings (any-of)."""
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        if isinstance(node, yaml.SequenceNode) and not items:
            self.err(node, key, "expected a non-empty list")
            return None
        out: list[tuple[str, yaml.Node]] = []
        seen: set[str] = set()
        ok = True
        for i, item in enumerate(items):
            sub = f"{key}[{i}]" if isinstance(node, yaml.SequenceNode) else key
            value = self.string(item, sub, **kw)
            if value is None:
                ok = False
                continue
            if value in seen:
                self.err(item, sub, f"duplicate value {value!r}")
                ok = False
                continue
            seen.add(value)
            out.append((value, item))
        return out if ok else None

    def raw_text(self, node: yaml.Node, key: str) -> str | None:
        """A scalar's source text: time-of-day values, which YAML 1.1 would mangle."""
        if isinstance(node, yaml.ScalarNode) and not node.tag.endswith(":null"):
            return str(node.value)
        self.err(node, key, f"expected a time \"HH:MM\", got {describe(node)}")
        return None


_SCALAR_LOADER = yaml.SafeLoader("")  # only its stateless scalar constructors are used


def compose(f: FileReader, text: str) -> yaml.Node | None:
    loader = _SafeLoader(text)
    try:
        return loader.get_single_node()  # type: ignore[no-any-return]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        f.issues.append(
            PolicyIssue(f.name, line, "(yaml)", f"{exc.context or ''} {exc.problem or ''}".strip())
        )
    except yaml.YAMLError as exc:
        f.issues.append(PolicyIssue(f.name, 1, "(yaml)", str(exc).splitlines()[0]))
    finally:
        loader.dispose()
    return None
