"""Tokenizers for the slide LLM: the embedded one trained on QA text, and real ones made ready.

The embedded default LLM has no pretrained vocabulary, so :func:`train_tokenizer` learns a
byte-level BPE on the question/option/answer text of the VQA records (byte-level so every
string round-trips, including text never seen in training). It is wrapped as a
``PreTrainedTokenizerFast`` carrying a ChatML-style chat template, so the tuning and
answering code calls ``tokenizer.apply_chat_template`` exactly as it would for a
downloaded chat model.

Whatever the tokenizer, the visual tokens are inserted at one ``<image>`` placeholder;
:func:`prepare_tokenizer` adds that token (and a padding token) where a tokenizer lacks
them and checks that a chat template is present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from slidevl.errors import InputError

#: The placeholder replaced by the connector's visual tokens.
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"
#: Special tokens of the embedded tokenizer; ids follow this order (pad is 0).
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, TURN_START, TURN_END, IMAGE_TOKEN)

#: ChatML layout. A turn ends with ``<|im_end|>``, which is also the end-of-sequence
#: token, so a model trained on these chats stops on its own after answering.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Text the template itself emits: seen by the BPE trainer so role names become single tokens.
_TEMPLATE_TEXT = ("system\n", "user\n", "assistant\n")


class TokenizerError(InputError):
    """A tokenizer cannot serve the slide LLM (no chat template, no placeholder, ...)."""


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 4096, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it with the chat template.

    Args:
        texts: the corpus (questions, rendered options, answers).
        vocab_size: upper bound on the vocabulary, special tokens and the 256 byte symbols included.
        min_frequency: pairs seen fewer times are not merged.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise TokenizerError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens), got {vocab_size}")
    corpus = [t for t in texts if t]
    if not corpus:
        raise TokenizerError("cannot train a tokenizer on an empty corpus; check that the VQA record file has records")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([*corpus, *_TEMPLATE_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        eos_token=TURN_END,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, source: str = "<memory>") -> PreTrainedTokenizerBase:
    """Make ``tokenizer`` usable by the slide LLM and return it.

    Adds the ``<image>`` placeholder as a special token when missing, uses the
    end-of-sequence token for padding when there is no padding token (common for
    decoder-only models), and fails when there is no chat template.
    """
    if not tokenizer.chat_template:
        raise TokenizerError(
            f"{source}: the tokenizer has no chat template; use a chat/instruct model, or add "
            "'chat_template' to its tokenizer_config.json (or chat_template.jinja)"
        )
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TokenizerError(f"{source}: the tokenizer has neither a padding nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Id of the ``<image>`` placeholder (after :func:`prepare_tokenizer`)."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise TokenizerError(f"the tokenizer has no {IMAGE_TOKEN} token; call prepare_tokenizer() first")
    return int(token_id)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory and prepare it (no network access)."""
    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"{path}: tokenizer directory not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{path}: cannot load a tokenizer ({exc}); the folder needs tokenizer.json or the model's tokenizer files") from exc
    return prepare_tokenizer(tokenizer, str(path))
