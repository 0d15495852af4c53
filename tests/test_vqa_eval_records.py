"""VQA record contract: validation, JSONL round trip, and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slidevl.qa.records import (
    VQARecord,
    VQARecordError,
    parse_answer_letters,
    read_records,
    render_options,
    write_records,
)

GOOD = {
    "id": "q1",
    "slide": "TCGA-AA-0001",
    "bbox": [0, 0, 4096, 4096],
    "level": "ROI",
    "category": "morphology",
    "format": "multi",
    "question": "Which features are present?",
    "options": ["Steatosis", "Ballooning", "Fibrosis"],
    "answer": "C, A",
}


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_round_trip_is_canonical_and_atomic(tmp_path: Path) -> None:
    records = [
        VQARecord.from_dict(GOOD),
        VQARecord(id="q2", slide="TCGA-AA-0001", level="WSI", category="diagnosis", format="caption",
                  question="Describe the slide.", answer="Steatohepatitis with mild fibrosis.",
                  meta={"generator": "template"}),
    ]
    assert records[0].answer == "A,C"  # canonical: sorted, no spaces
    assert records[0].answer_letters == {"A", "C"}
    assert records[0].bbox == (0, 0, 4096, 4096)
    path = write_records(tmp_path / "out" / "vqa.jsonl", records)
    assert read_records(path) == records
    assert read_records(path)[1].meta == {"generator": "template"}
    assert [p.name for p in path.parent.iterdir()] == ["vqa.jsonl"]  # no temporary left behind
    first = json.loads(path.read_text().splitlines()[0])
    assert first["answer"] == "A,C" and first["bbox"] == [0, 0, 4096, 4096]


def test_render_options_letters_by_position() -> None:
    assert render_options(["Steatosis", "Fibrosis"]) == ["A. Steatosis", "B. Fibrosis"]


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"level": "slide"}, "level", "not one of WSI, ROI, patch"),
        ({"format": "choice"}, "format", "not one of single, multi, open, caption"),
        ({"format": "single"}, "answer", "exactly one correct letter"),
        ({"answer": "B"}, "answer", "at least two correct letters"),
        ({"answer": "A,D"}, "answer", "letter D is outside the 3 options"),
        ({"answer": "A,A"}, "answer", "repeats letter A"),
        ({"answer": "A and C"}, "answer", "is not an option letter"),
        ({"answer": "A,"}, "answer", "comma-separated"),
        ({"options": ["Steatosis"]}, "options", "at least 2 options"),
        ({"options": ["A. Steatosis", "B. Ballooning", "C. Fibrosis"]}, "options", "plain option texts"),
        ({"options": ["Fibrosis", "fibrosis ", "Steatosis"]}, "options", "same text"),
        ({"options": "Steatosis, Fibrosis"}, "options", "list of strings"),
        ({"bbox": [0, 0, 10.5, 10]}, "bbox", "integer level-0 pixels"),
        ({"bbox": [10, 0, 5, 10]}, "bbox", "x0 < x1"),
        ({"bbox": [0, 0, 10]}, "bbox", r"\[x0, y0, x1, y1\]"),
        ({"question": "  "}, "question", "question is empty"),
        ({"id": 7}, "id", "id must be a string"),
        ({"categroy": "typo"}, "categroy", "unknown field"),
    ],
)
def test_invalid_records_name_the_field(change: dict, field: str, message: str) -> None:
    with pytest.raises(VQARecordError, match=message) as info:
        VQARecord.from_dict({**GOOD, **change})
    assert info.value.field == field


def test_open_records_take_text_answers_and_no_options() -> None:
    base = {**GOOD, "format": "open", "options": [], "answer": "Mild steatosis."}
    assert VQARecord.from_dict(base).answer == "Mild steatosis."
    with pytest.raises(VQARecordError, match="takes no options"):
        VQARecord.from_dict({**base, "options": ["a", "b"]})
    with pytest.raises(VQARecordError, match="answer is empty"):
        VQARecord.from_dict({**base, "answer": ""})
    with pytest.raises(ValueError, match="no answer letters"):
        VQARecord.from_dict(base).answer_letters  # noqa: B018


def test_missing_field_is_named() -> None:
    obj = dict(GOOD)
    del obj["slide"]
    with pytest.raises(VQARecordError, match=r"missing required field.*'slide'"):
        VQARecord.from_dict(obj)


def test_read_reports_file_line_and_field_for_every_bad_line(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "gold.jsonl",
        [
            GOOD,
            "",
            {**GOOD, "id": "q2", "level": "tile"},
            "{not json",
            {**GOOD, "id": "q3", "format": "single", "answer": "A,B"},
            {**GOOD, "answer": "A,B"},
            ["not", "an", "object"],
        ],
    )
    with pytest.raises(VQARecordError) as info:
        read_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}: 5 invalid VQA record line(s)")
    assert f"{path}:3 (id 'q2'): field 'level': level 'tile' is not one of WSI, ROI, patch" in message
    assert f"{path}:4: invalid JSON" in message
    assert f"{path}:5 (id 'q3'): field 'answer': format 'single' needs exactly one correct letter" in message
    assert f"{path}:6: field 'id': duplicate id 'q1' (first seen on line 1)" in message
    assert f"{path}:7: a record must be a JSON object" in message


def test_read_empty_or_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VQARecordError, match="not found"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(VQARecordError, match="no VQA records"):
        read_records(write_jsonl(tmp_path / "empty.jsonl", [""]))


def test_write_refuses_duplicate_ids_and_keeps_old_file(tmp_path: Path) -> None:
    path = write_records(tmp_path / "vqa.jsonl", [VQARecord.from_dict(GOOD)])
    before = path.read_text()
    with pytest.raises(VQARecordError, match="duplicate id 'q1'"):
        write_records(path, [VQARecord.from_dict(GOOD), VQARecord.from_dict(GOOD)])
    assert path.read_text() == before


def test_parse_answer_letters_is_strict() -> None:
    assert parse_answer_letters("b", 3) == {"B"}
    assert parse_answer_letters(" A , C ", 3) == {"A", "C"}
    with pytest.raises(VQARecordError, match="valid: A-C"):
        parse_answer_letters("D", 3)
