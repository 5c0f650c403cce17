"""Distillation methods wired into the pipeline: config, hooks, the per-batch teacher, the objective, and end-to-end
builds of the method pipelines through the real CLI (slow)."""

import numpy as np
import pytest
import torch

from conftest import REPO, read_report, run_cli, stage_statuses, write_pipeline
from edgekd.config import DataConfig, load_pipeline
from edgekd.data.datasets import load_splits
from edgekd.distill.hooks import FeatureTap, penultimate_path
from edgekd.distill.objective import FeatureObjective
from edgekd.distill.run import distill_model
from edgekd.distill.teachers import BatchTeacher, Ensemble, ResizeInput, teacher_for_eval
from edgekd.distill.trainer import predict_logits, train
from edgekd.errors import ConfigError
from edgekd.models.zoo import build_model

PIPELINES = REPO / "pipelines"
BASE = "teacher: {arch: cnn, train: {epochs: 1}}\nstudent: {arch: cnn-small}\n"


def _write(tmp_path, text):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------------------------- config

def test_methods_parse_with_weights_and_number_shorthand(tmp_path):
    cfg = load_pipeline(_write(tmp_path, BASE + """distill:
  methods:
    kd: 0.5
    feature: {weight: 2, pairs: [["1.features.2", "1.features.2"]]}
    attention: {pairs: [["1.features.0", "1.features.0"]]}
    rkd: 1.5
"""))
    m = cfg.distill.methods
    assert list(m.chosen()) == ["kd", "feature", "attention", "rkd"]
    assert m.kd.weight == 0.5 and m.feature.weight == 2.0 and m.attention.weight == 1000.0
    assert m.rkd.weight == 1.5 and (m.rkd.distance, m.rkd.angle, m.rkd.embedding) == (25.0, 50.0, "penultimate")
    default = load_pipeline(_write(tmp_path, BASE))
    assert list(default.distill.methods.chosen()) == ["kd"] and default.distill.methods.kd.weight == 1.0


