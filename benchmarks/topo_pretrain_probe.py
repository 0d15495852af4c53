"""Pretraining loss curves and a linear probe of topo-pack summary tokens on a synthetic cohort.

1. Render a synthetic cohort (:mod:`slidevl.synth`) and extract features with the
   default encoder (``slidevl preprocess``): patch, pack-summary and thumbnail features.
2. Pretrain the topo-pack encoder on those features (MAE phase 1 → phase 2 → MoCo).
3. Label every pack with the dominant planted tissue class inside it
   (``slidevl.synth.truth``; background-dominated packs are left out).
4. Fit a logistic-regression probe, split by patient, on
   (a) the raw pack-summary features from the store,
   (b) summary tokens of the pretrained encoder,
   (c) summary tokens of the same encoder at random initialisation (control),
   (d) pretrained summary tokens concatenated with the raw features.

Results: ``benchmarks/results/topo_pretrain_probe.json``/``.md`` and the loss curves
``topo_pretrain_loss.png`` (``*_quick*`` with ``--quick``).

    python benchmarks/topo_pretrain_probe.py            # ~10 patients, paper-size encoder
    python benchmarks/topo_pretrain_probe.py --quick    # minutes: tiny cohort, short run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _pack_labels(sf, slide_truth) -> np.ndarray:
    """Dominant tissue class index per pack (-1 where background dominates)."""
    from slidevl.synth.classes import CLASS_INDEX

    step = float(sf.attrs["pack_size_level0"])
    labels = np.full(len(sf.pack_coords), -1, np.int64)
    for i, (x, y) in enumerate(np.asarray(sf.pack_coords, np.float64)):
        fr = slide_truth.fractions([x, y, x + step, y + step])
        name = max(((k, v) for k, v in fr.items() if k != "background"), key=lambda kv: kv[1])[0]
        if fr[name] >= fr["background"]:
            labels[i] = CLASS_INDEX[name]
    return labels


def _summary_tokens(encoder, batch, n_store_packs: int) -> np.ndarray:
    """(P_store, d) summary tokens in the store's pack order (whole slide, no augmentation)."""
    import torch

    encoder.eval()
    with torch.no_grad():
        tokens = encoder(batch).summary_tokens[0]
    out = np.zeros((n_store_packs, tokens.shape[-1]), np.float32)
    have = batch.pack_index[0] >= 0
    out[batch.pack_index[0][have].numpy()] = tokens[have].numpy()
    return out


def _probe(x_train, y_train, x_test, y_test, seed: int) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=1.0, random_state=seed))
    clf.fit(x_train, y_train)
    pred = clf.predict(x_test)
    return {
        "accuracy": float(accuracy_score(y_test, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_test, pred)),
        "macro_f1": float(f1_score(y_test, pred, average="macro")),
        "dim": int(x_train.shape[1]),
    }


