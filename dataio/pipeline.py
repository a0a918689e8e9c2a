"""Image or video data, chosen in one place from the model's kind: scan the data set, build its loaders.

An image model reads photos/frames one at a time (dataio.data + dataio.loaders); a video model reads clips
of frames (dataio.video_data). Everything else (trainer, evaluation, sweeps) calls these two functions.
"""
from __future__ import annotations

from typing import Sequence

from torch.utils.data import DataLoader

from core.config import Config, DataConfig
from dataio.data import DataIndex


def is_video(cfg: Config) -> bool:
    """True when the configured model takes clips (its preset's kind is video)."""
    return cfg.model.kind == "video"


def data_config(cfg: Config) -> DataConfig:
    """data.data_dir, or when none is given the generated demo set: faces for an image model, clips of faces
    for a video model."""
    if cfg.data.data_dir:
        return cfg.data
    if is_video(cfg):
        from dataio.demo_clips import ensure_demo_clips

        return cfg.data.model_copy(update={"data_dir": str(ensure_demo_clips())})
    from dataio.demo_data import ensure_demo_data

    return cfg.data.model_copy(update={"data_dir": str(ensure_demo_data())})


def scan_data(cfg: Config) -> DataIndex:
    """Scan the configured data once: image folders/CSV, or videos (folders of frames) for a video model."""
    if is_video(cfg):
        from dataio.video_data import scan_videos

        return scan_videos(data_config(cfg), cfg.train.seed)
    from dataio.data import scan

    return scan(data_config(cfg), cfg.train.seed)


def make_loaders(index: DataIndex, cfg: Config, mean: Sequence[float], std: Sequence[float], *,
                 device_type: str = "cpu") -> dict[str, DataLoader]:
    """Loaders "train", "val", "test" (when non-empty): image batches or clip batches by the model's kind."""
    if is_video(cfg):
        from dataio.video_data import build_video_loaders

        return build_video_loaders(index, cfg, mean, std, device_type=device_type)
    from dataio.loaders import build_loaders

    return build_loaders(index, cfg, mean, std, device_type=device_type)
