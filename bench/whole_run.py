#!/usr/bin/env python
"""Whole-run wall time and loop speed: train(cfg) vs a bare PyTorch loop vs timm's train.py loop.

Each side runs in a fresh Python process, timed from process start to process end (what a user waits
for), so start-up (imports, model, loaders) and exit count; "to result" stops the clock when the result
exists instead (ours: the MLflow run's end time; bare: after its AUC), leaving out the interpreter's exit:
  ours  `python training/train_unified.py --set ...`, i.e. train(cfg) as users run it, with MLflow on (an
        existing store, as after a user's first run): train, validate each epoch, checkpoints, test split,
        evaluation report, artifacts (tracking.log_model off, as in sweeps); MLflow runs in the CLI's helper
        process (core.mlflow_backend); the CLI ends with core.cli.exit_now (no interpreter teardown)
  bare  the same detector, loaders, AdamW and BCE loss in a 20-line loop, then one validation pass -> AUC;
        a plain script, so it exits the usual way
  timm  timm's train.py recipe on the same timm model, data folders, image size and batch, built from
        timm's own factories (create_dataset, create_loader, create_optimizer_v2, create_scheduler_v2) and
        its train_one_epoch/validate loop shape; timm does not ship train.py in its wheel, so this is the
        minimal equivalent with train.py's defaults (fp32, NCHW, no AMP unless --amp)
Sides alternate within each round (rotating order), so load on a shared machine hits all of them.
Prints medians, and loop img/s and whole-run wall ratios as the median of per-round ratios.

    python bench/whole_run.py [--model_type mobilenetv2_timm] [--image_size 160] [--steps 12] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SIDES = ("ours", "bare", "timm")


# ---------------------------------------------------------------------------- the sides (child processes)
def ours_argv(a: argparse.Namespace) -> list[str]:
    argv = [sys.executable, str(REPO_ROOT / "training" / "train_unified.py")]
    for k, v in ours_overrides(a).items():
        argv += ["--set", f"{k}={v}"]
    return argv


def ours_result(a: argparse.Namespace, stdout: str) -> dict:
    """The CLI's report lines -> loop img/s (its training_log.csv) and when the result existed (run end)."""
    import sqlite3

    import pandas as pd

    lines = stdout.splitlines()
    status = next(line for line in lines if line.startswith("status="))
    fields = dict(f.split("=", 1) for f in status.split())
    out_dir = Path(next(line for line in lines if line.startswith("output_dir=")).split("=", 1)[1])
    log = pd.read_csv(out_dir / "training_log.csv")
    con = sqlite3.connect(Path(a.tmp) / "mlflow.db")
    (end_ms,) = con.execute("select end_time from runs where run_uuid=?", (fields["run_id"],)).fetchone()
    return {"img_s": float(log["images_per_s"].iloc[0]), "val_auc": float(fields["best_val_auc"]),
            "result_at": end_ms / 1000}


def ours_overrides(a: argparse.Namespace) -> dict:
    return {"model.model_type": a.model_type, "model.pretrained": False, "data.data_dir": a.data_dir,
            "data.image_size": a.image_size, "data.batch_size": a.batch_size, "data.num_workers": a.workers,
            "train.num_epochs": 1, "train.max_steps_per_epoch": a.steps, "optim.scheduler": "none",
            "train.use_amp": a.amp, "train.output_dir": str(Path(a.tmp) / "outputs"), "tracking.log_model": False,
            "tracking.tracking_uri": f"sqlite:///{Path(a.tmp) / 'mlflow.db'}", "tracking.experiment_name": "bench-whole-run"}


def side_bare(a: argparse.Namespace) -> dict:
    """Same detector, data pipeline, optimizer family and loss as ours; no tracking, no files; one val pass."""
    sys.path.insert(0, str(REPO_ROOT))
    import contextlib

    import torch

    from bare_loop import bare_steps
    from core.config import load_config
    from dataio.data import scan
    from dataio.loaders import build_loaders
    from models import create_detector

    cfg = load_config(overrides={k: v for k, v in ours_overrides(a).items() if not k.startswith("tracking.")})
    torch.manual_seed(cfg.train.seed)
    index = scan(cfg.data, cfg.train.seed)
    model = create_detector(cfg.model, 1, image_size=cfg.data.image_size)
    cl = model.is_convnet
    model = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format).train()
    loaders = build_loaders(index, cfg, model.data_config["mean"], model.data_config["std"])
    img_s = bare_steps(
        model, loaders["train"], a.steps, cfg.optim.lr, cfg.optim.weight_decay, cl, a.bare_bf16)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if a.bare_bf16 else contextlib.nullcontext
    model.eval()
    scores, labels = [], []
    with torch.no_grad(), amp():
        for x, y, _ in loaders["val"]:
            scores.append(model(x.contiguous(memory_format=torch.channels_last) if cl else x).float()[:, 0])
            labels.append(y)
    from sklearn.metrics import roc_auc_score

    return {"img_s": img_s, "val_auc": float(roc_auc_score(torch.cat(labels), torch.cat(scores))),
            "result_at": time.time()}


