"""Where a job's slide files are, and whether the file found is the one that was processed.

Preprocessing records each slide twice: its absolute path, and its path relative to the
job folder. Whoever opens the slide later (viewer, ``ask``, ``survival predict``, a rerun,
a worker in another directory) tries, in order, and takes the first file that exists and
is unchanged:

1. ``--slides-root DIR`` / the file's name, when a slides root is given (slides moved);
2. the absolute path (the job moved, the slides did not);
3. the job folder / the relative path (the job and its slides moved together);
4. for records written before paths were absolute: the recorded relative path from the
   current directory (where preprocess ran), the job folder and its parent.

A file is *unchanged* when its size and its sampled fingerprint equal the recorded ones;
a changed file is never used in place of the original, because its pixels would be
paired with features computed from another file. A DICOM slide is a folder (see
:mod:`slidevl.slide.formats`): it is found by its folder name, its size is that of its
``.dcm`` files together, and its fingerprint samples each of them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from slidevl.errors import InputError
from slidevl.slide.formats import is_slide_path, slide_bytes, slide_parts

# Bytes hashed at each of the start, the middle and the end of the file. Hashing whole
# slides (gigabytes each) would make every rerun and check read the cohort; the header
# (TIFF directories, vendor metadata), the tile data around the middle and the tail
# differ between two scans or two crops, and any copy that lost bytes changes the size.
_SAMPLE_BYTES = 1 << 16
_FINGERPRINT_KIND = "sha256-sampled"


class SlideFileError(InputError):
    """A job's slide file cannot be used; the message names the paths tried and the fix.

    ``detail`` is what went wrong without the fix, for tables that show the fix apart.
    """

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


class SlideNotFoundError(SlideFileError):
    """No candidate path of the slide exists."""


class SlideChangedError(SlideFileError):
    """A file was found where the slide was recorded, but it is not the file that was processed."""


def _sample_file(digest: Any, path: Path) -> None:
    """Feed the file size and three 64 KiB samples (start, middle, end) to ``digest``."""
    size = path.stat().st_size
    digest.update(size.to_bytes(8, "little"))
    with open(path, "rb") as fh:
        for offset in sorted({0, max(0, size // 2 - _SAMPLE_BYTES // 2), max(0, size - _SAMPLE_BYTES)}):
            fh.seek(offset)
            digest.update(fh.read(_SAMPLE_BYTES))


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """``sha256-sampled:<hex>`` over the file size and three 64 KiB samples (start, middle, end).

    For a DICOM slide folder: over each ``.dcm`` file's name, size and samples, by name.
    """
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for part in slide_parts(path):
            digest.update(part.name.encode() + b"\0")
            _sample_file(digest, part)
    else:
        _sample_file(digest, path)
    return f"{_FINGERPRINT_KIND}:{digest.hexdigest()}"


@dataclass(frozen=True)
class SlideRecord:
    """What a job knows about one slide file (the ``slide_*`` fields of its status and manifest entry)."""

    slide_id: str
    path: str | None
    relpath: str | None = None
    size: int | None = None
    fingerprint: str | None = None

    @classmethod
    def of_file(cls, slide_id: str, path: str | os.PathLike[str], job: str | os.PathLike[str]) -> "SlideRecord":
        """The record of ``path`` as it is now, for a slide of ``job``."""
        absolute = Path(path).resolve()
        try:
            relpath: str | None = os.path.relpath(absolute, Path(job).resolve())
        except ValueError:  # another drive (Windows): there is no relative path
            relpath = None
        exists = is_slide_path(absolute)
        return cls(slide_id, str(absolute), relpath, slide_bytes(absolute) if exists else None,
                   file_fingerprint(absolute) if exists else None)

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> "SlideRecord":
        """The record in a status dict or manifest entry, old ones included."""
        size = entry.get("slide_bytes")
        if size is None and isinstance(entry.get("fingerprint"), Mapping):
            # Records older than the slide_* fields still hold the size in the config fingerprint.
            size = entry["fingerprint"].get("slide_bytes")
        path = entry.get("slide_path")
        return cls(
            slide_id=str(entry.get("slide_id", "")),
            path=path if isinstance(path, str) and path else None,
            relpath=entry.get("slide_relpath") or None,
            size=int(size) if isinstance(size, (int, float)) else None,
            fingerprint=entry.get("slide_fingerprint") or None,
        )

    def fields(self) -> dict[str, Any]:
        """The record as status/manifest fields."""
        return {"slide_path": self.path or "", "slide_relpath": self.relpath, "slide_bytes": self.size,
                "slide_fingerprint": self.fingerprint}

    @property
    def name(self) -> str | None:
        """The slide's file (or DICOM folder) name, the key under a slides root."""
        recorded = self.path or self.relpath
        return Path(recorded).name if recorded else None

    def candidates(self, job: str | os.PathLike[str], slides_root: str | os.PathLike[str] | None = None) -> list[Path]:
        """Every path the slide may be at, in the order they are tried (see the module docstring)."""
        job = Path(job).resolve()
        found: list[Path] = []
        if slides_root is not None and self.name:
            found.append(Path(slides_root).expanduser().resolve() / self.name)
        recorded = Path(self.path) if self.path else None
        if recorded is not None and recorded.is_absolute():
            found.append(recorded)
        if self.relpath:
            found.append(job / self.relpath)
        if recorded is not None and not recorded.is_absolute():
            found += [Path.cwd() / recorded, job / recorded, job.parent / recorded]
        unique: dict[str, Path] = {}
        for path in found:
            unique.setdefault(os.path.normpath(path), Path(os.path.normpath(path)))
        return list(unique.values())

    def change(self, path: str | os.PathLike[str]) -> str | None:
        """How the file at ``path`` differs from the recorded one, or None when it is the same file.

        Only what was recorded is compared: old records without a fingerprint are checked by size.
        """
        size = slide_bytes(path)
        if self.size is not None and size != self.size:
            return f"{size:,} bytes, recorded {self.size:,}"
        if self.fingerprint is not None and file_fingerprint(path) != self.fingerprint:
            return "same size, different content (fingerprint)"
        return None


