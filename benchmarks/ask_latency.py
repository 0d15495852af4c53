"""Latency of a second ``slidevl ask`` on the same slide from a new process: in-process and through the warm model.

    python benchmarks/ask_latency.py --checkpoint /tmp/asklat/ck/runs/stage2 \\
        --slide /tmp/asklat/ck/cohort/slides/SYN-0000-01.tiff --work /tmp/slidevl_ask_latency --repeats 5 --before 407a37c

What a user waits for when asking again from the shell: a new process that starts the
CLI, imports the model stack, loads the checkpoint, finds the slide's features and
visual tokens in the cache and answers. Measured, in one session so that all numbers
share the machine's load:

* ``second ask``: wall and CPU seconds of ``slidevl ask SLIDE_FILE QUESTION`` answered in
  its own process (``SLIDEVL_ASK_KEEP_WARM=0``) after a first call filled the cache,
  ``--repeats`` times (``--before REF`` interleaves the same command run on the source of
  git revision REF, extracted with ``git archive``);
* ``warm``: the same command answered by the warm model that the first ask with keep-warm
  (the default) left running, interleaved with the above: wall, the asking process's CPU
  and the server's CPU for the answer (from ``/proc/PID/stat``), and whether the answer is
  the in-process one;
* the floor any such process pays: Python alone, ``import torch``, and torch +
  transformers' causal LM + peft (the LoRA adapters) without anything of slidevl;
* the phases inside one process (imports, checkpoint load, cached slide, answer) and the
  next answer in the same process, which is what ``--interactive`` and the viewer pay
  per question;
* self import time by top-level package (``python -X importtime``) of one second ask,
  in process and warm.

Any stage-2 run and one of its slide files will do; the demo's (``slidevl demo``:
``demo/runs/vqa/stage2`` and ``demo/cohort/slides``) is the shape measured here. The run in
the command above is that shape (embedded LM at its default size, the demo's encoder and
connector) on a 5-patient cohort, trained a few steps only: latency does not depend on
training. The result goes to ``benchmarks/results/ask_latency.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from slidevl.slidellm import ask_warm

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
QUESTION = "Describe this whole-slide image."
FOLLOW_UP = "Which tissue is dominant on this slide?\nA. tumour\nB. fibrous stroma\nC. normal parenchyma\nD. necrosis"
#: The console script's own two lines (``slidevl = slidevl.cli:app``), so that both source trees start the same way.
CLI = "import sys; from slidevl.cli import app; sys.exit(app(prog_name='slidevl'))"
#: Packages shown on their own in the import breakdown; the rest is summed as "other".
PACKAGES = ("torch", "transformers", "peft", "sympy", "scipy", "torchvision", "triton", "huggingface_hub", "numpy",
            "sklearn", "pandas", "openslide", "timm", "open_clip", "h5py", "rich", "slidevl")
#: One process, phase by phase: argv = checkpoint, slide, cache, max_new_tokens.
PHASES = """
import sys, time, json
t = [time.perf_counter()]
import torch
t.append(time.perf_counter())
import slidevl.slidellm.llm
t.append(time.perf_counter())
from slidevl.slidellm.ask import SlideAssistant
t.append(time.perf_counter())
assistant = SlideAssistant(sys.argv[1], device="cpu", cache_root=sys.argv[3])
t.append(time.perf_counter())
chat = assistant.conversation(assistant.open_slide(sys.argv[2]))
t.append(time.perf_counter())
chat.ask(%r, max_new_tokens=int(sys.argv[4]))
t.append(time.perf_counter())
chat.ask(%r, max_new_tokens=int(sys.argv[4]))
t.append(time.perf_counter())
names = ["import torch", "import transformers + peft", "import the rest of ask", "load checkpoint",
         "cached slide -> visual tokens", "answer", "next answer (warm process)"]
print(json.dumps(dict(zip(names, [b - a for a, b in zip(t, t[1:])]))))
""" % (QUESTION, FOLLOW_UP)
FLOOR = {
    "python alone": "pass",
    "import torch": "import torch",
    "torch + transformers causal LM + peft": "import torch, peft; from transformers import AutoModelForCausalLM, LlamaForCausalLM",
}


def _env(src: Path | None, warm: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", ask_warm.ENV_KEEP_WARM)}
    if not warm:
        env[ask_warm.ENV_KEEP_WARM] = "0"  # answered in the command's own process
    if src is not None:
        env["PYTHONPATH"] = str(src)  # ahead of the editable install of the working tree
    return env


def _run(argv: list[str], src: Path | None, warm: bool = False) -> dict[str, Any]:
    """Wall and CPU seconds of one child process (CPU: its user + system time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(src, warm), cwd=REPO)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "load": load, "stdout": done.stdout, "stderr": done.stderr}