def side_timm(a: argparse.Namespace) -> dict:
    """timm train.py's recipe: factories for model, data, optimizer, scheduler; its loop and validate()."""
    import torch
    from timm import create_model
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import AverageMeter, accuracy

    torch.manual_seed(42)
    model = create_model(a.timm_model, pretrained=False, num_classes=2)
    data_config = resolve_data_config({"input_size": (3, a.image_size, a.image_size)}, model=model)
    root = Path(a.data_dir)
    loaders = {}
    for split, training in (("train", True), ("val", False)):
        # timm labels an image by its leaf folder (real/, fake/faceswap/, ...): map every leaf to real/fake
        leaves = [d for d in (root / split).rglob("*") if d.is_dir() and not any(c.is_dir() for c in d.iterdir())]
        class_map = {d.name: 0 if "real" in d.relative_to(root / split).parts else 1 for d in leaves}
        ds = create_dataset("", root=str(root / split), split=split, is_training=training, batch_size=a.batch_size,
                            class_map=class_map)
        loaders[split] = create_loader(ds, input_size=data_config["input_size"], batch_size=a.batch_size,
                                       is_training=training, use_prefetcher=False, interpolation=data_config["interpolation"],
                                       mean=data_config["mean"], std=data_config["std"], num_workers=a.workers,
                                       crop_pct=data_config["crop_pct"], device=torch.device("cpu"))
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=1e-4)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=1, updates_per_epoch=a.steps)
    loss_fn = torch.nn.CrossEntropyLoss()
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if a.timm_amp else None
    # train_one_epoch: forward, loss, zero_grad, backward, step, meters, scheduler.step_update
    model.train()
    losses, num_updates, seen, t0 = AverageMeter(), 0, 0, time.perf_counter()
    for batch_idx, (input, target) in enumerate(loaders["train"]):
        if batch_idx >= a.steps:
            break
        if amp is not None:
            with amp():
                output = model(input)
        else:
            output = model(input)
        loss = loss_fn(output.float(), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        num_updates += 1
        losses.update(loss.item(), input.size(0))
        scheduler.step_update(num_updates=num_updates, metric=losses.avg)
        seen += input.size(0)
    img_s = seen / (time.perf_counter() - t0)
    scheduler.step(1, losses.avg)
    # validate: top-1 over the val folder
    model.eval()
    top1 = AverageMeter()
    with torch.no_grad():
        for input, target in loaders["val"]:
            top1.update(accuracy(model(input), target, topk=(1,))[0].item(), input.size(0))
    return {"img_s": img_s, "val_top1": top1.avg, "result_at": time.time()}


# ---------------------------------------------------------------------------- the parent
def run_side(side: str, a: argparse.Namespace) -> dict:
    args = ours_argv(a) if side == "ours" else [sys.executable, __file__, "--side", side] + [
        f"--{k}={v}" for k, v in vars(a).items() if k not in ("side", "rounds", "no_warmup") and v is not None]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "DFSWEEP_CACHE_DIR": a.tmp,
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    started, t0 = time.time(), time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
    result = ours_result(a, out.stdout) if side == "ours" else json.loads(out.stdout.strip().splitlines()[-1])
    return {**result, "wall": wall, "to_result": result.pop("result_at") - started}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)  # runs before the repo is on sys.path
    p.add_argument("--model_type", default="mobilenetv2_timm", help="our preset (timm model for the timm side)")
    p.add_argument("--timm_model", default="mobilenetv2_100")
    p.add_argument("--image_size", type=int, default=160)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=12, help="training steps (one epoch: at most one pass over the train split)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--amp", default="auto", help="our train.use_amp (auto | true | false)")
    p.add_argument("--bare_bf16", type=int, default=-1, help="bare loop in bf16 (default: what ours chose)")
    p.add_argument("--timm_amp", type=int, default=0, help="timm side with bf16 autocast (train.py --amp)")
    p.add_argument("--data_dir", default=None, help="{train,val,test}/{real,fake} folders (default: the demo set)")
    p.add_argument("--tmp", default=None)
    p.add_argument("--side", choices=SIDES[1:])
    a = p.parse_args(argv)
    if a.side:
        a.bare_bf16 = bool(a.bare_bf16 > 0)
        print(json.dumps({"bare": side_bare, "timm": side_timm}[a.side](a)))
        return 0
    if a.data_dir is None:
        sys.path.insert(0, str(REPO_ROOT))
        from dataio.demo_data import ensure_demo_data

        a.data_dir = str(ensure_demo_data())
    a.tmp = a.tmp or tempfile.mkdtemp(prefix="dfsweep-whole-run-")
    import torch

    print(f"model={a.model_type} ({a.timm_model}) image_size={a.image_size} batch={a.batch_size} steps={a.steps} "
          f"workers={a.workers} rounds={a.rounds} threads={torch.get_num_threads()} cpus={os.cpu_count()}")
    # untimed warm-up: OS file cache, the MLflow store's tables, the AMP probe (cached as after a first run)
    first = run_side("ours", a)
    for _ in range(2):  # a probe disturbed by other load is not cached: warm up again, as a user's next run would
        if a.amp != "auto" or (Path(a.tmp) / "amp_probe.json").exists():
            break
        first = run_side("ours", a)
    if a.bare_bf16 < 0:
        import sqlite3

        con = sqlite3.connect(Path(a.tmp) / "mlflow.db")
        amp = con.execute("select value from params where key='amp' order by rowid desc limit 1").fetchone()
        a.bare_bf16 = int(bool(amp and amp[0] == "bf16"))
        print(f"ours: train.use_amp={a.amp} chose {amp[0] if amp else '?'}; bare loop runs "
              f"{'bf16' if a.bare_bf16 else 'fp32'}, channels_last as ours")
    del first
    run_side("bare", a), run_side("timm", a)
    rows: dict[str, list[dict]] = {s: [] for s in SIDES}
    for r in range(a.rounds):
        order = SIDES[r % 3:] + SIDES[:r % 3]
        for side in order:
            rows[side].append(run_side(side, a))
    med = {s: {k: statistics.median(x[k] for x in rows[s]) for k in ("wall", "img_s", "to_result")} for s in SIDES}
    for s in SIDES:
        print(f"{s:>5}: wall {med[s]['wall']:6.1f}s  to result {med[s]['to_result']:6.1f}s  loop {med[s]['img_s']:6.1f} "
              f"img/s   (walls {[round(x['wall'], 1) for x in rows[s]]}, img/s {[round(x['img_s'], 1) for x in rows[s]]})")

    def paired(key: str, other: str) -> tuple[float, list[float]]:
        """Median of the per-round ratios ours/other: the sides of one round ran back to back, so load that
        drifts between rounds cancels; also the ratio of the medians, for comparison."""
        per_round = [o[key] / b[key] for o, b in zip(rows["ours"], rows[other])]
        return statistics.median(per_round), [round(x, 2) for x in per_round]

    for label, key, other, goal in (("loop img/s  ours/bare", "img_s", "bare", ">= 1.00"),
                                    ("whole run   ours/bare", "wall", "bare", "<= 1.10"),
                                    ("to result   ours/bare", "to_result", "bare", ""),
                                    ("loop img/s  ours/timm", "img_s", "timm", ">= 1.20"),
                                    ("whole run   ours/timm", "wall", "timm", "")):
        ratio, per_round = paired(key, other)
        of_medians = med["ours"][key] / med[other][key]
        print(f"{label}  {ratio:.2f}x{' wall' if key != 'img_s' else ''}  (median of rounds {per_round}; "
              f"ratio of medians {of_medians:.2f}){f'  goal {goal}' if goal else ''}")
    for label, key in (("whole run", "wall"), ("to result", "to_result")):
        extra = [o[key] - b[key] for o, b in zip(rows["ours"], rows["bare"])]
        print(f"{label}   ours-bare  {statistics.median(extra):+.1f}s a run (rounds {[round(x, 1) for x in extra]})"
              + (": what ours adds to a run of this length (MLflow, test split, report, files)" if key == "wall" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
