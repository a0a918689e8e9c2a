"""Figures, the self-contained dashboard, PNG fallback, error gallery and the end-to-end report."""
from __future__ import annotations

import json
import logging
import math
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from plotly.offline import get_plotlyjs
from sklearn.metrics import roc_auc_score

from evaluation import dashboard as D
from evaluation import figures as F
from evaluation.gallery import build_error_gallery, subset_breakdown
from evaluation.metrics import MetricError, binary_metrics
from evaluation.report import evaluate_predictions

TAG_URL = re.compile(r"<(script|link|img|iframe|embed|source)\b[^>]*\b(src|href)\s*=\s*[\"']?\s*(https?:)?//", re.I)


def _scores(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    z = (2 * y - 1) * 1.5 + rng.normal(0, 1.2, n)
    return y, 1 / (1 + np.exp(-z)), z


def _predictions(tmp_path, n, seed, split, with_images=True):
    """Synthetic prediction table; images (32 px, one per row) written under tmp_path."""
    y, s, z = _scores(n, seed)
    z = 4 * z  # over-confident logits so temperature scaling has work to do
    s = 1 / (1 + np.exp(-z))
    paths = []
    for i in range(n):
        p = tmp_path / split / f"{'fake' if y[i] else 'real'}_{i}.png"
        paths.append(str(p))
    if with_images:
        (tmp_path / split).mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        for p in paths:
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(p)
    return pd.DataFrame({
        "path": paths, "label": y, "score": s, "logit": z,
        "group": [f"{split}-v{i // 8}-{y[i]}" for i in range(n)],
        "subset": ["real" if not y[i] else ("deepfakes" if i % 2 else "faceswap") for i in range(n)],
    })


HISTORY = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [0.7, 0.5, 0.4], "val_loss": [0.68, 0.55, 0.5],
                        "val_auc": [0.7, 0.8, 0.85], "val_ap": [0.7, 0.82, 0.86], "val_acc": [0.6, 0.7, 0.75],
                        "val_f1": [0.6, 0.7, 0.74], "lr": [1e-3, 5e-4, 1e-4], "seconds": [10.0, 9.0, 9.5]})


def _panel_figures():
    y, s, _ = _scores()
    thr = {"default": 0.5, "best_f1": 0.4}
    return {
        "roc": F.roc_figure({"val": (y, s)}), "pr": F.pr_figure({"val": (y, s)}),
        "reliability": F.reliability_figure({"val": (y, s)}), "confusion": F.confusion_figure(y, s, 0.5),
        "score_distribution": F.score_distribution_figure(y, s, thresholds=thr),
        "threshold_sweep": F.threshold_figure(y, s, thr), "learning_curves": F.learning_curve_figures(HISTORY),
        "robustness": F.heatmap_figure(pd.DataFrame({"auc": [0.9, np.nan]}, index=["jpeg90", "blur"]), "Robustness"),
    }


def _assert_offline(html: str) -> None:
    """plotly.js inlined exactly once; no external script/link/img source; and no URL at all outside
    the plotly.js bundle (the bundle's own code holds URL strings, e.g. map-tile defaults)."""
    bundle = get_plotlyjs()
    assert html.count(bundle) == 1
    rest = html.replace(bundle, "")
    assert not TAG_URL.search(html)
    assert "cdn.plot.ly" not in rest and "cdn.jsdelivr" not in rest
    assert not re.search(r"https?://", rest)
    assert rest.count("<script") == html.count('class="plotly-graph-div"') + 1


# ----------------------------------------------------------------------------- figures
def test_roc_marks_eer_point_and_confusion_counts():
    y, s, _ = _scores()
    fig = F.roc_figure({"val": (y, s)})
    m = binary_metrics(y, s)
    marker = [t for t in fig.data if t.mode == "markers"][0]
    assert marker.x[0] == pytest.approx(m["eer"]) and marker.y[0] == pytest.approx(1 - m["eer"])
    assert f"AUC={m['auc']:.3f}" in fig.data[1].name
    conf = F.confusion_figure(y, s, 0.5)
    text = conf.data[0].text
    tp = int(np.sum((s >= 0.5) & (y == 1)))
    assert text[1][1].startswith(f"{tp}<br>")


def test_learning_curves_are_small_panels_one_metric_each():
    log = HISTORY.assign(val_eer=[0.3, 0.25, 0.2], val_gan_auc=[0.6, 0.65, 0.7], val_gan_ap=[0.6, 0.6, 0.7],
                         lr_backbone=[1e-4, 5e-5, 1e-5], lr_classifier_decay=[1e-3, 5e-4, 1e-4],
                         images_per_s=[50.0, 52.0, 51.0], trainable_params=[10, 10, 20])
    figs = F.learning_curve_figures(log)
    assert list(figs) == ["loss", "auc", "ap", "eer", "f1", "lr", "throughput"]
    names = {k: [t.name for t in f.data] for k, f in figs.items()}
    assert names["loss"] == ["train_loss", "val_loss"] and names["auc"] == ["val_auc", "val_gan_auc"]
    assert names["lr"] == ["lr", "lr_backbone"]  # a group with the head's schedule is not drawn twice
    assert all(len(n) <= 2 for n in names.values()) and all(f.layout.height <= 300 for f in figs.values())
    assert figs["lr"].layout.yaxis.type == "log" and not figs["f1"].layout.showlegend