def _loss_summary(log: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, name in (("mae_loss", "mae"), ("moco_loss", "moco")):
        vals = [(r["step"], r[key], r.get("phase")) for r in log if r.get(key) is not None]
        if not vals:
            continue
        losses = np.array([v[1] for v in vals], np.float64)
        w = max(1, len(losses) // 10)
        out[name] = {
            "steps": len(losses),
            "first_10pct_mean": float(losses[:w].mean()),
            "last_10pct_mean": float(losses[-w:].mean()),
        }
        if name == "moco":
            # InfoNCE grows with the number of usable negatives; log(1 + negatives) is the
            # loss of an encoder that cannot tell the positive apart, the reference to read it against.
            tail = [r for r in log if r.get(key) is not None][-w:]
            out[name]["chance_loss_last_10pct"] = float(np.mean([np.log1p(r.get("moco_negatives", 0.0)) for r in tail]))
            out[name]["positive_top1_last_10pct"] = float(np.nanmean([r.get("moco_acc", np.nan) for r in tail]))
        if name == "mae":
            for phase in (1, 2):
                ph = np.array([v[1] for v in vals if v[2] == phase], np.float64)
                if len(ph):
                    wp = max(1, len(ph) // 10)
                    out[name][f"phase{phase}_first_mean"] = float(ph[:wp].mean())
                    out[name][f"phase{phase}_last_mean"] = float(ph[-wp:].mean())
    return out


def _plot(log: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slidevl.atomic import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, title in ((axes[0], "mae_loss", "MAE (normalised-feature MSE)"), (axes[1], "moco_loss", "MoCo (InfoNCE)")):
        rows = [r for r in log if r.get(key) is not None]
        if rows:
            steps = np.array([r["step"] for r in rows])
            vals = np.array([r[key] for r in rows])
            ax.plot(steps, vals, lw=0.6, alpha=0.4)
            k = max(1, len(vals) // 20)
            smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], smooth, lw=1.5)
            if key == "moco_loss":
                chance = np.log1p([r.get("moco_negatives", 0.0) for r in rows])
                ax.plot(steps, chance, ls="--", lw=1.0, color="grey", label="chance: log(1 + negatives)")
                ax.legend(fontsize=8)
            if key == "mae_loss":
                p2 = [r["step"] for r in rows if r.get("phase") == 2]
                if p2:
                    ax.axvline(p2[0], color="grey", ls="--", lw=0.8)
                    ax.text(p2[0], ax.get_ylim()[1], " phase 2", va="top", fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _markdown(report: dict[str, Any]) -> str:
    c = report["cohort"]
    lines = [
        "# Topo-pack pretraining: loss curves and linear probe",
        "",
        f"Synthetic cohort: {c['patients']} patients, {c['slides']} slides, {c['packs_labelled']} labelled packs "
        f"({c['train_packs']} train / {c['test_packs']} test, split by patient); feature encoder `{c['feature_encoder']}`.",
        f"Encoder: {report['encoder']['n_layers']} layers, d = {report['encoder']['d_model']}; "
        f"{report['pretrain']['mae_steps']} MAE steps ({report['pretrain']['phase1_fraction']:.0%} in phase 1) + "
        f"{report['pretrain']['moco_steps']} MoCo steps; {report['timing']['pretrain_seconds']:.0f} s of pretraining on {report['device']}.",
        "",
        "## Loss",
        "",
        "| loss | steps | first 10 % mean | last 10 % mean |",
        "|---|---:|---:|---:|",
    ]
    for name, s in report["loss"].items():
        lines.append(f"| {name} | {s['steps']} | {s['first_10pct_mean']:.4f} | {s['last_10pct_mean']:.4f} |")
    moco = report["loss"].get("moco")
    mae = report["loss"].get("mae", {})
    for phase in (1, 2):
        if f"phase{phase}_first_mean" in mae:
            lines.append(f"| mae phase {phase} | | {mae[f'phase{phase}_first_mean']:.4f} | {mae[f'phase{phase}_last_mean']:.4f} |")
    if moco:
        lines += [
            "",
            f"MoCo, last 10 % of steps: chance-level loss log(1 + negatives) = {moco['chance_loss_last_10pct']:.3f}; "
            f"positive ranked first for {moco['positive_top1_last_10pct']:.1%} of queries.",
        ]
    lines += [
        "",
        "## Linear probe: planted tissue class of each pack",
        "",
        f"Class counts (test): {report['class_counts_test']}",
        "",
        "| features | dim | accuracy | balanced accuracy | macro F1 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in report["probe"].items():
        lines.append(f"| {name} | {r['dim']} | {r['accuracy']:.3f} | {r['balanced_accuracy']:.3f} | {r['macro_f1']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "slidevl-topo-probe")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--patients", type=int, default=None)
    parser.add_argument("--slide-px", type=int, default=None)
    parser.add_argument("--mae-steps", type=int, default=None)
    parser.add_argument("--moco-steps", type=int, default=None)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from slidevl.atomic import write_json_atomic, write_text_atomic
    from slidevl.features.config import PreprocessConfig
    from slidevl.features.pipeline import preprocess
    from slidevl.features.store import FeatureStore
    from slidevl.slidellm.encoder import TopoPackEncoder, batch_from_slide_features
    from slidevl.slidellm.pretrain import FeatureStoreSource, PretrainConfig, pretrain
    from slidevl.slidellm.pretrain.data import encoder_config_for
    from slidevl.synth import CLASSES, load_truth, make_cohort

    quick = args.quick
    patients = args.patients or (5 if quick else 10)
    slide_px = args.slide_px or (4096 if quick else 8192)
    mae_steps = args.mae_steps if args.mae_steps is not None else (30 if quick else 300)
    moco_steps = args.moco_steps if args.moco_steps is not None else (15 if quick else 150)
    name = "topo_pretrain_probe_quick" if quick else "topo_pretrain_probe"
    work = args.work / (f"{'quick' if quick else 'full'}-p{patients}-px{slide_px}-s{args.seed}")
    timing: dict[str, float] = {}

    t = time.perf_counter()
    cohort_dir = work / "cohort"
    if not (cohort_dir / "truth.json").is_file():
        make_cohort(cohort_dir, n_patients=patients, seed=args.seed, slide_px=slide_px, n_folds=min(5, patients))
    timing["cohort_seconds_this_invocation"] = time.perf_counter() - t  # ~0 when cached

    t = time.perf_counter()
    job = work / "job"
    report_pp = preprocess(cohort_dir / "slides", job, PreprocessConfig())  # skips complete slides on re-runs
    if report_pp.n_failed:
        raise SystemExit(f"preprocess failed for {report_pp.n_failed} slide(s); see {job}")
    timing["preprocess_seconds_this_invocation"] = time.perf_counter() - t  # ~0 when cached

    store = FeatureStore(job)
    truth = load_truth(cohort_dir)
    source = FeatureStoreSource(job)
    ecfg = encoder_config_for(source, d_model=args.d_model, n_layers=args.layers, ffn_dim=4 * args.d_model)
    pcfg = PretrainConfig(
        mae_steps=mae_steps, moco_steps=moco_steps, warmup_steps=max(1, (mae_steps + moco_steps) // 20),
        lr=5e-4, save_every=max(1, (mae_steps + moco_steps) // 4), log_every=10, seed=args.seed,
        moco_queue=1024, max_packs=1024,
    )
    ckpt = work / f"ckpt-d{args.d_model}-l{args.layers}-m{mae_steps}-c{moco_steps}"
    t = time.perf_counter()
    result = pretrain(source, ckpt, config=pcfg, encoder_config=ecfg, resume=True)
    timing["pretrain_wall_seconds_this_invocation"] = time.perf_counter() - t
    # Summed from the loss log, so a resumed or already finished run still reports its cost.
    timing["pretrain_seconds"] = float(sum(row.get("seconds", 0.0) for row in result.log))
    trained = result.encoder.cpu()
    torch.manual_seed(pcfg.seed)  # the same initial weights the run started from
    random_init = TopoPackEncoder(ecfg)

    # Features and labels per pack, grouped by patient for the split.
    t = time.perf_counter()
    rows: dict[str, list[np.ndarray]] = {"raw": [], "pretrained": [], "random_init": [], "label": [], "patient": []}
    for sid in store.slide_ids():
        sf = store.load(sid, load=("patch", "pack", "global"))
        batch = batch_from_slide_features(sf)
        labels = _pack_labels(sf, truth.slides[sid])
        keep = labels >= 0
        rows["raw"].append(sf.pack_features[keep])
        rows["pretrained"].append(_summary_tokens(trained, batch, len(labels))[keep])
        rows["random_init"].append(_summary_tokens(random_init, batch, len(labels))[keep])
        rows["label"].append(labels[keep])
        rows["patient"].append(np.array([truth.slides[sid].patient_id] * int(keep.sum())))
    data = {k: np.concatenate(v) for k, v in rows.items()}
    data["pretrained+raw"] = np.concatenate([data["pretrained"], data["raw"]], axis=1)
    timing["embed_seconds"] = time.perf_counter() - t

    pats = np.array(sorted(set(data["patient"])))
    rng = np.random.default_rng(args.seed)
    test_pats = set(rng.choice(pats, size=max(1, round(0.3 * len(pats))), replace=False))
    test = np.array([p in test_pats for p in data["patient"]])
    y = data["label"]
    probe = {
        feats: _probe(data[feats][~test], y[~test], data[feats][test], y[test], args.seed)
        for feats in ("raw", "pretrained", "random_init", "pretrained+raw")
    }
    counts = {CLASSES[c]: int((y[test] == c).sum()) for c in np.unique(y)}
    report = {
        "cohort": {
            "patients": patients, "slides": len(store.slide_ids()), "slide_px": slide_px,
            "packs_labelled": int(len(y)), "train_packs": int((~test).sum()), "test_packs": int(test.sum()),
            "test_patients": sorted(test_pats), "feature_encoder": store.encoder,
        },
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "encoder": ecfg.to_dict(),
        "pretrain": pcfg.to_dict(),
        "checkpoint": str(ckpt),
        "loss": _loss_summary(result.log),
        "probe": probe,
        "class_counts_test": counts,
        "timing": timing,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"{name}.json", report)
    write_text_atomic(args.out / f"{name}.md", _markdown(report))
    _plot(result.log, args.out / f"{name.replace('probe', 'loss')}.png")
    print(_markdown(report))


if __name__ == "__main__":
    main()
