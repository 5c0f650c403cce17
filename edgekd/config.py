"""The pipeline YAML as validated, typed objects.

Every section is a dataclass; `load_pipeline` walks the YAML against the dataclass fields, so an
unknown key names itself and the closest valid key, a wrong type names the expected type, and
impossible values (negative temperature, alpha outside [0, 1], ...) are refused before anything runs.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from edgekd.errors import ConfigError

# The folder of the pipeline file being parsed: model sections remember it (ModelConfig.base_dir).
_PIPELINE_DIR: contextvars.ContextVar[str] = contextvars.ContextVar("edgekd_pipeline_dir", default="")


@dataclass
class DataConfig:
    dataset: Literal["fashion-mnist", "mnist", "digits", "npz", "image-folder"] = "digits"
    path: Optional[str] = None  # folder of idx files, .npz file, or image folder; None -> the dataset's default
    val_fraction: float = 0.1  # carved from the training split with a fixed seed
    test_fraction: float = 0.2  # only for datasets without their own test split (digits, npz without x_test, folders)
    train_limit: Optional[int] = None  # use only the first N training samples (after the fixed shuffle)
    # [H, W]: every image is resized to it when the dataset is read (image folders: at decode time, bilinear);
    # None -> as stored (an image folder then needs one size throughout)
    image_size: Optional[list[int]] = None
    # 1 (grayscale), 3 (RGB) or 4 (RGBA): image folders convert each image to it at decode time, other datasets
    # repeat a single channel (e.g. 3 for a teacher that takes RGB). None -> as stored (an image folder: 1 when
    # every image is grayscale, else RGB)
    channels: Optional[int] = None
    # class names, one per line in class-index order, for datasets without their own (npz, idx);
    # image folders take theirs from the sub-folder names
    labels_file: Optional[str] = None

    def validate(self, where: str) -> None:
        _check(0.0 < self.val_fraction < 0.5, where, "val_fraction", "must be in (0, 0.5)")
        _check(0.0 < self.test_fraction < 0.5, where, "test_fraction", "must be in (0, 0.5)")
        _check(self.train_limit is None or self.train_limit > 0, where, "train_limit", "must be positive")
        _check(self.image_size is None or (len(self.image_size) == 2 and all(v >= 1 for v in self.image_size)),
               where, "image_size", "must be [height, width] with both >= 1")
        _check(self.channels is None or self.channels in (1, 3, 4), where, "channels", "must be 1, 3 or 4")
        _check(self.labels_file is None or self.dataset != "image-folder", where, "labels_file",
               "an image folder's class names are its sub-folder names; remove labels_file")

    def known_channels(self) -> Optional[int]:
        """The images' channel count when the config alone fixes it (None: known once the data is read)."""
        if self.channels is not None:
            return self.channels
        return 1 if self.dataset in ("fashion-mnist", "mnist", "digits") else None


@dataclass
class Normalization:
    """(x - mean) / std on [0, 1] pixels, baked into the model's first layer. A number applies to every channel;
    a list gives one value per channel (RGB order for colour images)."""

    mean: float | list[float] = 0.0
    std: float | list[float] = 1.0

    def validate(self, where: str) -> None:
        for key in ("mean", "std"):
            _check(len(self.values(key)) > 0, where, key, "give a number or a non-empty list (one value per channel)")
        _check(all(v > 0 for v in self.values("std")), where, "std", "must be > 0")

    def values(self, key: str) -> list[float]:
        """mean or std as a list: one value per channel, or a single value for every channel."""
        v = getattr(self, key)
        return [float(x) for x in v] if isinstance(v, list) else [float(v)]

    def check_channels(self, channels: int, where: str) -> None:
        """A per-channel list must have one value per image channel (a single value applies to all)."""
        for key in ("mean", "std"):
            n = len(self.values(key))
            _check(n in (1, channels), where, key,
                   f"{n} values for {channels}-channel images; give one value, or one per channel")


@dataclass
class RandomResizedCrop:
    """A random crop of `scale` of the image area with aspect ratio (width / height) in `ratio`, resized back to
    the image size."""

    scale: list[float] = field(default_factory=lambda: [0.6, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])

    def validate(self, where: str) -> None:
        _check(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1, where, "scale",
               "must be [min, max] with 0 < min <= max <= 1 (fractions of the image area)")
        _check(len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1], where, "ratio",
               "must be [min, max] with 0 < min <= max (width / height)")


