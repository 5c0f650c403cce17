"""The build engine on small pure-Python stages: cache keys, invalidation, corruption, failures, lock."""

from dataclasses import dataclass, field

import pytest

from edgekd.errors import EdgekdError, LockedError, StageError
from edgekd.pipeline.engine import Engine, Stage, slot_keys
from edgekd.pipeline.store import RunLock, StageStore


@dataclass
class Cfg:
    a: int = 1
    b: int = 2
    fail_b: bool = False
    calls: list = field(default_factory=list)

    def digest(self):
        return str((self.a, self.b))


@dataclass
class Target:
    name: str = "t"

    def digest(self):
        return self.name


class A(Stage):
    name = "a"

    def config(self, cfg):
        return {"a": cfg.a}

    def run(self, ctx):
        ctx.cfg.calls.append("a")
        (ctx.out_dir / "a.txt").write_text(str(ctx.cfg.a))
        return {"value": ctx.cfg.a}


class B(Stage):
    name = "b"
    deps = ("a",)

    def config(self, cfg):
        return {"b": cfg.b}

    def run(self, ctx):
        ctx.cfg.calls.append("b")
        if ctx.cfg.fail_b:
            raise StageError("b", "boom")
        a = int(ctx.input_path("a", "a.txt").read_text())
        (ctx.out_dir / "b.txt").write_text(str(a + ctx.cfg.b))
        return {}


class C(Stage):
    name = "c"
    deps = ("b",)
    uses_target = True

    def config(self, cfg):
        return {}

    def run(self, ctx):
        ctx.cfg.calls.append("c")
        (ctx.out_dir / "c.txt").write_text(ctx.input_path("b", "b.txt").read_text() + ctx.target.name)
        return {}


def _engine(cfg, tmp_path, target="t"):
    return Engine([A(), B(), C()], cfg, Target(target), tmp_path, log=lambda m: None)


def _statuses(result):
    return {r.name: r.status for r in result.records}


def test_cache_and_invalidation(tmp_path):
    cfg = Cfg()
    assert _statuses(_engine(cfg, tmp_path).build()) == {"a": "ran", "b": "ran", "c": "ran"}
    assert _statuses(_engine(cfg, tmp_path).build()) == {"a": "cached", "b": "cached", "c": "cached"}
    cfg.b = 5  # only b and what follows rerun
    assert _statuses(_engine(cfg, tmp_path).build()) == {"a": "cached", "b": "ran", "c": "ran"}
    assert (tmp_path / "stages/c/c.txt").read_text() == "6t"
    assert _statuses(_engine(cfg, tmp_path, target="u").build()) == {"a": "cached", "b": "cached", "c": "ran"}
    rows = {r["stage"]: r for r in _engine(cfg, tmp_path, target="v").status()}
    assert rows["c"]["state"] == "stale" and "target" in rows["c"]["why"]
    rows = {r["stage"]: r for r in _engine(cfg, tmp_path, target="t").status()}
    assert rows["c"]["state"] == "stored"  # built for target t before: the store has it
    cfg.a = 7
    rows = {r["stage"]: r for r in _engine(cfg, tmp_path, target="u").status()}
    assert rows["a"]["state"] == "stale" and "a" in rows["a"]["why"] and rows["b"]["state"] == "stale"


def test_same_content_does_not_cascade(tmp_path):
    """Keys use content digests, not paths or times: a rerun stage whose output is identical stops the cascade."""
    cfg = Cfg()
    _engine(cfg, tmp_path).build()
    result = _engine(cfg, tmp_path).build(only="a")
    assert _statuses(result) == {"a": "ran"}
    assert _statuses(_engine(cfg, tmp_path).build()) == {"a": "cached", "b": "cached", "c": "cached"}


def test_corrupted_output_is_detected_and_rebuilt(tmp_path):
    cfg = Cfg()
    _engine(cfg, tmp_path).build()
    (tmp_path / "stages/b/b.txt").write_text("999")
    warnings = []
    result = Engine([A(), B(), C()], cfg, Target(), tmp_path, log=warnings.append).build()
    assert _statuses(result) == {"a": "cached", "b": "ran", "c": "cached"}
    assert any("digest mismatch" in w for w in warnings)
    assert (tmp_path / "stages/b/b.txt").read_text() == "3"


def test_failure_keeps_previous_outputs_and_marks_failed(tmp_path):
    cfg = Cfg()
    _engine(cfg, tmp_path).build()
    before = (tmp_path / "stages/b/b.txt").read_text()
    cfg.b, cfg.fail_b = 9, True
    result = _engine(cfg, tmp_path).build()
    assert _statuses(result) == {"a": "cached", "b": "failed", "c": "not-run"}
    assert isinstance(result.error, StageError)
    assert (tmp_path / "stages/b/b.txt").read_text() == before  # nothing already built is lost
    assert not list((tmp_path / "stages").glob(".b.tmp-*"))
    rows = {r["stage"]: r for r in _engine(cfg, tmp_path).status()}
    assert rows["b"]["state"] == "failed" and "boom" in rows["b"]["why"]


