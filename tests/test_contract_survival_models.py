"""The contract every registered survival model keeps, checked for each entry of the registry.

A model added with ``@SURVIVAL_MODELS.register(NAME)`` is picked up here without editing
this file: it must give ``(n_bins,)`` logits for a bag, train through the project's
training loop, come back identical from a checkpoint, and, when it declares
``gives_evidence``, return evidence that :mod:`slidevl.survival.evidence` can split per
slide. Models with ablation ``variants`` are checked in every variant.

The folders in ``tests/data/survival_checkpoints_0.1.0`` were written by slidevl 0.1.0's
``save_checkpoint``, before models were registered; they must keep loading, with the
outputs they had then.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from slidevl.errors import NotFoundError
from slidevl.survival.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from slidevl.survival.data import PatientBag, SlideSpan
from slidevl.survival.evidence import PER_TOKEN_KEYS, slide_evidence
from slidevl.survival.hila.prompts import EncodedPrompts, PromptError
from slidevl.survival.models.base import SurvivalModel
from slidevl.survival.registry import SURVIVAL_MODELS, build_model, list_survival_models, model_from_config
from slidevl.survival.train import BagDataset, PatientRecord, TrainConfig, make_accelerator, train_model

IN_DIM, REGION_DIM, N_BINS = 12, 8, 3
GOLDEN = Path(__file__).parent / "data" / "survival_checkpoints_0.1.0"
# Every registered model, and every variant of the models that have them.
CASES = [(name, variant) for name, cls in SURVIVAL_MODELS.items() for variant in (cls.variants or (None,))]
IDS = [name if variant is None else f"{name}-{variant}" for name, variant in CASES]


def _bag(key: int = 0, seed: int = 0) -> PatientBag:
    """Two slides: 24 + 16 patches over 3 + 3 regions, with level-0 coordinates."""
    g = torch.Generator().manual_seed(seed)
    index = torch.cat([torch.randint(0, 3, (24,), generator=g), torch.randint(3, 6, (16,), generator=g)])
    coords = np.arange(80).reshape(40, 2) * 256
    spans = [SlideSpan("S0", 0, 24, 0, 3, coords[:24], coords[:3] * 4), SlideSpan("S1", 24, 40, 3, 6, coords[24:], None)]
    return PatientBag(f"P{key}", key, torch.randn(40, IN_DIM, generator=g), index, torch.randn(6, REGION_DIM, generator=g), spans)


def _prompts() -> dict[str, EncodedPrompts]:
    rng = np.random.default_rng(0)
    return {scale: EncodedPrompts(rng.normal(size=(N_BINS, 2, 10)).astype(np.float32), np.ones((N_BINS, 2), bool), ())
            for scale in ("patch", "region")}


def _build(name: str, variant: str | None) -> SurvivalModel:
    torch.manual_seed(0)
    options = {} if variant is None else {"variant": variant}
    return build_model(name, in_dim=IN_DIM, region_dim=REGION_DIM, n_bins=N_BINS, options=options, prompts=_prompts())


class _Bags:
    """The bag source a ``BagDataset`` reads, holding ready bags instead of reading a feature store."""

    def __init__(self, bags: list[PatientBag]) -> None:
        self.bags = {bag.patient_id: bag for bag in bags}

    def bag(self, patient_id: str, slides: list[str], key: int | None = None) -> PatientBag:
        return self.bags[patient_id]


def _train_one_epoch(model: SurvivalModel) -> tuple[SurvivalModel, list[dict[str, float]]]:
    bags = [_bag(key, seed=key) for key in range(4)]
    records = [PatientRecord(b.patient_id, ["S0", "S1"], b.key, label=b.key % N_BINS, censored=b.key % 2) for b in bags]
    config = TrainConfig(epochs=1, lr=1e-2, weight_decay=0.0, grad_accum=1)
    return train_model(model, BagDataset(_Bags(bags), records), config, make_accelerator("cpu", 1))


def test_every_model_is_listed_with_its_declarations() -> None:
    assert list_survival_models() == SURVIVAL_MODELS.names() and len(CASES) >= len(SURVIVAL_MODELS)
    for name, cls in SURVIVAL_MODELS.items():
        assert issubclass(cls, SurvivalModel), f"{name} must derive from SurvivalModel"
        assert isinstance(cls.needs_prompts, bool) and isinstance(cls.gives_evidence, bool)
        assert all(isinstance(v, str) for v in cls.variants) and len(set(cls.variants)) == len(cls.variants)
    with pytest.raises(NotFoundError, match=f"unknown survival model 'cox'; use one of {', '.join(list_survival_models())}"):
        build_model("cox", in_dim=IN_DIM, region_dim=REGION_DIM, n_bins=N_BINS)


@pytest.mark.parametrize(("name", "variant"), CASES, ids=IDS)
def test_forward_gives_one_logit_per_bin(name: str, variant: str | None) -> None:
    model = _build(name, variant).eval()
    assert model.name == name and model.config["name"] == name
    out = model(_bag())
    assert out.logits.shape == (N_BINS,) and bool(torch.isfinite(out.logits).all())
    assert out.aux_loss is None or (out.aux_loss.ndim == 0 and bool(torch.isfinite(out.aux_loss)))
    if SURVIVAL_MODELS.get(name).needs_prompts:
        with pytest.raises(PromptError, match="needs encoded prompts"):
            build_model(name, in_dim=IN_DIM, region_dim=REGION_DIM, n_bins=N_BINS)


@pytest.mark.parametrize(("name", "variant"), CASES, ids=IDS)
def test_a_training_epoch_changes_the_weights_with_a_finite_loss(name: str, variant: str | None) -> None:
    model = _build(name, variant)
    before = copy.deepcopy(model.state_dict())
    model, history = _train_one_epoch(model)
    assert np.isfinite(history[-1]["loss"]) and history[-1]["loss"] > 0
    moved = [k for k, p in model.named_parameters() if not torch.equal(p.detach(), before[k])]
    assert moved, f"{name}: no weight moved in a training epoch"


@pytest.mark.parametrize(("name", "variant"), CASES, ids=IDS)
def test_every_parameter_gets_a_gradient_unless_declared(name: str, variant: str | None) -> None:
    """Multi-process training tells DDP to look for unused parameters only where the class says so."""
    model = _build(name, variant).train()
    out = model(_bag())
    (out.logits.sum() + (0 if out.aux_loss is None else out.aux_loss)).backward()
    unused = [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if not SURVIVAL_MODELS.get(name).find_unused_parameters:
        assert not unused, f"{name}: {unused} get no gradient; set find_unused_parameters = True on the class"


@pytest.mark.parametrize(("name", "variant"), CASES, ids=IDS)
def test_checkpoint_round_trip_gives_identical_outputs(name: str, variant: str | None, tmp_path: Path) -> None:
    model, _ = _train_one_epoch(_build(name, variant))  # trained: buffers (queues, prompts) hold real values
    model.eval()
    save_checkpoint(tmp_path / "fold_0", model, {"bins": {"edges": [0.0, 1.0, 2.0, 3.0], "mode": "all"}})
    loaded, config = load_checkpoint(tmp_path / "fold_0")
    assert type(loaded) is type(model) and not loaded.training
    assert config["model"] == json.loads(json.dumps(model.config)) and config["bins"]["mode"] == "all"
    bag = _bag(seed=7)
    assert torch.equal(loaded(bag).logits, model(bag).logits)
    # The saved config alone rebuilds the architecture: every weight has its place and shape.
    rebuilt = model_from_config(config["model"])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("name", "variant"), CASES, ids=IDS)
def test_evidence_is_what_the_viewer_reads(name: str, variant: str | None) -> None:
    model = _build(name, variant).eval()
    bag = _bag()
    evidence = model(bag, evidence=True).evidence
    if not SURVIVAL_MODELS.get(name).gives_evidence:
        assert evidence == {}, f"{name} does not declare gives_evidence but returned evidence"
        return
    assert evidence and set(evidence) <= {"patch", "region"}
    sizes = {"patch": len(bag.patch), "region": len(bag.region)}
    for scale, table in evidence.items():
        per_token = [key for key in PER_TOKEN_KEYS if key in table]
        assert per_token, f"{name}: {scale} evidence holds none of {PER_TOKEN_KEYS}"
        assert all(len(table[key]) == sizes[scale] for key in per_token)
        if scale == "region":
            assert "level_scores" in table
    records = slide_evidence(bag, evidence)
    assert set(records) == {"S0", "S1"}
    for span in bag.spans:
        record = records[span.slide_id]
        if "patch" in evidence:
            assert len(record["patch"]["coords"]) == span.stop - span.start
            assert all(len(record["patch"][k]) == span.stop - span.start for k in PER_TOKEN_KEYS if k in record["patch"])
        if "region" in evidence:
            assert all(len(record["region"][k]) == span.region_stop - span.region_start
                       for k in PER_TOKEN_KEYS if k in record["region"])
    assert json.loads(json.dumps(records)) == records, "evidence records must be plain JSON data"


@pytest.mark.parametrize("folder", sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()))
def test_checkpoints_written_before_the_registry_still_load(folder: str) -> None:
    model, config = load_checkpoint(GOLDEN / folder)
    assert model.name == config["model"]["name"]
    tensors = load_file(str(GOLDEN / "bag.safetensors"))
    region = tensors["region_aligned"] if folder == "hila-aligned" else tensors["region"]
    bag = PatientBag("P", 0, tensors["patch"], tensors["region_index"], region, [])
    expected = json.loads((GOLDEN / "expected_logits.json").read_text())[folder]
    np.testing.assert_allclose(model(bag).logits.detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_an_unknown_model_says_what_to_do(tmp_path: Path) -> None:
    folder = tmp_path / "fold_0"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((GOLDEN / "abmil" / name).read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model": {**config["model"], "name": "cox"}}))
    with pytest.raises(CheckpointError, match=f"fold_0: the checkpoint names survival model 'cox'.*known: {', '.join(list_survival_models())}"):
        load_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({**config, "model": {**config["model"], "heads": 3}}))
    with pytest.raises(CheckpointError, match=r"config.json does not describe a model this slidevl can build.*heads"):
        load_checkpoint(folder)
