"""Tuning stages: what trains, what stays frozen, checkpoints, resume, and slide-in answer-out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_slidellm_fixtures import (  # noqa: F401  (fixtures are used by name)
    FEATURE_ENCODER,
    TINY_CONNECTOR,
    make_encoder_dir,
    stage_config,
    tiny_train,
    world,
)
from typer.testing import CliRunner

from slidevl.features.store import FeatureStore
from slidevl.qa.records import read_records
from slidevl.slidellm.ask import SlideAssistant
from slidevl.slidellm.ask_cli import app as ask_app
from slidevl.slidellm.llm import LoraSettings
from slidevl.slidellm.model import boxes_intersecting
from slidevl.slidellm.tuning.checkpoint import load_vlm
from slidevl.slidellm.tuning.cli import app as tune_app
from slidevl.slidellm.tuning.config import TuneConfig
from slidevl.slidellm.tuning.stages import prepare_stage, run_stage
from slidevl.slidellm.tuning.state import CheckpointError, load_state

runner = CliRunner()


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _check_one_step(prepared, trainable_rule) -> set[str]:  # noqa: ANN001
    module = prepared.module
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(trainable_rule(n) for n in trainable), sorted(trainable)
    before = _snapshot(module)
    prepared.run()
    after = dict(module.named_parameters())
    for name, value in before.items():
        if name in trainable:
            continue
        assert torch.equal(after[name], value), f"frozen parameter {name} changed"
    assert any(not torch.equal(after[n], before[n]) for n in trainable), "no trainable parameter moved"
    return trainable


def test_stage1_trains_only_the_connector(world: dict[str, Path], tmp_path: Path) -> None:
    prepared = prepare_stage(stage_config(world, "stage1", tmp_path / "s1", train=tiny_train(max_steps=1)))
    trainable = _check_one_step(prepared, lambda n: n.startswith("vlm.connector."))
    connector = {n for n, _ in prepared.module.vlm.connector.named_parameters()}
    assert trainable == {f"vlm.connector.{n}" for n in connector}
    # The frozen encoder is not even part of what the optimiser sees.
    assert prepared.module.encoder is None


def test_stage2_trains_connector_and_lora_only(world: dict[str, Path], tmp_path: Path) -> None:
    run_stage(stage_config(world, "stage1", tmp_path / "s1", train=tiny_train(max_steps=1)))
    prepared = prepare_stage(stage_config(world, "stage2", tmp_path / "s2", init=str(tmp_path / "s1"), train=tiny_train(max_steps=1)))
    trainable = _check_one_step(prepared, lambda n: n.startswith("vlm.connector.") or "lora_" in n)
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    # LoRA reaches every linear layer of the LLM (attention and MLP), never the output head.
    lora_targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if "lora_" in n}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= lora_targets
    assert not any("lm_head" in n for n in trainable)
    # Stage 2 starts from the stage-1 connector.
    s1 = load_file(str(tmp_path / "s1" / "checkpoint" / "connector.safetensors"))
    s2_init = load_vlm(tmp_path / "s1").model.connector.state_dict()
    assert all(torch.equal(s1[k], s2_init[k]) for k in s1)


def test_train_encoder_flag_makes_the_encoder_trainable(world: dict[str, Path], tmp_path: Path) -> None:
    prepared = prepare_stage(stage_config(world, "stage1", tmp_path / "s1", train_encoder=True, train=tiny_train(max_steps=1)))
    trainable = _check_one_step(prepared, lambda n: n.startswith(("vlm.connector.", "encoder.")))
    assert any(n.startswith("encoder.") for n in trainable)


def test_checkpoint_round_trip(world: dict[str, Path], tmp_path: Path) -> None:
    prepared = prepare_stage(stage_config(world, "stage2", tmp_path / "s2", train=tiny_train(max_steps=2)))
    prepared.run()
    trained = prepared.module.vlm
    loaded = load_vlm(tmp_path / "s2")
    for (name, a), b in zip(trained.connector.state_dict().items(), loaded.model.connector.state_dict().values()):
        assert torch.equal(a, b), name
    lora = {n: p for n, p in trained.llm.named_parameters() if "lora_" in n}
    loaded_lora = dict(loaded.model.llm.named_parameters())
    assert lora and all(torch.equal(p, loaded_lora[n]) for n, p in lora.items())
    # The frozen encoder is stored bit-identical to the one the run started from.
    original = load_file(str(world["encoder"] / "encoder.safetensors"))
    stored = load_file(str(tmp_path / "s2" / "checkpoint" / "encoder.safetensors"))
    assert original.keys() == stored.keys() and all(torch.equal(original[k], stored[k]) for k in original)
    config = json.loads((tmp_path / "s2" / "checkpoint" / "config.json").read_text())
    assert config["config_class"] == "SlideVLMConfig" and config["llm"]["tuning"] == "lora"
    assert config["llm"]["lora"]["r"] == 4 and config["feature_encoder"] == FEATURE_ENCODER
    # Nothing in the checkpoint is a pickle.
    files = [p for p in (tmp_path / "s2").rglob("*") if p.is_file()]
    assert files and all(p.suffix in {".json", ".safetensors", ".jinja", ".md"} for p in files), sorted(map(str, files))


class _Interrupt(RuntimeError):
    pass


def test_resume_continues_exactly_where_the_run_stopped(world: dict[str, Path], tmp_path: Path) -> None:
    # Dropout on, so the restored RNG state matters; 3 micro-batches per epoch, 2 per step.
    kwargs = dict(lora=LoraSettings(r=4, alpha=8, dropout=0.2), connector={**TINY_CONNECTOR, "dropout": 0.2})
    settings = dict(epochs=2, batch_size=2, grad_accum=2, save_every=1)
    straight = prepare_stage(stage_config(world, "stage2", tmp_path / "a", train=tiny_train(**settings), **kwargs))
    straight.run()

    broken = prepare_stage(stage_config(world, "stage2", tmp_path / "b", train=tiny_train(**settings), **kwargs))
    calls = {"n": 0}
    loss_fn = broken.loss_fn

    def failing(module, batch):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 4:  # dies inside the second optimizer step
            raise _Interrupt
        return loss_fn(module, batch)

    broken.loss_fn = failing
    with pytest.raises(_Interrupt):
        broken.run()
    assert load_state(tmp_path / "b" / "checkpoint" / "trainer", "trainer")["counters"]["step"] == 2

    resumed = prepare_stage(stage_config(world, "stage2", tmp_path / "b", train=tiny_train(**settings), **kwargs), resume=True)
    result = resumed.run()
    assert result.steps == 4
    a = straight.module.vlm
    b = resumed.module.vlm
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)


def test_resume_refuses_changed_options_and_overwrites(world: dict[str, Path], tmp_path: Path) -> None:
    run_stage(stage_config(world, "stage1", tmp_path / "s1", train=tiny_train(max_steps=1)))
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        run_stage(stage_config(world, "stage1", tmp_path / "s1", train=tiny_train(max_steps=1)))
    with pytest.raises(CheckpointError, match="train.lr"):
        run_stage(stage_config(world, "stage1", tmp_path / "s1", train=tiny_train(max_steps=1, lr=5e-4)), resume=True)
    with pytest.raises(CheckpointError, match="no run to resume"):
        run_stage(stage_config(world, "stage1", tmp_path / "new", train=tiny_train(max_steps=1)), resume=True)


def test_cli_reports_bad_input_clearly(world: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(tune_app, ["stage1", "--records", str(world["records"]), "--out", str(tmp_path / "x"),
                                      "--llm", str(tmp_path / "nowhere"), "--job", str(world["job"])])
    assert result.exit_code == 2
    assert "config.json" in result.output
    result = runner.invoke(tune_app, ["stage2", "--records", str(world["records"]), "--out", str(tmp_path / "y"),
                                      "--llm", str(world["llm"]), "--job", str(world["job"]), "--connector", "linear"])
    assert result.exit_code == 2 and "connector kind" in result.output


def test_warmup_stage1_stage2_ask_end_to_end(world: dict[str, Path], tmp_path: Path) -> None:
    """The embedded path through the CLI: the answers must depend on the slide."""
    # Letters only and a fixed option order: the tiny model here has 200 steps to tell two slides apart.
    common = ["--records", str(world["records"]), "--cpu", "--seed", "0", "--answer-style", "letter", "--no-shuffle-options"]
    result = runner.invoke(tune_app, ["warmup", *common, "--no-blind-warmup", "--out", str(tmp_path / "w"), "--vocab-size", "400", "--lm-hidden", "32",
                                      "--lm-layers", "1", "--lm-heads", "4", "--lm-ffn", "64", "--epochs", "60", "--max-steps", "60",
                                      "--batch-size", "10", "--lr", "1e-2"])
    assert result.exit_code == 0, result.output
    connector = ["--queries", "4", "--qformer-layers", "1", "--qformer-hidden", "32", "--qformer-heads", "4",
                 "--qformer-ffn", "64", "--connector-dropout", "0"]
    result = runner.invoke(tune_app, ["stage1", *common, "--out", str(tmp_path / "s1"), "--llm", str(tmp_path / "w"),
                                      "--job", str(world["job"]), "--encoder", str(world["encoder"]), *connector,
                                      "--epochs", "10", "--max-steps", "10", "--batch-size", "4", "--lr", "1e-3"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(tune_app, ["stage2", *common, "--out", str(tmp_path / "s2"), "--init", str(tmp_path / "s1"),
                                      "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0", "--epochs", "200",
                                      "--max-steps", "200", "--batch-size", "6", "--lr", "1e-2", "--warmup-ratio", "0"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s2" / "summary.json").read_text())
    assert summary["steps"] == 200 and summary["final_loss"] < 1.0

    records = {r.id: r for r in read_records(world["records"])}
    assistant = SlideAssistant(tmp_path / "s2", device="cpu", cache_root=tmp_path / "cache")
    visuals = {s: assistant.open_slide(s) for s in ("S1", "S2")}
    single = [records["S1-single"], records["S2-single"]]
    answers = assistant.answer_records(single, visuals, max_new_tokens=4)
    assert answers == ["A", "B"], answers  # same question, different slides, different answers

    question = "Is there a tumour?\nA. yes\nB. no"
    for slide, expected in (("S1", "A"), ("S2", "B")):
        result = runner.invoke(ask_app, [slide, question, "--checkpoint", str(tmp_path / "s2"), "--max-new-tokens", "4",
                                         "--device", "cpu", "--cache", str(tmp_path / "cache")])
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == expected  # the answer alone on stdout; where it caches goes to stderr
    # A new cache, so this session creates it and says where it is.
    result = runner.invoke(ask_app, ["S1", "--interactive", "--checkpoint", str(tmp_path / "s2"), "--device", "cpu", "--cache", str(tmp_path / "cache2"),
                                     "--max-new-tokens", "4"],
                           input=f"{question}\n/bbox 768,0,1600,768\nWhich are present?\n/bbox 90000,0,90001,1\n/quit\n")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "A"
    assert result.stderr.count("cache:") == 1, result.stderr  # said once per session, not per question
    assert "region: 768,0,1600,768" in result.output
    assert "intersects no tissue pack" in result.output
    result = runner.invoke(ask_app, ["S9", "hello", "--checkpoint", str(tmp_path / "s2"), "--device", "cpu", "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 2 and "neither a slide file nor a slide id" in result.output


def test_multi_turn_history_and_regions(world: dict[str, Path], tmp_path: Path) -> None:
    run_stage(stage_config(world, "stage2", tmp_path / "s2", train=tiny_train(max_steps=1)))
    assistant = SlideAssistant(tmp_path / "s2", device="cpu", cache_root=tmp_path / "cache")
    chat = assistant.conversation(assistant.open_slide("S1"))
    chat.ask("Describe the slide.", max_new_tokens=2)
    chat.ask("And the tumour?", max_new_tokens=2)
    chat.set_region((0, 0, 700, 700))
    chat.ask("Describe this region.", max_new_tokens=2)
    users = [m["content"] for m in chat.messages if m["role"] == "user"]
    assert [u.startswith("<image>") for u in users] == [True, False, True]
    assert len(chat.images) == 2
    # The whole slide (6 packs + global) for the first placeholder; one pack + global for the region.
    assert chat.images[0].tokens.shape[0] == 7 and chat.images[1].tokens.shape[0] == 2
    # The patch features ride along: every patch of the slide, then only those under the box.
    slide = chat.visual
    assert chat.images[0].patches.shape[0] == slide.patch_features.shape[0]
    under = int(boxes_intersecting(slide.patch_boxes, (0, 0, 700, 700)).numel())
    assert 0 < chat.images[1].patches.shape[0] == under < slide.patch_features.shape[0]
    chat.reset()
    assert chat.messages == [] and chat.images == []


def test_ask_from_a_raw_slide_file_preprocesses_it_once(world: dict[str, Path], tmp_path: Path) -> None:
    from slide_fixtures import write_aperio_slide

    from slidevl.features.config import PreprocessConfig
    from slidevl.features.pipeline import preprocess
    from slidevl.qa.records import VQARecord, write_records

    slides = tmp_path / "slides"
    slides.mkdir()
    slide = write_aperio_slide(slides / "liver.svs", 1536, 1024)
    train_job = tmp_path / "train_job"
    assert preprocess(slide, train_job, PreprocessConfig(workers=0, progress=False)).exit_code == 0
    dim = int(FeatureStore(train_job).load("liver").patch_features.shape[1])
    records = write_records(tmp_path / "qa.jsonl", [
        VQARecord("c", "liver", "WSI", "description", "caption", "Describe the slide.", "Two pieces of tissue."),
    ])
    cfg = stage_config(world, "stage1", tmp_path / "s1", records=str(records), job=str(train_job),
                       encoder=str(make_encoder_dir(tmp_path / "enc", dim)), train=tiny_train(max_steps=1))
    run_stage(cfg)

    ask_job = tmp_path / "ask_job"
    assistant = SlideAssistant(tmp_path / "s1", device="cpu", preprocess_workers=0, cache_root=tmp_path / "cache")
    first = assistant.open_slide(slide, job=ask_job)
    feature_file = next((ask_job / "features").rglob("liver.h5"))
    stamp = feature_file.stat().st_mtime_ns
    # Same settings as training, so the same features and the same visual tokens.
    trained = SlideAssistant(tmp_path / "s1", device="cpu", cache_root=tmp_path / "cache").open_slide("liver", job=train_job)
    torch.testing.assert_close(first.summary, trained.summary)
    again = SlideAssistant(tmp_path / "s1", device="cpu", preprocess_workers=0, cache_root=tmp_path / "cache").open_slide(slide, job=ask_job)
    assert feature_file.stat().st_mtime_ns == stamp  # skipped: already complete
    torch.testing.assert_close(first.summary, again.summary)
    assert isinstance(assistant.conversation(first).ask("Describe the slide.", max_new_tokens=3), str)


def test_encoder_outputs_are_cached_per_encoder_and_feature_file(world: dict[str, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from slidevl.slidellm.encoder import load_encoder
    from slidevl.slidellm.tuning import visual

    job = tmp_path / "job"
    shutil.copytree(world["job"], job)
    store = FeatureStore(job, FEATURE_ENCODER)
    calls: list[str] = []
    real = visual.encode_slide

    def counting(encoder, sf, **kw):  # noqa: ANN001, ANN003, ANN202
        calls.append(sf.slide_id)
        return real(encoder, sf, **kw)

    monkeypatch.setattr(visual, "encode_slide", counting)
    encoder = load_encoder(world["encoder"])
    first = visual.CachedVisuals(encoder, store, tmp_path / "cache").get("S1")
    again = visual.CachedVisuals(encoder, store, tmp_path / "cache").get("S1")
    assert calls == ["S1"]  # the second instance read the safetensors cache
    torch.testing.assert_close(first.summary, again.summary)
    assert torch.equal(first.pack_boxes, again.pack_boxes)
    # New features for the slide invalidate its entry.
    store.write(store.load("S1"), float16=True)
    visual.CachedVisuals(encoder, store, tmp_path / "cache").get("S1")
    assert calls == ["S1", "S1"]
    # Another encoder never reads this encoder's entries.
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)
    visual.CachedVisuals(encoder, store, tmp_path / "cache").get("S1")
    assert calls == ["S1", "S1", "S1"]


def test_full_llm_tuning_trains_every_llm_weight_and_round_trips(world: dict[str, Path], tmp_path: Path) -> None:
    run_stage(stage_config(world, "stage1", tmp_path / "s1", train=tiny_train(max_steps=1)))
    prepared = prepare_stage(stage_config(world, "stage2", tmp_path / "s2", init=str(tmp_path / "s1"),
                                          train=tiny_train(max_steps=2), llm_tuning="full"))
    trainable = _check_one_step(prepared, lambda n: n.startswith(("vlm.connector.", "vlm.llm.")))
    assert not any("lora_" in n for n in trainable)
    assert any(".embed_tokens." in n for n in trainable) and any(".q_proj." in n for n in trainable)
    prepared.run()
    folder = tmp_path / "s2" / "checkpoint"
    assert (folder / "llm" / "config.json").is_file() and not (folder / "adapter").exists()
    loaded = load_vlm(tmp_path / "s2")
    assert loaded.config.llm.tuning == "full" and loaded.config.llm.lora is None
    tuned = dict(prepared.module.vlm.llm.named_parameters())
    assert all(torch.equal(tuned[n], p) for n, p in loaded.model.llm.named_parameters())
    base = load_vlm(tmp_path / "s1").model.llm
    assert not all(torch.equal(tuned[n], p) for n, p in base.named_parameters())
    with pytest.raises(ValueError, match="llm_tuning"):
        TuneConfig(stage="stage2", records="r.jsonl", out="o", llm_tuning="half")
    with pytest.raises(ValueError, match="4-bit"):
        TuneConfig.from_dict(dict(stage="stage2", records="r.jsonl", out="o", llm_tuning="full",
                                  llm_options=dict(load_in_4bit=True)))


def test_connector_standardisers_are_fitted_once_on_the_training_slides(world: dict[str, Path], tmp_path: Path) -> None:
    s1 = prepare_stage(stage_config(world, "stage1", tmp_path / "s1", train=tiny_train(max_steps=1)))
    connector = s1.module.vlm.connector
    assert connector.config.reads_patches
    for std in (connector.standardize, connector.patch_standardize):
        assert bool((std.scale != 1.0).any()) and bool(std.mean.abs().sum() > 0)
    assert connector.patch_standardize.per_dim and not connector.standardize.per_dim
    s1.run()
    # Stage 2 keeps the stage-1 statistics instead of refitting them.
    s2 = prepare_stage(stage_config(world, "stage2", tmp_path / "s2", init=str(tmp_path / "s1"), train=tiny_train(max_steps=1)))
    for name in ("standardize", "patch_standardize"):
        a, b = getattr(connector, name), getattr(s2.module.vlm.connector, name)
        assert torch.equal(a.mean, b.mean) and torch.equal(a.scale, b.scale)


def test_a_stage2_checkpoint_as_init_continues_its_adapters(world: dict[str, Path], tmp_path: Path) -> None:
    run_stage(stage_config(world, "stage2", tmp_path / "s2", train=tiny_train(max_steps=2)))
    trained = {n: p for n, p in load_vlm(tmp_path / "s2").model.llm.named_parameters() if "lora_B" in n}
    # Fresh LoRA starts with B = 0; two steps moved it.
    assert trained and any(bool(p.abs().sum() > 0) for p in trained.values())
    more = prepare_stage(stage_config(world, "stage2", tmp_path / "s2b", init=str(tmp_path / "s2"), train=tiny_train(max_steps=1)))
    continued = dict(more.module.vlm.llm.named_parameters())
    assert all(torch.equal(continued[n], p) and continued[n].requires_grad for n, p in trained.items())
    for stage, extra in (("stage1", {}), ("stage2", {"llm_tuning": "full"})):
        with pytest.raises(ValueError, match="only a stage-2 run with LoRA"):
            prepare_stage(stage_config(world, stage, tmp_path / f"bad_{stage}", init=str(tmp_path / "s2"),
                                       train=tiny_train(max_steps=1), **extra))


def test_a_continued_run_may_change_only_how_the_connector_reads(world: dict[str, Path], tmp_path: Path) -> None:
    mlp = {**TINY_CONNECTOR, "kind": "mlp"}
    run_stage(stage_config(world, "stage2", tmp_path / "s2", connector=mlp, train=tiny_train(max_steps=1)))
    before = load_vlm(tmp_path / "s2").model.connector.state_dict()
    more = prepare_stage(stage_config(world, "stage2", tmp_path / "s2b", init=str(tmp_path / "s2"),
                                      connector={"pooled_tokens": True}, train=tiny_train(max_steps=1)))
    connector = more.module.vlm.connector
    assert connector.config.pooled_tokens and connector.config.kind == "mlp"
    assert all(torch.equal(before[k], v) for k, v in connector.state_dict().items())
    more.run()
    assert load_vlm(tmp_path / "s2b").model.connector.config.pooled_tokens
    with pytest.raises(ValueError, match="fixes the connector"):
        prepare_stage(stage_config(world, "stage2", tmp_path / "bad", init=str(tmp_path / "s2"),
                                   connector={"hidden_size": 64}, train=tiny_train(max_steps=1)))


def test_a_continued_run_may_switch_shared_patch_scaling_to_per_dimension(world: dict[str, Path], tmp_path: Path) -> None:
    shared = {**TINY_CONNECTOR, "kind": "mlp", "patch_scaling": "shared"}
    run_stage(stage_config(world, "stage2", tmp_path / "s2", connector=shared, train=tiny_train(max_steps=1)))
    before = load_vlm(tmp_path / "s2").model.connector
    assert not before.patch_standardize.per_dim
    more = prepare_stage(stage_config(world, "stage2", tmp_path / "s2b", init=str(tmp_path / "s2"),
                                      connector={"patch_scaling": "per_dim"}, train=tiny_train(max_steps=1)))
    connector = more.module.vlm.connector
    assert connector.config.patch_scaling == "per_dim" and connector.patch_standardize.per_dim
    torch.testing.assert_close(connector.patch_standardize.mean, before.patch_standardize.mean)
    # The projection absorbed the change of scale: weight * (old scale / new scale) per input dimension.
    factor = before.patch_standardize.scale / connector.patch_standardize.scale
    torch.testing.assert_close(connector.patch_proj.weight, before.patch_proj.weight / factor[None, :], rtol=1e-5, atol=1e-6)
    more.run()
    assert load_vlm(tmp_path / "s2b").model.connector.patch_standardize.per_dim
    with pytest.raises(ValueError, match="cannot go back"):
        prepare_stage(stage_config(world, "stage2", tmp_path / "bad", init=str(tmp_path / "s2b"),
                                   connector={"patch_scaling": "shared"}, train=tiny_train(max_steps=1)))


def test_a_run_logged_to_a_file_reports_its_progress_in_lines(world: dict[str, Path], tmp_path: Path, capsys) -> None:
    run_stage(stage_config(world, "stage1", tmp_path / "s1", train=tiny_train(max_steps=2)))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("stage1: step")]
    assert [line.split(",")[0] for line in lines] == ["stage1: step 1/2", "stage1: step 2/2"]
    assert all(" loss " in line and line.endswith(" min") for line in lines)


@pytest.mark.parametrize("connector", [TINY_CONNECTOR, {"kind": "mlp", "dropout": 0.0}], ids=["qformer", "mlp"])
def test_sequence_lengths_are_the_lengths_the_llm_sees(world: dict[str, Path], tmp_path: Path, connector) -> None:  # noqa: ANN001
    # The length-grouped batches (on by default) sort records by these lengths: each must be
    # the row the LLM gets once the image placeholder is replaced by the connector's output.
    prepared = prepare_stage(stage_config(world, "stage2", tmp_path / "s2", train=tiny_train(max_steps=1), connector=connector))
    module, dataset = prepared.module, prepared.dataset
    assert prepared.lengths is not None and len(prepared.lengths) == len(dataset)
    seen = []
    with torch.no_grad():
        for i in range(len(dataset)):
            batch = prepared.collate([dataset[i]])
            visual = [module.vlm.visual_input(module.visuals.get(s), box) for s, box in zip(batch.slides, batch.bboxes)]
            _, mask, _ = module.vlm.splice(batch.input_ids, batch.attention_mask, [[v] for v in module.vlm.visual_embeds(visual)])
            seen.append(int(mask.sum()))
    assert prepared.lengths == seen
    if connector["kind"] == "mlp":
        assert len(set(seen)) > 1  # whole-slide and region questions read different numbers of tokens
    off = prepare_stage(stage_config(world, "stage2", tmp_path / "off", train=tiny_train(max_steps=1, group_by_length=False)))
    assert off.lengths is None


def test_a_connector_with_positions_learns_them_and_keeps_them(world: dict[str, Path], tmp_path: Path) -> None:
    connector = {"kind": "mlp", "dropout": 0.0, "positions": True}
    prepared = prepare_stage(stage_config(world, "stage1", tmp_path / "s1", train=tiny_train(max_steps=2), connector=connector))
    prepared.run()
    weight = prepared.module.vlm.connector.position.proj.weight
    assert weight.abs().sum() > 0  # moved from its zero start: the places reach the loss
    loaded = load_vlm(tmp_path / "s1").model.connector
    assert loaded.config.positions and torch.equal(loaded.position.proj.weight, weight)
