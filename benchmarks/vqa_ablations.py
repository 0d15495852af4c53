"""Slide VQA ablations on a synthetic cohort: accuracy per level and format.

Pipeline (every step is skipped when its output is already there, so an interrupted
run continues where it stopped)::

    cohort (slidevl.synth) -> features (slidevl preprocess) -> QA train/test (slidevl vqa build)
    -> topo-pack encoders pretrained with MAE -> MoCo: sparse (topo mask) and dense mask
    -> embedded LM language warm-up (shared by every variant)
    -> per variant: stage 1 (captions, connector) -> stage 2 (VQA, connector + LoRA)
       -> greedy answers to test.jsonl -> slidevl.vqa.evaluate (accuracy, METEOR)

Variants (each changes one thing relative to ``full``):

    full            sparse encoder, MAE+MoCo, Q-Former with 32 queries reading the summary tokens
                    and the patch features under the box, two-stage tuning
    no_patches      the connector reads the summary tokens (and global token) only
    llm_full        stage 2 tunes every weight of the embedded LM instead of LoRA adapters
    dense_encoder   encoder pretrained and used with the dense attention mask
    queries_500     Q-Former with 500 queries
    mlp_all_tokens  2-layer MLP per token, every summary token (+ global) to the LLM
    mlp_pooled      mlp_all_tokens plus the mean of its outputs over the summary tokens and the patches
    no_pretraining  same encoder architecture, random weights
    one_stage       no stage 1: stage 2 starts from a fresh connector

Diagnostics next to the variants: per-template probes from the patch features to the
correct option (is the answer in the features at all? see ``vqa_probes.py``), and some
variants answering with another test slide's visual tokens (do they look?).

Results go to ``benchmarks/results/vqa_ablations.json`` and ``.md``; the work folder keeps
every intermediate (cohort, job, QA, encoders, runs, predictions, evaluation reports).

    python benchmarks/vqa_ablations.py --work /tmp/vqa_bench --threads 1  # the committed size
    # The committed result: data and encoders once (~12 min); the warm-up; the variants trained in
    # processes side by side (--variants ... --name part_k --threads 1 each, one core each, 10-15 min per
    # variant); then one run over all of them (--name vqa_ablations), which reuses every finished stage
    # and answer and adds the ranked answers and controls. queries_500 was left out: its stage 1 had not
    # finished after 24 min (the 32-query stage 1 takes under 2 min).
    # vqa_full_long / vqa_mlp_long / vqa_mlp_10ep: --variants full|mlp_all_tokens --set stage2_epochs=6 (10), reusing the
    # stage 1 and warm-up of the run above.
    # vqa_big (96 patients, 4 epochs of stage 2): --work /tmp/vqa_big --set patients=96 --set stage2_epochs=4, one
    # process per variant (mlp_all_tokens with --threads 2, full with --threads 1, side by side; ~1 h each), then
    # one run over both (--variants mlp_all_tokens,full --name vqa_big) for the combined tables and probes.
    python benchmarks/vqa_ablations.py --work /tmp/vqa_q --quick           # minutes, smoke-level numbers
    python benchmarks/vqa_ablations.py --cohort C --job J --qa Q ...    # reuse existing data
    # vqa_fat_*: the vqa_big cohort preprocessed again with adipose recovery (the default since), then
    # the vqa_big MLP run continued on it with vqa_continue.py (see there):
    python benchmarks/vqa_ablations.py --work /tmp/vqa_fat --cohort /tmp/vqa_big/cohort --data-only
    # vqa_fresh_pooled_5ep: the best recipe from scratch in one run (per-dimension patch scaling, pooled
    # tokens, 12 extra ROIs and 48 patch fields per training slide; 1 h 47 min on 2 cores, data included):
    python benchmarks/vqa_ablations.py --work /tmp/vqa_big --set patients=96 --data-only --threads 2
    slidevl vqa build --cohort /tmp/vqa_big/cohort --job /tmp/vqa_big/job --out /tmp/vqa_big/qa_fq \
        --train-extra-rois 12 --train-patch-fields 48
    python benchmarks/vqa_ablations.py --work /tmp/vqa_big --cohort /tmp/vqa_big/cohort --job /tmp/vqa_big/job \
        --qa /tmp/vqa_big/qa_fq --variants mlp_pooled --set patients=96 --set stage2_epochs=5 --threads 2 \
        --name vqa_fresh_pooled_5ep
    # vqa_ss_fresh_3ep: the same from scratch with the slide's share questions asked of every training ROI,
    # 3 stage-2 epochs (the data step as above, then):
    slidevl vqa build --cohort /tmp/vqa_big/cohort --job /tmp/vqa_big/job --out /tmp/vqa_big/qa_ss \
        --train-extra-rois 11 --train-patch-fields 40 --train-slide-scale
    python benchmarks/vqa_ablations.py --work /tmp/vqa_big --cohort /tmp/vqa_big/cohort --job /tmp/vqa_big/job \
        --qa /tmp/vqa_big/qa_ss --variants mlp_pooled --set patients=96 --set stage2_epochs=3 --threads 2 \
        --name vqa_ss_fresh_3ep
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from vqa_probes import probe_features, render_probes

RESULTS = Path(__file__).resolve().parent / "results"
#: Variants also answered with another slide's visual input (does the model look?).
CONTROLLED = ("full", "llm_full", "mlp_all_tokens", "mlp_pooled")

VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "no_patches": {"connector": {"use_patches": False}},
    "llm_full": {"llm_tuning": "full"},
    "dense_encoder": {"encoder": "dense"},
    "queries_500": {"connector": {"num_queries": 500}},
    "mlp_all_tokens": {"connector": {"kind": "mlp"}},
    "mlp_pooled": {"connector": {"kind": "mlp", "pooled_tokens": True}},
    "no_pretraining": {"encoder_init": "random"},
    "one_stage": {"two_stage": False},
}


@dataclass
class Sizes:
    """Everything that sets the cost of a run (``--quick`` shrinks all of it).

    The defaults are the size the committed results were run at (see the module docstring).
    """

    patients: int = 24
    slide_px: int = 4096
    mae_steps: int = 80
    moco_steps: int = 40
    warmup_epochs: int = 2
    stage1_epochs: int = 4
    stage2_epochs: int = 2
    batch_size: int = 8
    max_new_tokens: int = 64


QUICK = Sizes(patients=8, slide_px=4096, mae_steps=20, moco_steps=10, warmup_epochs=2, stage1_epochs=1,
              stage2_epochs=1, max_new_tokens=48)


def _log(message: str) -> None:
    print(f"[vqa_ablations {time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepare_data(args: argparse.Namespace, sizes: Sizes, work: Path) -> tuple[Path, Path, Path]:
    """Cohort, feature job and QA folder: given ones are used as they are, missing ones are made."""
    from slidevl.features.config import PreprocessConfig
    from slidevl.features.pipeline import preprocess
    from slidevl.synth.cohort import make_cohort
    from slidevl.vqa.build import build_qa

    cohort = Path(args.cohort) if args.cohort else work / "cohort"
    if not (cohort / "truth.json").is_file():
        _log(f"rendering a cohort of {sizes.patients} patients into {cohort}")
        make_cohort(cohort, n_patients=sizes.patients, seed=args.seed, slide_px=sizes.slide_px)
    job = Path(args.job) if args.job else work / "job"
    if not args.job:
        _log(f"preprocessing {cohort / 'slides'} into {job} (skips complete slides)")
        report = preprocess(cohort / "slides", job, PreprocessConfig(progress=False))
        if report.n_failed:
            raise SystemExit(f"preprocessing failed for {report.n_failed} slide(s); see {job / 'summary.md'}")
    qa = Path(args.qa) if args.qa else work / "qa"
    if not (qa / "test.jsonl").is_file():
        _log(f"building template QA into {qa}")
        build_qa(cohort, job, qa, progress=False)
    return cohort, job, qa


def pretrain_encoders(job: Path, work: Path, sizes: Sizes, seed: int, names: set[str]) -> dict[str, Path]:
    """MAE -> MoCo pretraining of the encoders in ``names``: sparse (``topo``) and/or ``dense`` mask."""
    from slidevl.slidellm.recipe import pretrain_encoder

    out: dict[str, Path] = {}
    for name in sorted(names):
        _log(f"{name} encoder: {sizes.mae_steps} MAE + {sizes.moco_steps} MoCo steps (skipped when done)")
        out[name] = pretrain_encoder(job, work / "encoders" / name, mae_steps=sizes.mae_steps, moco_steps=sizes.moco_steps,
                                     seed=seed, mask_variant=name, progress=False)
    return out


def _train(seed: int, batch_size: int, epochs: int, **kw: Any) -> dict[str, Any]:
    return dict(epochs=epochs, batch_size=batch_size, seed=seed, save_every=10_000, **kw)


def run_stage_once(cfg_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run a tuning stage unless its run folder already finished; return its summary."""
    from slidevl.slidellm import recipe
    from slidevl.slidellm.tuning.config import TuneConfig

    _log(f"{cfg_kwargs['stage']} -> {cfg_kwargs['out']} (skipped when done)")
    return recipe.run_stage_once(TuneConfig.from_dict(cfg_kwargs))


