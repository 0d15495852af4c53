"""Diagnostics for the synthetic survival benchmark: what the features allow and how the models train.

1. Orientation checks: the C-index of ``-t`` (must be ~1), of the oracle risk, and of the
   risk ``-ΣS`` of a survival curve that is lower for shorter times.
2. Feature ceiling: a ridge-penalised Cox model (scikit-survival) on each patient's
   mean-pooled standardised patch and region features, fitted on the training folds and
   scored on the validation folds. The penalty is chosen by an inner 3-fold CV on the
   training patients only; the fixed-penalty scores are listed too, for reading only.
3. Training curves: for each model, the training loss, the training C-index and (for
   reading only — nothing is selected on it) the validation C-index at initialisation
   and after epochs 1, 2, 5, 10, 15 and the last.

    python benchmarks/survival_diagnose.py --job J --clinical C --splits S --truth T \
        --models meanpool,abmil --grad-accum 32 --epochs 20 --name survival_diagnose
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _pooled(cache, cohort, pids):
    rows = []
    for pid in pids:
        bag = cache.bag(pid, cohort.patients.at[pid, "slides"])
        rows.append(np.concatenate([bag.patch.double().mean(0).numpy(), bag.region.double().mean(0).numpy()]))
    return np.stack(rows)


def _cox_c(x_tr, y_tr, x_va, t_va, e_va, alpha):
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    from slidevl.survival.metrics import c_index

    mu, sd = x_tr.mean(0), x_tr.std(0)
    sd[sd < 1e-9] = 1.0
    model = CoxPHSurvivalAnalysis(alpha=alpha, n_iter=200)
    model.fit((x_tr - mu) / sd, y_tr)
    return c_index(t_va, e_va, model.predict((x_va - mu) / sd))


def _surv_y(t, e):
    from sksurv.util import Surv

    return Surv.from_arrays(event=np.asarray(e).astype(bool), time=np.asarray(t, dtype=float))


def feature_ceiling(cache, cohort, folds, alphas):
    from sklearn.model_selection import StratifiedKFold

    out = {"fixed": {str(a): [] for a in alphas}, "inner_cv": [], "inner_cv_alpha": []}
    for fold in folds:
        tr, va = cohort.subset(fold.train), cohort.subset(fold.val)
        x_tr, x_va = _pooled(cache, cohort, fold.train), _pooled(cache, cohort, fold.val)
        y_tr = _surv_y(tr["t"], tr["e"])
        for a in alphas:
            out["fixed"][str(a)].append(_cox_c(x_tr, y_tr, x_va, va["t"].to_numpy(), va["e"].to_numpy(), a))
        # Inner CV on the training patients only.
        inner = StratifiedKFold(3, shuffle=True, random_state=0)
        scores = {a: [] for a in alphas}
        for itr, iva in inner.split(x_tr, tr["e"].to_numpy()):
            for a in alphas:
                try:
                    scores[a].append(_cox_c(x_tr[itr], y_tr[itr], x_tr[iva], tr["t"].to_numpy()[iva], tr["e"].to_numpy()[iva], a))
                except Exception:  # noqa: BLE001 - a failed fit scores nothing
                    scores[a].append(0.5)
        best = max(alphas, key=lambda a: np.mean(scores[a]))
        out["inner_cv_alpha"].append(best)
        out["inner_cv"].append(out["fixed"][str(best)][-1])
    return out


def training_curves(cache, cohort, folds, keys, model_name, args, in_dim, region_dim, encoded, n_folds):
    from accelerate.utils import set_seed

    from slidevl.survival.cv import _records
    from slidevl.survival.labels import fit_bins
    from slidevl.survival.metrics import c_index
    from slidevl.survival.registry import build_model
    from slidevl.survival.scaling import FeatureScaler
    from slidevl.survival.train import BagDataset, TrainConfig, make_accelerator, predict_bag, train_model

    bins = fit_bins(cohort.patients["t"].to_numpy(), cohort.patients["e"].to_numpy(), 4, mode="all")
    curves = []
    for fold in folds[:n_folds]:
        set_seed(args.seed)
        options = {"variant": "full"} if model_name == "hila" else {}
        model = build_model(model_name, in_dim=in_dim, region_dim=region_dim, n_bins=4, options=options, prompts=encoded)
        scaler = FeatureScaler.fit(cache.bag(pid, cohort.patients.at[pid, "slides"]) for pid in fold.train)
        dataset = BagDataset(cache, _records(cohort, fold.train, bins, keys), scaler.apply)
        accelerator = make_accelerator("cpu", args.grad_accum)
        tr, va = cohort.subset(fold.train), cohort.subset(fold.val)
        rows = []

        def score(pids, frame):
            risks = [predict_bag(model, scaler.apply(cache.bag(p, cohort.patients.at[p, "slides"], keys[p])), "cpu").risk for p in pids]
            return c_index(frame["t"].to_numpy(), frame["e"].to_numpy(), np.asarray(risks))

        def on_epoch(epoch, stats):
            if epoch not in (1, 2, 5, 10, 15, args.epochs):
                return
            rows.append({"epoch": epoch, "loss": stats["loss"], "train_c": score(fold.train, tr), "val_c": score(fold.val, va)})
            print(f"{model_name} fold {fold.index} epoch {epoch}: loss {stats['loss']:.4f} train C {rows[-1]['train_c']:.3f} "
                  f"val C {rows[-1]['val_c']:.3f}", flush=True)

        cfg = TrainConfig(args.epochs, args.lr, 1e-5, args.grad_accum, 0.0, args.seed)
        rows.append({"epoch": 0, "loss": float("nan"), "train_c": score(fold.train, tr), "val_c": score(fold.val, va)})
        train_model(model, dataset, cfg, accelerator, on_epoch)
        curves.append({"fold": fold.index, "epochs": rows})
    return curves


def _markdown(result: dict) -> str:
    r, c = result["recipe"], result["cohort"]
    lines = [
        "# Survival benchmark diagnostics",
        "",
        f"Cohort: {c['patients']} patients, {c['events']} events (`{c['job']}`); the cohort's folds.",
        "",
        "## Orientation (whole cohort)",
        "",
        *[f"- {k}: {v:.3f}" for k, v in result["orientation"].items()],
        "",
        "## Feature ceiling: ridge Cox on mean-pooled standardised patch + region features",
        "",
        "| penalty | C-index mean ± std |",
        "|---|---:|",
        *[f"| alpha {a} (fixed, for reading) | {m:.3f} ± {s:.3f} |" for a, (m, s) in result["cox_ridge_summary"]["fixed_alpha_mean_std"].items()],
        f"| inner 3-fold CV on the training fold (honest) | {result['cox_ridge_summary']['inner_cv_mean']:.3f} ± "
        f"{result['cox_ridge_summary']['inner_cv_std']:.3f} |",
        "",
        f"## Training curves ({r['epochs']} epochs, lr {r['lr']:g}, gradient accumulation {r['grad_accum']}, seed {r['seed']})",
        "",
        "Mean over the folds drawn; validation C-index for reading only (nothing is selected on it).",
        "",
        "| model | epoch | train loss | train C-index | val C-index |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, folds in result["curves"].items():
        for i in range(len(folds[0]["epochs"])):
            rows = [f["epochs"][i] for f in folds]
            lines.append(f"| {name} | {rows[0]['epoch']}{' (init)' if i == 0 else ''} | {np.mean([x['loss'] for x in rows]):.3f} | {np.mean([x['train_c'] for x in rows]):.3f} | "
                         f"{np.mean([x['val_c'] for x in rows]):.3f} |")
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job", required=True)
    parser.add_argument("--clinical", required=True)
    parser.add_argument("--splits", required=True)
    parser.add_argument("--truth", required=True)
    parser.add_argument("--models", default="meanpool,abmil")
    parser.add_argument("--folds", type=int, default=5, help="How many folds to draw training curves for.")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--grad-accum", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="survival_diagnose")
    args = parser.parse_args()

    import torch

    from slidevl.atomic import write_json_atomic, write_text_atomic
    from slidevl.features.store import FeatureStore
    from slidevl.survival.cohort import load_cohort
    from slidevl.survival.data import BagCache
    from slidevl.survival.folds import load_folds
    from slidevl.survival.loss import hazards_and_survival, risk_from_survival
    from slidevl.survival.metrics import c_index

    torch.set_num_threads(1)
    started = time.perf_counter()
    store = FeatureStore(Path(args.job))
    cohort = load_cohort(Path(args.clinical), store.__contains__)
    folds, _ = load_folds(cohort, Path(args.splits))
    keys = {pid: i for i, pid in enumerate(cohort.patient_ids)}
    cache = BagCache(store)
    truth = {p["patient_id"]: p for p in json.loads(Path(args.truth).read_text())["patients"]}
    t, e = cohort.patients["t"].to_numpy(), cohort.patients["e"].to_numpy()

    # 1. Orientation.
    logits = torch.from_numpy(np.stack([np.full(4, -3.0) + 6.0 * (1 - (ti - t.min()) / np.ptp(t)) for ti in t]))
    checks = {
        "c_index_of_minus_t": c_index(t, e, -t),
        "c_index_of_oracle_risk": c_index(t, e, np.array([truth[p]["risk"] for p in cohort.patient_ids])),
        "c_index_of_minus_sum_S_for_hazard_decreasing_in_t": c_index(t, e, risk_from_survival(hazards_and_survival(logits)[1]).numpy()),
    }
    print(checks, flush=True)

    # 2. Feature ceiling.
    first = cache.bag(cohort.patient_ids[0], cohort.patients.at[cohort.patient_ids[0], "slides"])
    alphas = [0.1, 1.0, 10.0, 100.0, 1000.0]
    ceiling = feature_ceiling(cache, cohort, folds, alphas)
    summary = {k: (float(np.mean(v)), float(np.std(v))) for k, v in ceiling["fixed"].items()}
    print("cox ridge on mean-pooled features, fixed alpha:", summary, flush=True)
    print("cox ridge, alpha by inner CV on training folds:", np.mean(ceiling["inner_cv"]), ceiling["inner_cv_alpha"], flush=True)

    # 3. Training curves.
    encoded = None
    curves = {}
    for name in [m for m in args.models.split(",") if m]:
        if name == "hila" and encoded is None:
            from slidevl.survival.hila.prompts import DEFAULT_TEXT_ENCODER, encode_bank, load_prompt_bank

            bank = load_prompt_bank("synthetic")
            encoded = {s: encode_bank(bank, s, DEFAULT_TEXT_ENCODER) for s in ("patch", "region")}
        curves[name] = training_curves(cache, cohort, folds, keys, name, args, first.patch.shape[1], first.region.shape[1],
                                       encoded, args.folds)

    result = {"cohort": {"job": args.job, "patients": len(cohort), "events": int(e.sum())},
              "orientation": checks, "cox_ridge_meanpooled": ceiling,
              "cox_ridge_summary": {"fixed_alpha_mean_std": summary, "inner_cv_mean": float(np.mean(ceiling["inner_cv"])),
                                    "inner_cv_std": float(np.std(ceiling["inner_cv"]))},
              "recipe": {"epochs": args.epochs, "lr": args.lr, "grad_accum": args.grad_accum, "seed": args.seed},
              "curves": curves, "seconds": time.perf_counter() - started}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / f"{args.name}.json", result)
    write_text_atomic(RESULTS / f"{args.name}.md", _markdown(result))
    print(_markdown(result))
    print(f"wrote {RESULTS / (args.name + '.json')}")


if __name__ == "__main__":
    main()
