"""The build engine: stage order, content-addressed cache, atomic stage outputs, resume, status.

A stage is a pass with a `run(ctx) -> data` contract: it reads its inputs' files through `ctx.input_path`,
writes its own files into `ctx.out_dir`, and returns a JSON-able summary. The engine keys each stage's output
by a digest of everything that determines it:

    key = sha256(edgekd version and code digest, stage name, the stage's config section, the target profile (if
                 the stage uses it), and the content digests of its input stages' outputs)

so a change anywhere reruns exactly that stage and what depends on it. Outputs land as
`stages/<name>/` with a `manifest.json` (key, file digests, summary); the folder is written under a temporary
name and renamed into place only when the stage succeeded, so a crash never leaves a half-written output
that a later run trusts. `stages/<name>.work/` keeps per-epoch checkpoints for resuming a killed stage.

`stages/<name>/` is the current slot, what other stages and users read. Every finished output is also kept in the
run dir's stage store, `store/<name>/<key>/` (hard links: no second copy of the bytes), so returning to an earlier
configuration restores its outputs instead of recomputing them, and a failed rerun never replaces a good result:
the store and the slot change only after a stage succeeded. The store is bounded by least-recently-used eviction.

This module imports no ML library.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from edgekd import __version__
from edgekd.distributed import World
from edgekd.errors import EdgekdError, StageError, first_line
from edgekd.pipeline.store import (StageStore, atomic_write_json, format_size, read_json, remove_dead_leftovers,
                                  sha256_file, sha256_json)

MANIFEST = "manifest.json"
_CODE_DIGEST: list[str] = []


def code_version() -> str:
    """edgekd's version plus a digest of its own source files: a changed stage implementation (a fix, a new
    default) must not leave results made by the old code looking current. Any .py change rebuilds; coarse but safe."""
    if not _CODE_DIGEST:
        import hashlib

        root = Path(__file__).resolve().parent.parent
        h = hashlib.sha256()
        for path in sorted(root.rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
        _CODE_DIGEST.append(h.hexdigest()[:12])
    return f"{__version__}+{_CODE_DIGEST[0]}"


@dataclass
class StageOutput:
    """What a finished stage left: files (logical name -> path relative to the run dir) and its summary."""

    name: str
    files: dict[str, str]
    digests: dict[str, str]
    data: dict
    key: str

    @property
    def content_digest(self) -> str:
        return sha256_json({"files": self.digests, "data": self.data})


@dataclass
class StageContext:
    cfg: Any
    target: Any
    run_dir: Path
    out_dir: Path
    work_dir: Path
    inputs: dict[str, StageOutput]
    log: Callable[[str], None]
    options: dict = field(default_factory=dict)

    def input_path(self, stage: str, file: str) -> Path:
        out = self.inputs.get(stage)
        if out is None or file not in out.files:
            raise StageError(self.options.get("stage", "?"), f"input {stage}/{file} is missing")
        return self.run_dir / out.files[file]

    def has_input(self, stage: str, file: str | None = None) -> bool:
        out = self.inputs.get(stage)
        return out is not None and (file is None or file in out.files)

    def input_data(self, stage: str) -> dict:
        out = self.inputs.get(stage)
        return out.data if out is not None else {}


class Stage:
    """Base class of the pipeline's passes. Subclasses set `name`, `deps` and implement `config` and `run`."""

    name: str = ""
    deps: tuple[str, ...] = ()  # required upstream stages
    optional_deps: tuple[str, ...] = ()  # used when present (a failed or disabled one is simply absent)
    uses_target: bool = False
    distributed: bool = False  # a training stage: runs on every rank of a distributed build (else on rank 0 only)
    description: str = ""

    def config(self, cfg: Any) -> Optional[dict]:
        """The part of the pipeline config that determines this stage's output; None = stage disabled."""
        raise NotImplementedError

    def extra_key(self, cfg: Any, target: Any) -> dict:
        """Content outside the config that determines the output (e.g. a dataset's or checkpoint's digest)."""
        return {}

    def run(self, ctx: StageContext) -> dict:
        raise NotImplementedError


@dataclass
class StageRecord:
    name: str
    status: str  # ran | cached (message "restored from the store" when it came from there) | failed | skipped | not-run
    seconds: float = 0.0
    message: str = ""


@dataclass
class BuildResult:
    records: list[StageRecord]
    outputs: dict[str, StageOutput]
    error: Optional[EdgekdError] = None