def test_threshold_labels_cannot_overlap():
    y, s, _ = _scores()
    close = {"eer": 0.512, "youden_j": 0.5126, "best_f1": 0.5131, "default": 0.5}
    for fig in (F.threshold_figure(y, s, close), F.score_distribution_figure(y, s, thresholds=close)):
        assert not fig.layout.annotations  # no text drawn on the plot: each line is named in the legend
        lines = [t for t in fig.data if t.name and " = " in t.name]
        assert [t.name for t in lines] == ["default = 0.500", "eer = 0.512", "youden_j = 0.513", "best_f1 = 0.513"]
        assert len({t.line.color for t in lines}) == 4


def test_heatmap_from_dataframe_for_robustness_and_cross_dataset():
    cross = pd.DataFrame([[0.95, 0.71], [0.88, 0.80]], index=pd.Index(["run-a", "run-b"], name="run"),
                         columns=pd.Index(["ffpp", "celebdf"], name="dataset"))
    fig = F.heatmap_figure(cross, "Cross-dataset AUC", zmin=0.5, zmax=1.0)
    assert fig.layout.title.text == "Cross-dataset AUC"
    assert list(fig.data[0].x) == ["ffpp", "celebdf"] and fig.data[0].text[0][1] == "0.710"
    assert fig.layout.xaxis.title.text == "dataset"


# ----------------------------------------------------------------------------- dashboard
def test_dashboard_holds_every_panel_and_no_external_url():
    figs = _panel_figures()
    tables = {"Summary": pd.DataFrame({"val": {"auc": 0.9, "n": 400.0}})}
    html = D.build_dashboard(figs, tables, title="Run <abc>")
    _assert_offline(html)
    for key, fig in D.flat_figures(figs).items():
        assert f'id="panel-{key}"' in html
        assert fig.layout.title.text.split(" (")[0] in html
    assert all(f'id="section-{key}"' in html for key in figs)
    assert 'id="section-learning_curves"' in html and 'id="panel-learning_curves-lr"' in html
    assert "Run &lt;abc&gt;" in html and 'id="table-Summary"' in html and "<td>400</td>" in html


def test_write_pngs_without_browser_warns_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(D, "find_chrome", lambda: None)
    with caplog.at_level(logging.WARNING, logger="evaluation.dashboard"):
        assert D.write_pngs(_panel_figures(), tmp_path / "png") == []
    assert len(caplog.records) == 1 and "no_chrome_binary" in caplog.records[0].getMessage()
    assert not (tmp_path / "png").exists()


def test_write_pngs_export_failure_is_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(D, "find_chrome", lambda: "/usr/bin/chromium")

    def broken(*args, **kwargs):
        raise RuntimeError("browser crashed\nlong trace")

    monkeypatch.setattr(D.pio, "write_images", broken)
    with caplog.at_level(logging.WARNING, logger="evaluation.dashboard"):
        assert D.write_pngs({"roc": _panel_figures()["roc"]}, tmp_path) == []
    assert len(caplog.records) == 1 and "browser crashed" in caplog.records[0].getMessage()


def test_write_pngs_real_environment(tmp_path, caplog):
    """Whatever this machine has: PNGs when a browser exists, else exactly one warning."""
    figs = {"roc": _panel_figures()["roc"]}
    with caplog.at_level(logging.WARNING, logger="evaluation.dashboard"):
        paths = D.write_pngs(figs, tmp_path)
    if D.find_chrome() is None:
        assert paths == [] and len(caplog.records) == 1
    else:
        assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths) or len(caplog.records) == 1


# ----------------------------------------------------------------------------- gallery
def test_gallery_shows_k_most_confident_errors(tmp_path):
    df = _predictions(tmp_path, 120, 3, "val")
    thr, k = 0.5, 4
    html = build_error_gallery(df, thr, k)
    assert html.count('class="thumb fp"') == k and html.count('class="thumb fn"') == k
    assert html.count("data:image/jpeg;base64,") == 2 * k + 4 * k  # errors + each class's k lowest and highest
    fp_scores = df[(df.label == 0) & (df.score >= thr)].score.nlargest(k)
    first_fp = html.index('id="fp-threshold"')
    assert f"P(fake)={fp_scores.iloc[0]:.4f}" in html[first_fp:html.index('id="fn-threshold"')]
    df.loc[df.index, "path"] = str(tmp_path / "missing.png")  # unreadable files: placeholders, no crash
    assert build_error_gallery(df, thr, k).count('class="missing thumb fp"') == k


