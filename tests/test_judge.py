"""The LLM judge against a deterministic local chat-completions server."""

from __future__ import annotations

import json

import pytest

from slidevl.llmclient import LLMClient
from slidevl.vqa.judge import (
    JudgeReplyError,
    judge_records,
    parse_claims,
    parse_json_reply,
    parse_scores,
)
from slidevl.qa.records import VQARecord
from test_llmclient_server import FakeChatServer, fake_judge

def record(rid: str, answer: str, fmt: str = "open") -> VQARecord:
    return VQARecord(id=rid, slide="s1", level="WSI", category="diagnosis", format=fmt,
                     question="Describe the slide.", answer=answer)


RECORDS = [
    record("exact", "Macrovesicular steatosis is present. Portal fibrosis is mild."),
    record("half", "Steatosis is severe. Ballooning is absent.", fmt="caption"),
    record("bad", "UNPARSEABLE reference text."),
    record("empty", "Lobular inflammation is present."),
    VQARecord(id="choice", slide="s1", level="ROI", category="grade", format="single",
              question="Grade?", options=["G1", "G2"], answer="B"),
]
PREDICTIONS = {
    "exact": "Macrovesicular steatosis is present. Portal fibrosis is mild.",
    "half": "Steatosis is severe.",
    "bad": "anything",
    "empty": "  ",
    "choice": "B",
}


def judge_client(server: FakeChatServer, **kwargs) -> LLMClient:
    return LLMClient(server.base_url, "judge-model", backoff_s=0.01, timeout=5, **kwargs)


def test_judge_scores_claims_and_reports_unparseable_replies() -> None:
    with FakeChatServer(fake_judge) as server, judge_client(server) as client:
        results = {r.id: r for r in judge_records(RECORDS, PREDICTIONS, client)}
    assert set(results) == {"exact", "half", "bad", "empty"}  # choice records are not judged
    assert results["exact"].score == 1.0
    assert results["exact"].claims == ["Macrovesicular steatosis is present.", "Portal fibrosis is mild."]
    # "Ballooning is absent." shares only "is" with the prediction: 1/3 of its words -> 0.3.
    assert results["half"].claim_scores == [1.0, 0.3]
    assert results["half"].score == pytest.approx(0.65)
    assert results["bad"].score is None
    assert "claim extraction" in results["bad"].error and "unable to split" in results["bad"].error
    # An empty prediction supports nothing, and is not sent for scoring.
    assert results["empty"].score == 0.0 and results["empty"].claim_scores == [0.0]
    payloads = [json.loads(b["messages"][-1]["content"].split("Input:\n", 1)[1]) for b in server.requests]
    assert all(b["temperature"] == 0.0 for b in server.requests)
    assert sum("claims" not in p for p in payloads) == 4  # one extraction per open/caption record
    assert sorted(p["candidate_answer"] for p in payloads if "claims" in p) == sorted(
        [PREDICTIONS["exact"], PREDICTIONS["half"]]
    )


def test_judge_retries_a_failing_server() -> None:
    with FakeChatServer(fake_judge, fail_with=[500]) as server, judge_client(server) as client:
        results = judge_records(RECORDS[:1], PREDICTIONS, client)
    assert results[0].score == 1.0
    assert client.stats["retries"] == 1 and len(server.requests) == 3


def test_judge_cache_makes_second_run_send_nothing(tmp_path) -> None:
    with FakeChatServer(fake_judge) as server:
        with judge_client(server, cache_dir=tmp_path) as client:
            first = judge_records(RECORDS, PREDICTIONS, client)
        n_requests = len(server.requests)
        with judge_client(server, cache_dir=tmp_path) as client:
            second = judge_records(RECORDS, PREDICTIONS, client)
    assert len(server.requests) == n_requests
    assert [r.to_dict() for r in second] == [r.to_dict() for r in first]


def test_judge_needs_a_prediction_for_every_judged_record() -> None:
    client = LLMClient("http://127.0.0.1:1/v1", "m")
    with pytest.raises(KeyError, match="exact"):
        judge_records(RECORDS[:1], {}, client)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('["a", "b"]', ["a", "b"]),
        ('```json\n["a"]\n```', ["a"]),
        ('```\n{"claims": ["a"]}\n```\nHope this helps.', {"claims": ["a"]}),
        ('Sure! Here they are: ["a", "b"] -- two claims [not JSON]', ["a", "b"]),
        ('<think>maybe ["x"]</think>["y"]', ["y"]),
        ('Scores {see below}: [1, 0.3]', [1, 0.3]),
    ],
)
def test_parse_json_reply_is_lenient(reply: str, expected: object) -> None:
    assert parse_json_reply(reply) == expected


@pytest.mark.parametrize("reply", ["", "no json here", "[unclosed", "```json\n{oops}\n```"])
def test_parse_json_reply_rejects_replies_without_json(reply: str) -> None:
    with pytest.raises(JudgeReplyError):
        parse_json_reply(reply)


def test_parse_claims_accepts_objects_and_rejects_empty() -> None:
    assert parse_claims('[{"claim": " a "}, "b", ""]') == ["a", "b"]
    with pytest.raises(JudgeReplyError, match="no claims"):
        parse_claims("[]")
    with pytest.raises(JudgeReplyError, match="not a string"):
        parse_claims("[1, 2]")


@pytest.mark.parametrize(
    ("reply", "n", "expected"),
    [
        ("[1, 0.7, 0.3, 0]", 4, [1.0, 0.7, 0.3, 0.0]),
        ('["1", "0.7"]', 2, [1.0, 0.7]),
        ('{"scores": [{"claim": "x", "score": 0.3}]}', 1, [0.3]),
    ],
)
def test_parse_scores_accepts_the_scale(reply: str, n: int, expected: list[float]) -> None:
    assert parse_scores(reply, n) == expected


@pytest.mark.parametrize(
    ("reply", "n", "match"),
    [
        ("[0.5]", 1, "not one of 1, 0.7, 0.3, 0"),
        ("[1, 1]", 3, "expected 3 scores"),
        ('["high"]', 1, "not a number"),
        ('{"verdict": "good"}', 1, "array of claim scores"),
    ],
)
def test_parse_scores_rejects_off_scale_or_miscounted(reply: str, n: int, match: str) -> None:
    with pytest.raises(JudgeReplyError, match=match):
        parse_scores(reply, n)
