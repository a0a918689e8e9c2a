"""Data layouts, splits, odd and corrupt images, errors (dataio/data.py); loaders (dataio/loaders.py)."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core.config import Config, DataConfig
from dataio.data import DataError, DataIndex, Sample, cap_split, pos_weight, scan, split_samples
from dataio.loaders import (EVAL_IN_PROCESS_BATCHES, CachedEvalLoader, ImageDataset, build_loaders, collate_drop_none,
                            load_rgb, loader_iter, retained_heap, trim_heap)
from augmentation.policies import build_transform

MEAN = STD = (0.5, 0.5, 0.5)


def _img(path: Path, color: int = 128, size: tuple[int, int] = (24, 24), mode: str = "RGB", fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(color)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path, format=fmt)
    return path


def _flat(root: Path, n_real: int = 20, n_fake: int = 20, ext: str = "png") -> Path:
    for i in range(n_real):
        _img(root / "real" / f"r{i:03d}.{ext}", i)
    for i in range(n_fake):
        _img(root / "fake" / f"f{i:03d}.{ext}", 100 + i)
    return root


def _cfg(data_dir: Path | str, **data: object) -> Config:
    overrides = {"data.data_dir": str(data_dir), "data.image_size": 32, "data.batch_size": 8,
                 "data.num_workers": 0, **{f"data.{k}": v for k, v in data.items()}}
    return Config().with_overrides(overrides)


def _groups(samples: list[Sample]) -> set[str | None]:
    return {s.group for s in samples}


# ------------------------------------------------------------------------------------- layouts
def test_flat_layout_stratified_seeded_split(tmp_path: Path) -> None:
    _flat(tmp_path, 40, 20)
    index = scan(DataConfig(data_dir=str(tmp_path)), seed=0)
    counts = index.class_counts()
    assert counts == {"train": {"real": 28, "fake": 14}, "val": {"real": 6, "fake": 3}, "test": {"real": 6, "fake": 3}}
    again = scan(DataConfig(data_dir=str(tmp_path)), seed=0)
    other = scan(DataConfig(data_dir=str(tmp_path)), seed=1)
    assert again.digest == index.digest and [s.path for s in again.val] == [s.path for s in index.val]
    assert other.digest != index.digest and other.class_counts() == counts
    assert re.fullmatch(r"[0-9a-f]{12}", index.digest)
    assert pos_weight(index) == pytest.approx(2.0)
    all_paths = [s.path for s in index.train + index.val + index.test]
    assert len(all_paths) == len(set(all_paths)) == 60


def test_class_folder_names_are_forgiving(tmp_path: Path) -> None:
    for i in range(8):
        _img(tmp_path / "0_Real" / f"a{i}.jpg", i)
        _img(tmp_path / "1_FAKE" / f"b{i}.JPG", 50 + i, fmt="JPEG")
    index = scan(DataConfig(data_dir=str(tmp_path)), seed=0)
    assert sum(v["fake"] for v in index.class_counts().values()) == 8


def test_presplit_layout_and_subsets(tmp_path: Path) -> None:
    for split, n in (("train", 6), ("val", 3), ("test", 2)):
        for i in range(n):
            _img(tmp_path / split / "real" / f"r{i}.png", i)
            _img(tmp_path / split / "fake" / "Deepfakes" / f"f{i}.png", 50 + i)
    index = scan(DataConfig(data_dir=str(tmp_path)), seed=0)
    assert index.class_counts()["val"] == {"real": 3, "fake": 3}
    assert all(s.subset == "Deepfakes" for s in index.train if s.label == 1)
    assert all(s.subset is None for s in index.train if s.label == 0)
    assert all("/val/" in s.path for s in index.val)


def test_presplit_without_val_carves_val_from_train(tmp_path: Path) -> None:
    for i in range(20):
        _img(tmp_path / "train" / "real" / f"r{i}.png", i)
        _img(tmp_path / "train" / "fake" / f"f{i}.png", 50 + i)
    index = scan(DataConfig(data_dir=str(tmp_path)), seed=0)
    assert index.test == [] and index.class_counts()["val"]["real"] >= 1 and index.class_counts()["val"]["fake"] >= 1
    assert len(index.train) + len(index.val) == 40


def test_csv_index_relative_paths_labels_and_split(tmp_path: Path) -> None:
    rows = ["path,label,group,split,subset"]
    for i in range(6):
        _img(tmp_path / "imgs" / f"r{i}.png", i)
        _img(tmp_path / "imgs" / f"f{i}.png", 50 + i)
        split = "train" if i < 4 else ("val" if i == 4 else "test")
        rows += [f"imgs/r{i}.png,real,p{i},{split},", f"imgs/f{i}.png,1,p{i},{split},FaceSwap"]
    (tmp_path / "sub").mkdir()
    csv = tmp_path / "sub" / "index.csv"
    csv.write_text("\n".join(r.replace("imgs/", "../imgs/") for r in rows) + "\n")
    index = scan(DataConfig(data_dir=str(csv)), seed=0)
    assert index.class_counts() == {"train": {"real": 4, "fake": 4}, "val": {"real": 1, "fake": 1},
                                    "test": {"real": 1, "fake": 1}}
    assert {s.subset for s in index.train if s.label == 1} == {"FaceSwap"}
    assert all(Path(s.path).is_file() for s in index.train)


def test_csv_without_split_column_is_split_by_ratio(tmp_path: Path) -> None:
    lines = ["path,label"]
    for i in range(20):
        lines.append(f"{_img(tmp_path / f'r{i}.png', i).name},0")
        lines.append(f"{_img(tmp_path / f'f{i}.png', 50 + i).name},fake")
    lines.append("missing.png,real")
    (tmp_path / "index.csv").write_text("\n".join(lines))
    index = scan(DataConfig(data_dir=str(tmp_path / "index.csv")), seed=0)
    assert index.class_counts()["train"] == {"real": 14, "fake": 14}
    assert [Path(p).name for p, _ in index.skipped] == ["missing.png"]


# ------------------------------------------------------------------------------------- groups
def test_group_regex_never_straddles_on_lfw(shared_data: Path) -> None:
    data_dir = shared_data / "lfw_faceswap"  # real_N.jpg / fake_N.jpg: N is the source photo id
    index = scan(DataConfig(data_dir=str(data_dir), group_by=r"_(\d+)\.jpg$"), seed=0)
    train, val, test = _groups(index.train), _groups(index.val), _groups(index.test)
    assert None not in train and not (train & val) and not (train & test) and not (val & test)
    n = sum(sum(v.values()) for v in index.class_counts().values())
    assert abs(len(index.train) / n - 0.7) < 0.03 and abs(len(index.val) / n - 0.15) < 0.03
    for split in index.class_counts().values():  # still stratified: fake share near the overall 44 %
        assert abs(split["fake"] / (split["real"] + split["fake"]) - 1055 / 2385) < 0.05


def test_group_by_folder_keeps_videos_together(tmp_path: Path) -> None:
    for v in range(10):
        for f in range(5):
            _img(tmp_path / "real" / f"vid{v}" / f"{f}.png", v * 10 + f)
            _img(tmp_path / "fake" / f"vid{v}_swap" / f"{f}.png", 200 + v * 10 + f)
    index = scan(DataConfig(data_dir=str(tmp_path), group_by="folder"), seed=0)
    assert not (_groups(index.train) & _groups(index.val)) and not (_groups(index.val) & _groups(index.test))
    assert all(len(index.split(k)) % 5 == 0 for k in ("train", "val", "test"))


def test_split_samples_grouped_and_cap() -> None:
    samples = [Sample(f"{i}.png", i % 3 == 0, group=f"g{i // 4}") for i in range(200)]
    parts = split_samples(samples, (0.7, 0.15, 0.15), seed=5)
    owner = {}
    for name, part in parts.items():
        for s in part:
            assert owner.setdefault(s.group, name) == name
    capped = cap_split(parts["train"], 20, seed=0)
    assert len(capped) == 20 and 4 <= sum(s.label for s in capped) <= 9
    assert cap_split(parts["val"], 10_000, seed=0) == parts["val"]


def test_max_samples_per_split(tmp_path: Path) -> None:
    _flat(tmp_path, 40, 40)
    index = scan(DataConfig(data_dir=str(tmp_path), max_samples_per_split=6), seed=0)
    for counts in index.class_counts().values():
        assert counts == {"real": 3, "fake": 3}


# ------------------------------------------------------------------------------------- images
def test_odd_images_all_load_as_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    files = {}
    for mode in ("L", "LA", "RGBA", "P", "1"):
        files[mode] = tmp_path / f"{mode}.png"
        Image.fromarray(rgb).convert(mode).save(files[mode])
    p = Image.fromarray(rgb).convert("P")
    p.info["transparency"] = 0
    p.save(files.setdefault("P_transparent", tmp_path / "pt.png"), transparency=0)
    Image.fromarray(rgb).convert("CMYK").save(files.setdefault("CMYK", tmp_path / "cmyk.jpg"), "JPEG")
    Image.fromarray((rng.integers(0, 65535, (20, 30))).astype(np.uint16)).save(files.setdefault("I16", tmp_path / "i16.png"))
    Image.fromarray(rgb).save(files.setdefault("webp", tmp_path / "x.webp"), "WEBP")
    Image.fromarray(rgb).save(files.setdefault("bmp", tmp_path / "x.bmp"), "BMP")
    Image.fromarray(rgb[:1, :1]).save(files.setdefault("tiny", tmp_path / "tiny.png"))
    Image.fromarray(rng.integers(0, 256, (8, 400, 3), dtype=np.uint8)).save(files.setdefault("wide", tmp_path / "wide.jpg"))
    transform = build_transform("basic", 32, MEAN, STD, train=True, seed=0)
    for name, path in files.items():
        arr = load_rgb(str(path), 32)
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3, name
        out = transform(image=arr)["image"]
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32, name
    i16 = load_rgb(str(files["I16"]))
    assert i16.max() > 200 and i16.min() < 50  # scaled to 8 bits, not clipped to white


def test_corrupt_files_skipped_reported_and_loader_finishes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _flat(tmp_path, 12, 12, ext="jpg")
    (tmp_path / "real" / "zero.jpg").write_bytes(b"")
    (tmp_path / "fake" / "garbage.png").write_bytes(b"this is not an image" * 10)
    good = (tmp_path / "fake" / "f000.jpg").read_bytes()
    (tmp_path / "fake" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING):
        index = scan(DataConfig(data_dir=str(tmp_path)), seed=0)
    reasons = {Path(p).name: r for p, r in index.skipped}
    assert set(reasons) == {"zero.jpg", "garbage.png", "truncated.jpg"}
    assert reasons["zero.jpg"] == "zero bytes"
    assert "skipped 3 file(s)" in caplog.text and "zero.jpg" in caplog.text
    loaders = build_loaders(index, _cfg(tmp_path, aug_policy="advanced"), MEAN, STD)
    seen = sum(len(y) for y, in ((b[1],) for b in loaders["train"])) + sum(len(b[1]) for b in loaders["val"])
    assert seen > 0


def test_a_class_of_links_out_of_the_data_root_says_why_it_is_empty(tmp_path: Path) -> None:
    """A split made of symlinks to the original files (a common way to split a data set) is refused, and the
    error names the reason, not just an empty folder."""
    source = _flat(tmp_path / "original", 3, 3)
    root = tmp_path / "split"
    for cls in ("real", "fake"):
        (root / cls).mkdir(parents=True)
        for f in (source / cls).iterdir():
            (root / cls / f.name).symlink_to(f)
    with pytest.raises(DataError) as err:
        scan(DataConfig(data_dir=str(root)), 0)
    _assert_one_line(err, "empty class", "3 entries skipped", "symlink leaves the data root")


def test_every_dropped_entry_is_reported_with_its_reason(tmp_path: Path) -> None:
    """Broken links, links out of the data root, .gif, a folder named *.jpg, a 1x1 image: none silently dropped."""
    root = _flat(tmp_path / "data", 8, 8)
    outside = _img(tmp_path / "elsewhere" / "secret.png", 7)
    (root / "real" / "escape.png").symlink_to(outside)
    (root / "real" / "escape_dir").symlink_to(outside.parent, target_is_directory=True)
    (root / "real" / "inside.png").symlink_to(root / "real" / "r000.png")  # stays in the root: kept
    (root / "fake" / "dangling.png").symlink_to(tmp_path / "gone.png")
    Image.new("RGB", (32, 32)).save(root / "fake" / "anim.gif")
    (root / "fake" / "folder.jpg").mkdir()
    _img(root / "fake" / "tiny.png", 3, size=(1, 1))
    _img(root / "fake" / "thin.png", 4, size=(64, 15))
    (root / "real" / ".DS_Store").write_bytes(b"x")  # hidden: ignored, not reported
    index = scan(DataConfig(data_dir=str(root)), seed=0)
    reasons = {Path(p).name: r for p, r in index.skipped}
    assert set(reasons) == {"escape.png", "escape_dir", "dangling.png", "anim.gif", "folder.jpg", "tiny.png", "thin.png"}
    assert reasons["escape.png"].startswith("symlink leaves the data root") and reasons["escape_dir"] == reasons["escape.png"]
    assert reasons["dangling.png"] == "broken symlink"
    assert reasons["anim.gif"].startswith("unsupported type .gif")
    assert reasons["folder.jpg"] == "a directory, not an image file"
    assert reasons["tiny.png"] == "image 1x1 px is smaller than 16 px" and "64x15" in reasons["thin.png"]
    kept = {Path(s.path).name for split in ("train", "val", "test") for s in index.split(split)}
    assert "inside.png" in kept and len(kept) == 17 and not kept & set(reasons)
    # the same reasons land in the run's skipped_files.csv
    from training.run_io import write_skipped

    write_skipped(index, tmp_path / "skipped_files.csv")
    table = pd.read_csv(tmp_path / "skipped_files.csv")
    assert dict(zip(table["path"].map(lambda p: Path(p).name), table["reason"])) == reasons


def test_csv_index_rows_naming_a_folder_are_reported(tmp_path: Path) -> None:
    _flat(tmp_path, 10, 10)
    (tmp_path / "real" / "dir.png").mkdir()
    rows = [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(tmp_path.rglob("*.png")) if p.is_file()]
    (tmp_path / "index.csv").write_text("path,label\n" + "\n".join(rows + ["real/dir.png,real"]) + "\n")
    index = scan(DataConfig(data_dir=str(tmp_path / "index.csv")), seed=0)
    assert [(Path(p).name, r) for p, r in index.skipped] == [("dir.png", "a directory, not an image file")]


def test_load_time_failures_are_dropped_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ok = _img(tmp_path / "ok.png", 1)
    bad = tmp_path / "bad.jpg"
    _img(tmp_path / "src.jpg", 2, size=(64, 64), fmt="JPEG")
    bad.write_bytes((tmp_path / "src.jpg").read_bytes()[:300])
    ds = ImageDataset([Sample(str(ok), 0), Sample(str(bad), 1), Sample(str(tmp_path / "gone.png"), 1)],
                      build_transform("none", 16, MEAN, STD, train=False), 16)
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(3)]
    assert items[0] is not None and items[1] is None and items[2] is None
    assert "bad.jpg" in caplog.text and "gone.png" in caplog.text
    images, labels, idx = collate_drop_none(items, 16)
    assert images.shape == (1, 3, 16, 16) and labels.tolist() == [0.0] and idx.tolist() == [0]
    empty = collate_drop_none([None, None], 16)
    assert empty[0].shape == (0, 3, 16, 16) and empty[1].shape == (0,) and empty[2].dtype == torch.int64


# ------------------------------------------------------------------------------------- errors
def _assert_one_line(err: pytest.ExceptionInfo[DataError], *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        scan(DataConfig(data_dir=str(tmp_path / "nope")), 0)
    _assert_one_line(err, "not found", "nope")


def test_unknown_layout_names_expected_layout(tmp_path: Path) -> None:
    _img(tmp_path / "cats" / "a.png")
    with pytest.raises(DataError) as err:
        scan(DataConfig(data_dir=str(tmp_path)), 0)
    _assert_one_line(err, str(tmp_path), "{real,fake}")


def test_missing_and_empty_class(tmp_path: Path) -> None:
    _img(tmp_path / "real" / "a.png")
    with pytest.raises(DataError) as err:
        scan(DataConfig(data_dir=str(tmp_path)), 0)
    _assert_one_line(err, "missing folder", str(tmp_path / "fake"))
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "notes.txt").write_text("x")
    with pytest.raises(DataError) as err:
        scan(DataConfig(data_dir=str(tmp_path)), 0)
    _assert_one_line(err, "empty class", str(tmp_path / "fake"), "1 entry skipped", "notes.txt: unsupported type .txt")
    (tmp_path / "fake" / "broken.png").write_bytes(b"")
    with pytest.raises(DataError) as err:
        scan(DataConfig(data_dir=str(tmp_path)), 0)
    _assert_one_line(err, "no readable fake images")


def test_split_with_one_class(tmp_path: Path) -> None:
    for i in range(4):
        _img(tmp_path / "train" / "real" / f"r{i}.png", i)
        _img(tmp_path / "train" / "fake" / f"f{i}.png", 9 + i)
        _img(tmp_path / "val" / "real" / f"r{i}.png", 20 + i)
    (tmp_path / "val" / "fake").mkdir(parents=True)
    _img(tmp_path / "val" / "fake" / "x.png").write_bytes(b"")
    with pytest.raises(DataError) as err:
        scan(DataConfig(data_dir=str(tmp_path)), 0)
    _assert_one_line(err, "val split", "only real")


def test_ratio_split_leaving_one_class(tmp_path: Path) -> None:
    _flat(tmp_path, 10, 1)  # one fake: val and test cannot both have one
    with pytest.raises(DataError) as err:
        scan(DataConfig(data_dir=str(tmp_path)), 0)
    _assert_one_line(err, "split", "only real", "data.split")


def test_csv_errors(tmp_path: Path) -> None:
    csv = tmp_path / "index.csv"
    csv.write_text("file,target\na.png,1\n")
    with pytest.raises(DataError) as err:
        scan(DataConfig(data_dir=str(csv)), 0)
    _assert_one_line(err, str(csv), "path,label", "file,target")
    csv.write_text("path,label\na.png,maybe\n")
    with pytest.raises(DataError) as err:
        scan(DataConfig(data_dir=str(csv)), 0)
    _assert_one_line(err, "line 2", "maybe")
    with pytest.raises(DataError) as err:
        scan(DataConfig(data_dir=str(_flat(tmp_path / "flat", 2, 2)), group_by="(unclosed"), 0)
    _assert_one_line(err, "data.group_by")


# ------------------------------------------------------------------------------------- loaders
def test_loader_batches_and_indices_map_back(tmp_path: Path) -> None:
    _flat(tmp_path, 20, 20)
    index = scan(DataConfig(data_dir=str(tmp_path)), seed=0)
    loaders = build_loaders(index, _cfg(tmp_path), MEAN, STD)
    assert set(loaders) == {"train", "val", "test"}
    assert loaders["train"].drop_last and not loaders["val"].drop_last and not loaders["train"].pin_memory
    images, labels, idx = next(iter(loaders["val"]))
    assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
    assert labels.dtype == torch.float32 and idx.dtype == torch.int64
    assert labels.tolist() == [float(index.val[i].label) for i in idx.tolist()]
    assert sum(len(b[1]) for b in loaders["train"]) == (len(index.train) // 8) * 8


def test_loader_workers_seeded_and_deterministic(tmp_path: Path) -> None:
    _flat(tmp_path, 12, 12)
    index = scan(DataConfig(data_dir=str(tmp_path)), seed=0)
    cfg = _cfg(tmp_path, num_workers=2, aug_policy="advanced")

    def epoch() -> list[torch.Tensor]:
        return [b[0] for b in build_loaders(index, cfg, MEAN, STD)["train"]]

    first, second = epoch(), epoch()
    assert len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second))
    assert build_loaders(index, cfg, MEAN, STD, device_type="cuda")["train"].pin_memory
    assert build_loaders(index, cfg, MEAN, STD)["train"].num_workers == 2


def test_eval_splits_of_a_few_batches_decode_in_process_larger_ones_keep_their_workers(tmp_path: Path) -> None:
    """Starting a worker costs more than decoding a few batches (dataio.loaders.EVAL_IN_PROCESS_BATCHES); an
    evaluation split over that keeps its workers, persistent across epochs; train loaders always keep theirs."""
    _flat(tmp_path, 30, 30)
    index = scan(DataConfig(data_dir=str(tmp_path)), seed=0)
    small = build_loaders(index, _cfg(tmp_path, num_workers=2), MEAN, STD)
    assert len(index.val) <= EVAL_IN_PROCESS_BATCHES * 8
    assert small["val"].num_workers == 0 and not small["val"].persistent_workers
    assert small["train"].num_workers == 2
    large = build_loaders(index, _cfg(tmp_path, num_workers=2, batch_size=1), MEAN, STD)  # more batches than that
    assert len(index.val) > EVAL_IN_PROCESS_BATCHES
    assert large["val"].num_workers == 2 and large["val"].persistent_workers
    decoded = [torch.cat([b[0] for b in loaders["val"]]) for loaders in (small, large)]
    assert torch.equal(*decoded)  # the same tensors either way


class _SigtermAtFork:
    """While armed, the next process this one forks gets SIGTERM as its first act (os.register_at_fork), before a
    DataLoader worker's worker_init_fn can run, and so does this process: a group `kill -- -PGID` landing in
    the fork window, made certain. This process's signals are recorded, not acted on."""

    armed = False
    registered = False

    def __init__(self) -> None:
        if not _SigtermAtFork.registered:  # a fork hook cannot be unregistered: registered once, armed per test
            os.register_at_fork(after_in_child=_SigtermAtFork._child, after_in_parent=_SigtermAtFork._disarm)
            _SigtermAtFork.registered = True
        self.got: list[int] = []

    @staticmethod
    def _disarm() -> None:  # one fork per arming: no stop arrives after the test has put its handler back
        _SigtermAtFork.armed = False

    @staticmethod
    def _child() -> None:
        if _SigtermAtFork.armed:
            # The inherited Python handler would only queue it; torch's worker soon installs a C one that, like
            # the default, ends the worker: the window a real stop must not land in.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getppid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self) -> "_SigtermAtFork":
        self.previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.got.append(signum))
        _SigtermAtFork.armed = True
        return self

    def __exit__(self, *exc: object) -> None:
        _SigtermAtFork.armed = False
        signal.signal(signal.SIGTERM, self.previous)

    def handled(self, timeout: float = 2.0) -> bool:
        """Whether this process got the stop (a signal another thread took is handled a moment later)."""
        deadline = time.monotonic() + timeout
        while not self.got and time.monotonic() < deadline:
            time.sleep(0.01)
        return bool(self.got)