@dataclass
class AugmentConfig:
    """Training-time augmentation, applied per batch on tensors in the training loop, seeded from the pipeline seed.
    With it on, cached teacher outputs are not used: the teacher sees every augmented batch."""

    random_resized_crop: Optional[RandomResizedCrop] = None
    horizontal_flip: bool = False  # each image mirrored left-right with probability 1/2

    def active(self) -> bool:
        return self.random_resized_crop is not None or self.horizontal_flip


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    # e.g. {random_resized_crop: {scale: [0.6, 1.0]}, horizontal_flip: true}; None -> none (the default)
    augment: Optional[AugmentConfig] = None
    # After the last epoch, re-estimate BatchNorm running statistics on training images (edgekd.distill.batchnorm:
    # e.g. torchvision's MNASNet, momentum 0.0003, otherwise predicts one class in eval mode after a short run).
    # auto: kept only if they score higher on the validation split; always: kept; never: not computed.
    recalibrate_batchnorm: Literal["auto", "always", "never"] = "auto"

    def validate(self, where: str) -> None:
        _check(self.epochs >= 1, where, "epochs", "must be >= 1")
        _check(self.batch_size >= 1, where, "batch_size", "must be >= 1")
        _check(self.lr > 0, where, "lr", "must be > 0")
        _check(self.weight_decay >= 0, where, "weight_decay", "must be >= 0")


@dataclass
class ModelConfig:
    arch: str = "cnn-small"
    args: dict = field(default_factory=dict)  # keyword arguments of the architecture builder
    normalize: Normalization = field(default_factory=Normalization)  # baked into the model's first layer
    # The pipeline file's folder: relative model files (arch FILE.py:NAME, exported, onnx) resolve against it.
    base_dir: str = field(default="", compare=False, metadata={"internal": True})

    def __post_init__(self) -> None:
        self.base_dir = self.base_dir or _PIPELINE_DIR.get()

    def validate(self, where: str) -> None:
        # Syntax and built-in args here; files, modules and libraries by _check_model_sources (PipelineConfig).
        from edgekd.models.sources import source_of
        from edgekd.models.zoo import check_args

        try:
            src = source_of(self)
        except ConfigError as exc:
            raise ConfigError(f"{where}.arch: {exc}") from None
        problem = check_args(self.arch, self.args) if src.kind == "builtin" else None
        if problem:
            raise ConfigError(f"{where}.args: {problem}")


@dataclass
class TeacherConfig(ModelConfig):
    arch: str = "cnn-teacher"
    checkpoint: Optional[str] = None  # a state dict for `arch`; None -> train one here (needs `train`)
    allow_pickle: bool = False  # load a pickled full checkpoint (can execute code); only for files you trust
    train: Optional[TrainConfig] = None
    # Teacher input adapter: the [H, W] this teacher expects; each batch is resized (bilinear) for it. Its own
    # normalization is its `normalize` (baked into the model), so teacher and student may differ in both.
    input_size: Optional[list[int]] = None
    name: Optional[str] = None  # with `teachers:`, the teacher's name in the report and in feature paths NAME/PATH
    weight: float = 1.0  # with `teachers:`, its weight in the averaged soft targets (normalized over teachers)
    # A complete teacher from a file instead of arch + checkpoint/train: a torch.export program (torch.export.save),
    # or an ONNX model run in onnxruntime (logit KD only: it exposes no intermediate features).
    exported: Optional[str] = None
    onnx: Optional[str] = None

    def validate(self, where: str) -> None:
        given = [k for k in ("checkpoint", "train", "exported", "onnx") if getattr(self, k) is not None]
        if len(given) > 1 and ("exported" in given or "onnx" in given):
            raise ConfigError(f"{where}: give one of 'checkpoint', 'train', 'exported' or 'onnx', not "
                              f"{' and '.join(repr(k) for k in given)}")
        super().validate(where)
        _check(self.input_size is None or (len(self.input_size) == 2 and all(v >= 1 for v in self.input_size)),
               where, "input_size", "must be [height, width] with both >= 1")
        _check(self.weight >= 0, where, "weight", "must be >= 0")


