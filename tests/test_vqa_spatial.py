"""Spatial questions: layout measured on label maps, varied layouts, templates, records, split, report."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from slidevl.features.config import PreprocessConfig
from slidevl.features.pipeline import preprocess
from slidevl.qa.records import read_records, write_records
from slidevl.synth import load_truth, make_cohort
from slidevl.synth.classes import BACKGROUND, FAT, LABEL_DS, MPP, NECROSIS, STROMA, TUMOUR
from slidevl.synth.layout import Arrangement, make_layout
from slidevl.synth.model import Morphology
from slidevl.synth.spatial import PART_NAMES, measure
from slidevl.vqa.build import BuildConfig, build_qa
from slidevl.vqa.evaluate import evaluate, report_table
from slidevl.vqa.templates import NODULE_SIZE, Unit, Writer, roi_records, spatial_answer, wsi_records
from slidevl.vqa.templates_facts import Composition, RegionFacts, SlideFacts

PX_MM2 = (LABEL_DS * MPP / 1000.0) ** 2  # one label pixel: 8 x 8 µm
COUNTS = ("one", "two", "three", "four or more")


def _disc(lab: np.ndarray, cy: float, cx: float, r: float, value: int, within: int | None = None) -> None:
    yy, xx = np.ogrid[: lab.shape[0], : lab.shape[1]]
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if within is not None:
        mask &= lab == within
    lab[mask] = value


def _whole(lab: np.ndarray):
    return measure(lab, [0, 0, lab.shape[1] * LABEL_DS, lab.shape[0] * LABEL_DS], LABEL_DS, MPP)


# -- measurements on hand-built label maps -------------------------------------------------

def test_fragments_and_nodules_are_counted_with_areas_and_centroids():
    lab = np.zeros((120, 200), np.uint8)
    lab[10:110, 10:110] = STROMA
    lab[30:90, 130:190] = FAT
    lab[2:4, 195:197] = STROMA  # dust: far under the fragment floor
    _disc(lab, 35, 35, 12, TUMOUR)
    _disc(lab, 80, 80, 15, TUMOUR)
    _disc(lab, 60, 160, 10, TUMOUR)
    s = _whole(lab)
    assert (s.n_fragments, s.n_nodules) == (2, 3)
    big = (lab[50:100, 60:100] == TUMOUR).sum()
    assert s.nodules[0].area_mm2 == pytest.approx(big * PX_MM2)
    assert s.nodules[0].centroid == pytest.approx(((80 + 0.5) * 16, (80 + 0.5) * 16))
    assert s.fragments[0].bbox == (160, 160, 1760, 1760)
    assert s.tissue_bbox == (160, 160, 3040, 1760)
    # A box sees only what lies inside it: the right fragment and its nodule.
    right = measure(lab, [2000, 0, 3200, 1920], LABEL_DS, MPP)
    assert (right.n_fragments, right.n_nodules) == (1, 1)
    assert right.nodules[0].centroid == pytest.approx(((160 + 0.5) * 16, (60 + 0.5) * 16))
    with pytest.raises(ValueError, match="holds no label pixel"):
        measure(lab, [5000, 0, 6000, 100], LABEL_DS, MPP)


def test_spatial_answer_reads_each_template_off_the_layout():
    lab = np.zeros((120, 200), np.uint8)
    lab[10:110, 10:110] = STROMA
    lab[30:90, 130:190] = STROMA
    _disc(lab, 60, 45, 20, TUMOUR)  # the largest nodule, in the middle left of the tissue
    _disc(lab, 60, 45, 8, NECROSIS, within=TUMOUR)  # necrosis surrounded by tumour
    _disc(lab, 60, 160, 10, TUMOUR)
    s = _whole(lab)
    answers = {t: spatial_answer(s, t) for t in ("nodules", "fragments", "tumour_edge", "necrosis_relation",
                                                 "tumour_part", "nodule_size")}
    assert answers["nodules"] == "two" and answers["fragments"] == "two"
    assert answers["necrosis_relation"] == "inside the tumour"
    assert answers["tumour_edge"] == "no"  # both nodules keep 15 label px (120 µm) of tissue to the glass
    assert answers["tumour_part"] == "middle left"
    assert answers["nodule_size"] == NODULE_SIZE[0][1]  # about 0.08 mm²
    # No tumour: nothing to say about nodules, edges or necrosis.
    plain = _whole(np.where(lab == BACKGROUND, BACKGROUND, STROMA).astype(np.uint8))
    assert spatial_answer(plain, "nodules") is None and spatial_answer(plain, "tumour_edge") is None
    assert spatial_answer(plain, "nodule_size") is None and spatial_answer(plain, "fragments") == "two"
    with pytest.raises(ValueError, match="not a spatial template"):
        spatial_answer(s, "grade")


def test_merged_nodules_count_once_and_unclear_counts_are_none():
    lab = np.full((100, 100), STROMA, np.uint8)
    lab[0, :] = BACKGROUND
    _disc(lab, 40, 40, 14, TUMOUR)
    _disc(lab, 40, 60, 14, TUMOUR)  # overlaps the first: one nodule
    assert _whole(lab).n_nodules == 1
    corner = np.full((100, 100), STROMA, np.uint8)
    corner[20:35, 20:35] = TUMOUR
    corner[35:50, 35:50] = TUMOUR  # meets the first only at a corner
    s = _whole(corner)
    assert len(s.nodules) == 1 and s.nodules_ambiguous and s.n_nodules is None
    floor = np.full((100, 100), STROMA, np.uint8)
    floor[10:40, 10:40] = TUMOUR
    floor[70:80, 70:80] = TUMOUR  # 100 px = 0.0064 mm²: just under the 0.01 mm² floor
    s = _whole(floor)
    assert len(s.nodules) == 1 and s.n_nodules is None


def test_tumour_at_the_tissue_edge_yes_no_and_unclear():
    def slide(tumour_rows: slice, tumour_cols: slice) -> np.ndarray:
        lab = np.zeros((100, 100), np.uint8)
        lab[20:100, :] = STROMA
        lab[tumour_rows, tumour_cols] = TUMOUR
        return lab

    touching = _whole(slide(slice(20, 45), slice(30, 70)))  # 40 px = 320 µm along the glass
    assert touching.tumour_at_edge is True and touching.tumour_edge_contact_um == pytest.approx(320)
    inside = _whole(slide(slice(35, 60), slice(30, 70)))  # 15 px = 120 µm of stroma in between
    assert inside.tumour_at_edge is False and inside.tumour_edge_gap_um == pytest.approx(15 * 8)
    near = _whole(slide(slice(22, 45), slice(30, 70)))  # 2 px = 16 µm of stroma: could be read either way
    assert near.tumour_at_edge is None
    brush = _whole(slide(slice(20, 45), slice(30, 35)))  # touches along 5 px = 40 µm only
    assert brush.tumour_at_edge is None
    assert _whole(np.full((50, 50), STROMA, np.uint8)).tumour_at_edge is None  # no tumour, no question


def test_necrosis_inside_or_next_to_tumour():
    base = np.full((100, 100), STROMA, np.uint8)
    _disc(base, 50, 50, 20, TUMOUR)
    core = base.copy()
    _disc(core, 50, 50, 8, NECROSIS)
    s = _whole(core)
    assert s.necrosis_tumour_share == 1.0 and s.necrosis_relation == "inside"
    rim = base.copy()
    _disc(rim, 50, 70, 9, NECROSIS, within=TUMOUR)  # a cap against the nodule's margin
    s = _whole(rim)
    assert 0 < s.necrosis_tumour_share <= 0.7 and s.necrosis_relation == "next to"
    apart = base.copy()
    _disc(apart, 85, 85, 8, NECROSIS)  # necrosis in stroma, away from the tumour
    assert _whole(apart).necrosis_tumour_share == 0 and _whole(apart).necrosis_relation is None
    speck = base.copy()
    speck[49:51, 49:51] = NECROSIS  # 4 px: under the necrosis floor
    assert _whole(speck).necrosis_relation is None
    assert _whole(base).necrosis_relation is None


def test_part_of_the_largest_nodule_on_the_tissue_box():
    def tissue() -> np.ndarray:
        lab = np.zeros((120, 120), np.uint8)
        lab[10:100, 10:100] = STROMA  # tissue box: label px 10..99, thirds at 40 and 70
        return lab

    lab = tissue()
    _disc(lab, 25, 25, 8, TUMOUR)
    _disc(lab, 80, 55, 5, TUMOUR)  # smaller: the first stays the largest
    assert _whole(lab).largest_nodule_part == "upper left"
    lab = tissue()
    _disc(lab, 55, 85, 8, TUMOUR)
    assert _whole(lab).largest_nodule_part == "middle right"
    on_line = tissue()
    _disc(on_line, 25, 39.5, 8, TUMOUR)  # centroid on the line between left and centre
    assert _whole(on_line).largest_nodule_part is None
    tie = tissue()
    _disc(tie, 25, 25, 8, TUMOUR)
    _disc(tie, 80, 80, 8, TUMOUR)
    assert _whole(tie).largest_nodule_part is None
    filling = tissue()
    filling[15:95, 15:95] = TUMOUR
    assert _whole(filling).largest_nodule_part is None
    # In a box, the grid is laid on the tissue inside the box (label px 55..99: thirds at 70 and 85).
    lab = tissue()
    _disc(lab, 64, 64, 8, TUMOUR)
    assert _whole(lab).largest_nodule_part == "centre"
    assert measure(lab, [880, 880, 1600, 1600], LABEL_DS, MPP).largest_nodule_part == "upper left"
    assert set(PART_NAMES) >= {"upper left", "centre", "lower right"} and len(PART_NAMES) == 9


# -- the generator's arrangements --------------------------------------------------------

@pytest.mark.parametrize("arrangement", [Arrangement(1, True, False), Arrangement(3, False, True),
                                         Arrangement(4, True, True), Arrangement(2, False, False)])
def test_layout_realises_the_arrangement_and_keeps_the_proportions(arrangement):
    m = Morphology(grade=2, tumour_fraction=0.3, necrosis_fraction=0.15, lymphocyte_infiltration=0.5,
                   fat_fraction=0.1, nodule_weights=(0.5, 0.3, 0.2))
    layout = make_layout(4096, 4096, m, np.random.default_rng(2), arrangement)
    lab = layout.label_map()
    s = _whole(lab)
    assert s.n_fragments == arrangement.n_fragments
    assert s.tumour_at_edge is arrangement.tumour_at_edge
    assert s.necrosis_relation == ("next to" if arrangement.necrosis_at_margin else "inside")
    c = np.bincount(lab.ravel(), minlength=6).astype(float)
    bed = c[TUMOUR] + c[NECROSIS]
    assert bed / c[1:].sum() == pytest.approx(0.3, abs=0.03)
    assert c[NECROSIS] / bed == pytest.approx(0.15, abs=0.03)
    assert layout.arrangement == arrangement


# -- templates ---------------------------------------------------------------------------

def _slide_facts(lab: np.ndarray, spatial=True) -> SlideFacts:
    box = [0, 0, lab.shape[1] * LABEL_DS, lab.shape[0] * LABEL_DS]
    s = measure(lab, box, LABEL_DS, MPP)
    return SlideFacts("S1", "P1", 2, Composition.of_box(lab, box, LABEL_DS), len(s.nodules),
                      tuple(n.area_mm2 for n in s.nodules), 2, 1.0, s if spatial else None)


def _answer(record) -> str:
    return record.options[ord(record.answer) - 65]


def test_spatial_templates_render_closed_options_from_the_layout():
    lab = np.zeros((160, 200), np.uint8)
    lab[10:150, 10:130] = STROMA
    lab[40:120, 150:190] = STROMA
    _disc(lab, 36, 40, 16, TUMOUR)  # upper left of the tissue box, 80 µm from the glass
    _disc(lab, 36, 40, 6, NECROSIS)
    _disc(lab, 120, 100, 7, TUMOUR)
    lab[120:150, 93:108] = TUMOUR  # the smaller nodule reaches the glass along 120 µm
    facts = _slide_facts(lab)
    unit = Unit("WSI", "S1", "S1", "P1", None, facts)
    records = {r.meta["template"]: r for r in wsi_records(Writer(0, "S1"), unit) if r.category == "spatial"}
    assert set(records) == {"nodules", "fragments", "tumour_edge", "necrosis_relation", "tumour_part", "nodule_size"}
    assert _answer(records["nodules"]) == "two" and set(records["nodules"].options) == set(COUNTS)
    assert _answer(records["fragments"]) == "two"
    assert _answer(records["tumour_edge"]) == "yes" and len(records["tumour_edge"].options) == 2
    assert _answer(records["necrosis_relation"]) == "inside the tumour"
    assert _answer(records["tumour_part"]) == "upper left" and len(records["tumour_part"].options) == 4
    area = facts.spatial.nodules[0].area_mm2
    assert area < NODULE_SIZE[0][0] and _answer(records["nodule_size"]) == NODULE_SIZE[0][1]
    assert all(r.format == "single" and r.level == "WSI" for r in records.values())

    # The same layout seen through an ROI box: the region's own nodules, edge and part.
    box = (0, 0, 2400, 1600)  # label px 0..99 down, 0..149 across: the larger nodule only
    region = RegionFacts("S1", "R1", box, 1.0, Composition.of_box(lab, box, LABEL_DS), 2,
                         measure(lab, box, LABEL_DS, MPP))
    roi = Unit("ROI", "S1-R1", "S1", "P1", box, region, "S1")
    got = {r.meta["template"]: r for r in roi_records(Writer(0, "S1"), roi, facts) if r.category == "spatial"}
    assert set(got) == {"nodules", "tumour_edge", "necrosis_relation", "tumour_part"}
    assert _answer(got["nodules"]) == "one" and _answer(got["tumour_edge"]) == "no"
    assert all("this region" in r.question for r in got.values())


def test_wordings_vary_and_two_option_letters_balance():
    lab = np.full((120, 120), STROMA, np.uint8)
    lab[:5] = BACKGROUND
    _disc(lab, 60, 60, 25, TUMOUR)
    _disc(lab, 60, 60, 8, NECROSIS)
    facts = _slide_facts(lab)
    questions: dict[str, set[str]] = {}
    letters: Counter[str] = Counter()
    for k in range(40):
        unit = Unit("WSI", f"S{k}", f"S{k}", "P", None, facts)
        for r in wsi_records(Writer(0, f"S{k}"), unit):
            if r.category == "spatial":
                questions.setdefault(r.meta["template"], set()).add(r.question)
                if len(r.options) == 2:
                    letters[r.answer] += 1
    assert all(len(q) >= 3 for q in questions.values()), questions
    assert letters["A"] == letters["B"] == 40  # two two-option questions per slide, one deck of A and B


def test_without_a_layout_only_the_slides_nodule_count_is_asked():
    lab = np.full((100, 100), STROMA, np.uint8)
    _disc(lab, 50, 50, 20, TUMOUR)
    facts = _slide_facts(lab, spatial=False)  # as an LLM source gives them
    unit = Unit("WSI", "S1", "S1", "P1", None, facts)
    spatial = [r for r in wsi_records(Writer(0, "S1"), unit) if r.category == "spatial"]
    assert [r.meta["template"] for r in spatial] == ["nodules"] and _answer(spatial[0]) == "one"
    box = (0, 0, 1600, 1600)
    region = RegionFacts("S1", "R1", box, 1.0, Composition.of_box(lab, box, LABEL_DS), 2)
    roi = Unit("ROI", "S1-R1", "S1", "P1", box, region, "S1")
    assert not [r for r in roi_records(Writer(0, "S1"), roi, facts) if r.category == "spatial"]


# -- a built QA set ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("spatial")
    make_cohort(root / "cohort", n_patients=5, seed=3, slide_px=2048, texture_px=512, progress=False)
    config = PreprocessConfig(workers=0, batch_size=64, progress=False, pack_features=False, global_feature=False)
    assert preprocess(root / "cohort" / "slides", root / "job", config).exit_code == 0
    # The benchmark's questions only: the spatial templates are asked of every slide either way.
    report = build_qa(root / "cohort", root / "job", root / "qa",
                      BuildConfig(train_extra_k=(), train_patch_fields=0, train_slide_scale=False), progress=False)
    return {"root": root, "report": report, "truth": load_truth(root / "cohort")}


def _pieces(mask: np.ndarray, min_mm2: float) -> int:
    pieces, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    return int((np.bincount(pieces.ravel())[1:] * PX_MM2 >= min_mm2).sum())


def test_spatial_records_agree_with_the_label_maps(built):
    truth, report = built["truth"], built["report"]
    records = [r for r in report.train_records + report.test_records if r.category == "spatial"]
    seen = Counter(f"{r.level}/{r.meta['template']}" for r in records)
    assert {"WSI/nodules", "WSI/fragments", "WSI/tumour_edge", "ROI/nodules", "ROI/tumour_edge"} <= set(seen)
    assert seen["ROI/nodules"] > seen["WSI/nodules"]  # several region questions per slide
    for r in records:
        slide = truth.slides[r.slide]
        lab = slide.labels()
        box = (0, 0, slide.width, slide.height) if r.level == "WSI" else r.bbox
        # Counts recomputed here, straight from the label map (boxes are on the 16 px grid).
        sub = lab[box[1] // 16 : box[3] // 16, box[0] // 16 : box[2] // 16]
        template = r.meta["template"]
        if template == "nodules":
            n = _pieces((sub == TUMOUR) | (sub == NECROSIS), 0.01)
            assert _answer(r) == COUNTS[min(n, 4) - 1], r.id
        elif template == "fragments":
            assert _answer(r) == COUNTS[min(_pieces(sub != BACKGROUND, 0.02), 4) - 1], r.id
        elif template == "tumour_edge":
            bed, glass = (sub == TUMOUR) | (sub == NECROSIS), sub == BACKGROUND
            touching = (bed[:, 1:] & glass[:, :-1]).any() or (bed[:, :-1] & glass[:, 1:]).any() \
                or (bed[1:] & glass[:-1]).any() or (bed[:-1] & glass[1:]).any()
            assert _answer(r) == ("yes" if touching else "no"), r.id
        s = slide.spatial(box)
        assert r.meta["truth"] is not None and r.bbox == (None if r.level == "WSI" else tuple(box))
        if template == "tumour_part":
            assert _answer(r) == s.largest_nodule_part
        if template == "necrosis_relation":
            assert _answer(r).startswith(s.necrosis_relation)


def test_truth_json_records_the_measured_layout(built):
    truth = built["truth"]
    for entry in truth.raw["slides"]:
        slide = truth.slides[entry["slide_id"]]
        assert entry["spatial"] == json.loads(json.dumps(slide.spatial().as_dict()))
        assert set(entry["arrangement"]) == {"n_fragments", "tumour_at_edge", "necrosis_at_margin"}
        assert np.array_equal(slide.labels(), np.asarray(Image.open(slide.label_path)))


def test_spatial_records_are_held_out_by_patient_and_reported_apart(built, tmp_path):
    report, truth = built["report"], built["truth"]
    train, test = read_records(report.train), read_records(report.test)
    train_p = {truth.slides[r.slide].patient_id for r in train if r.category == "spatial"}
    test_p = {truth.slides[r.slide].patient_id for r in test if r.category == "spatial"}
    assert train_p and test_p and not train_p & test_p
    assert test_p == set(report.summary["splits"]["test"]["patients"])
    assert report.summary["counts"]["category"]["spatial"] == sum(r.category == "spatial" for r in train + test)

    # Choice records only, so the report needs no text metrics.
    gold = [r for r in test if r.is_choice]
    write_records(tmp_path / "gold.jsonl", gold)
    # Right on every spatial question, wrong on every other one.
    with open(tmp_path / "pred.jsonl", "w") as fh:
        for r in gold:
            answer = _answer(r) if r.category == "spatial" else "none of these"
            fh.write(json.dumps({"id": r.id, "answer": answer}) + "\n")
    result = evaluate(tmp_path / "pred.jsonl", tmp_path / "gold.jsonl")
    spatial = result["by_category"]["spatial"]
    assert spatial["n"] == sum(r.category == "spatial" for r in gold) > 0
    assert spatial["accuracy"] == 1.0
    assert all(v["accuracy"] == 0.0 for k, v in result["by_category"].items() if k != "spatial")
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(report_table(result))
    assert "spatial" in console.export_text()
