"""Read the chosen option letters out of a free-text model answer, and score them.

Models answer choice questions in many shapes: ``"B"``, ``"(b)"``, ``"A, C"``,
``"A and C"``, ``"A/C"``, ``"ACD"``, ``"Answer: B"``, ``"The answer is (c)."``,
``"B. Fibrosis"``, or by restating an option's text. A plain regex for capital
letters also catches English words: the pronoun "I" (a valid letter once there are
nine options), the article "A"/"a", abbreviations such as "e.g." and names such as
"B-cell". The parser therefore reads the answer in tiers, from the most to the
least explicit, and returns the letters of the first tier that finds any:

1. the whole answer is a letter list (``"a, c"``, ``"(B)"``, ``"A/C"``, ``"ACD"``);
   lower case is accepted here because nothing else is in the answer;
2. the whole answer restates option texts (``"Fibrosis"``, ``"steatosis and fibrosis"``);
3. a letter list after an explicit marker (``"answer is"``, ``"Answer:"``,
   ``"correct options are"``, ``"I choose"``) or before one (``"B is correct"``);
4. option labels opening lines (``"B. Fibrosis"``, ``"(C) Steatosis"``);
5. loose letters anywhere: bracketed ones, ones named as ``"option b"``, and bare
   letters where an option letter sits in prose: ending a clause (``"... it's b."``),
   before another letter or before "is"/"because", and capitals opening a sentence.
   "Hepatitis B infection" or "p < 0.05" yield nothing.

Everywhere, a bare a/A/i/I followed by an ordinary word is read as English
("I think", "a tumour"), never as an option. Letters beyond the question's options
are dropped, so "I" only counts with nine or more options.
"""

from __future__ import annotations

import re
from typing import AbstractSet, Sequence

from slidevl.qa.records import CHOICE_FORMATS, MAX_OPTIONS, OPTION_LETTERS

# Single-letter English words: the article and the pronoun (lower-case "i" is a common typo of "I").
_AMBIGUOUS = frozenset("aAiI")
# Words that may follow an option letter but never the article "a" or the pronoun "I"
# ("The answer is A because ...", "A is correct"); any other word means English.
_LETTER_FOLLOWERS = frozenset("and or because since as is are which seems appears".split())

# One option letter, bracketed or bare. A bare letter must not be glued to word
# characters, apostrophes or hyphens (B-cell, I'm, A1) nor be part of an
# abbreviation (e.g., i.e., U.S.).
_ITEM = re.compile(
    r"""[ \t]*(?:
        [(\[]\s*(?P<br>[A-Za-z])\s*[)\]]
      | (?<![\w'’\-])(?<!\w\.)(?P<bare>[A-Za-z])(?![\w'’\-])(?!\.\w)(?P<close>\))?
    )""",
    re.X,
)
# A run of distinct capitals written without separators: "ACD".
_RUN = re.compile(r"[ \t]*(?<![\w'’\-])(?P<run>[A-Z]{2,26})(?![\w'’\-])")
_CONNECTOR = re.compile(r"\s*(?:,\s*(?:and|or)\b|,|;|/|&|\+|\band\b|\bor\b)\s*", re.I)
_WORD_AFTER = re.compile(r"\s+([A-Za-z]{2,})")

