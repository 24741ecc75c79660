"""Cut any ``nn.Module``: the user's own model, not rewritten as a :class:`BlockModel`.

The module is traced with ``torch.fx`` (built-in ``torch.nn`` layers stay leaves). A **cut** after module
``M`` (its qualified name, e.g. ``layer2.1``) sits after the last operation that runs inside ``M``; it is valid
when exactly one value crosses it, ``M``'s output. When another value is still needed after it (the input of
a residual unit that is added back later), a skip connection crosses the cut and the cut is refused with the
list of valid ones. The graph is then cut at every valid cut into segments, which become the blocks of a
:class:`TracedModel` (a ``BlockModel``): ``SplitModel``, ``split``, the bottleneck, ``splitveil blocks``, the
pipeline, the GPZ sweep and the audit work on it unchanged. The segments hold the user's own layers, so they
share the user's parameters (a state dict loaded into the user's module before wrapping is the model's).

A module that ``torch.fx`` cannot trace (Python control flow on tensor values) is cut at its top-level children
when it is an ``nn.Sequential``; otherwise the error says so.

A user's factory is named ``module:function`` (``model.name: "mypkg.models:make_net"``): it is called with the
keyword arguments it declares among ``num_classes``, ``input_shape`` and ``width`` (only ``num_classes`` when
it takes ``**kwargs``, e.g. ``torchvision.models:resnet18``), plus ``model.options``; it returns an
``nn.Module`` (logits out), registered under that name on first use (:func:`ensure_user_model`)."""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn

from ..params import ConfigError
from ..references import import_reference, is_reference
from ..registry import did_you_mean
from .base import MODELS, BlockModel

_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand, operator.ior,
                      operator.ipow}


@dataclass
class CutPoint:
    """A valid cut: after node ``index`` of the traced graph; ``names``: the modules that end there (outermost
    first; the first is the block's name)."""
    index: int
    names: list[str]


@dataclass
class CutAnalysis:
    """Every valid cut of a traced module, and why each other module boundary is not one."""
    graph_module: fx.GraphModule | None
    cuts: list[CutPoint]
    refused: dict[str, str] = field(default_factory=dict)   # module name -> why it is not a cut
    head: str = "head"                                       # name of the segment after the last cut
    traced: bool = True

    @property
    def names(self) -> list[str]:
        return [c.names[0] for c in self.cuts]

    def aliases(self) -> dict[str, int]:
        """Every name of a valid cut (aliases included) -> 1-based cut index."""
        return {n: i for i, c in enumerate(self.cuts, 1) for n in c.names}


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _owners(node: fx.Node) -> set[str]:
    """Qualified names of every module whose forward ran ``node`` (its call stack and their parents)."""
    names = [v[0] if isinstance(v, tuple) else str(v) for v in (node.meta.get("nn_module_stack") or {}).values()]
    if node.op == "call_module":
        names.append(str(node.target))
    out: set[str] = set()
    for n in names:
        parts = [p for p in n.split(".") if p]
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def _describe(node: fx.Node) -> str:
    return f"'{node.target}'" if node.op == "call_module" else f"'{node.name}'"


