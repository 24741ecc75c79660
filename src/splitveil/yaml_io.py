"""YAML reading with a bound on what aliases can expand to.

``yaml.safe_load`` shares one object between an anchor and its aliases, so a 1 KB file of nested aliases
("billion laughs") builds a small graph that becomes astronomically large the moment anything walks it as a
tree: the run id serialises the config, so such a file hung the run. Here the composed node graph is measured
before anything is constructed: its size *as a tree* (aliases expanded) is computed with a memo over shared
nodes, which costs time proportional to the file, and a file that would expand past :data:`MAX_EXPANDED_NODES`
nodes, or holds a recursive alias, is refused with an error naming it."""
from __future__ import annotations

from typing import Any

import yaml

from .params import ConfigError

#: the most nodes (scalars, mappings, sequences) a config may hold once every alias is expanded. The largest
#: shipped sweep file expands to a few thousand.
MAX_EXPANDED_NODES = 200_000


def _expanded_size(root: yaml.Node, source: str) -> int:
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:                      # iterative post-order walk: deep nesting cannot overflow the stack
        node, done = stack.pop()
        key = id(node)
        if done:
            if isinstance(node, yaml.MappingNode):
                children = [c for pair in node.value for c in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = list(node.value)
            else:
                children = []
            total = 1 + sum(sizes[id(c)] for c in children)
            active.discard(key)
            sizes[key] = total
            if total > MAX_EXPANDED_NODES:
                raise ConfigError(f"{source}: YAML aliases expand to more than {MAX_EXPANDED_NODES:,} nodes "
                                  "(nested anchors and aliases, a 'billion laughs' file); refused before reading it")
            continue
        if key in sizes:
            continue
        if key in active:
            raise ConfigError(f"{source}: a YAML alias refers to a node that contains it (a recursive alias); "
                              "refused")
        active.add(key)
        stack.append((node, True))
        if isinstance(node, yaml.MappingNode):
            stack.extend((c, False) for pair in node.value for c in pair if id(c) not in sizes)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((c, False) for c in node.value if id(c) not in sizes)
    return sizes[id(root)]


def safe_load_bounded(text: str, source: str = "YAML") -> Any:
    """``yaml.safe_load(text)``, refusing input whose aliases expand past :data:`MAX_EXPANDED_NODES` nodes or
    recurse. ``source`` names the file (or field) in the error; YAML syntax errors propagate as ``yaml.YAMLError``."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()
