"""`slidevl vqa build` on a tiny synthetic cohort: truth-true answers, patient split, LLM chain, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from test_llmclient_server import FakeChatServer
from slidevl.features.config import PreprocessConfig
from slidevl.features.pipeline import preprocess
from slidevl.llmclient import LLMClient
from slidevl.qa.records import read_records
from slidevl.serve.overlays import parse_rois
from slidevl.synth import make_cohort
from slidevl.synth.truth import class_fractions
from slidevl.vqa.build import BuildConfig, BuildError, build_qa, split_patients
from slidevl.vqa.cli import app

CLASSES = ("background", "tumour", "stroma", "lymphocytes", "necrosis", "fat")
ROOT = Path(__file__).resolve().parents[1]
NAMES = {"tumour": "tumour", "stroma": "fibrous stroma", "lymphocytes": "lymphocytic infiltrate",
         "necrosis": "necrosis", "fat": "adipose tissue"}


def plain(**changes) -> BuildConfig:
    """The benchmark's questions only; a test adds the extra training questions it checks."""
    return BuildConfig(**{"train_extra_k": (), "train_patch_fields": 0, "train_slide_scale": False, **changes})


def test_the_default_build_is_the_measured_recipe() -> None:
    # recipes/vqa.yaml: `slidevl vqa build --train-extra-rois 11 --train-patch-fields 40 --train-slide-scale`
    default = BuildConfig()
    assert (default.train_extra_k, default.train_patch_fields, default.train_slide_scale) == ((11,), 40, True)
    assert "--train-extra-rois 11 --train-patch-fields 40 --train-slide-scale" in (ROOT / "recipes" / "vqa.yaml").read_text()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    make_cohort(root / "cohort", n_patients=6, seed=0, slide_px=2048, texture_px=512, progress=False)
    config = PreprocessConfig(workers=0, batch_size=64, progress=False, pack_features=False, global_feature=False)
    assert preprocess(root / "cohort" / "slides", root / "job", config).exit_code == 0
    report = build_qa(root / "cohort", root / "job", root / "qa", plain(), progress=False)
    return {"root": root, "cohort": root / "cohort", "job": root / "job", "report": report,
            "truth": json.loads((root / "cohort" / "truth.json").read_text())}


def _tissue_fractions(labels: np.ndarray, bbox) -> dict[str, float]:
    f = class_fractions(labels, bbox)
    return {name: float(f[i] / (1.0 - f[0])) for i, name in enumerate(CLASSES) if i > 0}


def _bin(value: float, edges: tuple[float, ...], texts: tuple[str, ...]) -> str:
    return texts[int(np.searchsorted(np.asarray(edges), value, side="right"))]


def _expected(template: str, level: str, fr: dict[str, float], grade: int, labels: np.ndarray) -> object:
    """The correct option text(s) of a choice question, recomputed here from the label map."""
    region = ((0.01, 0.10, 0.40), ("absent", "under 10%", "10-40%", "over 40%"))
    scales = {
        "tumour_burden": (fr["tumour"], (0.20, 0.35, 0.50), ("less than 20%", "20-35%", "35-50%", "more than 50%")),
        "necrosis": (fr["necrosis"], (0.01, 0.05, 0.15), ("none", "focal (1-5%)", "moderate (5-15%)", "extensive (15% or more)")),
        "lymphocytes": (fr["lymphocytes"], (0.05, 0.10, 0.15),
                        ("sparse (under 5%)", "mild (5-10%)", "moderate (10-15%)", "marked (15% or more)")),
        "tumour_extent": (fr["tumour"], *region),
        "necrosis_extent": (fr["necrosis"], *region),
        "fat_extent": (fr["fat"], *region),
    }
    if template in scales:
        value, edges, texts = scales[template]
        return _bin(value, edges, texts)
    if template == "dominant":
        return NAMES[max(fr, key=fr.get)]
    if template == "present":
        return frozenset(NAMES[n] for n, v in fr.items() if v >= 0.05)
    if template == "grade":
        return f"grade {grade} ("
    if template == "nuclear_grade":
        return f"grade {grade} (" if fr["tumour"] >= 0.25 else "no tumour in this field"
    raise AssertionError(f"no check for template {template}")


