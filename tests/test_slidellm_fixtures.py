"""Shared builders for the slide-LLM tests: tiny feature jobs, encoders, LLMs and QA records.

Everything is small enough that a whole stage-1 → stage-2 → ask chain runs in seconds
on one CPU core.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from slidevl.features.store import FeatureStore, SlideFeatures
from slidevl.qa.records import VQARecord, read_records, write_records
from slidevl.slidellm.encoder import TopoPackConfig, TopoPackEncoder, save_encoder
from slidevl.slidellm.llm import EmbeddedLMConfig, build_embedded_llm
from slidevl.slidellm.tokenizer import train_tokenizer
from slidevl.slidellm.tuning.config import TrainSettings, TuneConfig
from slidevl.slidellm.vqa_data import corpus_texts
from slidevl.tiling.grid import GridSpec, SlideGrid, index_cells

FEATURE_DIM = 8
FEATURE_ENCODER = "toy"
TINY_CONNECTOR = {"kind": "qformer", "hidden_size": 32, "num_layers": 1, "num_heads": 4, "intermediate_size": 64, "num_queries": 4, "dropout": 0.0}
TINY_LM = EmbeddedLMConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, max_positions=512)


def slide_features(slide_id: str, n_cols: int, n_rows: int, *, mpp: float = 0.5, seed: int = 0, drop: int = 0) -> SlideFeatures:
    """Random features on a full n_cols x n_rows patch lattice, minus ``drop`` patches (no tissue)."""
    rng = np.random.default_rng(seed)
    grid = SlideGrid(GridSpec(), width=int(256 * 0.5 / mpp * n_cols) + 1, height=int(256 * 0.5 / mpp * n_rows) + 1, mpp=mpp)
    patches = grid.all_patches()[drop:]
    packs, pack_index = index_cells(grid.pack_of(patches))
    return SlideFeatures(
        slide_id=slide_id,
        patch_features=rng.normal(size=(len(patches), FEATURE_DIM)).astype(np.float32),
        patch_coords=grid.patch_edges(patches),
        patch_grid=patches,
        patch_region=np.zeros(len(patches), np.int64),
        patch_pack=pack_index,
        patch_tissue=np.ones(len(patches), np.float32),
        pack_features=rng.normal(size=(len(packs), FEATURE_DIM)).astype(np.float32),
        pack_coords=grid.cell_boxes(packs, 3)[:, :2],
        pack_grid=packs,
        global_feature=rng.normal(size=FEATURE_DIM).astype(np.float32),
        attrs={"pack_size": 3, "encoder": FEATURE_ENCODER},
    )


def make_job(root: Path) -> Path:
    """A feature job with two slides: 7x6 patches (3x2 packs) and 6x6 patches (2x2 packs)."""
    store = FeatureStore(root, FEATURE_ENCODER)
    store.write(slide_features("S1", 7, 6, seed=1), float16=False)
    store.write(slide_features("S2", 6, 6, seed=2, drop=1), float16=False)
    return root


def make_encoder_dir(root: Path, dim: int = FEATURE_DIM) -> Path:
    encoder = TopoPackEncoder(
        TopoPackConfig(
            patch_dim=dim,
            pack_dim=dim,
            global_dim=dim,
            d_model=16,
            n_layers=1,
            n_heads=2,
            ffn_dim=32,
            dropout=0.0,
            attention_impl="gather",
        )
    )
    return save_encoder(encoder, root)


def make_records(path: Path) -> Path:
    """Captions, single, multi and open questions about the two slides; two region questions."""
    records = []
    for slide, tumour in (("S1", "a large tumour nodule"), ("S2", "normal liver")):
        records += [
            VQARecord(f"{slide}-cap", slide, "WSI", "description", "caption", "Describe the slide.", f"The slide shows {tumour}."),
            VQARecord(f"{slide}-cap-roi", slide, "ROI", "description", "caption", "Describe this region.", f"This region shows {tumour}.", bbox=(0, 0, 700, 700)),
            VQARecord(f"{slide}-single", slide, "WSI", "diagnosis", "single", "Is there a tumour?", "A" if slide == "S1" else "B", options=("yes", "no")),
            VQARecord(f"{slide}-multi", slide, "ROI", "morphology", "multi", "Which are present?", "A,C", options=("necrosis", "fibrosis", "steatosis"), bbox=(768, 0, 1600, 768)),
            VQARecord(f"{slide}-open", slide, "patch", "morphology", "open", "What is seen here?", f"Here we see {tumour}.", bbox=(0, 768, 256, 1024)),
        ]
    return write_records(path, records)


def make_llm_dir(root: Path, records_path: Path) -> Path:
    """A tiny randomly initialised chat LM saved like a downloaded one."""
    tokenizer = train_tokenizer(corpus_texts(read_records(records_path)), vocab_size=400, min_frequency=1)
    llm = build_embedded_llm(tokenizer, TINY_LM)
    llm.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def tiny_train(**overrides: object) -> TrainSettings:
    base = dict(epochs=1, batch_size=2, grad_accum=1, lr=1e-3, save_every=1000, max_tokens=256, seed=0, cpu=True)
    base.update(overrides)
    return TrainSettings(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One job, encoder, record file and LLM shared by the tests of a session (read-only)."""
    root = tmp_path_factory.mktemp("slidellm")
    records = make_records(root / "qa.jsonl")
    return {
        "root": root,
        "job": make_job(root / "job"),
        "encoder": make_encoder_dir(root / "encoder"),
        "records": records,
        "llm": make_llm_dir(root / "llm", records),
    }


def stage_config(world: dict[str, Path], stage: str, out: Path, **kwargs: object) -> TuneConfig:
    base: dict[str, object] = dict(
        stage=stage,
        records=str(world["records"]),
        out=str(out),
        job=str(world["job"]),
        encoder=str(world["encoder"]),
        llm=str(world["llm"]),
        train=tiny_train(),
    )
    if stage == "stage2":
        from slidevl.slidellm.llm import LoraSettings

        base["lora"] = LoraSettings(r=4, alpha=8, dropout=0.0)
    if "init" not in kwargs:
        base["connector"] = dict(TINY_CONNECTOR)
    base.update(kwargs)
    if base.get("init"):
        base.pop("llm", None)
    return TuneConfig(**base)  # type: ignore[arg-type]
