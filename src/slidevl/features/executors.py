"""Where ``preprocess`` runs its slides: in this process, or as tasks on a Ray cluster.

Both executors call :func:`slidevl.features.pipeline.run_slide` for every slide, so a
slide's files, status and skip-when-complete check are the same whichever ran it; the
driver (:func:`~slidevl.features.pipeline.preprocess`) rebuilds the manifest from the
status files at the end, as after a local run.

Ray: the slide paths and the job folder must be at the same paths on every node (a
shared file system), and every node needs slidevl installed in the Python that runs
its Ray workers.
"""

from __future__ import annotations

import socket
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch
from rich.console import Console

from slidevl.features import jobs
from slidevl.features.config import PreprocessConfig
from slidevl.features.encoders.base import safe_name
from slidevl.features.jobs import UsageError
from slidevl.features.pipeline import (
    Encoders, SlideProcessor, SlideResult, _Progress, load_encoders, output_paths, remove_stale_partials, run_slide,
)
from slidevl.features.slidepaths import SlideRecord
from slidevl.features.store import FeatureStore

EXECUTORS = ("local", "ray")
RAY_INSTALL_HINT = "pip install 'slidevl[ray]'"
# How long the driver waits for cancelled Ray tasks to record themselves as interrupted.
CANCEL_GRACE_S = 10.0
CONNECT_TIMEOUT_S = 5.0


class Executor(Protocol):
    """Runs the slides of one ``preprocess`` call."""

    note: str  # appended to the run's first line (e.g. " on Ray (4 CPUs)")

    def start(self, job: Path, config: PreprocessConfig, encoders: Encoders | None) -> str:
        """Get ready (build or check the encoders); return the tile encoder's name."""

    def run(self, slides: Sequence[Path], progress: _Progress) -> Iterator[SlideResult]:
        """Each slide's result, as it finishes."""

    def close(self) -> None:
        """Release what :meth:`start` took (also after an error)."""


class LocalExecutor:
    """One slide after another in this process; tiles are read by DataLoader workers."""

    note = ""

    def __init__(self) -> None:
        self._processor: SlideProcessor | None = None

    def start(self, job: Path, config: PreprocessConfig, encoders: Encoders | None) -> str:
        self._processor = SlideProcessor(job, config, encoders or load_encoders(config))
        return self._processor.encoders.tile.name

    def run(self, slides: Sequence[Path], progress: _Progress) -> Iterator[SlideResult]:
        assert self._processor is not None, "start() first"
        for path in slides:
            progress.start_slide(jobs.slide_id_of(path))
            yield run_slide(self._processor, path, progress)

    def close(self) -> None:
        self._processor = None


def _on_cuda(config: PreprocessConfig) -> bool:
    return torch.device(config.device).type == "cuda"


def _task_config(config: PreprocessConfig) -> PreprocessConfig:
    """The configuration a Ray task runs with (execution knobs only: results are unchanged).

    CPU encoders read tiles in the task's own process (workers=0): Ray already runs
    one slide per CPU, and a task that forked DataLoader workers would use CPUs Ray
    does not know about. A GPU task keeps ``config.workers`` readers to feed its GPU
    and asks Ray for that many CPUs more (see :meth:`RayExecutor._task_options`). Ray
    makes the task's one GPU the only visible one, so ``cuda:1`` becomes ``cuda``.
    """
    if _on_cuda(config):
        return replace(config, device="cuda", progress=False)
    return replace(config, workers=0, progress=False)


# One worker process runs many slides of a job: build its encoders (a model load, for a
# foundation model) once, not once per slide.
_worker_encoders: tuple[PreprocessConfig, Encoders] | None = None


def _worker_encoders_for(config: PreprocessConfig) -> Encoders:
    global _worker_encoders
    if _worker_encoders is None or _worker_encoders[0] != config:
        _worker_encoders = (config, load_encoders(config))
    return _worker_encoders[1]


def _ray_encoder_name(config: PreprocessConfig) -> str:
    """Ray task: build the encoders where the slides will run; return the tile encoder's name."""
    return _worker_encoders_for(config).tile.name


def _ray_slide(job: Path, config: PreprocessConfig, path: Path) -> SlideResult:
    """Ray task: one slide, exactly as the local loop runs it."""
    processor = SlideProcessor(job, config, _worker_encoders_for(config))
    return run_slide(processor, path, _Progress(Console(quiet=True), False, 1))


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL_HINT}") from None
    return ray


