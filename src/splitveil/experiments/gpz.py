"""Golden Partition Zone analysis (GPZ paper, ``seeds/paper-golden-partition-zone.md``): train ONE model, then
for every cut point probe the transmitted representation (shape, d, R_c^2 per class, sigma_feat^2, the
paper's entropy bound terms), the edge's share of parameters and FLOPs, the payload, and (optionally) the
inverse-network attack trained on that model's aux features at that cut (the paper's protocol: one target
model, one attacker per cut). The transition zone is detected from the probe (see ``detect_zone``).

Everything lives in ``<out>/gpz-<run-id>/``: ``checkpoint.pt`` (the trained model), ``rows.json`` (finished
cuts, kept across runs: an interrupted or extended sweep only computes the missing cuts), ``cut<k>_<block>/``
(attack checkpoint and reconstructions), ``gpz.md`` / ``gpz.csv`` (table), ``gpz.png`` (MSE and R_c^2 against
depth, zone shaded), ``recon_strip.png`` (a reconstruction row per cut).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..attacks import ATTACKS, run_attack, transmitted
from ..data import build_data
from ..defenses import Edge, build_defenses
from ..metrics import count_params, flops_per_image, payload_bytes, probe_values
from ..models import SplitModel, create_model
from ..params import ConfigError, coerce
from ..training import Trainer
from ..utils import atomic_write_text, resolve_device, seed_everything
from .config import RunConfig

log = logging.getLogger("splitveil.gpz")

MSE_THRESHOLD = 0.02     # the paper's "high-fidelity reconstruction" threshold (MSE on [0, 1] images)
MIN_DROP = 0.10          # smallest relative drop of the within-class fraction that counts as a transition
ZONE_WIDTH = 0.5         # neighbouring drops of at least this share of the largest one widen the zone


# -- cut selection and label forms -------------------------------------------------------------------------
def parse_cuts(spec: str | Iterable[int | str] | None, block_names: list[str]) -> list[int]:
    """``all`` / None: every block boundary 1..n-1; ``2,4,6`` or block names: those cuts (1-based, sorted)."""
    n = len(block_names) - 1
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(1, n + 1))
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    if not items:
        raise ConfigError("--cuts: empty list; use 'all' or e.g. 2,4,6")
    out = set()
    for it in items:
        it = str(it)
        if it.lstrip("-").isdigit():
            k = int(it)
        elif it in block_names[:-1]:
            k = block_names.index(it) + 1
        else:
            raise ConfigError(f"--cuts: unknown cut '{it}'; valid cuts are 1..{n} or a block name "
                              f"({', '.join(block_names[:-1])})")
        if not 1 <= k <= n:
            raise ConfigError(f"--cuts: {k} is out of range; valid cuts are 1..{n}")
        out.add(k)
    return sorted(out)


def label_form_defense(form: str) -> dict[str, Any]:
    """``onehot`` -> no defense; ``ls+0.3`` / ``ls-0.05`` / ``ls0.1`` -> label smoothing with that alpha."""
    f = form.strip().lower()
    if f in ("onehot", "one-hot", "none"):
        return {"name": "none"}
    if f.startswith("ls"):
        try:
            alpha = float(f[2:])
        except ValueError:
            alpha = None
        if alpha is not None:
            return {"name": "label_smoothing", "alpha": alpha}
    raise ConfigError(f"--compare-labels: unknown label form '{form}'; use onehot, ls+0.3, ls-0.05, ...")


# -- transition-zone detection -------------------------------------------------------------------------------
ZONE_METHOD = (
    "probe: within-class fraction w_k = mean_c R_c^2 / tr(Sigma) at every swept cut, divided by its value at "
    "the first (feature-level) cut; the zone is the largest drop of this ratio between consecutive cuts "
    "(at least {min_drop}), widened to adjacent drops of at least {width:.0%} of it; it runs from the last cut "
    "before the drop to the first cut after it. mse: the first cut from which the attack's MSE stays >= "
    "{thr} (the paper's high-fidelity threshold); the zone is that cut and the one before it."
)


def detect_zone(rows: list[dict[str, Any]], signal: str = "probe", min_drop: float = MIN_DROP,
                mse_threshold: float = MSE_THRESHOLD) -> dict[str, Any]:
    """Locate the transition zone in sweep ``rows`` (each with ``cut``, ``block``, ``within_fraction`` and
    optionally ``mse``). Returns the zone from the requested ``signal`` (``probe`` or ``mse``) and, for
    reference, what the other signal says; ``signal`` in the result names the one actually used."""
    if signal not in ("probe", "mse"):
        raise ConfigError(f"zone signal must be 'probe' or 'mse', got '{signal}'")
    rows = sorted(rows, key=lambda r: r["cut"])
    out: dict[str, Any] = {"requested_signal": signal, "min_drop": min_drop, "mse_threshold": mse_threshold,
                           "method": ZONE_METHOD.format(min_drop=min_drop, width=ZONE_WIDTH, thr=mse_threshold)}
    # probe signal
    w = [float(r["within_fraction"]) for r in rows]
    rel = [x / w[0] if w and w[0] > 0 else 0.0 for x in w]
    drops = [rel[i] - rel[i + 1] for i in range(len(rel) - 1)]
    probe: dict[str, Any] = {"found": False, "relative_within_fraction": rel, "drops": drops}
    if drops and max(drops) >= min_drop:
        i = max(range(len(drops)), key=drops.__getitem__)
        lo = hi = i
        while lo - 1 >= 0 and drops[lo - 1] >= ZONE_WIDTH * drops[i]:
            lo -= 1
        while hi + 1 < len(drops) and drops[hi + 1] >= ZONE_WIDTH * drops[i]:
            hi += 1
        probe.update(found=True, start_cut=rows[lo]["cut"], end_cut=rows[hi + 1]["cut"], max_drop=drops[i],
                     max_drop_cut=rows[i + 1]["cut"])
    elif drops:
        probe["max_drop"] = max(drops)
    # mse signal
    mse: dict[str, Any] = {"found": False, "available": bool(rows) and all(r.get("mse") is not None for r in rows)}
    if mse["available"]:
        first = None
        for i in range(len(rows) - 1, -1, -1):
            if rows[i]["mse"] >= mse_threshold:
                first = i
            else:
                break
        if first is not None:
            mse.update(found=True, stays_above_cut=rows[first]["cut"], start_cut=rows[max(0, first - 1)]["cut"],
                       end_cut=rows[first]["cut"])
    out["probe"], out["mse"] = probe, mse
    used = signal
    if signal == "mse" and not mse["available"]:
        used = "probe"
        out["note"] = "no attack results at every cut: the zone comes from the probe"
    chosen = probe if used == "probe" else mse
    out["signal"] = used
    out["found"] = chosen["found"]
    if chosen["found"]:
        names = {r["cut"]: r["block"] for r in rows}
        out.update(start_cut=chosen["start_cut"], end_cut=chosen["end_cut"],
                   start_block=names[chosen["start_cut"]], end_block=names[chosen["end_cut"]])
    return out


def zone_summary(zone: dict[str, Any]) -> str:
    if not zone["found"]:
        why = (f"the within-class fraction never drops by {zone['min_drop']} of its feature-level value"
               if zone["signal"] == "probe" else f"the MSE does not stay above {zone['mse_threshold']}")
        return f"no transition zone found (signal: {zone['signal']}; {why})"
    s = (f"transition zone: cuts {zone['start_cut']}..{zone['end_cut']} ({zone['start_block']} -> {zone['end_block']}), "
         f"signal: {zone['signal']}")
    if zone["signal"] == "probe":
        s += f" (largest relative drop of the within-class fraction: {zone['probe']['max_drop']:.3f})"
    m = zone["mse"]
    if m.get("found"):
        s += f"; attack MSE stays >= {zone['mse_threshold']} from cut {m['stays_above_cut']}"
    elif m.get("available"):
        s += f"; attack MSE does not stay >= {zone['mse_threshold']}"
    return s


# -- the sweep -----------------------------------------------------------------------------------------------
class GPZSweep:
    """One trained model, probed (and attacked) at many cuts. ``prepare()`` trains or reloads the model."""

    def __init__(self, cfg: RunConfig, out: str | Path = "runs", probe_images: int = 1000):
        self.notes: list[str] = []
        if cfg.model.bottleneck_channels is not None or cfg.model.sigmoid:
            self.notes.append("model.bottleneck_channels / model.sigmoid ignored: the GPZ sweep cuts the plain "
                              "backbone at every block")
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, bottleneck_channels=None, sigmoid=False))
        self.cfg = cfg
        self.probe_images = probe_images
        self.out = Path(out)
        self.run_dir = self.out / f"gpz-{cfg.run_id()}"
        self.rows_path = self.run_dir / "rows.json"
        self.device = resolve_device(cfg.device)
        self.prepared = False

    # -- set-up -------------------------------------------------------------------------------------------
    def prepare(self) -> "GPZSweep":
        if self.prepared:
            return self
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        self.data = build_data(cfg.data, cfg.seed)
        self.backbone = create_model(cfg.model.name, self.data.num_classes, self.data.image_shape, cfg.model.width,
                                     **cfg.model.options)
        try:
            train_cut = self.backbone.cut_index(cfg.model.cut)
        except ConfigError:
            train_cut = 1
            self.notes.append(f"model.cut '{cfg.model.cut}' is not a cut of {cfg.model.name}: training at cut 1 "
                              "(it only matters for defenses that transform the features)")
        self.defenses = build_defenses(cfg.defense)
        model = SplitModel(self.backbone, train_cut)
        self.defenses.setup(model, self.data, self.device)
        trainer = Trainer(model, self.defenses, self.data, cfg.train, self.device, seed=cfg.seed,
                          ckpt_path=self.run_dir / "checkpoint.pt", show_progress=cfg.progress,
                          augment=cfg.data.augment)
        self.history = trainer.fit(resume=True)   # a finished checkpoint is reused, a partial one continued
        self.accuracy = trainer.evaluate("test", cfg.eval.batch_size)
        log.info("gpz model %s: test accuracy %.4f", cfg.model.name, self.accuracy)
        self.backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.full_params = count_params(self.backbone)
        self.full_flops = flops_per_image(self.backbone, self.data.image_shape, self.device)
        self.block_names = self.backbone.block_names
        meta = {"config": cfg.to_dict(), "accuracy": self.accuracy, "history": self.history,
                "defense": self.defenses.label, "notes": self.notes, "full_params": self.full_params,
                "full_flops": self.full_flops, "blocks": self.block_names}
        atomic_write_text(self.run_dir / "meta.json", json.dumps(meta, indent=2, default=str))
        self.prepared = True
        return self

    def edge(self, k: int) -> Edge:
        """The edge for cut ``k``: the first k blocks of the one trained model, then the defenses' transform."""
        blocks = list(self.backbone.blocks.children())[:k]
        return Edge(nn.Sequential(*blocks), self.defenses).eval()

    def load_rows(self) -> dict[int, dict[str, Any]]:
        if not self.rows_path.exists():
            return {}
        return {int(k): v for k, v in json.loads(self.rows_path.read_text()).items()}

    def _save_row(self, row: dict[str, Any]) -> None:
        rows = self.load_rows()
        rows[row["cut"]] = row
        atomic_write_text(self.rows_path, json.dumps({str(k): rows[k] for k in sorted(rows)}, indent=2))

    # -- one cut ----------------------------------------------------------------------------------------------
    def probe(self, k: int) -> dict[str, Any]:
        """Probe values and cost at cut ``k`` (features of the first ``probe_images`` test images)."""
        self.prepare()
        edge = self.edge(k)
        n = min(self.probe_images, len(self.data.test))
        split = self.data.test.subset(torch.arange(n))
        z, _ = transmitted(edge, self.data, split, self.device, self.cfg.seed + 7, self.cfg.eval.batch_size)
        pv = probe_values(z, split.labels, self.data.num_classes)
        shape = tuple(z.shape[1:])
        enc_params = count_params(edge.encoder)
        enc_flops = flops_per_image(edge.encoder, self.data.image_shape, self.device)
        return {
            "cut": k, "block": self.block_names[k - 1], "shape": list(shape), "probe_images": n,
            **{key: v for key, v in pv.items() if key != "rc2_per_class"},
            "rc2_per_class": {str(c): v for c, v in pv["rc2_per_class"].items()},
            "edge_params": enc_params, "edge_params_share": enc_params / max(1, self.full_params),
            "edge_flops": enc_flops, "edge_flops_share": enc_flops / max(1, self.full_flops),
            "payload_bytes": payload_bytes(shape),
        }

    def cut_dir(self, k: int) -> Path:
        return self.run_dir / f"cut{k:02d}_{self.block_names[k - 1]}"

    def attack(self, k: int) -> dict[str, Any]:
        """The inverse-network attack at cut ``k``: fit on the aux features of the trained model, scored on test."""
        self.prepare()
        params = self.cfg.attack_params().get("inverse_network") or coerce(ATTACKS.get("inverse_network").Params, {})
        d = self.cut_dir(k)
        d.mkdir(parents=True, exist_ok=True)
        attack = ATTACKS.get("inverse_network")(params, device=self.device, seed=self.cfg.seed + 1000,
                                                 show_progress=self.cfg.progress, workdir=d)
        seed_everything(self.cfg.seed + 1000)
        result, x01, x_hat = run_attack(attack, self.edge(k), self.data, seed=self.cfg.seed + 7)
        n_show = min(self.cfg.eval.recon_images, len(x01))
        torch.save({"originals": x01[:n_show], "recon": x_hat[:n_show]}, d / "recon.pt")
        from ..report.figures import save_recon_grid

        save_recon_grid(d / "recon.png", x01[:n_show], {f"cut {k} {self.block_names[k - 1]}": x_hat[:n_show]},
                        f"{self.cfg.model.name} cut {k} ({self.block_names[k - 1]}) MSE {result['mse']:.4f}")
        return {key: result[key] for key in ("mse", "mse_std", "psnr", "psnr_std", "ssim", "ssim_std", "fit_seconds")
                if key in result}

    # -- the whole sweep ------------------------------------------------------------------------------------
    def run(self, cuts: str | Iterable[int | str] | None = "all", attack: bool = True, zone_signal: str = "probe",
            min_drop: float = MIN_DROP) -> dict[str, Any]:
        self.prepare()
        ks = parse_cuts(cuts, self.block_names)
        done = self.load_rows()
        for k in ks:
            row = done.get(k)
            if row is None:
                row = self.probe(k)
                self._save_row(row)
                log.info("cut %d %s: d %d, R_c^2 %.4g, within-fraction %.4f", k, row["block"], row["d"],
                         row["rc2_mean"], row["within_fraction"])
            if attack and row.get("mse") is None:
                row.update(self.attack(k))
                self._save_row(row)
                log.info("cut %d %s: attack mse %.5f", k, row["block"], row["mse"])
            done[k] = row
        rows = [done[k] for k in ks]
        if not attack:  # a probe-only sweep: attack numbers of earlier runs are kept in rows.json, not shown
            rows = [{key: v for key, v in r.items() if key not in ("mse", "mse_std", "psnr", "psnr_std", "ssim",
                                                                    "ssim_std", "fit_seconds")} for r in rows]
        zone = detect_zone(rows, zone_signal, min_drop)
        result = {"run_dir": str(self.run_dir), "model": self.cfg.model.name, "dataset": self.data.name,
                  "defense": self.defenses.label, "accuracy": self.accuracy, "rows": rows, "zone": zone,
                  "notes": self.notes}
        self.write_outputs(result, attack)
        return result

    def write_outputs(self, result: dict[str, Any], attack: bool) -> None:
        from ..report.gpz_plots import plot_sweep, save_recon_strip

        rows, zone = result["rows"], result["zone"]
        title = (f"{result['dataset']} {result['model']} ({result['defense']}), accuracy {result['accuracy']:.3f}")
        md = f"# GPZ sweep: {title}\n\n{markdown_table(rows, zone)}\n\n{zone_summary(zone)}\n\nMethod: {zone['method']}\n"
        if result["notes"]:
            md += "\nNotes: " + "; ".join(result["notes"]) + "\n"
        atomic_write_text(self.run_dir / "gpz.md", md)
        atomic_write_text(self.run_dir / "gpz.csv", csv_text(rows, zone))
        atomic_write_text(self.run_dir / "zone.json", json.dumps(zone, indent=2))
        plot_sweep(rows, zone, self.run_dir / "gpz.png", title)
        files = {"table_md": str(self.run_dir / "gpz.md"), "table_csv": str(self.run_dir / "gpz.csv"),
                 "plot": str(self.run_dir / "gpz.png")}
        if attack:
            strips = {}
            for r in rows:
                f = self.cut_dir(r["cut"]) / "recon.pt"
                if f.exists():
                    strips[f"{r['cut']} {r['block']}"] = torch.load(f, weights_only=True)
            if strips:
                save_recon_strip(self.run_dir / "recon_strip.png", strips, title)
                files["recon_strip"] = str(self.run_dir / "recon_strip.png")
        result["files"] = files


