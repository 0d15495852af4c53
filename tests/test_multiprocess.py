"""Training across processes: real ``accelerate launch`` runs of two CPU processes (gloo).

Two processes at ``--grad-accum k`` take the optimizer steps of one process at ``2k``:
each process takes every other micro-batch of the same order and DDP averages the
gradients. With dropout off the two runs then agree up to the order of floating-point
sums (the tolerance below), so any metric read from one process's share, any patient
trained twice or left out, or any checkpoint written over by the other process shows.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from test_slidellm_fixtures import TINY_CONNECTOR, stage_config, tiny_train, world  # noqa: F401  (world: a fixture)

from slidevl.survival.cv import run_cv
from slidevl.survival.toy import make_toy_cohort
from slidevl.slidellm.tuning.stages import run_stage
from slidevl.slidellm.tuning.state import load_state, load_state_entry

REPO = Path(__file__).resolve().parents[1]
DDP_CONFIG = REPO / "configs" / "accelerate" / "ddp.yaml"
FSDP_CONFIG = REPO / "configs" / "accelerate" / "fsdp.yaml"
ACCELERATE = Path(sys.executable).with_name("accelerate")
# Float sums in another order (DDP's all-reduce against local accumulation): ~1e-7 relative.
TOL = 1e-5

ABMIL = {"dropout": 0, "hidden": 16, "attn_dim": 8}
SURVIVAL_EPOCHS = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args: str) -> list[str]:
    """``accelerate launch`` of ``python -m slidevl ARGS`` in two processes with the shipped DDP config."""
    return [str(ACCELERATE), "launch", "--config_file", str(DDP_CONFIG), "--num_processes", "2",
            "--main_process_port", str(_free_port()), "-m", "slidevl", *args]


ENV = {**os.environ, "COLUMNS": "240", "OMP_NUM_THREADS": "1"}


def _stop_when(proc: subprocess.Popen, ready, timeout: float = 240.0) -> tuple[str, str]:
    """SIGTERM the launcher once ``ready()`` holds; its agent passes the signal to both workers."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never reached the point to stop it at"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        return proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _interrupt_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("interrupted")]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory):
    # 18 patients in 3 folds: 12 training patients per fold, an even share for each process.
    return make_toy_cohort(tmp_path_factory.mktemp("toy"), n_patients=18, seed=0)


def test_survival_cv_on_two_processes_matches_one_and_resumes_after_sigterm(toy, tmp_path: Path) -> None:
    out = tmp_path / "two"
    command = _launch("survival", "cv", "--features", str(toy.job), "--clinical", str(toy.clinical), "--out", str(out),
                      "--model", "abmil", *[a for k, v in ABMIL.items() for a in ("--option", f"{k}={v}")], "--k", "3",
                      "--epochs", str(SURVIVAL_EPOCHS), "--grad-accum", "1", "--lr", "1e-3", "--device", "cpu",
                      "--threads", "1", "--quiet")
    first = out / "fold_0" / "result.json"
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    stdout, stderr = _stop_when(proc, first.is_file)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr, stderr
    lines = _interrupt_lines(stderr)
    assert len(lines) == 1 and "of 3 folds finished" in lines[0], stderr  # the main process alone says it
    state = json.loads((out / "run_state.json").read_text())
    assert state["status"] == "interrupted" and 0 in state["finished"] and len(state["finished"]) < 3
    kept = first.read_text()

    rerun = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stderr.count(f"resuming: {len(state['finished'])} of 3 folds finished") == 1, rerun.stderr
    assert rerun.stdout.count("run folder:") == 1, rerun.stdout
    assert first.read_text() == kept, "a finished fold is not trained again"
    two = json.loads((out / "summary.json").read_text())
    assert two["environment"]["processes"] == 2 and two["resumed_folds"] == state["finished"]
    assert json.loads((out / "run_state.json").read_text())["status"] == "finished"
    # Written once, whole: no file of an atomic write left behind, one evidence file per slide.
    assert not [p for p in out.rglob(".*") if p.name.endswith(".partial")]
    assert len(list((out / "evidence").glob("*.json"))) == len(list((toy.job / "features" / "toy").glob("*.h5")))

    one = run_cv(features=toy.job, clinical=toy.clinical, out=tmp_path / "one", model="abmil", model_options=ABMIL, k=3,
                 epochs=SURVIVAL_EPOCHS, grad_accum=2, lr=1e-3, device="cpu", show_progress=False)
    assert [f["n_train"] % 2 for f in one["folds"]] == [0, 0, 0]
    for a, b in zip(one["folds"], two["folds"]):
        assert [h["loss"] for h in b["history"]] == pytest.approx([h["loss"] for h in a["history"]], abs=TOL)
        assert b["c_index"] == pytest.approx(a["c_index"], abs=TOL)  # over every validation patient
    risks = dict(pd.read_csv(tmp_path / "one" / "oof_risks.csv")[["patient_id", "risk"]].values)
    gathered = dict(pd.read_csv(out / "oof_risks.csv")[["patient_id", "risk"]].values)
    assert gathered.keys() == risks.keys() and len(risks) == 18
    assert [gathered[p] for p in risks] == pytest.approx(list(risks.values()), abs=TOL)


