"""Does the detector generalise? Train on lfw_faceswap, score its own test split and StyleGAN2 faces.

    python bench/generalisation.py                        # all variants, about 15-25 min on 2 idle cores
    python bench/generalisation.py --variants plain face_crop --epochs 3

Every variant trains the same model (ImageNet EfficientNet-Lite0 from the offline weights package, 128 px,
bf16 autocast on CPU) on ../shared/data/lfw_faceswap (LFW photos vs classical face swaps) and reports:
  in_domain_auc   AUC on lfw_faceswap's own test split (15%, never seen in training or selection)
  gan_test_auc    AUC on hardfake_vs_real's test split (StyleGAN2 faces vs Unsplash portraits, 15%, never
                  used for selection)
  gan_val_auc_at_best  AUC on hardfake_vs_real's val split at the kept epoch (what `select_extra` selects on)
hardfake_vs_real is a data.extra_val set in every variant (so its val/test split is the same for all), but
only `select_extra` monitors it: early stopping and the kept checkpoint follow val_hardfake_vs_real_auc.
Variants: plain (whole photo resized), face_crop (one MTCNN crop, cached), face_crop_sbi (plus self-blended
pseudo-fakes), select_extra (face crop [+ SBI when available], selected on the GAN set's val split).
MLflow runs go to <out>/mlflow.db; the table to <out>/generalisation.csv.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import REPO_ROOT, known_keys, load_config  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data"
TRAIN_SET, GAN_SET = DATA / "lfw_faceswap", DATA / "hardfake_vs_real"
SBI = {"aug.self_blend_prob": 0.5}  # i12b's self-blended pseudo-fakes (augmentation.blending)
VARIANTS: dict[str, dict[str, object]] = {
    "plain": {},
    "face_crop": {"data.face_crop": "mtcnn"},
    "face_crop_sbi": {"data.face_crop": "mtcnn", **SBI},
    "select_extra": {"data.face_crop": "mtcnn", **SBI, "train.monitor": "val_hardfake_vs_real_auc"},
}


def base_overrides(a: argparse.Namespace, out: Path) -> dict[str, object]:
    return {
        "data.data_dir": str(TRAIN_SET), "data.extra_val": [f"hardfake_vs_real={GAN_SET}"],
        "data.image_size": a.image_size, "data.batch_size": 32, "data.num_workers": a.num_workers,
        "data.aug_policy": "basic", "model.model_type": "efficientnet_lite0", "model.pretrained": True,
        "optim.lr": a.lr, "optim.scheduler": "cosine", "optim.warmup_epochs": 0.5, "train.num_epochs": a.epochs,
        "train.freeze_strategy": a.freeze, "train.use_amp": True, "train.device": "cpu", "train.seed": a.seed,
        "train.early_stopping_patience": 0, "train.output_dir": str(out / "runs"),
        "tracking.tracking_uri": f"sqlite:///{(out / 'mlflow.db').resolve()}",
        "tracking.experiment_name": "bench-generalisation", "tracking.log_model": False,
    }


def available(overrides: dict[str, object]) -> bool:
    keys = set(known_keys())
    return all(k in keys for k in overrides)


def run_variant(name: str, overrides: dict[str, object]) -> dict[str, object]:
    from training.trainer import train

    t0 = time.perf_counter()
    result = train(load_config(overrides={**overrides, "tracking.run_name": f"gen-{name}"}))
    log = pd.read_csv(result.output_dir / "training_log.csv")
    from sklearn.metrics import roc_auc_score

    best = log.iloc[result.best_epoch]
    test_gan = pd.read_parquet(result.output_dir / "predictions" / "test_hardfake_vs_real.parquet")
    return {
        "variant": name, "monitor": load_config(overrides=overrides).train.monitor, "best_epoch": result.best_epoch,
        "in_domain_auc": result.test_metrics.get("test_auc"), "gan_test_auc": result.test_metrics.get(
            "test_hardfake_vs_real_auc"), "gan_val_auc_at_best": best.get("val_hardfake_vs_real_auc"),
        "in_domain_val_auc_at_best": best.get("val_auc"), "n_gan_test": len(test_gan),
        "gan_test_auc_check": roc_auc_score(test_gan["label"], test_gan["score"]),
        "minutes": (time.perf_counter() - t0) / 60, "run_id": result.run_id,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--freeze", default="full", help="train.freeze_strategy (full, frozen, partial:N, progressive)")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default="outputs/bench_generalisation")
    p.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every variant")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not TRAIN_SET.is_dir() or not GAN_SET.is_dir():
        print(f"error: needs {TRAIN_SET} and {GAN_SET}", file=sys.stderr)
        return 2
    from core.config import parse_set

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = {**base_overrides(a, out), **parse_set(a.sets)}
    rows = []
    for name in a.variants:
        overrides = {**base, **VARIANTS[name]}
        if not available(VARIANTS[name]):
            if name == "select_extra":  # without SBI: face crop selected on the GAN set
                overrides = {k: v for k, v in overrides.items() if k not in SBI}
            else:
                logging.warning("variant %s skipped: config keys %s do not exist here", name, list(VARIANTS[name]))
                continue
        rows.append(run_variant(name, overrides))
        pd.DataFrame(rows).to_csv(out / "generalisation.csv", index=False)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.float_format", "{:.4f}".format):
        print(table.drop(columns=["run_id", "gan_test_auc_check"]).to_string(index=False))
    print(f"goal: gan_test_auc >= 0.75 with in_domain_auc >= 0.99; table: {out / 'generalisation.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
