"""The geometry and arithmetic of a tiled upscale, on plain numbers and numpy arrays.

An enlarged image batch (frames, height, width, channels) is cut into a grid of core tiles that
cover every frame exactly once; tile ``index`` counts frame by frame, row by row, left to right.
Each tile is rendered from its padded region: the core grown by ``padding`` pixels on every side,
shifted inward where that would leave the frame, so that every tile of a grid has the same padded
size (a tile at the edge takes its context from inside the image) and any tiles can be rendered
together in one batch. A tile is pasted back with a weight that is 1 over its core and falls off
across the padding, so neighbours fade into each other over ``blur`` pixels. Blending sums the
weighted tiles in index order and divides by the summed weights: the result depends on the tiles,
never on the order they arrived in. A tile's noise seed depends only on the job's seed and the
tile's index. ``batches`` groups the tiles into the batches that participants lease: it depends on
the number of tiles and the batch size alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MASK64 = (1 << 64) - 1
LATENT_SCALE = 8  # what a tile's sides are padded to a multiple of before VAE encoding


class TileError(ValueError):
    pass


def tile_seed(seed: int, index: int) -> int:
    """The noise seed of tile ``index``: a 64-bit mix of the job's seed and the index, so that
    neighbouring tiles (and neighbouring seeds) draw unrelated noise."""
    z = (int(seed) + (int(index) + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def enlarged_size(width: int, height: int, upscale_by: float) -> tuple[int, int]:
    """(width, height) of an image scaled by ``upscale_by``, rounded to whole pixels."""
    if not upscale_by > 0 or not math.isfinite(upscale_by):
        raise TileError(f"upscale_by must be a positive number, not {upscale_by!r}")
    return max(1, int(round(width * upscale_by))), max(1, int(round(height * upscale_by)))


@dataclass(frozen=True)
class Tile:
    index: int
    frame: int
    x0: int  # the core, [x0, x1) x [y0, y1): the pixels this tile owns
    y0: int
    x1: int
    y1: int
    px0: int  # the padded region that is rendered, [px0, px1) x [py0, py1), the same size for every tile
    py0: int
    px1: int
    py1: int

    @property
    def padded_shape(self) -> tuple[int, int]:
        return self.py1 - self.py0, self.px1 - self.px0

    def to_dict(self) -> dict:
        return {"index": self.index, "frame": self.frame, "core": [self.x0, self.y0, self.x1, self.y1],
                "padded": [self.px0, self.py0, self.px1, self.py1]}


@dataclass(frozen=True)
class Grid:
    frames: int
    height: int
    width: int
    tile_width: int
    tile_height: int
    padding: int
    blur: int

    def __post_init__(self):
        for name in ("frames", "height", "width", "tile_width", "tile_height"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TileError(f"{name} must be a whole number >= 1, not {value!r}")
        for name in ("padding", "blur"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TileError(f"{name} must be a whole number >= 0, not {value!r}")

    @property
    def columns(self) -> int:
        return math.ceil(self.width / self.tile_width)

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.tile_height)

    @property
    def per_frame(self) -> int:
        return self.columns * self.rows

    def __len__(self) -> int:
        return self.frames * self.per_frame

    def tile(self, index: int) -> Tile:
        if not 0 <= index < len(self):
            raise TileError(f"tile {index} is outside 0..{len(self) - 1}")
        frame, rest = divmod(index, self.per_frame)
        row, column = divmod(rest, self.columns)
        x0, y0 = column * self.tile_width, row * self.tile_height
        x1, y1 = min(x0 + self.tile_width, self.width), min(y0 + self.tile_height, self.height)
        padded_height, padded_width = self.padded_shape
        px0 = min(max(0, x0 - self.padding), self.width - padded_width)
        py0 = min(max(0, y0 - self.padding), self.height - padded_height)
        return Tile(index, frame, x0, y0, x1, y1, px0, py0, px0 + padded_width, py0 + padded_height)

    @property
    def padded_shape(self) -> tuple[int, int]:
        """(height, width) of every tile's padded region."""
        return (min(self.tile_height + 2 * self.padding, self.height),
                min(self.tile_width + 2 * self.padding, self.width))

    def tiles(self) -> list[Tile]:
        return [self.tile(i) for i in range(len(self))]

    def to_dict(self) -> dict:
        return {"frames": self.frames, "height": self.height, "width": self.width,
                "tile_width": self.tile_width, "tile_height": self.tile_height,
                "padding": self.padding, "blur": self.blur}

    @classmethod
    def from_dict(cls, data: dict) -> "Grid":
        try:
            return cls(**{k: data[k] for k in ("frames", "height", "width", "tile_width", "tile_height",
                                              "padding", "blur")})
        except (KeyError, TypeError) as exc:
            raise TileError(f"not a tile grid: {exc}") from None

    # --- pixels ------------------------------------------------------------------------------
    def crop(self, images: np.ndarray, index: int) -> np.ndarray:
        """The padded region of tile ``index`` from a (frames, height, width, channels) batch."""
        t = self.tile(index)
        return images[t.frame, t.py0:t.py1, t.px0:t.px1]

    def _profile(self, start: int, stop: int, core0: int, core1: int) -> np.ndarray:
        """One side's weights over [start, stop) for a core [core0, core1): 1 over the core, falling
        linearly to 0 over at most ``blur`` pixels of the padding, 0 beyond."""
        ramp = min(self.blur, self.padding)
        position = np.arange(start, stop)
        outside = np.maximum(np.maximum(core0 - position, position - (core1 - 1)), 0)
        if ramp == 0:
            return (outside == 0).astype(np.float32)
        return np.clip(1.0 - outside / (ramp + 1.0), 0.0, 1.0).astype(np.float32)

    def weights(self, index: int) -> np.ndarray:
        """The tile's blending weight over its padded region, (height, width) float32: 1 over the
        core, falling linearly to 0 across the padding over at most ``blur`` pixels; 0 over the
        rest of the padding (with blur 0 the seams are hard)."""
        t = self.tile(index)
        return np.outer(self._profile(t.py0, t.py1, t.y0, t.y1), self._profile(t.px0, t.px1, t.x0, t.x1))

    def _sums(self) -> tuple[np.ndarray, np.ndarray]:
        """The weights of all tiles summed over the frame, as (per row, per column): a tile's weight
        is its row's profile times its column's, and the tiles form a full grid, so the summed
        weight at (y, x) is rows[y] * columns[x]."""
        rows, columns = np.zeros(self.height, np.float32), np.zeros(self.width, np.float32)
        for row in range(self.rows):
            t = self.tile(row * self.columns)
            rows[t.py0:t.py1] += self._profile(t.py0, t.py1, t.y0, t.y1)
        for column in range(self.columns):
            t = self.tile(column)
            columns[t.px0:t.px1] += self._profile(t.px0, t.px1, t.x0, t.x1)
        return rows, columns

    def blend(self, rendered: dict[int, np.ndarray], channels: int) -> np.ndarray:
        """The whole batch from every tile's rendered padded region, float32: each tile weighted by
        its share of the summed weights (so no division over the whole image is needed), summed in
        index order."""
        missing = [i for i in range(len(self)) if i not in rendered]
        if missing:
            raise TileError(f"{len(missing)} of {len(self)} tiles are missing (first: {missing[0]})")
        rows, columns = self._sums()
        total = np.zeros((self.frames, self.height, self.width, channels), dtype=np.float32)
        scratch = np.empty((*self.padded_shape, channels), dtype=np.float32)
        for index in range(len(self)):
            t = self.tile(index)
            pixels = rendered[index]
            if pixels.shape != (*t.padded_shape, channels):
                raise TileError(f"tile {index} is {pixels.shape}, not {(*t.padded_shape, channels)}")
            share = np.outer(self._profile(t.py0, t.py1, t.y0, t.y1) / rows[t.py0:t.py1],
                             self._profile(t.px0, t.px1, t.x0, t.x1) / columns[t.px0:t.px1])
            region = total[t.frame, t.py0:t.py1, t.px0:t.px1]
            np.add(region, np.multiply(pixels, share[..., None], out=scratch), out=region)
        return total


def batches(count: int, tile_batch: int) -> list[tuple[int, ...]]:
    """The tiles 0..count-1 in batches of ``tile_batch`` (the last may be smaller), in index order:
    consecutive tiles, across frames too. Every tile of a grid has the same padded size, so any
    tiles batch together; the batches depend on ``count`` and ``tile_batch`` alone."""
    if not isinstance(tile_batch, int) or isinstance(tile_batch, bool) or tile_batch < 1:
        raise TileError(f"tile_batch must be a whole number >= 1, not {tile_batch!r}")
    return [tuple(range(start, min(start + tile_batch, count))) for start in range(0, count, tile_batch)]


def latent_padding(height: int, width: int) -> tuple[int, int]:
    """Pixels to add below and to the right so that both sides are a multiple of LATENT_SCALE."""
    return (-height) % LATENT_SCALE, (-width) % LATENT_SCALE