_PREFIX_MARKER = re.compile(
    r"""\b(?:
        (?:final\s+|correct\s+|right\s+|best\s+)?answers?(?:\(s\))?
            (?:\s+(?:is|are|would\s+be|should\s+be|will\s+be|must\s+be))?
            \s*(?:[:=：\-–—]\s*)?(?:(?:options?|choices?)\b\s*[:：]?)?
      | (?:correct|right|best|true)\s+(?:options?|choices?)(?:\(s\))?
            (?:\s+(?:is|are|would\s+be|should\s+be|will\s+be))?\s*[:=：]?
      | (?:options?|choices?)(?:\(s\))?\s*[:：]
      | (?:choose|chose|select|selected|pick|picked|go\s+with|opt\s+for)
            (?:\s+(?:options?|choices?)\b)?
    )[ \t]*""",
    re.I | re.X,
)
_POSTFIX_MARKER = re.compile(
    r"\s+(?:is|are)\s+(?:the\s+)?(?:(?:correct|right|true|best)\b|answers?\b)", re.I
)
_LINE_LABEL = re.compile(
    r"""^[ \t]*(?:[-*•][ \t]*)?(?:
        [(\[][ \t]*(?P<a>[A-Za-z])[ \t]*[)\]]
      | (?P<b>[A-Za-z])[ \t]*(?:[.):]|[ \t][-–—])(?=\s|$)
    )""",
    re.M | re.X,
)
_OPTION_WORD_BEFORE = re.compile(r"\b(?:options?|choices?)\s*[:：]?\s*$", re.I)
_CLAUSE_END = re.compile(r"\s*(?:[.,;:!?)\]]|$)")
_SENTENCE_START = re.compile(r"(?:^|[.!?\n])\s*$")
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_TEXT_SEPARATOR = re.compile(r"^(?:[\s,;/&+.]|\band\b)*$", re.I)


def parse_choice(answer: str, options: int | Sequence[str]) -> frozenset[str]:
    """Letters chosen in a free-text ``answer`` to a question with these ``options``.

    ``options`` is the option texts (enables mapping a restated text to its letter)
    or just their number. Returns an empty set when no option can be read.
    """
    texts: Sequence[str] = () if isinstance(options, int) else options
    n = options if isinstance(options, int) else len(options)
    if not 1 <= n <= MAX_OPTIONS:
        raise ValueError(f"a choice question has 1..{MAX_OPTIONS} options, got {n}")
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a string, got {type(answer).__name__}")
    valid = OPTION_LETTERS[:n]
    text = _clean(answer)
    for tier in (_whole_list, lambda t, v: _option_texts(t, texts), _after_markers, _line_labels, _loose):
        found = frozenset(letter for letter in tier(text, valid) if letter in valid)
        if found:
            return found
    return frozenset()


def score_choice(predicted: AbstractSet[str], gold: AbstractSet[str], fmt: str) -> float:
    """Score a parsed answer: single 1/0; multi 1 exact, 0.5 non-empty strict subset, else 0."""
    if fmt not in CHOICE_FORMATS:
        raise ValueError(f"format {fmt!r} is not a choice format ({', '.join(CHOICE_FORMATS)})")
    predicted, gold = frozenset(predicted), frozenset(gold)
    if fmt == "single":
        return 1.0 if len(gold) == 1 and predicted == gold else 0.0
    if predicted == gold:
        return 1.0
    return 0.5 if predicted and predicted < gold else 0.0


def format_letters(letters: AbstractSet[str]) -> str:
    """Canonical text of a letter set, as stored in records: ``"A,C"``."""
    return ",".join(sorted(letters))


def _clean(answer: str) -> str:
    # Reasoning traces and markdown emphasis carry no answer of their own.
    text = _THINK.sub(" ", answer)
    text = text.replace("**", "").replace("__", "").replace("`", "")
    return text.strip()


def _read_list(text: str, pos: int, valid: str, *, spaces_separate: bool) -> tuple[list[str], int]:
    """Read a letter list starting at ``pos``; return its upper-case letters and where it ended."""
    letters: list[str] = []
    while True:
        run = _RUN.match(text, pos)
        if run and _is_letter_run(run.group("run"), valid):
            letters.extend(run.group("run"))
            end = run.end()
        else:
            item = _ITEM.match(text, pos)
            if not item:
                break
            letter = item.group("br") or item.group("bare")
            bracketed = bool(item.group("br") or item.group("close"))
            end = item.end()
            if not bracketed and letter in _AMBIGUOUS and _reads_as_english(text, end):
                break
            letters.append(letter.upper())
        pos = end
        conn = _CONNECTOR.match(text, pos)
        if conn and (_ITEM.match(text, conn.end()) or _RUN.match(text, conn.end())):
            pos = conn.end()
            continue
        if spaces_separate and text[pos:pos + 1].isspace() and _ITEM.match(text, pos):
            continue
        break
    return letters, pos


