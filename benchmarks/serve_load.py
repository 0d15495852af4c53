"""Load check of the viewer's tile endpoint on a real uvicorn server bound to 127.0.0.1.

The server runs as ``slidevl serve`` in its own process, so the client's work does not
share the server's interpreter (and GIL) and the figures are what a browser would see.

Sends a bounded number of Deep Zoom tile requests (default 1,000) through an async
httpx client with a concurrency cap, twice: a cold pass (empty tile cache: every
distinct tile is rendered by OpenSlide + JPEG encoding in the thread pool) and a warm
pass (the same requests, answered from the LRU). Reports tiles/s, latency percentiles,
status counts and errors. The request mix covers the three most detailed Deep Zoom
levels of every slide, each distinct tile asked about twice per pass in random order,
so concurrent duplicate misses occur as they do when a browser pans.

Without ``--job`` a small synthetic cohort is rendered (``slidevl.synth.make_cohort``)
and registered in a job manifest through ``slidevl.features.jobs``; tiles do not need
features, so preprocessing is skipped.

Writes ``benchmarks/results/serve_load.json`` and ``.md``.

    python benchmarks/serve_load.py [--requests 1000] [--concurrency 32] [--job JOB]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
from rich.progress import Progress

from slidevl.atomic import write_json_atomic, write_text_atomic
from slidevl.features import jobs

RESULTS = Path(__file__).resolve().parent / "results"


def synthetic_job(root: Path, n_patients: int, slide_px: int) -> Path:
    """A job folder whose manifest lists freshly rendered synthetic slides."""
    from slidevl.synth import make_cohort

    cohort = make_cohort(root / "cohort", n_patients=n_patients, slide_px=slide_px, progress=False)
    job = root / "job"
    for slide in sorted((cohort.out_dir / "slides").iterdir()):
        jobs.write_status(job, jobs.SlideStatus(slide_id=jobs.slide_id_of(slide), slide_path=str(slide.resolve()), status="ok"))
    jobs.rebuild_manifest(job, {"note": "serve_load benchmark: slides only"})
    return job


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def serve_process(job: Path, start_timeout: float = 60.0) -> Iterator[tuple[str, int]]:
    """``slidevl serve JOB`` on a free loopback port in a child process; yield its base URL and pid."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "import sys; from slidevl.serve.cli import app; sys.argv[0] = 'slidevl serve'; app()"
    proc = subprocess.Popen([sys.executable, "-c", code, str(job), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                httpx.get(f"{base}/api/info", timeout=2).raise_for_status()
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {proc.stdout.read() if proc.poll() is not None else 'timeout'}") from None
                time.sleep(0.2)
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def request_mix(client: httpx.Client, n: int, seed: int) -> list[str]:
    """``n`` tile URLs over the three most detailed levels of every slide, each distinct tile ~twice."""
    urls: list[str] = []
    for slide in client.get("/api/slides").json():
        info = client.get(f"/api/slides/{slide['id']}")
        if info.status_code != 200:
            continue
        meta = info.json()
        dzi_levels = meta["levels"]
        for level in range(dzi_levels - 3, dzi_levels):
            scale = 2 ** (dzi_levels - 1 - level)
            cols = -(-meta["width"] // scale // meta["tile_size"])
            rows = -(-meta["height"] // scale // meta["tile_size"])
            urls += [f"/api/slides/{slide['id']}/image_files/{level}/{c}_{r}.jpeg" for c in range(cols) for r in range(rows)]
    if not urls:
        raise SystemExit("no viewable slide in the job")
    rng = random.Random(seed)
    distinct = rng.sample(urls, min(len(urls), max(1, n // 2)))
    mix = (distinct * (n // len(distinct) + 1))[:n]
    rng.shuffle(mix)
    return mix


def run_pass(base: str, pid: int, urls: list[str], concurrency: int, deadline_s: float, progress: Progress, label: str) -> dict[str, Any]:
    """One pass, with the server's and this client's CPU time (robust to other load on the machine)."""
    server0, client0 = cpu_seconds(pid), time.process_time()
    result = asyncio.run(_fetch(base, urls, concurrency, deadline_s, progress, label))
    server1, client1 = cpu_seconds(pid), time.process_time()
    ok = max(result["ok"], 1)
    result["server_cpu_ms_per_tile"] = round((server1 - server0) * 1000 / ok, 2) if server0 is not None else None
    result["client_cpu_ms_per_tile"] = round((client1 - client0) * 1000 / ok, 2)
    return result


async def _fetch(base: str, urls: list[str], concurrency: int, deadline_s: float, progress: Progress, label: str) -> dict[str, Any]:
    """Fetch ``urls`` with at most ``concurrency`` in flight; stop at ``deadline_s``."""
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []
    task = progress.add_task(label, total=len(urls))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as http:
        async def one(url: str) -> None:
            async with sem:
                t0 = time.perf_counter()
                try:
                    r = await http.get(url)
                    key = str(r.status_code)
                    if r.status_code == 200 and not r.content.startswith(b"\xff\xd8"):
                        errors.append(f"{url}: not a JPEG")
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                    errors.append(f"{url}: {exc!r}")
                latencies.append(time.perf_counter() - t0)
                statuses[key] = statuses.get(key, 0) + 1
                progress.advance(task)

        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*(one(u) for u in urls)), timeout=deadline_s)
            timed_out = False
        except asyncio.TimeoutError:
            timed_out = True
        wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    ok = statuses.get("200", 0)
    return {
        "requests": len(urls), "completed": len(latencies), "ok": ok, "statuses": statuses,
        "errors": len(errors) + (len(urls) - len(latencies)), "error_examples": errors[:5], "timed_out": timed_out,
        "wall_s": round(wall, 3), "tiles_per_s": round(ok / wall, 1) if wall else None,
        "latency_ms": {q: round(float(np.percentile(lat, p)), 2) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))} if lat.size else {},
    }


def render_md(result: dict[str, Any]) -> str:
    lines = [
        "# serve_load: tile endpoint under concurrent load",
        "",
        f"`slidevl serve` (uvicorn, own process) on 127.0.0.1, {result['requests']} tile requests per pass, at most {result['concurrency']} in flight "
        f"({result['distinct_tiles']} distinct tiles from {result['slides']} slides; JPEG, 254 px + overlap). "
        f"Machine: {result['machine']['cpus']} CPUs, Python {result['machine']['python']}, load average before the run "
        f"{result['machine']['loadavg_before']}.",
        "",
        "| pass | tiles/s | wall s | ok | errors | p50 ms | p95 ms | p99 ms | server CPU ms/tile | client CPU ms/tile |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("cold", "warm"):
        p = result[name]
        lat = p["latency_ms"]
        lines.append(f"| {name} | {p['tiles_per_s']} | {p['wall_s']} | {p['ok']} | {p['errors']} | "
                     f"{lat.get('p50')} | {lat.get('p95')} | {lat.get('p99')} | {p['server_cpu_ms_per_tile']} | "
                     f"{p['client_cpu_ms_per_tile']} |")
    cache = result["tile_cache"]
    lines += ["", f"Tile cache after both passes: {cache['entries']} entries, {cache['bytes'] / 2**20:.1f} MiB, "
              f"{cache['hits']} hits, {cache['misses']} misses.",
              "", "Cold: each distinct tile is rendered once (OpenSlide read + resize + JPEG) in the thread pool; "
              "duplicates that arrive while it renders may render again. Warm: every request is a cache hit served on "
              "the event loop. Wall-clock rates depend on what else runs on the machine (see the load average); "
              "the CPU columns do not: 1000 / (server CPU ms per tile) is the rate one free core would sustain.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", type=Path, help="existing job folder (default: render a synthetic one)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds allowed per pass")
    parser.add_argument("--patients", type=int, default=5)
    parser.add_argument("--slide-px", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not 1 <= args.requests <= 20_000 or not 1 <= args.concurrency <= 256:
        parser.error("--requests must be in 1..20000 and --concurrency in 1..256")

    with tempfile.TemporaryDirectory(prefix="serve_load-") as tmp:
        job = args.job or synthetic_job(Path(tmp), args.patients, args.slide_px)
        loadavg = os.getloadavg() if hasattr(os, "getloadavg") else None
        with serve_process(job) as (base, pid), Progress() as progress:
            with httpx.Client(base_url=base, timeout=60) as client:
                urls = request_mix(client, args.requests, args.seed)
                slides = len(client.get("/api/slides").json())
            cold = run_pass(base, pid, urls, args.concurrency, args.deadline, progress, "cold pass")
            warm = run_pass(base, pid, urls, args.concurrency, args.deadline, progress, "warm pass")
            cache = httpx.get(f"{base}/api/stats").json()["tile_cache"]
    result = {
        "benchmark": "serve_load", "requests": args.requests, "concurrency": args.concurrency,
        "distinct_tiles": len(set(urls)), "slides": slides, "job": "synthetic" if args.job is None else str(args.job),
        "cold": cold, "warm": warm, "tile_cache": cache,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": [round(x, 2) for x in loadavg] if loadavg else None},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "serve_load.json", result)
    write_text_atomic(args.out / "serve_load.md", render_md(result))
    print(render_md(result))
    if cold["errors"] or warm["errors"]:
        raise SystemExit(f"{cold['errors'] + warm['errors']} failed requests; see {args.out / 'serve_load.json'}")


if __name__ == "__main__":
    main()
