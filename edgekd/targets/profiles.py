"""Target profiles: what the app will run the model with (devices/*.yaml), validated like pipelines.

A profile says which runtimes and which onnxruntime execution provider (EP) the app uses, with which options,
which precision the hardware wants (drives the quantize stage), what must hold for the model to run there
(static shapes, a minimum fraction of nodes on the accelerator) and where it can be measured:

- `runtime_env`: the Python environment the EP's measurement runs in. `host` is edgekd's own (onnxruntime
  1.23.0, CPU only); `qnn` is a separate environment edgekd creates on demand (edgekd/runtimes/envs.py).
- `placement_check`: how edgekd learns which nodes the EP takes. `session`: run the model through the EP and
  read onnxruntime's own record of what ran where; `mobile-usability`: onnxruntime's mobile usability checker
  (static partition analysis, for EPs that cannot run on this host: NNAPI, CoreML); `none`: CPU only.
"""

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

# Execution providers edgekd knows how to check, and the placement check each one allows.
EXECUTION_PROVIDERS = {
    "CPUExecutionProvider": ("none",),
    "QNNExecutionProvider": ("session",),
    "NnapiExecutionProvider": ("mobile-usability",),
    "CoreMLExecutionProvider": ("mobile-usability",),
}
RUNTIME_ENVS = ("host", "qnn")  # see edgekd/runtimes/envs.py
MOBILE_CHECKERS = ("nnapi", "coreml-mlprogram", "coreml-neuralnetwork")
# QEMU 7.2's aarch64 CPU models edgekd can emulate (edgekd/runtimes/aarch64.py CPUS; kept here so validating a
# profile imports nothing heavy)
EMULATED_CPUS = ("cortex-a53", "cortex-a57", "cortex-a72", "cortex-a76", "neoverse-n1")


@dataclass
class QuantScheme:
    # auto: int8 with VNNI, else uint8 + reduce_range (x86). uint16: 16-bit activations (A16W8), QNN HTP's
    # accurate mode. The quantize stage follows this unless the pipeline's quantize section overrides it.
    activation_type: Literal["int8", "uint8", "uint16", "auto"] = "int8"
    weight_type: Literal["int8", "uint8"] = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    # ort: onnxruntime's quantize_static defaults; qnn: onnxruntime's QNN recipe (get_qnn_qdq_config), which adds
    # the per-op overrides QNN's HTP needs (MatMul, LayerNorm, Sigmoid, Tanh...).
    recipe: Literal["ort", "qnn"] = "ort"

    def validate(self, where: str) -> None:
        if self.weight_type == "uint8" and self.per_channel:
            raise ConfigError(f"{where}.weight_type: uint8 weights are asymmetric and cannot be per-channel here; "
                              f"use weight_type: int8 (symmetric) or per_channel: false")


@dataclass
class DeviceRunner:
    """Optional measurement on a real Android device over adb (edgekd/runtimes/adb.py)."""

    enabled: bool = False
    serial: Optional[str] = None  # adb serial; None -> $ANDROID_SERIAL or the only connected device
    remote_dir: str = "/data/local/tmp/edgekd"
    # The runtimes' own benchmark binaries for the device (host paths, pushed once). $EDGEKD_TFLITE_BENCHMARK_MODEL
    # and $EDGEKD_ORT_PERF_TEST override these; a runtime without a binary is reported as not measured.
    tflite_benchmark_model: Optional[str] = None
    onnxruntime_perf_test: Optional[str] = None
    runs: int = 50
    timeout_s: float = 300.0

    def validate(self, where: str) -> None:
        if self.runs < 5:
            raise ConfigError(f"{where}.runs: must be >= 5 (percentiles need samples)")
        if not self.remote_dir.startswith("/"):
            raise ConfigError(f"{where}.remote_dir: must be an absolute path on the device")


