"""Topo-pack attention at GPU speed: time and peak memory against packs, per implementation.

Canonical result ``benchmarks/results/topo_attention_gpu.{json,md,png}`` (a GPU run; none is
committed yet), regenerated on a GPU machine by (see ``benchmarks/GPU_RUNBOOK.md``)::

    python benchmarks/topo_attention_gpu.py --time-limit 500

For each number of packs (full 3×3 packs, N = 10·packs + 1 tokens, 8 heads of 64, bf16)
the attention operator's forward + backward is timed for

* ``dense``  — SDPA with the explicit N×N mask (the reference; skipped where its mask
  would not fit),
* ``gather`` — the chunked plain-torch path,
* ``split``  — one fused SDPA per part of the mask (private keys folded into channels),
* ``flex`` at a few block-mask block sizes (``flex_b128``: 128×128; ``flex_q128_kv64``:
  128 query × 64 key blocks; ``flex_b64``: 64×64 blocks and 64×64 kernel tiles),

plus what ``attention_impl="auto"`` picks at each size, and whether the 6-layer encoder
(d = 512, FFN 2048) runs forward + backward at the largest size (without, then with,
per-layer checkpointing). Memory is the peak allocated during the step minus what was
allocated before it (CUDA only; CPU runs record time alone). The configurations that
decide the goals (3,600 packs, the 40,000-pack encoder) run first, then the sweep, and a
time limit stops the run cleanly: whatever did not fit is recorded as skipped.

``--out`` writes elsewhere; ``--small`` is a CPU smoke run (< 2 min) written to
``topo_attention_gpu_small.*``, which is not kept.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from slidevl.atomic import write_json_atomic, write_text_atomic  # noqa: E402
from slidevl.slidellm.encoder import TokenLayout, TopoPackConfig, TopoPackEncoder, topo_attention  # noqa: E402
from slidevl.slidellm.encoder.autoselect import PROBE_TIMES, ShapeClass, choose_impl  # noqa: E402
from slidevl.slidellm.encoder.flex import topo_attention_flex, topo_block_mask  # noqa: E402
from slidevl.slidellm.encoder.synthetic import full_pack_batch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1024**3
HEADS, HEAD_DIM = 8, 64
#: Peak bytes per N×N pair of the dense reference: the boolean mask plus SDPA's additive
#: bf16 copy of it, and the same again in backward (H200 fp32 run: ~8.5 B/pair).
DENSE_BYTES_PER_PAIR = 6.0


@dataclass(frozen=True)
class FlexVariant:
    block_size: tuple[int, int]
    kernel_options: dict[str, int] | None = None


FLEX_VARIANTS = {
    "flex_b128": FlexVariant((128, 128)),
    "flex_q128_kv64": FlexVariant((128, 64)),
    "flex_b64": FlexVariant((64, 64), {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}),
}
IMPLS = ["dense", "gather", "split", *FLEX_VARIANTS]


def _tokens(packs: int) -> int:
    return packs * 10 + 1


def _full_layout(packs: int, device: torch.device) -> TokenLayout:
    return TokenLayout(3, torch.ones(1, packs, 9, dtype=torch.bool, device=device), torch.ones(1, packs, dtype=torch.bool, device=device))


class Meter:
    """Median wall time and peak memory of a step, synchronised on CUDA."""

    def __init__(self, device: torch.device, warmup: int, repeats: int) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def measure(self, step: Callable[[], None]) -> dict[str, Any]:
        if self.cuda:
            torch.cuda.empty_cache()
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        times = []
        for i in range(self.warmup + self.repeats):
            self.sync()
            t0 = time.perf_counter()
            step()
            self.sync()
            if i >= self.warmup:
                times.append(time.perf_counter() - t0)
        result: dict[str, Any] = {"status": "ok", "seconds": statistics.median(times), "seconds_all": times}
        if self.cuda:
            result["peak_delta_bytes"] = torch.cuda.max_memory_allocated(self.device) - base
        return result


def _guarded(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one configuration; an out-of-memory or a kernel that cannot run is a result, not a crash."""
    try:
        return run()
    except torch.OutOfMemoryError:
        return {"status": "failed: out of memory"}
    except (RuntimeError, NotImplementedError, AssertionError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        return {"status": f"failed: {type(err).__name__}: {first}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def attention_step(impl: str, packs: int, device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    layout = _full_layout(packs, device)
    gen = torch.Generator().manual_seed(0)
    qkv = [torch.randn(1, HEADS, layout.num_tokens, HEAD_DIM, generator=gen).to(device, dtype).requires_grad_() for _ in range(3)]
    if impl in FLEX_VARIANTS:
        variant = FLEX_VARIANTS[impl]
        block_mask = topo_block_mask(layout, "topo", block_size=variant.block_size)

        def run() -> torch.Tensor:
            return topo_attention_flex(*qkv, layout, block_mask=block_mask, kernel_options=variant.kernel_options)

    else:

        def run() -> torch.Tensor:
            return topo_attention(*qkv, layout, "topo", impl=impl)

    def step() -> None:
        torch.autograd.grad(run().float().sum(), qkv)

    return step


def encoder_step(packs: int, impl: str, device: torch.device, dtype: torch.dtype, checkpoint: bool, small: bool) -> Callable[[], None]:
    width = 64 if small else 512
    cfg = TopoPackConfig(
        patch_dim=width, pack_dim=width, global_dim=width, d_model=width, ffn_dim=4 * width,
        attention_impl=impl, checkpoint_layers=checkpoint,
    )
    enc = TopoPackEncoder(cfg).to(device, dtype)
    batch = full_pack_batch(packs, width).to(device, dtype)

    def step() -> None:
        enc.zero_grad(set_to_none=True)
        enc(batch).tokens.float().sum().backward()

    return step


def _skip_reason(impl: str, packs: int, device: torch.device) -> str | None:
    if impl in FLEX_VARIANTS and device.type != "cuda":
        return "skipped: flex_attention has no CPU backward"
    if impl == "dense" and device.type == "cuda":
        need = DENSE_BYTES_PER_PAIR * _tokens(packs) ** 2
        free = torch.cuda.mem_get_info(device)[0]
        if need > 0.9 * free:
            return f"skipped: N×N mask needs ~{need / GIB:.0f} GiB (free {free / GIB:.0f} GiB)"
    return None


def system_info(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if device.type == "cuda":
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / GIB, 1)
    return info


# ----------------------------------------------------------------------------- report


def _ratios(results: list[dict[str, Any]]) -> None:
    dense = {r["packs"]: r for r in results if r["kind"] == "attention" and r["impl"] == "dense" and r["status"] == "ok"}
    for r in results:
        d = dense.get(r["packs"])
        if r["kind"] != "attention" or r["impl"] == "dense" or r["status"] != "ok" or d is None:
            continue
        r["speedup_vs_dense"] = round(d["seconds"] / r["seconds"], 1)
        if "peak_delta_bytes" in r:
            r["memory_ratio_vs_dense"] = round(d["peak_delta_bytes"] / max(1, r["peak_delta_bytes"]), 1)


def _goals(report: dict[str, Any]) -> list[str]:
    rows = report["results"]
    lines = []
    goal_packs = report["goal_packs"]
    best = min(
        (r for r in rows if r["kind"] == "attention" and r["packs"] == goal_packs and "speedup_vs_dense" in r),
        key=lambda r: r["seconds"],
        default=None,
    )
    if best:
        mem = f", {best['memory_ratio_vs_dense']}× less memory" if "memory_ratio_vs_dense" in best else ""
        lines.append(f"- attention fwd+bwd, {goal_packs:,} packs (goal ≥ 20× faster and ≥ 20× less memory than dense): "
                     f"fastest is `{best['impl']}`, {best['speedup_vs_dense']}× faster{mem}.")
    else:
        lines.append(f"- attention fwd+bwd, {goal_packs:,} packs: no ratio (dense or every other implementation did not run).")
    for r in rows:
        if r["kind"] == "encoder":
            what = f"- 6-layer encoder fwd+bwd at {r['packs']:,} packs, `{r['impl']}`{' + checkpointing' if r['checkpoint'] else ''}: "
            if r["status"] == "ok":
                mem = f", peak Δ {r['peak_delta_bytes'] / GIB:.1f} GiB" if "peak_delta_bytes" in r else ""
                lines.append(what + f"fits, {r['seconds']:.2f} s{mem}.")
            else:
                lines.append(what + r["status"] + ".")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    s = report["system"]
    lines = [
        "# Topo-pack attention on the GPU" + (" (small CPU smoke run)" if report["small"] else ""),
        "",
        f"Device: {s['device']}; torch {s['torch']}; CUDA {s['cuda'] or '—'}; dtype {s['dtype']}"
        + (f"; {s['gpu_memory_gib']} GiB" if "gpu_memory_gib" in s else "") + ".",
        f"Full 3×3 packs (N = 10·packs + 1 tokens), {HEADS} heads × {HEAD_DIM}, forward + backward, median of "
        f"{report['repeats']} timed runs after {report['warmup']} warm-up. Memory: peak allocated during the step minus "
        "allocated before it (CUDA only). Run took "
        f"{report['seconds']:.0f} s (limit {report['time_limit']:.0f} s).",
        "",
        "## Goals",
        "",
        *_goals(report),
        "",
        "## Attention operator",
        "",
        "| packs | tokens | impl | status | time (ms) | peak Δ mem (GiB) | dense/impl time | dense/impl mem |",
        "|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    attention = sorted((r for r in report["results"] if r["kind"] == "attention"), key=lambda r: (r["packs"], IMPLS.index(r["impl"])))
    for r in attention:
        ok = r["status"] == "ok"
        mem = f"{r['peak_delta_bytes'] / GIB:.3f}" if ok and "peak_delta_bytes" in r else "—"
        t = f"{r['seconds'] * 1e3:.2f}" if ok else "—"
        lines.append(f"| {r['packs']:,} | {_tokens(r['packs']):,} | {r['impl']} | {r['status']} | {t} | {mem} | "
                     f"{r.get('speedup_vs_dense', '—')} | {r.get('memory_ratio_vs_dense', '—')} |")
    lines += ["", "## `attention_impl=\"auto\"`", "", "| packs | picks | probe times (ms) |", "|---:|---|---|"]
    for a in report["auto"]:
        times = ", ".join(f"{k} {v * 1e3:.2f}" if v != float("inf") else f"{k} failed" for k, v in a["probe_seconds"].items())
        lines.append(f"| {a['packs']:,} | {a['choice']} | {times} |")
    lines += ["", "## 6-layer encoder", "", "| packs | impl | checkpointing | status | time (s) | peak Δ mem (GiB) |", "|---:|---|---|---|---:|---:|"]
    for r in report["results"]:
        if r["kind"] == "encoder":
            ok = r["status"] == "ok"
            t = f"{r['seconds']:.3f}" if ok else "—"
            mem = f"{r['peak_delta_bytes'] / GIB:.2f}" if ok and "peak_delta_bytes" in r else "—"
            lines.append(f"| {r['packs']:,} | {r['impl']} | {r['checkpoint']} | {r['status']} | {t} | {mem} |")
    lines += ["", f"Plot: `{report['plot']}`.", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["kind"] == "attention" and r["status"] == "ok"]
    has_mem = any("peak_delta_bytes" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(11 if has_mem else 6, 4.2), squeeze=False)
    for impl in IMPLS:
        pts = sorted((r["packs"], r) for r in rows if r["impl"] == impl)
        if not pts:
            continue
        xs = [p for p, _ in pts]
        axes[0][0].plot(xs, [r["seconds"] * 1e3 for _, r in pts], marker="o", label=impl)
        if has_mem:
            axes[0][1].plot(xs, [r["peak_delta_bytes"] / GIB for _, r in pts], marker="o", label=impl)
    axes[0][0].set(xscale="log", yscale="log", xlabel="packs", ylabel="fwd+bwd time (ms)", title="time")
    if has_mem:
        axes[0][1].set(xscale="log", yscale="log", xlabel="packs", ylabel="peak Δ memory (GiB)", title="memory")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"topo-pack attention, {report['system']['device']}, {report['system']['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU smoke sizes (16..128 packs, a narrow encoder)")
    parser.add_argument("--packs", type=int, nargs="+", help="sweep sizes (default 400 1000 3600 10000 40000)")
    parser.add_argument("--goal-packs", type=int, help="size the goal ratios are read at (default 3600; 64 with --small)")
    parser.add_argument("--encoder-packs", type=int, help="size of the 6-layer encoder check (default 40000; 128 with --small)")
    parser.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=500.0, help="seconds; later configurations are skipped past it")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    packs = args.packs or ([16, 64, 128] if args.small else [400, 1000, 3600, 10000, 40000])
    goal_packs = args.goal_packs or (64 if args.small else 3600)
    enc_packs = args.encoder_packs or (128 if args.small else 40000)
    name = "topo_attention_gpu_small" if args.small else "topo_attention_gpu"
    args.out.mkdir(parents=True, exist_ok=True)
    meter = Meter(device, args.warmup, args.repeats)
    results: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "benchmark": "topo_attention_gpu", "small": args.small, "system": system_info(device, dtype),
        "goal_packs": goal_packs, "warmup": args.warmup, "repeats": args.repeats, "time_limit": args.time_limit,
        "results": results, "auto": [], "plot": f"{name}.png", "seconds": 0.0,
    }

    def out_of_time() -> bool:
        return time.perf_counter() - started > args.time_limit

    def save() -> None:
        report["seconds"] = time.perf_counter() - started
        _ratios(results)
        write_json_atomic(args.out / f"{name}.json", report)
        write_text_atomic(args.out / f"{name}.md", render_markdown(report))

    def attention(p: int, impl: str) -> None:
        entry: dict[str, Any] = {"kind": "attention", "packs": p, "impl": impl}
        reason = "skipped: time limit" if out_of_time() else _skip_reason(impl, p, device)
        entry.update({"status": reason} if reason else _guarded(lambda: meter.measure(attention_step(impl, p, device, dtype))))
        print(f"attention {p:>6} packs {impl:<15} {entry['status']} {entry.get('seconds', float('nan')) * 1e3:.2f} ms", flush=True)
        results.append(entry)
        save()

    def encoder(checkpoint: bool, impl: str) -> bool:
        entry: dict[str, Any] = {"kind": "encoder", "packs": enc_packs, "impl": impl, "checkpoint": checkpoint}
        if out_of_time():
            entry["status"] = "skipped: time limit"
        else:
            # Big steps are timed once after one warm-up; their time is seconds, not noise.
            entry.update(_guarded(lambda: Meter(device, 1, 1).measure(encoder_step(enc_packs, impl, device, dtype, checkpoint, args.small))))
        print(f"encoder {enc_packs} packs {impl} checkpoint={checkpoint}: {entry['status']}", flush=True)
        results.append(entry)
        save()
        return entry["status"] == "ok"

    # 1. The goal size, every implementation.
    for impl in args.impls:
        attention(goal_packs, impl)
    # 2. The encoder at the largest size, with the implementation that was fastest at the goal size.
    timed = [r for r in results if r["status"] == "ok" and r["impl"] in ("split", "gather")]
    enc_impl = min(timed, key=lambda r: r["seconds"])["impl"] if timed else "split"
    if not encoder(False, enc_impl):
        encoder(True, enc_impl)
    # 3. The sweep.
    for p in packs:
        if p != goal_packs:
            for impl in args.impls:
                attention(p, impl)
    # 4. What auto picks (the probe itself is timed by autoselect).
    for p in sorted({goal_packs, *packs}):
        if out_of_time():
            break
        shape = dict(num_packs=p, pack_size=3, n_heads=HEADS, head_dim=HEAD_DIM, variant="topo", grad=True)
        choice = _guarded(lambda: {"status": "ok", "choice": choose_impl(device, dtype, **shape)})
        probe = PROBE_TIMES.get(ShapeClass.of(device, dtype, **shape), {})
        report["auto"].append({"packs": p, "choice": choice.get("choice", choice["status"]), "probe_seconds": probe})
        save()
    plot(report, args.out / f"{name}.png")
    save()
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
