"""How the slide LLM is taught to write a choice answer (see :data:`ANSWER_STYLES`).

Kept apart from the training data code so the command line can name the default
without importing torch.
"""

from __future__ import annotations

from slidevl.qa.records import OPTION_LETTERS, VQARecord, parse_answer_letters

#: How a choice answer is written in the assistant turn.
#: ``letter``: the stored letters ("B", "A,C"); ``letter_text``: "B. option text", one line
#: per chosen option; ``text``: the option texts only, joined by ", ".
ANSWER_STYLES = ("letter", "letter_text", "text")
DEFAULT_ANSWER_STYLE = "text"


def assistant_answer(record: VQARecord, style: str = DEFAULT_ANSWER_STYLE) -> str:
    """The assistant's answer to ``record`` in the given :data:`ANSWER_STYLES` style.

    Open and caption answers are the record's text whatever the style.
    """
    if style not in ANSWER_STYLES:
        raise ValueError(f"answer style must be one of {ANSWER_STYLES}, got {style!r}")
    if not record.is_choice or style == "letter":
        return record.answer
    letters = sorted(parse_answer_letters(record.answer, len(record.options)))
    chosen = [(letter, record.options[OPTION_LETTERS.index(letter)]) for letter in letters]
    if style == "text":
        return ", ".join(text for _, text in chosen)
    return "\n".join(f"{letter}. {text}" for letter, text in chosen)