def _ask(checkpoint: Path, slide: Path, cache: Path, max_new_tokens: int, src: Path | None, *extra: str,
         warm: bool = False) -> dict[str, Any]:
    argv = [sys.executable, *extra, "-c", CLI, "ask", str(slide), QUESTION, "--checkpoint", str(checkpoint),
            "--cache", str(cache), "--max-new-tokens", str(max_new_tokens), "--device", "cpu"]
    return _run(argv, src, warm)


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds a running process has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _warm_ask(checkpoint: Path, slide: Path, cache: Path, max_new_tokens: int, server: int, *extra: str) -> dict[str, Any]:
    """One ask answered by the warm model ``server``, with the CPU the server spent on it."""
    before = _process_cpu(server)
    run = _ask(checkpoint, slide, cache, max_new_tokens, None, *extra, warm=True)
    if f"answered by the warm model (pid {server})" not in run["stderr"]:
        raise SystemExit(f"the warm model {server} did not answer:\n{run['stderr'][-3000:]}")
    return {**run, "server_cpu_s": _process_cpu(server) - before}


def _cache(work: Path, src: Path | None) -> Path:
    """Each source tree keeps its own cache, so neither reads what the other wrote."""
    return work / ("cache-before" if src is not None else "cache-after")


def _imports_by_package(stderr: str) -> dict[str, float]:
    """Self import seconds summed by top-level package, from ``-X importtime`` output."""
    totals: collections.Counter[str] = collections.Counter()
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = line.split(":", 1)[1].split("|")
        package = name.strip().split(".")[0]
        totals[package if package in PACKAGES else "other"] += int(self_us) / 1e6
    return dict(totals)


def source_tree(ref: str, folder: Path) -> Path:
    """The ``src`` folder of git revision ``ref``, extracted once into ``folder``."""
    src = folder / "src"
    if not src.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", ref, "src"], cwd=REPO, capture_output=True, check=True).stdout
        with tempfile.TemporaryFile() as fh:
            fh.write(archive)
            fh.seek(0)
            with tarfile.open(fileobj=fh) as tar:
                tar.extractall(folder, filter="data")
    return src


def describe(checkpoint: Path) -> str:
    """What decides the load and answer time: the LLM, the adapters, the connector."""
    from slidevl.slidellm.checkpoint_layout import open_checkpoint

    folder = open_checkpoint(checkpoint)
    llm = json.loads((folder.llm_dir / "config.json").read_text())
    return (f"{llm.get('model_type')} LLM, {llm.get('num_hidden_layers')} layers x {llm.get('hidden_size')}, "
            f"{'LoRA adapters' if folder.adapter_dir else 'no adapters'}, {folder.config.connector.kind} connector")


