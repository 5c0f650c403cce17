"""Training-time augmentation of image batches on torch tensors: random-resized crop and horizontal flip.

The training loop calls `BatchAugment` once per global batch. Its random draws come from a CPU torch.Generator
seeded from the pipeline seed and the epoch (not from the global RNG), so a build is reproducible, a resumed epoch
draws what the interrupted one drew, and with data-parallel ranks every rank draws the parameters of the whole
global batch and applies its own rows' share: the same augmented batch the single process sees.

Both transforms are one affine resampling per image: the crop box (and a mirror, x -> -x, for the flip) is a
2x3 matrix in normalized coordinates, and `grid_sample` reads the crop back at the full image size, bilinearly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edgekd.config import AugmentConfig

SEED_OFFSET = 7_777_777  # keeps the augmentation stream apart from the batch order's and dropout's seeds
CROP_TRIES = 10  # as torchvision's RandomResizedCrop: the first box that fits, else the whole image


class BatchAugment:
    """One epoch's augmentation. `draw(n, h, w)` -> (n, 2, 3) affine matrices for n images (the global batch);
    `apply(x, theta)` -> x: (B, C, H, W) float -> (B, C, H, W) float, augmented by theta (B, 2, 3)."""

    def __init__(self, cfg: AugmentConfig, seed: int, epoch: int):
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(seed * 1000 + epoch + SEED_OFFSET)

    def draw(self, n: int, h: int, w: int) -> torch.Tensor:
        sx, sy = torch.ones(n), torch.ones(n)  # crop width / height as fractions of the image's
        tx, ty = torch.zeros(n), torch.zeros(n)  # crop centre in [-1, 1]
        rrc = self.cfg.random_resized_crop
        if rrc is not None:
            area = _uniform(self.gen, (n, CROP_TRIES), rrc.scale[0], rrc.scale[1])
            ratio = torch.exp(_uniform(self.gen, (n, CROP_TRIES), math.log(rrc.ratio[0]), math.log(rrc.ratio[1])))
            # box of `area` of the image with width / height = ratio in pixels, as fractions of W and H
            cw, ch = torch.sqrt(area * ratio * h / w), torch.sqrt(area * w / (ratio * h))
            fits = (cw <= 1) & (ch <= 1)
            first = torch.argmax(fits.int(), dim=1)  # first try that fits (0 when none does: masked below)
            ok = fits.any(dim=1)
            rows = torch.arange(n)
            sx = torch.where(ok, cw[rows, first], sx)
            sy = torch.where(ok, ch[rows, first], sy)
            # the box's left / top edge uniformly where the box stays inside the image
            x0 = torch.rand(n, generator=self.gen) * (1 - sx)
            y0 = torch.rand(n, generator=self.gen) * (1 - sy)
            tx, ty = 2 * (x0 + sx / 2) - 1, 2 * (y0 + sy / 2) - 1
        if self.cfg.horizontal_flip:
            sx = sx * torch.where(torch.rand(n, generator=self.gen) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
        return theta

    def apply(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        theta = theta.to(device=x.device, dtype=x.dtype)
        if self.cfg.random_resized_crop is None:  # a flip alone is exact: no resampling
            return torch.where((theta[:, 0, 0] < 0).view(-1, 1, 1, 1), x.flip(-1), x)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def describe(cfg: AugmentConfig) -> str:
    """One line for the build log, e.g. "random-resized crop (area 0.6-1, aspect 0.75-1.33), horizontal flip"."""
    parts = []
    if cfg.random_resized_crop is not None:
        c = cfg.random_resized_crop
        parts.append(f"random-resized crop (area {c.scale[0]:g}-{c.scale[1]:g}, aspect {c.ratio[0]:.3g}-{c.ratio[1]:.3g})")
    if cfg.horizontal_flip:
        parts.append("horizontal flip (p=0.5)")
    return ", ".join(parts) or "none"


def _uniform(gen: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen)
