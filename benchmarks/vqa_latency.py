"""Latency of ``slidevl ask``: raw slide -> first answer, and cached features -> answer.

Three paths, timed in-process with the same calls the CLI makes:

* ``raw_slide``: a fresh cache; load the checkpoint, preprocess the slide file (tissue,
  tiles, features), run the topo-pack encoder, answer one question;
* ``cached_features``: the slide's features exist; load, encode, answer;
* ``cached_tokens``: features and encoder outputs are cached; load, answer
  (what a second ``slidevl ask`` about the same slide costs);

and, inside a loaded session, the time per further answer. Medians over ``--repeats``.
Results go to ``benchmarks/results/vqa_latency.json`` and ``.md``.

    python benchmarks/vqa_latency.py --checkpoint /tmp/slidevl_vqa_ablations/runs/full/stage2 \\
        --slide /tmp/slidevl_vqa_ablations/cohort/slides/SYN-0000-01.tiff
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS = (
    "Describe this whole-slide image.",
    "Which tissue is dominant on this slide?\nA. tumour\nB. fibrous stroma\nC. normal parenchyma\nD. necrosis",
)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def one_path(checkpoint: Path, slide: str, job: Path | None, cache: Path, question: str, max_new_tokens: int,
             device: str, workers: int | None) -> dict[str, float]:
    from slidevl.slidellm.ask import SlideAssistant

    assistant, load_s = _timed(lambda: SlideAssistant(checkpoint, device=device, cache_root=cache, preprocess_workers=workers))
    visual, open_s = _timed(lambda: assistant.open_slide(slide, job=job))
    chat = assistant.conversation(visual)
    answer, answer_s = _timed(lambda: chat.ask(question, max_new_tokens=max_new_tokens))
    follow, follow_s = _timed(lambda: chat.ask(QUESTIONS[1], max_new_tokens=max_new_tokens))
    n_tokens = len(assistant.tokenizer(answer, add_special_tokens=False)["input_ids"])
    return {"load_s": load_s, "open_slide_s": open_s, "answer_s": answer_s, "total_s": load_s + open_s + answer_s,
            "follow_up_s": follow_s, "answer_tokens": n_tokens, "packs": int(visual.summary.shape[0])}


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="stage-2 run folder")
    parser.add_argument("--slide", required=True, help="a slide file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=None, help="tile-reading processes (pipeline default when omitted)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    parser.add_argument("--name", default="vqa_latency")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from slidevl.atomic import write_json_atomic, write_text_atomic
    from slidevl.features.jobs import slide_id_of

    hf_logging.disable_progress_bar()
    checkpoint, slide = Path(args.checkpoint), Path(args.slide)
    slide_id = slide_id_of(slide)
    paths: dict[str, list[dict[str, float]]] = {"raw_slide": [], "cached_features": [], "cached_tokens": []}
    with tempfile.TemporaryDirectory(prefix="vqa_latency_") as tmp:
        root = Path(tmp)
        for i in range(args.repeats):
            cold = root / f"cold{i}"
            paths["raw_slide"].append(one_path(checkpoint, str(slide), cold, cold, QUESTIONS[0], args.max_new_tokens,
                                               args.device, args.workers))
            # Same features, empty encoder-output cache.
            warm_cache = root / f"enc{i}"
            paths["cached_features"].append(one_path(checkpoint, slide_id, cold, warm_cache, QUESTIONS[0],
                                                     args.max_new_tokens, args.device, args.workers))
            paths["cached_tokens"].append(one_path(checkpoint, slide_id, cold, warm_cache, QUESTIONS[0],
                                                   args.max_new_tokens, args.device, args.workers))
            shutil.rmtree(cold, ignore_errors=True)
    summary = {name: _median(runs) for name, runs in paths.items()}
    result = {
        "benchmark": "vqa_latency",
        "checkpoint": str(checkpoint),
        "slide": str(slide),
        "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens,
        "device": args.device,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "median": summary,
        "runs": paths,
    }
    write_json_atomic(RESULTS / f"{args.name}.json", result)
    lines = [
        "# slidevl ask latency",
        "",
        f"Slide `{slide.name}` ({summary['raw_slide']['packs']} packs), checkpoint `{checkpoint}`, device {args.device}, "
        f"{result['machine']}; medians of {args.repeats} runs; greedy decoding, at most {args.max_new_tokens} new tokens.",
        "",
        "| path | load checkpoint (s) | slide -> visual tokens (s) | first answer (s) | total to first answer (s) | next answer (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in summary.items():
        lines.append(f"| {name} | {m['load_s']:.2f} | {m['open_slide_s']:.2f} | {m['answer_s']:.2f} | {m['total_s']:.2f} | "
                     f"{m['follow_up_s']:.2f} |")
    lines += ["", "raw_slide includes preprocessing (tissue, tiles, features) and the encoder; cached_features the "
              "encoder; cached_tokens neither.", ""]
    write_text_atomic(RESULTS / f"{args.name}.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
