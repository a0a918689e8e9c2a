"""Error analysis: both kinds of mistakes at several thresholds, the score distribution per class with the
images at each end, and what the model actually saw; plus metrics per subset.

At each threshold (fake when ``score >= threshold``; by default the val-chosen operating point, 0.5 and
the val threshold at a low FPR) the gallery shows real images called fake (highest score first) and fake
images called real (lowest first), each "none" only when there is no such error. The score distribution
(an inline SVG histogram per class with the thresholds marked) comes with the K images nearest each end
of each class: the most real-looking and most fake-looking reals and fakes, which is where a confound
such as framing shows. Every card pairs the original file with the exact model input (the evaluation
loader's tensor after face crop / centre crop / resize, de-normalised, embedded losslessly as PNG) when
a `model_input` function is given (`model_input_images`). Thumbnails are data URIs: errors.html is
self-contained like the dashboard.
"""
from __future__ import annotations

import base64
import html
import io
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from evaluation.dashboard import table_html
from evaluation.metrics import MetricError, as_label_score, binary_metrics

log = logging.getLogger(__name__)

THUMB_PX = 96
ModelInput = Callable[[Sequence[str]], Mapping[str, np.ndarray]]  # paths -> uint8 RGB model inputs

_STYLE = """
body{font-family:system-ui,sans-serif;margin:16px 24px;color:#1d2330;background:#f6f7f9}
h1{font-size:20px}h2{font-size:16px;margin-top:24px}h3{font-size:14px;margin:14px 0 6px}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;background:#fff;border-radius:6px;padding:6px;box-shadow:0 1px 3px #0002;font-size:11px;width:212px}
figure.single{width:112px}.pair{display:flex;gap:4px}.pair div{text-align:center;color:#667;font-size:10px}
figure img,.missing{width:96px;height:96px;object-fit:contain;display:block;margin:auto;background:#eee}
img.input{image-rendering:pixelated}
.missing{display:flex;align-items:center;justify-content:center;color:#888}
figcaption{margin-top:4px;word-break:break-all}.score{font-weight:600}
table{border-collapse:collapse;font-size:12px}td,th{border-bottom:1px solid #e3e6eb;padding:3px 8px;text-align:right}
.none{color:#667;font-style:italic}
"""


