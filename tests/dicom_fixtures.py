"""DICOM whole-slide images written by wsidicom, converted from the synthetic test slides.

:func:`write_dicom_slide` reads every pyramid level of a slide slidevl opens (a synthetic
Aperio TIFF here) and saves it with wsidicom as a DICOM VL Whole Slide Microscopy series:
one instance per level, 256 px frames (TILED_FULL, white past the image edge), the
source's mpp as the pixel spacing, no label or overview. Uncompressed by default, so the
DICOM pixels are the source's decoded pixels exactly; JPEG baseline is the form the
public TCGA and CPTAC collections are served in.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from wsidicom import WsiDicom
from wsidicom.codec import Encoder
from wsidicom.geometry import Point, Size, SizeMm
from wsidicom.instance import ImageData, WsiDataset, WsiInstance
from wsidicom.metadata import Equipment, Image, ImageType, Label, Patient, Pyramid, Series, Slide, Study, WsiMetadata
from wsidicom.metadata.sample import SlideSample
from wsidicom.metadata.schema.dicom import WsiMetadataDicomSchema
from wsidicom.source import Source

from slidevl.slide.reader import open_slide

FRAME = 256
UNCOMPRESSED = ExplicitVRLittleEndian
JPEG = JPEGBaseline8Bit


class _LevelData(ImageData):
    """One pyramid level held in memory, served to wsidicom frame by frame."""

    def __init__(self, pixels: np.ndarray, mpp: float, transfer_syntax: UID) -> None:
        self._pixels = pixels
        self._mpp = mpp
        self._syntax = transfer_syntax
        super().__init__(Encoder.create(transfer_syntax, 8, self.photometric_interpretation))

    @property
    def transfer_syntax(self) -> UID:
        return self._syntax

    @property
    def image_size(self) -> Size:
        return Size(self._pixels.shape[1], self._pixels.shape[0])

    @property
    def tile_size(self) -> Size:
        return Size(FRAME, FRAME)

    @property
    def pixel_spacing(self) -> SizeMm:
        return SizeMm(self._mpp / 1000, self._mpp / 1000)

    @property
    def imaged_size(self) -> None:
        return None

    @property
    def samples_per_pixel(self) -> int:
        return 3

    @property
    def photometric_interpretation(self) -> str:
        return "RGB" if self._syntax == UNCOMPRESSED else "YBR_FULL_422"

    @property
    def bits(self) -> int:
        return 8

    @property
    def image_coordinate_system(self) -> None:
        return None

    @property
    def thread_safe(self) -> bool:
        return True

    @property
    def lossy_compression(self) -> None:
        return None

    @property
    def transcoder(self) -> None:
        return None

    def get_decoded_tile(self, tile_point: Point, z: float, path: str, cache: bool = True) -> np.ndarray:
        frame = np.full((FRAME, FRAME, 3), 255, np.uint8)
        y, x = tile_point.y * FRAME, tile_point.x * FRAME
        part = self._pixels[y : y + FRAME, x : x + FRAME]
        frame[: part.shape[0], : part.shape[1]] = part
        return frame

    def get_encoded_tile(self, tile: Point, z: float, path: str) -> bytes:
        return self.encoder.encode(self.get_decoded_tile(tile, z, path))


class _LevelsSource(Source):
    """A wsidicom source of the given levels: one series, one pyramid, nothing else."""

    def __init__(self, levels: list[np.ndarray], mpp: float, transfer_syntax: UID, specimen: str) -> None:
        super().__init__()
        metadata = WsiMetadata(
            study=Study(uid=generate_uid()), series=Series(uid=generate_uid(), number=1), patient=Patient(),
            equipment=Equipment(), slide=Slide(samples=[SlideSample(identifier=specimen, uid=generate_uid())]),
            pyramid=Pyramid(image=Image(), optical_paths=[], uid=generate_uid()), label=Label(),
            frame_of_reference_uid=generate_uid(), dimension_organization_uids=[generate_uid()],
        )
        base = WsiMetadataDicomSchema().dump(metadata, ImageType.VOLUME)
        width0 = levels[0].shape[1]
        # create_instance fills the dataset in place (SOP instance UID), so each level gets its own copy.
        self._levels = [
            WsiInstance.create_instance(_LevelData(level, mpp * width0 / level.shape[1], transfer_syntax),
                                        copy.deepcopy(base), ImageType.VOLUME, 0)
            for level in levels
        ]

    @property
    def base_dataset(self) -> WsiDataset:
        return self._levels[0].dataset

    @property
    def level_instances(self) -> list[WsiInstance]:
        return self._levels

    @property
    def label_instances(self) -> list[WsiInstance]:
        return []

    @property
    def overview_instances(self) -> list[WsiInstance]:
        return []

    @property
    def thumbnail_instances(self) -> list[WsiInstance]:
        return []

    @property
    def annotation_instances(self) -> list:
        return []

    def close(self) -> None:
        pass


def write_dicom_slide(source: Path, folder: Path, transfer_syntax: UID = UNCOMPRESSED) -> list[Path]:
    """Convert the slide ``source`` into a DICOM series in ``folder`` (created); return its files."""
    with open_slide(source) as slide:
        mpp = slide.native_mpp()
        assert mpp is not None, f"{source}: the source slide needs an mpp"
        levels = [slide.read_region((0, 0), level, size) for level, size in enumerate(slide.level_dimensions)]
    folder.mkdir(parents=True, exist_ok=True)
    wsi = WsiDicom(_LevelsSource(levels, mpp[0], transfer_syntax, source.stem))
    return sorted(Path(p) for p in wsi.save(folder, workers=1))
