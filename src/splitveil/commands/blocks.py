"""``splitveil blocks MODEL``: the blocks of an architecture, each block's output shape (valid cuts), and the
edge's parameters and FLOPs per image up to each cut. ``MODEL``: a registered name, one a plug-in registers
(``--plugins MODULE``), or the user's own factory as ``module:function`` (its valid cuts: the module boundaries
that no skip connection crosses, see ``models/generic.py``)."""
from __future__ import annotations

from . import command


def cut_costs(model) -> list[dict]:
    """One row per block: name, output shape, payload bytes, and the parameters / FLOPs per image of the blocks
    up to and including it (the edge at that cut), FLOPs counted by ``metrics.flops_per_image``."""
    from ..metrics import count_params, flops_per_image, payload_bytes

    rows, params, flops = [], 0, 0
    in_shape = tuple(model.input_shape)
    for blk, (name, out_shape) in zip(model.blocks.children(), model.block_shapes()):
        params += count_params(blk)
        flops += flops_per_image(blk, in_shape)
        rows.append({"block": name, "shape": tuple(out_shape), "payload_bytes": payload_bytes(out_shape),
                     "edge_params": params, "edge_flops": flops})
        in_shape = tuple(out_shape)
    return rows


@command("blocks", "show a model's blocks (valid cuts), their output shapes, the payload, and edge parameters / FLOPs "
                   "at each cut; MODEL: a registered name or the user's module:function")
class BlocksCommand:
    @staticmethod
    def add_arguments(p) -> None:
        p.add_argument("model", help="registered model name (see `splitveil list models`), or the user's factory as "
                                     "module:function (e.g. mymodels:resnet18)")
        p.add_argument("--input", default="3,32,32", help="input shape C,H,W (default 3,32,32; ir50/ir152: 3,64,64)")
        p.add_argument("--classes", type=int, default=10)
        p.add_argument("--width", type=float, default=1.0)
        p.add_argument("--plugins", action="append", default=[], metavar="MODULE",
                       help="import a plug-in module that registers the model (repeatable; needs --allow-plugins)")
        p.add_argument("--allow-plugins", action="store_true",
                       help="allow importing the user's modules (--plugins, module:function)")

    @staticmethod
    def handler(args) -> int:
        from ..models import create_model
        from ..models.base import ModelConfig
        from ..params import ConfigError
        from ..registry import load_plugins

        try:
            shape = tuple(int(v) for v in args.input.split(","))
            assert len(shape) == 3
        except (ValueError, AssertionError):
            raise ConfigError(f"--input: expected C,H,W, got {args.input!r}") from None
        if args.plugins:
            load_plugins(args.plugins, "--plugins")
        ModelConfig(name=args.model).validate()   # a module:function is imported and registered here
        model = create_model(args.model, args.classes, shape, args.width)
        rows = cut_costs(model)
        aliases = model.aliases() if hasattr(model, "aliases") else None
        total_p, total_f = rows[-1]["edge_params"], rows[-1]["edge_flops"]
        print(f"{args.model} on input {shape}: {total_p:,} parameters, {total_f:,} FLOPs per image")
        if aliases is not None:
            print(f"cuts of {model.source_type}: the module boundaries that a single value crosses (no skip connection)")
        extra = " also |" if aliases is not None else ""
        print(f"| cut | block |{extra} output shape | payload bytes | edge params (share) | edge FLOPs / image (share) |\n"
              f"|---|---|{'---|' if aliases is not None else ''}---|---|---|---|")
        for i, r in enumerate(rows, 1):
            cut = str(i) if i < len(rows) else "-"
            also = ""
            if aliases is not None:
                also = " " + (", ".join(aliases[i - 1][1:]) if i < len(rows) and aliases[i - 1][1:] else "-") + " |"
            print(f"| {cut} | {r['block']} |{also} {r['shape']} | {r['payload_bytes']:,} | "
                  f"{r['edge_params']:,} ({100 * r['edge_params'] / max(1, total_p):.1f}%) | "
                  f"{r['edge_flops']:,} ({100 * r['edge_flops'] / max(1, total_f):.1f}%) |")
        return 0
