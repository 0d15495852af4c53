"""How choice answers are written for training, and that the evaluation still reads their letters."""

from __future__ import annotations

import pytest

from slidevl.qa.records import VQARecord, parse_answer_letters
from slidevl.slidellm.answers import ANSWER_STYLES, DEFAULT_ANSWER_STYLE, assistant_answer
from slidevl.slidellm.tuning.config import TuneConfig
from slidevl.slidellm.vqa_data import chat_messages, corpus_texts
from slidevl.vqa.choices import parse_choice

SINGLE = VQARecord("s", "S1", "ROI", "composition", "single", "Which tissue dominates?", "C",
                   options=("tumour", "necrosis", "fibrous stroma", "adipose tissue"), bbox=(0, 0, 8, 8))
MULTI = VQARecord("m", "S1", "WSI", "composition", "multi", "Which tissues are present?", "A,D",
                  options=("tumour", "necrosis", "fibrous stroma", "adipose tissue", "lymphocytic infiltrate"))
OPEN = VQARecord("o", "S1", "WSI", "diagnosis", "open", "Diagnosis?", "A carcinoma, grade 2.")


def test_letter_text_style_names_letter_and_option() -> None:
    assert assistant_answer(SINGLE, "letter_text") == "C. fibrous stroma"
    assert assistant_answer(MULTI, "letter_text") == "A. tumour\nD. adipose tissue"
    assert assistant_answer(SINGLE, "letter") == "C"
    assert assistant_answer(MULTI, "text") == "tumour, adipose tissue"
    assert chat_messages(SINGLE)[1]["content"] == assistant_answer(SINGLE, DEFAULT_ANSWER_STYLE)


def test_open_and_caption_answers_do_not_depend_on_the_style() -> None:
    assert {assistant_answer(OPEN, s) for s in ANSWER_STYLES} == {OPEN.answer}


@pytest.mark.parametrize("style", ANSWER_STYLES)
@pytest.mark.parametrize("record", [SINGLE, MULTI])
def test_every_style_parses_back_to_the_gold_letters(style: str, record: VQARecord) -> None:
    # A model that reproduces the training answer exactly must score 1.
    gold = parse_answer_letters(record.answer, len(record.options))
    assert parse_choice(assistant_answer(record, style), record.options) == gold


def test_a_wrong_letter_with_the_right_text_is_scored_by_the_letter() -> None:
    # "letter_text" is read by its line labels: the letter decides, not the restated text.
    assert parse_choice("B. fibrous stroma", SINGLE.options) == frozenset("B")


def test_tokenizer_corpus_uses_the_style_and_config_checks_it() -> None:
    assert "fibrous stroma" in corpus_texts([SINGLE])
    assert "C. fibrous stroma" in corpus_texts([SINGLE], "letter_text")
    assert "C" in corpus_texts([SINGLE], "letter")
    with pytest.raises(ValueError, match="answer style"):
        assistant_answer(SINGLE, "words")
    with pytest.raises(ValueError, match="answer_style"):
        TuneConfig(stage="stage2", records="r.jsonl", out="o", answer_style="words")
    assert TuneConfig(stage="stage2", records="r.jsonl", out="o").answer_style == DEFAULT_ANSWER_STYLE


def _tok():
    from slidevl.slidellm.tokenizer import train_tokenizer

    texts = corpus_texts([SINGLE, MULTI, OPEN, OPEN2])
    return train_tokenizer(texts, vocab_size=400, min_frequency=1)


OPEN2 = VQARecord("o2", "S2", "WSI", "diagnosis", "open", "Diagnosis?", "No tumour is seen.")


def test_shuffled_options_keep_the_chosen_texts() -> None:
    import numpy as np

    from slidevl.slidellm.vqa_data import shuffle_options

    orders = set()
    for k in range(20):
        r = shuffle_options(MULTI, np.random.default_rng(k))
        chosen = {r.options["ABCDE".index(x)] for x in r.answer.split(",")}
        assert chosen == {"tumour", "adipose tissue"} and sorted(r.options) == sorted(MULTI.options)
        orders.add(r.options)
    assert len(orders) > 5
    assert shuffle_options(OPEN, np.random.default_rng(0)) is OPEN


def test_dataset_views_change_per_epoch_and_repeat_for_a_given_epoch() -> None:
    from slidevl.slidellm.vqa_data import ChatDataset

    tok = _tok()
    ds = ChatDataset([SINGLE, MULTI, OPEN], tok, shuffle_options=True, seed=3)
    views = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        views.append(ds.view(0).options)
        assert ds[0].input_ids == ds[0].input_ids  # deterministic within an epoch
    assert len(set(views)) > 1
    ds.set_epoch(2)
    assert ds.view(0).options == views[2]
    fixed = ChatDataset([SINGLE, OPEN], tok)
    assert not fixed.varies and fixed.view(0) is SINGLE


def test_blind_warmup_answers_come_from_peers_not_from_the_record() -> None:
    from slidevl.slidellm.vqa_data import ChatDataset

    tok = _tok()
    ds = ChatDataset([SINGLE, OPEN, OPEN2], tok, supervise="all", blind_answers=True, seed=0)
    open_answers, letters = set(), set()
    for epoch in range(30):
        ds.set_epoch(epoch)
        open_answers.add(ds.view(1).answer)
        letters.add(ds.view(0).answer)
        assert ds.view(0).options == SINGLE.options  # no shuffling asked for
    # The open answer is drawn from both diagnosis records; the single answer is any option.
    assert open_answers == {OPEN.answer, OPEN2.answer}
    assert letters == set("ABCD")
