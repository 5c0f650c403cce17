"""Target profiles: what the app will run the model with (devices/*.yaml), validated like pipelines."""

from __future__ import annotations

import difflib
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from edgekd.config import parse_section, to_plain
from edgekd.errors import ConfigError
from edgekd.paths import DEVICES_DIR
from edgekd.pipeline.store import sha256_json


@dataclass
class QuantScheme:
    activation_type: Literal["int8", "uint8", "auto"] = "int8"  # auto: int8 with VNNI, else uint8 + reduce_range
    per_channel: bool = True
    reduce_range: bool = False


@dataclass
class TargetProfile:
    name: str = ""
    description: str = ""
    cpu_arch: Literal["arm64", "armv7", "x86_64"] = "arm64"
    kind: Literal["cpu", "npu", "gpu"] = "cpu"
    threads: int = 4  # the app's intra-op threads; benchmarks use min(threads, host cores)
    runtimes: list[str] = field(default_factory=lambda: ["onnxruntime", "tflite"])
    execution_provider: str = "CPUExecutionProvider"
    quantization: QuantScheme = field(default_factory=QuantScheme)
    static_shapes: bool = False
    min_accelerator_node_fraction: Optional[float] = None
    notes: str = ""

    def validate(self, where: str) -> None:
        if self.threads < 1:
            raise ConfigError(f"{where}: threads: must be >= 1")
        for r in self.runtimes:
            if r not in ("onnxruntime", "tflite"):
                raise ConfigError(f"{where}: runtimes: unknown runtime {r!r} (onnxruntime, tflite)")

    def digest(self) -> str:
        return sha256_json(to_plain(self))

    def as_dict(self) -> dict:
        return to_plain(self)

    @property
    def host_measured_label(self) -> str:
        return (f"host {platform.machine()} CPU ({cpu_model()}), under the {self.name} profile's settings; "
                f"not a measurement on an {self.cpu_arch} device")


def available_profiles(extra_dir: Path | None = None) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in [DEVICES_DIR] + ([extra_dir] if extra_dir else []):
        if d.is_dir():
            for p in sorted(d.glob("*.yaml")):
                found[p.stem] = p
    return found


def load_profile(name_or_path: str) -> TargetProfile:
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        profiles = available_profiles()
        if name_or_path not in profiles:
            close = difflib.get_close_matches(name_or_path, list(profiles), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown target {name_or_path!r}{hint}; available: {', '.join(profiles)} "
                              f"(or a path to a profile .yaml)")
        path = profiles[name_or_path]
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    profile = parse_section(TargetProfile, raw, str(path), prefix="")
    if not profile.name:
        profile.name = path.stem
    return profile


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
