"""METEOR/BLEU/ROUGE-L must equal pycocoevalcap called directly on the same tokenised pairs."""

from __future__ import annotations

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from slidevl.vqa.textmetrics import METRIC_NAMES, TextScorer, tokenize

PREDICTIONS = [
    "The liver shows macrovesicular steatosis.",
    "",
    "Fibrosis is absent (stage 0).",
    "Mild portal inflammation, with ballooning; no Mallory-Denk bodies!",
    "Hepatocellular carcinoma, well differentiated: trabecular pattern.",
    "...",
]
REFERENCES = [
    "The liver shows mild macrovesicular steatosis in zone 3.",
    "Moderate bridging fibrosis.",
    "No fibrosis.",
    "Portal inflammation is mild; ballooning is present.",
    "Well-differentiated hepatocellular carcinoma with a trabecular pattern.",
    "Normal liver parenchyma.",
]


@pytest.fixture(scope="module")
def meteor():
    """One reference METEOR process for the module: used directly and through TextScorer."""
    m = Meteor()
    yield m
    with m.lock:
        m.meteor_p.stdin.close()
        m.meteor_p.kill()
        m.meteor_p.wait()


@pytest.fixture(scope="module")
def scored(meteor):
    with TextScorer(meteor=meteor) as scorer:
        yield scorer.score(PREDICTIONS, REFERENCES)


def test_tokenization_matches_pycocoevalcap_ptbtokenizer() -> None:
    texts = PREDICTIONS + REFERENCES + ["Ki-67 > 20% & CD34+ cells, e.g. 5/10 HPF.", "It's \"grade 2\" (µm)"]
    reference = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert tokenize(texts) == [reference[i][0] for i in range(len(texts))]


def test_tokenization_keeps_alignment_with_line_breaks_and_empty_texts() -> None:
    assert tokenize(["Steatosis.\r\nFibrosis\u2028here", "", "  ", "Zone 3"]) == [
        "steatosis fibrosis here",
        "",
        "",
        "zone 3",
    ]
    assert tokenize([]) == []


def test_per_pair_scores_equal_pycocoevalcap(scored, meteor) -> None:
    gts = {i: [r] for i, r in enumerate(scored.refs)}
    res = {i: [h] for i, h in enumerate(scored.hyps)}
    meteor_corpus, meteor_pairs = meteor.compute_score(gts, res)
    bleu_corpus, bleu_pairs = Bleu(4).compute_score(gts, res, verbose=0)
    rouge_corpus, rouge_pairs = Rouge().compute_score(gts, res)
    for i, pair in enumerate(scored.per_pair):
        assert pair.meteor == meteor_pairs[i]
        assert list(pair.bleu) == [bleu_pairs[n][i] for n in range(4)]
        assert pair.rouge_l == rouge_pairs[i]
    corpus = scored.corpus()
    assert corpus == {
        "meteor": meteor_corpus,
        **{f"bleu_{n + 1}": bleu_corpus[n] for n in range(4)},
        "rouge_l": rouge_corpus,
    }
    assert tuple(corpus) == METRIC_NAMES


def test_subset_corpus_scores_equal_pycocoevalcap(scored, meteor) -> None:
    subset = [0, 2, 3]
    gts = {i: [scored.refs[i]] for i in subset}
    res = {i: [scored.hyps[i]] for i in subset}
    corpus = scored.corpus(subset)
    assert corpus["meteor"] == meteor.compute_score(gts, res)[0]
    assert [corpus[f"bleu_{n + 1}"] for n in range(4)] == Bleu(4).compute_score(gts, res, verbose=0)[0]
    assert corpus["rouge_l"] == Rouge().compute_score(gts, res)[0]


def test_empty_predictions_score_zero_and_leave_java_running(scored) -> None:
    assert scored.hyps[1] == "" and scored.hyps[5] == ""
    for i in (1, 5):
        assert scored.per_pair[i].as_dict() == {name: 0.0 for name in METRIC_NAMES}
    assert 0.0 < scored.corpus([0, 1])["meteor"] < scored.corpus([0])["meteor"]


def test_identical_texts_score_high(meteor) -> None:
    with TextScorer(meteor=meteor) as scorer:
        result = scorer.score(["Mild steatosis in zone 3."], ["mild steatosis in zone 3"])
    pair = result.per_pair[0]
    assert pair.rouge_l == 1.0 and pair.bleu[0] == pytest.approx(1.0)
    assert pair.meteor > 0.9


def test_scorer_rejects_mismatched_lengths(meteor) -> None:
    with TextScorer(meteor=meteor) as scorer, pytest.raises(ValueError, match="2 predictions but 1 references"):
        scorer.score(["a", "b"], ["a"])
