"""mpp resolution: slide property, run override, per-slide CSV, and the missing-mpp error."""

from __future__ import annotations

import pytest
import tifffile

from slide_fixtures import tissue_image, write_aperio_slide
from slidevl.slide.mpp import MissingMppError, MppCsvError, load_mpp_csv, mpp_request, resolve_mpp
from slidevl.slide.reader import open_slide


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("mpp")
    return {
        "with": write_aperio_slide(root / "with.svs", 512, 512, mpp=0.2527),
        "without": write_aperio_slide(root / "without.svs", 512, 512, mpp=None),
    }


def test_mpp_read_from_property_without_rounding(slides):
    with open_slide(slides["with"]) as slide:
        info = resolve_mpp(slide, "with")
    assert info.mpp == 0.2527 and info.source == "property"
    assert info.as_attrs()["mpp_read_x"] == 0.2527


def test_run_override_and_csv_take_precedence(slides):
    with open_slide(slides["with"]) as slide:
        over = resolve_mpp(slide, "with", override=0.5)
        csv = resolve_mpp(slide, "with", override=0.5, table={"with": 0.26})
        other = resolve_mpp(slide, "with", override=0.5, table={"someone_else": 0.26})
    assert (over.mpp, over.source, over.read_mpp_x) == (0.5, "override", 0.2527)
    assert (csv.mpp, csv.source) == (0.26, "csv")
    assert (other.mpp, other.source) == (0.5, "override")


def test_missing_mpp_names_both_overrides(slides):
    with open_slide(slides["without"]) as slide:
        with pytest.raises(MissingMppError) as info:
            resolve_mpp(slide, "without")
        message = str(info.value)
        assert "without.svs" in message and "--mpp-override" in message and "--mpp-csv" in message
        assert resolve_mpp(slide, "without", override=0.5).mpp == 0.5


def test_72_dpi_default_is_rejected_not_used(tmp_path):
    path = tmp_path / "dpi.tif"
    tifffile.imwrite(path, tissue_image(256, 256), tile=(256, 256), photometric="rgb", resolution=(72, 72),
                     resolutionunit="INCH", metadata=None)
    with open_slide(path) as slide, pytest.raises(MissingMppError, match="implausible mpp"):
        resolve_mpp(slide, "dpi")


def test_mpp_request_is_known_without_opening():
    assert mpp_request("a", None, None) == {"source": "property"}
    assert mpp_request("a", 0.5, None) == {"source": "override", "mpp": 0.5}
    assert mpp_request("a", 0.5, {"a": 0.25}) == {"source": "csv", "mpp": 0.25}


def test_mpp_csv_parsing_and_errors(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("slide_id,mpp\na,0.25\nb, 0.5\n")
    assert load_mpp_csv(good) == {"a": 0.25, "b": 0.5}
    cases = {
        "slide,mpp\na,0.25\n": "slide_id,mpp",
        "slide_id,mpp\na,abc\n": "not a number",
        "slide_id,mpp\na,-1\n": "must be > 0",
        "slide_id,mpp\na,0.25\na,0.5\n": "listed twice",
    }
    for i, (text, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.csv"
        bad.write_text(text)
        with pytest.raises(MppCsvError, match=message):
            load_mpp_csv(bad)
    with pytest.raises(MppCsvError, match="not found"):
        load_mpp_csv(tmp_path / "missing.csv")
