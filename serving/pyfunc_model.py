"""The image model: 1..K trained detectors, their preprocessing, ensemble weights and temperatures as
one MLflow pyfunc (models-from-code, no pickle).

    info = log_image_model([member_from_run(rid)], name="image_model")     # inside an active run
    m = mlflow.pyfunc.load_model("models:/deepfake-detector@champion")
    m.predict(pd.DataFrame({"path": ["a.jpg", "b.png"]}))   # -> DataFrame path, fake_prob (under DFSWEEP_DATA_ROOTS)
    m.predict(pd.DataFrame({"image": [base64_of_jpeg]}))    # -> DataFrame fake_prob
    m.predict(uint8_images_nhwc)                             # or float32 (N,3,H,W) RGB in [0, 1] -> fake_prob

Each member resizes/normalises with its own eval transform (its image size, mean, std) and gives a
logit z_k; `combine_scores` turns the (N, K) logits into P(fake) with the ensemble's rule. The
signature declares outputs and params only: one input schema cannot hold both a path column and
an image array, and a missing/unreadable path is reported by `predict` itself as a 400-class error.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import mlflow
import numpy as np
import pandas as pd
import torch

from evaluation.calibration import sigmoid
from serving.image_inputs import (  # noqa: F401  (bad_input, decode: part of this module's API)
    DecodedPaths, bad_input, decode, decoded_batches, default_workers, parse_request,
)
from models.outputs import fake_logit
from core.config import REPO_ROOT

log = logging.getLogger(__name__)

COMBINE_RULES = ("prob", "logit", "vote", "rank")  # weighted P(fake) | weighted logit | votes | ECDF ranks
# experiments too: core.config reads experiments/configs/default.yaml next to the code it was imported from, and
# loading the model puts this copy first on sys.path (MLflow re-imports code_paths modules from it)
CODE_PACKAGES = ("core", "augmentation", "preprocessing", "dataio", "models", "evaluation", "training", "experiments",
                 "serving")
ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")
SPEC_FILE = "ensemble.json"
REQUIREMENTS = ("mlflow", "torch", "torchvision", "timm", "albumentations", "opencv-python-headless", "pillow",
                "numpy", "pandas", "scipy", "scikit-learn", "pydantic", "pyyaml")
MAX_REFERENCE = 2001  # validation quantiles kept per member for rank averaging


@dataclass
class MemberSpec:
    """One member network: a checkpoint file ({"model": state_dict, "config": Config dict}) + its calibration."""

    name: str
    checkpoint: str
    temperature: float = 1.0
    threshold: float = 0.5  # P(fake) at or above which this member votes fake (rule "vote")
    reference: list[float] | None = None  # sorted validation logits / T (rule "rank")


# ------------------------------------------------------------------------------------ the maths
def reduce_reference(values: Sequence[float]) -> list[float]:
    """Sorted reference values, thinned to at most MAX_REFERENCE quantiles."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if v.size > MAX_REFERENCE:
        v = np.quantile(v, np.linspace(0.0, 1.0, MAX_REFERENCE))
    return v.tolist()