def _stats(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f} ({min(values):.2f}–{max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a stage-2 run folder")
    parser.add_argument("--slide", type=Path, required=True, help="a slide file the checkpoint can read")
    parser.add_argument("--work", type=Path, required=True, help="folder for the caches and the --before source tree")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--before", metavar="REF", help="also time the git revision REF, interleaved with the working tree")
    parser.add_argument("--name", default="ask_latency")
    args = parser.parse_args(argv)
    work, checkpoint, slide = args.work.resolve(), args.checkpoint.resolve(), args.slide.resolve()
    trees: dict[str, Path | None] = {"working tree": None}
    if args.before:
        trees = {f"before ({args.before})": source_tree(args.before, work / f"src-{args.before}"), **trees}

    first: dict[str, dict[str, Any]] = {}
    ask_warm.stop_all(_cache(work, None))  # one left by an interrupted run would answer the first ask
    for name, src in trees.items():
        shutil.rmtree(_cache(work, src), ignore_errors=True)
        first[name] = _ask(checkpoint, slide, _cache(work, src), args.max_new_tokens, src)
    # The first ask with keep-warm: the cache is filled, so this is the server's start and load plus one answer.
    here = _cache(work, None)
    warm_first = _ask(checkpoint, slide, here, args.max_new_tokens, None, warm=True)
    warm = ask_warm.target(checkpoint, "cpu", here)
    running = ask_warm.ping(warm.socket) if warm is not None else None
    if warm is None or running is None:
        raise SystemExit(f"the first ask left no warm model:\n{warm_first['stderr'][-3000:]}")
    server = int(running["pid"])
    second: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    warm_runs: list[dict[str, Any]] = []
    floor: dict[str, list[dict[str, Any]]] = {name: [] for name in FLOOR}
    phases: list[dict[str, float]] = []
    for _ in range(args.repeats):
        for name, src in trees.items():
            second[name].append(_ask(checkpoint, slide, _cache(work, src), args.max_new_tokens, src))
        warm_runs.append(_warm_ask(checkpoint, slide, here, args.max_new_tokens, server))
        for name, code in FLOOR.items():
            floor[name].append(_run([sys.executable, "-c", code], None))
        out = _run([sys.executable, "-c", PHASES, str(checkpoint), str(slide), str(_cache(work, None)), str(args.max_new_tokens)], None)
        phases.append(json.loads(out["stdout"].strip().splitlines()[-1]))
    imports = {name: _imports_by_package(_ask(checkpoint, slide, _cache(work, src), args.max_new_tokens, src,
                                              "-X", "importtime")["stderr"])
               for name, src in trees.items()}
    imports["working tree, warm"] = _imports_by_package(
        _warm_ask(checkpoint, slide, here, args.max_new_tokens, server, "-X", "importtime")["stderr"])
    stopped = [info["pid"] for info in ask_warm.stop_all(here)]
    same = [r["stdout"] == second["working tree"][0]["stdout"] for r in [*second["working tree"], warm_first, *warm_runs]]

    lines = [
        "# `slidevl ask`: a second question about the same slide, from a new process",
        "",
        f"Checkpoint `{checkpoint}` ({describe(checkpoint)}), slide `{slide.name}`; "
        f"device cpu, {platform.machine()}, {os.cpu_count()} CPUs, torch's default threads; greedy decoding, at most "
        f"{args.max_new_tokens} new tokens; {args.repeats} repeats, mean ± sd (min–max). The machine is shared: the "
        "1-minute load average during the runs was "
        f"{_stats([r['load'] for runs in [*second.values(), warm_runs] for r in runs])}.",
        "",
        "| command | wall s | CPU s (user + sys) |",
        "|---|---|---|",
    ]
    for name in trees:
        lines.append(f"| first ask, {name} (preprocess + encode the slide) | {first[name]['wall_s']:.2f} | "
                     f"{first[name]['cpu_s']:.2f} |")
    for name, runs in second.items():
        lines.append(f"| **second ask, {name}** | **{_stats([r['wall_s'] for r in runs])}** | "
                     f"{_stats([r['cpu_s'] for r in runs])} |")
    lines.append(f"| first ask with keep-warm, working tree (starts the warm model: its imports and load, then the answer) | "
                 f"{warm_first['wall_s']:.2f} | {warm_first['cpu_s']:.2f} (asking process only) |")
    lines.append(f"| **second ask, warm model (working tree)** | **{_stats([r['wall_s'] for r in warm_runs])}** | "
                 f"{_stats([r['cpu_s'] + r['server_cpu_s'] for r in warm_runs])}: asking process "
                 f"{_stats([r['cpu_s'] for r in warm_runs])} + warm model {_stats([r['server_cpu_s'] for r in warm_runs])} |")
    for name, runs in floor.items():
        lines.append(f"| floor: {name} | {_stats([r['wall_s'] for r in runs])} | {_stats([r['cpu_s'] for r in runs])} |")
    quiet = [r for r in second["working tree"] if not r["stderr"].strip()]
    lines += ["", f"Second asks of the working tree that printed nothing but the answer: {len(quiet)} of "
              f"{len(second['working tree'])} (the cache location is said once, when the cache is created). Answers of "
              f"the warm model equal to the in-process answer: {sum(same[len(second['working tree']):])} of "
              f"{len(same) - len(second['working tree'])}; the warm model (pid {server}) stopped at the end: "
              f"{'yes' if server in stopped else 'no'}.", "",
              "Inside one process of the working tree (wall s, mean ± sd (min–max)):", "",
              "| phase | s |", "|---|---|"]
    for phase in phases[0]:
        lines.append(f"| {phase} | {_stats([p[phase] for p in phases])} |")
    columns = list(imports)
    lines += ["", "Self import time by package in one second ask, in its own process and answered by the warm model "
              "(`-X importtime`, which itself slows imports; s):", "",
              "| package | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    packages = sorted({p for table in imports.values() for p in table}, key=lambda p: -max(t.get(p, 0.0) for t in imports.values()))
    for package in packages:
        lines.append(f"| {package} | " + " | ".join(f"{imports[c].get(package, 0.0):.2f}" for c in columns) + " |")
    lines.append("| total | " + " | ".join(f"{sum(imports[c].values()):.2f}" for c in columns) + " |")
    lines += ["", "A new process that loads the model cannot answer below the floor of torch + transformers + peft; the "
              "warm model pays that once, and a later ask from a new process imports none of them (the warm column) and "
              "pays the CLI's start, the cached slide and the answer. `slidevl ask --interactive` and the viewer's chat "
              "(`slidevl serve --vqa-checkpoint`) also load once and pay only the next-answer time per question.", ""]
    RESULTS.mkdir(exist_ok=True)
    from slidevl.atomic import write_json_atomic, write_text_atomic

    keep = ("wall_s", "cpu_s", "load")
    write_json_atomic(RESULTS / f"{args.name}.json", {
        "benchmark": "ask_latency", "checkpoint": str(checkpoint), "slide": str(slide), "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "first_ask": {name: {k: r[k] for k in keep} for name, r in first.items()},
        "second_ask": {name: [{k: r[k] for k in keep} for r in runs] for name, runs in second.items()},
        "warm_first_ask": {k: warm_first[k] for k in keep},
        "warm_second_ask": [{k: r[k] for k in (*keep, "server_cpu_s")} for r in warm_runs],
        "warm_answers_equal_in_process": same[len(second["working tree"]):],
        "floor": {name: [{k: r[k] for k in keep} for r in runs] for name, runs in floor.items()},
        "phases": phases, "imports_by_package": imports,
    })
    write_text_atomic(RESULTS / f"{args.name}.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