def test_subset_breakdown_one_class_subsets_ranked_against_all_reals(tmp_path):
    df = _predictions(tmp_path, 200, 4, "val", with_images=False)
    table = subset_breakdown(df)
    assert set(table.index) == {"real", "deepfakes", "faceswap"}
    part = pd.concat([df[df.subset == "deepfakes"], df[df.label == 0]])
    assert table.loc["deepfakes", "auc"] == pytest.approx(roc_auc_score(part.label, part.score))
    assert table.loc["deepfakes", "reference"] == "vs all real"
    assert table.loc["real", "n"] == int((df.label == 0).sum())


# ----------------------------------------------------------------------------- report
def test_evaluate_predictions_end_to_end(tmp_path):
    val = _predictions(tmp_path, 2000, 1, "val")
    test = _predictions(tmp_path, 2000, 2, "test")
    out = tmp_path / "eval"
    rep = evaluate_predictions(val, test, HISTORY, out, n_boot=1000)

    for key in ("test_auc", "test_auc_ci_low", "test_auc_ci_high", "test_ap_ci_low", "val_ece", "val_auc",
                "test_ece_calibrated", "test_log_loss_calibrated", "temperature", "test_video_auc",
                "val_video_auc", "threshold_best_f1", "test_f1_at_best_f1", "test_fpr_at_target_fpr",
                "test_subset_deepfakes_auc", "test_tpr_at_fpr_1pct"):
        assert key in rep.metrics, key
    assert all(isinstance(v, float) and math.isfinite(v) for v in rep.metrics.values())
    assert rep.metrics["test_auc"] == pytest.approx(binary_metrics(test.label, test.score)["auc"])
    assert rep.metrics["test_auc_ci_low"] < rep.metrics["test_auc"] < rep.metrics["test_auc_ci_high"]
    assert rep.temperature > 1.2 and rep.metrics["test_ece_calibrated"] < rep.metrics["test_ece"]
    assert rep.thresholds == pytest.approx({k: rep.metrics[f"threshold_{k}"] for k in rep.thresholds})

    names = {p.name for p in rep.files.values()}
    assert {"metrics.json", "dashboard.html", "errors.html", "calibration.json", "thresholds.csv"} <= names
    saved = json.loads((out / "metrics.json").read_text())  # strict JSON: no NaN
    assert saved["flat"]["test_auc"] == rep.metrics["test_auc"] and saved["evaluated_split"] == "test"
    assert saved["calibration"]["fitted_on"] == "val" and saved["group"]["rule"] == "mean"
    assert set(saved["group"]["by_rule"]) == {"mean", "median", "max", "confident"}
    html = (out / "dashboard.html").read_text()
    _assert_offline(html)  # plotly.js once for every panel
    assert '<a class="file" href="errors.html">' in html  # the error gallery beside it
    assert html.count('id="panel-learning_curves-') == 5  # loss, auc, ap, f1, lr: one metric each
    assert len(html) < len(get_plotlyjs()) + 600_000
    for panel in ("roc", "pr", "reliability", "confusion", "score_distribution", "threshold_sweep",
                  "learning_curves"):
        assert f'id="panel-{panel}"' in html
    errors = (out / "errors.html").read_text()
    for name, t in (("val-eer", rep.thresholds["eer"]), ("0-5", 0.5), ("val-FPR--0-01", rep.thresholds["target_fpr"])):
        section = errors[errors.index(f'id="at-{name}"'):]  # operating point, 0.5, val's low-FPR threshold
        section = section[:section.index("</section>")]
        n_fp, n_fn = int(((test.label == 0) & (test.score >= t)).sum()), int(((test.label == 1) & (test.score < t)).sum())
        assert n_fp and n_fn, name
        assert section.count('class="thumb fp"') == min(8, n_fp) and section.count('class="thumb fn"') == min(8, n_fn)
    assert 'id="subsets"' in errors


def test_evaluate_predictions_val_only_minimal_columns(tmp_path):
    val = _predictions(tmp_path, 300, 5, "val", with_images=False)[["path", "label", "score"]]
    extra = {"robustness": F.heatmap_figure(pd.DataFrame({"auc": [0.9]}, index=["jpeg70"]), "Robustness")}
    rep = evaluate_predictions(val, None, None, tmp_path / "eval", n_boot=200, extra_figures=extra,
                               operating_point="best_f1")
    assert "val_auc_ci_low" in rep.metrics and "val_f1_at_best_f1" in rep.metrics
    assert not any(k.startswith("test_") or "_video_" in k for k in rep.metrics)
    html = rep.files["dashboard_html"].read_text()
    assert 'id="panel-robustness"' in html and 'id="panel-learning_curves"' not in html


def test_evaluate_predictions_errors(tmp_path):
    val = _predictions(tmp_path, 50, 6, "val", with_images=False)
    with pytest.raises(MetricError, match="got only fake"):
        evaluate_predictions(val[val.label == 1], None, None, tmp_path)
    with pytest.raises(MetricError, match="lack column"):
        evaluate_predictions(val.drop(columns="score"), None, None, tmp_path)
    with pytest.raises(ValueError, match="operating_point"):
        evaluate_predictions(val, None, None, tmp_path, operating_point="f2")