# The command-line twin of the fixtures' stage_config(..., "stage2", ...) with TINY_CONNECTOR.
STAGE2_ARGS = ["--connector", "qformer", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--queries", "4", "--qformer-layers", "1",
               "--qformer-hidden", "32", "--qformer-heads", "4", "--qformer-ffn", "64", "--connector-dropout", "0",
               "--batch-size", "1", "--max-tokens", "256", "--lr", "1e-3", "--cpu", "--seed", "0"]


def _stage2_command(world: dict[str, Path], out: Path, epochs: int, save_every: int) -> list[str]:  # noqa: F811
    return _launch("slidellm", "stage2", "--records", str(world["records"]), "--job", str(world["job"]),
                   "--encoder", str(world["encoder"]), "--llm", str(world["llm"]), "--out", str(out),
                   "--epochs", str(epochs), "--save-every", str(save_every), "--grad-accum", "1", *STAGE2_ARGS)


def _one_process_stage2(world: dict[str, Path], out: Path, epochs: int, save_every: int) -> None:  # noqa: F811
    run_stage(stage_config(world, "stage2", out, train=tiny_train(epochs=epochs, batch_size=1, grad_accum=2, save_every=save_every)))


def _same_checkpoints(a: Path, b: Path) -> None:
    """Equal connector and adapter weights and equal per-step losses, within the tolerance."""
    for name in ("connector.safetensors", "adapter/adapter_model.safetensors"):
        wa, wb = load_file(a / "checkpoint" / name), load_file(b / "checkpoint" / name)
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=TOL, msg=f"{name}: {key}")
    ha, hb = (load_state_entry(r / "checkpoint" / "trainer", "trainer", "history") for r in (a, b))
    assert [h[0] for h in hb] == [h[0] for h in ha]
    assert [h[1] for h in hb] == pytest.approx([h[1] for h in ha], abs=TOL)  # losses over both processes


