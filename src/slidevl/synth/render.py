"""Render level-0 pixels of a synthetic slide, one block at a time.

For a block the renderer (1) classifies a 4 px lattice from the layout fields, (2)
expands it to full resolution, (3) copies each present class's texture window (the
slide's own offset and flip into the shared bank) where that class is, and (4) maps the
hematoxylin/eosin densities through the slide's stain table. Every step is a vectorised
copy or gather, so memory is bounded by the block size and the speed is tens of
megapixels per second on one core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .classes import BACKGROUND, FAT, LYMPHOCYTES, NECROSIS, STROMA, TUMOUR
from .layout import SlideLayout
from .stain import apply_lut
from .textures import Texture, texture_bank

CLASS_DS = 4  # the class lattice the renderer resolves boundaries on


@dataclass(frozen=True)
class Placement:
    """How a slide samples a texture bank: offset and mirror flips."""

    dy: int
    dx: int
    flip_y: bool
    flip_x: bool


class SlideRenderer:
    """Renders arbitrary level-0 blocks of one slide.

    ``seed`` selects the cohort's texture banks; ``rng`` draws this slide's placements.
    """

    def __init__(
        self,
        layout: SlideLayout,
        grade: int,
        lut: np.ndarray,
        seed: int,
        rng: np.random.Generator,
        texture_px: int = 2048,
    ) -> None:
        self.layout = layout
        self.lut = lut
        self._seed = seed
        self._grade = grade
        self._texture_px = texture_px
        self._placements = {
            k: Placement(
                int(rng.integers(0, 1 << 20)),
                int(rng.integers(0, 1 << 20)),
                bool(rng.integers(2)),
                bool(rng.integers(2)),
            )
            for k in (TUMOUR, STROMA, LYMPHOCYTES, NECROSIS, FAT)
        }

    def bank(self, kind: int) -> Texture:
        return texture_bank(kind, self._grade if kind == TUMOUR else 0, self._seed, self._texture_px)

    def class_lattice(self, y0: int, x0: int, height: int, width: int) -> np.ndarray:
        """Class index on the 4 px lattice covering the block (sampled at lattice centres)."""
        hc = -(-height // CLASS_DS)
        wc = -(-width // CLASS_DS)
        ys = y0 + np.arange(hc) * CLASS_DS + CLASS_DS / 2
        xs = x0 + np.arange(wc) * CLASS_DS + CLASS_DS / 2
        return self.layout.classes_at(ys, xs)

    def class_block(self, y0: int, x0: int, height: int, width: int) -> np.ndarray:
        """Class index per level-0 pixel of the block, as the renderer paints it."""
        coarse = self.class_lattice(y0, x0, height, width)
        full = np.repeat(np.repeat(coarse, CLASS_DS, axis=0), CLASS_DS, axis=1)
        return full[:height, :width]

    def render(self, y0: int, x0: int, height: int, width: int) -> np.ndarray:
        """RGB ``uint8`` pixels of the level-0 block at (x0, y0) of size width x height."""
        coarse = self.class_lattice(y0, x0, height, width)
        # Which classes occur is read off the small lattice (a full-size unique would
        # cost as much as the rest of the render).
        present = np.flatnonzero(np.bincount(coarse.ravel(), minlength=6))
        cls = None
        if len(present) > 1:
            cls = np.repeat(np.repeat(coarse, CLASS_DS, axis=0), CLASS_DS, axis=1)[:height, :width]
        h = np.zeros((height, width), np.uint8)
        e = np.zeros((height, width), np.uint8)
        for k in present:
            if k == BACKGROUND:
                continue
            p = self._placements[int(k)]
            hk, ek = self.bank(int(k)).window(y0 + p.dy, x0 + p.dx, height, width, p.flip_y, p.flip_x)
            if cls is None:
                h, e = hk, ek
            else:
                mask = cls == k
                np.copyto(h, hk, where=mask)
                np.copyto(e, ek, where=mask)
        return apply_lut(h, e, self.lut)
