"""Real image data: RGB image folders of JPEG/PNG files at their own sizes, per-channel normalization, class names
(labels.txt), uint8 storage read batch by batch, training-time augmentation, and bad files refused in one line."""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import run_cli, write_pipeline

from edgekd.config import (AugmentConfig, DataConfig, DistillConfig, ModelConfig, RandomResizedCrop, TrainConfig,
                           load_pipeline)
from edgekd.data.augment import BatchAugment
from edgekd.data.datasets import ImageArray, Splits, load_splits
from edgekd.distill.teachers import BatchTeacher, input_shape_for, with_input_size
from edgekd.errors import ConfigError, DataError, StageError
from edgekd.models.zoo import build_model, model_from_config


def _rgb_folder(root, sizes=((40, 30), (64, 48), (33, 57)), per_class=4, classes=("cat", "dog", "emu")):
    """root/<class>/i.{jpg,png}: RGB photos-to-be of several sizes (W, H); each class has its own dominant colour."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            arr = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            arr[..., c] += 180  # class c is mostly red / green / blue
            Image.fromarray(arr).save(root / name / (f"{i}.jpg" if i % 2 else f"{i}.png"), quality=95)
    return root


# ------------------------------------------------------------------------------------------- reading

def test_rgb_folder_of_mixed_sizes_is_resized_and_stored_as_uint8(tmp_path):
    root = _rgb_folder(tmp_path / "imgs")
    s = load_splits(DataConfig(dataset="image-folder", path=str(root), image_size=[24, 20], test_fraction=0.25),
                    seed=0)
    assert s.classes == ["cat", "dog", "emu"] and s.input_shape == (3, 24, 20)
    assert s.x_train.storage_dtype == np.uint8 and s.x_test.storage_dtype == np.uint8
    batch = s.x_train[np.array([0, 1])]
    assert batch.dtype == np.float32 and batch.shape == (2, 3, 24, 20) and 0 <= batch.min() and batch.max() <= 1
    # channel order is RGB: each class's own colour channel is its brightest
    x, y = np.asarray(s.x_train), s.y_train
    for c in range(3):
        assert x[y == c].mean(axis=(0, 2, 3)).argmax() == c
    # save / load keeps uint8 (a quarter of float32's bytes) and the same values
    s.save(tmp_path / "splits.npz")
    back = Splits.load(tmp_path / "splits.npz")
    assert back.x_train.storage_dtype == np.uint8 and np.array_equal(back.x_val[:], s.x_val[:])


def test_old_float32_splits_files_still_load(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"x_{k}": rng.random((5, 1, 4, 4), dtype=np.float32) for k in ("train", "val", "test")}
    np.savez(tmp_path / "old.npz", classes=np.array(["a", "b"]), y_train=np.zeros(5, np.int64),
             y_val=np.zeros(5, np.int64), y_test=np.zeros(5, np.int64), **arrays)
    s = Splits.load(tmp_path / "old.npz")
    assert s.x_train.storage_dtype == np.float32 and np.array_equal(s.x_train[:], arrays["x_train"])


def test_image_array_reads_float_batches_only():
    data = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2)
    x = ImageArray(data)
    assert x.shape == (2, 3, 2, 2) and len(x) == 2 and x.dtype == np.float32
    assert np.array_equal(x[1], data[1] / np.float32(255)) and np.asarray(x).dtype == np.float32
    assert [b.shape for b in x.batches(1)] == [(1, 3, 2, 2), (1, 3, 2, 2)]


def test_channels_grey_rgb_and_16_bit(tmp_path):
    root = tmp_path / "imgs"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 200, np.uint8)).save(root / name / "grey.png")
    Image.fromarray(np.full((8, 8), 51400, np.uint16)).save(root / "a" / "deep.png")  # 16-bit grey: 51400/257 = 200
    s = load_splits(DataConfig(dataset="image-folder", path=str(root), val_fraction=0.2, test_fraction=0.2), seed=0)
    assert s.input_shape == (1, 8, 8)  # every image grey: one channel
    assert {int(v) for v in np.unique(np.concatenate([s.x_train.data, s.x_val.data, s.x_test.data]))} == {200}
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(root / "b" / "colour.png")
    assert load_splits(DataConfig(dataset="image-folder", path=str(root)), seed=0).input_shape == (3, 8, 8)
    forced = load_splits(DataConfig(dataset="image-folder", path=str(root), channels=1), seed=0)
    assert forced.input_shape == (1, 8, 8)
    # a 1-channel dataset repeated for an RGB model
    assert load_splits(DataConfig(dataset="digits", channels=3), seed=0).input_shape == (3, 8, 8)


def test_image_size_for_array_datasets(tmp_path):
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (30, 12, 12, 3), dtype=np.uint8), y_train=rng.integers(0, 2, 30))
    s = load_splits(DataConfig(dataset="npz", path=str(path), image_size=[6, 8]), seed=0)
    assert s.input_shape == (3, 6, 8) and s.x_train.storage_dtype == np.uint8


@pytest.mark.parametrize("damage", ["truncated-jpeg", "text-as-png"])
def test_unreadable_image_names_the_file(tmp_path, damage):
    root = _rgb_folder(tmp_path / "imgs")
    if damage == "truncated-jpeg":
        bad = root / "dog" / "1.jpg"
        bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    else:
        bad = root / "emu" / "notes.png"
        bad.write_text("this is a text file, not a PNG\n")
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(dataset="image-folder", path=str(root), image_size=[16, 16]), seed=0)
    msg = str(err.value)
    assert str(bad) in msg and "not a readable image" in msg and "\n" not in msg


def test_unreadable_image_is_exit_2_one_line_in_a_build(tmp_path):
    root = _rgb_folder(tmp_path / "imgs")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    pipe = write_pipeline(tmp_path / "p.yaml", data={"dataset": "image-folder", "path": str(root),
                                                     "image_size": [16, 16]},
                          teacher={"normalize": {"mean": 0.5, "std": 0.25}},
                          student={"normalize": {"mean": 0.5, "std": 0.25}})
    proc = run_cli("build", "--pipeline", pipe, "--run-dir", tmp_path / "run", "--only", "data", timeout=120)
    assert proc.returncode == 2 and "broken.png" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ------------------------------------------------------------------------------------------- class names

def test_labels_file_names_the_classes(tmp_path):
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (20, 4, 4), dtype=np.uint8), y_train=np.arange(20) % 3)
    labels = tmp_path / "labels.txt"
    labels.write_text("ant\nbee\ncricket\n\n")
    s = load_splits(DataConfig(dataset="npz", path=str(path), labels_file=str(labels)), seed=0)
    assert s.classes == ["ant", "bee", "cricket"]
    for text, needle in (("ant\nbee\n", "labels range 0..2 but there are 2 classes"), ("ant\n\nbee\n", "line 2"),
                         ("ant\nbee\nant\n", "listed twice"), ("", "empty")):
        labels.write_text(text)
        with pytest.raises(DataError, match=needle):
            load_splits(DataConfig(dataset="npz", path=str(path), labels_file=str(labels)), seed=0)
    with pytest.raises(DataError, match="not found"):
        load_splits(DataConfig(dataset="npz", path=str(path), labels_file=str(tmp_path / "none.txt")), seed=0)


def test_config_refuses_bad_data_and_normalize_values(tmp_path):
    def load(**sections):
        raw = {"teacher": {"train": {"epochs": 1}}, **sections}
        p = tmp_path / "p.yaml"
        p.write_text(yaml.safe_dump(raw))
        return load_pipeline(p)

    cases = [
        ({"data": {"dataset": "image-folder", "path": "x", "labels_file": "l.txt"}}, "data.labels_file"),
        ({"data": {"image_size": [32]}}, "data.image_size"),
        ({"data": {"channels": 2}}, "data.channels"),
        ({"student": {"normalize": {"mean": [0.5, 0.5, 0.5]}}}, "student.normalize.mean: 3 values for 1-channel"),
        ({"data": {"channels": 3}, "teacher": {"train": {"epochs": 1}, "normalize": {"std": [0.2, 0.3]}}},
         "teacher.normalize.std: 2 values for 3-channel"),
        ({"student": {"normalize": {"std": [0.2, -1]}}}, "student.normalize.std: must be > 0"),
        ({"student": {"normalize": {"mean": "grey"}}}, "student.normalize.mean: expected a number"),
        ({"distill": {"augment": {"random_resized_crop": {"scale": [0.0, 1.0]}}}}, "random_resized_crop.scale"),
        ({"distill": {"augment": {"random_resized_crop": {"scal": [0.5, 1.0]}}}}, "did you mean 'scale'"),
        ({"distill": {"augment": {"horizontal_flip": "yes"}}}, "horizontal_flip: expected true or false"),
    ]
    for sections, needle in cases:
        with pytest.raises(ConfigError) as err:
            load(**sections)
        assert needle in str(err.value) and "\n" not in str(err.value), (sections, str(err.value))
    cfg = load(data={"channels": 3}, student={"normalize": {"mean": [0.5, 0.4, 0.3], "std": 0.25}},
               distill={"augment": {"random_resized_crop": {"scale": [0.6, 1.0]}, "horizontal_flip": True}})
    assert cfg.student.normalize.mean == [0.5, 0.4, 0.3] and cfg.student.normalize.std == 0.25
    assert cfg.distill.augment.active() and cfg.distill.augment.random_resized_crop.ratio == [0.75, 4 / 3]


def test_per_channel_normalization_is_the_first_layer():
    model = build_model("cnn-small", {}, (3, 8, 8), 4, mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 0.125])
    x = torch.rand(2, 3, 8, 8)
    expected = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 0.125]).view(1, 3, 1, 1)
    assert torch.allclose(model[0](x), expected)
    scalar = build_model("cnn-small", {}, (3, 8, 8), 4, mean=0.5, std=0.25)
    assert scalar[0].mean.shape == () and torch.allclose(scalar[0](x), (x - 0.5) / 0.25)  # old state-dict layout
    with pytest.raises(ConfigError, match="normalize.mean: 2 values for 3-channel images"):
        build_model("cnn-small", {}, (3, 8, 8), 4, mean=[0.1, 0.2])


def test_teacher_input_adapter_with_three_channels():
    """A teacher built for 32x32 RGB, fed the dataset's 20x20 RGB images through the input adapter."""
    mcfg = ModelConfig(arch="cnn-small")
    mcfg.normalize.mean, mcfg.normalize.std = [0.5, 0.4, 0.3], [0.2, 0.2, 0.2]
    shape = input_shape_for((3, 20, 20), [32, 32])
    assert shape == (3, 32, 32)
    teacher = with_input_size(model_from_config(mcfg, shape, 5), [32, 32]).eval()
    out = teacher(torch.rand(4, 3, 20, 20))
    assert out.shape == (4, 5) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------- augmentation