@dataclass
class TargetProfile:
    name: str = ""
    description: str = ""
    cpu_arch: Literal["arm64", "armv7", "x86_64"] = "arm64"
    kind: Literal["cpu", "npu", "gpu"] = "cpu"
    soc: str = ""  # the named SoC the profile describes (e.g. "Snapdragon 8 Gen 3 (SM8650)")
    threads: int = 4  # the app's intra-op threads; benchmarks use min(threads, host cores)
    runtimes: list[str] = field(default_factory=lambda: ["onnxruntime", "tflite"])
    execution_provider: str = "CPUExecutionProvider"
    provider_options: dict = field(default_factory=dict)  # passed to the EP as strings
    runtime_env: str = "host"
    placement_check: Optional[Literal["none", "session", "mobile-usability"]] = None  # None -> the EP's own
    mobile_checker: Optional[Literal["nnapi", "coreml-mlprogram", "coreml-neuralnetwork"]] = None
    # Which artifacts run through the EP; None -> every ONNX artifact whose precision the profile prefers.
    accelerator_artifacts: Optional[list[str]] = None
    min_accelerator_node_fraction: Optional[float] = None
    # onnxruntime graph optimizers the target's runtime does not have, turned off when measuring on this host so the
    # host runs the graph the device would. None: derived from cpu_arch (see `host_disabled_optimizers`).
    onnxruntime_disabled_optimizers: Optional[list[str]] = None
    static_shapes: bool = False
    static_batch_size: int = 1
    # ARM CPU models (QEMU's names) the target's arithmetic is emulated on (edgekd/runtimes/aarch64.py): the first
    # one computes every artifact's accuracy with the aarch64 runtimes; each one gets per-inference instruction counts.
    # Empty: accuracy from the host's own kernels, labelled so.
    emulate_cpus: list[str] = field(default_factory=list)
    quantization: QuantScheme = field(default_factory=QuantScheme)
    device_runner: DeviceRunner = field(default_factory=DeviceRunner)
    notes: str = ""

    def validate(self, where: str) -> None:
        def bad(key: str, problem: str):
            raise ConfigError(f"{where}: {key}: {problem}")

        if self.threads < 1:
            bad("threads", "must be >= 1")
        for r in self.runtimes:
            if r not in ("onnxruntime", "tflite"):
                bad("runtimes", f"unknown runtime {r!r} (onnxruntime, tflite)")
        ep = self.execution_provider
        if ep not in EXECUTION_PROVIDERS:
            close = difflib.get_close_matches(ep, list(EXECUTION_PROVIDERS), n=1, cutoff=0.5)
            bad("execution_provider", f"unknown execution provider {ep!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "") + f"; one of {', '.join(EXECUTION_PROVIDERS)}")
        if ep != "CPUExecutionProvider" and "onnxruntime" not in self.runtimes:
            bad("runtimes", f"{ep} is an onnxruntime execution provider: list onnxruntime in runtimes")
        for key, value in self.provider_options.items():
            if not isinstance(value, (str, int, float, bool)):
                bad(f"provider_options.{key}", f"expected a string or number, got {type(value).__name__}")
        if self.runtime_env not in RUNTIME_ENVS:
            close = difflib.get_close_matches(self.runtime_env, RUNTIME_ENVS, n=1, cutoff=0.5)
            bad("runtime_env", f"unknown runtime environment {self.runtime_env!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "") + f"; one of {', '.join(RUNTIME_ENVS)}")
        check = self.effective_placement_check
        if check not in EXECUTION_PROVIDERS[ep]:
            why = {"NnapiExecutionProvider": "the PyPI onnxruntime has no NNAPI: asking for it silently runs on CPU",
                   "CoreMLExecutionProvider": "the PyPI onnxruntime has no CoreML: asking for it silently runs on CPU",
                   "QNNExecutionProvider": "QNN runs here through its HTP simulator: read placement from the session",
                   "CPUExecutionProvider": "everything runs on the CPU"}[ep]
            bad("placement_check", f"{check!r} does not work for {ep} ({why}); use {EXECUTION_PROVIDERS[ep][0]!r}")
        if ep == "QNNExecutionProvider":
            if self.runtime_env != "qnn":
                bad("runtime_env", "QNNExecutionProvider is not in edgekd's own onnxruntime (1.23.0, CPU only); "
                                   "use runtime_env: qnn (a separate environment edgekd creates on demand)")
            if "soc_model" not in self.provider_options:
                bad("provider_options.soc_model", "QNN's HTP backend needs the SoC model number (e.g. '57' for "
                                                  "Snapdragon 8 Gen 3 / SM8650); without it graph finalize fails")
            if not self.static_shapes:
                bad("static_shapes", "must be true for QNNExecutionProvider (the HTP compiles static shapes only)")
            if not self.soc:
                bad("soc", "name the SoC this profile describes (e.g. 'Snapdragon 8 Gen 3 (SM8650)')")
        if check == "mobile-usability":
            if self.mobile_checker is None:
                self.mobile_checker = "nnapi" if ep == "NnapiExecutionProvider" else "coreml-mlprogram"
            if (ep == "NnapiExecutionProvider") != (self.mobile_checker == "nnapi"):
                bad("mobile_checker", f"{self.mobile_checker!r} does not check {ep}")
        elif self.mobile_checker is not None:
            bad("mobile_checker", "only used with placement_check: mobile-usability")
        if self.min_accelerator_node_fraction is not None:
            if not 0.0 < self.min_accelerator_node_fraction <= 1.0:
                bad("min_accelerator_node_fraction", "must be in (0, 1]")
            if ep == "CPUExecutionProvider":
                bad("min_accelerator_node_fraction", "needs an accelerator execution provider (this profile is CPU)")
        if self.static_batch_size < 1:
            bad("static_batch_size", "must be >= 1")
        for i, cpu in enumerate(self.emulate_cpus):
            if self.cpu_arch != "arm64":
                bad("emulate_cpus", f"emulation runs aarch64 runtimes; this profile's cpu_arch is {self.cpu_arch}")
            if cpu not in EMULATED_CPUS:
                close = difflib.get_close_matches(cpu, EMULATED_CPUS, n=1, cutoff=0.5)
                bad(f"emulate_cpus[{i}]", f"unknown CPU {cpu!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                    + f"; one of {', '.join(EMULATED_CPUS)}")
        if len(set(self.emulate_cpus)) != len(self.emulate_cpus):
            bad("emulate_cpus", "lists a CPU twice")
        for i, name in enumerate(self.accelerator_artifacts or []):
            if not name.endswith(".onnx"):
                bad(f"accelerator_artifacts[{i}]", f"{name!r}: execution providers run ONNX files (*.onnx)")

    # ------------------------------------------------------------------------------------------ derived

    @property
    def effective_placement_check(self) -> str:
        return self.placement_check or EXECUTION_PROVIDERS.get(self.execution_provider, ("none",))[0]

    @property
    def uses_accelerator(self) -> bool:
        return self.execution_provider != "CPUExecutionProvider"

    def ep_artifacts(self, available: list[tuple[str, str, str]]) -> list[str]:
        """Names of the artifacts (name, format, precision) that go through the EP."""
        if not self.uses_accelerator:
            return []
        if self.accelerator_artifacts is not None:
            return [n for n in self.accelerator_artifacts if n in {a[0] for a in available}]
        return [name for name, fmt, prec in available if fmt == "onnx" and prec == "int8"]

    def digest(self) -> str:
        return sha256_json(to_plain(self))

    def as_dict(self) -> dict:
        return to_plain(self)

    @property
    def host_disabled_optimizers(self) -> list[str]:
        """The onnxruntime optimizers a host measurement turns off for this target.

        An ARM target: ORT's NCHWc layout transformer, which blocks channels by 8 (AVX2) or 16 (AVX-512) on x86. Stock
        arm64/armv7 onnxruntime builds do not have it (it is registered only when MlasNchwcGetBlockSize() > 1, and the
        NEON NCHWc kernels sit behind the off-by-default build option onnxruntime_USE_ARM_NEON_NCHWC), so the device
        runs the plain graph (FusedConv, MaxPool, FusedGemm). Measuring the x86 layout instead would, for one, hide
        what pruning a 16-channel conv to 8 saves on the device.
        """
        if self.onnxruntime_disabled_optimizers is not None:
            return list(self.onnxruntime_disabled_optimizers)
        return ["NchwcTransformer"] if self.cpu_arch in ("arm64", "armv7") else []

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
        if path.suffix in (".yaml", ".yml"):
            raise ConfigError(f"target profile file not found: {path}")
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
    profile.provider_options = {str(k): _option_str(v) for k, v in profile.provider_options.items()}
    return profile


def _option_str(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
