"""Video: ConvLSTM against a hand-written reference, the dual-stream model training on clips, splits
by video, the pairs CSV, the HQ/LQ clip dataset and video-level scoring."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from evaluation.video_scoring import load_model, main as score_main, score_videos, videos_in_dir
from models.video import (
    FUSIONS, ConvLSTM, ConvLSTMCell, DualStreamDetector, SequenceBatch, create_dual_stream,
)
from core.config import load_config
from dataio.data import DataError
from training.freezing import apply_freeze
from core.device import to_device
from evaluation.inference import predict, predictions_table
from dataio.loaders import reseed_epoch
from training.losses import create_loss
from training.optim import build_optimizer
from core.registry import UnknownNameError
from dataio.video_data import (
    VideoClipDataset, VideoSettings, build_video_loaders, check_disjoint, clip_indices, degrade_lq,
    expand_to_frames, scan_videos, write_pairs,
)

TINY_VIDEO = {"hq_backbone": "test_efficientnet", "lq_backbone": "test_efficientnet", "lstm_channels": (16, 8)}
SETTINGS = VideoSettings(sequence_length=4, frame_skip=2)
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def make_frame_videos(root: Path, shared: Path, n_per_class: int = 6, size: int = 64) -> Path:
    """root/{real,fake}/vid<i>/<frame>.jpg: each video a LFW photo drifting a few pixels per frame."""
    for label in ("real", "fake"):
        photos = sorted((shared / "lfw_faceswap" / label).glob("*.jpg"))[:n_per_class]
        for v, photo in enumerate(photos):
            img = cv2.imread(str(photo))
            out = root / label / f"vid{v}"
            out.mkdir(parents=True)
            for t in range(5 + 3 * (v % 3)):  # 5, 8 or 11 frames
                crop = img[25 + t:225 + t, 25:225]
                cv2.imwrite(str(out / f"{3 * t:06d}.jpg"), cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA))
    return root


@pytest.fixture(scope="module")
def frame_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return make_frame_videos(tmp_path_factory.mktemp("videos"), SHARED_DATA)


def video_cfg(data_dir: Path | str, **extra):
    return load_config(overrides={"data.data_dir": str(data_dir), "data.split": [0.67, 0.33, 0.0],
                                  "data.image_size": 64, "data.batch_size": 4, "data.num_workers": 0,
                                  "model.pretrained": False, "optim.lr": 3e-3, "train.seed": 0, **extra})


def tiny_model(num_outputs: int = 1, image_size: int = 64, **kw) -> DualStreamDetector:
    cfg = load_config(overrides={"model.pretrained": False})
    return create_dual_stream(cfg.model, num_outputs, image_size=image_size, **{**TINY_VIDEO, **kw})


# ------------------------------------------------------------------------------ ConvLSTM
def test_convlstm_cell_matches_handwritten_reference() -> None:
    torch.manual_seed(0)
    cell = ConvLSTMCell(5, 7, kernel_size=3)
    x, h, c = torch.randn(2, 5, 6, 6), torch.randn(2, 7, 6, 6), torch.randn(2, 7, 6, 6)
    w, b = cell.conv.weight, cell.conv.bias
    wx, wh = w[:, :5], w[:, 5:]  # the conv over [x, h] is a conv over x plus a conv over h
    pre = F.conv2d(x, wx, b, padding=1) + F.conv2d(h, wh, None, padding=1)
    i, f, o, g = (pre[:, k * 7:(k + 1) * 7] for k in range(4))
    c_ref = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_ref = torch.sigmoid(o) * torch.tanh(c_ref)
    h_new, c_new = cell(x, (h, c))
    torch.testing.assert_close(c_new, c_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_new, h_ref, atol=1e-5, rtol=1e-5)
    h0, c0 = cell(x)  # no state = zero state
    torch.testing.assert_close(h0, cell(x, (torch.zeros_like(h), torch.zeros_like(c)))[0])


def test_convlstm_stack_shapes_and_causality() -> None:
    torch.manual_seed(0)
    lstm = ConvLSTM(6, (8, 4), kernel_size=3)
    x = torch.randn(2, 5, 6, 3, 3)
    y = lstm(x)
    assert y.shape == (2, 5, 4, 3, 3)
    x2 = x.clone()
    x2[:, -1] += 1.0  # changing the last frame changes only the last output step
    y2 = lstm(x2)
    torch.testing.assert_close(y[:, :-1], y2[:, :-1])
    assert not torch.allclose(y[:, -1], y2[:, -1])


def test_fusions() -> None:
    streams = torch.randn(3, 2, 16)
    att = FUSIONS.create("attention", dim=16)
    w = att.weights(streams)
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    torch.testing.assert_close(att(streams), (w.unsqueeze(-1) * streams).sum(1))
    assert FUSIONS.create("concat", dim=16)(streams).shape == (3, 32)
    assert FUSIONS.create("gated", dim=16)(streams).shape == (3, 16)
    with pytest.raises(UnknownNameError, match="gated"):
        FUSIONS.create("gate", dim=16)


# ------------------------------------------------------------------------------ the model
@pytest.mark.parametrize("fusion", ["attention", "concat", "gated"])
def test_dual_stream_contract(fusion: str) -> None:
    model = tiny_model(2, fusion=fusion)
    x = SequenceBatch(torch.randn(3, 4, 3, 64, 64), torch.randn(3, 4, 3, 32, 32))
    model.eval()
    out = model(x)
    assert out.shape == (3, 2)
    torch.testing.assert_close(model((x.hq, x.lq)), out)
    torch.testing.assert_close(model({"hq": x.hq, "lq": x.lq}), out)
    assert model(x.hq).shape == (3, 2)  # HQ only: LQ made by downscaling (export path)
    moved = to_device(x, torch.device("cpu"), channels_last=True)  # what the trainer does with a batch
    assert len(moved) == 3 and moved.channels_last
    torch.testing.assert_close(model.to(memory_format=torch.channels_last)(moved), out, atol=1e-4, rtol=1e-4)
    flipped = torch.flip(x, dims=[3])  # the trainer's flip TTA
    torch.testing.assert_close(flipped.hq, x.hq.flip(-1))
    groups = model.parameter_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert model.is_convnet and set(model.data_config) >= {"mean", "std"}


def test_dual_stream_freezing_trains_head_only() -> None:
    model = tiny_model()
    head = sum(p.numel() for p in model.head.parameters())
    assert apply_freeze(model, "frozen").trainable == head
    partial = apply_freeze(model, "partial:1").trainable
    assert head < partial < apply_freeze(model, "full").trainable


def test_lq_stream_renormalised_to_its_backbone() -> None:
    """Both streams arrive normalised with the HQ mean/std; the LQ backbone gets its own normalisation."""
    model = tiny_model().eval()
    dc = model.data_config
    own = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    other = DualStreamDetector(model.backbone, model.head, 1, data_config=dc, hq_size=64, lq_size=32, lq_norm=own)
    seen: list[torch.Tensor] = []  # what the LQ stem convolution receives
    hook = model.backbone.lq.conv_stem.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    x = SequenceBatch(torch.randn(2, 3, 3, 64, 64), torch.randn(2, 3, 3, 32, 32))
    with torch.no_grad():
        model(x)
        other.eval()(x)
    hook.remove()
    mean, std = torch.tensor(dc["mean"]).view(1, 3, 1, 1), torch.tensor(dc["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], x.lq.flatten(0, 1))  # same mean/std: untouched
    torch.testing.assert_close(seen[1], (x.lq.flatten(0, 1) * std + mean - 0.5) / 0.5, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ data
def test_clip_indices() -> None:
    assert clip_indices(30, 4, 3, start=0) == [0, 3, 6, 9]
    assert clip_indices(30, 4, 3) == [10, 13, 16, 19]  # centred: (30 - 10) // 2
    assert clip_indices(7, 4, 3) == [0, 2, 4, 6]  # too short for stride 3: stride 2
    assert clip_indices(2, 4, 3) == [0, 1, 1, 1]  # too short for 4 frames: the last repeats
    assert clip_indices(1, 3, 5) == [0, 0, 0]


def test_degrade_lq_downscales_and_compresses() -> None:
    rng = np.random.default_rng(0)
    frames = np.clip(rng.normal(128, 40, (2, 64, 64, 3)), 0, 255).astype(np.uint8)
    clean = cv2.resize(frames[0], (32, 32), interpolation=cv2.INTER_AREA).astype(float)
    err = {q: np.abs(degrade_lq(frames, 32, q)[0].astype(float) - clean).mean() for q in (30, 95)}
    assert degrade_lq(frames, 32, 30).shape == (2, 32, 32, 3)
    assert err[30] > err[95] > 0


def test_splits_never_share_a_video(frame_videos: Path, tmp_path: Path) -> None:
    index = scan_videos(video_cfg(frame_videos).data, seed=0)
    train, val = {s.path for s in index.train}, {s.path for s in index.val}
    assert not train & val and len(train | val) == 12 and not index.test
    assert index.class_counts()["val"] == {"real": 2, "fake": 2}
    # the pairs CSV reproduces the split exactly
    pairs = write_pairs(index, tmp_path / "training_pairs.csv")
    again = scan_videos(video_cfg(pairs).data, seed=123)
    assert [s.path for s in again.val] == [s.path for s in index.val]
    # group_by keeps related videos (same number = same source) in one split, for every seed
    for seed in range(5):
        idx = scan_videos(video_cfg(frame_videos, **{"data.group_by": r"vid(\d)"}).data, seed=seed)
        for split in ("train", "val"):
            ids = {Path(s.path).name for s in idx.split(split)}
            other = {Path(s.path).name for s in idx.split("val" if split == "train" else "train")}
            assert not ids & other


def test_pairs_csv_errors(frame_videos: Path, tmp_path: Path) -> None:
    rows = "video_path,label,split\n{0}/real/vid0,real,train\n{0}/real/vid0,real,val\n".format(frame_videos)
    (tmp_path / "leak.csv").write_text(rows)
    with pytest.raises(DataError, match="listed twice"):
        scan_videos(video_cfg(tmp_path / "leak.csv").data, 0)
    (tmp_path / "raw.csv").write_text("video_path,label\nclip.mp4,fake\n")
    with pytest.raises(DataError, match="extract its faces first"):
        scan_videos(video_cfg(tmp_path / "raw.csv").data, 0)
    video = scan_videos(video_cfg(frame_videos).data, 0).train[0]
    with pytest.raises(DataError, match="in both the train and val"):
        check_disjoint({"train": [video], "val": [video]})


def test_clip_dataset_streams_and_consistent_augmentation(frame_videos: Path, tmp_path: Path) -> None:
    still = tmp_path / "real" / "still"  # a static video: every frame identical
    still.mkdir(parents=True)
    img = cv2.imread(str(next((frame_videos / "real" / "vid0").glob("*.jpg"))))
    for t in range(6):
        cv2.imwrite(str(still / f"{t:06d}.jpg"), img)
    from dataio.data import Sample

    ds = VideoClipDataset([Sample(str(still), 0)], SETTINGS, 64, (0.5,) * 3, (0.25,) * 3, train=True,
                          aug_policy="advanced", seed=1)
    for _ in range(3):
        hq, lq, label, i = ds[0]
        assert hq.shape == (4, 3, 64, 64) and lq.shape == (4, 3, 32, 32) and label == 0.0 and i == 0
        assert all(torch.equal(hq[0], hq[t]) for t in range(4))  # one augmentation for the whole clip
        assert all(torch.equal(lq[0], lq[t]) for t in range(4))


def test_clip_train_loader_reseeded_per_epoch_repeats_its_batches(frame_videos: Path) -> None:
    """Exact resume for clips: an epoch's batches (order and augmentation, in a worker) follow its seed only."""
    cfg = video_cfg(frame_videos, **{"data.aug_policy": "advanced", "data.num_workers": 1})
    loader = build_video_loaders(scan_videos(cfg.data, seed=0), cfg, (0.5,) * 3, (0.25,) * 3, settings=SETTINGS)["train"]

    def epoch(seed: int) -> list[torch.Tensor]:
        reseed_epoch(loader, seed)
        return [torch.cat([x.hq.flatten(), x.lq.flatten()]) for x, _, _ in loader]

    first, again, other = epoch(7), epoch(7), epoch(8)
    assert len(first) == 2 and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.slow