def _check_answers(cohort, records) -> Counter[str]:
    """Assert every choice answer of ``records`` against the label maps; count them per level/template."""
    truth, root = cohort["truth"], cohort["cohort"]
    grade = {p["patient_id"]: p["morphology"]["grade"] for p in truth["patients"]}
    labels = {s["slide_id"]: np.asarray(Image.open(root / s["label_path"])) for s in truth["slides"]}
    size = {s["slide_id"]: (s["width"], s["height"]) for s in truth["slides"]}
    checked: Counter[str] = Counter()
    for r in records:
        lab = labels[r.slide]
        if r.level == "WSI":
            assert r.bbox is None
            bbox = (0, 0, *size[r.slide])
        else:
            assert r.bbox is not None
            bbox = r.bbox
        if r.level == "patch":
            # 512 px windows at 0.5 µm/px level 0; training patch fields ("P<row>-20x") are one 256 px patch.
            side = 256 if r.meta["window"].startswith("P") else {"10x": 1024, "20x": 512}[r.meta["magnification"]]
            assert (bbox[2] - bbox[0], bbox[3] - bbox[1]) == (side, side)
        g = grade[r.meta["patient"]]
        if r.format == "caption" and r.level == "WSI":
            assert f"grade {g} (" in r.answer
        if not r.is_choice or r.category == "spatial":  # spatial answers: tests/test_vqa_spatial.py
            continue
        expected = _expected(r.meta["template"], r.level, _tissue_fractions(lab, bbox), g, lab)
        chosen = [r.options[ord(x) - 65] for x in r.answer.split(",")]
        if isinstance(expected, frozenset):
            assert frozenset(chosen) == expected, r.id
        elif expected.endswith("("):
            assert chosen[0].startswith(expected), r.id
        else:
            assert chosen == [expected], r.id
        assert len(r.options) == (4 if r.format == "single" else 5)
        checked[f"{r.level}/{r.meta['template']}"] += 1
    return checked


def test_template_answers_agree_with_the_truth(cohort):
    checked = _check_answers(cohort, cohort["report"].train_records + cohort["report"].test_records)
    assert set(checked) >= {
        "WSI/grade", "WSI/tumour_burden", "WSI/necrosis", "WSI/lymphocytes", "WSI/dominant",
        "WSI/present", "ROI/dominant", "ROI/present", "ROI/tumour_extent", "ROI/necrosis_extent",
        "ROI/fat_extent", "patch/dominant", "patch/present", "patch/nuclear_grade",
    }


def test_answers_vary_with_the_image_and_letters_are_balanced(cohort):
    records = cohort["report"].train_records + cohort["report"].test_records
    answers: dict[str, set[str]] = {}
    for r in records:
        if r.is_choice:
            text = "|".join(sorted(r.options[ord(x) - 65] for x in r.answer.split(",")))
            answers.setdefault(f"{r.level}/{r.meta['template']}", set()).add(text)
    for template in ("WSI/tumour_burden", "WSI/grade", "ROI/dominant", "ROI/tumour_extent", "patch/dominant"):
        assert len(answers[template]) >= 2, f"{template} always has the same answer: {answers[template]}"
    letters = Counter(r.answer for r in records if r.format == "single" and len(r.options) == 4)
    n_slides = len({r.slide for r in records})
    assert set(letters) == set("ABCD")
    assert max(letters.values()) - min(letters.values()) <= n_slides  # one balanced deck per slide


def test_split_is_by_patient_and_files_match_the_summary(cohort):
    report, truth = cohort["report"], cohort["truth"]
    train, test = read_records(report.train), read_records(report.test)
    patient_of = {s["slide_id"]: s["patient_id"] for s in truth["slides"]}
    train_p = {patient_of[r.slide] for r in train}
    test_p = {patient_of[r.slide] for r in test}
    assert train_p and test_p and not train_p & test_p
    assert train_p | test_p == {p["patient_id"] for p in truth["patients"]}
    assert len(test_p) == 2  # 25% of 6 patients
    s = report.summary
    assert s["splits"]["train"]["patients"] == sorted(train_p)
    assert s["splits"]["train"]["counts"]["total"] == len(train)
    assert s["splits"]["test"]["counts"]["total"] == len(test)
    assert sum(s["counts"]["level"].values()) == len(train) + len(test)
    assert s["counts"]["format"] == dict(sorted(Counter(r.format for r in train + test).items()))
    assert set(s["counts"]["level"]) == {"WSI", "ROI", "patch"}
    assert set(s["counts"]["format"]) == {"single", "multi", "open", "caption"}


def test_split_patients_is_deterministic_and_disjoint():
    ids = [f"P{i}" for i in range(10)]
    grades = [1, 2, 3, 1, 2, 3, 1, 2, 3, 2]
    a = split_patients(ids, grades, 0.3, seed=0)
    assert a == split_patients(list(reversed(ids)), list(reversed(grades)), 0.3, seed=0)
    assert len(a[1]) == 3 and not set(a[0]) & set(a[1]) and set(a[0]) | set(a[1]) == set(ids)
    assert split_patients(ids[:2], grades[:2], 0.9, seed=0)[0]  # never an empty train side
    with pytest.raises(BuildError, match="at least 2 patients"):
        split_patients(["P0"], [1], 0.25, seed=0)


