"""HiLa modules: prompt banks and text encoders, OPL, CLP, MCL, the ablation variants."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slidevl.features.encoders.base import EncoderError
from slidevl.features.encoders.text import encode_texts
from slidevl.survival.data import PatientBag
from slidevl.survival.hila.clp import CrossLevelPropagation
from slidevl.survival.hila.mcl import MutualContrastive, info_nce
from slidevl.survival.hila.model import VARIANTS, HiLa
from slidevl.survival.hila.opl import OptimalPromptLearning, keep_count
from slidevl.survival.hila.prompts import (
    PromptError,
    available_banks,
    encode_bank,
    load_prompt_bank,
)
from slidevl.survival.sinkhorn import sinkhorn_log


def _bag(n: int = 50, r: int = 6, dim: int = 12, rdim: int = 8, seed: int = 0, key: int = 0) -> PatientBag:
    g = torch.Generator().manual_seed(seed)
    return PatientBag("P", key, torch.randn(n, dim, generator=g), torch.randint(0, r, (n,), generator=g),
                      torch.randn(r, rdim, generator=g), [])


def _prompts(levels: int = 4, per_level: int = 3, dim: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(levels, per_level, dim, generator=g), torch.ones(levels, per_level, dtype=torch.bool)


# --- prompt banks and text encoders -------------------------------------------------

@pytest.mark.parametrize("name", ["synthetic", "brca", "luad", "ucec"])
def test_shipped_banks_have_patch_and_region_prompts_per_level(name: str) -> None:
    assert name in available_banks()
    bank = load_prompt_bank(name)
    assert bank.n_levels == 4
    for scale in ("patch", "region"):
        assert all(len(level) >= 3 for level in bank.scale(scale))
        flat = [t for level in bank.scale(scale) for t in level]
        assert len(set(flat)) == len(flat), "duplicate prompts"


def test_bank_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(PromptError, match="unknown prompt bank 'nope'"):
        load_prompt_bank("nope")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"levels": [{"patch": ["a"], "region": []}, {"patch": ["b"], "region": ["c"]}]}))
    with pytest.raises(PromptError, match=r"bad.json: level 0 needs a non-empty 'region' list"):
        load_prompt_bank(bad)
    bad.write_text("{not json")
    with pytest.raises(PromptError, match="not valid JSON"):
        load_prompt_bank(bad)


def test_minilm_embeds_the_synthetic_bank_offline() -> None:
    bank = load_prompt_bank("synthetic")
    enc = encode_bank(bank, "patch")
    assert enc.embeddings.shape == (4, 4, 384) and enc.mask.all()
    norms = np.linalg.norm(enc.embeddings, axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    # Related pathology text sits closer than unrelated text.
    e = encode_texts(["coagulative tumour necrosis", "necrotic tumour tissue with cell debris", "mature adipose tissue"])
    assert e[0] @ e[1] > e[0] @ e[2]


def _tiny_clip(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "tumour", "necrosis", "lymphocytes", "grade", "fat", "stroma"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)
    config = CLIPTextConfig(vocab_size=len(words), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                            num_attention_heads=2, projection_dim=16, max_position_embeddings=32,
                            pad_token_id=0, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    CLIPTextModelWithProjection(config).save_pretrained(path)


def test_clip_text_tower_from_local_folder(tmp_path: Path) -> None:
    _tiny_clip(tmp_path / "clip")
    e = encode_texts(["tumour necrosis grade", "fat stroma", "lymphocytes"], f"clip:{tmp_path / 'clip'}")
    assert e.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(e[0], e[1])
    with pytest.raises(EncoderError, match="text tower folder not found"):
        encode_texts(["x"], f"clip:{tmp_path / 'missing'}")
    with pytest.raises(EncoderError, match="unknown text encoder"):
        encode_texts(["x"], "bert")


# --- OPL ---------------------------------------------------------------------------

def test_opl_keeps_top_ratio_by_plan_weighted_similarity() -> None:
    text, mask = _prompts()
    opl = OptimalPromptLearning(text, mask, 12, ratio=0.6, max_iter=500, tol=1e-9)
    tokens = torch.randn(50, 12, requires_grad=True)
    out = opl(tokens)
    assert len(out.keep) == keep_count(50, 0.6) == 30
    # Recompute the plan independently: one OT problem per risk level.
    prompts = opl.prompts().detach()
    sim = torch.einsum("lpd,md->lpm", prompts, torch.nn.functional.normalize(tokens.detach(), dim=-1))
    plan = sinkhorn_log(1 - sim, 0.1, max_iter=500, tol=1e-9).plan
    torch.testing.assert_close(out.scores.detach(), (plan * sim).sum(dim=(1, 2)), rtol=1e-5, atol=1e-6)
    # With uniform marginals every column of a converged plan has mass 1/M ...
    torch.testing.assert_close(plan.sum(dim=1), torch.full((4, 50), 1 / 50), rtol=1e-4, atol=1e-7)
    # ... so tokens are ranked by their share of plan ⊙ similarity.
    alignment = (plan * sim).sum(dim=1).mean(dim=0) * 50
    torch.testing.assert_close(out.alignment, alignment, rtol=1e-5, atol=1e-6)
    assert set(out.keep.tolist()) == set(torch.topk(alignment, 30).indices.tolist())
    assert torch.equal(out.prompt_index, plan.reshape(-1, 50).argmax(dim=0))
    out.scores.sum().backward()
    assert tokens.grad is not None and opl.text_proj.weight.grad is not None


def test_opl_handles_uneven_prompt_counts() -> None:
    text, mask = _prompts(levels=3, per_level=4)
    mask[1, 2:] = False
    out = OptimalPromptLearning(text, mask, 12)(torch.randn(40, 12))
    matched = out.prompt_index.tolist()
    assert all(i not in (6, 7) for i in matched), "padded prompts must never be matched"
    assert torch.isfinite(out.scores).all()


def test_single_prompt_variant_uses_mean_cosine() -> None:
    text, mask = _prompts()
    opl = OptimalPromptLearning(text, mask, 12, use_ot=False)
    tokens = torch.randn(30, 12)
    out = opl(tokens)
    sim = torch.nn.functional.normalize(tokens, dim=-1) @ opl.prompts()[:, 0].T  # (M, L)
    torch.testing.assert_close(out.scores, sim.mean(dim=0))
    assert out.n_iter == 0 and len(out.keep) == 18
    assert set((out.prompt_index % 3).tolist()) == {0}


# --- CLP and MCL ---------------------------------------------------------------------

def test_clp_gates_regions_and_leaves_empty_regions_to_their_own_token() -> None:
    clp = CrossLevelPropagation(6)
    kept = torch.randn(5, 6)
    region_of = torch.tensor([0, 0, 2, 2, 2])
    regions = torch.randn(4, 6)
    out = clp(kept, region_of, regions)
    mean0 = kept[:2].mean(0)
    gate0 = torch.sigmoid(clp.gate(torch.cat([mean0, regions[0]])))
    torch.testing.assert_close(out[0], gate0 * torch.tanh(mean0) + (1 - gate0) * torch.tanh(regions[0]))
    torch.testing.assert_close(out[1], torch.tanh(regions[1]))
    torch.testing.assert_close(out[3], torch.tanh(regions[3]))


def test_info_nce_matches_formula() -> None:
    q, pos = torch.nn.functional.normalize(torch.randn(2, 8), dim=1)
    neg = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    logits = torch.cat([(q @ pos).view(1), neg @ q]) / 0.07
    expected = -(logits[0] - torch.logsumexp(logits, 0))
    torch.testing.assert_close(info_nce(q, pos, neg, 0.07), expected)


def test_mcl_queue_never_uses_the_patient_as_its_own_negative() -> None:
    mcl = MutualContrastive(8, proj_dim=4, queue_size=3, momentum=0.5).train()
    first = mcl(torch.randn(8), torch.randn(8), owner=7)
    assert float(first.detach()) == pytest.approx(0.0, abs=1e-6)  # empty queue: the positive is the only candidate
    mcl(torch.randn(8), torch.randn(8), owner=7)
    assert float(mcl(torch.randn(8), torch.randn(8), owner=7).detach()) == pytest.approx(0.0, abs=1e-6)
    loss = mcl(torch.randn(8), torch.randn(8), owner=8)  # another patient sees patient 7's keys
    assert float(loss.detach()) > 0
    assert mcl.queue_owner.tolist() == [8, 7, 7] and int(mcl.queue_ptr) == 1  # ring buffer wrapped
    loss.backward()
    assert mcl.patch_head[0].weight.grad is not None and mcl.patch_head_k[0].weight.grad is None


# --- the model ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_run_and_switch_modules(variant: str) -> None:
    (pt, pm), (rt, rm) = _prompts(seed=1), _prompts(per_level=2, seed=2)
    model = HiLa(12, 8, pt, pm, rt, rm, n_bins=4, variant=variant, dim=16).train()
    flags = VARIANTS[variant]
    assert hasattr(model, "region_opl") == flags["use_region"]
    assert hasattr(model, "clp") == (flags["use_region"] and flags["use_clp"])
    assert hasattr(model, "mcl") == (flags["use_region"] and flags["use_mcl"])
    assert model.patch_opl.use_ot == flags["use_ot"]
    bag = _bag()
    out = model(bag, evidence=True)
    assert out.logits.shape == (4,)
    assert (out.aux_loss is not None) == hasattr(model, "mcl")
    loss = out.logits.sum() + (out.aux_loss if out.aux_loss is not None else 0)
    loss.backward()
    patch = out.evidence["patch"]
    assert patch["kept"].sum() == keep_count(50, 0.6) and patch["prompt_index"].shape == (50,)
    assert ("region" in out.evidence) == flags["use_region"]
    if flags["use_region"]:
        assert out.evidence["region"]["kept"].shape == (6,)
    model.eval()
    assert model(bag).aux_loss is None  # contrastive term only while training
