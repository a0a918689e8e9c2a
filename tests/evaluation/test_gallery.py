"""Error gallery: both kinds of error at several thresholds, each class's extremes, the model input beside the file."""
from __future__ import annotations

import base64
import io
import re
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from core.config import load_config
from evaluation.gallery import build_error_gallery, model_input_images, thumbnail_data_uri
from evaluation.report import evaluate_predictions

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _framed(path: Path, seed: int) -> np.ndarray:
    """64 px: a blue frame around a red, textured 32 px centre (what a 0.5 centre crop keeps)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((64, 64, 3), np.uint8)
    img[..., 2] = 200
    img[16:48, 16:48] = np.stack([rng.integers(150, 256, (32, 32)), rng.integers(0, 60, (32, 32)),
                                  rng.integers(0, 60, (32, 32))], axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return img


def _section(page: str, sid: str) -> str:
    part = page[page.index(f'id="{sid}"'):]
    return part[:part.index("</section>")] if "</section>" in part else part


def _decode(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def test_both_error_kinds_and_extremes_at_several_thresholds(tmp_path: Path) -> None:
    # like StyleGAN faces under a framing-confounded model: fakes score low, a few reals score high
    rng = np.random.default_rng(0)
    reals = np.r_[rng.uniform(0.0, 0.3, 20), [0.62, 0.7, 0.75]]
    fakes = rng.uniform(0.05, 0.55, 20)
    df = pd.DataFrame({"path": [str(tmp_path / f"r{i}.png") for i in range(23)] +
                               [str(tmp_path / f"f{i}.png") for i in range(20)],
                       "label": [0] * 23 + [1] * 20, "score": np.r_[reals, fakes]})
    for i, p in enumerate(df["path"]):
        _framed(Path(p), i)
    page = build_error_gallery(df, {"val eer": 0.8, "0.5": 0.5}, k=4)
    at_eer, at_half = _section(page, "at-val-eer"), _section(page, "at-0-5")
    assert at_eer.count('class="thumb fp"') == 0 and "none: no real image scored at or above 0.8000" in at_eer
    assert at_eer.count('class="thumb fn"') == 4  # only missed fakes at the val-EER threshold ...
    assert at_half.count('class="thumb fp"') == 3 and at_half.count('class="thumb fn"') == 4  # ... both at 0.5
    fp_half = at_half[at_half.index('id="fp-0-5"'):at_half.index('id="fn-0-5"')]
    assert [float(v) for v in re.findall(r"P\(fake\)=([0-9.]+)", fp_half)] == [0.75, 0.7, 0.62]  # most confident first
    dist = _section(page, "score-distribution")
    assert "<svg" in dist and "bar-real" in dist and "bar-fake" in dist and "val eer=0.800" in dist
    for cls in ("real", "fake"):
        for end in ("lowest", "highest"):
            assert f'id="{cls}-{end}"' in dist and dist.count(f'class="thumb extreme {cls}-{end}"') == 4
    highest_real = dist[dist.index('id="real-highest"'):dist.index('id="fake-lowest"')]
    assert re.findall(r"P\(fake\)=([0-9.]+)", highest_real)[0] == "0.7500"
    table = _section(page, "thresholds")
    assert "real called fake" in table and "fake called real" in table


def test_model_input_thumbnail_is_the_transformed_image(tmp_path: Path) -> None:
    cfg = load_config(overrides={"data.center_crop": 0.5, "data.image_size": 16, "model.model_type": "test_efficientnet",
                                 "model.pretrained": False})
    images = {str(tmp_path / f"{c}{i}.png"): _framed(tmp_path / f"{c}{i}.png", i) for c in "rf" for i in range(3)}
    df = pd.DataFrame({"path": list(images), "label": [0, 0, 0, 1, 1, 1], "score": [0.9, 0.2, 0.1, 0.3, 0.8, 0.05]})
    seen = model_input_images(cfg, MEAN, STD, list(images))
    for path, img in images.items():
        expected = cv2.resize(img[16:48, 16:48], (16, 16), interpolation=cv2.INTER_AREA)  # centre crop, resize
        assert seen[path].shape == (16, 16, 3) and np.abs(seen[path].astype(int) - expected).max() <= 1
    page = build_error_gallery(df, 0.5, k=2, model_input=partial(model_input_images, cfg, MEAN, STD))
    fp = _section(page, "at-threshold")
    fp = fp[fp.index('id="fp-threshold"'):fp.index('id="fn-threshold"')]
    inputs = re.findall(r'<img class="input fp" src="([^"]+)"', fp)
    files = re.findall(r'<img class="thumb fp" src="([^"]+)"', fp)
    assert len(inputs) == len(files) == 1 and "model input 16&times;16" in fp
    shown, file_thumb = _decode(inputs[0]), _decode(files[0])
    path = df.loc[0, "path"]
    assert np.array_equal(shown, seen[path])  # lossless: the model input pixel for pixel
    assert shown[..., 0].mean() > 150 and shown[..., 2].mean() < 60  # only the red centre reached the model
    assert file_thumb[..., 2].mean() > 80  # the file still shows its blue frame


def test_model_inputs_of_a_run_monitoring_an_extra_set(tmp_path: Path) -> None:
    """A run that selects on another data set (data.extra_val, train.monitor=val_mean_auc) still gets its model
    inputs: the gallery loads none of the extra sets (a sweep's full report once lost them this way)."""
    cfg = load_config(overrides={"data.image_size": 16, "model.model_type": "test_efficientnet", "model.pretrained": False,
                                 "data.extra_val": [f"gan={tmp_path}"], "train.monitor": "val_mean_auc"})
    path = tmp_path / "r0.png"
    _framed(path, 0)
    assert model_input_images(cfg, MEAN, STD, [str(path)])[str(path)].shape == (16, 16, 3)


def test_report_gallery_gets_model_inputs(tmp_path: Path) -> None:
    cfg = load_config(overrides={"data.image_size": 24, "model.model_type": "test_efficientnet",
                                 "model.pretrained": False})
    rows = []
    for split in ("val", "test"):
        rng = np.random.default_rng(len(split))
        for i in range(30):
            label = i % 2
            path = tmp_path / split / f"{label}_{i}.png"
            _framed(path, i)
            rows.append({"split": split, "path": str(path), "label": label,
                         "score": float(np.clip(0.3 + 0.4 * label + rng.normal(0, 0.25), 0.01, 0.99))})
    table = pd.DataFrame(rows)
    val, test = (table[table.split == s].drop(columns="split") for s in ("val", "test"))
    rep = evaluate_predictions(val, test, None, tmp_path / "eval", n_boot=0,
                               model_input=partial(model_input_images, cfg, MEAN, STD))
    page = rep.files["errors_html"].read_text()
    assert page.count('class="input fp"') == page.count('class="thumb fp"') > 0
    assert page.count('class="input fn"') == page.count('class="thumb fn"') > 0
    assert "model input 24&times;24" in page and 'id="at-val-eer"' in page and 'id="at-0-5"' in page


def test_a_video_folder_shows_its_middle_frame(tmp_path: Path) -> None:
    """Video runs name a folder of frames per prediction: its thumbnail is the middle frame, not 'unreadable'."""
    video = tmp_path / "fake" / "v0"
    video.mkdir(parents=True)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):  # RGB: red, green, blue frames
        Image.new("RGB", (32, 32), colour).save(video / f"{i:06d}.jpg")
    thumb = _decode(thumbnail_data_uri(video))
    assert thumb[..., 1].mean() > 200 and thumb[..., 0].mean() < 60 and thumb[..., 2].mean() < 60  # green: frame 1
    (tmp_path / "empty").mkdir()
    assert thumbnail_data_uri(tmp_path / "empty") is None
