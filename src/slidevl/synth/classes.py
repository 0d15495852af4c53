"""Tissue classes and the fixed geometry shared by every synthetic slide.

The class index is what the label maps store per pixel; keep the order stable, since
label PNGs written by earlier versions are read back with it.
"""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("background", "tumour", "stroma", "lymphocytes", "necrosis", "fat")
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}

BACKGROUND, TUMOUR, STROMA, LYMPHOCYTES, NECROSIS, FAT = range(len(CLASSES))
TISSUE_CLASSES: tuple[int, ...] = (TUMOUR, STROMA, LYMPHOCYTES, NECROSIS, FAT)

MPP = 0.5  # level-0 microns per pixel: "20x"
LABEL_DS = 16  # label maps hold one class per 16x16 level-0 pixels
REGION_PX = 4096  # regions: 16x16 patches of 256 px at 0.5 mpp, grid anchored at (0, 0)
TILE_PX = 256  # TIFF tile edge
