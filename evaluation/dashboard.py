"""One self-contained HTML dashboard (plotly.js inlined once, no external URL) and optional PNGs.

The page embeds plotly.js from the installed plotly package in a single inline <script> in the
head; each figure is then written with ``include_plotlyjs=False``. Nothing is fetched when the
file is opened, so it works offline and as an MLflow artifact. (The plotly.js source itself holds
URL strings in code, e.g. for map tiles; they are never requested by the charts used here.)
"""
from __future__ import annotations

import html
import logging
import re
import shutil
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

log = logging.getLogger(__name__)

PLOTLY_CONFIG = {"responsive": True, "displaylogo": False}
CHROME_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;font-size:12px;opacity:.75}nav{padding:8px 24px;font-size:13px}
nav a{margin-right:12px;color:#2857b8}main{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));
gap:16px;padding:8px 24px 24px}section{background:#fff;border-radius:8px;padding:12px;box-shadow:0 1px 3px #0002}
section.table{grid-column:1/-1}h2{font-size:15px;margin:4px 0 8px}.plotly-graph-div{min-height:420px}
table{border-collapse:collapse;font-size:12px}td,th{border-bottom:1px solid #e3e6eb;padding:3px 8px;text-align:right}
th{background:#f0f2f5}.tablewrap{overflow-x:auto}.caption{font-size:12px;color:#555;margin:0 0 6px}
section.group{grid-column:1/-1}.small{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:8px}
.small .plotly-graph-div{min-height:0}nav a.file{font-weight:600}
"""


def slug(name: str) -> str:
    """HTML-id-safe version of a panel key."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "panel"


def figure_html(fig: go.Figure, div_id: str) -> str:
    """A figure as a <div> + inline script that expects plotly.js to be loaded already (its layout height,
    else 420 px)."""
    height = f"{int(fig.layout.height)}px" if fig.layout.height else "420px"
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id,
                       config=PLOTLY_CONFIG, default_height=height, default_width="100%")


Panel = go.Figure | Mapping[str, go.Figure]  # a figure, or a group of small figures shown as one section


def flat_figures(figures: Mapping[str, Panel]) -> dict[str, go.Figure]:
    """Groups flattened to `<group>-<key>` (PNG export, counting)."""
    out: dict[str, go.Figure] = {}
    for key, fig in figures.items():
        if isinstance(fig, Mapping):
            out.update({f"{key}-{k}": f for k, f in fig.items()})
        else:
            out[key] = fig
    return out


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) >= 1 else f"{v:.4f}"


def table_html(df: pd.DataFrame) -> str:
    """A DataFrame as an escaped HTML table (4-decimal floats, whole numbers as integers), preceded
    by ``df.attrs["caption"]`` when set."""
    caption = df.attrs.get("caption")
    head = f'<p class="caption">{html.escape(str(caption))}</p>' if caption else ""
    return head + df.to_html(classes="metrics", border=0, escape=True, na_rep="", float_format=_fmt)


def build_dashboard(figures: Mapping[str, Panel], tables: Mapping[str, pd.DataFrame] | None = None,
                    title: str = "Evaluation dashboard", subtitle: str | None = None,
                    links: Mapping[str, str] | None = None) -> str:
    """Self-contained HTML, plotly.js inlined once: tables first (key = heading), then one panel per figure.

    Each figure panel is ``<section id="section-<key>">`` holding ``<div id="panel-<key>">``; a group (a
    mapping of small figures, e.g. learning curves one metric each) is one section of small panels
    ``panel-<key>-<name>``. `links` (text -> relative URL, e.g. errors.html) head the navigation bar.
    """
    tables = tables or {}
    blocks: list[str] = []
    nav: list[str] = [f'<a class="file" href="{html.escape(url)}">{html.escape(text)}</a>'
                      for text, url in (links or {}).items()]
    for key, df in tables.items():
        sid = f"table-{slug(key)}"
        nav.append(f'<a href="#{sid}">{html.escape(key)}</a>')
        blocks.append(f'<section class="table" id="{sid}"><h2>{html.escape(key)}</h2>'
                      f'<div class="tablewrap">{table_html(df)}</div></section>')
    for key, fig in figures.items():
        sid = slug(key)
        nav.append(f'<a href="#section-{sid}">{html.escape(key)}</a>')
        if isinstance(fig, Mapping):
            panels = "".join(figure_html(f, f"panel-{sid}-{slug(k)}") for k, f in fig.items())
            blocks.append(f'<section class="group" id="section-{sid}"><h2>{html.escape(key.replace("_", " ").capitalize())}'
                          f'</h2><div class="small" id="panel-{sid}">{panels}</div></section>')
            continue
        heading = fig.layout.title.text or key
        blocks.append(f'<section id="section-{sid}"><h2>{html.escape(str(heading))}</h2>'
                      f"{figure_html(fig, f'panel-{sid}')}</section>")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sub = html.escape(subtitle) + " · " if subtitle else ""
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>", f"<style>{_STYLE}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>', "</head><body>",
        f"<header><h1>{html.escape(title)}</h1><p>{sub}generated {stamp}</p></header>",
        f"<nav>{' '.join(nav)}</nav>", "<main>", *blocks, "</main></body></html>",
    ])


def write_dashboard(path: str | Path, figures: Mapping[str, Panel],
                    tables: Mapping[str, pd.DataFrame] | None = None, title: str = "Evaluation dashboard",
                    subtitle: str | None = None, links: Mapping[str, str] | None = None) -> Path:
    """build_dashboard and write it (UTF-8) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_dashboard(figures, tables, title, subtitle, links), encoding="utf-8")
    return path


def find_chrome() -> str | None:
    """A Chrome/Chromium executable kaleido can drive: PATH names, then kaleido's own search
    (choreographer: $BROWSER_PATH, its local download, typical install paths). Never downloads."""
    for name in CHROME_NAMES:
        found = shutil.which(name)
        if found:
            return found
    try:
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False)
    except Exception as exc:  # kaleido/choreographer missing or changed API: treat as no browser
        log.debug("choreographer browser search failed: %s", exc)
        return None


def write_pngs(figures: Mapping[str, Panel], out_dir: str | Path, scale: float = 2.0) -> list[Path]:
    """PNG of each figure (groups flattened) via kaleido when a Chrome/Chromium binary exists; otherwise one
    warning and an empty list (the HTML dashboard has everything)."""
    figures = flat_figures(figures)
    chrome = find_chrome()
    if chrome is None:
        log.warning("png_export=skipped reason=no_chrome_binary hint='install chromium (or set BROWSER_PATH) "
                    "for PNG figures; the HTML dashboard is complete without them'")
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{slug(key)}.png" for key in figures]
    try:
        pio.write_images(list(figures.values()), paths, scale=scale)
    except Exception as exc:  # a broken browser install must not fail an evaluation
        log.warning("png_export=failed browser=%s error=%s", chrome, str(exc).splitlines()[0] if str(exc) else exc)
        return [p for p in paths if p.exists()]
    log.info("png_export=ok n=%d dir=%s", len(paths), out_dir)
    return paths