def analyse(module: nn.Module) -> CutAnalysis:
    """Trace ``module`` and find its valid cuts (see the module doc)."""
    try:
        tracer = fx.Tracer()
        graph = tracer.trace(module)
    except Exception as e:  # noqa: BLE001 - any tracing failure is reported the same way
        if isinstance(module, nn.Sequential):
            names = [n for n, _ in module.named_children()]
            return CutAnalysis(None, [CutPoint(i, [n]) for i, n in enumerate(names[:-1])], {}, names[-1] if names
                               else "head", traced=False)
        raise ConfigError(f"model: {type(module).__name__} cannot be traced by torch.fx ({type(e).__name__}: "
                          f"{_first_line(e)}), so its cuts cannot be found; write it as an nn.Sequential or as a "
                          "splitveil BlockModel of named blocks") from None
    gm = fx.GraphModule(module, graph)
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ConfigError(f"model: {type(module).__name__}.forward takes {len(inputs)} inputs; a split model takes one "
                          "image batch")
    idx = {n: i for i, n in enumerate(nodes)}
    out_i = next(i for i, n in enumerate(nodes) if n.op == "output")
    last_use = {n: max((idx[u] for u in n.users), default=-1) for n in nodes}
    compute = [i for i, n in enumerate(nodes) if n.op in ("call_module", "call_function", "call_method")]
    last_compute = compute[-1] if compute else -1
    last_of: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in _owners(n):
            last_of[o] = i
    order = sorted(last_of, key=lambda m: (last_of[m], m.count("."), m))
    by_index: dict[int, list[str]] = {}
    refused: dict[str, str] = {}
    for m in order:
        i = last_of[m]
        if i >= last_compute:
            refused[m] = "nothing runs after it (the cloud part would be empty)"
            continue
        live = [n for n in nodes[: i + 1] if n.op != "get_attr" and last_use[n] > i]
        crossing = [n for n in live if n is not nodes[i]]
        if crossing:
            users = sorted({u for n in crossing for u in n.users if idx[u] > i}, key=idx.get)
            what = ", ".join(f"the output of {_describe(n)}" if n.op != "placeholder" else "the model's input"
                             for n in crossing[:3])
            refused[m] = (f"a skip connection crosses it: {what} is still used after it (by "
                          f"{', '.join(_describe(u) for u in users[:3])})")
            continue
        if nodes[i] not in live:
            refused[m] = "its output is not used by what follows"
            continue
        by_index.setdefault(i, []).append(m)
    cuts = [CutPoint(i, sorted(names, key=lambda s: (s.count("."), order.index(s))))
            for i, names in sorted(by_index.items())]
    tail = [m for m in order if last_of[m] > (cuts[-1].index if cuts else -1)]
    head = min(tail, key=lambda s: (s.count("."), order.index(s))) if tail else "head"
    return CutAnalysis(gm, cuts, refused, head)


def _mutates(node: fx.Node, x: fx.Node, gm: fx.GraphModule) -> bool:
    """``node`` may change its input ``x`` in place (an in-place activation, ``x += ...``, ``x.relu_()``)."""
    if not node.args or node.args[0] is not x:
        return False
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_function":
        return node.kwargs.get("inplace") is True or node.target in _INPLACE_FUNCTIONS
    if node.op == "call_method":
        t = str(node.target)
        return t.endswith("_") and not t.endswith("__")
    return False


def _segment(gm: fx.GraphModule, nodes: list[fx.Node], lo: int, hi: int, source: fx.Node, out: Any) -> fx.GraphModule:
    """The nodes ``lo..hi-1`` as a module reading ``source``'s value and returning ``out``. The input is copied
    first when an operation would change it in place (the transmitted features must stay as sent)."""
    g = fx.Graph()
    x = g.placeholder("x")
    part = nodes[lo:hi]
    if any(_mutates(n, source, gm) for n in part):
        x = g.call_method("clone", (x,))
    env: dict[fx.Node, fx.Node] = {source: x}

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op != "get_attr":
                raise RuntimeError(f"internal: value {n.name} crosses a cut")
            env[n] = g.node_copy(n, lookup)
        return env[n]

    for n in part:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        env[n] = g.node_copy(n, lookup)
    g.output(fx.node.map_arg(out, lookup))
    seg = fx.GraphModule(gm, g)
    return seg


def _key(name: str) -> str:
    """A module key for a qualified name (``nn.Sequential`` keys cannot hold a dot)."""
    return name.replace(".", "__")