def answer_test(checkpoint: Path, test: Path, job: Path, out: Path, max_new_tokens: int,
                *, shuffle_visuals: bool = False, rank_single: bool = False) -> tuple[Path, float]:
    """Greedy answers to every test record; returns the prediction file and seconds per answer.

    ``shuffle_visuals`` is the "does the model look?" control: every record is answered
    with the whole-slide visual tokens of another test slide (same text prompt).
    ``rank_single`` answers single-choice records with the model's most likely option.
    """
    from dataclasses import replace as replace_record

    from slidevl.atomic import write_json_atomic
    from slidevl.slidellm.ask import SlideAssistant
    from slidevl.vqa.predictions import write_predictions
    from slidevl.vqa.records import read_records

    if out.is_file():
        meta = json.loads(out.with_suffix(".meta.json").read_text())
        return out, meta["seconds_per_answer"]
    records = read_records(test)
    assistant = SlideAssistant(checkpoint, cache_root=out.parent / "ask_cache")
    slides = sorted({r.slide for r in records})
    visuals = {s: assistant.open_slide(s, job=job) for s in slides}
    asked = records
    if shuffle_visuals:
        other = {s: visuals[slides[(i + max(1, len(slides) // 2)) % len(slides)]] for i, s in enumerate(slides)}
        visuals = other
        asked = [replace_record(r, bbox=None) for r in records]
    started = time.perf_counter()
    answers = assistant.answer_records(asked, visuals, max_new_tokens=max_new_tokens, batch_size=16,
                                       rank_single=rank_single)
    per_answer = (time.perf_counter() - started) / len(records)
    write_predictions(out, {r.id: a for r, a in zip(records, answers)})
    write_json_atomic(out.with_suffix(".meta.json"), {"seconds_per_answer": per_answer})
    return out, per_answer


def run_variant(name: str, spec: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    sizes: Sizes = ctx["sizes"]
    folder: Path = ctx["work"] / "runs" / name
    encoder = ctx["encoders"]["dense" if spec.get("encoder") == "dense" else "topo"]
    common = dict(records=str(ctx["qa"] / "train.jsonl"), job=str(ctx["job"]), encoder=str(encoder),
                  encoder_init=spec.get("encoder_init", "pretrained"))
    summaries = {}
    init = None
    if spec.get("two_stage", True):
        summaries["stage1"] = run_stage_once(dict(
            stage="stage1", out=str(folder / "stage1"), llm=str(ctx["llm"]), connector=spec.get("connector", {}),
            train=_train(ctx["seed"], sizes.batch_size, sizes.stage1_epochs), **common))
        init = str(folder / "stage1")
    stage2 = dict(stage="stage2", out=str(folder / "stage2"), train=_train(ctx["seed"], sizes.batch_size, sizes.stage2_epochs),
                  llm_tuning=spec.get("llm_tuning", "lora"), **common)
    if init is None:
        stage2.update(llm=str(ctx["llm"]), connector=spec.get("connector", {}))
    else:
        stage2["init"] = init
    summaries["stage2"] = run_stage_once(stage2)

    from slidevl.vqa.evaluate import evaluate

    pred, per_answer = answer_test(folder / "stage2", ctx["qa"] / "test.jsonl", ctx["job"], folder / "predictions.jsonl",
                                   sizes.max_new_tokens)
    report = evaluate(pred, ctx["qa"] / "test.jsonl", out=folder / "evaluation.json", text_scorer=ctx["scorer"])
    keep = ("n", "accuracy", "n_unparsed", "meteor", "rouge_l")

    def single_ranked(stem: str, shuffle_visuals: bool) -> float:
        ranked, _ = answer_test(folder / "stage2", ctx["qa"] / "test.jsonl", ctx["job"], folder / f"{stem}.jsonl",
                                sizes.max_new_tokens, shuffle_visuals=shuffle_visuals, rank_single=True)
        scored = evaluate(ranked, ctx["qa"] / "test.jsonl", out=folder / f"evaluation_{stem}.json")
        return scored["by_format"]["single"]["accuracy"]

    control = None
    if name in CONTROLLED:
        shuffled, _ = answer_test(folder / "stage2", ctx["qa"] / "test.jsonl", ctx["job"],
                                  folder / "predictions_shuffled.jsonl", sizes.max_new_tokens, shuffle_visuals=True)
        ctrl = evaluate(shuffled, ctx["qa"] / "test.jsonl", out=folder / "evaluation_shuffled.json",
                        text_scorer=ctx["scorer"])
        control = {
            "overall": {k: ctrl["overall"][k] for k in keep},
            "by_level": {lvl: {k: s[k] for k in keep} for lvl, s in ctrl["by_level"].items()},
            "by_format": {fmt: {k: s[k] for k in keep} for fmt, s in ctrl["by_format"].items()},
            "single_ranked": single_ranked("predictions_ranked_shuffled", True),
        }
    return {
        "spec": spec,
        "overall": {k: report["overall"][k] for k in keep},
        "by_level": {lvl: {k: s[k] for k in keep} for lvl, s in report["by_level"].items()},
        "by_format": {fmt: {k: s[k] for k in keep} for fmt, s in report["by_format"].items()},
        "training": summaries,
        "seconds_per_answer": round(per_answer, 4),
        "single_ranked": single_ranked("predictions_ranked", False),
        "shuffled_visuals": control,
    }


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def _baselines(blind: dict[str, Any] | None) -> str:
    if not blind:
        return "No blind baselines in the QA summary."
    return (f"Blind baselines on the {blind['n_test_choice']} test choice questions (from the QA build): chance "
            f"{_fmt(blind['chance'])}, majority answer text {_fmt(blind['majority_text'])}, majority letter "
            f"{_fmt(blind['majority_letter'])}.")


def render_markdown(result: dict[str, Any]) -> str:
    rows = result["variants"]
    levels = ["WSI", "ROI", "patch"]
    lines = [
        "# Slide VQA ablations",
        "",
        f"Cohort: {result['data']['n_train']} train / {result['data']['n_test']} test records "
        f"({result['data']['cohort']}); sizes: `{json.dumps(result['sizes'])}`.",
        _baselines(result["data"].get("blind_baselines")),
        "",
        "Choice accuracy (single: 1/0; multi: 1 exact, 0.5 strict subset) per level, and text metrics on open/caption "
        "answers; free generation, except \"ranked\": each single-choice question answered with the option the model "
        "finds most likely.",
        "",
        "| variant | acc all | acc WSI | acc ROI | acc patch | acc single | acc single, ranked | acc multi "
        "| METEOR open | METEOR caption | unparsed | s/answer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lv, fm = r["by_level"], r["by_format"]
        lines.append(
            f"| {name} | {_fmt(r['overall']['accuracy'])} | "
            + " | ".join(_fmt(lv.get(level, {}).get("accuracy")) for level in levels)
            + f" | {_fmt(fm.get('single', {}).get('accuracy'))} | {_fmt(r.get('single_ranked'))}"
            + f" | {_fmt(fm.get('multi', {}).get('accuracy'))}"
            + f" | {_fmt(fm.get('open', {}).get('meteor'))} | {_fmt(fm.get('caption', {}).get('meteor'))}"
            + f" | {r['overall']['n_unparsed']} | {r['seconds_per_answer']:.3f} |"
        )
    lines += [
        "",
        "Training (final loss = mean of the last 10 optimizer steps):",
        "",
        "| variant | stage 1 steps | stage 1 loss | stage 2 steps | stage 2 loss | stage 2 trainable params | stage 2 min |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        s1, s2 = r["training"].get("stage1"), r["training"]["stage2"]
        lines.append(
            f"| {name} | {s1['steps'] if s1 else '-'} | {_fmt(s1['final_loss']) if s1 else '-'} | {s2['steps']} | "
            f"{_fmt(s2['final_loss'])} | {s2['trainable_parameters']:,} | {s2['seconds'] / 60:.1f} |"
        )
    missing = [v for v in VARIANTS if v not in rows]
    if missing:
        lines += ["", f"Not run for this result: {', '.join(missing)}."]
    controls = {name: r["shuffled_visuals"] for name, r in rows.items() if r.get("shuffled_visuals")}
    if controls:
        lines += [
            "",
            "Control: " + ", ".join(f"`{name}`" for name in controls) + " answering every test question with the "
            "whole-slide visual input of *another* test slide (a model that reads the image must drop towards the "
            "blind baselines):",
            "",
            "| variant | acc all | acc WSI | acc ROI | acc patch | acc single | acc single, ranked | acc multi |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, control in controls.items():
            ov, lv, fm = control["overall"], control["by_level"], control["by_format"]
            lines.append(
                f"| {name}, shuffled visuals | {_fmt(ov['accuracy'])} | "
                + " | ".join(_fmt(lv.get(level, {}).get("accuracy")) for level in levels)
                + f" | {_fmt(fm.get('single', {}).get('accuracy'))} | {_fmt(control.get('single_ranked'))}"
                + f" | {_fmt(fm.get('multi', {}).get('accuracy'))} |"
            )
    probe = result["data"].get("probe")
    if probe and "by_key" in probe:  # older result files kept a different probe table
        lines += render_probes(probe, _fmt)
    parallel = f" The variants ran in {len(result['parts'])} processes side by side." if result.get("parts") else ""
    lines += ["", f"Machine: {result['machine']}. This invocation took {result['seconds'] / 60:.1f} min (stages and "
                  f"answers already in the work folder are reused; stage-2 times are in the training table).{parallel}", ""]
    return "\n".join(lines)


def merge_results(parts: list[str], name: str) -> Path:
    """Combine result files of runs that shared one work folder but split the variants
    (``--variants a,b --name p1`` and ``--variants c,d --name p2`` run side by side, one
    core each); the shared data, encoders and warm-up come from the first part."""
    from slidevl.atomic import write_json_atomic, write_text_atomic

    results = [json.loads((RESULTS / f"{part}.json").read_text()) for part in parts]
    merged = dict(results[0])
    merged["variants"] = {}
    for r in results:
        if r["data"]["cohort"] != merged["data"]["cohort"] or r["sizes"] != merged["sizes"]:
            raise SystemExit(f"--merge: {parts} were not run on the same cohort with the same sizes")
        merged["variants"].update(r["variants"])
    order = [v for v in VARIANTS if v in merged["variants"]]
    merged["variants"] = {v: merged["variants"][v] for v in order}
    merged["seconds"] = max(r["seconds"] for r in results)
    merged["parts"] = {part: sorted(r["variants"]) for part, r in zip(parts, results)}
    write_json_atomic(RESULTS / f"{name}.json", merged)
    write_text_atomic(RESULTS / f"{name}.md", render_markdown(merged))
    return RESULTS / f"{name}.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/slidevl_vqa_ablations", help="folder for every intermediate")
    parser.add_argument("--cohort", help="existing synthetic cohort (with truth.json)")
    parser.add_argument("--job", help="existing feature job of that cohort")
    parser.add_argument("--qa", help="existing QA folder (train.jsonl, test.jsonl) of that cohort")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="small cohort and short schedules (smoke-level numbers)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one size, e.g. --set stage2_epochs=10 (fields: " + ", ".join(Sizes.__dataclass_fields__) + ")")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    parser.add_argument("--name", default="vqa_ablations", help="result file stem under benchmarks/results")
    parser.add_argument("--data-only", action="store_true", help="make the cohort, features and QA, then stop")
    parser.add_argument("--merge", help="comma-separated result stems to combine into --name (no training)")
    args = parser.parse_args(argv)
    if args.merge:
        _log(f"merged -> {merge_results(args.merge.split(','), args.name)}")
        return 0
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from slidevl.atomic import write_json_atomic, write_text_atomic
    from slidevl.vqa.records import read_records
    from slidevl.vqa.textmetrics import TextScorer

    hf_logging.disable_progress_bar()
    sizes = QUICK if args.quick else Sizes()
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in Sizes.__dataclass_fields__:
            parser.error(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(Sizes.__dataclass_fields__)}")
        sizes = replace(sizes, **{key: int(value)})
    work = Path(args.work)
    started = time.perf_counter()
    cohort, job, qa = prepare_data(args, sizes, work)
    if args.data_only:
        print(f"data ready: cohort {cohort}, job {job}, QA {qa}")
        return 0
    wanted = args.variants.split(",")
    encoders = pretrain_encoders(job, work, sizes, args.seed,
                                 {"dense" if VARIANTS[v].get("encoder") == "dense" else "topo" for v in wanted})
    warm = run_stage_once(dict(stage="warmup", records=str(qa / "train.jsonl"), out=str(work / "warmup"),
                               train=_train(args.seed, 16, sizes.warmup_epochs, weight_decay=0.01)))
    ctx = {"sizes": sizes, "work": work, "qa": qa, "job": job, "encoders": encoders, "llm": work / "warmup",
           "seed": args.seed}
    qa_summary = json.loads((qa / "summary.json").read_text()) if (qa / "summary.json").is_file() else {}
    result: dict[str, Any] = {
        "benchmark": "vqa_ablations",
        "sizes": asdict(sizes),
        "quick": args.quick,
        "data": {
            "cohort": str(cohort),
            "n_train": len(read_records(qa / "train.jsonl")),
            "n_test": len(read_records(qa / "test.jsonl")),
            "blind_baselines": qa_summary.get("blind_baselines_on_test"),
            "probe": probe_features(job, qa, cohort),
        },
        "warmup": warm,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}",
        "variants": {},
    }
    with TextScorer() as scorer:
        ctx["scorer"] = scorer
        for name in wanted:
            _log(f"variant {name}")
            result["variants"][name] = run_variant(name, VARIANTS[name], ctx)
            result["seconds"] = time.perf_counter() - started
            write_json_atomic(RESULTS / f"{args.name}.json", result)
            write_text_atomic(RESULTS / f"{args.name}.md", render_markdown(result))
    _log(f"done in {(time.perf_counter() - started) / 60:.1f} min -> {RESULTS / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
