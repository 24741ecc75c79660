"""Export the defended edge of a run exactly as it runs at inference: the trained encoder (pruned shapes
restored), then the defenses' transform, the noise included as a graph operation (ONNX ``RandomNormalLike``,
``aten.randn_like`` in a ``torch.export`` program): a device that runs the file sends what the attacker was
measured against.

- ``onnx``: ``<run>/edge.onnx`` (torch's dynamo exporter; needs ``onnx`` and ``onnxscript``), batch dimension
  dynamic;
- ``torch.export``: ``<run>/edge.pt2`` (``torch.export.save``; load with ``torch.export.load(f).module()``).

Beside it ``<file>.json`` (``edge.onnx.json``) records the input the edge expects (shape and the normalisation ``(x01 - mean) / std``
of [0, 1] images), the output shape, the defenses, the random operations found in the graph and the source
checkpoint's SHA-256. :func:`check_export` compares the file with the eager edge: with onnxruntime for ONNX
(the noise draws zeroed in both, since two random generators never agree), with the same seed for
``torch.export`` (the same generator, so the same draws)."""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import torch

from ..params import ConfigError
from ..utils import atomic_write_text
from .trained import load_edge, resolve_run_dir

log = logging.getLogger("splitveil.export")

FORMATS = {"onnx": "edge.onnx", "torch.export": "edge.pt2"}
ONNX_RANDOM_OPS = ("RandomNormalLike", "RandomNormal", "RandomUniformLike", "RandomUniform", "Bernoulli", "Dropout")


def _example(edge, batch: int = 2) -> torch.Tensor:
    return torch.zeros((batch, *edge.input_shape))


def export_edge(run_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None) -> dict[str, Any]:
    """Write the run's edge in ``fmt`` (``onnx`` or ``torch.export``) to ``out`` (default ``<run>/edge.onnx`` or
    ``<run>/edge.pt2``) with ``<file>.json`` beside it; returns that metadata (and ``path``)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    run_dir = resolve_run_dir(run_dir)
    edge = load_edge(run_dir, "cpu")
    path = Path(out) if out else run_dir / FORMATS[fmt]
    path.parent.mkdir(parents=True, exist_ok=True)
    x = _example(edge)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"--format onnx needs the onnx and onnxscript packages ({e}); pip install "
                              "'splitveil[export]'") from None
        with _quiet():
            torch.onnx.export(edge, (x,), str(path), dynamo=True, input_names=["x"], output_names=["z"],
                              dynamic_shapes={"x": {0: batch}}, verbose=False)
        random_ops = onnx_random_ops(path)
    else:
        with _quiet():
            ep = torch.export.export(edge, (x,), dynamic_shapes={"x": {0: batch}})
        torch.export.save(ep, str(path))
        random_ops = sorted({str(n.target) for n in ep.graph.nodes if n.op == "call_function"
                             and any(r in str(n.target) for r in ("rand", "bernoulli", "dropout", "normal"))})
    meta = {"format": fmt, "file": path.name, "run_id": getattr(edge, "run_id", run_dir.name),
            "input": {"shape": ["batch", *edge.input_shape], "dtype": "float32",
                      "normalisation": "x = (image01 - mean) / std per channel", "mean": list(edge.mean),
                      "std": list(edge.std)},
            "output": {"shape": ["batch", *edge.feature_shape], "dtype": "float32"},
            "defenses": edge.defenses.label, "random_ops": random_ops,
            "checkpoint_sha256": _checkpoint_sha(run_dir)}
    atomic_write_text(Path(f"{path}.json"), json.dumps(meta, indent=2))
    meta["path"] = str(path)
    return meta


def _checkpoint_sha(run_dir: Path) -> str | None:
    from .trained import _sha256

    f = run_dir / "checkpoint.pt"
    return _sha256(f) if f.is_file() else None


@contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def onnx_random_ops(path: str | Path) -> list[str]:
    """The random operations of an ONNX file (the noise and dropout the edge draws on the device)."""
    import onnx

    return sorted({n.op_type for n in onnx.load(str(path)).graph.node if n.op_type in ONNX_RANDOM_OPS})


def onnx_without_noise(path: str | Path):
    """The ONNX model of ``path`` with every ``RandomNormalLike`` / ``RandomUniformLike`` replaced by zeros of the
    same shape (a parity check's "noise off"; the file itself is unchanged)."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(path))
    nodes = []
    for n in m.graph.node:
        if n.op_type in ("RandomNormalLike", "RandomUniformLike"):
            shape = f"{n.output[0]}__shape"
            nodes.append(helper.make_node("Shape", [n.input[0]], [shape]))
            nodes.append(helper.make_node("ConstantOfShape", [shape], list(n.output),
                                          value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])))
        else:
            nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


@contextmanager
def eager_noise_off() -> Iterator[None]:
    """The eager edge with its Gaussian draws zeroed (``torch.randn_like`` -> zeros), to compare with
    :func:`onnx_without_noise`."""
    with mock.patch("torch.randn_like", lambda t, *a, **k: torch.zeros_like(t)):
        yield


def check_export(run_dir: str | Path, meta: dict[str, Any], n: int = 8, seed: int = 0) -> dict[str, Any]:
    """Max |exported - eager| on ``n`` random inputs: ONNX through onnxruntime with the noise draws zeroed in both;
    ``torch.export`` with the same seed before both calls (the same draws)."""
    edge = load_edge(run_dir, "cpu")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *edge.input_shape), generator=g)
    path = Path(meta["path"])
    if meta["format"] == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            return {"checked": False, "reason": "onnxruntime is not installed"}
        sess = ort.InferenceSession(onnx_without_noise(path).SerializeToString(), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad(), eager_noise_off():
            want = edge(x)
        how = "onnxruntime, noise draws zeroed in both"
    else:
        prog = torch.export.load(str(path)).module()
        with torch.no_grad():
            torch.manual_seed(seed)
            got = prog(x)
            torch.manual_seed(seed)
            want = edge(x)
        how = "torch.export program, the same seed"
    diff = float((got - want).abs().max())
    return {"checked": True, "max_abs_diff": diff, "how": how, "inputs": n}
