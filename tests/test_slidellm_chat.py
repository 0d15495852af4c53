"""Tokenizer, chat template, label masking and the splicing of visual tokens into the text."""

from __future__ import annotations

import pytest
import torch
from test_slidellm_fixtures import TINY_LM
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from slidevl.slidellm.connector import ConnectorConfig, build_connector
from slidevl.slidellm.llm import build_embedded_llm
from slidevl.slidellm.model import IGNORE_INDEX, SlideVLM, SlideVLMError
from slidevl.slidellm.tokenizer import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    TokenizerError,
    image_token_id,
    load_tokenizer,
    prepare_tokenizer,
    train_tokenizer,
)
from slidevl.qa.records import VQARecord
from slidevl.slidellm.vqa_data import ChatCollator, ChatDataset, chat_messages, encode_chat, select_records, user_prompt

RECORDS = [
    VQARecord("a", "S1", "WSI", "diagnosis", "single", "Is there a tumour?", "B", options=("no", "yes")),
    VQARecord("b", "S1", "ROI", "morphology", "open", "What is seen?", "Sheets of atypical hepatocytes.", bbox=(0, 0, 10, 10)),
    VQARecord("c", "S2", "WSI", "description", "caption", "Describe the slide.", "A fibrotic liver with one nodule."),
]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    texts = [user_prompt(r) for r in RECORDS] + [r.answer for r in RECORDS]
    return train_tokenizer(texts, vocab_size=350, min_frequency=1)


def test_trained_tokenizer_round_trips_and_keeps_the_placeholder_whole(tok: PreTrainedTokenizerFast, tmp_path) -> None:
    text = "Unseen wörds: 12.5 µm\nA. yes"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    ids = tok(f"{IMAGE_TOKEN}\nhi", add_special_tokens=False)["input_ids"]
    assert ids.count(image_token_id(tok)) == 1
    tok.save_pretrained(tmp_path)
    back = load_tokenizer(tmp_path)
    assert back.chat_template == CHAT_TEMPLATE
    assert back(text)["input_ids"] == tok(text)["input_ids"]


def test_prompt_puts_options_in_the_question() -> None:
    assert user_prompt(RECORDS[0]) == f"{IMAGE_TOKEN}\nIs there a tumour?\nA. no\nB. yes"
    assert chat_messages(RECORDS[1])[1] == {"role": "assistant", "content": "Sheets of atypical hepatocytes."}


def test_labels_cover_only_the_assistant_answer(tok: PreTrainedTokenizerFast) -> None:
    ids, labels = encode_chat(tok, chat_messages(RECORDS[1]))
    assert len(ids) == len(labels)
    kept = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    # The answer and the end-of-turn token that teaches the model to stop.
    assert tok.decode(kept) == "Sheets of atypical hepatocytes.<|im_end|>\n"
    first = labels.index(next(lab for lab in labels if lab != IGNORE_INDEX))
    assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    assert image_token_id(tok) in ids[:first]


def test_multi_turn_labels_every_assistant_turn(tok: PreTrainedTokenizerFast) -> None:
    messages = [
        {"role": "user", "content": f"{IMAGE_TOKEN}\nWhat is seen?"},
        {"role": "assistant", "content": "A nodule."},
        {"role": "user", "content": "Is there a tumour?"},
        {"role": "assistant", "content": "yes"},
    ]
    ids, labels = encode_chat(tok, messages)
    kept = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert kept == "A nodule.<|im_end|>\nyes<|im_end|>\n"


def test_history_dependent_template_is_refused(tok: PreTrainedTokenizerFast) -> None:
    # This template prints the number of turns first, so a chat's rendering does not start
    # with the rendering of its beginning: assistant spans cannot be found.
    original = tok.chat_template
    tok.chat_template = "{{ messages|length }}" + CHAT_TEMPLATE
    try:
        with pytest.raises(TokenizerError, match="extension"):
            encode_chat(tok, chat_messages(RECORDS[0]))
    finally:
        tok.chat_template = original


def test_foreign_tokenizer_gets_the_placeholder_and_padding() -> None:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["hello"], trainers.BpeTrainer(vocab_size=270, special_tokens=["</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    foreign = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
    with pytest.raises(TokenizerError, match="chat template"):
        prepare_tokenizer(foreign, "model-dir")
    foreign.chat_template = CHAT_TEMPLATE
    ready = prepare_tokenizer(foreign)
    assert ready.pad_token == "</s>"
    assert ready.convert_ids_to_tokens(image_token_id(ready)) == IMAGE_TOKEN


def test_stage_record_selection() -> None:
    assert [r.id for r in select_records(RECORDS, "stage1")] == ["c"]
    assert [r.id for r in select_records(RECORDS, "stage2")] == ["a", "b"]
    assert len(select_records(RECORDS, "warmup")) == 3


def test_splice_replaces_the_placeholder_and_masks_visual_labels(tok: PreTrainedTokenizerFast) -> None:
    torch.manual_seed(0)
    llm = build_embedded_llm(tok, TINY_LM).eval()
    conn = build_connector(ConnectorConfig(vision_dim=6, llm_dim=TINY_LM.hidden_size, kind="mlp"))
    model = SlideVLM(conn, llm, image_token_id=image_token_id(tok), pad_token_id=tok.pad_token_id)
    batch = ChatCollator(tok.pad_token_id)(ChatDataset(RECORDS[:2], tok).examples)
    visual = [torch.randn(3, TINY_LM.hidden_size), torch.randn(5, TINY_LM.hidden_size)]
    embeds, mask, labels = model.splice(batch.input_ids, batch.attention_mask, [[v] for v in visual], batch.labels)
    for b in range(2):
        n = int(batch.attention_mask[b].sum())
        pos = batch.input_ids[b].tolist().index(image_token_id(tok))
        k = visual[b].shape[0]
        assert int(mask[b].sum()) == n - 1 + k
        torch.testing.assert_close(embeds[b, pos : pos + k], visual[b])
        assert (labels[b, pos : pos + k] == IGNORE_INDEX).all()
        # Text after the placeholder is shifted by k - 1, labels with it.
        assert labels[b, pos + k : n - 1 + k].tolist() == batch.labels[b, pos + 1 : n].tolist()
    with pytest.raises(SlideVLMError, match="placeholder"):
        model.splice(batch.input_ids, batch.attention_mask, [[], []])
