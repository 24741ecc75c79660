"""``splitveil export RUN``: the defended edge as it runs at inference, as ONNX or a torch.export program."""
from __future__ import annotations

from . import command


@command("export", "export a run's defended edge (encoder + defense, noise as a graph op) to ONNX or torch.export")
class ExportCommand:
    @staticmethod
    def add_arguments(p) -> None:
        p.add_argument("run", help="a finished run's folder (its config.yaml and checkpoint.pt), or "
                                   "runs/<config name>: the one run of that name there")
        p.add_argument("--format", default="onnx", choices=["onnx", "torch.export"],
                       help="onnx (edge.onnx) or torch.export (edge.pt2); default onnx")
        p.add_argument("--out", help="the file to write (default: edge.onnx / edge.pt2 in the run folder)")
        p.add_argument("--no-check", action="store_true",
                       help="skip comparing the file's output with the eager edge")
        p.add_argument("--allow-plugins", action="store_true",
                       help="import the modules the run's config names (plugins:, model.name: module:function)")

    @staticmethod
    def handler(args) -> int:
        from ..experiments.export import check_export, export_edge

        meta = export_edge(args.run, args.format, args.out)
        print(f"edge of {meta['run_id']} ({meta['defenses']}) -> {meta['path']}")
        print(f"input {meta['input']['shape']} normalised with mean {meta['input']['mean']} std "
              f"{meta['input']['std']}; output {meta['output']['shape']}; random ops: "
              f"{', '.join(meta['random_ops']) or 'none'}")
        if not args.no_check:
            c = check_export(args.run, meta)
            if c["checked"]:
                print(f"check: max |exported - eager| = {c['max_abs_diff']:.3g} on {c['inputs']} inputs ({c['how']})")
            else:
                print(f"check skipped: {c['reason']}")
        return 0
