"""Faults around the stage store, with real processes and a real file system: kill -9 in the middle of writing,
a full disk (a small tmpfs), and two builds of different configs sharing one store. After each, every entry the
store holds is intact (no corrupt entry is ever read back) and the next build succeeds."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgekd.pipeline.engine import slot_keys
from edgekd.pipeline.store import StageStore

REPO = Path(__file__).resolve().parent.parent

# A two-stage pipeline of plain files, built by a real engine in its own process: `produce` writes FILES files whose
# content depends on the config value; `consume` concatenates them. Big enough that writing and storing take a
# while (a kill lands in the middle), small enough for a tmpfs of a few MB.
BUILDER = textwrap.dedent('''
    import sys
    from pathlib import Path
    from edgekd.errors import EdgekdError
    from edgekd.pipeline.engine import Engine, Stage

    FILES, SIZE = int(sys.argv[4]), int(sys.argv[5])

    class Produce(Stage):
        name = "produce"
        def config(self, cfg):
            return {"value": cfg}
        def run(self, ctx):
            for i in range(FILES):
                (ctx.out_dir / f"part{i:04d}.bin").write_bytes(bytes([cfg_byte(ctx.cfg, i)]) * SIZE)
            return {"files": FILES}

    class Consume(Stage):
        name = "consume"
        deps = ("produce",)
        def config(self, cfg):
            return {}
        def run(self, ctx):
            total = sum(ctx.input_path("produce", f"part{i:04d}.bin").read_bytes()[0] for i in range(FILES))
            (ctx.out_dir / "sum.txt").write_text(str(total))
            return {"sum": total}

    def cfg_byte(cfg, i):
        return (cfg * 7 + i) % 251

    class T:
        name = "t"
        def digest(self):
            return "t"

    run_dir, store, value = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    result = Engine([Produce(), Consume()], value, T(), run_dir, log=lambda m: None, store_dir=store).build()
    print(" ".join(f"{r.name}={r.status}" for r in result.records), flush=True)
    if result.error is not None:
        print(f"edgekd: error: {result.error}", file=sys.stderr)
        sys.exit(2)
''')


def _expected_sum(value: int, files: int) -> int:
    return sum((value * 7 + i) % 251 for i in range(files))


@pytest.fixture
def builder(tmp_path):
    script = tmp_path / "builder.py"
    script.write_text(BUILDER)

    def start(run_dir, store, value, files=400, size=4096, **popen):
        return subprocess.Popen([sys.executable, str(script), str(run_dir), str(store), str(value), str(files),
                                 str(size)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, **popen)

    def run(run_dir, store, value, files=400, size=4096):
        proc = start(run_dir, store, value, files, size)
        out, err = proc.communicate(timeout=120)
        return proc.returncode, out, err

    start.run = run
    return start


def _assert_every_entry_intact(store_dir: Path) -> int:
    """Every entry the store shows verifies against its manifest; returns how many there are."""
    store = StageStore(store_dir)
    entries = store.entries()
    for e in entries:
        manifest, why = store.load(e.stage, e.key)
        assert manifest is not None, f"{e.stage}/{e.key[:12]}: {why}"
    return len(entries)


def _assert_built(run_dir: Path, value: int, files: int = 400) -> None:
    assert (run_dir / "stages/consume/sum.txt").read_text() == str(_expected_sum(value, files))


def test_kill_9_while_a_stage_writes_and_stores_never_leaves_a_readable_corrupt_entry(builder, tmp_path):
    """kill -9 at moments spread over a whole build (stage writing its files, digests, store publication, slot
    swap): whatever the moment, the store holds only intact entries and the next build succeeds."""
    run_dir, store = tmp_path / "run", tmp_path / "store"
    t0 = time.perf_counter()
    code, out, err = builder.run(run_dir, store, 1)  # a reference build: how long a whole build takes here
    full = time.perf_counter() - t0
    assert code == 0, err
    rng = random.Random(15)
    for attempt in range(8):
        value = 100 + attempt  # a new config each time: the stage really runs and writes
        proc = builder(run_dir, store, value)
        time.sleep(rng.uniform(0.05, 1.0) * full)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        _assert_every_entry_intact(store)
        code, out, err = builder.run(run_dir, store, value)
        assert code == 0 and not err, (out, err)
        _assert_built(run_dir, value)
        _assert_every_entry_intact(store)
    leftovers = [p for p in (*store.rglob(".*"), *(run_dir / "stages").glob(".*"))]
    assert not leftovers, f"a killed writer's leftovers were not cleared: {leftovers}"


def test_full_disk_fails_the_stage_with_one_line_and_keeps_every_entry(builder, tmp_path):
    """The store on a 3 MB tmpfs: a config whose outputs do not fit fails with one line, exit 2; the run dir's
    current outputs and every store entry are as before; once space is freed the next build succeeds."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    try:
        run_dir, store = mount / "run", mount / "store"
        code, _, err = builder.run(run_dir, store, 1, files=300, size=4096)  # 1.2 MB: fits
        assert code == 0, err
        before = {p: p.read_bytes() for p in mount.rglob("*") if p.is_file() and p.name != ".lock"
                  and not p.name.endswith(".failed.json")}
        code, out, err = builder.run(run_dir, store, 2, files=600, size=4096)  # 2.4 MB more: the disk fills
        assert code == 2, (out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0] and "stage produce" in lines[0], err
        after = {p: p.read_bytes() for p in before}
        assert after == before  # byte for byte
        assert _assert_every_entry_intact(store) == 2
        assert not [p for p in mount.rglob(".*") if p.name != ".lock"]  # no half-written folder left
        subprocess.run(["mount", "-o", "remount,size=16m", str(mount)], check=True)
        code, _, err = builder.run(run_dir, store, 2, files=600, size=4096)
        assert code == 0, err
        _assert_built(run_dir, 2, files=600)
        assert _assert_every_entry_intact(store) == 4
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_two_builds_of_different_configs_share_one_store(builder, tmp_path):
    """Two builds of different configs at once, on two run dirs sharing one store, three rounds: both succeed, the
    store holds intact entries of both, and each config's next build comes wholly from the store."""
    store = tmp_path / "store"
    for round_ in range(3):
        procs = [builder(tmp_path / f"run{v}", store, v) for v in (1, 2)]
        results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
        for out, err, code in results:
            assert code == 0 and not err, (out, err)
        _assert_every_entry_intact(store)
    for v in (1, 2):
        code, out, err = builder.run(tmp_path / f"run{v}", store, v)
        assert code == 0 and out.split() == ["produce=cached", "consume=cached"], (out, err)
        _assert_built(tmp_path / f"run{v}", v)
    # a third run dir of config 2: everything restored from the shared store, nothing recomputed
    code, out, err = builder.run(tmp_path / "run3", store, 2)
    assert code == 0 and out.split() == ["produce=cached", "consume=cached"], (out, err)
    assert {k for _, k in slot_keys(tmp_path / "run3")} <= {e.key for e in StageStore(store).entries()}