def test_dual_stream_trains_one_epoch_on_clips(frame_videos: Path) -> None:
    cfg = video_cfg(frame_videos)
    index = scan_videos(cfg.data, seed=0)
    torch.manual_seed(0)
    model = tiny_model()
    loaders = build_video_loaders(index, cfg, model.data_config["mean"], model.data_config["std"], settings=SETTINGS)
    opt, loss_fn = build_optimizer(model, cfg.optim), create_loss(cfg.loss)
    before = [p.detach().clone() for p in model.head.parameters()]
    model.train()
    losses = []
    for x, y, idx in loaders["train"]:  # one epoch: 8 training videos, batch 4 -> 2 steps
        x = to_device(x, torch.device("cpu"), channels_last=True)
        logits = model(x)
        assert logits.shape == (len(y), 1) and x.hq.shape[1:] == (4, 3, 64, 64) and x.lq.shape[-1] == 32
        loss = loss_fn(logits.float(), y)
        torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits[:, 0].float(), y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert len(losses) == 2 and all(np.isfinite(losses)) and abs(losses[0] - np.log(2)) < 0.2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.head.parameters()))
    # a fixed batch is learnable: 15 more steps drive its loss down
    x, y, _ = next(iter(loaders["train"]))
    with torch.no_grad():
        first = float(loss_fn(model(x), y))
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(loss_fn(model(x), y)) < 0.5 * first
    # the trainer's validation path: predict (flip TTA, channels_last) -> one row per val video
    preds = predict(model, loaders["val"], torch.device("cpu"), channels_last=True, loss_fn=loss_fn, tta=True)
    table = predictions_table(preds, index.val)
    assert sorted(table["path"]) == sorted(s.path for s in index.val) and table["score"].between(0, 1).all()


