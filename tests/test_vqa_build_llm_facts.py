"""`slidevl vqa build` on a job without truth.json: a vision-language model (here a fake server) gives the facts."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from slide_fixtures import write_aperio_slide
from slidevl.features.config import PreprocessConfig
from slidevl.features.pipeline import preprocess
from slidevl.qa.records import read_records
from slidevl.vqa.cli import app
from test_llmclient_server import FakeChatServer

runner = CliRunner()
NAMES = {"tumour": "tumour", "stroma": "fibrous stroma", "lymphocytes": "lymphocytic infiltrate",
         "necrosis": "necrosis", "fat": "adipose tissue"}


def fake_pathologist(body: dict[str, Any]) -> str:
    """Composition from the image it is shown: darker images hold more tumour; JSON wrapped in chatter."""
    text, image = body["messages"][-1]["content"]
    assert text["type"] == "text" and image["type"] == "image_url"
    header, data = image["image_url"]["url"].split(",", 1)
    assert header == "data:image/png;base64"
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), np.float64)
    dark = int(round(100 * (1 - pixels.mean() / 255)))
    composition = {"tumour": dark, "stroma": 100 - dark, "lymphocytes": 0, "necrosis": 0, "fat": 0}
    reply: dict[str, Any] = {"composition_percent": composition}
    if "tumour nodules" in text["text"]:  # the whole-slide request
        reply.update(grade=2, tumour_nodules=1)
    return "Here is my estimate:\n```json\n" + json.dumps(reply) + "\n```"


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("own")
    slides = root / "slides"
    slides.mkdir()
    for i, name in enumerate(("TCGA-AA-0001-01Z", "TCGA-AA-0001-02Z", "TCGA-BB-0002-01Z", "OTHER-3")):
        write_aperio_slide(slides / f"{name}.svs", 2048, 1536, seed=i)
    config = PreprocessConfig(workers=0, batch_size=64, progress=False, pack_features=False, global_feature=False)
    assert preprocess(slides, root / "job", config).exit_code == 0
    return root / "job"


def test_facts_come_from_the_model_and_a_rerun_is_served_from_the_cache(job: Path, tmp_path: Path) -> None:
    out = tmp_path / "qa"
    missing = runner.invoke(app, ["build", "--job", str(job), "--out", str(out)])
    assert missing.exit_code == 2 and "no truth.json" in missing.output and "--llm-url" in missing.output
    with FakeChatServer(fake_pathologist) as server:
        args = ["build", "--job", str(job), "--out", str(out), "--k-rois", "2", "--test-fraction", "0.34",
                "--llm-url", server.base_url, "--llm-model", "fake-vl"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        n_requests = len(server.requests)
        again = runner.invoke(app, args)
        assert again.exit_code == 0, again.output
        assert len(server.requests) == n_requests  # every reply came from OUT/llm_cache
    summary = json.loads((out / "summary.json").read_text())
    assert summary["facts"]["source"] == "llm" and summary["facts"]["model"] == "fake-vl"
    assert summary["n_patients"] == 3  # TCGA slides of one patient stay together
    train, test = read_records(out / "train.jsonl"), read_records(out / "test.jsonl")
    assert train and test and {r.level for r in train + test} == {"WSI", "ROI", "patch"}
    assert not {r.meta["patient"] for r in train} & {r.meta["patient"] for r in test}
    # A request per slide, ROI and field: each answer follows what the model said about that image.
    wsi_requests = [b for b in server.requests if "tumour nodules" in b["messages"][-1]["content"][0]["text"]]
    assert len(wsi_requests) == 4
    for record in train + test:
        if record.meta.get("template") == "dominant":
            assert record.options[ord(record.answer) - ord("A")] in (NAMES["tumour"], NAMES["stroma"])
        if record.meta.get("template") == "grade":
            assert record.options[ord(record.answer) - ord("A")].startswith("grade 2")


def test_moved_slides_are_found_with_slides_root(job: Path, tmp_path: Path) -> None:
    """The model is shown images read from the slide files: once they move, --slides-root says where."""
    slides = job.parent / "slides"
    moved = job.parent / "slides_elsewhere"
    slides.rename(moved)
    try:
        with FakeChatServer(fake_pathologist) as server:
            args = ["build", "--job", str(job), "--out", str(tmp_path / "qa"), "--k-rois", "2", "--test-fraction", "0.34",
                    "--llm-url", server.base_url, "--llm-model", "fake-vl"]
            lost = runner.invoke(app, args)
            assert lost.exit_code == 2 and "--slides-root" in lost.output, lost.output
            found = runner.invoke(app, [*args, "--slides-root", str(moved)])
            assert found.exit_code == 0, found.output
    finally:
        moved.rename(slides)