def test_roi_files_are_viewer_files_and_match_the_records(cohort):
    report, truth = cohort["report"], cohort["truth"]
    records = report.train_records + report.test_records
    for s in truth["slides"]:
        data = json.loads((report.rois_dir / f"{s['slide_id']}.json").read_text())
        parsed = parse_rois(data, "rois.json")
        # k_rois is 4, but a starved ROI merges into a neighbour, so a slide may end with fewer.
        assert parsed.slide == s["slide_id"] and len(parsed.rois) == len(data["rois"]) >= 3
        bboxes = {r["id"]: tuple(r["bbox"]) for r in data["rois"]}
        indices = sorted(i for r in data["rois"] for i in r["patch_index"])
        assert indices == list(range(len(indices)))  # every patch in exactly one ROI
        for r in records:
            if r.slide == s["slide_id"] and r.level == "ROI":
                assert r.bbox == bboxes[r.meta["roi"]]
        windows = {w["id"]: tuple(w["bbox"]) for roi in data["rois"] for w in roi["windows"]}
        for r in records:
            if r.slide == s["slide_id"] and r.level == "patch":
                assert r.bbox == windows[r.meta["window"]]


def test_build_is_deterministic(cohort, tmp_path):
    again = build_qa(cohort["cohort"], cohort["job"], tmp_path / "qa", plain(), progress=False)
    first = cohort["report"]
    assert again.train.read_text() == first.train.read_text()
    assert again.test.read_text() == first.test.read_text()


def test_extra_training_rois_add_region_questions_and_leave_the_benchmark_alone(cohort, tmp_path):
    first = cohort["report"]
    report = build_qa(cohort["cohort"], cohort["job"], tmp_path / "qa", plain(train_extra_k=(2, 6)), progress=False)
    assert report.test.read_text() == first.test.read_text()
    old = {r.id: r for r in first.train_records}
    extra = [r for r in report.train_records if r.id not in old]
    assert [r for r in report.train_records if r.id in old] == first.train_records
    assert extra and {r.level for r in extra} == {"ROI"}
    assert {r.meta["roi"][:2] for r in extra} == {"K2", "K6"}
    assert _check_answers(cohort, extra)["ROI/fat_extent"] > 0
    test_slides = {r.slide for r in first.test_records}
    for slide in {r.slide for r in report.train_records + report.test_records}:
        data = json.loads((report.rois_dir / f"{slide}.json").read_text())
        boxes = {r["id"]: tuple(r["bbox"]) for r in data["train_extra_rois"]}
        assert (not boxes) == (slide in test_slides)
        assert all(r.bbox == boxes[r.meta["roi"]] for r in extra if r.slide == slide)
    assert report.summary["rois"]["train_extra"] == sum(
        len(json.loads(p.read_text())["train_extra_rois"]) for p in report.rois_dir.glob("*.json"))
    for bad in ((4,), (2, 2), (0,)):
        with pytest.raises(BuildError, match="--train-extra-rois"):
            plain(train_extra_k=bad)


def test_training_slide_scale_asks_the_slides_share_questions_of_training_rois(cohort, tmp_path):
    first = cohort["report"]
    config = plain(train_extra_k=(2,), train_slide_scale=True)
    report = build_qa(cohort["cohort"], cohort["job"], tmp_path / "qa", config, progress=False)
    assert report.test.read_text() == first.test.read_text()
    old = {r.id for r in first.train_records}
    assert [r for r in report.train_records if r.id in old] == first.train_records
    added = [r for r in report.train_records if r.meta["template"] in ("tumour_burden", "necrosis", "lymphocytes")
             and r.level == "ROI"]
    rois = {r.meta["unit"] for r in report.train_records if r.level == "ROI"}
    assert len(added) == 3 * len(rois) and rois
    assert any(r.meta["roi"].startswith("K2") for r in added)
    assert all("in this region" in r.question for r in added)
    checked = _check_answers(cohort, added)
    assert checked["ROI/tumour_burden"] == checked["ROI/necrosis"] == checked["ROI/lymphocytes"] == len(rois)
    # The slide's own questions keep their wording.
    assert all("on this slide" in r.question for r in report.train_records
               if r.level == "WSI" and r.meta["template"] == "tumour_burden")