class Engine:
    def __init__(self, stages: Sequence[Stage], cfg: Any, target: Any, run_dir: Path,
                 log: Callable[[str], None] = print, debug: bool = False, options: dict | None = None,
                 world: World | None = None, store_dir: Path | None = None, store_max_bytes: int | None = None):
        self.stages = list(stages)
        self.by_name = {s.name: s for s in self.stages}
        self.cfg, self.target, self.run_dir = cfg, target, Path(run_dir)
        self.log, self.debug = log, debug
        self.options = options or {}
        self.world = world if world is not None else World()  # a single process
        self.store = StageStore(Path(store_dir) if store_dir is not None else self.run_dir / "store")
        self.store_max_bytes = store_max_bytes  # None: the store is not pruned after a build

    # ------------------------------------------------------------------------------------------ keys

    def key_parts(self, stage: Stage, inputs: dict[str, StageOutput]) -> dict:
        return {
            "edgekd": code_version(),
            "stage": stage.name,
            "config": stage.config(self.cfg),
            "extra": stage.extra_key(self.cfg, self.target),
            "target": self.target.digest() if stage.uses_target else None,
            "inputs": {name: out.content_digest for name, out in sorted(inputs.items())},
        }

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / "stages" / name

    def work_dir(self, name: str) -> Path:
        """A stage's checkpoints, kept across a killed run: stages/<name>.work."""
        return self.run_dir / "stages" / f"{name}.work"

    @staticmethod
    def inputs_of(stage: Stage, outputs: dict[str, StageOutput]) -> dict[str, StageOutput]:
        return {d: outputs[d] for d in (*stage.deps, *stage.optional_deps) if d in outputs}

    def load_output(self, name: str, verify: bool = True) -> tuple[Optional[StageOutput], str]:
        """The stored output of a stage, or (None, why not). With `verify`, file digests are re-checked."""
        manifest = read_json(self.stage_dir(name) / MANIFEST)
        if not isinstance(manifest, dict) or "key" not in manifest:
            return None, "missing"
        out = StageOutput(name, manifest["files"], manifest["digests"], manifest["data"], manifest["key"])
        if verify:
            for file, rel in out.files.items():
                path = self.run_dir / rel
                if not path.is_file():
                    return None, f"file {rel} is gone"
                if sha256_file(path) != out.digests[file]:
                    return None, f"file {rel} was modified or corrupted (digest mismatch)"
        return out, ""

    # ------------------------------------------------------------------------------------------ build

    def build(self, from_stage: str | None = None, only: str | None = None, force: bool = False) -> BuildResult:
        for opt, value in (("--from", from_stage), ("--only", only)):
            if value is not None and value not in self.by_name:
                names = ", ".join(self.by_name)
                raise EdgekdError(f"{opt} {value}: no such stage (stages: {names})")
        order = [s.name for s in self.stages]
        forced = set()
        if force:
            forced = set(order)
        elif from_stage:
            forced = set(order[order.index(from_stage):])
        records: list[StageRecord] = []
        outputs: dict[str, StageOutput] = {}
        error: Optional[EdgekdError] = None
        for stage in self.stages:
            # Rank 0 decides (it alone reads the cache), every rank of a distributed build follows.
            action, payload = self.world.on_main(lambda: self._decide(stage, outputs, only, forced))
            if action == "use":
                if payload is not None:
                    outputs[stage.name] = payload
                continue
            if action in ("skipped", "not-run"):
                records.append(StageRecord(stage.name, action, message=payload))
                continue
            if action in ("cached", "restored"):
                outputs[stage.name] = payload
                records.append(StageRecord(stage.name, "cached",
                                           message="restored from the store" if action == "restored" else ""))
                continue
            key, parts = payload
            inputs = self.inputs_of(stage, outputs)
            t0 = time.perf_counter()
            status, result = self._run_on_ranks(stage, inputs, key, parts)
            seconds = time.perf_counter() - t0
            if status == "failed":
                records.append(StageRecord(stage.name, "failed", seconds, str(result)))
                error = error or result
                continue
            outputs[stage.name] = result
            records.append(StageRecord(stage.name, "ran", seconds))
        if self.store_max_bytes is not None:
            self.world.on_main(self._bound_store)
        return BuildResult(records, outputs, error)

    def _bound_store(self) -> None:
        try:
            removed = self.store.prune(self.store_max_bytes, keep=slot_keys(self.run_dir))
        except OSError as exc:  # a full or failing disk: the build's results stand, the store stays as it was
            self.log(f"warning: the stage store could not be pruned: {exc.strerror or exc}")
            return
        if removed:
            self.log(f"stage store: evicted {len(removed)} least recently used entries "
                     f"({format_size(sum(e.size for e in removed))}) to stay under {format_size(self.store_max_bytes)}")

    def _decide(self, stage: Stage, outputs: dict[str, StageOutput], only: str | None,
                forced: set[str]) -> tuple[str, Any]:
        """What to do with `stage`: ("use", stored output or None) for the stages --only leaves alone, ("skipped" |
        "not-run", why), ("cached", output) or ("run", (key, key parts)); the work folder is ready for a run."""
        if only and stage.name != only:  # a disabled stage's leftover output (prune turned off) is not an input
            enabled = stage.config(self.cfg) is not None
            return "use", self.load_output(stage.name, verify=False)[0] if enabled else None
        if stage.config(self.cfg) is None:
            return "skipped", "disabled in the pipeline"
        missing = [d for d in stage.deps if d not in outputs]
        if missing:
            if only:
                raise EdgekdError(f"--only {only}: its input {missing[0]} has not been built in {self.run_dir}; "
                                  f"run `edgekd build` (or --only {missing[0]}) first")
            return "not-run", f"needs {', '.join(missing)}"
        inputs = self.inputs_of(stage, outputs)
        parts = self.key_parts(stage, inputs)
        key = sha256_json(parts)
        if not (only or stage.name in forced):
            cached, why = self.load_output(stage.name)
            if cached is not None and cached.key == key:
                self._keep_in_store(cached)
                return "cached", cached
            if cached is None and why not in ("missing",):
                self.log(f"warning: {stage.name}: stored output rejected: {why}; rebuilding")
            restored = self._restore(stage.name, key)
            if restored is not None:
                return "restored", restored
        self._prepare_work(stage.name, key)
        return "run", (key, parts)

    def _keep_in_store(self, out: StageOutput) -> None:
        """A current slot's output is in the store too (a run dir built before the store existed gets it now, as
        hard links); and it counts as just used."""
        if (self.store.entry_dir(out.name, out.key) / MANIFEST).is_file():
            self.store.touch(out.name, out.key)
            return
        try:
            self.store.publish(out.name, out.key, self.stage_dir(out.name))
        except OSError:
            pass  # only a convenience: the slot itself is intact

    def _restore(self, name: str, key: str) -> Optional[StageOutput]:
        """The store's intact entry for `key`, put into the stage's slot; None when there is none (a damaged entry is
        dropped with a warning) or it cannot be restored (the stage then runs)."""
        manifest, why = self.store.load(name, key)
        if manifest is None:
            if why != "missing":
                self.log(f"warning: {name}: store entry {key[:12]} rejected: {why}; rebuilding")
                self.store.discard(name, key)
            return None
        tmp = self._fresh_tmp(name)
        try:
            self.store.materialize(name, key, tmp)
            self._swap_slot(name, tmp)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            self.log(f"warning: {name}: could not restore store entry {key[:12]} ({exc.strerror or exc}); rebuilding")
            return None
        self._clear_failed(name)
        self.log(f"==> {name}: restored from the store")
        return StageOutput(name, manifest["files"], manifest["digests"], manifest["data"], key)

    def _fresh_tmp(self, name: str) -> Path:
        tmp = self.stage_dir(name).parent / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        if tmp.parent.is_dir():
            remove_dead_leftovers(tmp.parent)  # a killed build's half-written folders
        return tmp

    def _swap_slot(self, name: str, tmp: Path) -> None:
        """Swap the finished folder into the slot: the old output (if any) is removed only after the new one is
        in place."""
        final = self.stage_dir(name)
        old = final.parent / f".{name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def _clear_failed(self, name: str) -> None:
        (self.stage_dir(name).parent / f"{name}.failed.json").unlink(missing_ok=True)

    def _prepare_work(self, name: str, key: str) -> None:
        """The work folder (checkpoints) survives a killed run, but only for the same key."""
        work = self.work_dir(name)
        if read_json(work / "key.json") != {"key": key}:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            atomic_write_json(work / "key.json", {"key": key})

    def _run_on_ranks(self, stage: Stage, inputs: dict[str, StageOutput], key: str,
                      parts: dict) -> tuple[str, Any]:
        """("ran", output) or ("failed", error), the same on every rank.

        A single process, or a stage that is not `distributed`: rank 0 runs it and tells the others the outcome.
        A distributed stage (training) runs on every rank; rank 0's output is the stage's. Its failure ends the
        build (exit 2, one line, the failure marked by rank 0) instead of going on with independent stages: the
        other ranks may be waiting in a collective of the training loop, and torchrun stops them all when one rank
        exits with an error. Finished stages and the stage's checkpoints are kept.
        """
        def attempt() -> tuple[str, Any]:
            try:
                return "ran", self._run_stage(stage, inputs, key, parts)
            except EdgekdError as exc:
                self._mark_failed(stage.name, str(exc))
                return "failed", exc

        if not (self.world.is_distributed and getattr(stage, "distributed", False)):
            return self.world.broadcast(attempt() if self.world.is_main else None)
        if self.world.is_main:
            status, result = attempt()
            if status == "failed":
                print(f"edgekd: error: {' '.join(str(result).split())}", file=sys.stderr, flush=True)
                os._exit(result.exit_code)
        else:
            self._follow_stage(stage, inputs)
            result = None
        return "ran", self.world.broadcast(result)

    def _follow_stage(self, stage: Stage, inputs: dict[str, StageOutput]) -> None:
        """A distributed stage on a rank other than 0: the same run (it takes part in every collective), reading the
        run dir, writing only into a private scratch folder that is thrown away.

        When it fails, rank 0 almost always fails the same way (same code, same data, the NaN check is collective)
        and says so; this rank waits a moment for torchrun to stop it after rank 0 exits, so the user reads one
        line, not one per rank. A failure of its own is said after that moment, with its rank.
        """
        import tempfile

        try:
            with tempfile.TemporaryDirectory(prefix=f"edgekd-rank{self.world.rank}-{stage.name}-") as scratch:
                ctx = StageContext(self.cfg, self.target, self.run_dir, Path(scratch),
                                   self.work_dir(stage.name), inputs,
                                   lambda msg: None, {**self.options, "stage": stage.name})
                stage.run(ctx)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            if self.debug:
                raise
            time.sleep(10)
            what = str(exc) if isinstance(exc, EdgekdError) else f"stage {stage.name}: {type(exc).__name__}: " \
                                                                 f"{first_line(exc, default='')}"
            print(f"edgekd: error: [rank {self.world.rank}] {' '.join(what.split())}", file=sys.stderr, flush=True)
            os._exit(2)

    def _call_run(self, stage: Stage, ctx: StageContext, tmp: Path) -> dict:
        try:
            return stage.run(ctx) or {}
        except EdgekdError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except KeyboardInterrupt:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except Exception as exc:  # noqa: BLE001 - an unexpected failure becomes one clear line
            shutil.rmtree(tmp, ignore_errors=True)
            if self.debug:
                raise
            where = traceback.extract_tb(exc.__traceback__)[-1]
            raise StageError(stage.name, f"{type(exc).__name__}: {first_line(exc, default='')}"
                             f" (at {Path(where.filename).name}:{where.lineno}; rerun with --debug for the traceback)"
                             ) from None

    def _run_stage(self, stage: Stage, inputs: dict[str, StageOutput], key: str, parts: dict) -> StageOutput:
        tmp = self._fresh_tmp(stage.name)
        work = self.work_dir(stage.name)
        try:
            tmp.mkdir(parents=True)
        except OSError as exc:
            raise StageError(stage.name, f"cannot write in {tmp.parent}: {exc.strerror or exc}") from None
        ctx = StageContext(self.cfg, self.target, self.run_dir, tmp, work, inputs,
                           lambda msg: self.log(f"[{stage.name}] {msg}"), {**self.options, "stage": stage.name})
        self.log(f"==> {stage.name}")
        data = self._call_run(stage, ctx, tmp)
        files, digests = {}, {}
        try:
            for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
                rel_in_stage = path.relative_to(tmp).as_posix()
                files[rel_in_stage] = (Path("stages") / stage.name / rel_in_stage).as_posix()
                digests[rel_in_stage] = sha256_file(path)
            manifest = {"stage": stage.name, "key": key, "key_parts": parts, "files": files, "digests": digests,
                        "data": data, "edgekd": __version__,
                        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            atomic_write_json(tmp / MANIFEST, manifest)
            # Store first, then the slot: a failure in between leaves the old slot and a complete new entry.
            self.store.publish(stage.name, key, tmp)
            self._swap_slot(stage.name, tmp)
        except OSError as exc:  # a full disk, a vanished folder: the stage failed, nothing built before is touched
            shutil.rmtree(tmp, ignore_errors=True)
            where = f" ({exc.filename})" if exc.filename else ""
            raise StageError(stage.name, f"could not store its output: {exc.strerror or exc}{where}") from None
        shutil.rmtree(work, ignore_errors=True)
        self._clear_failed(stage.name)
        return StageOutput(stage.name, files, digests, data, key)

    def _mark_failed(self, name: str, message: str) -> None:
        try:
            atomic_write_json(self.stage_dir(name).parent / f"{name}.failed.json",
                              {"stage": name, "error": message,
                               "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        except OSError:
            pass  # a note for `edgekd status` only; on a full disk the error line itself must still come out

    # ------------------------------------------------------------------------------------------ status

    def status(self) -> list[dict]:
        """Each stage's state without running anything: up-to-date, stored (an earlier build's output for this
        config is in the store: the next build restores it), stale (with why), missing, failed, skipped. Later stages
        are judged on the outputs the current config would use (the slot's, or the store's)."""
        rows: list[dict] = []
        usable: dict[str, StageOutput] = {}  # what the current config would use, stage by stage
        for stage in self.stages:
            if stage.config(self.cfg) is None:
                rows.append({"stage": stage.name, "state": "skipped", "why": "disabled in the pipeline"})
                continue
            state, why = self._stage_state(stage, usable)
            rows.append({"stage": stage.name, "state": state, "why": why})
        return rows

    def _stage_state(self, stage: Stage, usable: dict[str, StageOutput]) -> tuple[str, str]:
        failed = read_json(self.stage_dir(stage.name).parent / f"{stage.name}.failed.json")
        slot, slot_why = self.load_output(stage.name)
        unusable = [d for d in stage.deps if d not in usable]
        unusable += [d for d in stage.optional_deps if d not in usable and self._enabled(d)]
        if unusable:
            state, why = ("stale", f"input {unusable[0]} is not up to date") if slot is not None else \
                ("missing", "" if slot_why == "missing" else slot_why)
        else:
            parts = self.key_parts(stage, self.inputs_of(stage, usable))
            key = sha256_json(parts)
            stored = self.store.load(stage.name, key)[0] if slot is None or slot.key != key else None
            if slot is not None and slot.key == key:
                usable[stage.name] = slot
                return "up-to-date", ""
            if stored is not None:
                usable[stage.name] = StageOutput(stage.name, stored["files"], stored["digests"], stored["data"], key)
                return "stored", "built before for this config; the next build restores it without running"
            if slot is not None:
                old_parts = read_json(self.stage_dir(stage.name) / MANIFEST).get("key_parts", {})
                state, why = "stale", _why_changed(old_parts, parts)
            else:
                state, why = "missing", "" if slot_why == "missing" else slot_why
        if failed:
            state, why = "failed", failed["error"]
        return state, why

    def _enabled(self, name: str) -> bool:
        stage = self.by_name.get(name)
        return stage is not None and stage.config(self.cfg) is not None


def slot_keys(run_dir: Path) -> set[tuple[str, str]]:
    """(stage, key) of every output in the run dir's slots `stages/<name>/`: the store entries a prune keeps."""
    keys = set()
    for manifest_path in Path(run_dir).glob(f"stages/*/{MANIFEST}"):
        manifest = read_json(manifest_path)
        if isinstance(manifest, dict) and "key" in manifest:
            keys.add((manifest_path.parent.name, manifest["key"]))
    return keys


def _why_changed(old: dict, new: dict) -> str:
    if old.get("edgekd") != new.get("edgekd"):
        return f"edgekd version or code changed ({old.get('edgekd')} -> {new.get('edgekd')})"
    if old.get("config") != new.get("config"):
        changed = _diff_keys(old.get("config"), new.get("config"))
        return "config changed: " + (", ".join(changed[:4]) if changed else "section")
    if old.get("extra") != new.get("extra"):
        return "source content changed: " + ", ".join(_diff_keys(old.get("extra"), new.get("extra"))[:4])
    if old.get("target") != new.get("target"):
        return "target profile changed"
    changed = [k for k in set(old.get("inputs", {})) | set(new.get("inputs", {}))
               if old.get("inputs", {}).get(k) != new.get("inputs", {}).get(k)]
    return "input changed: " + ", ".join(sorted(changed)) if changed else "key changed"


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".")] if a != b else []


def eprint(msg: str) -> None:
    print(msg, file=sys.stderr)
