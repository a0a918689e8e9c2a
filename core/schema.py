"""The Config's schema: sections and fields, what each accepts, and how a bad value is reported. `Config` is
typed, validated and frozen; a field naming a registry entry (core.registry.FAMILIES) is checked against it; errors
name the key and where its value came from (`ConfigError`: exit status 2). core.config resolves a Config from YAML
and overrides (compose()) and re-exports these names: import them from core.config.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from core.errors import ConfigError
from core.registry import FAMILIES


# per-epoch validation metrics (evaluation.metrics.binary_metrics keys, plus the loss) a run can monitor
VAL_METRICS = ("auc", "ap", "eer", "accuracy", "precision", "recall", "f1", "tpr_at_fpr_1pct", "tpr_at_fpr_0.1pct",
               "log_loss", "brier", "ece", "mce", "ace", "loss")
EXTRA_VAL_METRICS = ("auc", "ap")  # logged per epoch for every data.extra_val set as val_<name>_<metric>
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_ARGUMENTS_LATER = "registry_arguments_later"  # validation context: validate() runs the families' parsers itself


def registered(key: str, value: str) -> str:
    """`value` if the registry of `key` (core.registry.FAMILIES) knows it; else a ValueError listing the names."""
    FAMILIES[key].check(value)
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
    section: ClassVar[str] = ""  # "model" for ModelConfig: its fields are "model.<name>" in FAMILIES

    @field_validator("*")
    @classmethod
    def _registered_name(cls, v: Any, info: ValidationInfo) -> Any:
        """A field that names a registry entry (FAMILIES has "<section>.<field>") must be a registered name; its
        arguments ("partial:0") are checked by the family's parser unless validate() checks them afterwards."""
        key = f"{cls.section}.{info.field_name}"
        if key not in FAMILIES:
            return v
        if (info.context or {}).get(_ARGUMENTS_LATER):
            return FAMILIES[key].check_name(v)  # reads the names, imports nothing
        return registered(key, v)


class DataConfig(_Section):
    section: ClassVar[str] = "data"
    data_dir: Optional[str] = None  # folder or CSV index; None -> the generated demo set (data/demo)
    image_size: int = Field(224, ge=16, le=1024)
    batch_size: int = Field(32, ge=1)
    num_workers: int = Field(2, ge=0)
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    group_by: Optional[str] = None  # "folder", or a regex whose first group is the group key in the file name
    balance: Literal["none", "pos_weight", "sampler"] = "none"
    aug_policy: str = "basic"  # a registered augmentation policy (augmentation.policies), e.g. randaugment:2:9
    center_crop: Optional[float] = Field(None, gt=0, le=1)  # keep this central fraction first (uncropped photos)
    extra_val: tuple[str, ...] = ()  # other data sets ("path" or "name=path") scored each epoch: val_<name>_auc
    face_crop: Literal["none", "mtcnn"] = "none"  # mtcnn: one cached MTCNN face crop per image (preprocessing.face_cache)
    face_margin: float = Field(0.3, ge=0, le=2)  # face crop square side = (1 + margin) * face box side
    face_size: int = Field(256, ge=16, le=1024)  # face crops are stored at this size, then resized to image_size
    # shift: the crop square is moved (shrunk if bigger than the image) inside the frame; reflect: never moved or
    # shrunk, outside parts mirrored, so a face has the same size in its crop whatever the photo's framing
    face_border: Literal["shift", "reflect"] = "shift"
    face_cache: Optional[str] = None  # None -> $DFSWEEP_FACE_CACHE or ~/.cache/dfsweep/faces
    max_samples_per_split: Optional[int] = Field(None, ge=1)  # debug/CI: cap each split, stratified
    eval_cache_mb: int = Field(1024, ge=0)  # val/test tensors kept in memory across epochs up to this size; 0 = off
    # video (model_type dual_stream): clips of sequence_length frames, every frame_skip-th frame
    sequence_length: int = Field(10, ge=1)
    frame_skip: int = Field(3, ge=1)
    lq_size: Optional[int] = Field(None, ge=16)  # None -> image_size // 2
    lq_jpeg_quality: tuple[int, int] = (30, 50)

    @field_validator("extra_val", mode="before")
    @classmethod
    def _extra_val_list(cls, v: Any) -> Any:
        return () if v is None else (v,) if isinstance(v, str) else v

    @field_validator("extra_val")
    @classmethod
    def _extra_val_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        names = [name for name, _ in extra_val_sets(v)]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two data sets are both named {dup[0]!r}; name them: name=path")
        return v

    @property
    def extra_val_sets(self) -> list[tuple[str, str]]:
        """[(name, path)] of data.extra_val."""
        return extra_val_sets(self.extra_val)

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(x < 0 for x in v) or abs(sum(v) - 1.0) > 1e-6 or v[0] == 0:
            raise ValueError("must be three non-negative fractions (train, val, test) summing to 1")
        return v


