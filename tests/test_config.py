"""Pipeline and target-profile validation: each bad input names the file, the key and the problem."""

import pytest

from edgekd.config import load_pipeline
from edgekd.errors import ConfigError
from edgekd.paths import PIPELINES_DIR
from edgekd.targets.profiles import available_profiles, load_profile


def _write(tmp_path, text):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


BASE = "teacher: {train: {epochs: 1}}\n"


@pytest.mark.parametrize("text, needle", [
    ("distill: {temperatur: 3}\n" + BASE, "distill.temperatur: unknown key (did you mean 'temperature'?)"),
    ("dat: {}\n" + BASE, "dat: unknown key (did you mean 'data'?)"),
    ("distill: {temperature: -1}\n" + BASE, "distill.temperature: must be > 0"),
    ("distill: {alpha: 1.5}\n" + BASE, "distill.alpha: must be in [0, 1]"),
    ("distill: {epochs: two}\n" + BASE, "distill.epochs: expected an integer, got a string 'two'"),
    ("distill: {temperature_schedule: cosine}\n" + BASE, "distill.temperature_end: is required"),
    ("distill: {temperature_schedule: exponential}\n" + BASE, "distill.temperature_schedule: 'exponential' is not one of"),
    ("data: {dataset: cifar}\n" + BASE, "data.dataset: 'cifar' is not one of"),
    ("student: {arch: cnn-smal}\n" + BASE, "unknown architecture 'cnn-smal' (did you mean 'cnn-small'?)"),
    ("teacher: {arch: cnn}\n", "give either 'checkpoint'"),
    ("teacher: {train: {lr: 0}}\n", "teacher.train.lr: must be > 0"),
    ("teacher: [1, 2]\n", "teacher: expected a mapping"),
    ("distill: {alpha: .nan}\n" + BASE, "NaN is not allowed"),
    ("distill: {cache_teacher_outputs: yes please}\n" + BASE, "expected true or false"),
    ("a: [unclosed\n", "not valid YAML"),
])
def test_bad_pipeline_is_one_clear_line(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    msg = str(err.value)
    assert needle in msg, msg
    assert str(path) in msg and "\n" not in msg


def test_missing_pipeline_file(tmp_path):
    with pytest.raises(ConfigError, match="pipeline file not found"):
        load_pipeline(tmp_path / "nope.yaml")


def test_shipped_pipelines_and_profiles_load():
    for path in sorted(PIPELINES_DIR.glob("*.yaml")):
        cfg = load_pipeline(path)
        assert cfg.name
    names = available_profiles()
    assert {"android-arm64", "x86-64", "raspberry-pi-5"} <= set(names)
    for name in names:
        assert load_profile(name).name == name


def test_config_digest_changes_with_values(tmp_path):
    a = load_pipeline(_write(tmp_path, BASE))
    b = load_pipeline(_write(tmp_path, BASE + "distill: {temperature: 3.0}\n"))
    assert a.digest() != b.digest()
    assert b.distill.temperature == 3.0 and isinstance(b.distill.temperature, float)


def test_unknown_target_suggests(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'android-arm64'"):
        load_profile("android-arm46")
    bad = tmp_path / "dev.yaml"
    bad.write_text("threads: 0\n")
    with pytest.raises(ConfigError, match="threads: must be >= 1"):
        load_profile(str(bad))
