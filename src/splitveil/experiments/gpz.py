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
import sys
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..attacks import ATTACKS, run_attack, transmitted
from ..data import build_data
from ..defenses import Edge, build_defenses
from ..metrics import count_params, flops_per_image, payload_bytes
from ..metrics.probes import bootstrap_mean_radius, probe_values
from ..models import SplitModel, create_model
from ..params import ConfigError, coerce
from ..training import Trainer
from ..utils import atomic_write_text, resolve_device, seed_everything
from .config import RunConfig

log = logging.getLogger("splitveil.gpz")

PAPER_MSE_SUMMED_THRESHOLD = 0.02   # the GPZ paper's "MSE < 0.02 is high fidelity"; its MSE sums over channels
SECOND_ZONE_GAP = 0.2               # the paper code's second-zone rule: an intermediate drop of at least this size
BOOTSTRAP_RESAMPLES = 200           # stratified bootstrap resamples of the probe images (R_c^2 and zone intervals)
PROBE_VERSION = 2                   # rows.json rows of an older probe (singleton classes counted, no bootstrap) are redone


def paper_fidelity_threshold(channels: int) -> float:
    """The paper's high-fidelity threshold in splitveil's units (per-element MSE on [0, 1] images): its MSE sums
    over channels (0.021 sits next to 21.5 dB PSNR), so its 0.02 is 0.02 / C per element (0.0067 for RGB)."""
    if channels < 1:
        raise ValueError("channels must be >= 1")
    return PAPER_MSE_SUMMED_THRESHOLD / channels


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
    "paper (GPZ code's rule): the class-mean R_c^2 at every swept cut; relative drop between consecutive swept "
    "cuts p = (R_prev - R_next) / R_prev; the zone is the first cut after the largest drop. Second zone: the "
    "cut after the second-largest drop is added when some drop strictly between the two is at least "
    "{gap} in magnitude. No zone when no drop is positive. R_c^2 over classes with >= 2 probe images, true "
    "labels (the paper's code uses predicted labels of one batch). Interval: the zone of each of {b} stratified "
    "bootstrap resamples of the probe images."
)


def paper_zone(cuts: list[int], rc2: list[float], gap: float = SECOND_ZONE_GAP) -> dict[str, Any]:
    """The GPZ paper code's zone rule on a profile: ``rc2[i]`` is the class-mean R_c^2 at swept cut ``cuts[i]``.

    Returns ``drops`` (relative drop into each cut after the first), ``zone_cuts`` (one cut, or two with the
    second-zone rule), ``first_drop_cut`` and ``found`` (False when fewer than 2 cuts or no drop is positive)."""
    if len(cuts) != len(rc2):
        raise ValueError("cuts and rc2 differ in length")
    drops = [(rc2[i - 1] - rc2[i]) / rc2[i - 1] if rc2[i - 1] != 0 else 0.0 for i in range(1, len(rc2))]
    out: dict[str, Any] = {"found": False, "drops": drops, "zone_cuts": []}
    if not drops:
        return out
    order = sorted(range(len(drops)), key=lambda i: drops[i], reverse=True)   # stable: ties go to the shallower
    i = order[0]
    out["max_drop"] = drops[i]
    if drops[i] <= 0:
        return out
    zone = [cuts[i + 1]]
    if len(order) > 1:
        j = order[1]
        lo, hi = min(i, j) + 1, max(i, j)
        if any(abs(drops[m]) >= gap for m in range(lo, hi)):
            zone.append(cuts[j + 1])
            out["second_drop"] = drops[j]
    out.update(found=True, zone_cuts=zone, first_drop_cut=cuts[i + 1])
    return out