# Distillation methods. Each is a section with a `weight`; a bare number is its weight (`kd: 1.0`). The student's
# loss is (1 - alpha) * CE(labels) + alpha * sum over methods of weight * that method's loss.

@dataclass
class KDMethod:
    """Logit KD (Hinton et al. 2015): T^2 * KL(teacher || student) at distill.temperature."""

    weight: float = 1.0

    def validate(self, where: str) -> None:
        _check(self.weight >= 0, where, "weight", "must be >= 0")


def _check_pairs(pairs: list, where: str) -> None:
    _check(len(pairs) > 0, where, "pairs", "needs at least one [teacher module path, student module path]")
    for i, pair in enumerate(pairs):
        _check(len(pair) == 2, where, f"pairs[{i}]", f"must be [teacher module path, student module path], got {pair}")


@dataclass
class FeatureMethod:
    """FitNets hints: MSE between teacher and (1x1-conv adapted, resized) student feature maps, per layer pair."""

    weight: float = 1.0
    pairs: list[list[str]] = field(default_factory=list)  # [[teacher path, student path], ...], e.g. 1.features.3

    def validate(self, where: str) -> None:
        _check(self.weight >= 0, where, "weight", "must be >= 0")
        _check_pairs(self.pairs, where)


@dataclass
class AttentionMethod:
    """Attention transfer (Zagoruyko & Komodakis 2017) on layer pairs; weight plays the paper's beta."""

    weight: float = 1000.0
    pairs: list[list[str]] = field(default_factory=list)
    p: float = 2.0  # attention map = sum over channels of |A|^p

    def validate(self, where: str) -> None:
        _check(self.weight >= 0, where, "weight", "must be >= 0")
        _check(self.p > 0, where, "p", "must be > 0")
        _check_pairs(self.pairs, where)


@dataclass
class RKDMethod:
    """Relational KD (Park et al. 2019): distance- and angle-wise structure of a batch's embeddings."""

    weight: float = 1.0
    distance: float = 25.0  # lambda_D of the paper
    angle: float = 50.0  # lambda_A of the paper
    # penultimate: the input of each model's last Linear layer; logits: the outputs (teacher cache stays usable)
    embedding: Literal["penultimate", "logits"] = "penultimate"
    pair: Optional[list[str]] = None  # [teacher path, student path]: these modules' outputs instead of `embedding`

    def validate(self, where: str) -> None:
        for name in ("weight", "distance", "angle"):
            _check(getattr(self, name) >= 0, where, name, "must be >= 0")
        _check(self.pair is None or len(self.pair) == 2, where, "pair",
               "must be [teacher module path, student module path]")


