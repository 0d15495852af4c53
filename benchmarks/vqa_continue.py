"""Continue a finished ``vqa_ablations.py`` variant's stage 2 for more epochs, then score it.

No canonical result: a continued run's numbers depend on the run it continues, so its
tables (``benchmarks/results/<name>.json`` and ``.md``) are for reading, not for keeping.
For example, four more epochs of the MLP connector of ``vqa_ablations.py``'s default run::

    python benchmarks/vqa_continue.py --work /tmp/vqa_bench --variant mlp_all_tokens --epochs 4 --name mlp_more

A stage-2 checkpoint given as ``init`` keeps training its LoRA adapters and connector
(with a fresh learning-rate schedule), so a variant can be trained longer without
starting again, on its own data or on another preprocessing of the same cohort
(``--data``: a folder with ``job/`` and ``qa/`` whose test patients are the run's).
``--source`` continues any stage-2 folder instead of ``runs/<variant>/stage2``;
``--pooled-tokens`` and ``--patch-scaling per_dim`` change how the connector reads (a
shared-scale checkpoint is converted without changing its outputs); ``--probe`` adds the
feature probes per template. The continued run (``runs/<name>`` of the data folder), its
answers (free, ranked, and the shuffled-image control) and its scores stay there.
Finished steps are reused.
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
from vqa_probes import PROBES, probe_features, template_key


def epochs_so_far(checkpoint: Path) -> int:
    """Stage-2 epochs behind a checkpoint, following its chain of stage-2 ``init`` runs."""
    run = json.loads((checkpoint / "run.json").read_text())
    init = run.get("init")
    earlier = Path(init) if init and (Path(init) / "run.json").is_file() else None
    if earlier is None or json.loads((earlier / "run.json").read_text()).get("stage") != "stage2":
        return int(run["train"]["epochs"])
    return int(run["train"]["epochs"]) + epochs_so_far(earlier)


def same_test_slides(a: Path, b: Path) -> None:
    """Refuse to score on a test split whose slides differ from the ones the run held out."""
    from slidevl.qa.records import read_records

    sa, sb = ({r.slide for r in read_records(p)} for p in (a, b))
    if sa != sb:
        raise SystemExit(f"{b} tests other slides than {a} ({len(sa ^ sb)} differ): the continued run may have "
                         "trained on its test slides")


def single_choice_by_template(report: dict[str, Any], keys: dict[str, str]) -> dict[str, dict[str, float]]:
    """Single-choice ``n`` and accuracy per template key (``keys``: record id -> ``level/template``)."""
    hits: dict[str, list[float]] = {}
    for row in report["records"]:
        if row["id"] in keys:
            hits.setdefault(keys[row["id"]], []).append(row["score"])
    return {key: {"n": len(h), "accuracy": round(sum(h) / len(h), 4)} for key, h in sorted(hits.items())}


def continue_run(source: Path, folder: Path, epochs: int, lr: float, seed: int, data: Path | None,
                 probe: bool, reading: dict[str, Any]) -> dict[str, Any]:
    from slidevl.slidellm.checkpoint_layout import open_checkpoint
    from slidevl.qa.records import read_records
    from slidevl.vqa.evaluate import evaluate

    base = json.loads((source / "run.json").read_text())
    records, job = Path(base["records"]), Path(base["job"])
    if data is not None:
        same_test_slides(records.with_name("test.jsonl"), data / "qa" / "test.jsonl")
        records, job = data / "qa" / "train.jsonl", data / "job"
    summary = run_stage_once({
        "stage": "stage2", "records": str(records), "out": str(folder / "stage2"), "job": str(job), "encoder": base["encoder"],
        "init": str(source), "connector": reading, "train": _train(seed, base["train"]["batch_size"], epochs, lr=lr)})
    test = records.with_name("test.jsonl")
    templates = {r.id: template_key(r) for r in read_records(test) if r.format == "single"}
    connector = open_checkpoint(folder / "stage2").config.connector
    scores: dict[str, Any] = {"connector": connector.kind, "pooled_tokens": connector.pooled_tokens,
                              "patch_scaling": connector.patch_scaling,
                              "previous_epochs": epochs_so_far(source), "epochs": epochs, "lr": lr, "source": str(source),
                              "data": str(data or job.parent), "training": summary}
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
            "single_by_template": single_choice_by_template(report, templates),
        }
    if probe:
        cohort = Path(json.loads((test.parent / "summary.json").read_text())["cohort"])
        scores["probe"] = probe_features(job, test.parent, cohort)
    return scores


def render(name: str, variant: str, s: dict[str, Any]) -> str:
    def row(label: str, r: dict[str, Any]) -> str:
        lv, fm = r["by_level"], r["by_format"]
        return (f"| {label} | {r['all']:.3f} | " + " | ".join(f"{lv.get(k, float('nan')):.3f}" for k in ("WSI", "ROI", "patch"))
                + f" | {fm.get('single', float('nan')):.3f} | {fm.get('multi', float('nan')):.3f} |")

    t = s["training"]
    return "\n".join([
        f"# Slide VQA: `{variant}` ({s['connector']} connector{' with pooled tokens' if s.get('pooled_tokens') else ''}"
        f"{', patches scaled per dimension' if s.get('patch_scaling') == 'per_dim' else ''}) "
        f"trained longer ({name})",
        "",
        (f"Stage 2 continued from the finished {s['previous_epochs']}-epoch run for {s['epochs']} more epochs "
        f"(learning rate {s['lr']:g}, fresh schedule) on the data in `{s['data']}`: {t['steps']} steps, loss "
        f"{t['first_loss']:.3f} -> {t['final_loss']:.3f}, {t['seconds'] / 60:.1f} min."),
        "",
        "| answers | acc all | acc WSI | acc ROI | acc patch | acc single | acc multi |",
        "|---|---|---|---|---|---|---|",
        row("free generation", s["predictions"]),
        row("single-choice ranked", s["predictions_ranked"]),
        row("another slide's image", s["predictions_shuffled"]),
        *_template_table(s),
        "",
        (f"Machine: CPU only; {torch.get_num_threads()} torch threads in the invocation that wrote this file (finished "
         "stages and answers are reused, so it may not be the one that trained)."),
        "",
    ])


def _template_table(s: dict[str, Any]) -> list[str]:
    """Single-choice accuracy per template, free and ranked, beside the probes when they ran."""
    free, ranked = s["predictions"].get("single_by_template"), s["predictions_ranked"].get("single_by_template")
    if not free:
        return []
    probe = s.get("probe", {}).get("by_key", {})
    names = ("majority", *PROBES) if probe else ()
    lines = ["", "Single-choice accuracy per template" + (" beside the probes of `vqa_probes.py` on the same data "
             f"(patch tissue classifier accuracy {s['probe']['patch_tissue_accuracy']:.3f}; share of each class's area "
             "in the kept patches: " + ", ".join(f"{k} {v:.2f}" for k, v in s["probe"]["class_coverage"].items()) + ")"
             if probe else "") + ":", "",
             "| level / template | n | free | ranked |" + "".join(f" {name} |" for name in names),
             "|---|---|---|---|" + "---|" * len(names)]
    for key, row in free.items():
        cells = "".join(f" {probe.get(key, {}).get(name, float('nan')):.2f} |" for name in names)
        lines.append(f"| {key} | {row['n']} | {row['accuracy']:.2f} | {ranked[key]['accuracy']:.2f} |{cells}")
    return lines


def main(argv: list[str] | None = None) -> int:
    from slidevl.atomic import write_json_atomic, write_text_atomic

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="the work folder of a vqa_ablations.py run")
    parser.add_argument("--variant", default="mlp_all_tokens", help="continue runs/<variant>/stage2 of --work")
    parser.add_argument("--source", help="continue this stage-2 checkpoint folder instead (named by its run folder)")
    parser.add_argument("--data", help="train and test on this folder's job/ and qa/ (default: the run's own)")
    parser.add_argument("--probe", action="store_true", help="also fit the feature probes and compare per template")
    parser.add_argument("--pooled-tokens", action="store_true",
                        help="MLP connector: continue with its pooled tokens on (no new weights)")
    parser.add_argument("--patch-scaling", choices=("shared", "per_dim"),
                        help="continue with this patch standardisation (shared -> per_dim converts the weights)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2.5e-4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    parser.add_argument("--name", required=True, help="result file stem under benchmarks/results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = Path(args.work)
    source = Path(args.source) if args.source else work / "runs" / args.variant / "stage2"
    data = Path(args.data) if args.data else None
    folder = (data or work) / "runs" / args.name
    reading: dict[str, Any] = {"pooled_tokens": True} if args.pooled_tokens else {}
    if args.patch_scaling:
        reading["patch_scaling"] = args.patch_scaling
    scores = continue_run(source, folder, args.epochs, args.lr, args.seed, data, args.probe, reading)
    label = source.parent.name if args.source else args.variant
    write_json_atomic(RESULTS / f"{args.name}.json", {"variant": label, **scores})
    write_text_atomic(RESULTS / f"{args.name}.md", render(args.name, label, scores))
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min -> {RESULTS / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