class _SigtermMask(torch.utils.data.Dataset):
    """Each item: whether SIGTERM is blocked in the worker that decodes it."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> bool:
        return signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_a_group_sigterm_while_train_workers_start_is_held_until_their_handler_is_in_place(tmp_path: Path) -> None:
    """`kill -- -PGID` just as an epoch forks its workers: the workers do not die of it (a worker traceback and
    a FAILED run) and the main process still gets it (the run stops KILLED)."""
    _flat(tmp_path, 12, 12)
    index = scan(DataConfig(data_dir=str(tmp_path)), seed=0)
    loader = build_loaders(index, _cfg(tmp_path, num_workers=2), MEAN, STD)["train"]
    with _SigtermAtFork() as stop:
        assert sum(len(b[1]) for b in loader_iter(loader)) == len(loader.dataset) // 8 * 8  # every worker lived
        assert stop.handled()
    with _SigtermAtFork(), pytest.raises(RuntimeError, match="DataLoader worker"):
        list(loader)  # what the hold prevents: the worker dies of the stop before its handler is in place


def test_evaluation_and_feature_passes_hold_a_group_sigterm_while_their_workers_start(tmp_path: Path) -> None:
    """A val split of more than EVAL_IN_PROCESS_BATCHES batches keeps workers, forked at its first pass, and the
    frozen-feature cache forks its own: a `kill -- -PGID` then must not kill a worker either. Loaders whose
    workers do not unblock SIGTERM (no seed_worker) are iterated as they are, or their workers would ignore
    multiprocessing's terminate()."""
    import contextlib

    from evaluation.inference import predict
    from training.feature_cache import compute_features

    _flat(tmp_path, 20, 20)
    index = scan(DataConfig(data_dir=str(tmp_path)), seed=0)
    val = build_loaders(index, _cfg(tmp_path, num_workers=2, batch_size=1), MEAN, STD)["val"]
    assert val.num_workers == 2
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 1))
    for loader in (val, CachedEvalLoader(build_loaders(index, _cfg(tmp_path, num_workers=2, batch_size=1), MEAN,
                                                       STD)["val"], 2**30)):  # plain, and as train(cfg) wraps it
        with _SigtermAtFork() as stop:
            preds = predict(model, loader, torch.device("cpu"))
            assert len(preds.labels) == len(index.val) and stop.handled()  # the workers lived to decode every image
    model.frozen_features = lambda x: x.mean(dim=(2, 3))
    with _SigtermAtFork() as stop:
        store = compute_features(model, val, torch.device("cpu"), channels_last=False, amp=contextlib.nullcontext,
                                 ram_bytes=2**20, file=tmp_path / "features.bin")
        assert bool(store.valid.all()) and stop.handled()
    plain = torch.utils.data.DataLoader(_SigtermMask(), batch_size=1, num_workers=1)
    assert [bool(b) for b in loader_iter(plain)] == [False, False]


