"""Microns per pixel: read from the slide, or overridden per run or per slide.

Physical size is primary in slidevl, so the mpp is never guessed, defaulted or rounded.
Precedence: a per-slide CSV entry, then a run-wide override, then the slide's own
property. When none gives a value, :class:`MissingMppError` names both override options.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from slidevl.errors import InputError
from slidevl.slide.reader import Slide

# Anything outside this range is not a microscope scan resolution: typically a TIFF
# written with the 72 dpi default. Reject it rather than build a nonsense grid.
MPP_RANGE = (0.01, 100.0)
# mpp_x and mpp_y may differ by rounding in the file; beyond this the pixels are not square.
_ANISOTROPY_TOL = 0.01


class MissingMppError(InputError):
    """The slide carries no usable mpp and no override was given."""


class MppCsvError(InputError):
    """The per-slide mpp CSV is malformed."""


@dataclass(frozen=True)
class MppInfo:
    """The mpp used for a slide and where it came from."""

    mpp: float
    source: str  # "property" | "override" | "csv"
    read_mpp_x: float | None  # as recorded in the slide, None if absent
    read_mpp_y: float | None
    read_property: str | None

    def as_attrs(self) -> dict[str, object]:
        return {
            "mpp": self.mpp,
            "mpp_source": self.source,
            "mpp_read_x": self.read_mpp_x,
            "mpp_read_y": self.read_mpp_y,
            "mpp_read_property": self.read_property,
        }


_OVERRIDE_HINT = "pass `--mpp-override MPP` for the whole run or `--mpp-csv FILE` with columns slide_id,mpp"


def mpp_request(slide_id: str, override: float | None, table: Mapping[str, float] | None) -> dict[str, object]:
    """What the configuration asks for this slide, known without opening it.

    Used in the completeness fingerprint: changing an override must re-run the slide.
    """
    if table and slide_id in table:
        return {"source": "csv", "mpp": float(table[slide_id])}
    if override is not None:
        return {"source": "override", "mpp": float(override)}
    return {"source": "property"}


def _check_range(value: float, what: str, path: Path) -> None:
    lo, hi = MPP_RANGE
    if not lo <= value <= hi:
        raise MissingMppError(
            f"{path}: implausible mpp {value!r} from {what} (expected {lo}..{hi} µm/px; a 72 dpi TIFF default "
            f"looks like this); {_OVERRIDE_HINT}"
        )


def resolve_mpp(slide: Slide, slide_id: str, override: float | None = None,
                table: Mapping[str, float] | None = None) -> MppInfo:
    """The mpp to use for ``slide``, with its source; raise :class:`MissingMppError` if none."""
    native = slide.native_mpp()
    read_x, read_y, prop = native if native else (None, None, None)
    request = mpp_request(slide_id, override, table)
    if request["source"] != "property":
        value = float(request["mpp"])  # type: ignore[arg-type]
        _check_range(value, f"the {request['source']} option", slide.path)
        return MppInfo(value, str(request["source"]), read_x, read_y, prop)
    if native is None:
        raise MissingMppError(f"{slide.path}: the slide records no microns-per-pixel (mpp); {_OVERRIDE_HINT}")
    _check_range(read_x, f"property {prop}", slide.path)
    _check_range(read_y, f"property {prop}", slide.path)
    if abs(read_x - read_y) / max(read_x, read_y) > _ANISOTROPY_TOL:
        raise MissingMppError(
            f"{slide.path}: non-square pixels (mpp-x {read_x}, mpp-y {read_y}); the patch grid needs one mpp, "
            f"{_OVERRIDE_HINT}"
        )
    return MppInfo(read_x, "property", read_x, read_y, prop)


def load_mpp_csv(path: str | Path) -> dict[str, float]:
    """Read a ``slide_id,mpp`` CSV into a dict, with errors naming the file and row."""
    path = Path(path)
    if not path.is_file():
        raise MppCsvError(f"{path}: mpp CSV not found")
    table: dict[str, float] = {}
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "slide_id" not in fields or "mpp" not in fields:
            raise MppCsvError(f"{path}: needs a header with columns slide_id,mpp (found {fields})")
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            sid, raw = row.get("slide_id", ""), row.get("mpp", "")
            if not sid:
                raise MppCsvError(f"{path}:{line}: empty slide_id")
            try:
                value = float(raw)
            except ValueError:
                raise MppCsvError(f"{path}:{line}: mpp {raw!r} for {sid!r} is not a number") from None
            if not value > 0:
                raise MppCsvError(f"{path}:{line}: mpp for {sid!r} must be > 0, got {value}")
            if sid in table and table[sid] != value:
                raise MppCsvError(f"{path}:{line}: {sid!r} listed twice with different mpp ({table[sid]} vs {value})")
            table[sid] = value
    return table
