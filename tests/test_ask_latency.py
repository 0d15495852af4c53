"""What keeps a second ``slidevl ask`` short: a lazy command line, and a cached slide that skips preprocessing and encoding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_slidellm_fixtures import make_encoder_dir, stage_config, tiny_train, world  # noqa: F401  (fixtures are used by name)
from typer.testing import CliRunner

from slidevl.cli import COMMANDS, app

runner = CliRunner()


def test_help_lists_every_command_with_its_help() -> None:
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in COMMANDS:
        assert f" {name} " in result.output
    assert "Answer a question about a slide" in result.output  # the help text lives with the command
    result = runner.invoke(app, ["ak"])
    assert result.exit_code == 2 and "Did you mean 'ask'" in result.output


def test_a_command_imports_only_its_own_module() -> None:
    """``slidevl ask --help`` in a new process: neither torch nor any other command's stack is imported."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from slidevl.cli import app\n"
        "result = CliRunner().invoke(app, ['ask', '--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(__import__('json').dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('slidevl', 'torch', 'transformers'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = json.loads(done.stdout)
    assert "slidevl.slidellm.ask_cli" in modules
    for heavy in ("torch", "transformers", "slidevl.survival", "slidevl.features.pipeline", "slidevl.serve", "slidevl.demo"):
        assert heavy not in modules, heavy


@pytest.fixture()
def slide_checkpoint(world: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:  # noqa: F811
    """A real slide file and a checkpoint trained on features of that slide."""
    from slide_fixtures import write_aperio_slide

    from slidevl.features.config import PreprocessConfig
    from slidevl.features.pipeline import preprocess
    from slidevl.features.store import FeatureStore
    from slidevl.qa.records import VQARecord, write_records
    from slidevl.slidellm.tuning.stages import run_stage

    (tmp_path / "slides").mkdir()
    slide = write_aperio_slide(tmp_path / "slides" / "liver.svs", 1536, 1024)
    train_job = tmp_path / "train_job"
    assert preprocess(slide, train_job, PreprocessConfig(workers=0, progress=False)).exit_code == 0
    dim = int(FeatureStore(train_job).load("liver").patch_features.shape[1])
    records = write_records(tmp_path / "qa.jsonl", [
        VQARecord("c", "liver", "WSI", "description", "caption", "Describe the slide.", "Two pieces of tissue."),
    ])
    run_stage(stage_config(world, "stage1", tmp_path / "s1", records=str(records), job=str(train_job),
                           encoder=str(make_encoder_dir(tmp_path / "enc", dim)), train=tiny_train(max_steps=1)))
    return slide, tmp_path / "s1"


def test_a_second_ask_reads_the_cache_and_prints_the_answer_alone(slide_checkpoint: tuple[Path, Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from slidevl.features import pipeline
    from slidevl.slidellm.ask_cli import app as ask_app
    from slidevl.slidellm.tuning import visual

    slide, checkpoint = slide_checkpoint
    cache = tmp_path / "cache"
    encoded: list[str] = []
    preprocessed: list[Path] = []
    real_encode, real_preprocess = visual.encode_slide, pipeline.preprocess

    def counting_encode(encoder, sf, **kw):  # noqa: ANN001, ANN003, ANN202
        encoded.append(sf.slide_id)
        return real_encode(encoder, sf, **kw)

    def counting_preprocess(slides, out, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        preprocessed.append(Path(slides))
        return real_preprocess(slides, out, *args, **kw)

    monkeypatch.setattr(visual, "encode_slide", counting_encode)
    monkeypatch.setattr(pipeline, "preprocess", counting_preprocess)
    # Answered in this process, where the counters see the pipeline and the encoder (test_ask_warm covers the warm model).
    ask = [str(slide), "Describe the slide.", "--checkpoint", str(checkpoint), "--cache", str(cache),
           "--max-new-tokens", "3", "--device", "cpu", "--no-keep-warm"]

    first = runner.invoke(ask_app, ask)
    assert first.exit_code == 0, first.output
    assert first.stderr.count(f"cache: {cache}") == 1, first.stderr  # said when the cache is created
    assert preprocessed == [slide] and encoded == ["liver"]

    second = runner.invoke(ask_app, ask)
    assert second.exit_code == 0, second.output
    assert second.stdout == first.stdout
    assert second.stderr == ""  # neither the cache location again nor a preprocessing line
    assert preprocessed == [slide] and encoded == ["liver"]  # features and visual tokens came from the cache

    # Another file under the same name is not taken for the cached one: the pipeline decides and recomputes.
    from slide_fixtures import write_aperio_slide

    write_aperio_slide(slide, 1536, 1280, seed=3)
    third = runner.invoke(ask_app, ask)
    assert third.exit_code == 0, third.output
    assert preprocessed == [slide, slide] and encoded == ["liver", "liver"]
