"""Video folders follow the photo scan's symlink rules: links are followed only inside the data folder; a linked
video folder or frame outside it, or a broken link, is skipped with its reason; a link back up is not walked."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from core.config import load_config
from dataio.video_data import scan_videos


def _video(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i:06d}.jpg")
    return folder


def test_video_symlinks_stay_inside_the_data_folder(tmp_path: Path) -> None:
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    for label in ("real", "fake"):
        for i in range(3):
            _video(root / label / f"vid{i}")
    _video(root / "extra" / "kept")  # inside the data folder, reached through a link
    os.symlink(root / "extra" / "kept", root / "fake" / "linked_in")
    _video(outside / "secret")
    os.symlink(outside / "secret", root / "fake" / "linked_out")
    os.symlink(root / "nowhere", root / "fake" / "broken")
    leaky = _video(root / "real" / "leaky_frame")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside / "x.jpg")
    os.symlink(outside / "x.jpg", leaky / "000009.jpg")
    os.symlink(root / "real", root / "real" / "vid0" / "loop")  # back up: must not be walked again

    cfg = load_config(overrides={"data.data_dir": str(root), "data.split": [0.5, 0.5, 0.0]})
    index = scan_videos(cfg.data, seed=0)
    found = {Path(s.path).name for part in (index.train, index.val, index.test) for s in part}
    assert found == {"vid0", "vid1", "vid2", "linked_in"}, found
    reasons = {Path(p).name: r for p, r in index.skipped}
    assert reasons["linked_out"].startswith("symlink leaves the data root")
    assert reasons["broken"] == "broken symlink"
    assert reasons["leaky_frame"].startswith("frame 000009.jpg: symlink leaves the data root")
    assert "secret" not in found and "loop" not in reasons


def test_a_class_of_videos_linked_from_outside_says_why_it_is_empty(tmp_path: Path) -> None:
    import pytest

    from core.errors import DataError

    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    (root / "fake").mkdir(parents=True)
    for i in range(2):
        _video(root / "real" / f"vid{i}")
        os.symlink(_video(outside / f"vid{i}"), root / "fake" / f"vid{i}")
    cfg = load_config(overrides={"data.data_dir": str(root), "data.split": [0.5, 0.5, 0.0]})
    with pytest.raises(DataError, match=r"empty class: .*; 2 entries skipped, e\.g\. .*symlink leaves the data root"):
        scan_videos(cfg.data, seed=0)


def test_scoring_a_folder_skips_outside_links_with_a_warning(tmp_path: Path, caplog) -> None:
    from evaluation.video_scoring import videos_in_dir

    root = tmp_path / "data"
    _video(root / "real" / "a")
    _video(root / "fake" / "b")
    _video(tmp_path / "elsewhere" / "c")
    os.symlink(tmp_path / "elsewhere" / "c", root / "fake" / "c")
    with caplog.at_level("WARNING"):
        found = videos_in_dir(root)
    assert sorted(Path(s.path).name for s in found) == ["a", "b"]
    assert "symlink leaves the data root" in caplog.text