@dataclass
class MethodsConfig:
    kd: Optional[KDMethod] = None
    feature: Optional[FeatureMethod] = None
    attention: Optional[AttentionMethod] = None
    rkd: Optional[RKDMethod] = None

    def validate(self, where: str) -> None:
        if not self.chosen():
            raise ConfigError(f"{where}: choose at least one method: kd, feature, attention, rkd")

    def chosen(self) -> dict[str, Any]:
        """The selected methods by name, in a fixed order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass
class DistillConfig(TrainConfig):
    alpha: float = 0.9  # weight of the teacher terms (`methods`); (1 - alpha) weighs the label cross-entropy
    temperature: float = 4.0
    temperature_schedule: Literal["constant", "linear", "cosine"] = "constant"
    temperature_end: Optional[float] = None  # final temperature for linear/cosine decay
    # teacher logits computed once upstream and reused; ignored (the log says so) when `augment` is on
    cache_teacher_outputs: bool = True
    # which teacher signals the student learns from, with weights; default: logit KD only
    methods: MethodsConfig = field(default_factory=lambda: MethodsConfig(kd=KDMethod()))

    def validate(self, where: str) -> None:
        super().validate(where)
        _check(0.0 <= self.alpha <= 1.0, where, "alpha", "must be in [0, 1]")
        _check(self.temperature > 0, where, "temperature", "must be > 0")
        if self.temperature_schedule != "constant":
            _check(self.temperature_end is not None, where, "temperature_end",
                   f"is required with temperature_schedule {self.temperature_schedule!r}")
        _check(self.temperature_end is None or self.temperature_end > 0, where, "temperature_end", "must be > 0")


@dataclass
class AssistantConfig(ModelConfig):
    """Teacher-assistant chain (Mirzadeh et al. 2020): a mid-size model is distilled from the teacher first, and the
    student is then distilled from it instead of from the teacher."""

    arch: str = "cnn"
    distill: Optional[DistillConfig] = None  # how the assistant learns from the teacher; None -> the pipeline's


@dataclass
class ExportConfig:
    opset: int = 18
    parity_samples: int = 256
    parity_max_abs_diff: float = 1e-3  # torch vs onnxruntime logits, fp32

    def validate(self, where: str) -> None:
        _check(self.parity_samples >= 1, where, "parity_samples", "must be >= 1")


@dataclass
class QuantizeConfig:
    calibration_samples: int = 512
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True
    # None -> follow the target profile (S8S8 for ARM and VNNI x86; U8S8 + reduce_range without VNNI)
    activation_type: Optional[Literal["int8", "uint8", "uint16"]] = None
    min_fp32_agreement: float = 0.9  # int8 vs fp32 top-1 on the parity inputs; below -> stage fails

    def validate(self, where: str) -> None:
        _check(self.calibration_samples >= 1, where, "calibration_samples", "must be >= 1")
        _check(0 <= self.min_fp32_agreement <= 1, where, "min_fp32_agreement", "must be in [0, 1]")


@dataclass
class TFLiteConfig:
    enabled: bool = True
    int8: bool = True
    # Which PyTorch -> TFLite route makes each file: litert-torch (PyTorch directly, static batch 1) or onnx2tf
    # (ONNX -> TF SavedModel -> TF converter, dynamic batch). auto tries both, the second when the first fails, its
    # file does not load in LiteRT or fails parity; litert-torch first for torchvision/timm/your own models, onnx2tf
    # first for edgekd's built-in CNNs. Measured: README "Choosing the TFLite converter".
    converter: Literal["auto", "litert-torch", "onnx2tf"] = "auto"
    calibration_samples: int = 256
    parity_samples: int = 256
    # int8 TFLite activations. static: full integer (calibrated ranges; what int8-only NPUs need). dynamic: int8
    # weights, activations quantized at run time from each input (litert-torch route; CPU/XNNPACK). auto: static
    # from every route first, dynamic only when no static file agrees (trained ViT-Tiny: static agreed 0.73).
    int8_activations: Literal["auto", "static", "dynamic"] = "auto"
    fp32_max_abs_diff: float = 1e-3  # ONNX vs TFLite fp32 logits
    int8_min_agreement: float = 0.95  # top-1 agreement of TFLite int8 with ONNX fp32

    def validate(self, where: str) -> None:
        _check(self.calibration_samples >= 1, where, "calibration_samples", "must be >= 1")
        _check(0 <= self.int8_min_agreement <= 1, where, "int8_min_agreement", "must be in [0, 1]")


@dataclass
class EvaluateConfig:
    batch_size: int = 256
    # With a profile that names emulate_cpus: every artifact's accuracy comes from the aarch64 runtimes under
    # emulation (the target's arithmetic); false keeps the host's figure, labelled as host arithmetic.
    emulate: bool = True
    # Cap on the test images run under emulation (a fixed seeded subset, written in the report); None: all of them
    target_samples: Optional[int] = None

    def validate(self, where: str) -> None:
        _check(self.batch_size >= 1, where, "batch_size", "must be >= 1")
        _check(self.target_samples is None or self.target_samples >= 1, where, "target_samples", "must be >= 1")


def _recovery_defaults(**kw):
    return lambda: DistillConfig(**{"epochs": 5, "lr": 1e-3, "alpha": 0.7, **kw})


@dataclass
class PruneConfig:
    """Structured channel pruning of the distilled student, then distillation from the teacher to recover."""

    enabled: bool = False  # the stage runs only with `prune: {enabled: true, ...}`
    ratio: Optional[float] = None  # fraction of each prunable layer's channels removed, in [0, 1)
    target_macs: Optional[int] = None  # instead of a ratio: prune until the student's MACs are at most this
    importance: Literal["l1", "l2"] = "l2"  # group magnitude norm that ranks channels
    global_pruning: bool = False  # rank channels across layers (uneven widths) instead of per layer
    layer_ratios: dict[str, float] = field(default_factory=dict)  # per-layer ratio overrides {layer path: ratio}
    round_to: Optional[int] = None  # each pruned layer keeps a multiple of this many channels (SIMD block)
    recovery: DistillConfig = field(default_factory=_recovery_defaults())  # KD fine-tuning after pruning

    def validate(self, where: str) -> None:
        if not self.enabled:
            return
        _check((self.ratio is None) != (self.target_macs is None), where, "ratio",
               "give either ratio or target_macs (exactly one)")
        _check(self.ratio is None or 0.0 <= self.ratio < 1.0, where, "ratio", "must be in [0, 1)")
        _check(self.target_macs is None or self.target_macs > 0, where, "target_macs", "must be > 0")
        for layer, r in self.layer_ratios.items():
            _check(0.0 <= r < 1.0, where, f"layer_ratios.{layer}", "must be in [0, 1)")
        _check(self.round_to is None or self.round_to >= 1, where, "round_to", "must be >= 1")


@dataclass
class QATConfig(DistillConfig):
    """Quantization-aware training of the (pruned) student with the KD loss on (torchao PT2E), int8 exports."""

    enabled: bool = False  # the stage runs only with `qat: {enabled: true, ...}`
    epochs: int = 3
    lr: float = 2e-4
    alpha: float = 0.7
    tflite: bool = True  # also an int8 TFLite with the QAT weights and ranges (parity-checked vs the QAT ONNX)
    calibration_samples: int = 256  # TFLite converter's representative set (ranges are clamped to QAT's)
    min_tflite_agreement: float = 0.97  # top-1 agreement of the QAT TFLite with the QAT ONNX; below -> stage fails

    def validate(self, where: str) -> None:
        super().validate(where)
        _check(set(self.methods.chosen()) <= {"kd"}, where, "methods",
               "QAT trains an exported graph: only logit KD (methods.kd) is supported")
        _check(self.calibration_samples >= 1, where, "calibration_samples", "must be >= 1")
        _check(0 <= self.min_tflite_agreement <= 1, where, "min_tflite_agreement", "must be in [0, 1]")


@dataclass
class BenchmarkConfig:
    warmup: int = 20
    runs: int = 200
    batch_size: int = 1
    include_teacher: bool = True
    # per-inference aarch64 instruction counts on each CPU the target profile emulates (stage arm_instructions)
    arm_instructions: bool = True

    def validate(self, where: str) -> None:
        _check(self.runs >= 5, where, "runs", "must be >= 5 (percentiles need samples)")
        _check(self.warmup >= 0, where, "warmup", "must be >= 0")
        _check(self.batch_size >= 1, where, "batch_size", "must be >= 1")


@dataclass
class Limits:
    """The per-artifact limits of a budget. None = no check. Accuracies are fractions (0.015 = 1.5 points)."""

    max_accuracy_drop: Optional[float] = None  # teacher accuracy minus artifact accuracy
    max_relative_accuracy_drop: Optional[float] = None  # drop / teacher accuracy
    min_accuracy: Optional[float] = None
    max_latency_p50_ms: Optional[float] = None
    max_latency_p90_ms: Optional[float] = None
    max_size_bytes: Optional[int] = None
    max_peak_rss_bytes: Optional[int] = None
    # relative to the teacher, measured in the same run: student p50 / teacher fp32 p50, student / teacher params
    max_latency_ratio_vs_teacher: Optional[float] = None
    max_params_ratio_vs_teacher: Optional[float] = None
    # share of the graph's nodes placed on the target's accelerator (execution-provider placement report)
    min_accelerator_node_fraction: Optional[float] = None
    # emulated aarch64 instructions per inference (batch 1), on each CPU the target profile emulates; and the same
    # relative to the teacher's fp32 ONNX on that CPU. Deterministic: a regression check that is not timing noise.
    max_arm_instructions: Optional[int] = None
    max_arm_instructions_ratio_vs_teacher: Optional[float] = None

    def validate(self, where: str) -> None:
        # Every numeric limit, including ones added later: fractions of 1 in [0, 1], every other min_/max_ > 0
        # (a latency, size, count or ratio of 0 or less can never be met).
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _is_number(value):
                continue
            if f.name in _FRACTION_LIMITS:
                _check(0.0 <= value <= 1.0, where, f.name, "must be in [0, 1] (a fraction: 0.015 = 1.5 points)")
            elif f.name.startswith(("max_", "min_")):
                _check(value > 0, where, f.name, "must be > 0")

    def overridden_by(self, other: "Limits") -> "Limits":
        """These limits with every limit `other` sets replacing ours."""
        return Limits(**{f.name: getattr(other, f.name) if getattr(other, f.name) is not None else getattr(self, f.name)
                         for f in dataclasses.fields(Limits)})


_FRACTION_LIMITS = frozenset({"max_accuracy_drop", "max_relative_accuracy_drop", "min_accuracy",
                              "min_accelerator_node_fraction"})


@dataclass
class RegressionConfig:
    """Tolerances against a baseline report (`edgekd gate RUN --baseline OLD/report.json`). None = no check."""

    max_latency_increase: Optional[float] = 0.10  # relative: 0.10 = the artifact's latency may grow 10%
    latency_percentile: Literal["p50", "p90", "p99"] = "p50"
    max_accuracy_decrease: Optional[float] = 0.005  # absolute fraction: 0.005 = half an accuracy point
    max_size_increase: Optional[float] = None  # relative
    max_peak_rss_increase: Optional[float] = None  # relative

    def validate(self, where: str) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("max_"):
                _check(value is None or value >= 0, where, f.name, "must be >= 0")
        _check(self.max_accuracy_decrease is None or self.max_accuracy_decrease <= 1, where, "max_accuracy_decrease",
               "must be at most 1 (a fraction: 0.005 = half a point)")


@dataclass
class BudgetConfig(Limits):
    max_accuracy_drop: Optional[float] = 0.015
    # artifact names the limits above apply to; None -> every artifact the build produces
    artifacts: Optional[list[str]] = None
    # limits for one artifact, replacing the ones above for it: {student_int8.tflite: {max_latency_p50_ms: 2}}
    per_artifact: dict[str, Limits] = field(default_factory=dict)
    required_artifacts: list[str] = field(default_factory=lambda: [
        "student_fp32.onnx", "student_int8.onnx", "student_fp32.tflite", "student_int8.tflite"])
    regression: RegressionConfig = field(default_factory=RegressionConfig)

    def validate(self, where: str) -> None:
        super().validate(where)
        _check(self.artifacts is None or len(self.artifacts) > 0, where, "artifacts",
               "an empty list checks nothing; name at least one artifact, or leave it out for all")

    def limits_for(self, artifact: str) -> Optional[Limits]:
        """The limits that apply to `artifact`, or None when the budget does not cover it."""
        own = self.per_artifact.get(artifact)
        if self.artifacts is not None and artifact not in self.artifacts:
            return own
        return self.overridden_by(own) if own is not None else self


@dataclass
class PipelineConfig:
    name: str = "pipeline"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teachers: Optional[list[TeacherConfig]] = None  # several teachers (an ensemble), each like `teacher`
    student: ModelConfig = field(default_factory=ModelConfig)
    assistant: Optional[AssistantConfig] = None  # teacher -> assistant -> student
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    tflite: TFLiteConfig = field(default_factory=TFLiteConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    source: str = field(default="<memory>", metadata={"internal": True})

    def validate(self, where: str) -> None:
        if self.teachers is not None:
            if not self.teachers:
                raise ConfigError(f"{where}: teachers: list at least one teacher")
            if self.teacher != TeacherConfig():
                raise ConfigError(f"{where}: give either 'teacher' (one) or 'teachers' (several), not both")
        for key, t in zip(self.teacher_keys(), self.teacher_list()):
            if t.checkpoint is None and t.train is None and t.exported is None and t.onnx is None:
                raise ConfigError(f"{where}: {key}: give either 'checkpoint' (a state dict) or 'train' (train one here), "
                                  f"or a saved teacher: 'exported' (torch.export) or 'onnx'")
        names = self.teacher_names()
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: teachers: names must be unique, got {names}")
        if self.data.known_channels() is not None:  # else the data stage checks once it has read the images
            check_normalize_channels(self, self.data.known_channels(), where)
        _check_model_sources(self, where)
        _check_method_paths(self, where)

    def teacher_list(self) -> list[TeacherConfig]:
        """The teachers: the `teachers:` list, or the one `teacher:`."""
        return list(self.teachers) if self.teachers is not None else [self.teacher]

    def teacher_keys(self) -> list[str]:
        return [f"teachers[{i}]" for i in range(len(self.teachers))] if self.teachers is not None else ["teacher"]

    def teacher_names(self) -> list[str]:
        """Each teacher's name (its `name`, else its index), as the report and NAME/PATH feature paths use it."""
        return [t.name or str(i) for i, t in enumerate(self.teacher_list())]

    def section(self, name: str) -> Any:
        """A section as plain data, for cache keys and report.json."""
        return to_plain(getattr(self, name))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(to_plain(self), sort_keys=True).encode()).hexdigest()