def most_confident_errors(df: pd.DataFrame, threshold: float, k: int = 8) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(real called fake by score descending, fake called real by score ascending), K rows each."""
    fp = df[(df["label"] == 0) & (df["score"] >= threshold)].sort_values("score", ascending=False, kind="stable")
    fn = df[(df["label"] == 1) & (df["score"] < threshold)].sort_values("score", ascending=True, kind="stable")
    return fp.head(k), fn.head(k)


def class_extremes(df: pd.DataFrame, k: int = 8) -> dict[tuple[int, str], pd.DataFrame]:
    """{(label, "lowest"|"highest"): the K rows of that class nearest that end of the score range}."""
    out = {}
    for label in (0, 1):
        part = df[df["label"] == label].sort_values("score", kind="stable")
        out[(label, "lowest")] = part.head(k)
        out[(label, "highest")] = part.tail(k).iloc[::-1]
    return out


def thumbnail_data_uri(path: str | Path, size: int = THUMB_PX) -> str | None:
    """Base64 JPEG data URI of a `size`-px thumbnail, or None when the file cannot be read. A folder (a video's
    frames, as video runs' predictions name them) shows its middle frame."""
    if os.path.isdir(path):
        from dataio.video_data import list_frames

        frames = list_frames(path)
        if not frames:
            log.debug("thumbnail=failed path=%s error=no frames in the folder", path)
            return None
        path = frames[len(frames) // 2]
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size * 2, size * 2))  # fast JPEG decode at reduced scale
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        log.debug("thumbnail=failed path=%s error=%s", path, exc)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_data_uri(rgb: np.ndarray) -> str:
    """Lossless PNG data URI of a uint8 RGB array (the model input, pixel for pixel). zlib level 1: 2.2x faster
    than PIL's default 6 for ~15% more bytes (a run's report encodes up to 64 of these)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def model_input_images(cfg, mean: Sequence[float], std: Sequence[float], paths: Sequence[str]) -> dict[str, np.ndarray]:
    """What the evaluation loader feeds the model for each path (data.face_crop, centre crop, resize: the run's
    eval transform), de-normalised back to uint8 RGB. Video configs and unreadable files give no entry."""
    from dataio.data import DataIndex, Sample
    from dataio.loaders import build_loaders

    if cfg.model.is_video or not paths:
        return {}
    cfg = cfg.with_overrides({"data.num_workers": 0, "data.batch_size": 1}, "gallery")
    paths = list(dict.fromkeys(paths))
    dataset = build_loaders(DataIndex(train=[], val=[], test=[Sample(p, 0) for p in paths]), cfg, mean, std)[
        "test"].dataset
    m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    out = {}
    for i, p in enumerate(paths):
        item = dataset[i]
        if item is not None:
            x = item[0].float().numpy().transpose(1, 2, 0) * s + m
            out[p] = np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def _card(row: pd.Series, kind: str, thumbs: dict[str, str | None], inputs: Mapping[str, np.ndarray] | None) -> str:
    path = str(row["path"])
    uri = thumbs.get(path)
    name = html.escape(Path(path).name)
    img = (f'<img class="thumb {kind}" src="{uri}" alt="{name}">' if uri
           else f'<div class="missing thumb {kind}">unreadable</div>')
    extra = "".join(f"<br>{col}: {html.escape(str(row[col]))}" for col in ("subset", "group")
                    if col in row.index and pd.notna(row[col]))
    caption = f'<figcaption><span class="score">P(fake)={row["score"]:.4f}</span><br>{name}{extra}</figcaption>'
    if inputs is None:
        return f'<figure class="single" title="{html.escape(path)}">{img}{caption}</figure>'
    x = inputs.get(path)
    seen = (f'<img class="input {kind}" src="{png_data_uri(x)}" alt="model input of {name}">'
            f'<div>model input {x.shape[1]}&times;{x.shape[0]}</div>' if x is not None
            else f'<div class="missing input {kind}">not readable</div><div>model input</div>')
    return (f'<figure title="{html.escape(path)}"><div class="pair"><div>{img}<div>file</div></div>'
            f'<div>{seen}</div></div>{caption}</figure>')


def score_histogram_svg(df: pd.DataFrame, thresholds: Mapping[str, float], bins: int = 25) -> str:
    """Inline SVG: per-class histograms of P(fake) over [0, 1] (real blue, fake red), thresholds as dashed lines."""
    w, h, pad = 560, 180, 28
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = {c: np.histogram(np.clip(df.loc[df["label"] == c, "score"], 0, 1), edges)[0] for c in (0, 1)}
    top = max(1, max(int(v.max(initial=0)) for v in counts.values()))
    bw = (w - 2 * pad) / bins
    parts = [f'<svg id="score-histogram" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 30}" '
             f'style="background:#fff;border-radius:6px">']
    for c, color in ((0, "#2f6fdb"), (1, "#d9453b")):
        for i, n in enumerate(counts[c]):
            if n:
                bh = (h - 2 * pad) * n / top
                parts.append(f'<rect class="bar-{"real" if c == 0 else "fake"}" x="{pad + i * bw:.1f}" '
                             f'y="{h - pad - bh:.1f}" width="{bw - 1:.1f}" height="{bh:.1f}" fill="{color}" '
                             f'fill-opacity="0.55"><title>{"real" if c == 0 else "fake"} {edges[i]:.2f}-'
                             f'{edges[i + 1]:.2f}: {n}</title></rect>')
    for j, (name, t) in enumerate(thresholds.items()):
        x = pad + min(max(t, 0.0), 1.0) * (w - 2 * pad)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{pad - 10}" y2="{h - pad}" stroke="#222" '
                     f'stroke-dasharray="4 3"/><text x="{x + 3:.1f}" y="{pad - 12 + 11 * j}" font-size="10">'
                     f'{html.escape(name)}={t:.3f}</text>')
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = pad + v * (w - 2 * pad)
        parts.append(f'<text x="{x:.1f}" y="{h - pad + 14}" font-size="10" text-anchor="middle">{v:g}</text>')
    parts.append(f'<text x="{pad}" y="{h + 12}" font-size="11"><tspan fill="#2f6fdb">&#9632; real '
                 f'(n={int(counts[0].sum())})</tspan>  <tspan fill="#d9453b">&#9632; fake (n={int(counts[1].sum())})'
                 f'</tspan>  P(fake) on the x axis, max bin {top}</text></svg>')
    return "".join(parts)


def subset_breakdown(df: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """Metrics per value of the `subset` column.

    A subset holding both classes is scored on its own. A one-class subset (e.g. one FF++
    manipulation type, all fake) is ranked against every sample of the other class in the table
    (the usual per-manipulation AUC); `reference` says which was done. accuracy and mean_score
    are always within the subset alone.
    """
    if "subset" not in df.columns:
        raise MetricError("subset_breakdown needs a 'subset' column")
    rows = []
    for name, part in df.groupby(df["subset"].fillna("(none)").astype(str), sort=True):
        y, s = as_label_score(part["label"], part["score"], f"subset {name}")
        row = {"subset": name, "n": int(y.size), "n_fake": int(y.sum()),
               "accuracy": float(np.mean((s >= threshold) == y)), "mean_score": float(s.mean())}
        if 0 < y.sum() < y.size:
            scored, row["reference"] = part, "within subset"
        else:
            other = df[df["label"] != y[0]]
            scored = pd.concat([part, other])
            row["reference"] = f"vs all {'real' if y[0] == 1 else 'fake'}"
        try:
            m = binary_metrics(scored["label"], scored["score"], threshold)
            row.update({"auc": m["auc"], "ap": m["ap"], "eer": m["eer"]})
        except MetricError as exc:  # e.g. the whole table is one class
            log.warning("subset=%s metrics=skipped reason=%s", name, exc)
            row.update({"auc": np.nan, "ap": np.nan, "eer": np.nan})
        rows.append(row)
    return pd.DataFrame(rows).set_index("subset")


def build_error_gallery(df: pd.DataFrame, thresholds: float | Mapping[str, float], k: int = 8,
                        title: str = "Error analysis", subsets: pd.DataFrame | None = None,
                        model_input: ModelInput | None = None) -> str:
    """Self-contained HTML: a threshold table, the score distribution with each class's extreme images, and
    at every threshold the K most confident real-called-fake (<img class="thumb fp">) and fake-called-real
    (class "thumb fn") images; an optional per-subset table. `thresholds` is one value or {name: value}."""
    named = {"threshold": float(thresholds)} if isinstance(thresholds, (int, float)) else dict(thresholds)
    y, s = df["label"].to_numpy(), df["score"].to_numpy()
    errors = {name: most_confident_errors(df, t, k) for name, t in named.items()}
    extremes = class_extremes(df, k)
    shown = [r for pair in errors.values() for part in pair for r in part["path"]] + [
        r for part in extremes.values() for r in part["path"]]
    shown = list(dict.fromkeys(str(p) for p in shown))
    thumbs = {p: thumbnail_data_uri(p) for p in shown}
    inputs = None
    if model_input is not None:
        try:
            inputs = model_input(shown)
        except Exception as exc:  # the gallery is a report: without model inputs it still shows the files
            log.warning("event=gallery_model_input_failed reason=%s: %s", type(exc).__name__, exc)

    def cards(rows: pd.DataFrame, kind: str, empty: str) -> str:
        return "".join(_card(r, kind, thumbs, inputs) for _, r in rows.iterrows()) or f'<p class="none">{empty}</p>'

    rows = []
    for name, t in named.items():
        fp, fn = int(((y == 0) & (s >= t)).sum()), int(((y == 1) & (s < t)).sum())
        n_real, n_fake = int((y == 0).sum()), int((y == 1).sum())
        rows.append({"threshold": name, "value": round(t, 4), "real called fake": fp, "fake called real": fn,
                     "FPR": round(fp / n_real, 4) if n_real else np.nan,
                     "FNR": round(fn / n_fake, 4) if n_fake else np.nan,
                     "accuracy": round(float(np.mean((s >= t) == (y == 1))), 4)})
    seen = ("Each card: the file, and beside it the model input (after face crop / centre crop / resize, pixel "
            "for pixel)." if inputs is not None else "Each card shows the file (the model input was not available).")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>n={len(df)} ({int((y == 0).sum())} real, {int((y == 1).sum())} fake) · fake if P(fake) &ge; "
             f"threshold · {seen}</p>",
             f'<section id="thresholds"><h2>Thresholds</h2>{table_html(pd.DataFrame(rows).set_index("threshold"))}'
             "</section>",
             '<section id="score-distribution"><h2>Score distribution per class</h2>'
             f"{score_histogram_svg(df, named)}"]
    for (label, end), part in extremes.items():
        cls = "real" if label == 0 else "fake"
        kind = f"extreme {cls}-{end}"
        parts.append(f'<h3 id="{cls}-{end}">{cls.capitalize()} images with the {end} scores ({len(part)})</h3>'
                     f'<div class="grid">{cards(part, kind, f"no {cls} images")}</div>')
    parts.append("</section>")
    for name, t in named.items():
        fp, fn = errors[name]
        sid = "".join(ch if ch.isalnum() else "-" for ch in name)
        parts.append(
            f'<section id="at-{sid}"><h2>At {html.escape(name)} = {t:.4f}</h2>'
            f'<h3 id="fp-{sid}">Real called fake, most confident first ({len(fp)} shown)</h3>'
            f'<div class="grid">{cards(fp, "fp", f"none: no real image scored at or above {t:.4f}")}</div>'
            f'<h3 id="fn-{sid}">Fake called real, most confident first ({len(fn)} shown)</h3>'
            f'<div class="grid">{cards(fn, "fn", f"none: no fake image scored below {t:.4f}")}</div></section>')
    if subsets is not None and len(subsets):
        parts.append(f'<section id="subsets"><h2>Metrics by subset</h2>{table_html(subsets)}</section>')
    unreadable = sum(v is None for v in thumbs.values())
    if unreadable:
        log.warning("gallery_thumbnails_unreadable=%d of %d (shown as placeholders)", unreadable, len(thumbs))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_error_gallery(path: str | Path, df: pd.DataFrame, thresholds: float | Mapping[str, float], k: int = 8,
                        title: str = "Error analysis", model_input: ModelInput | None = None,
                        subset_threshold: float | None = None) -> Path:
    """build_error_gallery (with the subset table when a subset column exists) written to `path`."""
    first = float(thresholds) if isinstance(thresholds, (int, float)) else next(iter(thresholds.values()))
    subsets = (subset_breakdown(df, first if subset_threshold is None else subset_threshold)
               if "subset" in df.columns and df["subset"].notna().any() else None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_error_gallery(df, thresholds, k, title, subsets, model_input), encoding="utf-8")
    return path
