"""The slide-VLM checkpoint: one config.json plus weights, written and read back exactly; old folders still load.

``tests/data/slidevlm_checkpoint_before_config`` was written by slidevl before the
checkpoint had a config.json: a tiny stage-2 LoRA run (MLP connector with pooled tokens,
over the two slides of :func:`test_slidellm_fixtures.make_job`) with its ``run.json``, its
base LLM (``base_llm/``, which the checkpoint references by path) and, in
``expected.json``, what that code computed on fixed inputs: the connector's visual rows,
the log-likelihoods of a single-choice question's two answers and 8 greedily generated
tokens, for the whole slide and for a region.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from test_slidellm_fixtures import make_job, make_records, stage_config, tiny_train, world  # noqa: F401  (world: a fixture)
from typer.testing import CliRunner

from slidevl.errors import CheckpointError
from slidevl.features.store import FeatureStore
from slidevl.qa.records import read_records
from slidevl.slidellm.ask import SlideAssistant
from slidevl.slidellm.checkpoint_layout import convert_checkpoint, open_checkpoint
from slidevl.slidellm.cli import app as slidellm_app
from slidevl.slidellm.encoder.config import TopoPackConfig
from slidevl.slidellm.model import SlideVLM, SlideVLMError, encode_slide
from slidevl.slidellm.tokenizer import IMAGE_TOKEN
from slidevl.slidellm.tuning.checkpoint import LoadedVLM, load_vlm
from slidevl.slidellm.tuning.config import TuneConfig
from slidevl.slidellm.vlm_config import SlideVLMConfig
from slidevl.slidellm.vqa_data import ChatCollator, Example, chat_messages, encode_chat

OLD = Path(__file__).parent / "data" / "slidevlm_checkpoint_before_config"
REGIONS = {"slide": None, "region": (0, 0, 700, 700)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("vlm_inputs")
    record = next(r for r in read_records(make_records(root / "qa.jsonl")) if r.id == "S1-single")
    return {"slide": FeatureStore(make_job(root / "job"), "toy").load("S1"), "record": record}


@pytest.fixture()
def old_checkpoint(tmp_path: Path) -> Path:
    """The old checkpoint, with its base LLM reference pointed at the copy beside it (as after moving a model)."""
    shutil.copytree(OLD, tmp_path / "old")
    info_path = tmp_path / "old" / "checkpoint" / "slidevlm.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "llm": str(tmp_path / "old" / "base_llm")}))
    return tmp_path / "old"


def answers(loaded: LoadedVLM, inputs: dict[str, Any]) -> dict[str, Any]:
    """What expected.json holds, computed by ``loaded``."""
    model, tok = loaded.model, loaded.tokenizer
    out = {}
    with torch.no_grad():
        visual = encode_slide(loaded.encoder, inputs["slide"])
        for name, bbox in REGIONS.items():
            image = model.visual_input(visual, bbox)
            rows = model.visual_embeds([image])[0].double()
            candidates = [replace(inputs["record"], answer=a, bbox=bbox) for a in ("A", "B")]
            batch = ChatCollator(tok.pad_token_id)(
                [Example(c, *encode_chat(tok, chat_messages(c, loaded.config.answer_style))) for c in candidates])
            scores = model.answer_log_likelihood(batch.input_ids, batch.attention_mask, batch.labels, image)
            ids = tok.apply_chat_template([{"role": "user", "content": f"{IMAGE_TOKEN}\nIs there a tumour?"}],
                                          add_generation_prompt=True, return_dict=True)["input_ids"]
            generated = model.generate(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), [[image]],
                                       max_new_tokens=8, eos_token_id=tok.eos_token_id)[0]
            out[name] = {"option_log_likelihoods": scores.tolist(), "visual_rows": rows.shape[0],
                         "visual_sum": float(rows.sum()), "visual_abs_sum": float(rows.abs().sum()), "generated": generated}
    return out


def assert_same_answers(got: dict[str, Any], want: dict[str, Any]) -> None:
    for name in REGIONS:
        g, w = got[name], want[name]
        assert g["visual_rows"] == w["visual_rows"] and g["generated"] == w["generated"], name
        assert g["visual_sum"] == pytest.approx(w["visual_sum"], rel=1e-5, abs=1e-4), name
        assert g["visual_abs_sum"] == pytest.approx(w["visual_abs_sum"], rel=1e-5), name
        assert g["option_log_likelihoods"] == pytest.approx(w["option_log_likelihoods"], abs=1e-4), name


def test_old_layout_loads_and_answers_as_it_did(old_checkpoint: Path, inputs: dict[str, Any]) -> None:
    folder = open_checkpoint(old_checkpoint)
    assert folder.legacy and folder.config.stage == "stage2"
    # The settings spread over slidevlm.json, encoder/encoder_config.json and the adapter's peft config.
    assert folder.config.encoder.d_model == 16 and folder.config.connector.pooled_tokens is True
    assert folder.config.llm.tuning == "lora" and (folder.config.llm.lora.r, folder.config.llm.lora.alpha) == (4, 8)
    assert folder.config.llm.lora.target_modules == "down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj"
    # Its run.json, untagged, continued stage 1 (--init): the connector came from that checkpoint, unchanged.
    run = TuneConfig.load(OLD / "run.json")
    assert run.stage == "stage2" and run.init and run.connector.given() == {}
    assert_same_answers(answers(load_vlm(old_checkpoint), inputs), json.loads((OLD / "expected.json").read_text()))


def test_save_pretrained_then_from_pretrained_gives_identical_outputs(old_checkpoint: Path, tmp_path: Path,
                                                                     inputs: dict[str, Any]) -> None:
    loaded = load_vlm(old_checkpoint)
    new = tmp_path / "new"
    loaded.model.save_pretrained(new, loaded.tokenizer)
    files = sorted(str(p.relative_to(new)) for p in new.rglob("*") if p.is_file() and p.parent.name != "tokenizer")
    assert files == ["adapter/README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                     "config.json", "connector.safetensors", "encoder.safetensors"]
    assert SlideVLMConfig.from_pretrained(new) == loaded.config
    reloaded = load_vlm(new)
    assert not open_checkpoint(new).legacy
    assert answers(reloaded, inputs) == answers(loaded, inputs)
    for a, b in ((loaded.model, reloaded.model), (loaded.encoder, reloaded.encoder)):
        want = a.state_dict()
        assert all(torch.equal(want[k], v) for k, v in b.state_dict().items())
    # The class method reads the same folder (or its run folder) without the tokenizer at hand.
    direct = SlideVLM.from_pretrained(new)
    assert direct.config == loaded.config and not direct.training
    assert not any(p.requires_grad for p in direct.parameters())


def test_convert_command_writes_the_new_layout(old_checkpoint: Path, tmp_path: Path, inputs: dict[str, Any]) -> None:
    runner = CliRunner()
    result = runner.invoke(slidellm_app, ["convert", str(old_checkpoint), str(tmp_path / "new")])
    assert result.exit_code == 0, result.output
    converted = open_checkpoint(tmp_path / "new")
    assert not converted.legacy and converted.config == open_checkpoint(old_checkpoint).config
    assert not (tmp_path / "new" / "slidevlm.json").exists() and not (tmp_path / "new" / "encoder").exists()
    assert_same_answers(answers(load_vlm(tmp_path / "new"), inputs), json.loads((OLD / "expected.json").read_text()))
    with pytest.raises(CheckpointError, match="already has the config.json layout"):
        convert_checkpoint(tmp_path / "new", tmp_path / "again")
    result = runner.invoke(slidellm_app, ["convert", str(old_checkpoint), str(tmp_path / "new")])
    assert result.exit_code == 2 and "already exists" in result.output


def test_a_folder_of_another_kind_is_refused(old_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"holds a Hugging Face llama model config, not a slide-LLM checkpoint"):
        load_vlm(old_checkpoint / "base_llm")
    TopoPackConfig(patch_dim=8, pack_dim=8, global_dim=8).save_pretrained(tmp_path / "encoder")
    with pytest.raises(CheckpointError, match=r"holds a TopoPackConfig, not a slide-LLM checkpoint \(SlideVLMConfig\)"):
        open_checkpoint(tmp_path / "encoder")
    with pytest.raises(CheckpointError, match=r"no slide-LLM checkpoint \(config.json\) here or in .*checkpoint"):
        open_checkpoint(tmp_path / "empty")
    info_path = old_checkpoint / "checkpoint" / "slidevlm.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "version": 7}))
    with pytest.raises(CheckpointError, match="version 7"):
        open_checkpoint(old_checkpoint)


def test_ask_counts_every_visual_row_against_the_llm_context(old_checkpoint: Path, inputs: dict[str, Any]) -> None:
    # The pooled MLP gives one row per summary token and patch plus two pooled rows (25 for this slide).
    assistant = SlideAssistant(old_checkpoint, device="cpu")
    visual = encode_slide(assistant.loaded.encoder, inputs["slide"])
    question = "Is there a tumour?"
    ids = assistant.tokenizer.apply_chat_template([{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}],
                                                  add_generation_prompt=True, return_dict=True)["input_ids"]
    rows = json.loads((OLD / "expected.json").read_text())["slide"]["visual_rows"]
    llm_config = assistant.loaded.model.llm.config
    llm_config.max_position_embeddings = len(ids) + rows + 4
    assistant.conversation(visual).ask(question, max_new_tokens=4)
    llm_config.max_position_embeddings -= 1
    with pytest.raises(SlideVLMError, match="no longer fits"):
        assistant.conversation(visual).ask(question, max_new_tokens=4)


def test_a_bad_nested_setting_names_the_file_once(old_checkpoint: Path, tmp_path: Path) -> None:
    path = open_checkpoint(old_checkpoint).config.save_pretrained(tmp_path / "new")
    data = json.loads(path.read_text())
    data["connector"]["kindd"] = "mlp"
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"SlideVLMConfig\.connector: unknown ConnectorConfig setting\(s\) \['kindd'\]") as info:
        open_checkpoint(tmp_path / "new")
    assert str(info.value).count(str(path)) == 1


def test_an_old_checkpoint_as_init_trains_on_into_the_new_layout(old_checkpoint: Path, tmp_path: Path,
                                                                 world: dict[str, Path]) -> None:  # noqa: F811
    from slidevl.slidellm.tuning.stages import run_stage

    run_stage(stage_config(world, "stage2", tmp_path / "s2", init=str(old_checkpoint), train=tiny_train(max_steps=1)))
    folder = open_checkpoint(tmp_path / "s2")
    old = open_checkpoint(old_checkpoint).config
    # The adapters continue with their own LoRA settings; encoder and connector carry over.
    assert not folder.legacy and folder.config.llm.lora == old.llm.lora and folder.config.llm.base == old.llm.base
    assert folder.config.encoder == old.encoder and folder.config.connector == old.connector
    assert load_vlm(tmp_path / "s2").model.config == folder.config
