"""edgekd's command line: build, status, gate, report, devices, cache.

Exit codes: 0 built and every gate check passed; 1 built but the gate failed; 2 bad input or a stage error
(one clear line on stderr, no traceback unless --debug).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from edgekd.errors import EdgekdError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Distil a PyTorch teacher into a small quantized student, export, evaluate, benchmark, gate.")
devices_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, invoke_without_command=True,
                          help="List target profiles, or show one.")
app.add_typer(devices_app, name="devices")
cache_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                        help="The run directory's stage store: list its entries, prune it.")
app.add_typer(cache_app, name="cache")

DEFAULT_STORE_MAX_SIZE = "2G"  # the stage store's bound after each build (least recently used entries go first)

_DEBUG = {"on": False}


def _say(msg: str) -> None:
    print(msg, flush=True)


def _fail(exc: BaseException, code: int = 2) -> None:
    if _DEBUG["on"]:
        raise exc
    from edgekd.distributed import world

    text = " ".join(str(exc).split()) or type(exc).__name__
    w = world()
    # The other ranks of a distributed build raise rank 0's EdgekdError too (the engine hands it over): one line, not
    # one per rank. Anything else is that rank's own failure and is said, with its rank.
    if w.is_main:
        print(f"edgekd: error: {text}", file=sys.stderr, flush=True)
    elif not isinstance(exc, EdgekdError):
        print(f"edgekd: error: [rank {w.rank}] {text}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def _guard(fn):
    """Run a command body, mapping user errors to one line + exit 2 and bugs to one line + exit 2."""
    try:
        return fn()
    except typer.Exit:
        raise
    except EdgekdError as exc:
        _fail(exc, exc.exit_code)
    except OSError as exc:  # the environment, not a bug: a full disk, a read-only or vanished folder
        if _DEBUG["on"]:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        _fail(EdgekdError(f"{exc.strerror or exc}{where}"))
    except KeyboardInterrupt:
        from edgekd.distributed import world

        if world().is_main:  # the ranks of a distributed build are interrupted together: one line
            print("edgekd: interrupted; finished stages are kept, rerun to continue", file=sys.stderr)
        raise typer.Exit(130)
    except Exception as exc:  # noqa: BLE001 - an internal error still gets one line, the traceback with --debug
        if _DEBUG["on"]:
            raise
        where = ""
        tb = exc.__traceback__
        while tb and tb.tb_next:
            tb = tb.tb_next
        if tb:
            where = f" (at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno})"
        _fail(RuntimeError(f"internal error: {type(exc).__name__}: {exc}{where}; rerun with --debug for details"))


def _load(pipeline: Optional[Path], target: str):
    from edgekd.config import load_pipeline
    from edgekd.paths import DEFAULT_PIPELINE
    from edgekd.targets.profiles import load_profile

    cfg = load_pipeline(pipeline or DEFAULT_PIPELINE)
    try:
        profile = load_profile(target)
    except UnicodeDecodeError:  # a profile file of bytes: one line like a pipeline file's
        raise EdgekdError(f"{target}: not a YAML text file (not UTF-8)") from None
    return cfg, profile


def _run_dir(run_dir: Optional[Path], cfg, profile) -> Path:
    """--run-dir, else runs/<pipeline>-<target>: a plain name that cannot leave runs/ (the pipeline name is checked
    when loaded; a target profile's name is checked here)."""
    if run_dir:
        return Path(run_dir)
    from edgekd.config import PLAIN_NAME, PLAIN_NAME_RULE

    if not PLAIN_NAME.fullmatch(profile.name):
        raise EdgekdError(f"target name {profile.name!r}: {PLAIN_NAME_RULE} (it names the run directory "
                          f"runs/<pipeline>-<target>); rename the profile or pass --run-dir")
    return Path("runs") / f"{cfg.name}-{profile.name}"


def _prepare_run_dir(rd: Path) -> None:
    """The run dir exists and is a writable directory, or one line says why not (before anything is written)."""
    import tempfile

    if rd.is_symlink() and not rd.exists():
        raise EdgekdError(f"--run-dir {rd}: a symbolic link to nothing ({os.readlink(rd)})")
    if rd.exists() and not rd.is_dir():
        raise EdgekdError(f"--run-dir {rd}: exists and is not a directory")
    try:
        rd.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=rd, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise EdgekdError(f"--run-dir {rd}: cannot be used as a run directory ({exc.strerror or exc})") from None


def _store_max_bytes(text: str) -> int:
    from edgekd.pipeline.store import parse_size

    try:
        return parse_size(text)
    except ValueError:
        raise EdgekdError(f"--store-max-size {text!r}: not a size (bytes, or with K, M, G, T: 500M, 2G)") from None


@app.command()
def build(
    target: str = typer.Option("android-arm64", "--target", "-t", help="target profile name or .yaml path"),
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", "-p", help="pipeline YAML (default: Fashion-MNIST)"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="default: runs/<pipeline>-<target>"),
    from_stage: Optional[str] = typer.Option(None, "--from", help="rerun this stage and everything after it"),
    only: Optional[str] = typer.Option(None, "--only", help="run only this stage (its inputs must exist)"),
    force: bool = typer.Option(False, "--force", help="ignore the cache, rebuild every stage"),
    nproc: int = typer.Option(1, "--nproc", help="training processes on this machine: data-parallel (DDP) through "
                                                 "torch's elastic launcher, gloo on CPU, NCCL on GPUs"),
    store_max_size: str = typer.Option(DEFAULT_STORE_MAX_SIZE, "--store-max-size",
                                       help="bound of the run dir's stage store (earlier configs' outputs); least "
                                            "recently used entries are evicted after the build. 0 keeps only the "
                                            "current ones"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
):
    """Run the pipeline: data, teacher, distill, export, quantize, TFLite, evaluate, benchmark, gate, report."""
    _DEBUG["on"] = debug

    def body():
        from edgekd import distributed

        if nproc < 1:
            raise EdgekdError(f"--nproc {nproc}: must be at least 1")
        store_max_bytes = _store_max_bytes(store_max_size)
        if nproc > 1:
            if distributed.launched_by_torchrun():
                raise EdgekdError("--nproc starts its own processes; under torchrun give --nproc-per-node to "
                                  "torchrun instead")
            _load(pipeline, target)  # bad input fails here, once, before any process starts
            argv = ["build", "--target", target]
            for flag, value in (("--pipeline", pipeline), ("--run-dir", run_dir), ("--from", from_stage),
                                ("--only", only), ("--store-max-size", store_max_size)):
                if value is not None:
                    argv += [flag, str(value)]
            argv += ["--force"] * force + ["--debug"] * debug
            raise typer.Exit(distributed.launch_local(nproc, argv))
        w = distributed.init_from_env()
        try:
            _build(w, target, pipeline, run_dir, from_stage, only, force, debug, store_max_bytes)
        finally:
            distributed.shutdown()

    _guard(body)


def _build(w, target, pipeline, run_dir, from_stage, only, force, debug, store_max_bytes: int) -> None:
    """One rank's build (the only one without torchrun). Rank 0 talks, locks the run dir, writes the reports and
    decides the exit code; the other ranks follow the engine's decisions and take part in the training stages."""
    import contextlib

    from edgekd.distributed import check_shared_run_dir, leave_together
    from edgekd.pipeline.engine import Engine
    from edgekd.pipeline.store import RunLock
    from edgekd.reports.render import write_reports
    from edgekd.stages import all_stages

    say = _say if w.is_main else (lambda msg: None)
    if from_stage and only:
        raise EdgekdError("--from and --only cannot be combined")
    cfg, profile = _load(pipeline, target)
    rd = _run_dir(run_dir, cfg, profile)
    w.on_main(lambda: _prepare_run_dir(rd))
    say(f"edgekd build: pipeline {cfg.name} ({cfg.source}) -> target {profile.name}; run dir {rd}"
        + (f"; training on {w.describe()}" if w.is_distributed else ""))
    t0 = time.perf_counter()
    with contextlib.ExitStack() as held:
        w.on_main(lambda: held.enter_context(RunLock(rd)) and None)
        check_shared_run_dir(w, rd)
        engine = Engine(all_stages(), cfg, profile, rd, log=say, debug=debug, world=w,
                        store_max_bytes=store_max_bytes)
        result = engine.build(from_stage=from_stage, only=only, force=force)
        leave_together(w)  # the other ranks exit here
        report = None
        if "report" in result.outputs and any(r.name == "report" for r in result.records):
            report = dict(result.outputs["report"].data)
            report["stages"] = [{"name": r.name, "status": r.status, "seconds": round(r.seconds, 3),
                                 **({"message": r.message} if r.message else {})} for r in result.records]
            report["build_seconds"] = round(time.perf_counter() - t0, 2)
            paths = write_reports(report, rd)
    _say("stages: " + ", ".join(f"{r.name}={r.status}" for r in result.records))
    if report is not None:
        _say("report: " + ", ".join(str(p) for p in paths.values()))
    if result.error is not None:
        raise result.error
    if report is not None and not report["gate"]["passed"]:
        failed = [c["name"] for c in report["gate"]["checks"] if not c["passed"]]
        print(f"edgekd: gate failed: {', '.join(failed[:6])}" + (" ..." if len(failed) > 6 else ""),
              file=sys.stderr)
        raise typer.Exit(1)
    if report is not None:
        _say(f"gate passed in {time.perf_counter() - t0:.1f} s")


@app.command()
def status(
    target: str = typer.Option("android-arm64", "--target", "-t"),
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", "-p"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
):
    """Each stage's state: up-to-date, stored (restored without running on the next build), stale (and why),
    missing, failed, skipped."""

    def body():
        from edgekd.pipeline.engine import Engine
        from edgekd.stages import all_stages

        cfg, profile = _load(pipeline, target)
        rd = _run_dir(run_dir, cfg, profile)
        rows = Engine(all_stages(), cfg, profile, rd).status()
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        _say(f"run dir {rd} (pipeline {cfg.name}, target {profile.name})")
        for row in rows:
            _say(f"  {row['stage']:14s} {row['state']:10s} {row['why']}")

    _guard(body)


@app.command()
def gate(
    source: Path = typer.Argument(..., help="a run directory or its report.json"),
    baseline: Optional[Path] = typer.Option(None, "--baseline", "-b",
                                            help="an earlier report.json (or run dir) to check for regressions"),
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", "-p",
                                            help="take the budget from this pipeline YAML instead of the stored one"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the re-evaluated report here in every format "
                                                           "(report.json, .md, .html, .junit.xml)"),
    as_json: bool = typer.Option(False, "--json", help="print the gate result as JSON"),
):
    """Re-evaluate the gate from a build's stored results (no rebuild). Exit 0 pass, 1 fail, 2 bad input.

    The budget and the regression tolerances come from the pipeline config stored in the report
    (`budget`, `budget.regression`), or from --pipeline.
    """

    def body():
        from edgekd.reports.checks import format_check
        from edgekd.reports.render import write_reports
        from edgekd.stages.gate import regate

        report = _read_report(source)
        base = _read_report(baseline) if baseline is not None else None
        budget = None
        if pipeline is not None:
            from edgekd.config import load_pipeline, to_plain

            budget = load_pipeline(pipeline).budget
            # the re-evaluated report shows (and plots) the budget it was checked against
            report = {**report, "config": {**report.get("config", {}), "budget": to_plain(budget)}}
        where = str(source / "report.json" if source.is_dir() else source)
        result = regate(report, budget=budget, baseline=base, where=where)
        if pipeline is not None:
            result["budget_source"] = str(pipeline)
        if out is not None:
            if out.resolve() == (source if source.is_dir() else source.parent).resolve():
                raise EdgekdError(f"--out {out}: that is the build's own report; choose another directory")
            write_reports({**report, "gate": result}, out)
        if as_json:
            print(json.dumps(result, indent=2))
        else:
            for c in result["checks"]:
                _say(format_check(c))
            for w in (result.get("regression") or {}).get("warnings", []):
                _say(f"warning: {w}")
            _say(f"gate {'passed' if result['passed'] else 'FAILED'}; best artifact: {result['best_artifact']}"
                 + (f" (vs baseline {baseline})" if baseline is not None else ""))
        if not result["passed"]:
            raise typer.Exit(1)

    _guard(body)


FORMATS = ("md", "html", "json", "junit")


@app.command()
def report(
    source: Path = typer.Argument(..., help="a run directory or its report.json"),
    fmt: str = typer.Option("md", "--format", "-f", help="md, html, json or junit"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write to this file instead of stdout"),
):
    """Render a build's report: Markdown (pull requests), self-contained HTML with plots, JSON, JUnit XML (CI)."""

    def body():
        from edgekd.pipeline.store import atomic_write_text
        from edgekd.reports.render import render

        if fmt not in FORMATS:
            raise EdgekdError(f"--format {fmt}: unknown format (choose {', '.join(FORMATS)})")
        text = render(_read_report(source), fmt)
        if output is None:
            sys.stdout.write(text)
        else:
            atomic_write_text(output, text)
            _say(f"wrote {output}")

    _guard(body)


def _read_report(source: Path) -> dict:
    path = source / "report.json" if source.is_dir() else source
    if not path.is_file():
        raise EdgekdError(f"no report at {path}: run `edgekd build` first")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise EdgekdError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != "edgekd.report/1":
        raise EdgekdError(f"{path}: not an edgekd report (schema edgekd.report/1)")
    return data


def _cache_run_dir(run_dir: Optional[Path], pipeline: Optional[Path], target: str) -> Path:
    """--run-dir, else the pipeline's and target's default run dir; it must hold a stage store."""
    if run_dir is None:
        cfg, profile = _load(pipeline, target)
        run_dir = _run_dir(None, cfg, profile)
    if not (run_dir / "store").is_dir():
        raise EdgekdError(f"{run_dir}: no stage store here (run `edgekd build` first)")
    return run_dir


@cache_app.command("list")
def cache_list(
    target: str = typer.Option("android-arm64", "--target", "-t"),
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", "-p"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir"),
):
    """The store's entries: stage, key, size, last used, and whether the run dir's slots use it now."""

    def body():
        from edgekd.pipeline.engine import slot_keys
        from edgekd.pipeline.store import StageStore, format_size

        rd = _cache_run_dir(run_dir, pipeline, target)
        store, current = StageStore(rd / "store"), slot_keys(rd)
        for e in sorted(store.entries(), key=lambda e: (e.stage, -e.last_used)):
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
            _say(f"  {e.stage:16s} {e.key[:12]}  {format_size(e.size):>9s}  {used}"
                 + ("  current" if (e.stage, e.key) in current else ""))
        _say(f"store {rd / 'store'}: {format_size(store.size())}")

    _guard(body)


@cache_app.command("prune")
def cache_prune(
    target: str = typer.Option("android-arm64", "--target", "-t"),
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", "-p"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir"),
    max_size: str = typer.Option("0", "--max-size", help="keep at most this much (500M, 2G); default 0: only the "
                                                         "entries the run dir uses now"),
):
    """Evict store entries, least recently used first, down to --max-size. The current outputs always stay."""

    def body():
        from edgekd.pipeline.engine import slot_keys
        from edgekd.pipeline.store import RunLock, StageStore, format_size, parse_size

        try:
            limit = parse_size(max_size)
        except ValueError:
            raise EdgekdError(f"--max-size {max_size!r}: not a size (bytes, or with K, M, G, T: 500M, 2G)") from None
        rd = _cache_run_dir(run_dir, pipeline, target)
        with RunLock(rd):  # not while a build uses the store
            store = StageStore(rd / "store")
            removed = store.prune(limit, keep=slot_keys(rd))
            _say(f"removed {len(removed)} entries ({format_size(sum(e.size for e in removed))}); "
                 f"store {rd / 'store'} now {format_size(store.size())}")

    _guard(body)


@devices_app.callback()
def devices(ctx: typer.Context):
    """List the target profiles in devices/."""
    if ctx.invoked_subcommand is not None:
        return

    def body():
        from edgekd.targets.profiles import available_profiles, load_profile

        for name in available_profiles():
            p = load_profile(name)
            _say(f"{name:18s} {p.kind:4s} {p.cpu_arch:7s} {p.description}")

    _guard(body)


@devices_app.command("show")
def devices_show(name: str = typer.Argument(..., help="profile name or .yaml path")):
    """Print one target profile, validated."""

    def body():
        import yaml

        from edgekd.targets.profiles import load_profile

        profile = load_profile(name)
        print(yaml.safe_dump(profile.as_dict(), sort_keys=False).rstrip())
        # what the derived settings come to on this host
        off = profile.host_disabled_optimizers
        print(f"# host measurements: onnxruntime {'without ' + ', '.join(off) if off else 'with all its optimizers'}"
              f" ({'as the profile says' if profile.onnxruntime_disabled_optimizers is not None else 'from cpu_arch'})")

    _guard(body)


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "--debug" in sys.argv:
        _DEBUG["on"] = True
    app()


if __name__ == "__main__":
    main()