def check_normalize_channels(cfg: PipelineConfig, channels: int, where: str) -> None:
    """Every model's `normalize` has one value per image channel, or a single value (ConfigError naming the key)."""
    sections = list(zip(cfg.teacher_keys(), cfg.teacher_list())) + [("student", cfg.student)]
    if cfg.assistant is not None:
        sections.append(("assistant", cfg.assistant))
    for key, mcfg in sections:
        mcfg.normalize.check_channels(channels, f"{where}: {key}.normalize")


def _model_sections(cfg: PipelineConfig) -> list[tuple[str, ModelConfig]]:
    sections = list(zip(cfg.teacher_keys(), cfg.teacher_list())) + [("student", cfg.student)]
    return sections + ([("assistant", cfg.assistant)] if cfg.assistant is not None else [])


def _check_model_sources(cfg: PipelineConfig, where: str) -> None:
    """Each model's source is there (file, module, function, library) and takes its `args`; an ONNX teacher is used
    only where logits suffice."""
    from edgekd.models.sources import check_source

    for key, mcfg in _model_sections(cfg):
        try:
            check_source(mcfg)
        except ConfigError as exc:
            field_ = "exported" if getattr(mcfg, "exported", None) else "onnx" if getattr(mcfg, "onnx", None) else "arch"
            raise ConfigError(f"{where}: {key}.{field_}: {exc}") from None
    onnx_keys = [key for key, t in zip(cfg.teacher_keys(), cfg.teacher_list()) if t.onnx]
    if not onnx_keys:
        return
    if len(cfg.teacher_list()) > 1:
        raise ConfigError(f"{where}: {onnx_keys[0]}.onnx: an ONNX teacher cannot be part of a teachers: ensemble "
                          f"(the ensemble is exported as one PyTorch graph)")
    if cfg.teacher_list()[0].input_size:
        raise ConfigError(f"{where}: {onnx_keys[0]}.input_size: an ONNX teacher takes the dataset's image size; "
                          f"export it for that size instead")
    # The assistant, when there is one, learns from the ONNX teacher; the student then learns from the assistant.
    dcfg, dkey = ((cfg.assistant.distill or cfg.distill, "assistant.distill" if cfg.assistant.distill else "distill")
                  if cfg.assistant is not None else (cfg.distill, "distill"))
    m = dcfg.methods
    needs = [n for n, on in (("feature", m.feature), ("attention", m.attention),
                             ("rkd", m.rkd and (m.rkd.pair or m.rkd.embedding != "logits"))) if on]
    if needs:
        raise ConfigError(f"{where}: {dkey}.methods.{needs[0]}: needs the teacher's intermediate features, which an "
                          f"ONNX teacher ({onnx_keys[0]}.onnx) does not expose; use kd, or rkd with embedding: logits")


