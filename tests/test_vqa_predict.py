"""`slidevl vqa predict`: a checkpoint answers a record file that `slidevl vqa eval` accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slidevl.cli import app
from slidevl.qa.records import read_records
from slidevl.slidellm.tuning.stages import run_stage
from slidevl.vqa.evaluate import evaluate
from slidevl.vqa.predictions import read_predictions
from test_slidellm_fixtures import stage_config, world  # noqa: F401  (fixture used by name)

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("predict") / "s2"
    run_stage(stage_config(world, "stage2", out))
    return out


def test_predict_answers_every_record_in_order(world: dict[str, Path], checkpoint: Path, tmp_path: Path) -> None:  # noqa: F811
    pred = tmp_path / "pred.jsonl"
    result = runner.invoke(app, ["vqa", "predict", "--checkpoint", str(checkpoint), "--records", str(world["records"]),
                                 "--out", str(pred), "--max-new-tokens", "4", "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    gold = read_records(world["records"])
    answers = read_predictions(pred)
    assert list(answers) == [r.id for r in gold]
    assert all(isinstance(a, str) for a in answers.values())
    report = evaluate(pred, world["records"], out=tmp_path / "metrics.json")
    assert report["overall"]["n"] == len(gold)
    assert json.loads((tmp_path / "metrics.json").read_text())["overall"]["n"] == len(gold)


def test_predict_bad_inputs_name_the_file(world: dict[str, Path], checkpoint: Path, tmp_path: Path) -> None:  # noqa: F811
    pred = tmp_path / "pred.jsonl"
    missing = runner.invoke(app, ["vqa", "predict", "--checkpoint", str(tmp_path / "nope"), "--records", str(world["records"]),
                                  "--out", str(pred)])
    assert missing.exit_code == 2 and "nope" in missing.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    none = runner.invoke(app, ["vqa", "predict", "--checkpoint", str(checkpoint), "--records", str(empty), "--out", str(pred)])
    assert none.exit_code == 2 and "no VQA records" in none.output
    assert not pred.exists()


def test_ranked_single_choice_answers_pick_the_most_likely_option(world: dict[str, Path], checkpoint: Path,
                                                                  tmp_path: Path) -> None:  # noqa: F811
    from dataclasses import replace

    from slidevl.qa.records import OPTION_LETTERS
    from slidevl.slidellm.ask import SlideAssistant
    from slidevl.slidellm.vqa_data import ChatCollator, Example, chat_messages, encode_chat
    from slidevl.vqa.choices import parse_choice

    assistant = SlideAssistant(checkpoint, device="cpu", cache_root=tmp_path / "cache")
    model, tok = assistant.loaded.model, assistant.tokenizer
    singles = [r for r in read_records(world["records"]) if r.format == "single"]
    assert singles
    for record in singles:
        visual = assistant.open_slide(record.slide)
        image = model.visual_input(visual, record.bbox)
        # The library's own loss, one option at a time: mean NLL over the answer tokens.
        totals = []
        for i in range(len(record.options)):
            option = replace(record, answer=OPTION_LETTERS[i])
            ids, labels = encode_chat(tok, chat_messages(option, assistant.loaded.config.answer_style))
            batch = ChatCollator(tok.pad_token_id)([Example(option, ids, labels)])
            loss = model(batch.input_ids, batch.attention_mask, batch.labels, [image])
            n_answer = sum(1 for x in labels[1:] if x != -100)
            totals.append(-float(loss) * n_answer)
            ll = model.answer_log_likelihood(batch.input_ids, batch.attention_mask, batch.labels, image)
            assert abs(float(ll[0]) - totals[-1]) < 1e-3
        best = OPTION_LETTERS[max(range(len(totals)), key=totals.__getitem__)]
        answer = assistant.rank_options(record, visual)
        assert parse_choice(answer, record.options) == frozenset(best)
    pred = tmp_path / "pred.jsonl"
    result = runner.invoke(app, ["vqa", "predict", "--checkpoint", str(checkpoint), "--records", str(world["records"]),
                                 "--out", str(pred), "--max-new-tokens", "4", "--rank-single"])
    assert result.exit_code == 0, result.output
    answers = read_predictions(pred)
    assert all(len(parse_choice(answers[r.id], r.options)) == 1 for r in singles)