def _aug(**kw):
    return AugmentConfig(**kw)


def test_augmentation_is_seeded_and_shared_across_ranks():
    cfg = _aug(random_resized_crop=RandomResizedCrop(scale=[0.5, 1.0]), horizontal_flip=True)
    a, b = BatchAugment(cfg, seed=3, epoch=1), BatchAugment(cfg, seed=3, epoch=1)
    ta, tb = a.draw(16, 24, 20), b.draw(16, 24, 20)
    assert torch.equal(ta, tb)  # same seed and epoch: the same draws (a resumed epoch repeats them)
    assert not torch.equal(ta, BatchAugment(cfg, seed=3, epoch=2).draw(16, 24, 20))
    # crops lie inside the image, with the requested area
    sx, sy, tx, ty = ta[:, 0, 0].abs(), ta[:, 1, 1], ta[:, 0, 2], ta[:, 1, 2]
    assert ((tx - sx >= -1 - 1e-6) & (tx + sx <= 1 + 1e-6) & (ty - sy >= -1 - 1e-6) & (ty + sy <= 1 + 1e-6)).all()
    assert ((sx * sy >= 0.5 - 1e-5) & (sx * sy <= 1 + 1e-6)).all()
    assert (ta[:, 0, 0] < 0).any() and (ta[:, 0, 0] > 0).any()  # some flipped, some not
    x = torch.rand(16, 3, 24, 20)
    out = a.apply(x, ta)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    # rank r of W applies rows r, r+W, ... of the global batch's draws: together, exactly the single-process batch
    two = torch.cat([a.apply(x[r::2], ta[r::2]) for r in range(2)])
    assert torch.allclose(two, torch.cat([out[0::2], out[1::2]]), atol=1e-6)


