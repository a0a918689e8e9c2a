"""The synthetic demo set: deterministic, generated once, atomic, usable by scan()."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import dataio.demo_data as demo
from core.config import DataConfig
from dataio.data import scan
from dataio.loaders import load_rgb


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.jpg"))}


def test_generation_is_deterministic(tmp_path: Path) -> None:
    a = demo.ensure_demo_data(tmp_path / "a", n_per_class=12, size=48, seed=3)
    b = demo.ensure_demo_data(tmp_path / "b", n_per_class=12, size=48, seed=3)
    c = demo.ensure_demo_data(tmp_path / "c", n_per_class=12, size=48, seed=4)
    assert _hashes(a) == _hashes(b) and len(_hashes(a)) == 24
    assert _hashes(a) != _hashes(c)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_layout_manifest_and_pairs(tmp_path: Path) -> None:
    root = demo.ensure_demo_data(tmp_path / "demo", n_per_class=20, size=40)
    manifest = json.loads((root / demo.MANIFEST).read_text())
    assert manifest["version"] == demo.GENERATOR_VERSION and manifest["n_per_class"] == 20
    assert sum(v for k, v in manifest["counts"].items() if k.endswith("real")) == 20
    assert sum(v for k, v in manifest["counts"].items() if "/fake" in k) == 20
    index = scan(DataConfig(data_dir=str(root)), seed=0)
    for split in ("train", "val", "test"):  # fake_i is made from real_i: a pair shares a split
        ids = {label: {Path(s.path).stem.split("_")[1] for s in index.split(split) if s.label == label}
               for label in (0, 1)}
        assert ids[0] == ids[1] and ids[0]
    assert {s.subset for s in index.train if s.label == 1} <= {"faceswap", "selfblend"}
    img = load_rgb(index.train[0].path)
    assert img.shape == (40, 40, 3) and img.dtype == np.uint8


def test_second_call_is_a_noop_and_new_version_regenerates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = demo.ensure_demo_data(tmp_path / "demo", n_per_class=6, size=32)
    stamp = (root / demo.MANIFEST).stat().st_mtime_ns

    def boom(*args: object) -> None:
        raise AssertionError("regenerated although the manifest matched")

    with monkeypatch.context() as m:
        m.setattr(demo, "generate", boom)
        assert demo.ensure_demo_data(tmp_path / "demo", n_per_class=6, size=32) == root
    assert (root / demo.MANIFEST).stat().st_mtime_ns == stamp
    monkeypatch.setattr(demo, "GENERATOR_VERSION", demo.GENERATOR_VERSION + 1)
    demo.ensure_demo_data(root, n_per_class=6, size=32)
    assert json.loads((root / demo.MANIFEST).read_text())["version"] == demo.GENERATOR_VERSION
    demo.ensure_demo_data(root, n_per_class=8, size=32)  # a changed parameter regenerates too
    assert len(list(root.rglob("*.jpg"))) == 16


def test_failed_generation_leaves_nothing_and_foreign_folder_is_kept(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(out: Path, *args: object) -> None:
        (out / "real").mkdir()
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "generate", fail)
    with pytest.raises(RuntimeError):
        demo.ensure_demo_data(tmp_path / "demo", n_per_class=4, size=32)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    mine = tmp_path / "mine"
    (mine / "real").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a generated demo set"):
        demo.ensure_demo_data(mine, n_per_class=4, size=32)
    assert (mine / "real").is_dir()


def test_cli_prints_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    demo.main(["--out", str(tmp_path / "cli"), "--n_per_class", "4", "--size", "32"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert (tmp_path / "cli" / demo.MANIFEST).is_file()


def test_fakes_differ_from_their_real_inside_the_face_only() -> None:
    face, geom = demo.draw_face(64, np.random.default_rng(0))
    fake = demo.make_fake(face, geom, np.random.default_rng(1), "faceswap")
    diff = np.abs(fake.astype(int) - face.astype(int)).sum(axis=2)
    cx, cy = (int(v) for v in geom["center"])
    assert diff[cy - 4:cy + 4, cx - 4:cx + 4].mean() > 10 and diff[:6, :6].mean() < 1
    sb = demo.make_fake(face, geom, np.random.default_rng(2), "selfblend")
    assert sb.shape == face.shape and not np.array_equal(sb, face)
