"""Score model predictions against VQA gold records.

:func:`evaluate` reads gold records and predictions, matches them by id, and reports
for the whole set and per level (WSI/ROI/patch), per category and per format:

- ``accuracy``: mean choice score over single/multi records (single 1/0; multi 1
  exact, 0.5 for a non-empty strict subset), and ``n_unparsed``, the choice answers
  in which no option could be read;
- ``meteor``, ``bleu_1``..``bleu_4``, ``rouge_l``: corpus scores over the group's
  open/caption records (pycocoevalcap, see :mod:`slidevl.vqa.textmetrics`);
- ``judge``: mean LLM-judge score over judged open/caption records, when a judge
  endpoint is configured; otherwise the report says why it was skipped.

A metric is ``null`` where the group has no record it applies to. Per-record
scores are kept under ``records`` for error analysis.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Sequence

from slidevl.atomic import write_json_atomic
from slidevl.qa.records import FORMATS, LEVELS, TEXT_FORMATS, VQARecord, read_records
from slidevl.vqa.choices import format_letters, parse_choice, score_choice
from slidevl.vqa.predictions import match_predictions, read_predictions

if TYPE_CHECKING:  # keeps `import slidevl.vqa.evaluate` free of httpx and pycocoevalcap
    from slidevl.llmclient import LLMClient
    from slidevl.vqa.textmetrics import TextScorer

JUDGE_SKIPPED = "no LLM endpoint configured; pass --llm-url and --llm-model to score open answers with an LLM judge"
TEXT_METRICS = ("meteor", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l")


def evaluate(
    pred_path: str | os.PathLike[str],
    gold_path: str | os.PathLike[str],
    judge: "LLMClient | None" = None,
    *,
    out: str | os.PathLike[str] | None = None,
    text_scorer: "TextScorer | None" = None,
) -> dict[str, Any]:
    """Evaluate a prediction JSONL against a gold VQA JSONL; optionally write the report to ``out``.

    ``judge`` enables the LLM judge for open/caption records. ``text_scorer`` lets
    a caller reuse a running METEOR process; by default one is started for this
    evaluation (only when there are open/caption records) and stopped at the end.
    """
    gold = read_records(gold_path)
    answers = match_predictions(gold, read_predictions(pred_path), pred_path, gold_path)
    rows: list[dict[str, Any]] = [
        {"id": r.id, "slide": r.slide, "level": r.level, "category": r.category, "format": r.format} for r in gold
    ]
    for record, answer, row in zip(gold, answers, rows):
        if record.is_choice:
            parsed = parse_choice(answer, record.options)
            row.update(
                gold=record.answer,
                parsed=format_letters(parsed),
                score=score_choice(parsed, record.answer_letters, record.format),
            )
    report: dict[str, Any] = {
        "gold": os.fspath(gold_path),
        "predictions": os.fspath(pred_path),
        "n_records": len(gold),
        "text_metrics": None,
    }
    text_idx = [i for i, r in enumerate(gold) if r.format in TEXT_FORMATS]
    scores, position, scorer = None, {}, text_scorer
    try:
        # Text metrics before the judge: a missing Java fails in seconds, not after the LLM calls.
        if text_idx:
            from slidevl.vqa.textmetrics import TOKENIZATION, TextScorer

            scorer = scorer if scorer is not None else TextScorer()
            scores = scorer.score([answers[i] for i in text_idx], [gold[i].answer for i in text_idx])
            for i, pair in zip(text_idx, scores.per_pair):
                rows[i].update(pair.as_dict())
            position = {row: j for j, row in enumerate(text_idx)}
            report["text_metrics"] = {
                "source": "pycocoevalcap (reference Java METEOR 1.5)",
                "tokenization": TOKENIZATION,
            }
        report["judge"] = _run_judge(gold, answers, rows, text_idx, judge)
        # Corpus METEOR of every group is asked of the running Java process.
        summaries = {
            name: {key: _summary(rows, idx, scores, position) for key, idx in members.items()}
            for name, members in _groups(gold).items()
        }
    finally:
        if scorer is not None and text_scorer is None:
            scorer.close()
    report["overall"] = summaries["overall"]["all"]
    for name in ("by_level", "by_category", "by_format"):
        report[name] = summaries[name]
    report["records"] = rows
    if out is not None:
        write_json_atomic(out, report)
    return report


def _run_judge(
    gold: Sequence[VQARecord],
    answers: Sequence[str],
    rows: list[dict[str, Any]],
    text_idx: list[int],
    judge: "LLMClient | None",
) -> dict[str, Any]:
    """Judge open/caption records into ``rows``; return the report's ``judge`` section."""
    if judge is None:
        return {"status": "skipped", "reason": JUDGE_SKIPPED}
    if not text_idx:
        return {"status": "skipped", "reason": "no open or caption records to judge"}
    from slidevl.vqa.judge import judge_records

    results = judge_records(gold, {r.id: a for r, a in zip(gold, answers)}, judge)
    for i, result in zip(text_idx, results):
        rows[i].update(judge=result.score, judge_claims=result.claims, judge_claim_scores=result.claim_scores)
        if result.error:
            rows[i]["judge_error"] = result.error
    n_errors = sum(1 for result in results if result.error)
    return {
        "status": "done",
        **judge.describe(),
        "n_judged": len(results) - n_errors,
        "n_errors": n_errors,
        "http": dict(judge.stats),
    }


