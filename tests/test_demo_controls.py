"""The demo's "does the model look?" controls: blind baselines, lending slides, answers with another slide's input."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from slidevl.errors import InputError
from slidevl.qa.records import VQARecord, read_records
from slidevl.vqa.controls import answer_with_other_slides, blind_single_choice, lending_slides
from test_slidellm_fixtures import stage_config, world  # noqa: F401  (fixture used by name)

GRADES = ["grade 1", "grade 2", "grade 3", "no tumour present"]


def _grade(slide: str, truth: int, order: list[int]) -> VQARecord:
    """A WSI grade question whose options are ``GRADES`` shuffled by ``order``; ``truth`` indexes GRADES."""
    options = [GRADES[i] for i in order]
    return VQARecord(f"{slide}-grade", slide, "WSI", "grade", "single", "Which grade?", "ABCD"[order.index(truth)],
                     options=options, meta={"template": "grade"})


def test_blind_baselines_count_single_choice_only() -> None:
    # Train: grade 3 twice, grade 1 once -> the majority answer is the text "grade 3", whatever its letter.
    train = [_grade("T1", 2, [0, 1, 2, 3]), _grade("T2", 2, [2, 0, 1, 3]), _grade("T3", 0, [0, 1, 2, 3])]
    test = [_grade("S1", 2, [3, 2, 1, 0]), _grade("S2", 1, [0, 1, 2, 3]), _grade("S3", 2, [1, 0, 3, 2]),
            VQARecord("S1-open", "S1", "WSI", "grade", "open", "What grade?", "grade 3")]
    blind = blind_single_choice(train, test)
    assert blind == {"n": 3, "chance": 0.25, "majority": round(2 / 3, 4)}
    with pytest.raises(InputError, match="single-choice"):
        blind_single_choice(train, test[-1:])


def test_lending_slides_never_lend_a_slide_to_itself_or_its_neighbour() -> None:
    slides = [f"SYN-{p:04d}-0{s}" for p in range(5) for s in (1, 2)]
    lender = lending_slides(slides + slides[:3])  # repeats count once
    assert set(lender) == set(slides) and set(lender.values()) == set(slides)  # a permutation
    for slide, other in lender.items():
        assert other.rsplit("-", 1)[0] != slide.rsplit("-", 1)[0]  # another patient
    with pytest.raises(InputError, match="at least 2 slides"):
        lending_slides(["S1", "S1"])


def test_answers_use_the_other_slides_whole_slide_input(world: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    from slidevl.slidellm.ask import SlideAssistant
    from slidevl.slidellm.tuning.stages import run_stage

    run_stage(stage_config(world, "stage2", tmp_path / "s2"))
    assistant = SlideAssistant(tmp_path / "s2", device="cpu", cache_root=tmp_path / "cache")
    records = read_records(world["records"])
    assert {r.slide for r in records} == {"S1", "S2"} and any(r.bbox for r in records)
    seen: list[tuple[list[VQARecord], dict]] = []
    answer_records = assistant.answer_records

    def spy(chunk: list[VQARecord], visuals: dict, **kw: object) -> list[str]:
        seen.append((list(chunk), dict(visuals)))
        return answer_records(chunk, visuals, **kw)

    assistant.answer_records = spy  # type: ignore[method-assign]
    got = answer_with_other_slides(assistant, records, max_new_tokens=4, batch_size=3)
    assert len(got) == len(records) and all(isinstance(a, str) for a in got)
    s1, s2 = assistant.open_slide("S1"), assistant.open_slide("S2")  # cached: the same objects
    for chunk, visuals in seen:
        assert visuals["S1"] is s2 and visuals["S2"] is s1
        assert all(r.bbox is None for r in chunk)
    assert [r.id for chunk, _ in seen for r in chunk] == [r.id for r in records]
    # The same records asked by hand, S1's with S2's whole slide and the other way round, get the same answers.
    assistant.answer_records = answer_records  # type: ignore[method-assign]
    expected = answer_records([replace(r, bbox=None) for r in records], {"S1": s2, "S2": s1}, max_new_tokens=4,
                              rank_single=True)
    assert got == expected