def _percentile(sorted_vals: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of an ascending list."""
    k = min(len(sorted_vals) - 1, max(0, math.ceil(q / 100 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def detect_zone(rows: list[dict[str, Any]], gap: float = SECOND_ZONE_GAP, channels: int | None = None) -> dict[str, Any]:
    """Locate the transition zone in sweep ``rows`` (each with ``cut``, ``block``, ``rc2_mean`` and optionally
    ``rc2_boot`` (bootstrap resamples of it) and ``mse``) by the paper's rule (see ``paper_zone``).

    With ``rc2_boot`` in every row, ``bootstrap`` gives how often each cut is the (first) zone cut over the
    resamples, the share that agrees with the point estimate and a 95% percentile interval of the zone cut.
    With ``mse`` in every row and ``channels``, ``fidelity`` lists the cuts whose attack MSE is below the paper's
    high-fidelity threshold (``paper_fidelity_threshold``)."""
    rows = sorted(rows, key=lambda r: r["cut"])
    cuts = [r["cut"] for r in rows]
    pz = paper_zone(cuts, [float(r["rc2_mean"]) for r in rows], gap)
    nb = min((len(r["rc2_boot"]) for r in rows), default=0) if rows and all(r.get("rc2_boot") for r in rows) else 0
    out: dict[str, Any] = {"rule": "paper", "second_zone_gap": gap, "found": pz["found"], "drops": pz["drops"],
                           "zone_cuts": pz["zone_cuts"], "method": ZONE_METHOD.format(gap=gap, b=nb or "no")}
    if "max_drop" in pz:
        out["max_drop"] = pz["max_drop"]
    names = {r["cut"]: r["block"] for r in rows}
    if pz["found"]:
        out.update(start_cut=min(pz["zone_cuts"]), end_cut=max(pz["zone_cuts"]), first_drop_cut=pz["first_drop_cut"],
                   zone_blocks=[names[k] for k in pz["zone_cuts"]])
        out.update(start_block=names[out["start_cut"]], end_block=names[out["end_cut"]])
    if nb:
        firsts = []
        for b in range(nb):
            z = paper_zone(cuts, [float(r["rc2_boot"][b]) for r in rows], gap)
            firsts.append(z["first_drop_cut"] if z["found"] else None)
        found = sorted(k for k in firsts if k is not None)
        counts = {str(k): firsts.count(k) for k in sorted(set(found))}
        boot: dict[str, Any] = {"resamples": nb, "found_share": len(found) / nb, "first_cut_counts": counts}
        if found:
            boot["first_cut_ci95"] = [_percentile(found, 2.5), _percentile(found, 97.5)]
        if pz["found"]:
            boot["agreement"] = firsts.count(pz["first_drop_cut"]) / nb
        out["bootstrap"] = boot
    if channels and rows and all(r.get("mse") is not None for r in rows):
        thr = paper_fidelity_threshold(channels)
        high = [r["cut"] for r in rows if r["mse"] < thr]
        out["fidelity"] = {"threshold_per_element": thr, "paper_threshold_summed": PAPER_MSE_SUMMED_THRESHOLD,
                           "channels": channels, "high_fidelity_cuts": high,
                           "deepest_high_fidelity_cut": max(high) if high else None}
    return out


def zone_summary(zone: dict[str, Any]) -> str:
    if not zone["found"]:
        s = "no transition zone found (paper's rule: R_c^2 never drops between consecutive swept cuts)"
    else:
        blocks = ", ".join(f"{k} ({b})" for k, b in zip(zone["zone_cuts"], zone["zone_blocks"]))
        s = (f"transition zone (paper's rule): cut {blocks}; largest relative R_c^2 drop {zone['max_drop']:.3f} "
             f"into cut {zone['first_drop_cut']}")
        if len(zone["zone_cuts"]) > 1:
            s += " (second zone by the paper's second-zone rule)"
    b = zone.get("bootstrap")
    if b:
        s += f"; bootstrap ({b['resamples']} resamples of the probe images): zone found in {b['found_share']:.0%}"
        if "first_cut_ci95" in b:
            s += f", zone cut 95% interval {b['first_cut_ci95'][0]}..{b['first_cut_ci95'][1]}"
        if "agreement" in b:
            s += f", {b['agreement']:.0%} agree with cut {zone['first_drop_cut']}"
    f = zone.get("fidelity")
    if f:
        s += (f"; high-fidelity reconstructions (MSE < {f['threshold_per_element']:.4g} per element = the paper's "
              f"{f['paper_threshold_summed']} summed over {f['channels']} channels) up to cut "
              f"{f['deepest_high_fidelity_cut'] if f['deepest_high_fidelity_cut'] is not None else '- (none)'}")
    return s


# -- the sweep -----------------------------------------------------------------------------------------------
class GPZSweep:
    """One trained model, probed (and attacked) at many cuts. ``prepare()`` trains or reloads the model."""

    def __init__(self, cfg: RunConfig, out: str | Path = "runs", probe_images: int = 1000,
                 bootstrap: int = BOOTSTRAP_RESAMPLES):
        self.notes: list[str] = []
        if cfg.model.bottleneck_channels is not None or cfg.model.sigmoid:
            self.notes.append("model.bottleneck_channels / model.sigmoid ignored: the GPZ sweep cuts the plain "
                              "backbone at every block")
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, bottleneck_channels=None, sigmoid=False))
        self.cfg = cfg
        self.probe_images = probe_images
        if bootstrap < 0:
            raise ConfigError("--bootstrap: must be >= 0 (0: no bootstrap interval)")
        self.bootstrap = int(bootstrap)
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
        boot: dict[str, Any] = {"rc2_boot": None, "rc2_ci95": None}
        if self.bootstrap:
            bs = bootstrap_mean_radius(z, split.labels, self.bootstrap, self.cfg.seed + 11).tolist()
            srt = sorted(bs)
            boot = {"rc2_boot": bs, "rc2_ci95": [_percentile(srt, 2.5), _percentile(srt, 97.5)]}
        shape = tuple(z.shape[1:])
        enc_params = count_params(edge.encoder)
        enc_flops = flops_per_image(edge.encoder, self.data.image_shape, self.device)
        return {
            "cut": k, "block": self.block_names[k - 1], "shape": list(shape), "probe_images": n,
            "probe_version": PROBE_VERSION, "bootstrap": self.bootstrap, **boot,
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
    def run(self, cuts: str | Iterable[int | str] | None = "all", attack: bool = True,
            gap: float = SECOND_ZONE_GAP) -> dict[str, Any]:
        self.prepare()
        ks = parse_cuts(cuts, self.block_names)
        done = self.load_rows()
        for i, k in enumerate(ks, 1):
            step = f"cut {i}/{len(ks)}"   # progress over the swept cuts (k is the cut's index in the model)
            if self.cfg.progress:
                print(f"gpz {step}: {self.block_names[k - 1]}", file=sys.stderr, flush=True)
            row = done.get(k)
            if row is None or row.get("probe_version") != PROBE_VERSION or row.get("bootstrap") != self.bootstrap:
                kept = {key: v for key, v in (row or {}).items() if key in ATTACK_KEYS}
                row = {**self.probe(k), **kept}
                self._save_row(row)
                log.info("%s: cut %d %s: d %d, R_c^2 %.4g, within-fraction %.4f", step, k, row["block"], row["d"],
                         row["rc2_mean"], row["within_fraction"])
            if attack and row.get("mse") is None:
                row.update(self.attack(k))
                self._save_row(row)
                log.info("%s: cut %d %s: attack mse %.5f", step, k, row["block"], row["mse"])
            done[k] = row
        rows = [done[k] for k in ks]
        if not attack:  # a probe-only sweep: attack numbers of earlier runs are kept in rows.json, not shown
            rows = [{key: v for key, v in r.items() if key not in ATTACK_KEYS} for r in rows]
        zone = detect_zone(rows, gap, channels=self.data.image_shape[0])
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


ATTACK_KEYS = ("mse", "mse_std", "psnr", "psnr_std", "ssim", "ssim_std", "fit_seconds")


# -- tables --------------------------------------------------------------------------------------------------
def _in_zone(zone: dict[str, Any], k: int) -> bool:
    return bool(zone.get("found")) and k in zone["zone_cuts"]


def _f(v: Any, fmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "-inf" if v < 0 else "inf"
    return format(v, fmt)


def markdown_table(rows: list[dict[str, Any]], zone: dict[str, Any]) -> str:
    attack = any(r.get("mse") is not None for r in rows)
    head = ["cut", "block", "shape", "d", "R_c^2 mean +- std", "R_c^2 95% CI", "drop", "within-class frac", "sigma_feat^2",
            "d/2 ln(2pie s^2)", "D/2 ln(2pie R^2/D)+lnK", "edge params %", "edge FLOPs %", "payload B"]
    if attack:
        head += ["MSE", "PSNR", "SSIM"]
    head.append("zone")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    drops = dict(zip([r["cut"] for r in rows[1:]], zone.get("drops", [])))
    for r in rows:
        ci = r.get("rc2_ci95")
        cells = [str(r["cut"]), r["block"], "x".join(map(str, r["shape"])), str(r["d"]),
                 f"{_f(r['rc2_mean'], '.4g')} +- {_f(r['rc2_std'], '.2g')}",
                 f"{ci[0]:.4g}..{ci[1]:.4g}" if ci else "-", _f(drops.get(r["cut"]), ".3f"), _f(r["within_fraction"], ".4f"),
                 _f(r["sigma2"], ".4g"), _f(r["h_feat_bound"], ".4g"), _f(r["h_dec_bound"], ".4g"),
                 _f(100 * r["edge_params_share"], ".1f"), _f(100 * r["edge_flops_share"], ".1f"), f"{r['payload_bytes']:,}"]
        if attack:
            cells += [_f(r.get("mse"), ".4f"), _f(r.get("psnr"), ".2f"), _f(r.get("ssim"), ".3f")]
        cells.append("*" if _in_zone(zone, r["cut"]) else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CSV_FIELDS = ["cut", "block", "shape", "d", "probe_images", "rc2_mean", "rc2_ci_low", "rc2_ci_high", "rc2_std", "rc2_max",
              "rc2_classes", "rc2_excluded", "rc2_per_class", "sigma2",
              "within_fraction", "h_feat_bound", "h_dec_bound", "num_classes", "edge_params", "edge_params_share",
              "edge_flops", "edge_flops_share", "payload_bytes", "mse", "mse_std", "psnr", "ssim", "in_zone",
              "zone_rule"]


def csv_text(rows: list[dict[str, Any]], zone: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        ci = r.get("rc2_ci95") or [None, None]
        w.writerow({**r, "shape": "x".join(map(str, r["shape"])), "rc2_ci_low": ci[0], "rc2_ci_high": ci[1],
                    "rc2_per_class": ";".join(f"{c}:{v:.6g}" for c, v in r["rc2_per_class"].items()),
                    "in_zone": int(_in_zone(zone, r["cut"])), "zone_rule": zone["rule"]})
    return buf.getvalue()


# -- label forms compared ------------------------------------------------------------------------------------
def with_label_form(defense: dict[str, Any] | None, form: str) -> dict[str, Any]:
    """The configured ``defense`` block with the label form added: ``onehot`` keeps it as it is, ``ls<alpha>``
    stacks label smoothing on it. A configured defense that already smooths labels is refused (the label form
    would silently replace or double it)."""
    spec = dict(defense or {"name": "none"})
    ls = label_form_defense(form)
    if ls["name"] == "none":
        return spec
    raw = spec.get("name", "none")
    names = [n for n in ([raw] if isinstance(raw, str) else list(raw or [])) if n != "none"]
    if "label_smoothing" in names or "label_smoothing" in spec:
        raise ConfigError("defense.name: the configured defense already uses label_smoothing; --compare-labels sets "
                          "the label form itself: remove label_smoothing from the defense or run without "
                          "--compare-labels")
    if not names:
        return dict(ls)
    out = {k: v for k, v in spec.items() if k != "name"}
    out["name"] = names + ["label_smoothing"]
    out["label_smoothing"] = {"alpha": ls["alpha"]}
    return out


def _mean_std(vals: list[float]) -> tuple[float, float]:
    m = sum(vals) / len(vals)
    return m, (math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0)


def run_compare(cfg: RunConfig, forms: list[str], out: str | Path = "runs", cuts: Any = "all", attack: bool = True,
                probe_images: int = 1000, seeds: Iterable[int] | None = None, gap: float = SECOND_ZONE_GAP,
                bootstrap: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """One model per (label form, seed), each swept (``onehot``, ``ls+0.3``, ...; the configured defense is
    kept and label smoothing stacked on it); per cut the mean and seed std (sample std over seeds) of R_c^2 and
    MSE per form, and overlays of R_c^2 and MSE. ``seeds`` default: the config's seed only."""
    from ..report.gpz_plots import plot_compare

    if not forms:
        raise ConfigError("--compare-labels: give at least one label form")
    seeds = [cfg.seed] if seeds is None else [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    specs = {f: with_label_form(cfg.defense, f) for f in forms}
    for spec in specs.values():
        build_defenses(spec)   # fails early (naming the defense) if label smoothing is not available
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for form, spec in specs.items():
        results[form] = {}
        for seed in seeds:
            log.info("gpz compare: label form %s, seed %d", form, seed)
            sweep = GPZSweep(dataclasses.replace(cfg, defense=spec, seed=seed), out, probe_images, bootstrap)
            results[form][seed] = sweep.run(cuts, attack, gap)
    key = hashlib.sha256(json.dumps(sorted(r["run_dir"] for rs in results.values() for r in rs.values())).encode()
                         ).hexdigest()[:10]
    cdir = Path(out) / f"gpz-compare-{cfg.name}-{key}"
    cdir.mkdir(parents=True, exist_ok=True)
    n = len(seeds)
    lines = [f"Seeds: {', '.join(map(str, seeds))}; mean +- sample std over seeds.\n",
             "| label form | defense | accuracy | zone cut per seed (paper's rule) | deepest cut R_c^2 | deepest cut MSE |",
             "|---|---|---|---|---|---|"]
    csv_rows = []
    summary: dict[str, Any] = {}
    for form, per_seed in results.items():
        res = list(per_seed.values())
        acc = _mean_std([r["accuracy"] for r in res])
        zones = ["+".join(map(str, r["zone"]["zone_cuts"])) if r["zone"]["found"] else "none" for r in res]
        rc_last = _mean_std([r["rows"][-1]["rc2_mean"] for r in res])
        mse_last = [r["rows"][-1].get("mse") for r in res]
        ms = _mean_std(mse_last) if all(v is not None for v in mse_last) else None
        lines.append(f"| {form} | {res[0]['defense']} | {acc[0]:.4f} +- {acc[1]:.4f} | {', '.join(zones)} | "
                     f"{rc_last[0]:.4g} +- {rc_last[1]:.2g} | " + (f"{ms[0]:.4f} +- {ms[1]:.4f}" if ms else "-") + " |")
        per_cut = []
        for i, r0 in enumerate(res[0]["rows"]):
            rc = _mean_std([r["rows"][i]["rc2_mean"] for r in res])
            mv = [r["rows"][i].get("mse") for r in res]
            m = _mean_std(mv) if all(v is not None for v in mv) else (None, None)
            per_cut.append({"cut": r0["cut"], "block": r0["block"], "rc2_mean": rc[0], "rc2_seed_std": rc[1],
                            "mse": m[0], "mse_seed_std": m[1], "seeds": n})
        summary[form] = {"accuracy": acc[0], "accuracy_seed_std": acc[1], "zones": zones, "per_cut": per_cut}
        for seed, r in per_seed.items():
            for row in r["rows"]:
                csv_rows.append({"label_form": form, "seed": seed, "accuracy": r["accuracy"], **row})
    per_cut_md = ["| cut | block | " + " | ".join(f"{f} R_c^2 / MSE" for f in results) + " |",
                  "|---|---|" + "---|" * len(results)]
    for i, r in enumerate(next(iter(summary.values()))["per_cut"]):
        cells = []
        for f in results:
            c = summary[f]["per_cut"][i]
            cells.append(f"{c['rc2_mean']:.4g} +- {c['rc2_seed_std']:.2g} / " +
                         (f"{c['mse']:.4f} +- {c['mse_seed_std']:.4f}" if c["mse"] is not None else "-"))
        per_cut_md.append(f"| {r['cut']} | {r['block']} | " + " | ".join(cells) + " |")
    md = "# GPZ label-form comparison\n\n" + "\n".join(lines) + "\n\n" + "\n".join(per_cut_md) + "\n"
    atomic_write_text(cdir / "compare.md", md)
    atomic_write_text(cdir / "compare.json", json.dumps({"seeds": seeds, "forms": summary}, indent=2))
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["label_form", "seed", "accuracy"] + CSV_FIELDS[:-2], extrasaction="ignore")
    w.writeheader()
    for r in csv_rows:
        ci = r.get("rc2_ci95") or [None, None]
        w.writerow({**r, "shape": "x".join(map(str, r["shape"])), "rc2_ci_low": ci[0], "rc2_ci_high": ci[1],
                    "rc2_per_class": ";".join(f"{c}:{v:.6g}" for c, v in r["rc2_per_class"].items())})
    atomic_write_text(cdir / "compare.csv", buf.getvalue())
    plot_compare({f: (per_seed[seeds[0]]["rows"], per_seed[seeds[0]]["zone"]) for f, per_seed in results.items()},
                 cdir / "compare.png", f"{cfg.model.name}: label forms (seed {seeds[0]})")
    return {"dir": str(cdir), "results": results, "summary": summary, "table_md": md}
