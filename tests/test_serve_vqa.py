"""The chat answered by a tuned slide VQA checkpoint (tiny model, trained for one step)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_slidellm_fixtures import stage_config, tiny_train, world  # noqa: F401  (fixtures used by name)

from slidevl.atomic import write_json_atomic
from slidevl.serve.answerer import AnswerError, AnswererUnavailableError
from slidevl.serve.app import create_app
from slidevl.serve.job import ServeJob
from slidevl.serve.vqa import SlideLLMAnswerer, load_checkpoint_answerer
from slidevl.slidellm.tuning.stages import run_stage


@pytest.fixture(scope="module")
def checkpoint(world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("serve_vqa") / "s2"
    run_stage(stage_config(world, "stage2", out, train=tiny_train(max_steps=1)))
    return out


def test_checkpoint_answerer_keeps_one_conversation_per_slide(world: dict[str, Path], checkpoint: Path) -> None:  # noqa: F811
    answerer = load_checkpoint_answerer(checkpoint, world["job"], device="cpu")
    assert isinstance(answerer, SlideLLMAnswerer) and answerer.name == "slidellm"
    # An untrained model may talk until the limit; short answers keep four turns within the tiny LM's 512 positions.
    answerer.max_new_tokens = 16
    first = answerer.answer("S1", "Describe the slide.", None, [])
    assert isinstance(first, str)
    chat = answerer._conversations["S1"]
    history = [{"role": "user", "content": "Describe the slide."}, {"role": "assistant", "content": first}]
    answerer.answer("S1", "And the tumour?", None, history)
    assert [m["content"].startswith("<image>") for m in chat.messages if m["role"] == "user"] == [True, False]
    answerer.answer("S1", "This region?", (0, 0, 700, 700), history * 2)
    assert chat.bbox == (0, 0, 700, 700) and len(chat.images) == 2
    answerer.answer("S1", "Start again.", None, [])  # a new page: the history restarts
    assert len(chat.messages) == 2 and chat.bbox is None
    with pytest.raises(AnswerError, match="no tissue pack"):
        answerer.answer("S1", "Here?", (90000, 0, 90001, 1), [])


def test_bad_checkpoints_are_refused(world: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(AnswererUnavailableError, match="not found"):
        load_checkpoint_answerer(tmp_path / "missing", world["job"])
    with pytest.raises(AnswererUnavailableError, match="cannot load the VQA model"):
        load_checkpoint_answerer(tmp_path, world["job"])


def test_the_api_uses_the_model(world: dict[str, Path], checkpoint: Path, tmp_path: Path) -> None:  # noqa: F811
    # A manifest naming the model's slides; the answerer reads their features from the model's job.
    write_json_atomic(tmp_path / "manifest.json", {"slides": [{"slide_id": "S1", "status": "ok"}]})
    answerer = load_checkpoint_answerer(checkpoint, world["job"], device="cpu")
    with TestClient(create_app(ServeJob(tmp_path), answerer=answerer)) as client:
        info = client.get("/api/info").json()["answerer"]
        assert info["name"] == "slidellm" and checkpoint.name in info["description"]
        reply = client.post("/api/slides/S1/chat", json={"question": "Describe the slide."}).json()
        assert reply["answerer"] == "slidellm" and isinstance(reply["answer"], str)