def test_from_only_force(tmp_path):
    cfg = Cfg()
    _engine(cfg, tmp_path).build()
    assert _statuses(_engine(cfg, tmp_path).build(from_stage="b")) == {"a": "cached", "b": "ran", "c": "ran"}
    assert _statuses(_engine(cfg, tmp_path).build(force=True)) == {"a": "ran", "b": "ran", "c": "ran"}
    with pytest.raises(EdgekdError, match="no such stage"):
        _engine(cfg, tmp_path).build(only="zz")
    with pytest.raises(EdgekdError, match="its input a has not been built"):
        _engine(cfg, tmp_path / "fresh").build(only="b")


def test_lock_refuses_second_build(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(LockedError, match="in use by another build"):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):  # released
        pass


def _messages(result):
    return {r.name: r.message for r in result.records}


def test_returning_to_an_earlier_config_restores_it_without_running(tmp_path):
    cfg = Cfg()
    _engine(cfg, tmp_path).build()
    cfg.b = 5
    _engine(cfg, tmp_path).build()
    assert (tmp_path / "stages/c/c.txt").read_text() == "6t"
    cfg.b, cfg.calls = 2, []
    rows = {r["stage"]: r["state"] for r in _engine(cfg, tmp_path).status()}
    assert rows == {"a": "up-to-date", "b": "stored", "c": "stored"}
    result = _engine(cfg, tmp_path).build()
    assert _statuses(result) == {"a": "cached", "b": "cached", "c": "cached"}
    assert _messages(result)["b"] == _messages(result)["c"] == "restored from the store"
    assert cfg.calls == []  # nothing ran
    assert (tmp_path / "stages/b/b.txt").read_text() == "3" and (tmp_path / "stages/c/c.txt").read_text() == "3t"
    assert {r["state"] for r in _engine(cfg, tmp_path).status()} == {"up-to-date"}
    # entry and slot share their bytes (hard links): the store does not double the run dir
    assert (tmp_path / "stages/b/b.txt").stat().st_nlink == 2


def test_a_failed_stage_leaves_store_and_slot_as_they_were(tmp_path):
    cfg = Cfg()
    _engine(cfg, tmp_path).build()
    store = StageStore(tmp_path / "store")
    before = {(e.stage, e.key) for e in store.entries()}
    cfg.b, cfg.fail_b = 9, True
    assert _statuses(_engine(cfg, tmp_path).build())["b"] == "failed"
    assert {(e.stage, e.key) for e in store.entries()} == before
    assert not list((tmp_path / "store").rglob(".*"))  # no half-written entry left behind
    cfg.b, cfg.fail_b, cfg.calls = 2, False, []
    assert _statuses(_engine(cfg, tmp_path).build()) == {"a": "cached", "b": "cached", "c": "cached"}
    assert cfg.calls == []


def test_a_damaged_store_entry_is_dropped_never_restored(tmp_path):
    cfg = Cfg()
    _engine(cfg, tmp_path).build()
    old_key = dict(slot_keys(tmp_path))["b"]
    cfg.b = 5
    _engine(cfg, tmp_path).build()
    (tmp_path / "store" / "b" / old_key / "b.txt").write_text("999")  # not linked to the slot any more
    cfg.b, warnings = 2, []
    result = Engine([A(), B(), C()], cfg, Target(), tmp_path, log=warnings.append).build()
    assert _statuses(result) == {"a": "cached", "b": "ran", "c": "cached"}  # b's content is as before: c restored
    assert any("store entry" in w and "digest mismatch" in w for w in warnings), warnings
    assert (tmp_path / "stages/b/b.txt").read_text() == "3"
    assert StageStore(tmp_path / "store").load("b", old_key)[0] is not None  # rebuilt and stored again


def test_store_is_bounded_least_recently_used_first(tmp_path):
    cfg = Cfg()
    for b in (2, 5, 7):  # three configs of b (and c)
        cfg.b = b
        _engine(cfg, tmp_path).build()
    store = StageStore(tmp_path / "store")
    assert len([e for e in store.entries() if e.stage == "b"]) == 3
    cfg.b = 2  # use b=2 again: b=5 becomes the least recently used
    _engine(cfg, tmp_path).build()
    current = slot_keys(tmp_path)
    one_config = sum(e.size for e in store.entries() if (e.stage, e.key) in current)
    removed = store.prune(store.size() - 1, keep=current)
    assert [(e.stage, e.size > 0) for e in removed] in ([("b", True)], [("c", True)])
    assert all(e.key != k for e in removed for s, k in current)
    removed = store.prune(0, keep=current)  # everything but what the slots use
    assert {(e.stage, e.key) for e in store.entries()} == current
    assert store.size() == one_config
    engine = Engine([A(), B(), C()], cfg, Target(), tmp_path, log=lambda m: None, store_max_bytes=0)
    cfg.b = 11
    engine.build()
    assert {(e.stage, e.key) for e in store.entries()} == slot_keys(tmp_path)  # bounded after each build


def test_store_shared_by_two_run_dirs_reuses_entries(tmp_path):
    """A store may serve several run dirs (Engine(store_dir=...)): the second run dir's stages come from it."""
    shared = tmp_path / "store"
    cfg = Cfg()
    Engine([A(), B(), C()], cfg, Target(), tmp_path / "one", log=lambda m: None, store_dir=shared).build()
    cfg.calls = []
    result = Engine([A(), B(), C()], cfg, Target(), tmp_path / "two", log=lambda m: None, store_dir=shared).build()
    assert set(_messages(result).values()) == {"restored from the store"} and cfg.calls == []
    assert (tmp_path / "two/stages/c/c.txt").read_text() == "3t"