def combine_scores(logits: np.ndarray, rule: str, weights: Sequence[float], temperatures: Sequence[float],
                   thresholds: Sequence[float] | None = None,
                   references: Sequence[Sequence[float] | None] | None = None) -> np.ndarray:
    """(N, K) member logits -> ensemble P(fake) (N,). Member k's calibrated logit is z_k / T_k.

    prob: sum_k w_k sigmoid(z_k/T_k); logit: sigmoid(sum_k w_k z_k/T_k); vote: sum_k w_k [p_k >= thr_k];
    rank: sum_k w_k ECDF_k(z_k/T_k) against member k's validation reference (mid-rank for ties).
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != len(weights) or len(temperatures) != len(weights):
        raise ValueError(f"logits {z.shape} do not match {len(weights)} weights / {len(temperatures)} temperatures")
    w = np.asarray(weights, dtype=np.float64)
    zc = z / np.asarray(temperatures, dtype=np.float64)
    if rule == "prob":
        return sigmoid(zc) @ w
    if rule == "logit":
        return sigmoid(zc @ w)
    if rule == "vote":
        thr = np.asarray(thresholds if thresholds is not None else [0.5] * len(w), dtype=np.float64)
        return (sigmoid(zc) >= thr).astype(np.float64) @ w
    if rule == "rank":
        if references is None or any(r is None or len(r) == 0 for r in references):
            raise ValueError("rule 'rank' needs a validation reference per member")
        ranks = np.empty_like(zc)
        for k, ref in enumerate(references):
            r = np.asarray(ref, dtype=np.float64)
            ranks[:, k] = (np.searchsorted(r, zc[:, k], "left") + np.searchsorted(r, zc[:, k], "right")) / (2 * r.size)
        return ranks @ w
    raise ValueError(f"unknown combine rule {rule!r}; valid: {', '.join(COMBINE_RULES)}")


# ------------------------------------------------------------------------------------ the model
class FaceCropFirst:
    """An albumentations-style transform (`t(image=x)["image"]`) that face-crops the image before `then`."""

    def __init__(self, crop: Any, then: Any) -> None:
        self.crop, self.then = crop, then

    def __call__(self, *, image: np.ndarray) -> dict[str, Any]:
        return self.then(image=self.crop(image))


class _Member:
    """A rebuilt detector (channels_last for conv nets) with its eval transform and test-time augmentation flag."""

    def __init__(self, checkpoint_file: str, device: torch.device) -> None:
        from augmentation.policies import build_transform
        from dataio.loaders import decode_size
        from models.build import load_trained_model

        trained = load_trained_model(checkpoint_file, device)
        cfg, self.net, self.channels_last = trained.config, trained.model, trained.channels_last
        dc = self.net.data_config
        self.transform = build_transform("none", cfg.data.image_size, dc["mean"], dc["std"], train=False,
                                         center_crop=cfg.data.center_crop)
        self.tta, self.device = cfg.train.use_tta, device
        self.size = decode_size(cfg.data.image_size, cfg.data.center_crop)
        d = cfg.data
        if d.face_crop == "mtcnn":  # the run's MTCNN face crop first, cut from the full-resolution image
            from preprocessing.face_cache import FaceCropper, FaceCropSettings

            settings = FaceCropSettings(margin=d.face_margin, size=d.face_size, border=d.face_border)
            self.transform = FaceCropFirst(FaceCropper(settings), self.transform)
            self.size = None
        # members with equal preprocessing share one decoded, transformed batch
        self.prep_key = (cfg.data.image_size, tuple(dc["mean"]), tuple(dc["std"]), cfg.data.center_crop,
                         d.face_crop, d.face_margin, d.face_size, d.face_border)

    def logits(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.logits_of(torch.stack([self.transform(image=im)["image"] for im in images]))

    @torch.inference_mode()
    def logits_of(self, x: torch.Tensor) -> np.ndarray:
        """Logits of "fake" for a transformed batch (B,3,H,W)."""
        from evaluation.inference import to_device

        x = to_device(x, self.device, self.channels_last)
        out = self.net(x).float()
        if self.tta:  # as evaluation.inference.predict: mean of original and flipped logits
            out = (out + self.net(torch.flip(x, dims=[3])).float()) / 2
        return fake_logit(out).cpu().numpy().astype(np.float64)


class ImageEnsembleModel(mlflow.pyfunc.PythonModel):
    """pyfunc: image paths or arrays -> P(fake) from 1..K member detectors combined by `rule`."""

    def load_context(self, context) -> None:
        spec = json.loads(Path(context.artifacts["ensemble_spec"]).read_text())
        files = [context.artifacts[m["artifact"]] for m in spec["members"]]
        self.setup(spec, files, (context.model_config or {}).get("device", "auto"))

    def setup(self, spec: dict[str, Any], checkpoint_files: Sequence[str],
              device: str = "auto") -> "ImageEnsembleModel":
        """Build the members from a spec (as written to ensemble.json) and their checkpoint files."""
        self.spec = spec
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
        self.members = [_Member(f, dev) for f in checkpoint_files]
        return self

    def _path_logits(self, paths: list[str | bytes], batch: int, workers: int,
                     client_paths: list[str] | None = None) -> np.ndarray:
        """(N, K) member logits; files (or encoded bytes) are decoded (JPEG draft at each member's size, as in training) and
        transformed in `workers` threads while the members score the previous batch."""
        from dataio.loaders import retained_heap

        keys = list(dict.fromkeys(m.prep_key for m in self.members))
        first = {key: next(m for m in self.members if m.prep_key == key) for key in keys}
        loader = decoded_batches(
            DecodedPaths(paths, [(first[key].transform, first[key].size) for key in keys], client_paths), batch, workers)
        logits = np.zeros((len(paths), len(self.members)))
        start = 0
        with retained_heap():  # each batch's activations without fresh page faults (glibc)
            for groups in loader:
                if isinstance(groups, str):
                    raise bad_input(groups)
                if self.members[0].device.type == "cuda":  # page-locked: the copy to the GPU can be asynchronous
                    groups = [g.pin_memory() for g in groups]
                for k, member in enumerate(self.members):
                    logits[start:start + len(groups[0]), k] = member.logits_of(groups[keys.index(member.prep_key)])
                start += len(groups[0])
        return logits

    @classmethod
    def from_members(cls, members: Sequence[MemberSpec], weights: Sequence[float] | None = None,
                     rule: str = "prob", device: str = "auto") -> "ImageEnsembleModel":
        """An in-process model (no MLflow logging), e.g. for `serving.predict --run/--checkpoint`."""
        spec = make_spec(members, weights, rule)
        return cls().setup(spec, [m.checkpoint for m in members], device)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """DataFrame `path` -> DataFrame path, fake_prob; `image` (base64) or an image array -> DataFrame fake_prob.

        The hint says DataFrame because MLflow validates (and rejects arrays for) any other hint; arrays,
        lists of paths and {"path": [...]} dicts are accepted too. Paths must lie under DFSWEEP_DATA_ROOTS and
        requests fit the size limits (serving.image_inputs)."""
        req = parse_request(model_input)
        batch = max(1, int((params or {}).get("batch_size") or 32))
        n = len(req)
        if req.arrays is None:
            workers = int((params or {}).get("num_workers", -1))
            workers = default_workers(n, batch) if workers < 0 else min(workers, os.cpu_count() or 1)  # client-set
            logits = self._path_logits(req.sources, batch, workers, req.paths)
        else:
            logits = np.zeros((n, len(self.members)))
            for start in range(0, n, batch):
                for k, member in enumerate(self.members):
                    logits[start:start + batch, k] = member.logits(list(req.arrays[start:start + batch]))
        s = self.spec
        prob = combine_scores(logits, s["rule"], s["weights"], [m["temperature"] for m in s["members"]],
                              [m["threshold"] for m in s["members"]], [m.get("reference") for m in s["members"]])
        out = pd.DataFrame({"fake_prob": np.clip(prob, 0.0, 1.0)})
        if req.paths is not None:
            out.insert(0, "path", req.paths)
        return out


# ------------------------------------------------------------------------------------ logging
def make_spec(members: Sequence[MemberSpec], weights: Sequence[float] | None, rule: str) -> dict[str, Any]:
    """The JSON-able description of an ensemble (weights default to equal; must be >= 0, sum 1)."""
    if not members:
        raise ValueError("an image model needs at least one member")
    if rule not in COMBINE_RULES:
        raise ValueError(f"unknown combine rule {rule!r}; valid: {', '.join(COMBINE_RULES)}")
    w = np.full(len(members), 1.0 / len(members)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(members),) or (w < 0).any() or abs(w.sum() - 1.0) > 1e-6:
        raise ValueError(f"weights must be {len(members)} non-negative numbers summing to 1; got {w.tolist()}")
    if rule == "rank" and any(m.reference is None for m in members):
        raise ValueError("rule 'rank' needs each member's validation reference")
    return {"format_version": 1, "rule": rule, "weights": w.tolist(),
            "members": [{**{k: v for k, v in asdict(m).items() if k != "checkpoint"}, "artifact": f"member_{i}"}
                        for i, m in enumerate(members)]}


def save_member(state_dict: dict[str, torch.Tensor], config: dict[str, Any], path: str | Path) -> Path:
    """Write a member checkpoint: weights + the Config dict that rebuilds the network (atomic)."""
    from core.checkpoints import atomic_save

    return atomic_save({"model": state_dict, "config": config}, path)


def member_from_checkpoint(ref: str | Path, *, name: str | None = None, **calibration: Any) -> MemberSpec:
    """A member from a checkpoint file, run folder or runs:/RUN_ID/path (downloaded when remote)."""
    from core.checkpoints import resolve_checkpoint_path

    path = resolve_checkpoint_path(ref)
    return MemberSpec(name=name or Path(path).stem, checkpoint=str(path), **calibration)


def member_from_run(run_id: str, **calibration: Any) -> MemberSpec:
    """A run's best checkpoint: the checkpoints/best.pt artifact, else best.pt in its local run_dir.

    Unless given, the temperature is the one the run fitted on its validation set (its
    evaluation/calibration.json), so predictions from a run are calibrated as its report says."""
    from core.checkpoints import CheckpointError

    if "temperature" not in calibration:
        calibration["temperature"] = run_temperature(run_id)

    try:
        return member_from_checkpoint(f"runs:/{run_id}/checkpoints/best.pt", name=run_id, **calibration)
    except CheckpointError as first:
        run_dir = mlflow.get_run(run_id).data.tags.get("run_dir")
        if run_dir and (Path(run_dir) / "best.pt").is_file():
            return member_from_checkpoint(Path(run_dir) / "best.pt", name=run_id, **calibration)
        raise CheckpointError(f"run {run_id} has no checkpoint (no checkpoints/best.pt artifact, no run_dir/best.pt): "
                              f"{first}") from None


def run_temperature(run_id: str) -> float:
    """The temperature a run fitted on val: evaluation/calibration.json (metric `temperature` in runs logged
    before it moved there); 1.0 when the run has neither (no evaluation, e.g. one-class val)."""
    metric = mlflow.get_run(run_id).data.metrics.get("temperature")
    if metric is not None:
        return float(metric)
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/evaluation/calibration.json")
    except Exception:  # no such artifact
        return 1.0
    return float(json.loads(text).get("temperature", 1.0))


def pip_requirements() -> list[str]:
    """Pinned requirements of the installed stack (explicit: MLflow's inference is slow and incomplete)."""
    out = []
    for dist in REQUIREMENTS:
        try:
            out.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            continue
    return out


def signature() -> "mlflow.models.ModelSignature":
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(outputs=Schema([ColSpec("string", "path", required=False), ColSpec("double", "fake_prob")]),
                          params=ParamSchema([ParamSpec("batch_size", "long", 32),
                                              ParamSpec("num_workers", "long", -1)]))  # -1: default_workers


def log_image_model(members: Sequence[MemberSpec], weights: Sequence[float] | None = None, name: str = "image_model",
                    *, rule: str = "prob", example_path: str | None = None, tags: dict[str, str] | None = None
                    ) -> "mlflow.models.model.ModelInfo":
    """Log the members as one pyfunc model into the active run; tags the run `image_model_uri`."""
    from core.checkpoints import load_checkpoint

    if mlflow.active_run() is None:
        raise RuntimeError("log_image_model needs an active MLflow run")
    spec = make_spec(members, weights, rule)
    with tempfile.TemporaryDirectory(prefix="image_model-") as tmp:
        artifacts = {"ensemble_spec": str(Path(tmp) / SPEC_FILE)}
        Path(artifacts["ensemble_spec"]).write_text(json.dumps(spec))
        for i, m in enumerate(members):  # slim copies: weights + config only (no optimizer state)
            ckpt = load_checkpoint(m.checkpoint)
            if "config" not in ckpt:
                raise ValueError(f"checkpoint {m.checkpoint} has no 'config'; cannot rebuild the network")
            artifacts[f"member_{i}"] = str(save_member(ckpt["model"], ckpt["config"], Path(tmp) / f"member_{i}.pt"))
        if example_path and Path(example_path).is_file():  # the bytes route: paths need the server's data roots
            example: Any = pd.DataFrame({"image": [base64.b64encode(Path(example_path).read_bytes()).decode()]})
        else:
            example = np.zeros((1, 32, 32, 3), dtype=np.uint8)
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(ENTRY_FILE), artifacts=artifacts,
            code_paths=[str(REPO_ROOT / p) for p in CODE_PACKAGES], model_config={"device": "auto"},
            signature=signature(), input_example=example, pip_requirements=pip_requirements(),
            tags={"members": ",".join(m.name for m in members)[:4000], "rule": rule, **(tags or {})},
        )
    mlflow.set_tag("image_model_uri", info.model_uri)
    log.info("event=image_model_logged uri=%s members=%d rule=%s", info.model_uri, len(members), rule)
    return info
