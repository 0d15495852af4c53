"""The representation stage: BLIP-2's ITC/ITM/ITG losses on the connector's Q-Former, its
masks, its hard negatives, and the stage's checkpoint feeding stage 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_slidellm_fixtures import TINY_CONNECTOR, stage_config, tiny_train
from typer.testing import CliRunner

from slidevl.slidellm.connector import ConnectorConfig, QFormerConnector
from slidevl.slidellm.qformer_pretrain import (
    RepresentationHeads,
    hard_negative_pairs,
    multimodal_causal_mask,
    representation_losses,
    run_qformer,
)
from slidevl.slidellm.tuning.cli import app as tune_app
from slidevl.slidellm.tuning.represent import EVAL_NAME, HEADS_NAME, prepare_represent, run_represent
from slidevl.slidellm.tuning.stages import prepare_stage
from slidevl.slidellm.tuning.state import load_state

# The shared tiny job, encoder, records and LLM (the ``world`` fixture).
pytest_plugins = ("test_slidellm_fixtures",)
runner = CliRunner()
N_QUERY = 4


def _tiny(layers: int = 2, seed: int = 0) -> tuple[QFormerConnector, RepresentationHeads]:
    torch.manual_seed(seed)
    connector = QFormerConnector(ConnectorConfig(vision_dim=16, llm_dim=8, hidden_size=32, num_layers=layers, num_heads=4,
                                                 intermediate_size=64, num_queries=N_QUERY, dropout=0.0,
                                                 use_patches=False))
    return connector, RepresentationHeads(connector, vocab_size=40, max_text_tokens=8)


def _batch(n: int = 4, length: int = 6) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    image = torch.randn(n, 5, 16, generator=g)
    image_valid = torch.ones(n, 5, dtype=torch.bool)
    image_valid[0, 3:] = False
    ids = torch.randint(0, 40, (n, length), generator=g)
    text_valid = torch.ones(n, length, dtype=torch.bool)
    text_valid[1, 4:] = False
    return image, image_valid, ids, text_valid


def test_without_text_it_is_the_connectors_own_qformer() -> None:
    connector, heads = _tiny()
    connector.eval()
    image, valid, _, _ = _batch()
    queries = connector.queries.expand(len(image), -1, -1)
    expected = connector.qformer(query_embeds=queries, encoder_hidden_states=image,
                                 encoder_attention_mask=valid.long()).last_hidden_state
    ours = run_qformer(connector, heads, queries, torch.ones(len(image), N_QUERY, N_QUERY, dtype=torch.bool), N_QUERY,
                       image, valid)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_itg_mask_text_sees_queries_and_its_past_queries_never_see_text() -> None:
    connector, heads = _tiny()
    connector.eval()
    image, valid, ids, text_valid = _batch()
    hidden = torch.cat([connector.queries.expand(len(image), -1, -1), heads.embed_text(ids, heads.dec_token)], dim=1)
    mask = multimodal_causal_mask(N_QUERY, text_valid)

    def run(x: torch.Tensor, img: torch.Tensor = image) -> torch.Tensor:
        return run_qformer(connector, heads, x, mask, N_QUERY, img, valid)

    base = run(hidden)
    # Text position 3 (after [DEC], words 0..2) changes: everything before it stays, it and later text move.
    k = N_QUERY + 3
    moved = hidden.clone()
    # Random, not constant: the Q-Former's input LayerNorm would remove a constant shift.
    moved[0, k] += torch.randn(moved.shape[-1])
    out = run(moved)
    torch.testing.assert_close(out[0, :k], base[0, :k], rtol=0, atol=1e-6)
    assert (out[0, k:] - base[0, k:]).abs().amax(-1).min() > 1e-4
    # Any change of the text leaves every query output as it was.
    noisy = hidden.clone()
    noisy[:, N_QUERY:] += torch.randn_like(noisy[:, N_QUERY:])
    torch.testing.assert_close(run(noisy)[:, :N_QUERY], base[:, :N_QUERY], rtol=0, atol=1e-6)
    # Text reads the queries: changing them moves every text output, [DEC] included.
    queried = hidden.clone()
    queried[:, :N_QUERY] += torch.randn_like(queried[:, :N_QUERY])
    assert (run(queried)[:, N_QUERY:] - base[:, N_QUERY:]).abs().amax(-1).min() > 1e-3
    # A padded text token is seen by nobody: row 1 has words 4.. padded (positions 5.. after [DEC]).
    padded = hidden.clone()
    padded[1, N_QUERY + 5:] += torch.randn_like(padded[1, N_QUERY + 5:])
    torch.testing.assert_close(run(padded)[1, : N_QUERY + 5], base[1, : N_QUERY + 5], rtol=0, atol=1e-6)


def test_hard_negatives_are_never_positives_and_follow_the_similarity() -> None:
    torch.manual_seed(0)
    # Captions 0 and 1 are the same text (both positives of images 0 and 1); 3 belongs to image 3 only.
    positives = torch.eye(4, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True
    similarity = torch.zeros(4, 4)
    similarity[2, 3] = 8.0  # image 2's hardest wrong caption is 3
    counts = torch.zeros(4, 4)
    for _ in range(200):
        pairs = hard_negative_pairs(similarity, positives)
        assert len(pairs) == 8  # one caption per image and one image per caption
        assert not positives[pairs[:, 0], pairs[:, 1]].any()
        for i, j in pairs.tolist():
            counts[i, j] += 1
    assert counts[2, 3] > 0.9 * counts[2].sum() / 2
    # A row whose every entry is a positive gets no negative.
    assert len(hard_negative_pairs(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool))) == 0


def test_losses_are_finite_and_fall_on_a_tiny_batch() -> None:
    connector, heads = _tiny(layers=1)
    image, valid, ids, text_valid = _batch()
    positives = torch.eye(len(image), dtype=torch.bool)
    optimizer = torch.optim.AdamW([*connector.parameters(), *heads.parameters()], lr=3e-3)
    history = []
    # ITM learns last (as in BLIP-2): it needs queries that already tell the images apart.
    for _ in range(120):
        losses = representation_losses(connector, heads, image, valid, ids, text_valid, positives)
        values = [losses.itc.detach(), losses.itm.detach(), losses.itg.detach()]
        assert all(torch.isfinite(v) for v in values)
        history.append(values)
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
    first, last = torch.tensor(history[:10]).mean(0), torch.tensor(history[-10:]).mean(0)
    assert (last < 0.6 * first).all(), (first, last)
    # The queries learnt from it (they are what carries into stage 1).
    assert connector.queries.grad is not None and connector.queries.grad.abs().sum() > 0


def _represent_cfg(world: dict[str, Path], out: Path, **train: object):  # noqa: ANN202
    return stage_config(world, "represent", out, train=tiny_train(**train))


def test_the_stage_feeds_stage1_with_its_qformer(world: dict[str, Path], tmp_path: Path) -> None:
    # The same seed builds the same initial connector the run below starts from.
    fresh = prepare_represent(_represent_cfg(world, tmp_path / "fresh", max_steps=2)).module
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert any(n.startswith("connector.qformer.") for n in trainable) and "connector.queries" in trainable
    assert not any(n.startswith("connector.proj.") for n in trainable)  # stage 1 trains the LLM projection
    run_represent(_represent_cfg(world, tmp_path / "rep", max_steps=2))
    saved = load_file(str(tmp_path / "rep" / "checkpoint" / "connector.safetensors"))
    moved = [n for n, p in fresh.connector.state_dict().items() if not torch.equal(p, saved[n])]
    assert "queries" in moved and any(n.startswith("qformer.") for n in moved) and not any(n.startswith("proj.") for n in moved)

    result = runner.invoke(tune_app, ["stage1", "--records", str(world["records"]), "--out", str(tmp_path / "s1"),
                                      "--init", str(tmp_path / "rep"), "--max-steps", "1", "--batch-size", "2", "--cpu"])
    assert result.exit_code == 0, result.output
    stage1 = prepare_stage(stage_config(world, "stage1", tmp_path / "s1b", init=str(tmp_path / "rep"),
                                        train=tiny_train(max_steps=1)))
    loaded = stage1.module.vlm.connector.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    # Stage 1 goes on training the carried Q-Former (and nothing of the stage's heads comes with it).
    trainable = {n for n, p in stage1.module.named_parameters() if p.requires_grad}
    assert "vlm.connector.queries" in trainable and any(".qformer." in n for n in trainable)
    assert not any("text_proj" in n or "itm_head" in n for n in dict(stage1.module.named_parameters()))

    scores = json.loads((tmp_path / "rep" / EVAL_NAME).read_text())
    assert scores["captions"] == 4 and 0 < scores["top1_by_chance"] < 1
    assert all(scores[k] >= 0 and scores[k] == scores[k] for k in ("itc", "itm", "itg"))


class _Interrupt(RuntimeError):
    pass


def test_resume_continues_exactly_where_the_stage_stopped(world: dict[str, Path], tmp_path: Path) -> None:
    # Dropout on and hard negatives drawn at random: the restored RNG state matters.
    connector = {**TINY_CONNECTOR, "dropout": 0.2}
    settings = dict(epochs=2, batch_size=2, grad_accum=1, save_every=1)
    straight = prepare_represent(stage_config(world, "represent", tmp_path / "a", connector=connector,
                                              train=tiny_train(**settings)))
    straight.run()

    broken = prepare_represent(stage_config(world, "represent", tmp_path / "b", connector=connector,
                                            train=tiny_train(**settings)))
    calls = {"n": 0}
    loss_fn = broken.loss_fn

    def failing(module, batch):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Interrupt
        return loss_fn(module, batch)

    broken.loss_fn = failing
    with pytest.raises(_Interrupt):
        broken.run()
    assert load_state(tmp_path / "b" / "checkpoint" / "trainer", "trainer")["counters"]["step"] == 2
    assert (tmp_path / "b" / "checkpoint" / HEADS_NAME).is_file()

    resumed = prepare_represent(stage_config(world, "represent", tmp_path / "b", connector=connector,
                                             train=tiny_train(**settings)), resume=True)
    assert resumed.run().steps == 4
    for (name, a), b in zip(straight.module.named_parameters(), resumed.module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_bad_input_is_refused_clearly(world: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(tune_app, ["represent", "--records", str(world["records"]), "--out", str(tmp_path / "m"),
                                      "--llm", str(world["llm"]), "--job", str(world["job"]), "--encoder",
                                      str(world["encoder"]), "--connector", "mlp", "--cpu"])
    assert result.exit_code == 2 and "trains a Q-Former" in result.output
    result = runner.invoke(tune_app, ["represent", "--records", str(world["records"]), "--out", str(tmp_path / "n"),
                                      "--job", str(world["job"]), "--cpu"])
    assert result.exit_code == 2 and "--llm" in result.output


def test_the_recipe_runs_the_representation_stage_before_stage1_of_a_qformer(world: dict[str, Path], tmp_path: Path) -> None:
    from slidevl.slidellm.recipe import RecipeSizes, train_vqa

    qa = tmp_path / "qa"
    qa.mkdir()
    (qa / "train.jsonl").write_text(world["records"].read_text())
    sizes = RecipeSizes(mae_steps=1, moco_steps=1, warmup_epochs=1, represent_epochs=1, stage1_epochs=1, stage2_epochs=1,
                        batch_size=2, encoder=dict(d_model=16, n_layers=1, n_heads=2, ffn_dim=32), connector=dict(TINY_CONNECTOR))
    outputs = train_vqa(world["job"], qa, tmp_path / "run", sizes, progress=False)
    assert outputs.represent == tmp_path / "run" / "represent"
    assert list(outputs.summaries) == ["warmup", "represent", "stage1", "stage2"]
    stage1 = json.loads((outputs.stage1 / "run.json").read_text())
    assert stage1["init"] == str(outputs.represent) and stage1["connector"] == {}
    assert (outputs.represent / EVAL_NAME).is_file()