def test_stage2_on_two_processes_matches_one_and_checkpoints_once(world: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    two = tmp_path / "two"
    result = subprocess.run(_stage2_command(world, two, epochs=2, save_every=2), capture_output=True, text=True,
                            env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("stage2: 6 steps") == 1, result.stdout  # 6 records, one per process and step
    assert json.loads((two / "run.json").read_text())["connector"] == TINY_CONNECTOR, "the command line is the fixture's twin"
    _one_process_stage2(world, tmp_path / "one", epochs=2, save_every=2)
    _same_checkpoints(tmp_path / "one", two)

    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 6 and summary["epochs_completed"] == 2
    trainer = load_state(two / "checkpoint" / "trainer", "trainer")
    assert trainer["processes"] == 2 and len(trainer["rng"]) == 2 and trainer["counters"]["step"] == 6
    assert sorted(p.name for p in two.iterdir()) == ["checkpoint", "run.json", "summary.json", "visual_cache"]


@pytest.mark.slow
def test_stage2_on_two_processes_resumes_after_sigterm_as_if_never_stopped(world: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "two"
    command = _stage2_command(world, out, epochs=8, save_every=1)
    trainer = out / "checkpoint" / "trainer"

    def some_steps_saved() -> bool:
        try:
            return load_state_entry(trainer, "trainer", "counters")["step"] >= 3
        except Exception:  # not there yet, or replaced while read
            return False

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    _, stderr = _stop_when(proc, some_steps_saved)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr, stderr
    lines = _interrupt_lines(stderr)
    saved = load_state_entry(trainer, "trainer", "counters")["step"]
    assert len(lines) == 1 and f"step {saved} (" in lines[0] and "rerun the same command to resume" in lines[0], stderr
    assert 3 <= saved < 24 and not (out / "summary.json").exists()

    rerun = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stderr.count(f"resuming: step {saved} (") == 1, rerun.stderr
    history = load_state_entry(trainer, "trainer", "history")
    assert [h[0] for h in history] == list(range(1, 25)), "every step once: none repeated, none skipped"
    _one_process_stage2(world, tmp_path / "one", epochs=8, save_every=1)
    _same_checkpoints(tmp_path / "one", out)


def _queue_worker(rank: int, port: int, out: Path) -> None:
    """One of two gloo processes: a HiLa MCL step and a MoCo step on this process's own patient and slide."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from slidevl.slidellm.encoder import TopoPackConfig
    from slidevl.slidellm.encoder.synthetic import synthetic_slide
    from slidevl.slidellm.pretrain import PretrainConfig
    from slidevl.slidellm.pretrain.modules import MomentumNetworks, PretrainModel
    from slidevl.slidellm.pretrain.trainer import moco_forward
    from slidevl.survival.hila.mcl import MutualContrastive

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)  # the same weights in both processes, as DDP makes them
    mcl = MutualContrastive(dim=6, proj_dim=4, queue_size=8).train()
    protos = torch.randn(2, 2, 6)  # (process, patch/region, dim): both processes know both patients
    mcl(protos[rank, 0], protos[rank, 1], owner=100 + rank)

    config = PretrainConfig(moco_queue=64, moco_enqueue=8, moco_queries=16, moco_dim=8, max_packs=32, decoder_dim=16,
                            decoder_heads=2)
    model = PretrainModel(TopoPackConfig(patch_dim=32, pack_dim=24, global_dim=16, d_model=16, n_layers=1, n_heads=2,
                                         ffn_dim=32, dropout=0.0), config)
    momentum = MomentumNetworks(model, config)
    sent = []

    def gather(t: torch.Tensor) -> torch.Tensor:
        sent.append(t.clone())
        return accelerator.gather(t)

    slide = synthetic_slide(12, 12, seed=rank, slide_id=f"slide{rank}").batch
    moco_forward(model, momentum, [slide], config, torch.Generator().manual_seed(rank), accelerator.device, gather)
    mine = {"protos": protos, "mcl": (mcl.queue_patch.clone(), mcl.queue_region.clone(), mcl.queue_owner.clone()),
            "moco": (momentum.queue.features.clone(), momentum.queue.slides.clone()), "sent": sent}
    everything = gather_object([mine])
    if accelerator.is_main_process:
        torch.save({"processes": everything, "mcl_state": mcl.state_dict()}, out)
    accelerator.wait_for_everyone()


def test_memory_queues_take_the_keys_of_every_process_in_process_order(tmp_path: Path) -> None:
    import torch.nn.functional as F

    from slidevl.slidellm.pretrain.moco import EMPTY_SLIDE

    out = tmp_path / "queues.pt"
    torch.multiprocessing.spawn(_queue_worker, args=(_free_port(), out), nprocs=2, join=True)
    saved = torch.load(out, weights_only=False)
    first, second = saved["processes"]

    # HiLa MCL: both processes hold [patient of process 0, patient of process 1], identical queues.
    protos = first["protos"]
    state = saved["mcl_state"]
    heads = {}
    for name in ("patch_head_k", "region_head_k"):
        head = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
        head.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(name + ".")})
        heads[name] = head
    with torch.no_grad():
        expected_patch = F.normalize(heads["patch_head_k"](protos[:, 0]), dim=-1)
        expected_region = F.normalize(heads["region_head_k"](protos[:, 1]), dim=-1)
    for process in (first, second):
        patch, region, owner = process["mcl"]
        assert owner.tolist() == [100, 101, -1, -1, -1, -1, -1, -1]
        torch.testing.assert_close(patch[:2], expected_patch)
        torch.testing.assert_close(region[:2], expected_region)
    assert all(torch.equal(a, b) for a, b in zip(first["mcl"], second["mcl"]))

    # MoCo: the queue is process 0's keys then process 1's (empty slots dropped), the same in both.
    keys = torch.cat([first["sent"][0], second["sent"][0]])
    slides = torch.cat([first["sent"][1], second["sent"][1]])
    keep = slides != EMPTY_SLIDE
    n = int(keep.sum())
    assert len(set(slides[keep].tolist())) == 2 and n > 8
    for process in (first, second):
        features, queued = process["moco"]
        torch.testing.assert_close(features[:n], keys[keep].float())
        assert torch.equal(queued[:n], slides[keep]) and (queued[n:] == EMPTY_SLIDE).all()
    assert all(torch.equal(a, b) for a, b in zip(first["moco"], second["moco"]))


def test_accelerate_configs_parse_and_fsdp_wraps_the_llm_decoder_layers(world: dict[str, Path]) -> None:  # noqa: F811
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType
    from accelerate.utils.launch import prepare_multi_gpu_env
    from accelerate.utils.dataclasses import get_module_class_from_name

    from slidevl.slidellm.llm import load_llm

    def launcher_env(config: Path) -> dict[str, str]:
        # What `accelerate launch --config_file` hands its workers, through the launcher's own parsing.
        args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", "2", "-m", "slidevl"])
        args, defaults, _ = _validate_launch_command(args)
        assert defaults.distributed_type in (DistributedType.MULTI_GPU, DistributedType.FSDP)
        return prepare_multi_gpu_env(args)

    ddp = launcher_env(DDP_CONFIG)
    assert ddp.get("ACCELERATE_USE_FSDP", "false") == "false" and ddp["ACCELERATE_MIXED_PRECISION"] == "no"
    fsdp = launcher_env(FSDP_CONFIG)
    assert {k: fsdp[k] for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_SHARDING_STRATEGY", "FSDP_AUTO_WRAP_POLICY",
                                 "FSDP_USE_ORIG_PARAMS", "FSDP_STATE_DICT_TYPE", "ACCELERATE_MIXED_PRECISION")} == {
        "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_USE_ORIG_PARAMS": "true",
        "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "ACCELERATE_MIXED_PRECISION": "bf16"}
    # The class FSDP wraps is the decoder layer of the LLM the stages load.
    llm = load_llm(world["llm"])
    assert get_module_class_from_name(llm, fsdp["FSDP_TRANSFORMER_CLS_TO_WRAP"]) is not None