@pytest.mark.parametrize("text, needle", [
    ("distill: {methods: {atention: {pairs: [[a, b]]}}}\n",
     "distill.methods.atention: unknown key (did you mean 'attention'?)"),
    ("distill: {methods: {feature: {weight: 1, pairs: [[a, b]], pair: []}}}\n",
     "distill.methods.feature.pair: unknown key (did you mean 'pairs'?)"),
    ("distill: {methods: {feature: {pairs: []}}}\n", "distill.methods.feature.pairs: needs at least one"),
    ("distill: {methods: {feature: {pairs: [[a, b, c]]}}}\n",
     "distill.methods.feature.pairs[0]: must be [teacher module path"),
    ("distill: {methods: {kd: -1}}\n", "distill.methods.kd.weight: must be >= 0"),
    ("distill: {methods: {}}\n", "distill.methods: choose at least one method"),
    ("distill: {methods: {rkd: {embedding: pooled}}}\n", "distill.methods.rkd.embedding: 'pooled' is not one of"),
    ("distill: {methods: {feature: {pairs: [['1.features.9', '1.features.2']]}}}\n",
     "distill.methods.feature.pairs[0][0] (teacher): no module '1.features.9' in the model (did you mean"),
    ("distill: {methods: {attention: {pairs: [['1.features.0', '1.feature.0']]}}}\n",
     "(student): no module '1.feature.0' in the model (did you mean '1.features.0'"),
])
def test_bad_methods_are_one_clear_line(tmp_path, text, needle):
    path = _write(tmp_path, BASE + text)
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("text, needle", [
    ("teachers: []\nstudent: {arch: cnn-small}\n", "teachers: list at least one teacher"),
    (BASE + "teachers: [{arch: cnn, train: {epochs: 1}}]\n", "give either 'teacher' (one) or 'teachers' (several)"),
    ("teachers: [{arch: cnn, train: {epochs: 1}}, {arch: mlp}]\n", "teachers[1]: give either 'checkpoint'"),
    ("teachers: [{arch: cnn, train: {epochs: 1}, weigth: 2}]\n", "teachers[0].weigth: unknown key (did you mean 'weight'?)"),
    ("teachers: [{name: a, arch: cnn, train: {epochs: 1}}, {name: a, arch: mlp, train: {epochs: 1}}]\n",
     "names must be unique"),
    ("teacher: {arch: cnn, train: {epochs: 1}, input_size: [16]}\n", "teacher.input_size: must be [height, width]"),
    ("teachers: [{name: a, arch: cnn, train: {epochs: 1}}, {name: b, arch: mlp, train: {epochs: 1}}]\n"
     "distill: {methods: {feature: {pairs: [['1.features.2', '1.features.2']]}}}\n", "with several teachers, name"),
    ("teachers: [{name: a, arch: cnn, train: {epochs: 1}}, {name: b, arch: mlp, train: {epochs: 1}}]\n"
     "distill: {methods: {feature: {pairs: [['c/1.features.2', '1.features.2']]}}}\n", "no teacher named 'c'"),
    (BASE + "assistant: {arch: cnn}\ndistill: {methods: {feature: {pairs: [['1.features.7', '1.features.2']]}}}\n",
     "no module '1.features.7'"),
])
def test_bad_teachers_and_assistant_are_one_clear_line(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    assert needle in str(err.value), str(err.value)


def test_checking_module_paths_leaves_the_random_state_alone():
    """Path checks build models at load time; the teacher trained afterwards must get the same initial weights
    whatever the distillation methods are (else one cache key could hold different teachers)."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_pipeline(PIPELINES / "digits-combined.yaml")
    assert torch.equal(torch.rand(3), expected)


def test_several_teachers_and_named_feature_paths(tmp_path):
    cfg = load_pipeline(_write(tmp_path, """teachers:
  - {name: big, arch: cnn, train: {epochs: 1}, weight: 2}
  - {arch: mlp, checkpoint: x.pt}
student: {arch: cnn-small}
distill: {methods: {kd: 1, feature: {pairs: [['big/1.features.2', '1.features.2']]}}}
"""))
    assert cfg.teacher_names() == ["big", "1"] and [t.weight for t in cfg.teacher_list()] == [2.0, 1.0]
    assert cfg.teacher_keys() == ["teachers[0]", "teachers[1]"]


# -------------------------------------------------------------------------------------- hooks and teachers

def _models(shape=(1, 8, 8)):
    torch.manual_seed(0)
    teacher = build_model("cnn", {"channels": [16, 32], "hidden": 64}, shape, 10).eval()
    student = build_model("cnn", {"channels": [4, 8], "hidden": 16, "dropout": 0.0}, (1, 8, 8), 10)
    return teacher, student


def test_feature_tap_reads_outputs_and_inputs_and_removes_its_hooks():
    teacher, _ = _models()
    x = torch.rand(3, 1, 8, 8)
    with FeatureTap(teacher, ["1.features.2", penultimate_path(teacher)], "t", inputs=[False, True]) as tap:
        teacher(x)
        conv, emb = tap.take()
        assert conv.shape == (3, 32, 4, 4) and emb.shape == (3, 64)
        with pytest.raises(RuntimeError, match="no output recorded"):
            tap.take()  # taken values are cleared: a stale feature is never reused
    assert all(not m._forward_hooks for m in teacher.modules())
    with pytest.raises(ConfigError, match=r"did you mean '1.classifier'"):
        FeatureTap(teacher, ["1.clasifier"], "somewhere")


def test_batch_teacher_runs_once_per_batch_and_stacks_several():
    t1, _ = _models()
    t2 = build_model("mlp", {"hidden": [32]}, (1, 16, 16), 10).eval()
    calls = []
    t2.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    bt = BatchTeacher([t1, t2], [None, [16, 16]], ["cnn", "mlp"])
    x = torch.rand(5, 1, 8, 8)
    out = bt(x)
    assert out.shape == (5, 2, 10) and bt(x) is out and len(calls) == 1
    assert calls[0] == (5, 1, 16, 16)  # the input adapter resized the batch for the 16x16 teacher
    bt(x.clone())
    assert len(calls) == 2
    assert bt.model_at("mlp/1.features.1", "w") == (t2, "1.features.1")


def test_ensemble_predicts_the_weighted_mean_of_probabilities_and_exports_one_output():
    t1, _ = _models()
    t2 = build_model("mlp", {"hidden": [32]}, (1, 8, 8), 10).eval()
    ens = teacher_for_eval([t1, t2], [None, None], [3.0, 1.0])
    assert isinstance(ens, Ensemble)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        p = 0.75 * torch.softmax(t1(x), 1) + 0.25 * torch.softmax(t2(x), 1)
        assert torch.allclose(torch.softmax(ens(x), 1), p, atol=1e-6)
    single = teacher_for_eval([t1], [[16, 16]], [1.0])
    assert isinstance(single[0], ResizeInput) and single[1] is t1


def test_ensemble_and_resized_teacher_export_to_onnx_with_parity(tmp_path):
    """The teacher as evaluation and benchmark see it (input adapter, ensemble) exports to one ONNX graph."""
    from edgekd.export.onnx_export import export_onnx, parity

    t1 = build_model("cnn", {"channels": [8, 16], "hidden": 32}, (1, 16, 16), 10).eval()
    t2 = build_model("mlp", {"hidden": [32]}, (1, 8, 8), 10).eval()
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    for name, model in (("resized", teacher_for_eval([t1], [[16, 16]], [1.0])),
                        ("ensemble", teacher_for_eval([t1, t2], [[16, 16], None], [2.0, 1.0]))):
        export_onnx(model, x, tmp_path / f"{name}.onnx", stage="test")
        check = parity(model, tmp_path / f"{name}.onnx", x)
        assert check["max_abs_diff"] < 1e-5 and check["top1_agreement"] == 1.0, (name, check)


# ------------------------------------------------------------------------------------ objective and trainer

@pytest.fixture(scope="module")
def digits():
    return load_splits(DataConfig(dataset="digits"), seed=0)


def _distill_cfg(tmp_path, methods: str, epochs: int = 1):
    text = BASE + f"distill: {{epochs: {epochs}, batch_size: 64, lr: 0.003, alpha: 0.7, methods: {methods}}}\n"
    return load_pipeline(_write(tmp_path, text)).distill


def test_feature_objective_trains_its_adapter_and_shares_one_teacher_forward(digits, tmp_path):
    teacher, student = _models()
    forwards = []
    teacher.register_forward_hook(lambda m, a, o: forwards.append(1))
    bt = BatchTeacher([teacher], [None], ["0"])
    cfg = _distill_cfg(tmp_path, "{kd: 1, feature: {pairs: [['1.features.2', '1.features.2']]}, "
                                 "attention: {pairs: [['1.features.0', '1.features.0']]}}")
    obj = FeatureObjective(cfg.methods, 0.7, student, bt, digits.x_train)
    adapter = obj.feature.adapters[0]
    assert isinstance(adapter, torch.nn.Conv2d) and tuple(adapter.weight.shape) == (32, 8, 1, 1)
    before = adapter.weight.detach().clone()
    forwards.clear()
    from edgekd.distill.trainer import KDSettings

    result = train(student, cfg, digits.x_train, digits.y_train, digits.x_val, digits.y_val, seed=0,
                   work_dir=tmp_path, log=lambda m: None, kd=KDSettings(0.7, 4.0), teacher=bt, extra_loss=obj,
                   extra_params=list(obj.parameters()))
    obj.close()
    steps = int(np.ceil(len(digits.x_train) / 64))
    assert len(forwards) == steps  # one teacher forward per batch, shared by the KD, feature and attention terms
    assert not torch.equal(before, adapter.weight)  # the adapter was trained
    assert {"kd", "ce", "feature", "attention"} <= set(result.history[0])
    assert all(not m._forward_hooks for m in student.modules())
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert torch.equal(ckpt["extra_params"][0], adapter.weight.detach())  # resumable with its adapter


def test_resume_restores_the_adapter(digits, tmp_path):
    teacher, student = _models()
    cfg = _distill_cfg(tmp_path, "{feature: {pairs: [['1.features.2', '1.features.2']]}}")
    bt = BatchTeacher([teacher], [None], ["0"])
    run = distill_model(student, cfg, digits, bt, None, [1.0], seed=0, work_dir=tmp_path, log=lambda m: None,
                        stage="t")
    assert run.teacher_output_cache is False and "feature KD" in run.cache_note
    trained = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["extra_params"][0]
    _, fresh_student = _models()
    obj = FeatureObjective(cfg.methods, 0.7, fresh_student, bt, digits.x_train)
    train(fresh_student, cfg, digits.x_train, digits.y_train, digits.x_val, digits.y_val, seed=0, work_dir=tmp_path,
          log=lambda m: None, extra_loss=obj, extra_params=list(obj.parameters()))
    obj.close()
    assert torch.equal(obj.feature.adapters[0].weight.detach(), trained)


def test_teacher_output_cache_is_used_unless_a_method_needs_teacher_features(digits, tmp_path):
    teacher, student = _models()
    forwards = []
    teacher.register_forward_hook(lambda m, a, o: forwards.append(1))
    cache = tmp_path / "train_logits.npy"
    np.save(cache, predict_logits(teacher, digits.x_train))
    forwards.clear()
    bt = BatchTeacher([teacher], [None], ["0"])
    for i, (methods, cached) in enumerate((("{kd: 1}", True), ("{kd: 1, rkd: {embedding: logits}}", True),
                                           ("{kd: 1, rkd: {embedding: penultimate}}", False))):
        cfg = _distill_cfg(tmp_path, methods)
        work = tmp_path / f"work{i}"
        work.mkdir()
        run = distill_model(student, cfg, digits, bt, cache, [1.0], seed=0, work_dir=work, log=lambda m: None,
                            stage="t")
        assert run.teacher_output_cache is cached, methods
        assert (len(forwards) == 0) is cached, methods  # with the cache, the teacher never runs
        forwards.clear()


# ------------------------------------------------------------------------------------------ end to end (CLI)

def _build(pipeline, run_dir):
    proc = run_cli("build", "--target", "android-arm64", "--pipeline", pipeline, "--run-dir", run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read_report(run_dir), proc


@pytest.mark.slow
def test_feature_kd_builds_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    r, proc = _build(PIPELINES / "digits-feature.yaml", run_dir)
    d = r["student"]["distill"]
    assert d["methods"] == {"kd": {"weight": 1.0},
                            "feature": {"weight": 1.0, "pairs": [["1.features.2", "1.features.2"]]}}
    assert d["teacher_output_cache"] is False and "feature KD" in d["teacher_output_cache_note"]
    history = r["student"]["history"]
    assert history[-1]["feature"] < history[0]["feature"]  # the hint loss was optimized
    assert all(a["accuracy"] > 0.85 for a in r["artifacts"]) and r["gate"]["passed"] is True
    assert stage_statuses(r)["assistant"] == "skipped"
    md = (run_dir / "report.md").read_text()
    assert "distillation: kd ×1, feature ×1" in md and "teacher output cache off" in md
    # Same teacher and data, another distillation: the teacher stage (and its logits cache) is reused.
    again = write_pipeline(tmp_path / "kd.yaml", base=PIPELINES / "digits-feature.yaml", name="digits-feature",
                           distill={"methods": {"kd": 1.0}})
    r2, _ = _build(again, run_dir)
    assert stage_statuses(r2)["teacher"] == "cached" and stage_statuses(r2)["distill"] == "ran"
    assert r2["student"]["distill"]["teacher_output_cache"] is True


@pytest.mark.slow
def test_multi_teacher_builds_end_to_end_and_reports_each_teacher(tmp_path):
    run_dir = tmp_path / "run"
    r, _ = _build(PIPELINES / "digits-ensemble.yaml", run_dir)
    t = r["teacher"]
    assert t["arch"] == "ensemble" and [m["name"] for m in t["members"]] == ["cnn", "mlp"]
    assert [m["arch"] for m in t["members"]] == ["cnn", "mlp"]
    for m in t["members"]:
        assert 0.85 < m["test_accuracy_torch"] <= 1.0 and m["params"] > 0 and m["trained_here"] is True
    ens = t["ensemble"]["test_accuracy_torch"]
    assert t["accuracy"] == pytest.approx(ens)  # the gate's teacher is the ensemble, evaluated the same way
    assert t["params"] == sum(m["params"] for m in t["members"])
    assert r["student"]["distill"]["teacher_output_cache"] is True  # per-teacher logits cached, mixed at T
    stages = run_dir / "stages" / "teacher"
    assert np.load(stages / "train_member_logits.npy").shape[1:] == (2, 10)
    assert all(a["accuracy"] > 0.85 for a in r["artifacts"]) and r["gate"]["passed"] is True
    md = (run_dir / "report.md").read_text()
    assert "teacher `cnn`" in md and "teacher `mlp`" in md and "ensemble of 2 teachers" in md
