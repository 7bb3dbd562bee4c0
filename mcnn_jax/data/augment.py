"""Full-field augmentations, drawn per image from (seed, epoch, image index) alone.

No crop and no resampling: horizontal / vertical flips, a 180-degree rotation, a 90-degree rotation (square images
only) and a small per-channel intensity jitter: a gain 1 + u, u uniform in [-j, j] (j = ``intensity_jitter``),
so zero stays zero (a change of exposure / staining strength; values may exceed 1 slightly, not clipped). The
random numbers of an image depend only on (seed, epoch, store index), so a batch is the same whatever the number
of ranks and a resumed run is bit-identical. The conversion to float32 (stored
integer range -> [0, 1]) happens in the same pass.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mcnn_jax.data.store import float_scale


@dataclasses.dataclass(frozen=True)
class Augment:
    """Which augmentations are on; ``from_config`` reads a config's ``data.augment`` (None = all off)."""

    flips: bool = False
    rot180: bool = False
    rot90: bool = False
    intensity_jitter: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> "Augment":
        """From a config's ``data.augment`` section, or a dict naming some of the fields (the rest are off)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {} if cfg is None else dict(cfg)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown augmentation key(s) {', '.join(unknown)}; the keys are {', '.join(sorted(known))}"
            )
        return cls(**{k: (float(v) if k == "intensity_jitter" else bool(v)) for k, v in values.items()})

    @property
    def active(self) -> bool:
        return self.flips or self.rot180 or self.rot90 or self.intensity_jitter > 0


def draw(aug: Augment, seed: int, epoch: int, index: int, channels: int, square: bool) -> dict:
    """The augmentation of one image (a small dict); the same numbers are drawn whatever is enabled."""
    rng = np.random.default_rng([int(seed), int(epoch), int(index), 0xA06])
    u = rng.random(4)
    j = rng.uniform(-1.0, 1.0, (2, channels))
    return dict(
        flip_ud=aug.flips and u[0] < 0.5,
        flip_lr=aug.flips and u[1] < 0.5,
        rot180=aug.rot180 and u[2] < 0.5,
        rot90=aug.rot90 and square and u[3] < 0.5,
        gain=(1.0 + aug.intensity_jitter * j[0]).astype(np.float32),
    )


def apply_into(out: np.ndarray, image: np.ndarray, params: dict | None) -> None:
    """Writes the augmented float32 version of ``image`` ([H, W, C], integer) into ``out`` ([H, W, C])."""
    scale = float_scale(image.dtype)
    if params is None:
        np.multiply(image, scale, out=out, casting="unsafe")
        return
    v = image
    if params["flip_ud"] != params["rot180"]:  # rot180 = flip_ud + flip_lr
        v = v[::-1]
    if params["flip_lr"] != params["rot180"]:
        v = v[:, ::-1]
    if params["rot90"]:
        v = np.rot90(v)
    np.multiply(v, params["gain"] * scale, out=out, casting="unsafe")