# -- tables --------------------------------------------------------------------------------------------------
def _in_zone(zone: dict[str, Any], k: int) -> bool:
    return bool(zone.get("found")) and zone["start_cut"] <= k <= zone["end_cut"]


def _f(v: Any, fmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "-inf" if v < 0 else "inf"
    return format(v, fmt)


def markdown_table(rows: list[dict[str, Any]], zone: dict[str, Any]) -> str:
    attack = any(r.get("mse") is not None for r in rows)
    head = ["cut", "block", "shape", "d", "R_c^2 mean +- std", "within-class frac", "sigma_feat^2",
            "d/2 ln(2pie s^2)", "D/2 ln(2pie R^2/D)+lnK", "edge params %", "edge FLOPs %", "payload B"]
    if attack:
        head += ["MSE", "PSNR", "SSIM"]
    head.append("zone")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["cut"]), r["block"], "x".join(map(str, r["shape"])), str(r["d"]),
                 f"{_f(r['rc2_mean'], '.4g')} +- {_f(r['rc2_std'], '.2g')}", _f(r["within_fraction"], ".4f"),
                 _f(r["sigma2"], ".4g"), _f(r["h_feat_bound"], ".4g"), _f(r["h_dec_bound"], ".4g"),
                 _f(100 * r["edge_params_share"], ".1f"), _f(100 * r["edge_flops_share"], ".1f"), f"{r['payload_bytes']:,}"]
        if attack:
            cells += [_f(r.get("mse"), ".4f"), _f(r.get("psnr"), ".2f"), _f(r.get("ssim"), ".3f")]
        cells.append("*" if _in_zone(zone, r["cut"]) else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CSV_FIELDS = ["cut", "block", "shape", "d", "probe_images", "rc2_mean", "rc2_std", "rc2_max", "rc2_per_class", "sigma2",
              "within_fraction", "h_feat_bound", "h_dec_bound", "num_classes", "edge_params", "edge_params_share",
              "edge_flops", "edge_flops_share", "payload_bytes", "mse", "mse_std", "psnr", "ssim", "in_zone",
              "zone_signal"]


def csv_text(rows: list[dict[str, Any]], zone: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "shape": "x".join(map(str, r["shape"])),
                    "rc2_per_class": ";".join(f"{c}:{v:.6g}" for c, v in r["rc2_per_class"].items()),
                    "in_zone": int(_in_zone(zone, r["cut"])), "zone_signal": zone["signal"]})
    return buf.getvalue()