def test_flip_alone_is_an_exact_mirror_and_a_full_crop_is_the_identity():
    flip = BatchAugment(_aug(horizontal_flip=True), seed=0, epoch=0)
    x = torch.rand(32, 3, 5, 7)
    theta = flip.draw(32, 5, 7)
    out = flip.apply(x, theta)
    flipped = theta[:, 0, 0] < 0
    assert torch.equal(out[flipped], x[flipped].flip(-1)) and torch.equal(out[~flipped], x[~flipped])
    full = BatchAugment(_aug(random_resized_crop=RandomResizedCrop(scale=[1.0, 1.0], ratio=[1.0, 1.0])), 0, 0)
    square = torch.rand(4, 3, 9, 9)
    assert torch.allclose(full.apply(square, full.draw(4, 9, 9)), square, atol=1e-5)


def _digits_small():
    return load_splits(DataConfig(dataset="digits", train_limit=300), seed=0)


def test_training_with_augmentation_is_reproducible(tmp_path):
    from edgekd.distill.trainer import train

    s = _digits_small()
    cfg = TrainConfig(epochs=1, batch_size=64, augment=_aug(random_resized_crop=RandomResizedCrop(),
                                                             horizontal_flip=True))
    weights, logs = [], []
    for run in range(2):
        torch.manual_seed(0)
        model = build_model("cnn-small", {}, s.input_shape, 10)
        train(model, cfg, s.x_train, s.y_train, s.x_val, s.y_val, seed=5, work_dir=tmp_path / str(run),
              log=logs.append)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert any("augmenting every training batch" in line and "horizontal flip" in line for line in logs)