# ------------------------------------------------------------------------------ video-level scores
def test_frame_model_scores_per_video(frame_videos: Path, tmp_path: Path) -> None:
    from models import create_detector

    cfg = load_config(overrides={"model.model_type": "test_efficientnet", "model.pretrained": False,
                                 "data.image_size": 32})
    torch.manual_seed(0)
    det = create_detector(cfg.model, 1, image_size=32)
    ckpt = tmp_path / "best.pt"
    torch.save({"model": det.state_dict(), "config": cfg.model_dump(mode="json")}, ckpt)
    model, trained = load_model(ckpt)
    assert trained.model.model_type == "test_efficientnet"
    videos = videos_in_dir(frame_videos)
    assert len(videos) == 12 and {v.label for v in videos} == {0, 1}
    metrics = score_videos(model, videos, tmp_path / "mean", image_size=32, rule="mean")
    table = pd.read_csv(tmp_path / "mean" / "predictions.csv")
    frames = pd.read_csv(tmp_path / "mean" / "frame_predictions.csv")
    assert len(table) == 12 and set(table["video"]) == {v.path for v in videos}
    assert table["n_frames"].sum() == len(frames) == sum(len(list(Path(v.path).glob("*.jpg"))) for v in videos)
    means = frames.groupby("group")["score"].mean()
    np.testing.assert_allclose(table.set_index("video")["score"].loc[means.index], means.to_numpy())
    saved = json.loads((tmp_path / "mean" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for level in ("video", "frame"):
        assert {"auc", "ap", "eer", "accuracy"} <= set(saved[level])
    assert saved["video"]["n"] == 12 and saved["model_kind"] == "frame"
    # max >= mean for every video; the CLI writes the same layout
    score_videos(model, videos, tmp_path / "max", image_size=32, rule="max")
    maxed = pd.read_csv(tmp_path / "max" / "predictions.csv").set_index("video")["score"]
    assert (maxed >= table.set_index("video")["score"] - 1e-9).all()
    assert score_main(["--checkpoint", str(ckpt), "--data-dir", str(frame_videos), "--output-dir",
                       str(tmp_path / "cli"), "--rule", "median", "--device", "cpu"]) == 0
    assert len(pd.read_csv(tmp_path / "cli" / "predictions.csv")) == 12
    # the seed guide's command: python -m serving.predict --checkpoint X --test-pairs pairs.csv --output-dir results
    from serving.predict import main as predict_main

    pairs = tmp_path / "training_pairs.csv"
    pairs.write_text("video_path,label\n" + "".join(f"{v.path},{v.label}\n" for v in videos))
    assert predict_main(["--checkpoint", str(ckpt), "--test-pairs", str(pairs), "--output-dir", str(tmp_path / "seed")]) == 0
    assert len(pd.read_csv(tmp_path / "seed" / "predictions.csv")) == 12
    assert predict_main(["--checkpoint", str(ckpt), "--video-dir", videos[0].path, "--output-dir", str(tmp_path / "one")]) == 0
    assert len(pd.read_csv(tmp_path / "one" / "predictions.csv")) == 1


def test_sequence_model_scores_per_video(frame_videos: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_model()
    videos = videos_in_dir(frame_videos / "fake")  # one class: predictions still written, metrics say why not
    metrics = score_videos(model, videos, tmp_path, image_size=64, settings=SETTINGS)
    table = pd.read_csv(tmp_path / "predictions.csv")
    assert len(table) == 6 and (table["label"] == 1).all() and set(table["prediction"]) <= {"real", "fake"}
    assert "only fake" in metrics["video"]["error"] and "frame" not in metrics
    metrics = score_videos(model, videos_in_dir(frame_videos), tmp_path / "both", image_size=64, settings=SETTINGS)
    assert 0.0 <= metrics["video"]["auc"] <= 1.0 and metrics["model_kind"] == "sequence"


def test_expand_to_frames_keeps_the_video_split(frame_videos: Path) -> None:
    index = scan_videos(video_cfg(frame_videos).data, seed=0)
    frames = expand_to_frames(index, max_frames_per_video=3)
    assert {s.group for s in frames.val} == {s.group for s in index.val}
    assert not {s.group for s in frames.train} & {s.group for s in frames.val}
    assert len(frames.val) == 3 * len(index.val)


@pytest.mark.slow
def test_train_unified_dual_stream_end_to_end(frame_videos: Path, tmp_path: Path) -> None:
    """model_type dual_stream goes through the same train(cfg): video splits, checkpoints, MLflow, clip model."""
    import mlflow

    from training.trainer import train

    cfg = video_cfg(frame_videos, **{
        "model.model_type": "dual_stream", "model.hq_backbone": "test_efficientnet",
        "model.lq_backbone": "test_efficientnet", "model.lstm_channels": [16, 8], "data.sequence_length": 4,
        "data.frame_skip": 2, "data.split": [0.5, 0.25, 0.25], "train.num_epochs": 1,
        "train.output_dir": str(tmp_path / "out"), "tracking.tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"})
    result = train(cfg)
    assert result.status == "COMPLETE" and (result.output_dir / "best.pt").exists()
    val = pd.read_parquet(result.output_dir / "predictions" / "val.parquet")
    assert val["path"].map(lambda p: Path(p).is_dir()).all()  # one row per video (a folder of frames)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
    run = mlflow.get_run(result.run_id)
    assert run.data.params["amp"] == "bf16"  # the preset's AMP; 64 px clips leave every conv map >= its stride
    model = mlflow.pyfunc.load_model(run.data.tags["model_uri"])
    out = np.asarray(model.predict(np.random.rand(2, 4, 3, 64, 64).astype(np.float32)))
    assert out.shape == (2, 1) and ((out >= 0) & (out <= 1)).all()
