"""Where a model comes from. One `load_model(spec, input_shape, num_classes)` for every source, so stages never care.

A model section (teacher, student, assistant) names its source with `arch`, or a teacher with `exported` / `onnx`:

- `cnn-small`, `mlp`, ...            the built-in architectures (`edgekd.models.zoo`);
- `torchvision:mobilenet_v3_small`   torchvision's constructor, no weights (nothing is downloaded), `args` passed on;
- `timm:efficientnet_lite0`          timm's `create_model`, `pretrained=False`, `in_chans` from the data;
- `path/to/models.py:make_student`   a factory or class in the user's file (relative to the pipeline file's folder);
- `my_package.models:Student`        the same from an importable module;
- teacher `exported: teacher.pt2`    a program saved with `torch.export.save` (no model code needed);
- teacher `onnx: teacher.onnx`       any framework's model, its logits computed in onnxruntime (logit KD only).

Every model is `nn.Sequential(Normalize(mean, std), body)`: it takes images in [0, 1] and normalizes them itself,
so an exported file is self-contained, and state-dict keys (`0.mean`, `1.<body>`) are the same for every source.
Classifier heads are sized by `num_classes`; a dummy forward at the dataset's shape checks the output is
(N, classes) logits. Every failure is one line (ConfigError, exit 2).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from edgekd.errors import ConfigError, first_line
from edgekd.models.zoo import ARCHITECTURES, Normalize, build_model, check_args

LIBRARIES = ("torchvision", "timm")


@dataclass(frozen=True)
class Source:
    kind: str  # builtin | torchvision | timm | file | module | exported | onnx
    name: str  # architecture or constructor name, module name, or the (resolved) file
    attr: str = ""  # the factory / class inside a file or module
    text: str = ""  # as the pipeline wrote it, for messages

    @property
    def file(self) -> Optional[Path]:
        return Path(self.name) if self.kind in ("file", "exported", "onnx") else None


def source_of(spec: Any) -> Source:
    """Parse a model section's source (syntax only: nothing is imported or read)."""
    for kind in ("exported", "onnx"):
        path = getattr(spec, kind, None)
        if path:
            return Source(kind, str(_resolve(spec, path)), text=f"{kind}: {path}")
    arch = spec.arch
    if arch in ARCHITECTURES:
        return Source("builtin", arch, text=arch)
    if ":" in arch:
        head, attr = arch.rsplit(":", 1)
        if head in LIBRARIES:
            return Source(head, attr, text=arch)
        if head.endswith(".py") or "/" in head or "\\" in head:
            return Source("file", str(_resolve(spec, head)), attr, text=arch)
        if head and attr and all(part.isidentifier() for part in head.split(".")) and attr.isidentifier():
            return Source("module", head, attr, text=arch)
    import difflib

    close = difflib.get_close_matches(arch, list(ARCHITECTURES), n=1, cutoff=0.6)
    raise ConfigError(f"unknown architecture {arch!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                      + f"; choose one of {', '.join(sorted(ARCHITECTURES))}, or torchvision:NAME, timm:NAME, "
                        f"path/to/file.py:FUNCTION, package.module:NAME")


def label(spec: Any) -> str:
    """How logs and reports name a model: its arch, or the teacher's saved file."""
    src = source_of(spec)
    return src.text


def check_source(spec: Any) -> None:
    """Everything about a source that can be checked before the data is read: the library, file or module is there,
    the function exists, `args` fit its signature. Raises ConfigError (without the "where" prefix)."""
    src = source_of(spec)
    if src.kind == "builtin":
        problem = check_args(src.name, spec.args)
        if problem:
            raise ConfigError(problem)
    elif src.kind in LIBRARIES:
        _library_constructor(src)
    elif src.kind in ("file", "module"):
        _check_kwargs(src, _user_callable(src), spec.args)
    elif not src.file.is_file():
        raise ConfigError(f"{src.kind} model not found: {src.file}")


def source_digest(spec: Any) -> Optional[str]:
    """What, outside the config, decides the model a source builds: the file's digest, the library's version.
    None for built-ins (edgekd's own code digest covers them). Part of the cache keys of the stages that build it."""
    src = source_of(spec)
    if src.kind == "builtin":
        return None
    if src.kind in LIBRARIES:
        return f"{src.kind}=={_import_library(src.kind).__version__}"
    if src.kind == "module":
        origin = _module_origin(src.name)
        return _sha256(origin) if origin else None
    return _sha256(src.file) if src.file.is_file() else None