def test_trim_heap_gives_freed_memory_back_before_workers_fork() -> None:
    """What a train loader's forked workers would otherwise share copy-on-write: memory freed but still held."""
    if not trim_heap():
        pytest.skip("no glibc malloc_trim here")

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    blocks = [bytearray(16_000) for _ in range(24_000)]  # ~370 MB of small blocks: glibc's heap, not mmap
    before = resident()
    del blocks[::2]  # holes between live blocks, which glibc does not give back on its own
    assert resident() > before - 50 * 2**20
    trim_heap()
    assert resident() < before - 100 * 2**20


def test_retained_heap_keeps_a_steps_big_blocks_paged_in_and_gives_glibc_its_defaults_back() -> None:
    """A training step allocates its activations (blocks over glibc's 32 MiB mmap threshold), frees them and
    allocates them again. Inside retained_heap() (train(cfg)'s epochs, scoring passes) the steps after the first
    reuse pages already faulted in, also after a nested block was left; outside, glibc maps fresh zeroed pages
    each time, as it does again after the outermost block is left.
    Measured in a new process, as a training CLI is (this one's heap holds what earlier tests left)."""
    script = """
import json, resource, torch
from dataio.loaders import retained_heap
size = 48 * 2**20
def faults_of_a_step():
    torch.ones(size // 4)  # a step before: every page written, then freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(size // 4)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
outside = faults_of_a_step()
with retained_heap() as kept:
    with retained_heap():  # nested (a val pass inside the run's block): leaving it keeps the outer one's heap
        pass
    inside = min(faults_of_a_step() for _ in range(4))  # the first steps grow the heap
print(json.dumps({"kept": kept, "outside": outside, "inside": inside, "after": faults_of_a_step()}))
"""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.splitlines()[-1])
    if not got["kept"]:
        pytest.skip("no glibc mallopt here")
    if got["outside"] < 48 * 2**20 // os.sysconf("SC_PAGE_SIZE") // 2:
        pytest.skip(f"{got['outside']} page faults for 48 MiB: huge pages or another allocator, nothing to measure")
    assert got["inside"] * 10 < got["outside"], got
    assert got["after"] * 2 > got["outside"], got


def test_balanced_sampler_draws_classes_equally(tmp_path: Path) -> None:
    labels = [0] * 90 + [1] * 10
    index = DataIndex([Sample(str(_img(tmp_path / f"{i}.png", i, size=(8, 8))), lab) for i, lab in enumerate(labels)],
                      [], [], source=str(tmp_path))
    loader = build_loaders(index, _cfg(tmp_path, balance="sampler", batch_size=10), MEAN, STD)["train"]
    drawn = Counter()
    for _ in range(5):
        for _, y, _ in loader:
            drawn.update(y.long().tolist())
    share = drawn[1] / sum(drawn.values())
    assert 0.38 < share < 0.62, drawn


def test_demo_data_is_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataio.demo_data as demo

    made = demo.ensure_demo_data(tmp_path / "demo", n_per_class=20, size=32)
    monkeypatch.setattr(demo, "ensure_demo_data", lambda: made)
    index = scan(DataConfig(data_dir=None), seed=0)
    assert index.source == str(made) and all(v["real"] and v["fake"] for v in index.class_counts().values())
