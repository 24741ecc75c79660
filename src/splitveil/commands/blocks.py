"""``splitveil blocks MODEL``: the blocks of an architecture and each block's output shape (valid cuts)."""
from __future__ import annotations

from . import command


@command("blocks", "show a model's blocks, their output shapes and the payload at each cut")
class BlocksCommand:
    @staticmethod
    def add_arguments(p) -> None:
        p.add_argument("model", help="registered model name (see `splitveil list models`)")
        p.add_argument("--input", default="3,32,32", help="input shape C,H,W (default 3,32,32)")
        p.add_argument("--classes", type=int, default=10)
        p.add_argument("--width", type=float, default=1.0)

    @staticmethod
    def handler(args) -> int:
        from ..metrics import count_params, payload_bytes
        from ..models import create_model
        from ..params import ConfigError

        try:
            shape = tuple(int(v) for v in args.input.split(","))
            assert len(shape) == 3
        except (ValueError, AssertionError):
            raise ConfigError(f"--input: expected C,H,W, got {args.input!r}") from None
        model = create_model(args.model, args.classes, shape, args.width)
        print(f"{args.model} on input {shape}: {count_params(model):,} parameters")
        print("| cut | block | output shape | payload bytes |\n|---|---|---|---|")
        for i, (name, s) in enumerate(model.block_shapes(), 1):
            cut = str(i) if i < len(model.block_names) else "-"
            print(f"| {cut} | {name} | {tuple(s)} | {payload_bytes(s):,} |")
        return 0
