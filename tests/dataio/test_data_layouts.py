"""Data: the three layouts, grouped splits, odd and broken images, one-line errors, balanced sampling."""
from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import load_config
from dataio.data import DataError, scan
from dataio.loaders import build_loaders

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 40), fmt: str = "JPEG", seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode == "I;16":
        img = Image.fromarray((np.asarray(img.convert("L"), np.uint16) * 257).astype(np.uint16))
    elif mode != "RGB":
        img = img.convert(mode)
    img.save(path, fmt)
    return path


def flat_set(root: Path, n: int = 10, people: int = 0) -> Path:
    for label in ("real", "fake"):
        for i in range(n):
            name = f"person{i % people}_{i}.jpg" if people else f"{label}_{i}.jpg"
            write_image(root / label / name, seed=i + (100 if label == "fake" else 0))
    return root


def cfg_for(data_dir: Path | str, **extra):
    return load_config(overrides={"data.data_dir": str(data_dir), "data.image_size": 32, "data.batch_size": 4,
                                  "data.num_workers": 0, "data.aug_policy": "none", "model.pretrained": False, **extra})


def test_flat_layout_is_split_stratified_and_seeded(tmp_path: Path) -> None:
    root = flat_set(tmp_path / "d", n=20)
    cfg = cfg_for(root)
    a, b = scan(cfg.data, 0), scan(cfg.data, 0)
    assert [s.path for s in a.train] == [s.path for s in b.train] and a.digest == b.digest
    assert (len(a.train), len(a.val), len(a.test)) == (28, 6, 6)
    for split in (a.train, a.val, a.test):
        assert Counter(s.label for s in split)[0] == Counter(s.label for s in split)[1]
    assert scan(cfg.data, 1).digest != a.digest
    assert a.class_counts()["train"] == {"real": 14, "fake": 14}


def test_presplit_layout_keeps_its_splits(tmp_path: Path) -> None:
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        flat_set(tmp_path / "d" / split, n=n)
    index = scan(cfg_for(tmp_path / "d").data, 0)
    assert (len(index.train), len(index.val), len(index.test)) == (12, 6, 6)
    assert all("/val/" in s.path for s in index.val)


def test_csv_index_with_relative_paths_and_groups(tmp_path: Path) -> None:
    root = flat_set(tmp_path / "imgs", n=8)
    rows = ["path,label,group,split"]
    for i, p in enumerate(sorted(root.rglob("*.jpg"))):
        split = ("train", "train", "val", "test")[i % 4]
        rows.append(f"{p.relative_to(tmp_path)},{p.parent.name},g{i},{split}")
    (tmp_path / "index.csv").write_text("\n".join(rows) + "\n")
    index = scan(cfg_for(tmp_path / "index.csv").data, 0)
    assert len(index.train) + len(index.val) + len(index.test) == 16
    assert all(Path(s.path).is_file() and s.group for s in index.train)


def test_groups_never_straddle_splits(tmp_path: Path) -> None:
    root = flat_set(tmp_path / "d", n=30, people=6)
    index = scan(cfg_for(root, **{"data.group_by": r"^(person\d+)_"}).data, 0)
    groups = {name: {s.group for s in getattr(index, name)} for name in ("train", "val", "test")}
    assert groups["train"] and not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    assert not (groups["val"] & groups["test"])


def test_odd_formats_and_modes_all_load_as_rgb(tmp_path: Path) -> None:
    root = flat_set(tmp_path / "d", n=6)
    odd = [("L", "PNG", ".png"), ("RGBA", "PNG", ".png"), ("CMYK", "JPEG", ".jpg"), ("P", "PNG", ".png"),
           ("I;16", "PNG", ".png"), ("RGB", "WEBP", ".webp"), ("RGB", "BMP", ".bmp")]
    for k, (mode, fmt, ext) in enumerate(odd):
        write_image(root / "fake" / f"odd{k}{ext}", mode=mode, fmt=fmt, size=(37 + k, 23))
    write_image(root / "real" / "tiny.png", fmt="PNG", size=(1, 1))
    cfg = cfg_for(root, **{"data.batch_size": 64})
    index = scan(cfg.data, 0)
    assert [(Path(p).name, r) for p, r in index.skipped] == [("tiny.png", "image 1x1 px is smaller than 16 px")]
    seen = 0
    for loader in build_loaders(index, cfg, MEAN, STD).values():
        for x, y, idx in loader:
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
            seen += len(x)
    assert seen == 19  # every odd format, not the 1x1 image


def test_corrupt_files_are_skipped_named_and_never_crash(tmp_path: Path) -> None:
    root = flat_set(tmp_path / "d", n=8)
    (root / "real" / "empty.jpg").write_bytes(b"")
    (root / "fake" / "garbage.jpg").write_bytes(b"this is not an image at all")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "fake" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    cfg = cfg_for(root, **{"data.batch_size": 64})
    index = scan(cfg.data, 0)
    skipped = {Path(p).name for p, _ in index.skipped}
    assert {"empty.jpg", "garbage.jpg"} <= skipped
    n = sum(len(x) for loader in build_loaders(index, cfg, MEAN, STD).values() for x, _, _ in loader)
    assert n == 16  # the truncated file is skipped at scan or dropped at load; every loop finishes


@pytest.mark.parametrize("make, needle", [
    (lambda r: r / "nowhere", "not found"),
    (lambda r: (flat_set(r, n=3), [p.unlink() for p in (r / "fake").glob("*")])[0], "fake"),
    (lambda r: (r / "cats").mkdir(parents=True) or r, "layout"),
])
def test_bad_data_is_one_line_error(tmp_path: Path, make, needle: str) -> None:
    root = make(tmp_path / "d")
    with pytest.raises(DataError) as e:
        scan(cfg_for(root).data, 0)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_split_with_one_class_is_an_error(tmp_path: Path) -> None:
    flat_set(tmp_path / "d" / "train", n=4)
    (tmp_path / "d" / "val" / "real").mkdir(parents=True)
    write_image(tmp_path / "d" / "val" / "real" / "a.jpg")
    write_image(tmp_path / "d" / "val" / "real" / "b.jpg")
    with pytest.raises(DataError, match="val"):
        scan(cfg_for(tmp_path / "d").data, 0)


def test_balanced_sampler_draws_classes_equally(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for i in range(40):
        write_image(root / "real" / f"r{i}.jpg", seed=i)
    for i in range(8):
        write_image(root / "fake" / f"f{i}.jpg", seed=100 + i)
    cfg = cfg_for(root, **{"data.balance": "sampler", "data.split": [0.5, 0.5, 0.0], "data.batch_size": 8})
    labels = torch.cat([y for _ in range(5) for _, y, _ in build_loaders(scan(cfg.data, 0), cfg, MEAN, STD)["train"]])
    assert 0.35 < labels.mean().item() < 0.65


def test_center_crop_keeps_the_middle(tmp_path: Path) -> None:
    root = flat_set(tmp_path / "d", n=10)
    img = np.zeros((100, 100, 3), np.uint8)
    img[25:75, 25:75] = 255  # white centre, black border
    Image.fromarray(img).save(root / "real" / "centre.png")
    cfg = cfg_for(root, **{"data.center_crop": 0.5, "data.batch_size": 64})
    index = scan(cfg.data, 0)
    for split, loader in build_loaders(index, cfg, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).items():
        for x, _, idx in loader:
            for xi, i in zip(x, idx):
                if getattr(index, split)[int(i)].path.endswith("centre.png"):
                    assert xi.min() > 0.9  # only the white centre is left
                    return
    pytest.fail("centre.png not loaded")
