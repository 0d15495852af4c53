"""Continue a finished ``vqa_ablations.py`` variant's stage 2 for more epochs, then score it.

A stage-2 checkpoint given as ``init`` keeps training its LoRA adapters and connector
(with a fresh learning-rate schedule), so a variant can be trained longer without
starting again. The continued run, its answers (free, ranked, and the shuffled-image
control) and its scores stay in the work folder; the tables go to
``benchmarks/results/<name>.json`` and ``.md``. Finished steps are reused.

    python benchmarks/vqa_continue.py --work /tmp/vqa_big --variant mlp_all_tokens --epochs 4 --lr 2.5e-4 \\
        --name vqa_big_mlp_8ep   # the committed result: 4 + 4 epochs on 96 patients
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from vqa_ablations import RESULTS, _train, answer_test, run_stage_once


def continue_variant(work: Path, variant: str, epochs: int, lr: float, seed: int) -> dict[str, Any]:
    from slidevl.vqa.evaluate import evaluate

    source = work / "runs" / variant / "stage2"
    base = json.loads((source / "run.json").read_text())
    folder = work / "runs" / f"{variant}_continued"
    summary = run_stage_once(dict(
        stage="stage2", records=base["records"], out=str(folder / "stage2"), job=base["job"], encoder=base["encoder"],
        init=str(source), train=_train(seed, base["train"]["batch_size"], epochs, lr=lr)))
    test, job = Path(base["records"]).with_name("test.jsonl"), Path(base["job"])
    scores: dict[str, Any] = {"previous_epochs": base["train"]["epochs"], "epochs": epochs, "lr": lr, "training": summary}
    for stem, shuffle, rank in (("predictions", False, False), ("predictions_ranked", False, True),
                                ("predictions_shuffled", True, False)):
        pred, per_answer = answer_test(folder / "stage2", test, job, folder / f"{stem}.jsonl", 64,
                                       shuffle_visuals=shuffle, rank_single=rank)
        report = evaluate(pred, test, out=folder / f"evaluation_{stem}.json")
        scores[stem] = {
            "all": report["overall"]["accuracy"],
            "by_level": {k: v["accuracy"] for k, v in report["by_level"].items()},
            "by_format": {k: v.get("accuracy") for k, v in report["by_format"].items() if v.get("accuracy") is not None},
            "seconds_per_answer": round(per_answer, 4),
        }
    return scores


def render(name: str, variant: str, s: dict[str, Any]) -> str:
    def row(label: str, r: dict[str, Any]) -> str:
        lv, fm = r["by_level"], r["by_format"]
        return (f"| {label} | {r['all']:.3f} | " + " | ".join(f"{lv.get(k, float('nan')):.3f}" for k in ("WSI", "ROI", "patch"))
                + f" | {fm.get('single', float('nan')):.3f} | {fm.get('multi', float('nan')):.3f} |")

    t = s["training"]
    return "\n".join([
        f"# Slide VQA: `{variant}` trained longer ({name})",
        "",
        f"Stage 2 continued from the finished {s['previous_epochs']}-epoch run for {s['epochs']} more epochs "
        f"(learning rate {s['lr']:g}, fresh schedule): {t['steps']} steps, loss {t['first_loss']:.3f} -> "
        f"{t['final_loss']:.3f}, {t['seconds'] / 60:.1f} min.",
        "",
        "| answers | acc all | acc WSI | acc ROI | acc patch | acc single | acc multi |",
        "|---|---|---|---|---|---|---|",
        row("free generation", s["predictions"]),
        row("single-choice ranked", s["predictions_ranked"]),
        row("another slide's image", s["predictions_shuffled"]),
        "",
        f"Machine: CPU only, {torch.get_num_threads()} torch threads.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    from slidevl.atomic import write_json_atomic, write_text_atomic

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="the work folder of a vqa_ablations.py run")
    parser.add_argument("--variant", default="mlp_all_tokens")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2.5e-4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    parser.add_argument("--name", required=True, help="result file stem under benchmarks/results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    scores = continue_variant(Path(args.work), args.variant, args.epochs, args.lr, args.seed)
    write_json_atomic(RESULTS / f"{args.name}.json", {"variant": args.variant, **scores})
    write_text_atomic(RESULTS / f"{args.name}.md", render(args.name, args.variant, scores))
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min -> {RESULTS / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