def test_training_patch_fields_ask_choice_questions_of_single_patches(cohort, tmp_path):
    first = cohort["report"]
    report = build_qa(cohort["cohort"], cohort["job"], tmp_path / "qa", plain(train_patch_fields=5), progress=False)
    assert report.test.read_text() == first.test.read_text()
    old = {r.id for r in first.train_records}
    assert [r for r in report.train_records if r.id in old] == first.train_records
    added = [r for r in report.train_records if r.id not in old]
    assert added and {r.level for r in added} == {"patch"} and {r.format for r in added} <= {"single", "multi"}
    checked = _check_answers(cohort, added)
    assert checked["patch/dominant"] > 0 and checked["patch/present"] > 0
    test_slides = {r.slide for r in first.test_records}
    n_fields = 0
    for path in report.rois_dir.glob("*.json"):
        data = json.loads(path.read_text())
        fields = {f["id"]: f for f in data["train_patch_fields"]}
        assert (not fields) == (data["slide"] in test_slides) and len(fields) <= 5
        members = {r["id"]: set(r["patch_index"]) for r in data["rois"]}
        for f in fields.values():
            row = int(f["id"][1:].split("-")[0])
            assert row in members[f["roi"]] and f["bbox"][2] - f["bbox"][0] == 256
        for r in added:
            if r.slide == data["slide"]:
                assert r.bbox == tuple(fields[r.meta["window"]]["bbox"])
        n_fields += len(fields)
    assert report.summary["windows"]["train_patch_fields"] == n_fields > 0
    again = build_qa(cohort["cohort"], cohort["job"], tmp_path / "again", plain(train_patch_fields=5), progress=False)
    assert again.train.read_text() == report.train.read_text()
    with pytest.raises(BuildError, match="--train-patch-fields"):
        plain(train_patch_fields=-1)
    # In LLM mode the fields, having no text to rewrite, are not sent.
    with FakeChatServer(_fake_writer) as server, LLMClient(server.base_url, "fake-writer") as client:
        worded = build_qa(cohort["cohort"], cohort["job"], tmp_path / "llm", plain(mode="llm", train_patch_fields=5),
                          client=client, progress=False)
        n_requests = len(server.requests)
    worded_units = {r.meta["unit"] for r in worded.train_records + worded.test_records if not r.is_choice}
    assert n_requests == worded.summary["llm"]["units"] == len(worded_units)
    assert {r.id for r in worded.train_records} == {r.id for r in report.train_records}


def _fake_writer(body: dict) -> str:
    """Rewrites drafts deterministically; refuses every ROI R2 (no JSON), to exercise failure reporting."""
    payload = json.loads(body["messages"][-1]["content"].split("Input:\n", 1)[1])
    if payload["level"] == "ROI" and payload["facts"]["region"] == "R2":
        return "I am sorry, I cannot help with that."
    reply = {
        "caption": f"Rewritten {payload['level']} caption. {payload['caption_draft']}",
        "items": [{"id": i["id"], "question": i["question"], "answer": f"In short: {i['draft_answer']}"}
                  for i in payload["items"]],
    }
    return "Here you go:\n```json\n" + json.dumps(reply) + "\n```"


def test_llm_mode_chains_captions_reports_failures_and_uses_the_cache(cohort, tmp_path):
    template = {r.id: r for r in cohort["report"].train_records + cohort["report"].test_records}
    out = tmp_path / "qa"
    config = plain(mode="llm")
    with FakeChatServer(_fake_writer) as server:
        with LLMClient(server.base_url, "fake-writer", cache_dir=out / "cache", max_concurrency=3) as client:
            report = build_qa(cohort["cohort"], cohort["job"], out, config, client=client, progress=False)
        n_units = report.summary["llm"]["units"]
        assert len(server.requests) == n_units
        assert server.max_in_flight <= 3
        for body in server.requests:
            assert body["temperature"] == 0
        # Each level gets the caption of the level above: ROI prompts the slide's rewritten caption,
        # patch prompts their ROI's caption (the template one where the ROI's reply failed).
        captions = {}
        for r in report.train_records + report.test_records:
            if r.format == "caption":
                captions[r.meta["unit"]] = r.answer
        for body in server.requests:
            payload = json.loads(body["messages"][-1]["content"].split("Input:\n", 1)[1])
            if payload["level"] == "WSI":
                assert payload["context_from_level_above"] is None
            else:
                assert payload["context_from_level_above"] in captions.values()
                assert payload["facts"]["composition_percent_of_tissue"]
        records = read_records(report.train) + read_records(report.test)
        assert [r.id for r in records] == list(template)
        failures = json.loads(report.failures_path.read_text())
        failed_units = {f["unit"] for f in failures}
        assert failed_units and all(u.endswith("-R2") for u in failed_units)
        assert report.summary["llm"]["failed"] == len(failures)
        for r in records:
            if r.is_choice:
                assert (r.options, r.answer) == (template[r.id].options, template[r.id].answer)
            elif r.meta["unit"] in failed_units:
                assert r.answer == template[r.id].answer and "llm_error" in r.meta
            else:
                assert r.meta["generator"] == "llm"
                assert r.answer.startswith("Rewritten" if r.format == "caption" else "In short: ")
        patch_ctx = [json.loads(b["messages"][-1]["content"].split("Input:\n", 1)[1]) for b in server.requests]
        assert any(p["level"] == "patch" and p["context_from_level_above"].startswith("Rewritten ROI") for p in patch_ctx)

        # A rerun answers everything from the cache: no new request, same files.
        sent = len(server.requests)
        with LLMClient(server.base_url, "fake-writer", cache_dir=out / "cache") as client:
            rerun = build_qa(cohort["cohort"], cohort["job"], tmp_path / "again", config, client=client, progress=False)
        assert len(server.requests) == sent
        assert rerun.summary["llm"]["cache_hits"] == n_units and rerun.summary["llm"]["requests"] == 0
        assert rerun.train.read_text() == report.train.read_text()


