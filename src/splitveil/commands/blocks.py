"""``splitveil blocks MODEL``: the blocks of an architecture, each block's output shape (valid cuts), and the
edge's parameters and FLOPs per image up to each cut."""
from __future__ import annotations

from . import command


def cut_costs(model) -> list[dict]:
    """One row per block: name, output shape, payload bytes, and the parameters / FLOPs per image of the blocks
    up to and including it (the edge at that cut), FLOPs counted by ``metrics.flops_per_image``."""
    from ..metrics import count_params, flops_per_image, payload_bytes

    rows, params, flops = [], 0, 0
    in_shape = tuple(model.input_shape)
    for (name, blk), (_, out_shape) in zip(model.blocks.named_children(), model.block_shapes()):
        params += count_params(blk)
        flops += flops_per_image(blk, in_shape)
        rows.append({"block": name, "shape": tuple(out_shape), "payload_bytes": payload_bytes(out_shape),
                     "edge_params": params, "edge_flops": flops})
        in_shape = tuple(out_shape)
    return rows


@command("blocks", "show a model's blocks, their output shapes, the payload, and edge parameters / FLOPs at each cut")
class BlocksCommand:
    @staticmethod
    def add_arguments(p) -> None:
        p.add_argument("model", help="registered model name (see `splitveil list models`)")
        p.add_argument("--input", default="3,32,32", help="input shape C,H,W (default 3,32,32; ir50/ir152: 3,64,64)")
        p.add_argument("--classes", type=int, default=10)
        p.add_argument("--width", type=float, default=1.0)

    @staticmethod
    def handler(args) -> int:
        from ..models import create_model
        from ..params import ConfigError

        try:
            shape = tuple(int(v) for v in args.input.split(","))
            assert len(shape) == 3
        except (ValueError, AssertionError):
            raise ConfigError(f"--input: expected C,H,W, got {args.input!r}") from None
        model = create_model(args.model, args.classes, shape, args.width)
        rows = cut_costs(model)
        total_p, total_f = rows[-1]["edge_params"], rows[-1]["edge_flops"]
        print(f"{args.model} on input {shape}: {total_p:,} parameters, {total_f:,} FLOPs per image")
        print("| cut | block | output shape | payload bytes | edge params (share) | edge FLOPs / image (share) |\n"
              "|---|---|---|---|---|---|")
        for i, r in enumerate(rows, 1):
            cut = str(i) if i < len(rows) else "-"
            print(f"| {cut} | {r['block']} | {r['shape']} | {r['payload_bytes']:,} | "
                  f"{r['edge_params']:,} ({100 * r['edge_params'] / max(1, total_p):.1f}%) | "
                  f"{r['edge_flops']:,} ({100 * r['edge_flops'] / max(1, total_f):.1f}%) |")
        return 0