def _check_method_paths(cfg: PipelineConfig, where: str) -> None:
    """Module paths named by the distillation methods exist in their models: checked on models built at a nominal
    input size before anything runs (the distill stage checks again on the real ones)."""
    chain = [(cfg.distill, cfg.student, "distill", dict(zip(cfg.teacher_names(), cfg.teacher_list())))]
    if cfg.assistant is not None:
        chain = [(cfg.assistant.distill or cfg.distill, cfg.assistant, "assistant.distill" if cfg.assistant.distill
                  else "distill", chain[0][3]),
                 (cfg.distill, cfg.student, "distill", {"assistant": cfg.assistant})]
    if not any(d.methods.feature or d.methods.attention or (d.methods.rkd and d.methods.rkd.pair)
               for d, *_ in chain):
        return
    import torch

    from edgekd.distill.objective import check_paths
    from edgekd.models.zoo import model_from_config

    def nominal(mcfg):
        # fork_rng: building these models must not move the global RNG that later initializes the real ones
        with torch.random.fork_rng():
            try:
                return model_from_config(mcfg, (1, 32, 32), 10)
            except Exception:  # noqa: BLE001 - an architecture that needs its real input shape is checked at run time
                return None

    for dcfg, student_cfg, key, teacher_cfgs in chain:
        student = nominal(student_cfg)
        teachers = {name: nominal(t) for name, t in teacher_cfgs.items()}
        if student is not None and all(t is not None for t in teachers.values()):
            check_paths(dcfg.methods, student, teachers, f"{where}: {key}.methods")