def test_augmentation_makes_the_teacher_see_every_batch(tmp_path):
    from edgekd.distill.run import distill_model
    from edgekd.distill.trainer import KDSettings, predict_logits, train

    s = _digits_small()
    torch.manual_seed(0)
    teacher_model = build_model("cnn-small", {}, s.input_shape, 10).eval()
    cache = tmp_path / "train_logits.npy"
    np.save(cache, predict_logits(teacher_model, s.x_train))
    cfg = DistillConfig(epochs=1, batch_size=64, augment=_aug(horizontal_flip=True))  # cache_teacher_outputs: true
    calls = []
    teacher = BatchTeacher([teacher_model], [None], ["t"])
    teacher.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    logs = []
    student = build_model("cnn-small", {}, s.input_shape, 10)
    run = distill_model(student, cfg, s, teacher, cache, [1.0], seed=0, work_dir=tmp_path / "w", log=logs.append,
                        stage="distill")
    assert not run.teacher_output_cache and "augmentation is on" in run.cache_note
    assert any("augmentation is on" in line for line in logs)
    assert sum(calls) == len(s.y_train)  # the teacher ran on every (augmented) training image
    # the trainer itself refuses cached logits with augmentation, in one line
    with pytest.raises(StageError, match="cannot be used with augmentation"):
        train(build_model("cnn-small", {}, s.input_shape, 10), cfg, s.x_train, s.y_train, s.x_val, s.y_val, seed=0,
              work_dir=tmp_path / "w2", kd=KDSettings(0.5, 4.0), teacher_logits=np.load(cache), log=lambda m: None)


# ------------------------------------------------------------------------------------------- a build

def test_rgb_folder_build_to_onnx_writes_labels_next_to_the_models(tmp_path):
    """data -> teacher (trained here, 3-channel input adapter at 32x32) -> distill (augmented) -> export_onnx on a
    small RGB JPEG/PNG folder: class names in labels.txt beside the ONNX files and in the data stage's output."""
    from edgekd.pipeline.engine import Engine
    from edgekd.stages.data import DataStage
    from edgekd.stages.distill import DistillStage
    from edgekd.stages.export_onnx import ExportOnnxStage
    from edgekd.stages.teacher import TeacherStage
    from edgekd.targets.profiles import load_profile

    root = _rgb_folder(tmp_path / "imgs", per_class=12)
    pipe = tmp_path / "rgb.yaml"
    norm = {"mean": [0.45, 0.45, 0.45], "std": [0.25, 0.25, 0.25]}
    pipe.write_text(yaml.safe_dump({
        "name": "rgb", "seed": 0,
        "data": {"dataset": "image-folder", "path": str(root), "image_size": [20, 20], "val_fraction": 0.2,
                 "test_fraction": 0.2},
        "teacher": {"arch": "cnn-small", "normalize": norm, "input_size": [32, 32],
                    "train": {"epochs": 2, "batch_size": 8}},
        "student": {"arch": "cnn-small", "args": {"channels": [4, 8], "hidden": 16}, "normalize": norm},
        "distill": {"epochs": 1, "batch_size": 8,
                    "augment": {"random_resized_crop": {"scale": [0.6, 1.0]}, "horizontal_flip": True}},
        "export": {"parity_samples": 8}}))
    cfg = load_pipeline(pipe)
    logs = []
    result = Engine([DataStage(), TeacherStage(), DistillStage(), ExportOnnxStage()], cfg, load_profile("x86-64"),
                    tmp_path / "run", log=logs.append).build()
    assert all(r.status == "ran" for r in result.records), [(r.name, r.status) for r in result.records]
    stages = tmp_path / "run" / "stages"
    assert (stages / "data" / "labels.txt").read_text() == "cat\ndog\nemu\n"
    assert (stages / "export_onnx" / "labels.txt").read_text() == "cat\ndog\nemu\n"
    assert (stages / "export_onnx" / "student_fp32.onnx").is_file()
    stored = Splits.load(stages / "data" / "splits.npz")
    assert stored.x_train.storage_dtype == np.uint8 and stored.input_shape == (3, 20, 20)
    text = "\n".join(logs)
    assert "teacher output cache: ignored" in text and "augmenting every training batch" in text


def test_normalize_length_is_checked_once_the_channels_are_known(tmp_path):
    """An image folder's channel count is only known once read: the data stage refuses a mismatched list."""
    root = _rgb_folder(tmp_path / "imgs")
    pipe = write_pipeline(tmp_path / "p.yaml", data={"dataset": "image-folder", "path": str(root),
                                                     "image_size": [16, 16]},
                          student={"normalize": {"mean": [0.5, 0.5], "std": 0.25}})
    proc = run_cli("build", "--pipeline", pipe, "--run-dir", tmp_path / "run", "--only", "data", timeout=120)
    assert proc.returncode == 2 and "student.normalize.mean: 2 values for 3-channel images" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
