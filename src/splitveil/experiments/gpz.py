"""Golden Partition Zone analysis (GPZ paper, ``seeds/paper-golden-partition-zone.md``): train ONE model, then
for every cut point probe the transmitted representation (shape, d, R_c^2 per class, sigma_feat^2, tr(Sigma)
and the scale-free within-class fraction R_c^2 / tr(Sigma) with bootstrap intervals, the paper's entropy bound
terms), the edge's share of parameters and FLOPs, the payload, and (optionally) the inverse-network attack
trained on that model's aux features at that cut (the paper's protocol: one target model, one attacker per cut)
with the mean-image baseline on the same images. The transition zone is detected by the paper's rule on R_c^2, by
the same rule on the within-class fraction and by MSE (see ``detect_zone``).

Everything lives in ``<out>/gpz-<run-id>/``: ``checkpoint.pt`` (the trained model), ``meta.json``, ``rows.json``
(finished cuts, kept across runs: an interrupted or extended sweep only computes the missing cuts), ``zone.json``,
``cut<k>_<block>/`` (attack checkpoint and reconstructions); ``report.gpz.write_sweep`` adds ``gpz.md`` /
``gpz.csv`` (table), ``gpz.png`` / ``.pdf`` (MSE / baseline, R_c^2 and tr(Sigma), the within-class fraction against
depth, each rule's zone shaded), ``recon_strip.png`` / ``.pdf``.

The sweep uses the run pipeline's stages (``pipeline.py``: data, training, the edge, the attack, the seeds);
the zone rule is ``results/gpz.py``, the tables and figures ``report/gpz.py``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..attacks import ATTACKS
from ..defenses import Edge, build_defenses
from ..metrics import count_params, flops_per_image, payload_bytes
from ..attacks import mean_image_baseline
from ..metrics.probes import bootstrap_probe, probe_values
from ..models import SplitModel, create_model
from ..params import ConfigError, coerce
from ..results.figures import save_recon_grid
from ..results.gpz import (BOOTSTRAP_RESAMPLES, PAPER_MSE_SUMMED_THRESHOLD, SECOND_ZONE_GAP, ZONE_METHOD,  # noqa: F401
                           detect_zone, label_smoothing_reading, paper_fidelity_threshold, paper_zone,
                           percentile)
from ..results.records import BASELINE, GPZ_ATTACK_KEYS, GPZRow
from ..utils import atomic_write_text, resolve_device
from . import pipeline
from .config import RunConfig

log = logging.getLogger("splitveil.gpz")

PROBE_VERSION = 3   # rows.json rows of an older probe are redone (1: singletons counted, no bootstrap; 2: no tr(Sigma),
                    # no bootstrap of the within-class fraction); their attack results are kept
ATTACK_KEYS = GPZ_ATTACK_KEYS       # the attack's keys in a row (old name)


# -- cut selection and label forms -------------------------------------------------------------------------
def _cut_index(item: str, block_names: list[str], n: int) -> int:
    if item.lstrip("-").isdigit():
        k = int(item)
    elif item in block_names[:-1]:
        k = block_names.index(item) + 1
    else:
        raise ConfigError(f"--cuts: unknown cut '{item}'; valid cuts are 1..{n} or a block name "
                          f"({', '.join(block_names[:-1])})")
    if not 1 <= k <= n:
        raise ConfigError(f"--cuts: {k} is out of range; valid cuts are 1..{n}")
    return k


def parse_cuts(spec: str | Iterable[int | str] | None, block_names: list[str]) -> list[int]:
    """``all`` / None: every block boundary 1..n-1; otherwise a comma-separated list of cuts (1-based), block
    names and inclusive ranges ``a-b`` or ``a:b`` (of cuts or block names), e.g. ``2,8-16``, ``8:16``,
    ``conv8-conv16``. Returns the sorted distinct cuts."""
    n = len(block_names) - 1
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(1, n + 1))
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    if not items:
        raise ConfigError("--cuts: empty list; use 'all' or e.g. 2,4,6 or 8-16")
    out = set()
    for it in items:
        it = str(it).strip()
        m = re.fullmatch(r"\s*([A-Za-z_]\w*|\d+)\s*[-:]\s*([A-Za-z_]\w*|\d+)\s*", it)
        if m and it not in block_names:
            lo, hi = (_cut_index(g, block_names, n) for g in m.groups())
            if lo > hi:
                raise ConfigError(f"--cuts: range '{it}' runs backwards; write it as {hi}-{lo}")
            out.update(range(lo, hi + 1))
        else:
            out.add(_cut_index(it, block_names, n))
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
        self.seeds = pipeline.Seeds(cfg.seed)
        self.prepared = False

    # -- set-up -------------------------------------------------------------------------------------------
    def prepare(self) -> "GPZSweep":
        if self.prepared:
            return self
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data, _ = pipeline.prepare_data(cfg, self.seeds)
        self.backbone = create_model(cfg.model.name, self.data.num_classes, self.data.image_shape, cfg.model.width,
                                     **cfg.model.options)
        try:
            train_cut = self.backbone.cut_index(cfg.model.cut)
        except ConfigError:
            train_cut = 1
            self.notes.append(f"model.cut '{cfg.model.cut}' is not a cut of {cfg.model.name}: training at cut 1 "
                              "(it only matters for defenses that transform the features)")
        model = SplitModel(self.backbone, train_cut)
        self.defenses = pipeline.prepare_defenses(cfg, model, self.data, self.device)
        prep = pipeline.Prepared(self.data, model, self.defenses, self.device, self.seeds)
        # a finished checkpoint is reused, a partial one continued
        trained = pipeline.train(cfg, prep, ckpt_path=self.run_dir / "checkpoint.pt", resume=True)
        self.history, self.accuracy = trained.history, trained.accuracy
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
        return pipeline.freeze_edge(nn.Sequential(*blocks), self.defenses)

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
        z, _ = pipeline.transmitted_features(edge, self.data, split, self.device, self.seeds, self.cfg.eval.batch_size)
        pv = probe_values(z, split.labels, self.data.num_classes)
        boot: dict[str, Any] = {"rc2_boot": None, "rc2_ci95": None}
        extra: dict[str, Any] = {}
        if self.bootstrap:
            bp = bootstrap_probe(z, split.labels, self.bootstrap, self.seeds.bootstrap)
            ci = {k: (lambda s: [percentile(s, 2.5), percentile(s, 97.5)])(sorted(v.tolist())) for k, v in bp.items()}
            boot = {"rc2_boot": bp["rc2"].tolist(), "rc2_ci95": ci["rc2"]}
            extra = {"frac_boot": bp["within_fraction"].tolist(), "frac_ci95": ci["within_fraction"],
                     "total_ci95": ci["total"]}
        shape = tuple(z.shape[1:])
        enc_params = count_params(edge.encoder)
        enc_flops = flops_per_image(edge.encoder, self.data.image_shape, self.device)
        return GPZRow(
            cut=k, block=self.block_names[k - 1], shape=list(shape), probe_images=n, probe_version=PROBE_VERSION,
            bootstrap=self.bootstrap, **boot, probe={**{key: v for key, v in pv.items() if key != "rc2_per_class"}, **extra},
            rc2_per_class={str(c): v for c, v in pv["rc2_per_class"].items()},
            edge_params=enc_params, edge_params_share=enc_params / max(1, self.full_params),
            edge_flops=enc_flops, edge_flops_share=enc_flops / max(1, self.full_flops),
            payload_bytes=payload_bytes(shape),
        ).to_dict()

    def cut_dir(self, k: int) -> Path:
        return self.run_dir / f"cut{k:02d}_{self.block_names[k - 1]}"

    def attack(self, k: int) -> dict[str, Any]:
        """Every configured attack at cut ``k`` (the inverse network when none is configured): fit on the aux
        features of the trained model, scored on test. The row's scores are the worst case over the suite (the
        lowest MSE); with more than one attack the row also names it (``worst_attack``) and keeps each attack's
        MSE (``attack_mse``)."""
        self.prepare()
        specs = self.cfg.attack_params() or {
            "inverse_network": coerce(ATTACKS.get("inverse_network").Params, {})}
        d = self.cut_dir(k)
        d.mkdir(parents=True, exist_ok=True)
        # the pipeline's attack stage: the same seeds, test images and worst case as a run's
        out = pipeline.attack_all(specs, self.edge(k), self.data, self.seeds, self.device,
                                  show_progress=self.cfg.progress, workdir=d, n_show=self.cfg.eval.recon_images)
        worst = out.worst_case.metrics["mse"].attack if out.worst_case and "mse" in out.worst_case.metrics \
            else next(iter(out.attacks))
        result = out.attacks[worst].to_dict()
        torch.save({"originals": out.originals, "recon": out.recon[worst], "attack": worst}, d / "recon.pt")
        several = len(specs) > 1
        title = f"{self.cfg.model.name} cut {k} ({self.block_names[k - 1]}) MSE {result['mse']:.4f}"
        save_recon_grid(d / "recon.png", out.originals,
                        {f"cut {k} {self.block_names[k - 1]}" + (f" {n}" if several else ""): r
                         for n, r in out.recon.items()}, title + (f" (worst case: {worst})" if several else ""))
        row = {key: result[key] for key in GPZ_ATTACK_KEYS if key in result}
        base = out.baseline.get(BASELINE)
        row["baseline_mse"] = base.mse if base is not None else None   # the mean-image attacker on the same images
        if several:
            row["worst_attack"] = worst
            row["attack_mse"] = {n: a.mse for n, a in out.attacks.items()}
        return row

    def baseline_mse(self) -> float | None:
        """The mean-image baseline's MSE on the images the attacks are scored on (the aux split's mean image
        against the test split), for rows attacked before the sweep stored it. None when a configured attack
        runs in inference-time mode (its own split of the test images: only a new attack gives its baseline)."""
        self.prepare()
        specs = self.cfg.attack_params() or {}
        if any(getattr(p, "mode", "training-time") == "inference-time" for p in specs.values()):
            return None
        return float(mean_image_baseline(self.data)["mse"])

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
                log.info("%s: cut %d %s: attack mse %.5f (mean-image baseline %.5f)", step, k, row["block"],
                         row["mse"], row["baseline_mse"] or float("nan"))
            elif attack and row.get("baseline_mse") is None:
                row["baseline_mse"] = self.baseline_mse()    # a row attacked before baselines were stored
                if row["baseline_mse"] is not None:
                    self._save_row(row)
            done[k] = row
        rows = [done[k] for k in ks]
        if not attack:  # a probe-only sweep: attack numbers of earlier runs are kept in rows.json, not shown
            rows = [GPZRow.from_dict(r).to_dict(with_attack=False) for r in rows]
        zone = detect_zone(rows, gap, channels=self.data.image_shape[0])
        atomic_write_text(self.run_dir / "zone.json", json.dumps(zone, indent=2))
        recon = {r["cut"]: str(self.cut_dir(r["cut"]) / "recon.pt") for r in rows
                 if attack and (self.cut_dir(r["cut"]) / "recon.pt").exists()}
        # the tables and figures of this result: report.gpz.write_sweep(result)
        return {"run_dir": str(self.run_dir), "model": self.cfg.model.name, "dataset": self.data.name,
                "defense": self.defenses.label, "accuracy": self.accuracy, "rows": rows, "zone": zone,
                "notes": self.notes, "recon": recon}


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
    MSE per form (``summary``, also in ``<dir>/compare.json``). ``seeds`` default: the config's seed only.
    ``report.gpz.write_compare`` writes the tables and the overlay figure."""
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
    summary: dict[str, Any] = {}
    for form, per_seed in results.items():
        res = list(per_seed.values())
        acc = _mean_std([r["accuracy"] for r in res])
        zones = ["+".join(map(str, r["zone"]["zone_cuts"])) if r["zone"]["found"] else "none" for r in res]
        sf = [r["zone"].get("scale_free") or {} for r in res]
        zones_sf = ["+".join(map(str, z["zone_cuts"])) if z.get("found") else "none" for z in sf]
        per_cut = []
        for i, r0 in enumerate(res[0]["rows"]):
            rc = _mean_std([r["rows"][i]["rc2_mean"] for r in res])
            fr = _mean_std([r["rows"][i]["within_fraction"] for r in res])
            tr = _mean_std([r["rows"][i]["sigma2"] * r["rows"][i]["d"] for r in res])
            mv = [r["rows"][i].get("mse") for r in res]
            m = _mean_std(mv) if all(v is not None for v in mv) else (None, None)
            per_cut.append({"cut": r0["cut"], "block": r0["block"], "rc2_mean": rc[0], "rc2_seed_std": rc[1],
                            "within_fraction": fr[0], "within_fraction_seed_std": fr[1], "total_variance": tr[0],
                            "total_variance_seed_std": tr[1], "mse": m[0], "mse_seed_std": m[1], "seeds": n})
        summary[form] = {"accuracy": acc[0], "accuracy_seed_std": acc[1], "zones": zones, "zones_scale_free": zones_sf,
                         "per_cut": per_cut}
    ls = None
    if n > 1 and "onehot" in results and len(results) > 1:
        ls = label_smoothing_reading({f: [r["rows"] for r in per_seed.values()] for f, per_seed in results.items()})
    atomic_write_text(cdir / "compare.json", json.dumps({"seeds": seeds, "forms": summary, "label_smoothing": ls},
                                                        indent=2))
    return {"dir": str(cdir), "results": results, "summary": summary, "seeds": seeds, "model": cfg.model.name,
            "label_smoothing": ls}
