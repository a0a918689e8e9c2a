"""Face extraction: videos built from LFW photos (panned and zoomed) -> crops, index, report, resume;
crops never carry a constant border."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from preprocessing.extract_faces import INDEX_COLUMNS, ExtractOptions, extract_dataset, find_sources, frame_indices, main
from preprocessing.faces import crop_face, outside_fraction, pick_face

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
LFW = SHARED_DATA / "lfw_faceswap"


def write_video(photo: Path, out: Path, n: int = 30, size: int = 160) -> None:
    """A photo panned and zoomed over n frames (mp4v)."""
    img = cv2.imread(str(photo))
    h, w = img.shape[:2]
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), 10, (size, size))
    for t in range(n):
        side = int(230 - 40 * t / (n - 1))
        x0 = min(max((w - side) // 2 + int(10 * np.sin(t / 5)), 0), w - side)
        y0 = min(max((h - side) // 2 + int(8 * np.cos(t / 7)), 0), h - side)
        writer.write(cv2.resize(img[y0:y0 + side, x0:x0 + side], (size, size), interpolation=cv2.INTER_AREA))
    writer.release()


def write_noise_video(out: Path, n: int = 30, size: int = 160) -> None:
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size, size))
    rng = np.random.default_rng(0)
    for _ in range(n):
        writer.write(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    writer.release()


def photo(label: str, k: int = 0) -> Path:
    if not LFW.is_dir():
        pytest.skip(f"real data not found at {LFW}")
    return sorted((LFW / label).glob("*.jpg"))[k]


@pytest.fixture(scope="module")
def video_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("videos")
    (src / "real").mkdir()
    (src / "fake" / "FaceSwap").mkdir(parents=True)  # a sub-folder = subset, as in FF++
    write_video(photo("real", 0), src / "real" / "r0.mp4")
    write_video(photo("fake", 0), src / "fake" / "FaceSwap" / "f0.mp4")
    write_noise_video(src / "real" / "noise.avi")
    (src / "fake" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 200)
    return src


# ------------------------------------------------------------------------------ crops (fast)
def no_constant_border(crop: np.ndarray, width: int = 2) -> bool:
    """True when no edge row/column strip is a single flat colour (what constant padding leaves)."""
    strips = [crop[:width], crop[-width:], crop[:, :width], crop[:, -width:]]
    return all(int(s.max()) - int(s.min()) > 8 for s in strips)


def test_shift_inside_border_never_pads() -> None:
    frame = cv2.cvtColor(cv2.imread(str(photo("real", 1))), cv2.COLOR_BGR2RGB)  # 250 x 250
    box = (170.0, 160.0, 245.0, 240.0)  # near the bottom-right corner: the 1.3x square leaves the frame
    crop, frac = crop_face(frame, box, margin=0.3, size=96, border="shift")
    assert crop.shape == (96, 96, 3) and frac > 0
    side = int(round(80 * 1.3))  # longer box side 80
    expected = frame[250 - side:, 250 - side:]  # shifted fully inside, same size
    np.testing.assert_array_equal(crop, cv2.resize(expected, (96, 96), interpolation=cv2.INTER_AREA))
    assert no_constant_border(crop)
    reflected, frac_r = crop_face(frame, box, margin=0.3, size=96, border="reflect")
    assert frac_r == pytest.approx(frac) and no_constant_border(reflected)
    # the check would catch the black padding this module avoids
    padded = cv2.copyMakeBorder(frame, 0, 40, 0, 40, cv2.BORDER_CONSTANT, value=0)[130:290, 130:290]
    assert not no_constant_border(padded)
    # a box bigger than the frame shrinks to the frame instead of padding
    whole, frac_w = crop_face(frame, (-50, -50, 300, 300), margin=0.3, size=64, border="shift")
    np.testing.assert_array_equal(whole, cv2.resize(frame, (64, 64), interpolation=cv2.INTER_AREA))
    assert frac_w > 0.5


def test_outside_fraction_and_frame_choice() -> None:
    assert outside_fraction((-10, 0, 10, 10), 100, 100) == pytest.approx(0.5)
    assert outside_fraction((0, 0, 10, 10), 100, 100) == 0.0
    assert frame_indices(30, every_k=10) == [0, 10, 20]
    assert frame_indices(30, n_frames=4) == [0, 10, 19, 29]
    assert frame_indices(3, n_frames=8) == [0, 1, 2]
    boxes = np.array([[0, 0, 10, 10], [50, 50, 90, 90], [12, 0, 22, 10]], float)
    scores = np.array([0.99, 0.99, 0.95])
    assert pick_face(boxes, scores) == 1  # largest
    assert pick_face(boxes, scores, previous=np.array([1.0, 0, 11, 10])) == 0  # best overlap
    assert pick_face(boxes, scores, previous=np.array([24.0, 0, 34, 10])) == 2  # no overlap: nearest
    assert pick_face(boxes, np.array([0.5, 0.5, 0.5])) is None


def test_find_sources_layout(video_src: Path, tmp_path: Path) -> None:
    items = {i.key: i for i in find_sources(video_src)}
    assert set(items) == {"real/r0", "real/noise", "fake/FaceSwap/f0", "fake/broken"}
    assert items["fake/FaceSwap/f0"].label == "fake" and items["real/r0"].kind == "video"
    with pytest.raises(ValueError, match="no real/ or fake/"):
        find_sources(tmp_path)


# ------------------------------------------------------------------------------ MTCNN (~5-10 s each on CPU)
class NoDetector:
    def detect(self, frames: np.ndarray) -> list:
        raise AssertionError("a finished video was processed again")


class BlindDetector:
    def __init__(self) -> None:
        self.frames = 0

    def detect(self, frames: np.ndarray) -> list:
        self.frames += len(frames)
        return [(np.zeros((0, 4)), np.zeros(0)) for _ in frames]


def test_extract_videos_layout_index_report_resume(video_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "faces"
    assert main(["--src", str(video_src), "--out", str(out), "--every_k", "3", "--size", "96"]) == 0
    index = pd.read_csv(out / "faces_index.csv")
    assert list(index.columns) == INDEX_COLUMNS
    for video, label in (("real/r0", "real"), ("fake/FaceSwap/f0", "fake")):
        rows = index[index["video"] == video]
        assert len(rows) >= 8, f"face found in only {len(rows)}/10 frames of {video}"  # most of frames 0, 3, ..., 27
        assert (rows["label"] == label).all() and (rows["det_score"] >= 0.9).all()
        assert rows["outside_fraction"].between(0, 1).all()
        assert set(rows["frame"]) <= set(range(0, 30, 3))
        for rel in rows["path"]:
            img = cv2.imread(str(out / rel))
            assert img is not None and img.shape == (96, 96, 3)
        assert sorted(p.name for p in (out / video).glob("*.jpg")) == sorted(Path(p).name for p in rows["path"])
    # the face box lies on the face: centred in the 160 px frame, 40-140 px wide
    r0 = index[index["video"] == "real/r0"]
    width = r0["x2"] - r0["x1"]
    assert width.between(40, 140).all() and ((r0["x1"] + r0["x2"]) / 2).between(50, 110).all()
    report = pd.read_csv(out / "extraction_report.csv").set_index("video")["reason"]
    assert report["fake/broken"] in ("cannot open video", "no frames decoded")
    assert report["real/noise"].startswith("no face found")
    assert not (out / "fake" / "broken").exists() and not list(out.rglob("*.partial"))
    # resumable: a second run skips every finished (or failed) source
    summary = extract_dataset(video_src, out, ExtractOptions(every_k=3, size=96), detector=NoDetector())
    assert summary.processed == 0 and summary.resumed == 4 and len(summary.failed) == 2
    pd.testing.assert_frame_equal(pd.read_csv(out / "faces_index.csv"), index)
    blind = BlindDetector()  # --retry_failed runs the failed ones (only) again
    again = extract_dataset(video_src, out, ExtractOptions(every_k=3, size=96), detector=blind, retry_failed=True)
    assert again.processed == 2 and again.resumed == 2 and blind.frames == 10 and len(again.failed) == 2


def test_extract_photo_dataset_and_tracking(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    for label, k in (("real", 0), ("real", 1), ("fake", 0)):
        (src / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(photo(label, k), src / label / f"{label}_{k}.jpg")  # a copy in tmp_path only
    cv2.imwrite(str(src / "fake" / "flat.jpg"), np.full((120, 120, 3), 127, np.uint8))
    out = tmp_path / "faces"
    summary = extract_dataset(src, out, ExtractOptions(size=64, border="reflect"), progress=False)
    assert summary.faces == 3 and summary.failed == [("fake/flat", "no face found")]
    for rel in ("real/real_0.jpg", "real/real_1.jpg", "fake/fake_0.jpg"):  # same layout as the input
        assert cv2.imread(str(out / rel)).shape == (64, 64, 3)
    index = pd.read_csv(out / "faces_index.csv")
    assert set(index["label"]) == {"real", "fake"} and (index["frame"] == 0).all()
    # --track on a video: the same face all along (boxes move smoothly)
    video = tmp_path / "one" / "real"
    video.mkdir(parents=True)
    write_video(photo("real", 2), video / "clip.mp4", n=12)
    tracked = extract_dataset(tmp_path / "one", tmp_path / "tracked", ExtractOptions(every_k=2, track=True), progress=False)
    boxes = pd.read_csv(tracked.index_path)[["x1", "y1", "x2", "y2"]].to_numpy()
    assert len(boxes) >= 5 and np.abs(np.diff(boxes, axis=0)).max() < 25


def test_scoring_a_raw_video_extracts_first(video_src: Path, tmp_path: Path) -> None:
    import torch

    from evaluation.video_scoring import main as score_main
    from models import create_detector
    from core.config import load_config

    cfg = load_config(overrides={"model.model_type": "test_efficientnet", "model.pretrained": False,
                                 "data.image_size": 32})
    det = create_detector(cfg.model, 1, image_size=32)
    torch.save({"model": det.state_dict(), "config": cfg.model_dump(mode="json")}, tmp_path / "best.pt")
    out = tmp_path / "results"
    assert score_main(["--checkpoint", str(tmp_path / "best.pt"), "--video", str(video_src / "real" / "r0.mp4"),
                       "--output-dir", str(out), "--n-frames", "6", "--device", "cpu"]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == 1 and table["label"].iloc[0] == 0 and table["n_frames"].iloc[0] >= 4
    assert (out / "faces" / "r0").is_dir() and (out / "metrics.json").is_file()
    assert score_main(["--checkpoint", str(tmp_path / "best.pt"), "--video", str(video_src / "real" / "noise.avi"),
                       "--output-dir", str(tmp_path / "noise")]) == 2  # no face: a clear error, not a crash
