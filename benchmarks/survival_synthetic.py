"""Survival models on a synthetic cohort: oracle, mean pooling, ABMIL, TransMIL, HiLa and its ablations.

Makes (or reuses) a synthetic cohort with ``slidevl.synth.cohort.make_cohort`` and its
feature store with ``slidevl.features.pipeline.preprocess`` — both resumable — or
takes ``--features/--clinical/--splits/--truth`` of an existing one. Every model is
cross-validated on the cohort's own splits with the same seed and the final epoch is
evaluated (no selection on validation). The oracle is the planted risk of
``truth.json`` scored on the same validation folds.

Reports 5-fold mean ± std C-index, pooled log-rank p, seconds per epoch (wall and
process CPU) and HiLa's CPU time per epoch relative to ABMIL's, and checks the goals:
HiLa within 0.05 of the oracle, ahead of ABMIL, log-rank p < 0.05.

Writes ``benchmarks/results/<name>.json`` and ``.md``; run folders go to ``--runs``.

    python benchmarks/survival_synthetic.py --cohort /tmp/syn120 --patients 120
    python benchmarks/survival_synthetic.py --features JOB --clinical CSV --splits DIR --truth truth.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _prepare(args: argparse.Namespace) -> tuple[Path, Path, Path, Path]:
    """Paths of (job, clinical, splits, truth): given, or made under ``--cohort``."""
    if args.features:
        return Path(args.features), Path(args.clinical), Path(args.splits), Path(args.truth)
    from slidevl.features.config import PreprocessConfig
    from slidevl.features.pipeline import preprocess
    from slidevl.synth.cohort import make_cohort

    root = Path(args.cohort)
    cohort = root / "cohort"
    if not (cohort / "truth.json").is_file():
        make_cohort(cohort, n_patients=args.patients, seed=args.seed, slide_px=args.slide_px, overwrite=cohort.exists())
    report = preprocess(cohort / "slides", root / "job", PreprocessConfig())
    if report.exit_code:
        raise SystemExit(f"preprocessing failed for some slides; see {report.summary}")
    return root / "job", cohort / "clinical.csv", cohort / "splits", cohort / "truth.json"


def _oracle(truth_path: Path, splits_dir: Path) -> dict[str, Any]:
    """C-index of the planted risk on each validation fold, and its pooled log-rank p."""
    from slidevl.splits import read_splits
    from slidevl.survival.metrics import c_index, stratify

    patients = {p["patient_id"]: p for p in json.loads(truth_path.read_text())["patients"]}
    scores, pooled = [], []
    for _, val in read_splits(splits_dir):
        rows = [patients[pid] for pid in val]
        t, e, r = (np.array([p[k] for p in rows], dtype=float) for k in ("t", "e", "risk"))
        scores.append(c_index(t, e, r))
        pooled += rows
    t, e, r = (np.array([p[k] for p in pooled], dtype=float) for k in ("t", "e", "risk"))
    scores_arr = np.array(scores)
    return {"model": "oracle (planted risk)", "c_index": {"folds": scores, "mean": float(scores_arr.mean()),
            "std": float(scores_arr.std())}, "logrank_p": stratify(t, e, r).p_value}


def _run(name: str, job: Path, clinical: Path, splits: Path, runs: Path, args: argparse.Namespace, **cfg: Any) -> dict:
    from slidevl.survival.cv import CVConfig, run_cv

    out = runs / name
    config = CVConfig(features=job, clinical=clinical, splits=splits, out=out, epochs=args.epochs, seed=args.seed,
                      grad_accum=args.grad_accum, lr=args.lr, device=args.device, prompts="synthetic", **cfg)
    done = out / "summary.json"
    if done.is_file() and not args.rerun:
        summary = json.loads(done.read_text())
        if summary.get("config") == config.as_dict():
            return summary
    return run_cv(config, overwrite=True)  # a stale or --rerun run folder is replaced, not mixed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cohort", default="/tmp/slidevl_survival_bench", help="Folder for a generated cohort and its job.")
    parser.add_argument("--patients", type=int, default=120)
    parser.add_argument("--slide-px", type=int, default=8192)
    parser.add_argument("--features", help="Existing job folder (skips generation); needs --clinical --splits --truth.")
    parser.add_argument("--clinical")
    parser.add_argument("--splits")
    parser.add_argument("--truth")
    parser.add_argument("--models", default="meanpool,abmil,transmil,hila")
    parser.add_argument("--variants", default="A,B,C,D", help="HiLa ablations to run besides full ('' for none).")
    parser.add_argument("--ratios", default="1.0", help="Extra HiLa (full) runs with these token keep ratios ('' for none).")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grad-accum", type=int, default=32, help="Patients per optimiser step (paper: 32).")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 suits small bags on shared machines).")
    parser.add_argument("--runs", default=None, help="Where run folders go (default: COHORT/runs).")
    parser.add_argument("--rerun", action="store_true", help="Re-train even when a matching run folder exists.")
    parser.add_argument("--name", default="survival_synthetic")
    parser.add_argument("--note", default="", help="A paragraph for the results file (e.g. why the recipe differs).")
    args = parser.parse_args()

    import torch

    from slidevl.atomic import write_json_atomic, write_text_atomic

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    job, clinical, splits, truth = _prepare(args)
    runs = Path(args.runs) if args.runs else Path(args.cohort) / "runs"
    rows = [_oracle(truth, splits)]
    summaries: dict[str, dict] = {}
    for model in [m for m in args.models.split(",") if m]:
        summaries[model] = _run(model, job, clinical, splits, runs, args, model=model)
        if model == "hila":
            for variant in [v for v in args.variants.split(",") if v]:
                summaries[f"hila-{variant}"] = _run(f"hila_{variant}", job, clinical, splits, runs, args, model="hila", variant=variant)
            for ratio in [float(r) for r in args.ratios.split(",") if r]:
                summaries[f"hila-r{ratio:g}"] = _run(f"hila_r{ratio:g}", job, clinical, splits, runs, args, model="hila",
                                                     model_options={"ratio": ratio})

    for name, s in summaries.items():
        rows.append({"model": name, "c_index": s["c_index"], "logrank_p": s["logrank_p"],
                     "epoch_seconds": s["timing"]["mean_epoch_seconds"], "epoch_cpu_seconds": s["timing"]["mean_epoch_cpu_seconds"],
                     "run": str(Path(s["config"]["out"]))})
    oracle = rows[0]["c_index"]["mean"]
    goals: dict[str, Any] = {}
    if "hila" in summaries:
        hila = summaries["hila"]
        goals["hila_within_0.05_of_oracle"] = hila["c_index"]["mean"] >= oracle - 0.05
        goals["hila_logrank_p_below_0.05"] = hila["logrank_p"] < 0.05
        if "abmil" in summaries:
            abmil = summaries["abmil"]
            goals["hila_ahead_of_abmil"] = hila["c_index"]["mean"] > abmil["c_index"]["mean"]
            goals["hila_epoch_cpu_time_vs_abmil"] = hila["timing"]["mean_epoch_cpu_seconds"] / abmil["timing"]["mean_epoch_cpu_seconds"]
            goals["hila_epoch_wall_time_vs_abmil"] = hila["timing"]["mean_epoch_seconds"] / abmil["timing"]["mean_epoch_seconds"]
    any_summary = next(iter(summaries.values()), None)
    result = {
        "cohort": {"features": str(job), "clinical": str(clinical), "splits": str(splits), "truth": str(truth),
                   **({k: any_summary["cohort"][k] for k in ("patients", "slides", "events")} if any_summary else {})},
        "protocol": {"epochs": args.epochs, "seed": args.seed, "threads": args.threads,
                     "train": any_summary["train"] if any_summary else None,
                     "evaluation": "final epoch of each fold, no selection on validation",
                     **({"note": args.note} if args.note else {})},
        "rows": rows,
        "goals": goals,
        "seconds": time.perf_counter() - started,
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / f"{args.name}.json", result)
    lines = [
        "# Survival on the synthetic cohort",
        "",
        f"{result['cohort'].get('patients', '?')} patients, {result['cohort'].get('slides', '?')} slides, "
        f"{result['cohort'].get('events', '?')} events; the cohort's 5 folds; {args.epochs} epochs, lr {args.lr:g}, "
        f"gradient accumulation {args.grad_accum} (one patient per step), seed {args.seed}, final epoch evaluated, "
        "same recipe for every model. Seconds per epoch: wall (process CPU).",
        "",
        *([args.note, ""] if args.note else []),
        "| model | C-index mean ± std | folds | log-rank p | s / epoch |",
        "|---|---:|---|---:|---:|",
    ]
    for row in rows:
        ci = row["c_index"]
        folds = " ".join(f"{c:.3f}" for c in ci["folds"])
        timing = f"{row['epoch_seconds']:.2f} ({row['epoch_cpu_seconds']:.2f})" if "epoch_seconds" in row else "—"
        lines.append(f"| {row['model']} | {ci['mean']:.3f} ± {ci['std']:.3f} | {folds} | {row['logrank_p']:.2e} | {timing} |")
    lines += ["", "Goals: " + ", ".join(f"{k} = {v:.2f}" if isinstance(v, float) else f"{k} = {v}" for k, v in goals.items()), ""]
    write_text_atomic(RESULTS / f"{args.name}.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