def _is_letter_run(run: str, valid: str) -> bool:
    # "ACD" is three options; "HCC", "NASH" or "DNA" are words (repeats or letters beyond the options).
    return len(set(run)) == len(run) and all(c in valid for c in run)


def _reads_as_english(text: str, end: int) -> bool:
    word = _WORD_AFTER.match(text, end)
    return bool(word) and word.group(1).lower() not in _LETTER_FOLLOWERS


def _whole_list(text: str, valid: str) -> list[str]:
    letters, end = _read_list(text, 0, valid, spaces_separate=True)
    rest = text[end:].strip()
    return letters if letters and rest in ("", ".", "!") else []


def _option_texts(text: str, texts: Sequence[str]) -> list[str]:
    """Letters whose option texts, and nothing else, make up the answer."""
    if not texts:
        return []
    remaining = " " + _norm(text).rstrip(".!") + " "
    found: list[str] = []
    # Longest first, so an option that contains another is consumed whole.
    for i in sorted(range(len(texts)), key=lambda k: -len(texts[k])):
        pattern = r"(?<=[\s,;/&+])" + re.escape(_norm(texts[i]).rstrip(".!")) + r"(?=[\s,;/&+.])"
        remaining, hits = re.subn(pattern, " ", remaining)
        if hits:
            found.append(OPTION_LETTERS[i])
    return found if found and _TEXT_SEPARATOR.match(remaining) else []


def _norm(text: str) -> str:
    return " ".join(text.casefold().split()).strip(" \"'“”‘’")


def _after_markers(text: str, valid: str) -> list[str]:
    # The last explicit statement wins: reasoning often precedes the final answer.
    hits: list[tuple[int, list[str]]] = []
    for marker in _PREFIX_MARKER.finditer(text):
        letters, _ = _read_list(text, marker.end(), valid, spaces_separate=False)
        letters = [x for x in letters if x in valid]
        if letters:
            hits.append((marker.start(), letters))
    for marker in _POSTFIX_MARKER.finditer(text):
        letters = [x for x in _list_ending_at(text, marker.start(), valid) if x in valid]
        if letters:
            hits.append((marker.start(), letters))
    return max(hits)[1] if hits else []


def _list_ending_at(text: str, end: int, valid: str) -> list[str]:
    """The letter list that ends exactly at ``end`` ("A and C| are correct")."""
    for start in range(max(0, end - 40), end):
        if start and (text[start - 1].isalnum()):
            continue
        letters, stop = _read_list(text, start, valid, spaces_separate=False)
        if letters and stop == end:
            return letters
    return []


def _line_labels(text: str, valid: str) -> list[str]:
    return [(m.group("a") or m.group("b")).upper() for m in _LINE_LABEL.finditer(text)]


def _loose(text: str, valid: str) -> list[str]:
    found: list[str] = []
    for item in _ITEM.finditer(text):
        letter = item.group("br") or item.group("bare")
        start = item.start("br") if item.group("br") else item.start("bare")
        if item.group("br") or item.group("close") or _OPTION_WORD_BEFORE.search(text, 0, start):
            found.append(letter.upper())
            continue
        # A bare letter counts where an option letter sits in a sentence: at the end of
        # a clause, before another letter, or before "is"/"because"; a capital also
        # at the start of a sentence. "Hepatitis B infection", "p < 0.05", "I think"
        # and "a tumour" are prose.
        ends_clause = bool(_CLAUSE_END.match(text, item.end())) or _before_letter_or_follower(text, item.end(), valid)
        starts_sentence = bool(_SENTENCE_START.search(text, 0, start))
        if letter.isupper() and letter not in _AMBIGUOUS:
            keep = ends_clause or starts_sentence
        else:
            keep = ends_clause and not starts_sentence
        if keep:
            found.append(letter.upper())
    return found


def _before_letter_or_follower(text: str, end: int, valid: str) -> bool:
    conn = _CONNECTOR.match(text, end)
    if conn and conn.end() > end and _ITEM.match(text, conn.end()):
        return True
    word = _WORD_AFTER.match(text, end)
    return bool(word) and word.group(1).lower() in _LETTER_FOLLOWERS
