"""MoCo on summary tokens: grid-adjacent positives, never a same-slide negative."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slidevl.slidellm.encoder import TopoPackConfig
from slidevl.slidellm.encoder.synthetic import synthetic_slide
from slidevl.slidellm.pretrain import (
    MoCoQueue,
    MomentumNetworks,
    PretrainConfig,
    PretrainModel,
    moco_logits,
    moco_loss,
    negative_mask,
    pick_positives,
    slide_key,
)
from slidevl.slidellm.pretrain import trainer as trainer_mod
from slidevl.slidellm.pretrain.moco import EMPTY_SLIDE, momentum_update


def _unit(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_negative_mask_excludes_same_slide_and_empty_entries() -> None:
    q_slides = torch.tensor([1, 1, 2])
    neg_slides = torch.tensor([1, 2, 3, EMPTY_SLIDE, 2])
    use = negative_mask(q_slides, neg_slides)
    assert use.tolist() == [[False, True, True, False, True], [False, True, True, False, True], [True, False, True, False, False]]


def test_same_slide_entries_never_change_the_loss() -> None:
    q, k = _unit(4, seed=1), _unit(4, seed=2)
    q_slides = torch.full((4,), 7)
    others, other_slides = _unit(6, seed=3), torch.tensor([1, 2, 3, 1, 2, 3])
    base, _ = moco_loss(q, k, q_slides, others, other_slides)
    # add copies of the queries themselves (maximally "hard") and more keys, all from slide 7
    polluted = torch.cat([others, q, _unit(5, seed=4)])
    polluted_slides = torch.cat([other_slides, torch.full((9,), 7)])
    loss, stats = moco_loss(q, k, q_slides, polluted, polluted_slides)
    torch.testing.assert_close(loss, base)
    assert stats["moco_negatives"] == 6.0
    # while the same entries from another slide do change it
    loss_other, _ = moco_loss(q, k, q_slides, polluted, torch.cat([other_slides, torch.full((9,), 5)]))
    assert loss_other > base + 1e-3


def test_logits_put_the_positive_first() -> None:
    q = _unit(3, seed=5)
    logits, use = moco_logits(q, q, torch.tensor([1, 2, 3]), _unit(4, seed=6), torch.tensor([1, 1, 2, 3]), temperature=0.5)
    torch.testing.assert_close(logits[:, 0], torch.full((3,), 2.0))
    assert torch.isinf(logits[0, 1:3]).all() and logits[0, 3:].isfinite().all()
    assert use.sum().item() == 2 + 3 + 3


def test_positives_are_grid_neighbours_regardless_of_sequence_order() -> None:
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([[c, r] for r in range(6) for c in range(6)])
    perm = torch.randperm(len(grid), generator=g)
    key_origin = grid[perm]  # another view lists the same packs in a different order
    queries = grid[torch.randperm(len(grid), generator=g)[:20]]
    for prob in (0.0, 0.5, 1.0):
        pos = pick_positives(queries, key_origin, torch.ones(len(grid), dtype=torch.bool), g, same_pack_prob=prob)
        assert (pos >= 0).all()
        dist = (key_origin[pos] - queries).abs().amax(1)
        assert (dist <= 1).all()
        if prob == 1.0:
            assert (dist == 0).all()
        if prob == 0.0:
            assert (dist == 1).all()  # every pack here has neighbours
    # the sequence neighbour of a pack is not a grid neighbour: row ends wrap
    end_of_row = torch.tensor([[5, 0]])
    pos = pick_positives(end_of_row, key_origin, torch.ones(len(grid), dtype=torch.bool), g, same_pack_prob=0.0)
    assert key_origin[pos[0]].tolist() != [0, 1]


def test_positive_fallbacks() -> None:
    g = torch.Generator().manual_seed(1)
    keys = torch.tensor([[0, 0], [5, 5], [9, 9]])
    valid = torch.tensor([True, True, False])
    # isolated pack, neighbours wanted: falls back to itself; absent pack with no neighbour: -1
    pos = pick_positives(torch.tensor([[5, 5], [9, 9], [1, 1]]), keys, valid, g, same_pack_prob=0.0)
    assert pos.tolist() == [1, -1, 0]


def test_queue_is_a_ring_buffer_that_remembers_slides() -> None:
    queue = MoCoQueue(5, 2)
    queue.enqueue(torch.ones(3, 2), torch.tensor([1, 1, EMPTY_SLIDE]))
    assert queue.slides.tolist() == [1, 1, -1, -1, -1] and int(queue.ptr) == 2
    queue.enqueue(2 * torch.ones(4, 2), torch.tensor([2, 3, 4, 5]))
    assert queue.slides.tolist() == [5, 1, 2, 3, 4] and int(queue.ptr) == 1
    assert queue.features[0, 0] == 2 and queue.features[1, 0] == 1


def test_slide_key_is_stable() -> None:
    assert slide_key("TCGA-XX-0001") == slide_key("TCGA-XX-0001") != slide_key("TCGA-XX-0002")
    assert slide_key("a") >= 0


def test_momentum_update() -> None:
    online, target = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = target.weight.detach().clone()
    momentum_update(online, target, 0.9)
    torch.testing.assert_close(target.weight, 0.9 * before + 0.1 * online.weight.detach())


def test_training_step_never_uses_same_slide_negatives(monkeypatch) -> None:
    """Run the real MoCo step with a queue full of one slide's keys and inspect the loss inputs."""
    torch.manual_seed(0)
    ecfg = TopoPackConfig(patch_dim=32, pack_dim=24, global_dim=16, d_model=32, n_layers=1, n_heads=4, ffn_dim=64, dropout=0.0)
    cfg = PretrainConfig(moco_queue=32, moco_enqueue=4, moco_queries=16, max_packs=30, moco_dim=16)
    model = PretrainModel(ecfg, cfg)
    momentum = MomentumNetworks(model, cfg)
    a = synthetic_slide(9, 9, seed=1, slide_id="slide-A").batch
    b = synthetic_slide(9, 9, seed=2, slide_id="slide-B").batch
    # a queue holding keys from slide A only
    momentum.queue.enqueue(_unit(20, 16, seed=9), torch.full((20,), slide_key("slide-A")))
    seen = {}

    def spy(q, k_pos, query_slides, negatives, negative_slides, temperature):
        seen.update(q_slides=query_slides.clone(), neg_slides=negative_slides.clone())
        return moco_loss(q, k_pos, query_slides, negatives, negative_slides, temperature)

    monkeypatch.setattr(trainer_mod, "moco_loss", spy)
    g = torch.Generator().manual_seed(0)
    loss, stats = trainer_mod.moco_forward(model, momentum, [a, b], cfg, g, torch.device("cpu"))
    q_slides, neg_slides = seen["q_slides"], seen["neg_slides"]
    assert set(q_slides.tolist()) == {slide_key("slide-A"), slide_key("slide-B")}
    use = negative_mask(q_slides, neg_slides)
    same = q_slides[:, None] == neg_slides[None, :]
    assert not (use & same).any()
    # not vacuous: slide B queries do use slide A's queue entries and slide A's batch keys
    is_b = q_slides == slide_key("slide-B")
    assert use[is_b][:, :32].sum(1).min() >= 20
    n_a = int((q_slides == slide_key("slide-A")).sum())
    expected = (n_a * int(is_b.sum()) + int(is_b.sum()) * (20 + n_a)) / len(q_slides)
    assert abs(stats["moco_negatives"] - expected) < 1e-4
    loss.backward()
    # the keys of this step went into the queue, labelled with their slides
    assert (momentum.queue.slides == slide_key("slide-B")).sum() == 4
