"""The one figure module of splitveil: style, series styles, saving and the reviewer's checks.

Every figure of the project (report, GPZ, a run's reconstruction grid) goes through here, so all share one
standard:

- ``style()``: a matplotlib rc context whose text is readable at one column (``COLUMN_WIDTH`` = 3.6 in):
  8 pt labels and titles, 7 pt ticks, legend and annotations (never below ``MIN_FONT_PT``);
- ``series_styles(keys)`` / ``family_styles(pairs)``: a colour and a marker per series such that no two series
  share the pair (colours never repeat in ``series_styles``);
- ``save_figure(fig, path)``: 300-dpi PNG plus vector PDF (``FORMATS``) of the same stem; ``render(fig)`` gives
  the bytes; ``finish_figure`` titles and saves;
- ``place_labels(ax, ...)``: annotations beside points that overlap neither each other nor the markers;
- ``log_ticks(axis)``: a log axis with enough plain-number tick labels;
- ``figure_problems(fig)``: what a reviewer checks, read from the matplotlib objects (no "None" in any text,
  no two series sharing colour and marker, every legend inside the figure, no text below ``MIN_FONT_PT``).

Image grids (``image_grid``, ``save_recon_grid``) carry an optional note per row (e.g. its MSE / SSIM).
"""
from __future__ import annotations

import io
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Hashable, Iterable, Sequence

