"""Option parsing of free-text answers, and choice scoring with partial credit."""

from __future__ import annotations

import pytest

from slidevl.vqa.choices import format_letters, parse_choice, score_choice

FOUR = ["Steatosis", "Ballooning", "Fibrosis", "No fibrosis"]
TEN = [f"Pattern {i}" for i in range(10)]  # letters A-J: "I" is a valid option


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        # bare letter lists
        ("B", "B"),
        ("b", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("[D]", "D"),
        ("c)", "C"),
        ("A, C", "A,C"),
        ("a, c", "A,C"),
        ("A and C", "A,C"),
        ("A/C", "A,C"),
        ("A C", "A,C"),
        ("A, B, and D", "A,B,D"),
        ("ACD", "A,C,D"),
        ("**B**", "B"),
        ("  B  \n", "B"),
        # explicit markers
        ("Answer: B", "B"),
        ("Answer：D", "D"),
        ("The answer is (c)", "C"),
        ("The answer is (c).", "C"),
        ("The final answer is C.", "C"),
        ("Final Answer: (A) and (D)", "A,D"),
        ("Answer: ACD", "A,C,D"),
        ("Correct answer(s): A, C", "A,C"),
        ("The correct options are A and C.", "A,C"),
        ("Options: A, C", "A,C"),
        ("I think the answer is B", "B"),
        ("I would choose option c because of the fat droplets.", "C"),
        ("The answer is A because the droplets are large.", "A"),
        ("Answer: B, not A", "B"),
        ("Option A is wrong; the answer is C.", "C"),
        ("B is correct", "B"),
        ("A and C are correct.", "A,C"),
        ("D is the answer", "D"),
        # line labels
        ("B. Ballooning", "B"),
        ("(C) Fibrosis with bridging", "C"),
        ("A) Steatosis\nC) Fibrosis", "A,C"),
        ("B - ballooning of hepatocytes", "B"),
        ("B\n\nExplanation: A large fat droplet displaces the nucleus.", "B"),
        ("Answer: C\nReason: I see bridging fibrosis.", "C"),
        # option texts restated
        ("Fibrosis", "C"),
        ("fibrosis.", "C"),
        ("No fibrosis", "D"),
        ('"Ballooning"', "B"),
        ("Steatosis and fibrosis", "A,C"),
        ("steatosis, ballooning", "A,B"),
        # loose letters in prose
        ("I'd go with A.", "A"),
        ("i think it's b", "B"),
        ("It's B because of the fat", "B"),
        ("I think B is right", "B"),
        ("The best answer is a combination of A and B", "A,B"),
        ("I was unsure, maybe C", "C"),
        ("<think>Maybe A? No.</think> C", "C"),
        # nothing readable
        ("", ""),
        ("I", ""),
        ("I think so", ""),
        ("The answer is a well-differentiated tumour", ""),
        ("A well-differentiated tumour.", ""),
        ("HCC", ""),
        ("Answer: NASH", ""),
        ("e.g. B-cell lymphoma", ""),
        ("Hepatitis B infection", ""),
        ("p < 0.05", ""),
        ("None of the above", ""),
        ("Answer: F", ""),
        ("I'm not sure.", ""),
    ],
)
def test_parse_four_options(answer: str, expected: str) -> None:
    assert format_letters(parse_choice(answer, FOUR)) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("I", "I"),
        ("(I)", "I"),
        ("Answer: I", "I"),
        ("The answer is (i)", "I"),
        ("I and C", "C,I"),
        ("I think the answer is B", "B"),
        ("I believe C and J", "C,J"),
        ("I think so", ""),
        ("Answer: I think it is E", "E"),
        ("I. Pattern 8", "I"),
    ],
)
def test_pronoun_i_only_counts_when_standalone(answer: str, expected: str) -> None:
    assert format_letters(parse_choice(answer, TEN)) == expected


def test_letters_beyond_the_options_are_dropped() -> None:
    assert parse_choice("A, F", 4) == {"A"}
    assert parse_choice("Answer: I", 4) == frozenset()
    assert parse_choice("(I)", 8) == frozenset()


def test_option_count_only_still_parses_letters() -> None:
    assert parse_choice("Answer: b", 3) == {"B"}
    assert parse_choice("Fibrosis", 3) == frozenset()  # no texts to map


def test_parse_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"1\.\.26 options"):
        parse_choice("A", 0)
    with pytest.raises(TypeError):
        parse_choice(None, 4)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("predicted", "gold", "fmt", "score"),
    [
        ({"B"}, {"B"}, "single", 1.0),
        ({"A"}, {"B"}, "single", 0.0),
        ({"A", "B"}, {"B"}, "single", 0.0),
        (set(), {"B"}, "single", 0.0),
        ({"A", "C"}, {"A", "C"}, "multi", 1.0),
        ({"A"}, {"A", "C"}, "multi", 0.5),
        ({"A", "C"}, {"A", "C", "D"}, "multi", 0.5),
        ({"A", "B"}, {"A", "C"}, "multi", 0.0),
        ({"A", "B", "C"}, {"A", "C"}, "multi", 0.0),
        (set(), {"A", "C"}, "multi", 0.0),
    ],
)
def test_score_choice(predicted: set, gold: set, fmt: str, score: float) -> None:
    assert score_choice(predicted, gold, fmt) == score


def test_score_choice_rejects_text_formats() -> None:
    with pytest.raises(ValueError, match="not a choice format"):
        score_choice({"A"}, {"A"}, "open")


def test_parse_then_score_end_to_end() -> None:
    gold = {"A", "C"}
    assert score_choice(parse_choice("The answer is A.", FOUR), gold, "multi") == 0.5
    assert score_choice(parse_choice("A and C", FOUR), gold, "multi") == 1.0
    assert score_choice(parse_choice("I think A and B", FOUR), gold, "multi") == 0.0
