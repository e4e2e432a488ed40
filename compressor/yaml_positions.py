"""Load YAML into plain Python data while remembering where every key and value came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from compressor.errors import Location, RecipeError

KeyPath = tuple[str | int, ...]


@dataclass
class SourceMap:
    """Where each key path of a parsed document sits in its file."""

    file: str
    keys: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)
    values: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)
    overridden: set[KeyPath] = field(default_factory=set)
    # keys a preset wrote on the user's behalf -> where the user wrote what they hold
    aliases: dict[KeyPath, KeyPath] = field(default_factory=dict)

    def locate(self, path: KeyPath, prefer_key: bool = False) -> Location:
        """The closest known position for `path`, walking up to its parents."""
        path = self.unalias(tuple(path))
        probe = path
        while True:
            if probe in self.overridden:
                return Location("<command line>", None, None, format_path(path))
            table = (self.keys, self.values) if prefer_key else (self.values, self.keys)
            for marks in table:
                if probe in marks:
                    line, column = marks[probe]
                    return Location(self.file, line, column, format_path(path))
            if not probe:
                return Location(self.file, None, None, format_path(path))
            probe = probe[:-1]

    def unalias(self, path: KeyPath) -> KeyPath:
        """`path` rewritten through the longest alias that prefixes it (repeatedly)."""
        for _ in range(8):  # aliases may chain; never loop forever on a bad table
            prefixes = [a for a in self.aliases if path[: len(a)] == a]
            if not prefixes:
                return path
            longest = max(prefixes, key=len)
            path = (*self.aliases[longest], *path[len(longest) :])
        return path


def format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_yaml(text: str, file: str) -> tuple[Any, SourceMap]:
    """Parse `text`; duplicate keys are an error (YAML would silently keep the last one)."""
    source = SourceMap(file)
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return {}, source
            data = _build(loader, node, (), source)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        location = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file)
        raise RecipeError(location, f"invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:  # e.g. a control character the YAML reader refuses
        raise RecipeError(Location(file), f"invalid YAML: {exc}", "a YAML text file") from None
    return data, source


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _build(loader: yaml.SafeLoader, node: yaml.Node, path: KeyPath, source: SourceMap) -> Any:
    source.values[path] = _mark(node)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in out:
                raise RecipeError(
                    Location(source.file, *_mark(key_node), format_path((*path, key))),
                    f"duplicate key {key!r}",
                    "each key once per mapping",
                )
            source.keys[(*path, key)] = _mark(key_node)
            out[key] = _build(loader, value_node, (*path, key), source)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, item, (*path, i), source) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)