def _stage_seconds(report: dict) -> dict:
    return {s["name"]: (s["status"], s["seconds"], s.get("message", "")) for s in report["stages"]}


@pytest.mark.slow
def test_changing_a_setting_and_back_reuses_the_store(digits_copy, tmp_path):
    """distill.temperature 4 -> 3 -> 4 on a built digits run dir: the way back runs no stage, every stage comes from
    the store in well under a second. While the T=3 build holds the run dir, a build of another config is refused
    with one line. `edgekd cache prune` then leaves only what the run dir uses, and the next build is still cached."""
    from conftest import read_report, run_cli, write_pipeline

    t3 = write_pipeline(tmp_path / "t3.yaml", name="digits", distill={"temperature": 3.0})
    t4 = REPO / "pipelines" / "digits.yaml"
    proc = subprocess.Popen([sys.executable, "-m", "edgekd", "build", "-p", str(t3), "--run-dir", str(digits_copy)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (digits_copy / ".lock").read_text().strip() != str(proc.pid):
        time.sleep(0.1)
    other = run_cli("build", "-p", t4, "--run-dir", digits_copy)
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr
    assert other.stderr.startswith("edgekd: error: ") and f"in use by another build (pid {proc.pid})" in other.stderr
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    assert _stage_seconds(read_report(digits_copy))["distill"][0] == "ran"

    t0 = time.perf_counter()
    back = run_cli("build", "-p", t4, "--run-dir", digits_copy)
    wall = time.perf_counter() - t0
    assert back.returncode == 0, back.stderr
    stages = _stage_seconds(read_report(digits_copy))
    print(f"\nback to T=4: {wall:.1f} s wall; per stage: "
          + ", ".join(f"{n}={st} {sec:.2f}s" for n, (st, sec, _) in stages.items()))
    assert not [n for n, (st, _, _) in stages.items() if st == "ran"]
    restored = {n for n, (st, _, msg) in stages.items() if msg == "restored from the store"}
    assert {"distill", "export_onnx", "quantize", "export_tflite", "quantize_tflite"} <= restored
    assert all(sec < 1.0 for _, sec, _ in stages.values())
    status = run_cli("status", "-p", t4, "--run-dir", digits_copy, "--json")
    assert {row["state"] for row in __import__("json").loads(status.stdout)} - {"skipped"} == {"up-to-date"}

    store = StageStore(digits_copy / "store")
    size_two_configs = store.size()
    pruned = run_cli("cache", "prune", "--run-dir", digits_copy)
    assert pruned.returncode == 0 and pruned.stdout.startswith("removed "), pruned.stdout + pruned.stderr
    assert {(e.stage, e.key) for e in store.entries()} == slot_keys(digits_copy)
    print(f"store: {size_two_configs} bytes with two configs, {store.size()} after `edgekd cache prune`")
    again = run_cli("build", "-p", t4, "--run-dir", digits_copy)
    assert again.returncode == 0 and "=ran" not in again.stdout, again.stdout
