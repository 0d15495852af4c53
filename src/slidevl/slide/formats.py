"""What a slide is on disk: one file with a slide extension, or a DICOM WSI folder.

A DICOM whole-slide image is served as one series of ``.dcm`` instances (one per pyramid
level, plus label and overview), kept together in a folder. slidevl takes that folder as
the slide: its id is the folder name, its bytes are the sum of its ``.dcm`` files, and a
``.dcm`` file given on its own stands for the folder that holds it. Only the files directly
in the folder count; OpenSlide finds the other instances of a series in the same folder.

Nothing here opens an image, so job bookkeeping can import it without the imaging stack.
"""

from __future__ import annotations

import os
from pathlib import Path

# Single-file (or file-plus-companion) formats OpenSlide reads, found by extension in a folder.
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".qptiff")
DICOM_EXTENSION = ".dcm"
# MIRAX keeps its tiles in a folder named after the .mrxs file, next to it.
MIRAX_EXTENSION = ".mrxs"


def is_visible(path: Path) -> bool:
    """False for hidden entries (``.DS_Store``, ``._x.dcm`` resource forks), which are never slides."""
    return not path.name.startswith(".")


def dicom_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The ``.dcm`` files directly in ``folder``, by name (empty if it is not a folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == DICOM_EXTENSION and is_visible(p) and p.is_file())


def is_dicom_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding ``.dcm`` files, i.e. one DICOM slide."""
    return bool(dicom_files(path))


def slide_of(path: str | os.PathLike[str]) -> Path:
    """The slide a path stands for: a ``.dcm`` file stands for its folder, anything else for itself."""
    path = Path(path)
    if path.suffix.lower() == DICOM_EXTENSION and path.is_file():
        return path.parent
    return path


def is_slide_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` exists as a slide: any file, or a folder holding ``.dcm`` files."""
    path = Path(path)
    return path.is_file() or is_dicom_folder(path)


def slide_parts(path: str | os.PathLike[str]) -> list[Path]:
    """The files that make up the slide at ``path``: a DICOM folder's ``.dcm`` files, else the file itself."""
    path = Path(path)
    return dicom_files(path) if path.is_dir() else [path]


def slide_bytes(path: str | os.PathLike[str]) -> int:
    """Size of the slide at ``path`` in bytes (all its ``.dcm`` files for a DICOM folder)."""
    return sum(p.stat().st_size for p in slide_parts(path))
