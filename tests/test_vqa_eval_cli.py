"""`slidevl vqa eval` end to end on a small handmade gold/prediction pair, and its error paths."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slidevl.qa.records import VQARecord, write_records
from slidevl.vqa.cli import app
from slidevl.vqa.evaluate import JUDGE_SKIPPED, evaluate
from slidevl.vqa.predictions import PredictionError, read_predictions, write_predictions
from test_llmclient_server import FakeChatServer, fake_judge

OPTS = ["Hepatocellular carcinoma", "Cholangiocarcinoma", "Metastasis", "Hemangioma"]
FEATURES = ["Steatosis", "Ballooning", "Fibrosis", "Mallory-Denk bodies"]


def rec(rid: str, level: str, category: str, fmt: str, answer: str, options: list[str] | None = None) -> VQARecord:
    return VQARecord(id=rid, slide="slide-1", level=level, category=category, format=fmt,
                     question=f"Question {rid}?", options=options or [], answer=answer,
                     bbox=None if level == "WSI" else (0, 0, 4096, 4096))


# (record, prediction, choice score expected)
CHOICE = [
    (rec("q1", "WSI", "diagnosis", "single", "A", OPTS), "The answer is A.", 1.0),
    (rec("q2", "ROI", "morphology", "multi", "A,C", FEATURES), "A", 0.5),
    (rec("q3", "patch", "morphology", "single", "B", FEATURES), "I think it is C", 0.0),
    (rec("q4", "patch", "grade", "multi", "B,D", FEATURES), "b and d", 1.0),
    (rec("q8", "ROI", "grade", "single", "B", ["G1", "G2", "G3", "G4"]), "I", 0.0),
]
TEXT = [
    (rec("q5", "WSI", "diagnosis", "caption", "Well-differentiated hepatocellular carcinoma."),
     "Well-differentiated hepatocellular carcinoma."),
    (rec("q6", "ROI", "morphology", "open", "Macrovesicular steatosis is present. Portal fibrosis is mild."),
     "Macrovesicular steatosis is present."),
    (rec("q7", "patch", "grade", "open", "Nuclear grade 2."), ""),
]


@pytest.fixture()
def choice_files(tmp_path: Path) -> tuple[Path, Path]:
    gold = write_records(tmp_path / "gold.jsonl", [r for r, _, _ in CHOICE])
    pred = write_predictions(tmp_path / "pred.jsonl", {r.id: p for r, p, _ in CHOICE})
    return gold, pred


def test_eval_cli_end_to_end_with_judge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pycocoevalcap.meteor.meteor as meteor_module

    starts = []

    class CountingMeteor(meteor_module.Meteor):
        def __init__(self) -> None:
            starts.append(self)
            super().__init__()

    monkeypatch.setattr(meteor_module, "Meteor", CountingMeteor)
    gold = write_records(tmp_path / "gold.jsonl", [r for r, _, _ in CHOICE] + [r for r, _ in TEXT])
    pred = write_predictions(tmp_path / "pred.jsonl", [(r.id, p) for r, p, _ in CHOICE] + [(r.id, p) for r, p in TEXT])
    out = tmp_path / "metrics" / "metrics.json"
    with FakeChatServer(fake_judge) as server:
        result = CliRunner().invoke(
            app,
            ["eval", "--pred", str(pred), "--gold", str(gold), "--out", str(out),
             "--llm-url", server.base_url, "--llm-model", "judge", "--llm-cache", str(tmp_path / "cache")],
        )
    assert result.exit_code == 0, result.output
    assert "overall" in result.output and f"metrics written to {out}" in result.output
    assert len(starts) == 1  # one METEOR process for the whole evaluation...
    assert starts[0].meteor_p.poll() is not None  # ...stopped when it is done
    report = json.loads(out.read_text())

    overall = report["overall"]
    assert (overall["n"], overall["n_choice"], overall["n_text"]) == (8, 5, 3)
    assert overall["accuracy"] == pytest.approx(2.5 / 5)
    assert overall["n_unparsed"] == 1  # "I" with four options is not an option
    assert {k: v["accuracy"] for k, v in report["by_level"].items()} == pytest.approx(
        {"WSI": 1.0, "ROI": 0.25, "patch": 0.5}
    )
    assert list(report["by_level"]) == ["WSI", "ROI", "patch"]
    assert report["by_format"]["single"]["accuracy"] == pytest.approx(1 / 3)
    assert report["by_format"]["multi"]["accuracy"] == pytest.approx(0.75)
    assert report["by_format"]["single"]["meteor"] is None
    assert report["by_category"]["grade"]["n"] == 3

    rows = {r["id"]: r for r in report["records"]}
    for r, _, score in CHOICE:
        assert rows[r.id]["score"] == score
    assert rows["q2"]["parsed"] == "A" and rows["q8"]["parsed"] == ""
    assert rows["q5"]["rouge_l"] == 1.0 and rows["q5"]["meteor"] > 0.9
    assert all(rows["q7"][m] == 0.0 for m in ("meteor", "bleu_1", "rouge_l"))
    # A group with one text record has that record's METEOR as its corpus METEOR.
    assert report["by_format"]["caption"]["meteor"] == pytest.approx(rows["q5"]["meteor"])
    assert 0 < overall["meteor"] < 1 and 0 < overall["rouge_l"] < 1
    assert "PTBTokenizer" in report["text_metrics"]["tokenization"]

    # Judge: q5 all claims supported; q6 one of two; q7 empty prediction.
    assert report["judge"]["status"] == "done" and report["judge"]["n_errors"] == 0
    assert (rows["q5"]["judge"], rows["q6"]["judge"], rows["q7"]["judge"]) == (1.0, 0.5, 0.0)
    assert rows["q6"]["judge_claim_scores"] == [1.0, 0.0]
    assert overall["judge"] == pytest.approx(0.5) and overall["n_judged"] == 3
    assert report["by_level"]["WSI"]["judge"] == 1.0
    assert "judge" not in rows["q1"]


def test_eval_cli_without_llm_skips_judge_with_message(choice_files, tmp_path: Path) -> None:
    gold, pred = choice_files
    out = tmp_path / "m.json"
    result = CliRunner().invoke(app, ["eval", "--pred", str(pred), "--gold", str(gold), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "judge skipped" in result.output
    report = json.loads(out.read_text())
    assert report["judge"] == {"status": "skipped", "reason": JUDGE_SKIPPED}
    assert report["text_metrics"] is None and report["overall"]["meteor"] is None
    assert report["overall"]["accuracy"] == pytest.approx(0.5)


def test_missing_and_extra_ids_are_named(choice_files, tmp_path: Path) -> None:
    gold, pred = choice_files
    answers = read_predictions(pred)
    del answers["q2"], answers["q3"]
    answers.update({f"x{i}": "A" for i in range(7)})
    bad = write_predictions(tmp_path / "bad.jsonl", answers)
    with pytest.raises(PredictionError) as info:
        evaluate(bad, gold)
    message = str(info.value)
    assert message.startswith(f"{bad}: predictions do not match")
    assert f"2 gold id(s) from {gold} have no prediction: 'q2', 'q3'" in message
    assert "7 predicted id(s) are not in" in message and "'x0', 'x1', 'x2', 'x3', 'x4', ... (2 more)" in message

    result = CliRunner().invoke(
        app, ["eval", "--pred", str(bad), "--gold", str(gold), "--out", str(tmp_path / "m.json")]
    )
    assert result.exit_code == 2
    assert "have no prediction: 'q2', 'q3'" in result.output
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"id": "q1"}', "field 'answer' is missing"),
        ('{"id": "q1", "answer": 3}', "field 'answer' must be a string"),
        ('{"id": "q1", "answer": "A"}\n{"id": "q1", "answer": "B"}', "duplicate id 'q1' (first on line 1)"),
        ("not json", "invalid JSON"),
    ],
)
def test_malformed_prediction_files(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "pred.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(PredictionError, match=re.escape(match)) as info:
        read_predictions(path)
    assert str(path) in str(info.value)


def test_invalid_gold_exits_with_line_and_field(choice_files, tmp_path: Path) -> None:
    gold, pred = choice_files
    lines = gold.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["level"] = "tile"
    lines[1] = json.dumps(bad)
    gold.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(
        app, ["eval", "--pred", str(pred), "--gold", str(gold), "--out", str(tmp_path / "m.json")]
    )
    assert result.exit_code == 2
    assert f"{gold}:2 (id 'q2'): field 'level'" in result.output


@pytest.mark.parametrize(
    "extra",
    [["--llm-url", "http://127.0.0.1:1/v1"], ["--llm-model", "m"], ["--llm-cache", "c"]],
)
def test_llm_flags_must_come_together(choice_files, tmp_path: Path, extra: list[str]) -> None:
    gold, pred = choice_files
    result = CliRunner().invoke(
        app, ["eval", "--pred", str(pred), "--gold", str(gold), "--out", str(tmp_path / "m.json"), *extra]
    )
    assert result.exit_code == 2
    assert "--llm-url" in result.output


def test_judge_with_only_choice_records_is_skipped_without_requests(choice_files) -> None:
    gold, pred = choice_files
    with FakeChatServer(fake_judge) as server:
        from slidevl.llmclient import LLMClient

        with LLMClient(server.base_url, "judge") as client:
            report = evaluate(pred, gold, client)
    assert report["judge"] == {"status": "skipped", "reason": "no open or caption records to judge"}
    assert server.requests == []