# ---------------------------------------------------------------------------------------------- loading

# A pipeline's name names its run directory runs/<name>-<target>: no path separators, no "..", no leading dot.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
PLAIN_NAME_RULE = "use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"


def load_pipeline(path: str | Path) -> PipelineConfig:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a pipeline YAML file")
    if not path.is_file():
        raise ConfigError(f"pipeline file not found: {path}")
    try:
        raw = yaml.safe_load(_yaml_text(path))
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raw = {}
    token = _PIPELINE_DIR.set(str(path.resolve().parent))
    try:
        cfg = parse_section(PipelineConfig, raw, str(path), prefix="")
    finally:
        _PIPELINE_DIR.reset(token)
    cfg.source = str(path)
    if not raw.get("name"):
        cfg.name = path.stem
    if not PLAIN_NAME.fullmatch(cfg.name):
        origin = "name" if raw.get("name") else "name (from the file name; set `name:`)"
        raise ConfigError(f"{path}: {origin} {cfg.name!r}: {PLAIN_NAME_RULE}; it names the run directory "
                          f"runs/<name>-<target>")
    return cfg


def _yaml_text(path: Path) -> str:
    """The file's text, or one line saying it is not a YAML text file (binary, not UTF-8) or cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if b"\0" in data:
        raise ConfigError(f"{path}: not a YAML text file (it holds binary data)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a YAML text file (not UTF-8 at byte {exc.start})") from None


def parse_section(cls: type, raw: Any, file: str, prefix: str):
    """Build dataclass `cls` from `raw`, validating keys, types and values; errors name file and key."""
    where = f"{file}: {prefix.rstrip('.')}" if prefix else file
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_type_name(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{file}: {prefix}{key}: unknown key{_suggest(str(key), fields)}")
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, file, f"{prefix}{name}")
    obj = cls(**values)
    if hasattr(obj, "validate"):
        obj.validate(f"{file}: {prefix.rstrip('.')}" if prefix else file)
    return obj


def _coerce(tp: Any, value: Any, file: str, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for alt in non_none:  # e.g. `float | list[float]`: the first alternative that takes the value
            try:
                return _coerce(alt, value, file, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{file}: {key}: {value!r} is not one of {', '.join(map(repr, args))}"
                              f"{_suggest(str(value), [str(a) for a in args])}")
        return value
    if dataclasses.is_dataclass(tp):
        if "weight" in {f.name for f in dataclasses.fields(tp)} and _is_number(value):
            value = {"weight": value}  # shorthand: a bare number is a weighted section's weight
        return parse_section(tp, value, file, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{file}: {key}: expected true or false, got {_type_name(value)} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{file}: {key}: expected an integer, got {_type_name(value)} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{file}: {key}: expected a number, got {_type_name(value)} {value!r}")
        if value != value:
            raise ConfigError(f"{file}: {key}: NaN is not allowed")
        if value in (float("inf"), float("-inf")):
            raise ConfigError(f"{file}: {key}: an infinite value is not allowed (leave the key out for no limit)")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{file}: {key}: expected a string, got {_type_name(value)} {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{file}: {key}: expected a list, got {_type_name(value)} {value!r}")
        return [_coerce(args[0], v, file, f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: {key}: expected a mapping, got {_type_name(value)}")
        if args:
            return {str(k): _coerce(args[1], v, file, f"{key}.{k}") for k, v in value.items()}
        return value
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, where: str, key: str, problem: str) -> None:
    if not ok:
        sep = "." if ": " in where else ": "
        raise ConfigError(f"{where}{sep}{key}: {problem}")


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


def to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("internal")}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