COLUMN_WIDTH = 3.6      # inches: one column of a two-column paper
DOUBLE_WIDTH = 7.2      # inches: both columns
DPI = 300
FORMATS = ("png", "pdf")
MIN_FONT_PT = 6.5
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d", "8")
STYLE = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "figure.titlesize": 8.5,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7, "legend.title_fontsize": 7,
    "axes.linewidth": 0.6, "lines.linewidth": 1.0, "lines.markersize": 4.5, "errorbar.capsize": 1.5,
    "xtick.major.width": 0.6, "ytick.major.width": 0.6, "grid.linewidth": 0.4, "grid.alpha": 0.3,
    "savefig.dpi": DPI, "figure.dpi": 100, "pdf.fonttype": 42, "ps.fonttype": 42,
}
ANNOTATION_PT = 7


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (works with no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def style():
    """The project's figure style (see ``STYLE``) for the figures created inside the block."""
    with pyplot().rc_context(STYLE):
        yield


def distinct_colors(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` colours, all different: tab10 up to 10, tab20 (dark shades first) up to 20, else evenly spaced
    samples of a perceptual rainbow."""
    plt = pyplot()
    if n <= 10:
        cmap = plt.get_cmap("tab10")
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = plt.get_cmap("tab20")
        order = list(range(0, 20, 2)) + list(range(1, 20, 2))   # the 10 dark shades, then the light ones
        return [cmap(i) for i in order[:n]]
    cmap = plt.get_cmap("turbo")
    return [cmap(0.05 + 0.9 * i / (n - 1)) for i in range(n)]


def series_styles(keys: Iterable[Hashable]) -> dict[Hashable, tuple[Any, str]]:
    """A (colour, marker) per key: every key its own colour (``distinct_colors``) and the markers cycled, so
    neither the pair nor the colour repeats."""
    keys = list(dict.fromkeys(keys))
    colors = distinct_colors(len(keys))
    return {k: (colors[i], MARKERS[i % len(MARKERS)]) for i, k in enumerate(keys)}


def family_styles(pairs: Iterable[tuple[Hashable, Hashable]]) -> dict[tuple[Hashable, Hashable], tuple[Any, str]]:
    """A (colour, marker) per (family, member): one colour per family (e.g. a defense), one marker per member
    within it (e.g. a parameter value). A family with more members than markers takes a further colour for the
    overflow, so no two pairs ever share colour and marker."""
    pairs = list(dict.fromkeys(pairs))
    slots: list[tuple[Hashable, int]] = []
    index: dict[tuple[Hashable, Hashable], tuple[tuple[Hashable, int], str]] = {}
    count: dict[Hashable, int] = {}
    for fam, member in pairs:
        k = count.get(fam, 0)
        count[fam] = k + 1
        slot = (fam, k // len(MARKERS))
        if slot not in slots:
            slots.append(slot)
        index[(fam, member)] = (slot, MARKERS[k % len(MARKERS)])
    colors = dict(zip(slots, distinct_colors(len(slots))))
    return {p: (colors[slot], marker) for p, (slot, marker) in index.items()}


def family_colors(families: Iterable[Hashable]) -> dict[Hashable, Any]:
    """One distinct colour per family (the colour ``family_styles`` gives its first 14 members)."""
    fams = list(dict.fromkeys(families))
    return dict(zip(fams, distinct_colors(len(fams))))


def log_ticks(axis, min_labels: int = 4) -> None:
    """Plain-number labels on a log axis (``axis``: ``ax.xaxis`` / ``ax.yaxis``), at least ``min_labels`` of
    them when the axis spans less than a few decades (1-2-5, then 1-2-3-5-7, then every integer mantissa);
    minor ticks unlabelled. Call after the limits are final."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    if not (lo > 0 and hi > lo):
        return
    ticks: list[float] = []
    for subs in ((1.0,), (1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0, 7.0), tuple(float(i) for i in range(1, 10))):
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
                 for m in subs if lo <= m * 10.0 ** e <= hi]
        if len(ticks) >= min_labels:
            break
    if len(ticks) > 9:                      # many decades: decades only
        ticks = [10.0 ** e for e in range(math.ceil(math.log10(lo)), math.floor(math.log10(hi)) + 1)] or ticks
    # labels at least 1/8 of the axis apart (0.008, 0.009, 0.01 would print over each other); decades kept first
    span = math.log10(hi) - math.log10(lo)
    kept: list[float] = []
    for t in sorted(ticks, key=lambda t: (abs(math.log10(t) - round(math.log10(t))) > 1e-9, t)):
        if all(abs(math.log10(t) - math.log10(k)) >= span / 8 for k in kept):
            kept.append(t)
    ticks = sorted(kept)
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(LogLocator(base=10, subs="auto"))
    axis.set_minor_formatter(NullFormatter())


def place_labels(ax, points: Sequence[tuple[float, float]], texts: Sequence[str], colors: Sequence[Any] | None = None,
                 fontsize: float = ANNOTATION_PT, marker_pt: float = 4.5, avoid: Sequence[tuple[float, float]] = ()):
    """Write ``texts[i]`` beside ``points[i]`` (data coordinates) where it overlaps no other label, no marker
    (``points`` and ``avoid``, each a square of ``marker_pt`` points) and stays inside the axes; the candidate
    positions widen step by step (a thin leader line marks a far label). A label that fits nowhere takes the
    position with the least overlap. Returns the annotation objects. Call after the axes' limits are final."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    to_px = fig.dpi / 72.0
    trans = ax.transData
    box = ax.get_window_extent(renderer)
    half = marker_pt * to_px / 2 + 1.0
    obstacles = [(x - half, y - half, x + half, y + half)
                 for x, y in (trans.transform(p) for p in list(points) + list(avoid))]
    placed: list[tuple[float, float, float, float]] = []
    out = []

    def overlap(a, b) -> float:
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    for i, (p, text) in enumerate(zip(points, texts)):
        if not text:
            out.append(None)
            continue
        color = colors[i] if colors is not None else "black"
        probe = ax.text(0, 0, text, fontsize=fontsize)
        ext = probe.get_window_extent(renderer)
        probe.remove()
        w, h = ext.width, ext.height
        px, py = trans.transform(p)
        best = None
        for ring, dist in enumerate((3.0, 7.0, 12.0, 18.0, 26.0)):
            d = dist * to_px
            cands = [(half + d, -h / 2), (-half - d - w, -h / 2), (-w / 2, half + d), (-w / 2, -half - d - h),
                     (half + d, half), (half + d, -half - h), (-half - d - w, half), (-half - d - w, -half - h)]
            for dx, dy in cands:
                r = (px + dx, py + dy, px + dx + w, py + dy + h)
                outside = (max(0, box.x0 - r[0]) + max(0, r[2] - box.x1)) * h + (max(0, box.y0 - r[1]) + max(0, r[3] - box.y1)) * w
                cost = sum(overlap(r, o) for o in obstacles + placed) + 10 * outside
                if best is None or cost < best[0] - 1e-9:
                    best = (cost, r, ring)
            if best[0] == 0:
                break
        _, r, ring = best
        placed.append(r)
        off = ((r[0] - px) / to_px, (r[1] - py) / to_px)
        arrow = dict(arrowstyle="-", lw=0.4, color=color, shrinkA=0, shrinkB=2) if ring >= 2 else None
        out.append(ax.annotate(text, p, xytext=off, textcoords="offset points", fontsize=fontsize, color=color,
                               ha="left", va="bottom", arrowprops=arrow, zorder=6, annotation_clip=False))
    return out


def render(fig, formats: Sequence[str] = FORMATS, dpi: int = DPI, close: bool = True) -> dict[str, bytes]:
    """The figure as bytes per format (PNG at ``dpi``, PDF vector); closes it unless ``close`` is False."""
    out = {}
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi)
        out[fmt] = buf.getvalue()
    if close:
        pyplot().close(fig)
    return out


def save_figure(fig, path: str | Path, formats: Sequence[str] = FORMATS, dpi: int = DPI, close: bool = True) -> list[Path]:
    """Write ``fig`` as ``<stem>.png`` (``dpi``) and ``<stem>.pdf`` beside ``path`` (folders created); closes
    it. Returns the paths written, PNG first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt, data in render(fig, formats, dpi, close).items():
        p = path.with_suffix("." + fmt)
        p.write_bytes(data)
        written.append(p)
    return written


def finish_figure(fig, path: str | Path, title: str = "", dpi: int = DPI) -> list[Path]:
    """Title, layout, then ``save_figure`` (300-dpi PNG + PDF)."""
    if title:
        fig.suptitle(title)
    if not fig.get_layout_engine():
        fig.set_layout_engine("constrained")
    return save_figure(fig, path, dpi=dpi)


# ---------------------------------------------------------------------------------------------------------------
# what a reviewer checks, read from the matplotlib objects

_NONE = re.compile(r"\b(None|nan|NaN)\b")


def figure_texts(fig) -> list[Any]:
    """Every visible text artist of the figure: titles, axis labels, tick labels, legend texts, annotations."""
    from matplotlib.text import Text

    fig.canvas.draw()
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _series(ax) -> list[tuple[str, Any, str]]:
    """(label, colour, marker) of every marker-carrying series of ``ax`` (error-bar caps and bars excluded)."""
    from matplotlib.colors import to_hex

    caps = set()
    for c in ax.containers:
        lines = getattr(c, "lines", None)
        if lines and len(lines) > 1:
            caps.update(lines[1] or ())
    out = []
    for ln in ax.get_lines():
        if ln in caps or not ln.get_visible():
            continue
        m = ln.get_marker()
        if m in (None, "", "None", " ", "none") or len(ln.get_xdata()) == 0:
            continue
        out.append((ln.get_label(), to_hex(ln.get_color(), keep_alpha=False), str(m)))
    for coll in ax.collections:
        paths = getattr(coll, "get_paths", None)
        fc = coll.get_facecolor() if hasattr(coll, "get_facecolor") else []
        if coll.__class__.__name__ != "PathCollection" or not len(fc) or not coll.get_visible():
            continue       # unfilled rings (the Pareto front) and bands are no series
        out.append((coll.get_label(), to_hex(fc[0], keep_alpha=False), f"path{len(paths()[0]) if paths() else 0}"))
    return out


def figure_problems(fig, min_font: float = MIN_FONT_PT) -> list[str]:
    """The reviewer's checks: no "None"/"nan" in any text, no two series in one axes sharing colour and marker,
    every legend box inside the figure, no text smaller than ``min_font`` points. Empty when all pass."""
    problems = []
    for t in figure_texts(fig):
        if _NONE.search(t.get_text()):
            problems.append(f"text shows None/nan: {t.get_text()!r}")
        if t.get_fontsize() < min_font - 1e-6:
            problems.append(f"text below {min_font} pt ({t.get_fontsize():g} pt): {t.get_text()[:40]!r}")
    for k, ax in enumerate(fig.axes):
        seen: dict[tuple[str, str], str] = {}
        for label, color, marker in _series(ax):
            key = (color, marker)
            if key in seen:
                problems.append(f"axes {k}: series {seen[key]!r} and {label!r} share colour {color} and marker {marker}")
            else:
                seen[key] = label
    renderer = fig.canvas.get_renderer()
    fb = fig.bbox
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    for lg in legends:
        bb = lg.get_window_extent(renderer)
        if bb.x0 < fb.x0 - 0.5 or bb.y0 < fb.y0 - 0.5 or bb.x1 > fb.x1 + 0.5 or bb.y1 > fb.y1 + 0.5:
            problems.append(f"legend box {tuple(round(v) for v in bb.extents)} outside the figure "
                            f"{tuple(round(v) for v in fb.extents)} (pixels)")
    return problems


def overlapping_texts(texts: Sequence[Any]) -> list[tuple[str, str]]:
    """Pairs of the given text artists whose boxes overlap (e.g. annotations)."""
    texts = [t for t in texts if t is not None]
    if not texts:
        return []
    renderer = texts[0].figure.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    return [(texts[i].get_text(), texts[j].get_text()) for i in range(len(texts)) for j in range(i + 1, len(texts))
            if boxes[i].overlaps(boxes[j])]


# ---------------------------------------------------------------------------------------------------------------
# image grids

def image_grid(rows: Sequence[tuple[str, Any]], n: int | None = None, cell: tuple[float, float] = (0.6, 0.6),
               notes: Sequence[str | None] | None = None, label_width: float | None = None):
    """A figure with one labelled row of images per ``(label, N x C x H x W tensor in [0, 1])``; ``notes[r]``
    (e.g. "MSE 0.047  SSIM 0.31") is written under row r's label. The label column is as wide as the longest
    line (7 pt text)."""
    plt = pyplot()
    n = n or min(int(r.shape[0]) for _, r in rows)
    lines = [str(label) for label, _ in rows] + [str(x) for x in (notes or []) if x]
    if label_width is None:
        label_width = max(0.8, 0.052 * max(len(x) for x in lines) + 0.2)
    with style():
        fig, axes = plt.subplots(len(rows), n, figsize=(cell[0] * n + label_width, cell[1] * len(rows) + 0.35),
                                 squeeze=False, gridspec_kw=dict(wspace=0.04, hspace=0.08))
        fig.subplots_adjust(left=label_width / (cell[0] * n + label_width), right=0.995, bottom=0.01,
                            top=1 - 0.3 / (cell[1] * len(rows) + 0.35))
        for r, (label, imgs) in enumerate(rows):
            for c in range(n):
                ax = axes[r][c]
                img = imgs[c].detach().float().cpu().clamp(0, 1)
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(img.permute(1, 2, 0).numpy())
                ax.set_xticks([])
                ax.set_yticks([])
                for s in ax.spines.values():
                    s.set_linewidth(0.3)
            note = notes[r] if notes is not None and r < len(notes) else None
            text = label if not note else f"{label}\n{note}"
            axes[r][0].set_ylabel(text, fontsize=7, rotation=0, ha="right", va="center", labelpad=4)
    return fig


def save_recon_grid(path: str | Path, originals, rows: dict[str, Any], title: str = "",
                    notes: dict[str, str] | None = None) -> list[Path]:
    """Originals on top, one row of reconstructions per attack below (all [0, 1], N x C x H x W), each row with
    its note (``notes[name]``, e.g. its MSE / SSIM); 300-dpi PNG + PDF."""
    names = list(rows)
    fig = image_grid([("original", originals), *rows.items()], n=int(originals.shape[0]),
                     notes=[None] + [(notes or {}).get(k) for k in names])
    if title:
        fig.suptitle(title, fontsize=8)
    return save_figure(fig, path)


def score_note(mse: float | None, ssim: float | None = None, weak: bool = False, unconverged: bool = False) -> str:
    """The note beside a reconstruction row: "MSE 0.0470  SSIM 0.312 (weak)"."""
    parts = []
    if mse is not None:
        parts.append(f"MSE {mse:.4g}")
    if ssim is not None:
        parts.append(f"SSIM {ssim:.3f}")
    flags = [f for f, on in (("weak", weak), ("unconverged", unconverged)) if on]
    text = "  ".join(parts)
    return f"{text} ({', '.join(flags)})" if flags else text
