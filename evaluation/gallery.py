"""Error analysis: the most confident mistakes as a thumbnail gallery, and metrics per subset.

False positives are real samples with ``score >= threshold`` ranked by score (highest first);
false negatives are fake samples below it ranked lowest first. Thumbnails are embedded as base64
JPEG data URIs, so errors.html is self-contained like the dashboard.
"""
from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from evaluation.dashboard import table_html
from evaluation.metrics import MetricError, as_label_score, binary_metrics

log = logging.getLogger(__name__)

THUMB_PX = 96

_STYLE = """
body{font-family:system-ui,sans-serif;margin:16px 24px;color:#1d2330;background:#f6f7f9}
h1{font-size:20px}h2{font-size:16px;margin-top:24px}.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;background:#fff;border-radius:6px;padding:6px;width:120px;box-shadow:0 1px 3px #0002;font-size:11px}
figure img,.missing{width:96px;height:96px;object-fit:contain;display:block;margin:auto;background:#eee}
.missing{display:flex;align-items:center;justify-content:center;color:#888}
figcaption{margin-top:4px;word-break:break-all}.score{font-weight:600}
table{border-collapse:collapse;font-size:12px}td,th{border-bottom:1px solid #e3e6eb;padding:3px 8px;text-align:right}
"""


def most_confident_errors(df: pd.DataFrame, threshold: float, k: int = 8) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(false positives by score descending, false negatives by score ascending), K rows each."""
    fp = df[(df["label"] == 0) & (df["score"] >= threshold)].sort_values("score", ascending=False, kind="stable")
    fn = df[(df["label"] == 1) & (df["score"] < threshold)].sort_values("score", ascending=True, kind="stable")
    return fp.head(k), fn.head(k)


def thumbnail_data_uri(path: str | Path, size: int = THUMB_PX) -> str | None:
    """Base64 JPEG data URI of a `size`-px thumbnail, or None when the file cannot be read."""
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


def _card(row: pd.Series, kind: str) -> str:
    uri = thumbnail_data_uri(row["path"])
    name = html.escape(Path(str(row["path"])).name)
    img = (f'<img class="thumb {kind}" src="{uri}" alt="{name}">' if uri
           else f'<div class="missing thumb {kind}">unreadable</div>')
    extra = "".join(f"<br>{col}: {html.escape(str(row[col]))}" for col in ("subset", "group")
                    if col in row.index and pd.notna(row[col]))
    return (f'<figure title="{html.escape(str(row["path"]))}">{img}<figcaption>'
            f'<span class="score">P(fake)={row["score"]:.4f}</span><br>{name}{extra}</figcaption></figure>')


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


def build_error_gallery(df: pd.DataFrame, threshold: float, k: int = 8, title: str = "Error analysis",
                        subsets: pd.DataFrame | None = None) -> str:
    """Self-contained HTML with the K most confident false positives and false negatives
    (each <img> has class "thumb fp" or "thumb fn") and an optional per-subset table."""
    fp, fn = most_confident_errors(df, threshold, k)
    unreadable = 0
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>threshold={threshold:.4f} (fake if P(fake) &ge; threshold) · n={len(df)} · "
             f"false positives={int(((df['label'] == 0) & (df['score'] >= threshold)).sum())} · "
             f"false negatives={int(((df['label'] == 1) & (df['score'] < threshold)).sum())}</p>"]
    sections = (("false-positives", "Most confident false positives (real called fake)", fp, "fp"),
                ("false-negatives", "Most confident false negatives (fake called real)", fn, "fn"))
    for sid, heading, rows, kind in sections:
        cards = "".join(_card(r, kind) for _, r in rows.iterrows()) or "<p>none</p>"
        unreadable += cards.count('class="missing thumb')
        parts.append(f'<section id="{sid}"><h2>{heading} ({len(rows)})</h2><div class="grid">{cards}</div></section>')
    if subsets is not None and len(subsets):
        parts.append(f'<section id="subsets"><h2>Metrics by subset</h2>{table_html(subsets)}</section>')
    if unreadable:
        log.warning("gallery_thumbnails_unreadable=%d of %d (shown as placeholders)", unreadable, len(fp) + len(fn))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_error_gallery(path: str | Path, df: pd.DataFrame, threshold: float, k: int = 8,
                        title: str = "Error analysis") -> Path:
    """build_error_gallery (with the subset table when a subset column exists) written to `path`."""
    subsets = subset_breakdown(df, threshold) if "subset" in df.columns and df["subset"].notna().any() else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_error_gallery(df, threshold, k, title, subsets), encoding="utf-8")
    return path