def test_llm_reply_naming_a_wrong_grade_is_rejected(cohort, tmp_path):
    def wrong_grade(body: dict) -> str:
        payload = json.loads(body["messages"][-1]["content"].split("Input:\n", 1)[1])
        return json.dumps({"caption": "A grade 9 tumour.", "items": [
            {"id": i["id"], "answer": "fine"} for i in payload["items"]]})

    with FakeChatServer(wrong_grade) as server, LLMClient(server.base_url, "m") as client:
        report = build_qa(cohort["cohort"], cohort["job"], tmp_path / "qa", plain(mode="llm"),
                          client=client, progress=False)
    failures = json.loads(report.failures_path.read_text())
    assert len(failures) == report.summary["llm"]["units"]
    assert all("grade 9" in f["error"] for f in failures)


def test_cli_end_to_end_and_errors(cohort, tmp_path):
    runner = CliRunner()
    out = tmp_path / "qa"
    result = runner.invoke(app, ["build", "--cohort", str(cohort["cohort"]), "--job", str(cohort["job"]),
                                 "--out", str(out), "--k-rois", "3", "--test-fraction", "0.5", "--seed", "1",
                                 "--window", "20x:256", "--train-extra-rois", "5",
                                 "--train-patch-fields", "3", "--train-slide-scale"])
    assert result.exit_code == 0, result.output
    assert "summary written to" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["k_rois"] == 3 and summary["splits"]["test"]["n_patients"] == 3
    assert summary["config"]["train_extra_k"] == [5] and summary["rois"]["train_extra"] > 0
    assert summary["config"]["train_patch_fields"] == 3 and summary["windows"]["train_patch_fields"] > 0
    assert summary["config"]["train_slide_scale"] is True
    train, test = read_records(out / "train.jsonl"), read_records(out / "test.jsonl")
    assert {r.meta.get("magnification") for r in train + test if r.level == "patch"} == {"20x"}
    assert all(r.bbox[2] - r.bbox[0] == 256 for r in train + test if r.level == "patch")
    assert len(list((out / "rois").glob("*.json"))) == len(cohort["truth"]["slides"])

    (tmp_path / "empty_job").mkdir()
    bad = runner.invoke(app, ["build", "--cohort", str(cohort["cohort"]), "--job", str(tmp_path / "empty_job"),
                              "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "slidevl preprocess" in bad.output
    bad = runner.invoke(app, ["build", "--cohort", str(cohort["cohort"]), "--job", str(cohort["job"]),
                              "--out", str(tmp_path / "x"), "--mode", "llm"])
    assert bad.exit_code == 2 and "--llm-url" in bad.output
    bad = runner.invoke(app, ["build", "--cohort", str(tmp_path), "--job", str(cohort["job"]),
                              "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "truth.json" in bad.output
    bad = runner.invoke(app, ["build", "--cohort", str(cohort["cohort"]), "--job", str(cohort["job"]),
                              "--out", str(tmp_path / "x"), "--window", "15x:512"])
    assert bad.exit_code == 2 and "magnification" in bad.output
    bad = runner.invoke(app, ["build", "--cohort", str(cohort["cohort"]), "--job", str(cohort["job"]),
                              "--out", str(tmp_path / "x"), "--train-extra-rois", "8,x"])
    assert bad.exit_code == 2 and "comma-separated" in bad.output