class TracedModel(BlockModel):
    """A user's ``nn.Module`` as a ``BlockModel``: one block per segment between consecutive valid cuts, named
    after the outermost module that ends there (``block_names``); ``cut_index`` also accepts every other name of
    a cut (``layer2.1`` for ``layer2``) and explains why another module boundary is not a cut."""

    def __init__(self, module: nn.Module, input_shape: tuple[int, int, int] | None = None,
                 analysis: CutAnalysis | None = None):
        a = analysis or analyse(module)
        if not a.cuts:
            why = "; ".join(f"{k}: {v}" for k, v in list(a.refused.items())[:3])
            raise ConfigError(f"model: {type(module).__name__} has no valid cut (no module boundary that a single "
                              f"value crosses){'; ' + why if why else ''}")
        names = a.names + [a.head if a.head not in a.names else f"{a.head}_out"]
        if a.graph_module is None:   # untraceable nn.Sequential: its children are the blocks
            children = list(module.named_children())
            blocks = [(_key(n), m) for n, m in children]
            names = [n for n, _ in children]
        else:
            gm = a.graph_module
            nodes = list(gm.graph.nodes)
            out_node = next(n for n in nodes if n.op == "output")
            src = next(n for n in nodes if n.op == "placeholder")
            blocks, lo = [], 0
            for c in a.cuts:
                blocks.append((_key(c.names[0]), _segment(gm, nodes, lo, c.index + 1, src, nodes[c.index])))
                lo, src = c.index + 1, nodes[c.index]
            blocks.append((_key(names[-1]), _segment(gm, nodes, lo, nodes.index(out_node), src, out_node.args[0])))
        keys = [k for k, _ in blocks]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"model: two cut names of {type(module).__name__} map to the same block key ({keys})")
        super().__init__(blocks, tuple(input_shape) if input_shape is not None else (0, 0, 0), names=names)
        self.analysis = a
        self.source_type = type(module).__name__
        self._source = [module]   # the user's module (not a submodule: its parameters are the blocks')
        self.has_input_shape = input_shape is not None

    @property
    def source(self) -> nn.Module:
        """The user's module itself: its state dict loads into this model (the blocks share its layers)."""
        return self._source[0]

    def aliases(self) -> list[list[str]]:
        """Every name of each cut (the first is the block's name)."""
        return [list(c.names) for c in self.analysis.cuts]

    def cut_index(self, cut: int | str) -> int:
        """``cut``: a module's name (a string, even one of digits: an ``nn.Sequential`` child ``"2"``), or the number
        of blocks on the edge (an int)."""
        known = self.analysis.aliases()
        if isinstance(cut, str) and cut in known:
            return known[cut]
        if isinstance(cut, str) and not cut.lstrip("-").isdigit():
            valid = ", ".join(self.block_names[:-1])
            if cut in self.analysis.refused:
                raise ConfigError(f"model.cut: '{cut}' cannot be a cut of {self.source_type}: "
                                  f"{self.analysis.refused[cut]}; valid cuts: {valid}")
            raise ConfigError(f"model.cut: {self.source_type} has no module '{cut}'"
                              f"{did_you_mean(cut, list(known) + list(self.analysis.refused))}; valid cuts: {valid}")
        return super().cut_index(cut)

    @torch.no_grad()
    def block_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        if not self.has_input_shape:
            raise ConfigError(f"model: the input shape of {self.source_type} is not known; give input_shape=(C, H, W)")
        return super().block_shapes()


def as_block_model(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> BlockModel:
    """``model`` itself when it is a ``BlockModel``, else the user's module cut at its module boundaries."""
    if isinstance(model, BlockModel):
        return model
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected an nn.Module, got {type(model).__name__}")
    return TracedModel(model, input_shape)


# -- the user's factory ----------------------------------------------------------------------------------------
def call_factory(fn: Callable[..., Any], ref: str, num_classes: int, input_shape: tuple[int, int, int],
                 width: float = 1.0, **options: Any) -> nn.Module:
    """Call the user's model factory with the arguments it declares (see the module doc)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    params = sig.parameters if sig is not None else {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = {}
    if "num_classes" in params or var_kw or sig is None:
        kwargs["num_classes"] = num_classes
    if "input_shape" in params:
        kwargs["input_shape"] = tuple(input_shape)
    if "width" in params:
        kwargs["width"] = width
    elif width != 1.0:
        raise ConfigError(f"model.width: {ref} takes no 'width' argument (leave model.width at 1.0)")
    clash = sorted(set(options) & set(kwargs))
    if clash:
        raise ConfigError(f"model.options: {', '.join(clash)} is set by splitveil (num_classes from the data, "
                          "input_shape from the images, width from model.width)")
    try:
        module = fn(**kwargs, **options)
    except TypeError as e:
        raise ConfigError(f"model.options: calling {ref}({', '.join([*kwargs, *options])}) failed: {e}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model.name: {ref} returned a {type(module).__name__}, not an nn.Module")
    return module


def ensure_user_model(ref: str) -> None:
    """Register the user's factory ``ref`` (``module:function``) in ``MODELS`` under that name (once)."""
    if ref in MODELS._items:  # noqa: SLF001 - a plain membership test without loading entry points
        return
    if not is_reference(ref):
        raise ConfigError(f"model.name: {ref!r} is not a 'module:function' reference")
    fn = import_reference(ref, "model.name")
    if not callable(fn):
        raise ConfigError(f"model.name: {ref} is not callable (expected a function returning an nn.Module)")

    def factory(num_classes: int, input_shape: tuple[int, int, int], width: float = 1.0, **options: Any) -> BlockModel:
        return TracedModel(call_factory(fn, ref, num_classes, input_shape, width, **options), input_shape)

    MODELS.register(ref, f"the user's model {ref}, cut at its module boundaries")(factory)