def load_model(spec: Any, input_shape: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """The model a pipeline section describes: Normalize(mean, std) then the source's body, checked to map a
    (N, *input_shape) batch to (N, num_classes) logits. Fresh weights, except for exported / ONNX teachers."""
    src = source_of(spec)
    shape = tuple(int(v) for v in input_shape)
    if src.kind == "builtin":
        model = build_model(src.name, spec.args, shape, num_classes, spec.normalize.mean, spec.normalize.std)
    else:
        for key in ("mean", "std"):
            value = getattr(spec.normalize, key)
            if isinstance(value, (list, tuple)) and len(value) not in (1, shape[0]):
                raise ConfigError(f"normalize.{key}: {len(value)} values for {shape[0]}-channel images; give one "
                                  f"value, or one per channel")
        body = _LOADERS[src.kind](src, dict(spec.args), shape, num_classes)
        model = nn.Sequential(Normalize(spec.normalize.mean, spec.normalize.std), body)
    _check_logits(model, src, shape, num_classes)
    return model


def is_torch_exportable(model: nn.Module) -> bool:
    """False when the model runs in another runtime (an ONNX teacher): it cannot be traced by torch.export."""
    return not any(isinstance(m, OnnxModel) for m in model.modules())


# ------------------------------------------------------------------------------------------- one loader per source

def _torchvision(src: Source, args: dict, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    builder = _library_constructor(src)
    # weights=None: a randomly initialized model, nothing downloaded; num_classes sizes the classifier.
    return _call(src, builder, {"weights": None, "num_classes": num_classes, **args})


def _timm(src: Source, args: dict, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    timm = _import_library("timm")
    _library_constructor(src)
    # pretrained=False: nothing downloaded; in_chans follows the data (timm adapts the stem).
    return _call(src, lambda **kw: timm.create_model(src.name, **kw),
                 {"pretrained": False, "num_classes": num_classes, "in_chans": shape[0], **args})


def _user(src: Source, args: dict, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    fn = _user_callable(src)
    _check_kwargs(src, fn, args)
    params = _parameters(fn)
    # num_classes (and input_shape) are passed when the factory names them; `args` win over them.
    extra = {k: v for k, v in (("num_classes", num_classes), ("input_shape", shape)) if k in params}
    model = _call(src, fn, {**extra, **args})
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{src.text}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


class ExportedProgram(nn.Module):
    """A `torch.export` program as a frozen module. `train()` does not reach the program: an exported graph refuses
    it, and a saved teacher is never trained here."""

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def train(self, mode: bool = True) -> "ExportedProgram":
        self.training = mode
        return self


def _exported(src: Source, args: dict, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    if args:
        raise ConfigError(f"teacher.exported: a saved program takes no args (got {sorted(args)})")
    if not src.file.is_file():
        raise ConfigError(f"exported model not found: {src.file}")
    try:
        ep = torch.export.load(str(src.file))
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not a saved program
        raise ConfigError(f"{src.file}: not a program saved with torch.export.save: {first_line(exc)}") from None
    inputs = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs]
    if len(inputs) != 1:
        raise ConfigError(f"{src.file}: the program takes {len(inputs)} inputs; a teacher takes one image batch")
    batch = inputs[0].meta.get("val").shape[0] if inputs[0].meta.get("val") is not None else None
    if isinstance(batch, int):  # a static batch dimension: every consumer (logit cache, ONNX export) batches
        raise ConfigError(f"{src.file}: the program was exported for a fixed batch of {batch}; export it with a "
                          f"dynamic batch: torch.export.export(model, (x,), dynamic_shapes=({{0: "
                          f"torch.export.Dim('batch')}},))")
    return ExportedProgram(ep.module())


class OnnxModel(nn.Module):
    """An ONNX model run by onnxruntime: (N, C, H, W) float -> (N, K) logits as a tensor. No gradients, no module
    paths: a teacher for logit KD (and its output cache) only. `external_params` counts its weights for reports."""

    def __init__(self, path: Path):
        super().__init__()
        import onnx
        import onnxruntime as ort

        self.path = Path(path)
        try:
            model = onnx.load(str(self.path))
            so = ort.SessionOptions()
            so.log_severity_level = 3
            self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - a damaged or unsupported file
            raise ConfigError(f"{self.path}: not an ONNX model onnxruntime can run: {first_line(exc)}") from None
        self.external_params = int(sum(_numel(t.dims) for t in model.graph.initializer))
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        if len(ins) != 1 or len(ins[0].shape) != 4:
            raise ConfigError(f"{self.path}: a teacher takes one (N, C, H, W) input; the model takes "
                              + ", ".join(f"{i.name} {i.shape}" for i in ins))
        if isinstance(ins[0].shape[0], int):
            raise ConfigError(f"{self.path}: input {ins[0].name!r} has a fixed batch of {ins[0].shape[0]}; export "
                              f"the teacher with a dynamic batch dimension")
        self.input_name, self.output_name = ins[0].name, outs[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: x.detach().cpu().float().contiguous().numpy()}
        return torch.from_numpy(self.session.run([self.output_name], feed)[0])

    def __getstate__(self):  # the session is rebuilt, not pickled
        return {**self.__dict__, "session": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__init__(state["path"])


def _onnx(src: Source, args: dict, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    if args:
        raise ConfigError(f"teacher.onnx: an ONNX model takes no args (got {sorted(args)})")
    if not src.file.is_file():
        raise ConfigError(f"onnx model not found: {src.file}")
    return OnnxModel(src.file)


def write_onnx_teacher(model: nn.Module, path: Path) -> dict:
    """teacher_fp32.onnx for an ONNX teacher (a model torch cannot export): the user's graph as one file, with the
    pipeline's normalization (model[0]) prepended as Sub/Div nodes, so the file takes [0, 1] images like every other
    exported model. Returns what export_onnx returns."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    norm, body = model[0], model[1]
    proto = onnx.load(str(body.path))  # external data, if any, is read in and written back inside the one file
    graph = proto.graph
    old_input = graph.input[0].name
    mean, std = norm.mean.detach().numpy().astype(np.float32), norm.std.detach().numpy().astype(np.float32)
    if not (np.all(mean == 0) and np.all(std == 1)):
        new_input = helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT,
                                                  [d.dim_param or d.dim_value or None
                                                   for d in graph.input[0].type.tensor_type.shape.dim])
        graph.initializer.extend([numpy_helper.from_array(mean, "edgekd_norm_mean"),
                                  numpy_helper.from_array(std, "edgekd_norm_std")])
        nodes = [helper.make_node("Sub", ["input", "edgekd_norm_mean"], ["edgekd_centered"], name="edgekd_norm_sub"),
                 helper.make_node("Div", ["edgekd_centered", "edgekd_norm_std"], [old_input], name="edgekd_norm_div")]
        graph.input.remove(graph.input[0])
        graph.input.insert(0, new_input)
        for node in reversed(nodes):
            graph.node.insert(0, node)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ConfigError(f"{body.path}: the teacher with its normalization fails onnx.checker: "
                          f"{first_line(exc)}") from None
    Path(path).write_bytes(proto.SerializeToString())
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "simplified": False, "nodes": len(graph.node),
            "op_types": sorted({n.op_type for n in graph.node}), "source": str(body.path)}


_LOADERS: dict[str, Callable[[Source, dict, tuple[int, int, int], int], nn.Module]] = {
    "torchvision": _torchvision, "timm": _timm, "file": _user, "module": _user, "exported": _exported, "onnx": _onnx}


# ------------------------------------------------------------------------------------------------------ helpers

def _resolve(spec: Any, path: str) -> Path:
    """A relative path is relative to the pipeline file's folder (`base_dir`, set by load_pipeline)."""
    p = Path(path).expanduser()
    base = getattr(spec, "base_dir", "") or ""
    return p if p.is_absolute() or not base else Path(base) / p


def _import_library(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(f"{name} is not installed in this environment ({first_line(exc)}); install it with the "
                          f"pinned stack (make setup, see README 'Your own model')") from None


def _library_constructor(src: Source) -> Callable[..., nn.Module]:
    import difflib

    if src.kind == "torchvision":
        tv = _import_library("torchvision")
        names = tv.models.list_models(module=tv.models)  # classification models only
        if src.name in names:
            return tv.models.get_model_builder(src.name)
    else:
        timm = _import_library("timm")
        if timm.is_model(src.name):
            return timm.create_model
        names = timm.list_models()
    close = difflib.get_close_matches(src.name, names, n=1, cutoff=0.6)
    raise ConfigError(f"{src.text}: {src.kind} has no classification model {src.name!r}"
                      + (f" (did you mean {close[0]!r}?)" if close else ""))


# A user file is imported once per process (keyed by path and content), under a name of its own.
_USER_MODULES: dict[tuple[str, str], Any] = {}


@contextmanager
def _on_path(*folders: Path) -> Iterator[None]:
    """The user's folders on sys.path while their code is imported (so it can import its neighbours)."""
    added = [str(f) for f in folders if str(f) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for f in added:
            if f in sys.path:
                sys.path.remove(f)


def _user_callable(src: Source) -> Callable[..., Any]:
    if src.kind == "file":
        path = Path(src.name).resolve()
        if not path.is_file():
            raise ConfigError(f"{src.text}: file not found: {src.name}")
        key = (str(path), _sha256(path))
        module = _USER_MODULES.get(key)
        if module is None:
            name = f"edgekd_user_{path.stem}_{key[1][:12]}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            try:
                with _on_path(path.parent):
                    sys.modules[name] = module  # dataclasses and pickling look modules up by name
                    spec.loader.exec_module(module)
            except Exception as exc:  # noqa: BLE001 - any error in the user's code is reported, one line
                sys.modules.pop(name, None)
                raise ConfigError(f"{src.text}: importing {path.name} failed: {type(exc).__name__}: "
                                  f"{first_line(exc)}") from None
            _USER_MODULES[key] = module
        where = src.name
    else:
        try:
            with _on_path(Path.cwd()):
                module = importlib.import_module(src.name)
        except ModuleNotFoundError as exc:
            raise ConfigError(f"{src.text}: module not found: {first_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"{src.text}: importing {src.name} failed: {type(exc).__name__}: "
                              f"{first_line(exc)}") from None
        where = f"module {src.name}"
    fn = getattr(module, src.attr, None)
    if fn is None or not callable(fn):
        import difflib

        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(src.attr, names, n=1, cutoff=0.6)
        raise ConfigError(f"{src.text}: no function or class {src.attr!r} in {where}"
                          + (f" (did you mean {close[0]!r}?)" if close else ""))
    return fn


def _parameters(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin without a signature: accept anything
        return {"kwargs": inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)}


def _check_kwargs(src: Source, fn: Callable[..., Any], args: dict) -> None:
    """An `args` key the factory does not take is named before anything runs (with a suggestion)."""
    import difflib

    params = _parameters(fn)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"]
    for key in args:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            raise ConfigError(f"{src.text}: unknown argument {key!r}" + (f" (did you mean {close[0]!r}?)" if close
                              else "") + f"; it takes {', '.join(names) or 'no arguments'}")


def _call(src: Source, fn: Callable[..., Any], kwargs: dict) -> Any:
    try:
        return fn(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a constructor rejecting its arguments, or failing inside
        shown = {k: v for k, v in kwargs.items() if k not in ("weights", "pretrained")}
        raise ConfigError(f"{src.text}: the constructor failed with args {shown}: {type(exc).__name__}: "
                          f"{first_line(exc)}") from None


def _check_logits(model: nn.Module, src: Source, shape: tuple[int, int, int], num_classes: int) -> None:
    """A dummy forward at the dataset's input shape: the output must be (N, num_classes) logits."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # its own generator: checking a model must not move the RNG that seeds the build
            out = model(torch.rand(2, *shape, generator=torch.Generator().manual_seed(0)))
    except Exception as exc:  # noqa: BLE001 - the model cannot take the dataset's images
        raise ConfigError(f"{src.text}: the model fails on a (2, {', '.join(map(str, shape))}) batch of the dataset's "
                          f"images: {type(exc).__name__}: {first_line(exc)}") from None
    finally:
        model.train(was_training)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (2, num_classes):
        raise ConfigError(f"{src.text}: the model must return (N, {num_classes}) logits for the dataset's "
                          f"{num_classes} classes; it returned {got} for a batch of 2")


def _module_origin(name: str) -> Optional[Path]:
    """The file a module is loaded from (the user's module: its code belongs in the cache key), or None."""
    try:
        with _on_path(Path.cwd()):
            origin = getattr(importlib.util.find_spec(name), "origin", None)
    except (ImportError, ValueError):
        return None
    return Path(origin) if origin and Path(origin).is_file() else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n