class RayExecutor:
    """Each slide is a Ray task, on the cluster at ``address`` or on a local one.

    ``address`` is what ``ray.init`` takes (``ray://head:10001``, ``head:6379``, ``auto``);
    None connects to the Ray already initialised in this process, else starts a local
    cluster that :meth:`close` shuts down again. A task whose worker dies (killed, out of
    memory, node lost) is retried ``max_retries`` times by Ray; a slide that fails in
    our code is recorded as failed by the task itself and never retried.
    """

    def __init__(self, address: str | None = None, *, max_retries: int = 1) -> None:
        self.address = address
        self.max_retries = max_retries
        self.note = ""
        self._ray: Any = None
        self._owns_ray = False
        self._job = Path(".")
        self._config = PreprocessConfig()
        self._store: FeatureStore | None = None
        self._encoder_name = ""

    def start(self, job: Path, config: PreprocessConfig, encoders: Encoders | None) -> str:
        if encoders is not None:
            raise UsageError(
                "the Ray executor builds the encoders from the configured specs in each worker, so it cannot take "
                "encoder objects; register a custom model (`slidevl encoders register`) and pass its spec"
            )
        ray = self._ray = _import_ray()
        self._connect(ray)
        self._job, self._config = Path(job).resolve(), config
        resources = ray.cluster_resources()
        self.note = f" on Ray ({int(resources.get('CPU', 0))} CPUs, {int(resources.get('GPU', 0))} GPUs)"
        self._warn_if_no_node_fits(ray)
        # Build the encoders once in a worker, with the slides' resources: a bad spec or
        # a node without the model fails here, once, not in every slide.
        name_task = ray.remote(_ray_encoder_name).options(**self._task_options(), max_retries=0)
        try:
            self._encoder_name = ray.get(name_task.remote(_task_config(config)))
        except ray.exceptions.RayTaskError as exc:
            raise exc.cause from None
        self._store = FeatureStore(self._job, safe_name(self._encoder_name))
        return self._encoder_name

    def _connect(self, ray: Any) -> None:
        if self.address is not None:
            _check_reachable(self.address)
        if ray.is_initialized() and self.address is None:
            return  # the caller's Ray (e.g. a notebook or a test): theirs to shut down
        if ray.is_initialized():
            raise UsageError(f"Ray is already initialised in this process; cannot also connect to {self.address}")
        try:
            ray.init(address=self.address, include_dashboard=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {self.address!r}" if self.address else "a local Ray cluster"
            raise UsageError(f"could not connect to {where}: {exc}; is `ray start --head` running there?") from None
        self._owns_ray = True

    def _warn_if_no_node_fits(self, ray: Any) -> None:
        """Warn when no node can run a task now: Ray lets such tasks wait, silently.

        Not an error: an autoscaling cluster adds nodes for tasks that wait.
        """
        need = self._task_options()
        if any(node.get("Alive") and node["Resources"].get("CPU", 0) >= need["num_cpus"]
               and node["Resources"].get("GPU", 0) >= need.get("num_gpus", 0) for node in ray.nodes()):
            return
        gpu = " and a GPU" if "num_gpus" in need else ""
        hint = "; a GPU task asks for 1 + --workers CPUs: lower --workers" if gpu else ""
        warnings.warn(f"no Ray node has {need['num_cpus']} CPUs{gpu} now: the slides wait until one joins{hint}",
                      RuntimeWarning, stacklevel=3)

    def _task_options(self) -> dict[str, Any]:
        if _on_cuda(self._config):
            return {"num_gpus": 1, "num_cpus": 1 + self._config.workers}
        return {"num_cpus": 1}

    def run(self, slides: Sequence[Path], progress: _Progress) -> Iterator[SlideResult]:
        ray = self._ray
        task = ray.remote(_ray_slide)
        options = {**self._task_options(), "max_retries": self.max_retries, "retry_exceptions": False}
        config = _task_config(self._config)
        # The task name is the worker's process title (`ray::slide <id>`): what ps and the Ray dashboard show.
        pending = {
            task.options(**options, name=f"slide {jobs.slide_id_of(p)}").remote(self._job, config, Path(p).resolve()): Path(p)
            for p in slides
        }
        try:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                path = pending.pop(ref)
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayError as exc:
                    # The retries are spent (the worker died each time) or Ray itself failed:
                    # the task could not record the slide, so the driver does.
                    yield self._record_unfinished(path, "failed", f"Ray task lost: {_first_line(exc)}")
        finally:
            if pending:  # interrupted (Ctrl-C/SIGTERM) or the caller stopped early
                self._cancel(pending)

    def _cancel(self, pending: dict[Any, Path]) -> None:
        """Cancel the slides not done; those a task did not mark interrupted are marked here."""
        ray = self._ray
        for ref in pending:
            ray.cancel(ref)  # a running task gets KeyboardInterrupt and records itself as interrupted
        ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_GRACE_S)
        for path in pending.values():
            status = jobs.read_status(self._job, jobs.slide_id_of(path), self._store.encoder if self._store else None)
            if status is not None and status.status == "running":
                self._record_unfinished(path, "interrupted", "interrupted before it finished; rerun the same command to resume")

    def _record_unfinished(self, path: Path, state: str, error: str) -> SlideResult:
        """Write the status of a slide whose task ended without writing one, and drop its temporaries."""
        assert self._store is not None
        slide_id = jobs.slide_id_of(path)
        folder = self._store.encoder
        remove_stale_partials([*output_paths(self._job, self._store, slide_id).values(), jobs.status_path(self._job, slide_id, folder)])
        jobs.write_status(self._job, jobs.SlideStatus(
            slide_id=slide_id, **SlideRecord.of_file(slide_id, path, self._job).fields(), status=state, error=error,
            encoder=self._encoder_name, encoder_folder=folder,
        ))
        return SlideResult(slide_id, path, "failed", error=error)

    def close(self) -> None:
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False


def _check_reachable(address: str) -> None:
    """Fail fast on an address nothing listens at: ``ray.init`` would retry for minutes."""
    host_port = address.split("://", 1)[-1]
    if host_port == "auto":
        return  # Ray finds the local cluster's address itself and says so when there is none
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address must be host:port, ray://host:port or auto, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UsageError(
            f"cannot reach the Ray cluster at {address}: {exc}; check the address and that `ray start --head` "
            "runs there (leave --address out for a local Ray cluster)"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def make_executor(name: str, address: str | None = None) -> Executor:
    """The executor for ``--executor NAME [--address ...]``."""
    if name not in EXECUTORS:
        raise UsageError(f"--executor must be one of {', '.join(EXECUTORS)}, got {name!r}")
    if name == "local":
        if address is not None:
            raise UsageError("--address applies to --executor ray")
        return LocalExecutor()
    _import_ray()  # fail before any work when Ray is missing
    return RayExecutor(address)