def _groups(gold: Sequence[VQARecord]) -> dict[str, dict[str, list[int]]]:
    by: dict[str, dict[str, list[int]]] = {"by_level": defaultdict(list), "by_category": defaultdict(list),
                                           "by_format": defaultdict(list)}
    for i, r in enumerate(gold):
        by["by_level"][r.level].append(i)
        by["by_category"][r.category].append(i)
        by["by_format"][r.format].append(i)
    return {
        "overall": {"all": list(range(len(gold)))},
        "by_level": {k: by["by_level"][k] for k in LEVELS if k in by["by_level"]},
        "by_category": {k: by["by_category"][k] for k in sorted(by["by_category"])},
        "by_format": {k: by["by_format"][k] for k in FORMATS if k in by["by_format"]},
    }


def _summary(rows: list[dict[str, Any]], idx: list[int], scores: Any, position: dict[int, int]) -> dict[str, Any]:
    choice = [rows[i] for i in idx if "score" in rows[i]]
    text = [i for i in idx if i in position]
    judged = [rows[i]["judge"] for i in text if rows[i].get("judge") is not None]
    out: dict[str, Any] = {
        "n": len(idx),
        "n_choice": len(choice),
        "accuracy": sum(r["score"] for r in choice) / len(choice) if choice else None,
        "n_unparsed": sum(1 for r in choice if not r["parsed"]),
        "n_text": len(text),
    }
    corpus = scores.corpus([position[i] for i in text]) if text else {}
    out.update({m: corpus.get(m) for m in TEXT_METRICS})
    out["n_judged"] = len(judged)
    out["judge"] = sum(judged) / len(judged) if judged else None
    out["n_judge_errors"] = sum(1 for i in text if "judge_error" in rows[i])
    return out


def report_table(report: dict[str, Any]):  # -> rich.table.Table
    """A rich table of the report's summaries: overall, then per level, category and format.

    ``unread`` is ``n_unparsed``: choice answers in which no option could be read.
    """
    from rich import box
    from rich.table import Table

    # Compact padding keeps all ten columns readable in an 80-column terminal.
    table = Table(
        title=f"VQA evaluation: {report['n_records']} records",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        collapse_padding=True,
        pad_edge=False,
    )
    table.add_column("group", no_wrap=True)
    for name in ("n", "acc", "unread", "n text", "METEOR", "BLEU-1", "BLEU-4", "ROUGE-L", "judge"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_row("overall", *_cells(report["overall"]), end_section=True)
    for name in ("by_level", "by_category", "by_format"):
        table.add_row(f"[bold]{name.removeprefix('by_')}[/bold]")
        members = report[name]
        for i, (key, summary) in enumerate(members.items()):
            table.add_row(f"  {key}", *_cells(summary), end_section=i == len(members) - 1)
    return table


def _cells(s: dict[str, Any]) -> list[str]:
    return [
        str(s["n"]),
        _fmt(s["accuracy"]),
        str(s["n_unparsed"]) if s["n_choice"] else "-",
        str(s["n_text"]),
        *(_fmt(s[m]) for m in ("meteor", "bleu_1", "bleu_4", "rouge_l", "judge")),
    ]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
