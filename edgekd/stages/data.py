"""data: read the dataset, validate it, and store the fixed train / val / test split."""

from edgekd.data.datasets import load_splits, source_fingerprint
from edgekd.pipeline.engine import Stage, StageContext


class DataStage(Stage):
    name = "data"
    description = "read and split the dataset"

    def config(self, cfg):
        return {"data": cfg.section("data"), "seed": cfg.seed}

    def extra_key(self, cfg):
        return {"source_digest": source_fingerprint(cfg.data)}

    def run(self, ctx: StageContext) -> dict:
        splits = load_splits(ctx.cfg.data, ctx.cfg.seed)
        splits.save(ctx.out_dir / "splits.npz")
        s = splits.summary()
        ctx.log(f"{ctx.cfg.data.dataset}: train {s['train']}, val {s['val']}, test {s['test']}, "
                f"input {tuple(s['input_shape'])}, {len(s['classes'])} classes")
        return {"dataset": ctx.cfg.data.dataset, **s}