class ModelConfig(_Section):
    section: ClassVar[str] = "model"
    model_type: str = "efficientnet"  # a registered model preset (models.presets); its kind: image or video
    model_name: Optional[str] = None  # any timm model name; overrides the preset's backbone
    pretrained: bool = True
    pretrained_path: Optional[str] = None  # local weights file (state_dict / safetensors)
    head: str = "linear"  # a registered head (models.heads)
    embedding_dim: int = Field(512, ge=1)
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    use_attention: bool = False
    attention_type: Literal["se", "cbam"] = "se"
    arcface_scale: float = Field(30.0, gt=0)
    arcface_margin: float = Field(0.5, ge=0)
    channels_last: Optional[bool] = None  # None -> on for convolutional backbones
    # dual_stream (video): HQ and LQ backbones (preset or timm name), ConvLSTM sizes, stream fusion
    hq_backbone: str = "efficientnet_b4"
    lq_backbone: str = "efficientnet_b0"
    fusion: Literal["attention", "concat", "gated"] = "attention"
    lstm_channels: tuple[int, ...] = (256, 128)
    lstm_kernel: int = Field(3, ge=1)

    @field_validator("lstm_kernel")
    @classmethod
    def _odd_kernel(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("must be odd so the ConvLSTM keeps the feature-map size")
        return v

    @property
    def kind(self) -> str:
        """"image" or "video": what the preset declared (models.presets); data and model building dispatch on it."""
        return FAMILIES["model.model_type"].meta(self.model_type)["kind"]

    @property
    def is_video(self) -> bool:
        """The preset's kind is video (clips, not photos)."""
        return self.kind == "video"


class OptimConfig(_Section):
    section: ClassVar[str] = "optim"
    optimizer: str = "adamw"  # a registered optimizer (training.optim)
    lr: float = Field(1e-4, gt=0)
    backbone_lr: Optional[float] = Field(None, gt=0)  # None -> lr
    classifier_lr: Optional[float] = Field(None, gt=0)  # None -> lr
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    scheduler: str = "cosine"  # a registered scheduler (training.optim)
    warmup_epochs: float = Field(0.0, ge=0)
    min_lr: float = Field(1e-6, ge=0)
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    plateau_patience: int = Field(3, ge=0)
    gradient_accumulation: int = Field(1, ge=1)
    gradient_clip: float = Field(0.0, ge=0)  # max grad norm; 0 = off

    def resolved_lrs(self) -> tuple[float, float]:
        """(backbone LR, classifier LR)."""
        return self.backbone_lr or self.lr, self.classifier_lr or self.lr


class LossConfig(_Section):
    section: ClassVar[str] = "loss"
    loss_type: str = "bce"  # a registered loss (training.losses); it declares its num_outputs
    focal_alpha: float = Field(0.25, ge=-1, le=1)  # torchvision convention: <0 disables weighting
    focal_gamma: float = Field(2.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    # ce only: logits per image. Labels stay 0 real / 1 fake and P(fake) compares those two logits; more
    # classes only widen the head (seed 002's ArcFace head had 9: 268,288 trainable of 11,444,800).
    num_classes: int = Field(2, ge=2)

    @property
    def num_outputs(self) -> int:
        """Logits per image the loss expects (1: sigmoid; ce: num_classes), as the loss registered it."""
        n = FAMILIES["loss.loss_type"].meta(self.loss_type)["num_outputs"]
        return int(n(self) if callable(n) else n)


class AugConfig(_Section):
    section: ClassVar[str] = "aug"
    use_mixup: bool = False
    mixup_alpha: float = Field(0.2, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    mixup_prob: float = Field(1.0, ge=0, le=1)
    switch_prob: float = Field(0.5, ge=0, le=1)
    # pseudo-fakes (augmentation.pseudo_fakes): this fraction of real TRAINING images become fakes (label 1)
    self_blend_prob: float = Field(0.0, ge=0, le=1)  # SBI-style self-blended face; 0 = off
    self_blend_mask: Literal["auto", "landmarks", "ellipse"] = "auto"  # auto: landmark hull from the face-crop
    # cache with data.face_crop=mtcnn, else an ellipse; landmarks: detect with MTCNN (cached) even without face_crop
    artifact_fake_prob: float = Field(0.0, ge=0, le=1)  # whole-image up-sampling / spectral-grid trace -> fake
    artifact_prob: float = Field(0.0, ge=0, le=1)  # label-preserving up-sampling / double-JPEG / spectral trace
    # label-preserving random zoom of every training image by a factor in [1 - j, 1 + j] (A.Affine, mirrored
    # border), so the face's size in the crop is no cue; 0 = off
    scale_jitter: float = Field(0.0, ge=0, le=0.6)


class TrainConfig(_Section):
    section: ClassVar[str] = "train"
    num_epochs: int = Field(10, ge=1)
    freeze_strategy: str = "full"
    unfreeze_epoch: int = Field(1, ge=0)
    early_stopping_patience: int = Field(0, ge=0)  # 0 = off
    monitor: str = "val_auc"
    monitor_mode: Literal["max", "min"] = "max"
    use_amp: Union[Literal["auto"], bool] = "auto"  # auto: fp16 on CUDA; bf16 on CPU where a probe shows it faster
    use_ema: bool = False
    ema_decay: float = Field(0.9998, gt=0, lt=1)
    use_tta: bool = False
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    seed: int = 42
    deterministic: bool = True
    output_dir: str = "outputs"
    checkpoint_in: Optional[str] = None  # initial weights (model only), e.g. a stage-1 checkpoint
    checkpoint_out: Optional[str] = None  # copy of the best checkpoint written here at the end
    resume: Optional[str] = None  # a last.pt checkpoint or run folder; continues in the same MLflow run
    eval_only: bool = False
    checkpoint: Optional[str] = None  # with eval_only: a file or runs:/RUN_ID/path
    max_steps_per_epoch: Optional[int] = Field(None, ge=1)  # debug/bench: cap optimizer steps per epoch
    # frozen backbone + no augmentation/mixup: backbone features computed once, epochs train the head on them
    feature_cache: Literal["auto", "off"] = "auto"
    feature_cache_ram_mb: int = Field(2048, ge=0)  # larger caches are memory-mapped files in the run folder
    save_last: bool = True  # last.pt every epoch (what --resume continues from); sweeps turn it off
    # full: the evaluation dashboard and error gallery at the end of the run; metrics: the metrics files only
    # (sweep trials: the sweep builds the full report of its best trials; training.full_report any time later)
    report: Literal["full", "metrics"] = "full"

    @field_validator("use_amp", mode="before")
    @classmethod
    def _amp_setting(cls, v: Any) -> Any:
        low = str(v).strip().lower()
        if isinstance(v, bool) or low == "auto":
            return v if isinstance(v, bool) else "auto"
        if low in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return low in ("true", "yes", "on", "1")
        raise ValueError("must be true, false or auto")

    @field_validator("monitor")
    @classmethod
    def _monitor_is_val(cls, v: str) -> str:
        if not v.startswith("val_"):
            raise ValueError(f"{v!r} must be a validation metric such as val_auc, val_loss, val_f1")
        return v


class TrackingConfig(_Section):
    section: ClassVar[str] = "tracking"
    enabled: bool = True
    tracking_uri: Optional[str] = None  # None -> $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db
    experiment_name: str = "deepfake-detection"
    run_name: Optional[str] = None
    log_model: bool = True
    log_checkpoint: bool = True
    system_metrics: bool = True  # CPU/GPU/memory/disk/network every 10 s (psutil; pynvml for GPUs)
    tags: dict[str, str] = Field(default_factory=dict)


class Config(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    aug: AugConfig = AugConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _combinations(self) -> "Config":
        if self.model.head == "arcface" and self.aug.use_mixup:
            raise ValueError("model.head=arcface needs hard labels; turn aug.use_mixup off")
        if self.model.head == "arcface" and self.loss.loss_type != "ce":
            raise ValueError("model.head=arcface is a 2-class margin head; set loss.loss_type=ce")
        if self.loss.num_classes != 2 and self.loss.num_outputs == 1:
            raise ValueError(f"loss.num_classes={self.loss.num_classes} needs loss.loss_type=ce (the other losses "
                             "use one logit)")
        if self.model.kind == "video" and self.aug.use_mixup:
            raise ValueError("model.model_type=dual_stream trains on clips; mixup is for images: turn aug.use_mixup off")
        if self.data.face_crop != "none" and self.data.center_crop is not None:
            raise ValueError("data.face_crop and data.center_crop both crop; set data.center_crop=null with face_crop")
        if self.data.face_crop != "none" and self.model.kind == "video":
            raise ValueError("data.face_crop is for photos; dual_stream reads face crops from "
                             "preprocessing.extract_faces: set data.face_crop=none")
        if self.aug.self_blend_prob + self.aug.artifact_fake_prob > 1:
            raise ValueError("aug.self_blend_prob + aug.artifact_fake_prob is the share of real images made fake: "
                             "it must be <= 1")
        if self.aug.artifact_prob > 0 and self.aug.artifact_fake_prob > 0:
            raise ValueError("aug.artifact_prob puts artefacts on both classes, aug.artifact_fake_prob makes them "
                             "mean fake: set one of them to 0")
        if self.model.kind == "video" and (self.aug.self_blend_prob or self.aug.artifact_fake_prob or self.aug.artifact_prob):
            raise ValueError("aug.self_blend_prob / artifact_prob / artifact_fake_prob are for photos; "
                             "dual_stream trains on clips: set them to 0")
        if self.data.extra_val and self.model.kind == "video":
            raise ValueError("data.extra_val scores photo data sets each epoch; dual_stream trains on clips")
        valid = monitor_names(self.data)
        if self.train.monitor not in valid:
            import difflib

            close = difflib.get_close_matches(self.train.monitor, valid, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            extra = ", ".join(v for v in valid if v.removeprefix("val_") not in VAL_METRICS)
            raise ValueError(f"train.monitor={self.train.monitor!r} is not logged by this run; {hint}choose val_auc, "
                             f"val_loss, val_ap, val_f1, ... {extra or '(data.extra_val adds val_<name>_auc and val_extra_mean_auc)'}")
        if self.train.eval_only and not self.train.checkpoint:
            raise ValueError("train.eval_only needs train.checkpoint (--checkpoint FILE or runs:/RUN_ID/path)")
        return self

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, as logged to MLflow params."""
        return flatten(self.model_dump(mode="json"))

    def with_overrides(self, overrides: dict[str, Any], source: str = "override") -> "Config":
        """A new Config with dotted-key overrides applied and validated again."""
        data = self.model_dump(mode="json")
        for key, value in overrides.items():
            set_dotted(data, key, value, source)
        return validate(data, source)


# ---------------------------------------------------------------------------- extra validation sets
def extra_val_name(path: str) -> str:
    """'hardfake_vs_real' for ../shared/data/hardfake_vs_real, 'faces' for faces.csv (lower case, [a-z0-9_])."""
    p = Path(path.rstrip("/\\"))
    base = p.stem if p.suffix.lower() == ".csv" else p.name
    name = re.sub(r"[^a-z0-9]+", "_", base.lower()).strip("_")
    return name if name and name[0].isalpha() else f"set_{name or 'data'}"


def extra_val_sets(entries: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """[(name, path)] from data.extra_val entries "path" or "name=path"."""
    out = []
    for entry in entries:
        name, sep, path = entry.partition("=")
        if sep and _NAME_RE.match(name.strip()) and path.strip():
            out.append((name.strip(), path.strip()))
        elif sep and not path.strip():
            raise ValueError(f"{entry!r} has no path after '='; use name=path")
        else:
            out.append((extra_val_name(entry), entry))
    return out


def monitor_names(data: DataConfig) -> list[str]:
    """Every per-epoch metric a run with this data config logs and can monitor (early stopping, best checkpoint)."""
    names = [f"val_{m}" for m in VAL_METRICS]
    sets = extra_val_sets(data.extra_val)
    names += [f"val_{n}_{m}" for n, _ in sets for m in EXTRA_VAL_METRICS]
    if sets:
        names += [f"val_extra_mean_{m}" for m in EXTRA_VAL_METRICS] + [f"val_mean_{m}" for m in EXTRA_VAL_METRICS]
    return names


# ---------------------------------------------------------------------------- building
def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "tags":
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def known_keys() -> list[str]:
    return sorted(flatten(Config().model_dump(mode="json")))


def set_dotted(data: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Set data[a][b] for key "a.b"; an unknown key raises ConfigError naming the closest key."""
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in Config.model_fields or (
        parts[1] not in Config.model_fields[parts[0]].annotation.model_fields  # type: ignore[union-attr]
    ):
        import difflib

        close = difflib.get_close_matches(key, known_keys(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key '{key}' in {source}{hint}")
    data.setdefault(parts[0], {})[parts[1]] = value


def validate(data: dict[str, Any], source: str, origins: dict[str, str] | None = None) -> Config:
    """Config from nested data; a bad value raises ConfigError naming the key and where it came from (`origins[key]`
    when known, else `source`). Names are read without importing the families' modules (core.registry); arguments
    ("partial:3"), whose parser imports torch or albumentations, are checked last, so other errors come fast."""
    origins = origins or {}
    try:
        cfg = Config.model_validate(data, context={_ARGUMENTS_LATER: True})
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"] if not isinstance(p, int)) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(_invalid(key, msg, err.get("input", {}), origins.get(key, source))) from None
    for key, registry in FAMILIES.items():
        if registry.takes_arguments:
            section, field = key.split(".")
            value = getattr(getattr(cfg, section), field)
            try:
                registry.check(value)
            except ValueError as e:
                raise ConfigError(_invalid(key, str(e), value, origins.get(key, source))) from None
    return cfg


def _invalid(key: str, msg: str, value: Any, where: str) -> str:
    got = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"invalid value for '{key}' from {where}: {msg}{got}"
