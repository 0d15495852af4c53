"""Time and memory of topo-pack attention: dense-mask reference vs gather (CPU) vs flex (CUDA).

Every configuration runs in its own subprocess so its peak memory is measured cleanly
(peak RSS on CPU via getrusage, minus the RSS once inputs and weights exist; peak
allocated memory on CUDA). Three levels are measured:

* ``attention`` — the attention operator alone, (1, 8, N, 64) q/k/v, forward + backward;
* ``layer``     — one pre-LN encoder layer (d = 512, 8 heads, FFN 2048), forward + backward;
* ``encoder``   — the full 6-layer encoder from input features, forward + backward
                  (``encoder_ckpt``: the same with per-layer activation checkpointing).

Packs are full 3×3 packs (10 tokens per pack, plus the global token). The dense
reference is skipped where its N×N mask would not fit in available memory; the
record then says how much it would need.

    python benchmarks/topo_attention.py            # 900, 3,600, 10,000, 40,000 packs
    python benchmarks/topo_attention.py --quick    # small sanity run

Results: ``benchmarks/results/topo_attention.json`` and ``.md`` (``topo_attention_quick.*``
with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GIB = 1024**3
DEFAULT_PACKS = [900, 3600, 10000, 40000]
# Bytes per mask element the dense CPU path holds at its peak: the N×N boolean mask,
# its additive float32 form, and kernel scratch (measured: ~5.6 B at 3,600 packs).
DENSE_BYTES_PER_PAIR = 6.0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def _tokens(packs: int) -> int:
    return packs * 10 + 1


# Measured peak bytes per token of the linear-memory paths (gather, 10,000 packs):
# the attention operator alone, and one full layer (activations of QKV, FFN, norms).
LINEAR_BYTES_PER_TOKEN = {"attention": 8.5e3, "layer": 5.2e4, "encoder": 6 * 5.2e4, "encoder_ckpt": 6.5e4}


def estimate_bytes(packs: int, level: str, impl: str) -> float:
    """Rough peak memory of one configuration, to skip what cannot fit instead of crashing.

    Everything is linear in the number of tokens except the dense reference's N×N mask.
    """
    n = _tokens(packs)
    linear = LINEAR_BYTES_PER_TOKEN[level] * n
    if impl != "dense":
        return linear
    layers = 6 if level == "encoder" else 1  # with checkpointing one layer's mask is live at a time
    return DENSE_BYTES_PER_PAIR * n * n * layers + linear


# ----------------------------------------------------------------------------- worker


def _worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from slidevl.slidellm.encoder import TokenLayout, TopoPackBlock, TopoPackConfig, TopoPackEncoder, topo_attention
    from slidevl.slidellm.encoder.synthetic import full_pack_batch

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    packs, impl, level = cfg["packs"], cfg["impl"], cfg["level"]

    def make_step(packs: int):
        torch.manual_seed(0)
        layout = TokenLayout(3, torch.ones(1, packs, 9, dtype=torch.bool, device=device), torch.ones(1, packs, dtype=torch.bool, device=device))
        if level == "attention":
            q, k, v = (torch.randn(1, 8, layout.num_tokens, 64, device=device, requires_grad=True) for _ in range(3))

            def step() -> None:
                topo_attention(q, k, v, layout, "topo", impl=impl).sum().backward()

        elif level == "layer":
            block = TopoPackBlock(512, 8, 2048, 0.1, impl=impl).to(device)
            x = torch.randn(1, layout.num_tokens, 512, device=device, requires_grad=True)

            def step() -> None:
                block(x, layout).sum().backward()

        else:
            ecfg = TopoPackConfig(
                patch_dim=512, pack_dim=512, global_dim=512, attention_impl=impl, checkpoint_layers=level == "encoder_ckpt"
            )
            enc = TopoPackEncoder(ecfg).to(device)
            batch = full_pack_batch(packs, 512).to(device)

            def step() -> None:
                enc(batch).tokens.sum().backward()

        return step, layout.num_tokens

    # Run the same code once on a tiny problem first, so library start-up allocations
    # (kernel caches, thread pools) are not counted as the configuration's memory.
    make_step(4)[0]()
    step, n = make_step(packs)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    for i in range(cfg["warmup"] + cfg["repeats"]):
        t0 = time.perf_counter()
        step()
        sync()
        if i >= cfg["warmup"]:
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "seconds": statistics.median(times),
        "seconds_all": times,
        "peak_bytes": peak,
        "base_bytes": base,
        "delta_bytes": max(0, peak - base),
        "tokens": n,
    }


# ----------------------------------------------------------------------------- driver


def _run_one(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", json.dumps(cfg)]
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"skipped: exceeded {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else (" | ".join(tail) or f"exit code {proc.returncode}")
        return {"status": f"failed: {reason}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["status"] = "ok"
    return result


def _fmt_gib(x: float | None) -> str:
    return "—" if x is None else f"{x / GIB:.3f}"


def _loads(values) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "?"


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Topo-pack attention benchmark",
        "",
        f"Device: {report['system']['device']}; torch {report['system']['torch']}; {report['system']['threads']} threads; "
        f"load average at start {_loads(report['system']['load_start'])}, at end {_loads(report['system']['load_end'])}"
        + (
            f" (reused measurements were taken at load {_loads(report['system']['measured_under']['load_start'])} → "
            f"{_loads(report['system']['measured_under']['load_end'])})."
            if report["system"].get("measured_under")
            else "."
        ),
        "Full 3×3 packs (N = 10·packs + 1 tokens), d = 512, 8 heads, forward + backward, median of the timed runs.",
        "Memory is the peak over the run minus the memory held once inputs and weights exist (CPU: RSS; CUDA: allocated).",
        "",
        "| level | packs | tokens | impl | status | time (s) | peak Δ mem (GiB) | dense/impl time | dense/impl mem |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        ok = r["status"] == "ok"
        lines.append(
            f"| {r['level']} | {r['packs']:,} | {_tokens(r['packs']):,} | {r['impl']} | {r['status']} | "
            f"{r['seconds']:.3f} | {_fmt_gib(r['delta_bytes'])} | {r.get('speedup_vs_dense', '—')} | {r.get('memory_ratio_vs_dense', '—')} |"
            if ok
            else f"| {r['level']} | {r['packs']:,} | {_tokens(r['packs']):,} | {r['impl']} | {r['status']} | — | — | — | — |"
        )
    goals = report.get("goals", {})
    if goals:
        lines += ["", "## Goals", ""]
        for name, value in goals.items():
            lines.append(f"- {name}: {value}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small sanity run (25 and 100 packs)")
    parser.add_argument("--packs", type=int, nargs="+", default=None)
    parser.add_argument("--levels", nargs="+", default=["attention", "layer", "encoder_ckpt"], choices=["attention", "layer", "encoder", "encoder_ckpt"])
    parser.add_argument("--encoder-packs", type=int, nargs="+", default=None, help="packs for the 6-layer encoder levels (default 10,000; 100 with --quick)")
    parser.add_argument("--impls", nargs="+", default=["dense", "gather", "flex"], choices=["dense", "gather", "flex"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in workers (0 = torch default)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per configuration, seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--reuse", action="store_true", help="keep 'ok' results of an earlier run with the same settings")
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from slidevl.atomic import write_json_atomic, write_text_atomic
    from rich.progress import Progress

    cuda = torch.cuda.is_available()
    packs = args.packs or ([25, 100] if args.quick else DEFAULT_PACKS)
    plan: list[tuple[str, int]] = [(level, p) for level in args.levels if not level.startswith("encoder") for p in packs]
    enc_levels = [lv for lv in args.levels if lv.startswith("encoder")]
    enc_packs = args.encoder_packs if args.encoder_packs is not None else ([100] if args.quick else [10000])
    plan += [(level, p) for level in enc_levels for p in enc_packs]

    # A quick run never overwrites the full results.
    name = "topo_attention_quick" if args.quick else "topo_attention"
    # --reuse keeps finished measurements of an earlier (interrupted) run of this script.
    reusable: dict[tuple, dict[str, Any]] = {}
    previous = args.out / f"{name}.json"
    if args.reuse and previous.is_file():
        old = json.loads(previous.read_text())
        # Timings depend on machine load: keep the load seen when they were measured.
        reused_system = old["system"].get("measured_under", {k: old["system"].get(k) for k in ("load_start", "load_end")})
        for r in old.get("results", []):
            if r.get("status") == "ok":
                threads = old["system"].get("threads_arg", old["system"].get("threads", 0))
                reusable[(r["level"], r["packs"], r["impl"], r["device"], threads)] = r
    else:
        reused_system = None
    results: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "system": {
            "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "torch": torch.__version__,
            "threads": args.threads or torch.get_num_threads(),
            "threads_arg": args.threads,
            "load_start": list(os.getloadavg()),
            "available_gib_start": _available_bytes() / GIB,
        },
        "results": results,
    }
    if reusable:
        report["system"]["measured_under"] = reused_system
    device = "cuda" if cuda else "cpu"
    with Progress() as bar:
        task = bar.add_task("configs", total=len(plan) * len(args.impls))
        for level, p in plan:
            by_impl: dict[str, dict[str, Any]] = {}
            for impl in args.impls:
                entry = {"level": level, "packs": p, "impl": impl, "device": device}
                bar.update(task, description=f"{level} {p} {impl}")
                key = (level, p, impl, device, args.threads)
                if impl == "flex" and not cuda:
                    entry["status"] = "skipped: flex_attention path needs CUDA"
                elif key in reusable:
                    entry = reusable[key]
                elif device == "cpu" and (need := estimate_bytes(p, level, impl)) > 0.8 * _available_bytes():
                    entry["status"] = f"skipped: would need ~{need / GIB:.0f} GiB (available {_available_bytes() / GIB:.0f} GiB)"
                else:
                    # Big runs are timed once; small ones get a warm-up and repeats.
                    big = _tokens(p) > 20000 or level.startswith("encoder")
                    cfg = {"packs": p, "impl": impl, "level": level, "device": device, "threads": args.threads,
                           # CUDA always warms up once: flex_attention compiles on first use.
                           "warmup": 0 if (big and not cuda) else 1, "repeats": 1 if big else args.repeats}
                    entry.update(_run_one(cfg, args.timeout))
                results.append(entry)
                by_impl[impl] = entry
                bar.advance(task)
            dense = by_impl.get("dense")
            for impl, entry in by_impl.items():
                if impl != "dense" and entry["status"] == "ok" and dense and dense["status"] == "ok":
                    entry["speedup_vs_dense"] = round(dense["seconds"] / entry["seconds"], 1)
                    entry["memory_ratio_vs_dense"] = round(dense["delta_bytes"] / max(1, entry["delta_bytes"]), 1)
            report["system"]["load_end"] = list(os.getloadavg())
            _write(report, args.out, name, write_json_atomic, write_text_atomic)
    report["goals"] = _goals(results)
    _write(report, args.out, name, write_json_atomic, write_text_atomic)
    print(_markdown(report))


def _goals(results: list[dict[str, Any]]) -> dict[str, str]:
    goals = {}
    for level in ("attention", "layer"):
        g = next((r for r in results if r["level"] == level and r["packs"] == 3600 and r["impl"] == "gather" and "speedup_vs_dense" in r), None)
        if g:
            goals[f"{level}, 3,600 packs, gather vs dense (goal ≥10× faster, ≥20× less memory)"] = (
                f"{g['speedup_vs_dense']}× faster, {g['memory_ratio_vs_dense']}× less memory"
            )
    for r in results:
        if r["level"].startswith("encoder") and r["packs"] == 10000 and r["impl"] == "gather" and r["status"] == "ok":
            goals[f"6-layer encoder fwd+bwd at 10,000 packs ({r['level']}, goal ≤ 8 GiB)"] = (
                f"peak RSS {r['peak_bytes'] / GIB:.2f} GiB (Δ {r['delta_bytes'] / GIB:.2f} GiB), {r['seconds']:.0f} s"
            )
    return goals


def _write(report, out: Path, name: str, write_json_atomic, write_text_atomic) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{name}.json", report)
    write_text_atomic(out / f"{name}.md", _markdown(report))


if __name__ == "__main__":
    main()