# -- label forms compared ------------------------------------------------------------------------------------
def run_compare(cfg: RunConfig, forms: list[str], out: str | Path = "runs", cuts: Any = "all", attack: bool = True,
                probe_images: int = 1000, zone_signal: str = "probe", min_drop: float = MIN_DROP) -> dict[str, Any]:
    """One model per label form (``onehot``, ``ls+0.3``, ...), each swept; overlays of R_c^2 and MSE."""
    from ..report.gpz_plots import plot_compare

    if not forms:
        raise ConfigError("--compare-labels: give at least one label form")
    specs = {f: label_form_defense(f) for f in forms}
    for spec in specs.values():
        build_defenses(spec)   # fails early (naming the defense) if label smoothing is not available
    results = {}
    for form, spec in specs.items():
        log.info("gpz compare: label form %s", form)
        sweep = GPZSweep(dataclasses.replace(cfg, defense=spec), out, probe_images)
        results[form] = sweep.run(cuts, attack, zone_signal, min_drop)
    key = hashlib.sha256(json.dumps(sorted(r["run_dir"] for r in results.values())).encode()).hexdigest()[:10]
    cdir = Path(out) / f"gpz-compare-{cfg.name}-{key}"
    cdir.mkdir(parents=True, exist_ok=True)
    lines = ["| label form | accuracy | zone | deepest cut R_c^2 | deepest cut within-class frac | deepest cut MSE |",
             "|---|---|---|---|---|---|"]
    csv_rows = []
    for form, res in results.items():
        last = res["rows"][-1]
        z = res["zone"]
        zs = f"{z['start_block']}->{z['end_block']} ({z['signal']})" if z["found"] else f"none ({z['signal']})"
        lines.append(f"| {form} | {res['accuracy']:.4f} | {zs} | {last['rc2_mean']:.4g} | {last['within_fraction']:.4f} | "
                     f"{_f(last.get('mse'), '.4f')} |")
        for r in res["rows"]:
            csv_rows.append({"label_form": form, "accuracy": res["accuracy"], **r})
    per_cut = ["| cut | block | " + " | ".join(f"{f} R_c^2 / within / MSE" for f in results) + " |",
               "|---|---|" + "---|" * len(results)]
    first = next(iter(results.values()))["rows"]
    for i, r in enumerate(first):
        cells = [f"{res['rows'][i]['rc2_mean']:.4g} / {res['rows'][i]['within_fraction']:.4f} / "
                 f"{_f(res['rows'][i].get('mse'), '.4f')}" for res in results.values()]
        per_cut.append(f"| {r['cut']} | {r['block']} | " + " | ".join(cells) + " |")
    md = "# GPZ label-form comparison\n\n" + "\n".join(lines) + "\n\n" + "\n".join(per_cut) + "\n"
    atomic_write_text(cdir / "compare.md", md)
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["label_form", "accuracy"] + CSV_FIELDS[:-2], extrasaction="ignore")
    w.writeheader()
    for r in csv_rows:
        w.writerow({**r, "shape": "x".join(map(str, r["shape"])),
                    "rc2_per_class": ";".join(f"{c}:{v:.6g}" for c, v in r["rc2_per_class"].items())})
    atomic_write_text(cdir / "compare.csv", buf.getvalue())
    plot_compare({f: (res["rows"], res["zone"]) for f, res in results.items()}, cdir / "compare.png",
                 f"{cfg.model.name}: label forms")
    return {"dir": str(cdir), "results": results, "table_md": md}
