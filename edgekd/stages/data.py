"""data: read the dataset, validate it, and store the fixed train / val / test split and the class names."""

from edgekd.config import check_normalize_channels
from edgekd.data.datasets import load_splits, source_fingerprint
from edgekd.pipeline.engine import Stage, StageContext


class DataStage(Stage):
    name = "data"
    description = "read and split the dataset"

    def config(self, cfg):
        return {"data": cfg.section("data"), "seed": cfg.seed}

    def extra_key(self, cfg, target):
        return {"source_digest": source_fingerprint(cfg.data)}

    def run(self, ctx: StageContext) -> dict:
        splits = load_splits(ctx.cfg.data, ctx.cfg.seed, log=ctx.log)
        # Every model's per-channel normalization against the channels the images turned out to have, before any
        # model is built or trained (the config alone settles it only for some datasets).
        check_normalize_channels(ctx.cfg, splits.input_shape[0], ctx.cfg.source)
        splits.save(ctx.out_dir / "splits.npz")
        # Class names in class-index order, one per line: what an app needs to read the model's outputs. The
        # export_onnx stage puts a copy next to the ONNX files.
        (ctx.out_dir / "labels.txt").write_text("".join(f"{name}\n" for name in splits.classes), encoding="utf-8")
        s = splits.summary()
        ctx.log(f"{ctx.cfg.data.dataset}: train {s['train']}, val {s['val']}, test {s['test']}, "
                f"input {tuple(s['input_shape'])} stored as {s['storage_dtype']}, {len(s['classes'])} classes")
        return {"dataset": ctx.cfg.data.dataset, **s}
