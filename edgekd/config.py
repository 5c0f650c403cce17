"""The pipeline YAML as validated, typed objects.

Every section is a dataclass; `load_pipeline` walks the YAML against the dataclass fields, so an
unknown key names itself and the closest valid key, a wrong type names the expected type, and
impossible values (negative temperature, alpha outside [0, 1], ...) are refused before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from edgekd.errors import ConfigError


@dataclass
class DataConfig:
    dataset: Literal["fashion-mnist", "mnist", "digits", "npz", "image-folder"] = "digits"
    path: Optional[str] = None  # folder of idx files, .npz file, or image folder; None -> the dataset's default
    val_fraction: float = 0.1  # carved from the training split with a fixed seed
    test_fraction: float = 0.2  # only for datasets without their own test split (digits, npz without x_test, folders)
    train_limit: Optional[int] = None  # use only the first N training samples (after the fixed shuffle)
    image_size: Optional[list[int]] = None  # [H, W] for image folders (resized); None -> as stored

    def validate(self, where: str) -> None:
        _check(0.0 < self.val_fraction < 0.5, where, "val_fraction", "must be in (0, 0.5)")
        _check(0.0 < self.test_fraction < 0.5, where, "test_fraction", "must be in (0, 0.5)")
        _check(self.train_limit is None or self.train_limit > 0, where, "train_limit", "must be positive")


@dataclass
class Normalization:
    mean: float = 0.0
    std: float = 1.0

    def validate(self, where: str) -> None:
        _check(self.std > 0, where, "std", "must be > 0")


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr_schedule: Literal["constant", "cosine"] = "cosine"

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

    def validate(self, where: str) -> None:
        from edgekd.models.zoo import ARCHITECTURES

        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"{where}.arch: unknown architecture {self.arch!r}{_suggest(self.arch, ARCHITECTURES)}; "
                              f"choose one of {', '.join(sorted(ARCHITECTURES))}")


@dataclass
class TeacherConfig(ModelConfig):
    arch: str = "cnn-teacher"
    checkpoint: Optional[str] = None  # a state dict for `arch`; None -> train one here (needs `train`)
    allow_pickle: bool = False  # load a pickled full checkpoint (can execute code); only for files you trust
    train: Optional[TrainConfig] = None


@dataclass
class DistillConfig(TrainConfig):
    alpha: float = 0.9  # weight of the KD term; (1 - alpha) weighs the label cross-entropy
    temperature: float = 4.0
    temperature_schedule: Literal["constant", "linear", "cosine"] = "constant"
    temperature_end: Optional[float] = None  # final temperature for linear/cosine decay
    cache_teacher_outputs: bool = True  # inputs are not augmented, so teacher logits are computed once

    def validate(self, where: str) -> None:
        super().validate(where)
        _check(0.0 <= self.alpha <= 1.0, where, "alpha", "must be in [0, 1]")
        _check(self.temperature > 0, where, "temperature", "must be > 0")
        if self.temperature_schedule != "constant":
            _check(self.temperature_end is not None, where, "temperature_end",
                   f"is required with temperature_schedule {self.temperature_schedule!r}")
        _check(self.temperature_end is None or self.temperature_end > 0, where, "temperature_end", "must be > 0")


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
    activation_type: Optional[Literal["int8", "uint8"]] = None
    min_fp32_agreement: float = 0.9  # int8 vs fp32 top-1 on the parity inputs; below -> stage fails

    def validate(self, where: str) -> None:
        _check(self.calibration_samples >= 1, where, "calibration_samples", "must be >= 1")
        _check(0 <= self.min_fp32_agreement <= 1, where, "min_fp32_agreement", "must be in [0, 1]")


@dataclass
class TFLiteConfig:
    enabled: bool = True
    int8: bool = True
    calibration_samples: int = 256
    parity_samples: int = 256
    fp32_max_abs_diff: float = 1e-3  # ONNX vs TFLite fp32 logits
    int8_min_agreement: float = 0.95  # top-1 agreement of TFLite int8 with ONNX fp32

    def validate(self, where: str) -> None:
        _check(self.calibration_samples >= 1, where, "calibration_samples", "must be >= 1")
        _check(0 <= self.int8_min_agreement <= 1, where, "int8_min_agreement", "must be in [0, 1]")


@dataclass
class EvaluateConfig:
    batch_size: int = 256


@dataclass
class BenchmarkConfig:
    warmup: int = 20
    runs: int = 200
    batch_size: int = 1
    include_teacher: bool = True

    def validate(self, where: str) -> None:
        _check(self.runs >= 5, where, "runs", "must be >= 5 (percentiles need samples)")
        _check(self.warmup >= 0, where, "warmup", "must be >= 0")
        _check(self.batch_size >= 1, where, "batch_size", "must be >= 1")


@dataclass
class BudgetConfig:
    max_accuracy_drop: Optional[float] = 0.015  # teacher accuracy minus artifact accuracy (fraction)
    max_relative_accuracy_drop: Optional[float] = None  # drop / teacher accuracy
    min_accuracy: Optional[float] = None
    max_latency_p50_ms: Optional[float] = None
    max_latency_p90_ms: Optional[float] = None
    max_size_bytes: Optional[int] = None
    max_peak_rss_bytes: Optional[int] = None
    # relative to the teacher, measured in the same run: student p50 / teacher fp32 p50, student / teacher params
    max_latency_ratio_vs_teacher: Optional[float] = None
    max_params_ratio_vs_teacher: Optional[float] = None
    # artifact names the checks apply to; None -> every artifact the build produces
    artifacts: Optional[list[str]] = None
    required_artifacts: list[str] = field(default_factory=lambda: [
        "student_fp32.onnx", "student_int8.onnx", "student_fp32.tflite", "student_int8.tflite"])


@dataclass
class PipelineConfig:
    name: str = "pipeline"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    tflite: TFLiteConfig = field(default_factory=TFLiteConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    source: str = field(default="<memory>", metadata={"internal": True})

    def validate(self, where: str) -> None:
        if self.teacher.checkpoint is None and self.teacher.train is None:
            raise ConfigError(f"{where}: teacher: give either 'checkpoint' (a state dict) or 'train' (train one here)")

    def section(self, name: str) -> Any:
        """A section as plain data, for cache keys and report.json."""
        return to_plain(getattr(self, name))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(to_plain(self), sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- loading

def load_pipeline(path: str | Path) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raw = {}
    cfg = parse_section(PipelineConfig, raw, str(path), prefix="")
    cfg.source = str(path)
    if not raw.get("name"):
        cfg.name = path.stem
    return cfg


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
        return _coerce(non_none[0], value, file, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{file}: {key}: {value!r} is not one of {', '.join(map(repr, args))}"
                              f"{_suggest(str(value), [str(a) for a in args])}")
        return value
    if dataclasses.is_dataclass(tp):
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
        return value
    return value


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