def relocate_hint(job: str | os.PathLike[str]) -> str:
    """The two ways to point a job at moved slides."""
    return (f"pass --slides-root DIR (the folder that now holds the slides), or run "
            f"`slidevl job relocate {job} --slides-root DIR` once to record the new place")


def resolve_slide(record: SlideRecord, job: str | os.PathLike[str], slides_root: str | os.PathLike[str] | None = None) -> Path:
    """The first candidate file that exists and is unchanged.

    Raises :class:`SlideChangedError` when files exist but all differ from the record, and
    :class:`SlideNotFoundError` when none exists; both name every path tried and the fix.
    """
    candidates = record.candidates(job, slides_root)
    changed: list[str] = []
    for path in candidates:
        if not is_slide_path(path):
            continue
        difference = record.change(path)
        if difference is None:
            return path
        changed.append(f"{path} ({difference})")
    if changed:
        detail = f"{'; '.join(changed)}: not the file that was preprocessed"
        raise SlideChangedError(
            f"slide {record.slide_id}: {detail}, so its features would not match. Point --slides-root at the original "
            f"file, or recompute from this one with `slidevl preprocess FILE --out {job} --overwrite`", detail)
    if not candidates:
        raise SlideNotFoundError(f"slide {record.slide_id}: the job records no path for it; re-run `slidevl preprocess` "
                                 "with the slide", "no path recorded")
    detail = f"file not found; tried {', '.join(map(str, candidates))}"
    raise SlideNotFoundError(f"slide {record.slide_id}: {detail}. If the slides moved, {relocate_hint(job)}", detail)
