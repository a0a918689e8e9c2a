"""data.face_crop=mtcnn: one cached MTCNN crop per image, shifted inside the frame, landmarks in crop pixels."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.config import ConfigError, load_config
from preprocessing.face_cache import FaceCropSettings, face_crops, landmarks, read_rgb
from preprocessing.faces import square_box


class CountingDetector:
    """The real MTCNN detector, counting the images it is asked about."""

    def __init__(self) -> None:
        from preprocessing.faces import FaceDetector

        self.inner = FaceDetector()
        self.images = 0

    def detect_landmarks(self, frames: np.ndarray) -> list:
        self.images += len(frames)
        return self.inner.detect_landmarks(frames)


@pytest.fixture(scope="module")
def detector() -> CountingDetector:
    return CountingDetector()


def lfw(shared: Path, cls: str, n: int) -> list[str]:
    return [str(p) for p in sorted((shared / "lfw_faceswap" / cls).glob("*.jpg"))[:n]]


def test_cache_miss_then_hit_and_landmarks(shared_data: Path, tmp_path: Path, detector: CountingDetector) -> None:
    paths = lfw(shared_data, "real", 2) + lfw(shared_data, "fake", 1)
    settings = FaceCropSettings(margin=0.3, size=96)
    before = detector.images
    table = face_crops(paths, settings, tmp_path, detector=detector)
    assert detector.images - before == 3  # miss: every image detected once
    assert list(table.index) == paths and not table["fallback"].any()
    for p, row in table.iterrows():
        crop = np.asarray(Image.open(row.crop_path))
        assert crop.shape == (96, 96, 3)
        assert 0 <= row.x1 < row.x2 <= row.width and 0 <= row.y1 < row.y2 <= row.height
        assert row.x2 - row.x1 == row.y2 - row.y1
        lm = landmarks(row)
        assert lm.shape == (5, 2) and np.all((lm > 0) & (lm < 96))
        assert lm[0, 0] < lm[1, 0] and lm[0, 1] < lm[2, 1] < lm[3, 1]  # eyes above the nose above the mouth
    again = face_crops(list(reversed(paths)), settings, tmp_path, detector=detector)
    assert detector.images - before == 3  # hit: no detection at all
    assert list(again.index) == list(reversed(paths)) and again.loc[paths].equals(table)
    # a subset and a new image: only the new one is detected
    face_crops(paths[:1] + lfw(shared_data, "real", 3)[2:], settings, tmp_path, detector=detector)
    assert detector.images - before == 4
    # other settings are another cache entry
    face_crops(paths[:1], FaceCropSettings(margin=0.1, size=96), tmp_path, detector=detector)
    assert detector.images - before == 5


def test_border_face_is_shifted_inside_never_padded(shared_data: Path, tmp_path: Path,
                                                    detector: CountingDetector) -> None:
    frame = read_rgb(lfw(shared_data, "real", 1)[0])  # 250 x 250, face near the centre
    corner = frame[60:, 70:]  # 190 x 180: the face now sits at the top-left edge
    path = tmp_path / "corner.png"
    Image.fromarray(corner).save(path)
    settings = FaceCropSettings(margin=0.4, size=64)
    boxes, _, _ = detector.inner.detect_landmarks(corner[None])[0]
    sq = square_box(boxes[0], settings.margin)
    assert sq[0] < 0 and sq[1] < 0 and sq[2] - sq[0] < min(corner.shape[:2])  # its margin square leaves the frame
    table = face_crops([str(path)], settings, tmp_path / "cache", detector=detector)
    row = table.iloc[0]
    assert not row.fallback
    assert (row.x1, row.y1) == (0, 0) and row.x2 - row.x1 == round(sq[2] - sq[0])  # shifted inside, same size
    crop = np.asarray(Image.open(row.crop_path)).astype(int)
    import cv2

    expected = cv2.resize(corner[row.y1:row.y2, row.x1:row.x2], (64, 64), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(crop, expected)
    for strip in (crop[:2], crop[-2:], crop[:, :2], crop[:, -2:]):
        assert strip.max() - strip.min() > 8 and strip.sum(axis=-1).min() > 0  # no flat or black border


def test_reflect_border_keeps_the_face_scale_of_a_tight_photo(shared_data: Path, tmp_path: Path,
                                                              detector: CountingDetector) -> None:
    frame = read_rgb(lfw(shared_data, "real", 1)[0])  # 250 x 250, face near the centre with room around it
    tight = frame[75:185, 70:180]  # 110 x 110: the face fills the photo (its 0.5-margin square does not fit)
    paths = [tmp_path / "loose.png", tmp_path / "tight.png"]
    Image.fromarray(frame).save(paths[0])
    Image.fromarray(tight).save(paths[1])

    def eye_distance(border: str) -> list[float]:
        table = face_crops([str(p) for p in paths], FaceCropSettings(margin=0.5, size=96, border=border),
                           tmp_path / "cache", detector=detector)
        return [float(np.linalg.norm(np.diff(landmarks(r)[:2], axis=0))) for _, r in table.iterrows()]

    loose, shifted = eye_distance("shift")
    assert shifted > 1.15 * loose  # shrunk to the photo: the tight photo's face looks bigger in its crop
    loose, reflected = eye_distance("reflect")
    assert reflected == pytest.approx(loose, rel=0.08)  # same face scale whatever the framing
    table = face_crops([str(paths[1])], FaceCropSettings(margin=0.5, size=96, border="reflect"), tmp_path / "cache",
                       detector=detector)
    row = table.iloc[0]
    assert row.x1 < 0 or row.y1 < 0 or row.x2 > row.width or row.y2 > row.height  # past the frame: mirrored there
    crop = np.asarray(Image.open(row.crop_path)).astype(int)
    for strip in (crop[:2], crop[-2:], crop[:, :2], crop[:, -2:]):
        assert strip.max() - strip.min() > 8 and strip.sum(axis=-1).min() > 0  # no flat or black border
    with pytest.raises(ValueError, match="reflect"):
        FaceCropSettings(border="pad")
    assert FaceCropSettings().key() != FaceCropSettings(border="reflect").key()
    assert load_config(overrides={"data.face_border": "reflect"}).data.face_border == "reflect"
    with pytest.raises(ConfigError, match="data.face_border"):
        load_config(overrides={"data.face_border": "pad"})


def test_no_face_is_kept_with_centre_crop_and_reported(tmp_path: Path, detector: CountingDetector,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    y, x = np.mgrid[0:120, 0:160]
    flat = np.stack([x, y, (x + y) // 2], -1).astype(np.uint8)  # a smooth gradient: no face
    path = tmp_path / "noface.png"
    Image.fromarray(flat).save(path)
    with caplog.at_level(logging.WARNING):
        table = face_crops([str(path)], FaceCropSettings(size=48), tmp_path / "cache", detector=detector)
    row = table.iloc[0]
    assert row.fallback and np.isnan(landmarks(row)).all()
    assert (row.x1, row.y1, row.x2, row.y2) == (20, 0, 140, 120)  # centred square, no face ratio known: short side
    assert "no face found in 1 of 1" in caplog.text and "noface.png" in caplog.text


def test_config_face_crop_keys() -> None:
    cfg = load_config(overrides={"data.face_crop": "mtcnn", "data.face_margin": 0.2})
    assert cfg.data.face_crop == "mtcnn" and cfg.data.face_margin == 0.2
    with pytest.raises(ConfigError, match="data.face_crop"):
        load_config(overrides={"data.face_crop": "haar"})
    with pytest.raises(ConfigError, match="center_crop"):
        load_config(overrides={"data.face_crop": "mtcnn", "data.center_crop": 0.5})


def test_loaders_read_face_crops_for_every_split(shared_data: Path, tmp_path: Path) -> None:
    from dataio.data import DataIndex, Sample
    from dataio.loaders import build_loaders

    real, fake = lfw(shared_data, "real", 2), lfw(shared_data, "fake", 2)
    index = DataIndex(train=[Sample(real[0], 0), Sample(fake[0], 1)], val=[Sample(real[1], 0), Sample(fake[1], 1)],
                      test=[])
    cfg = load_config(overrides={"data.face_crop": "mtcnn", "data.face_size": 64, "data.face_cache": str(tmp_path),
                                 "data.image_size": 32, "data.num_workers": 0, "data.batch_size": 2})
    loaders = build_loaders(index, cfg, (0.5,) * 3, (0.5,) * 3)
    table = face_crops(real + fake, FaceCropSettings(margin=0.3, size=64), tmp_path)  # cached by the loaders
    for split in ("train", "val"):
        ds = loaders[split].dataset
        assert [s.path for s in ds.samples] == [table.loc[s.path, "crop_path"] for s in index.split(split)]
        images, labels, idx = next(iter(loaders[split]))
        assert images.shape == (2, 3, 32, 32)
    val = loaders["val"].dataset[0][0]  # eval transform: the crop resized, nothing else
    crop = np.asarray(Image.open(table.loc[real[1], "crop_path"]).resize((32, 32)))
    assert abs(float(val[0].mean()) - (crop[..., 0].mean() / 255 - 0.5) / 0.5) < 0.05


def test_evaluation_face_crop_per_dataset(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """crosseval --face_crop none mtcnn: each data set read as asked; the table still names the original files."""
    from evaluation import crosseval as crosseval_cli
    from helpers import subset_csv, tiny_checkpoint
    from evaluation.scoring import with_face_crop
    from models.build import load_trained_model

    monkeypatch.setenv("DFSWEEP_FACE_CACHE", str(tmp_path / "cache"))
    ckpt = tiny_checkpoint(tmp_path / "m" / "best.pt")
    data = subset_csv(shared_data / "hardfake_vs_real", tmp_path / "hf.csv", per_class=3)
    out = tmp_path / "cx"
    rc = crosseval_cli.main(["--runs", str(ckpt), "--datasets", str(data), str(data), "--face_crop", "none", "mtcnn",
                             "--output_dir", str(out), "--num_workers", "0", "--no_tracking", "--device", "cpu"])
    assert rc == 0
    long = pd.read_csv(out / "crosseval.csv")
    assert list(long["face_crop"]) == ["none", "mtcnn"]
    tables = sorted((out / "predictions").glob("*.parquet"))
    plain, cropped = (pd.read_parquet(t) for t in tables)
    assert list(plain["path"]) == list(cropped["path"]) and plain["path"].str.endswith(".jpg").all()
    assert not np.allclose(plain["score"], cropped["score"])  # the model saw different pixels
    assert len(list((tmp_path / "cache").rglob("*.png"))) == 6
    # default: what the run trained with
    trained = load_trained_model(ckpt, "cpu")
    assert with_face_crop(trained, None) is trained
    assert with_face_crop(trained, "mtcnn").config.data.face_crop == "mtcnn"
    assert crosseval_cli.main(["--runs", str(ckpt), "--datasets", str(data), "--face_crop", "none", "mtcnn",
                               "mtcnn", "--output_dir", str(out), "--no_tracking"]) == 2


def test_served_model_of_a_face_crop_run_crops_like_training(shared_data: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A pyfunc member trained with face_crop=mtcnn scores a photo (path or array) exactly as the run scored
    its cached crop."""
    import os

    import torch

    from serving.image_inputs import ROOTS_ENV

    from core.checkpoints import atomic_save
    from models import create_detector
    from serving.pyfunc_model import ImageEnsembleModel, member_from_checkpoint

    photos = lfw(shared_data, "real", 1) + lfw(shared_data, "fake", 1)
    monkeypatch.setenv(ROOTS_ENV, os.pathsep.join([str(shared_data), str(tmp_path)]))  # the server's allowed roots
    plain = load_config(overrides={"model.model_type": "test_efficientnet", "model.pretrained": False,
                                   "data.image_size": 32, "data.num_workers": 0})
    cropped = plain.with_overrides({"data.face_crop": "mtcnn", "data.face_size": 64})
    torch.manual_seed(0)
    state = create_detector(plain.model, 1, image_size=32).state_dict()
    members = {}
    for name, cfg in (("plain", plain), ("crop", cropped)):
        ckpt = atomic_save({"model": state, "config": cfg.model_dump(mode="json")}, tmp_path / name / "best.pt")
        members[name] = ImageEnsembleModel.from_members([member_from_checkpoint(ckpt)], device="cpu")
    table = face_crops(photos, FaceCropSettings(size=64), tmp_path / "cache")
    on_crops = members["plain"].predict(None, pd.DataFrame({"path": list(table["crop_path"])}))["fake_prob"]
    served = members["crop"].predict(None, pd.DataFrame({"path": photos}), params={"num_workers": 0})["fake_prob"]
    np.testing.assert_allclose(served, on_crops, atol=1e-6)
    arrays = members["crop"].predict(None, np.stack([read_rgb(p) for p in photos]))["fake_prob"]
    np.testing.assert_allclose(arrays, on_crops, atol=1e-6)
    assert not np.allclose(members["plain"].predict(None, pd.DataFrame({"path": photos}))["fake_prob"], on_crops)
