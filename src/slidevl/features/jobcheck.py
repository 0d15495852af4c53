"""A job folder's fsck (``slidevl job check``) and moving its slides (``slidevl job relocate``).

For every slide the check looks at four things, each of which can go wrong on its own
when job folders are copied, synced or moved:

* the feature store: present, readable to the last array, as many patches as the status says;
* its fingerprint: the configuration recorded in the store equals the one in the status;
* the slide file: found (:mod:`slidevl.features.slidepaths`) and unchanged;
* the manifest: its row equals what the status says.

``fix`` repairs only what can be repaired without a decision: it rebuilds the manifest
when a row is stale, and marks a broken store for recomputation (the file is moved aside
to ``<slide>.h5.broken`` and the status says failed, so the next ``slidevl preprocess``
run recomputes it instead of skipping it). Everything that is fine is left untouched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from slidevl.features import jobs
from slidevl.features.slidepaths import SlideChangedError, SlideFileError, SlideRecord, relocate_hint, resolve_slide
from slidevl.features.store import read_slide_features
from slidevl.slide.formats import is_slide_path

BROKEN_SUFFIX = ".broken"


@dataclass(frozen=True)
class SlideCheck:
    """The findings for one slide; each ``*_problem`` is None when that part is fine."""

    slide_id: str
    status: str
    store_problem: str | None = None
    fingerprint_problem: str | None = None
    slide_problem: str | None = None
    manifest_problem: str | None = None
    status_problem: str | None = None
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return not any((self.store_problem, self.fingerprint_problem, self.slide_problem, self.manifest_problem,
                        self.status_problem))

    @property
    def store_broken(self) -> bool:
        """A store that ``--fix`` marks for recomputation."""
        return self.store_problem is not None or self.fingerprint_problem is not None


@dataclass
class CheckReport:
    job: Path
    slides: list[SlideCheck]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.slides)


def _store_problems(job: Path, status: jobs.SlideStatus) -> tuple[str | None, str | None]:
    """(store problem, fingerprint problem) of a slide whose status says ok."""
    if not status.output:
        return "the status names no feature file", None
    path = job / status.output
    if not path.is_file():
        return f"{status.output} missing", None
    try:
        features = read_slide_features(path)
    except (OSError, KeyError, ValueError, RuntimeError) as exc:  # h5py reports truncation as OSError/KeyError
        # The store's own message ends in its fix; the fix column of the check says what to do here.
        return f"{status.output} unreadable: {exc.__cause__ or exc}", None
    if status.n_patches is not None and features.n_patches != status.n_patches:
        return f"{status.output} holds {features.n_patches} patches, the status says {status.n_patches}", None
    stored = features.attrs.get("config_fingerprint")
    if status.fingerprint is not None and stored != jobs.normalise(status.fingerprint):
        return None, f"{status.output} was written with another configuration than the status records"
    return None, None


def _manifest_problem(manifest: dict[str, Any] | None, rows: dict[tuple[str, str | None], dict[str, Any]],
                      status: jobs.SlideStatus) -> str | None:
    if manifest is None:
        return f"no readable {jobs.MANIFEST}"
    row = rows.get((status.slide_id, status.folder))
    if row is None:
        return "not listed"
    expected = jobs.normalise(jobs.manifest_entry(status))
    # Rows of older manifests lack the newer fields; absent and null are the same record.
    differs = sorted(k for k, v in expected.items() if row.get(k) != v)
    return f"differs from the status in {', '.join(differs)}" if differs else None


def check_slide(job: Path, status: jobs.SlideStatus, manifest: dict[str, Any] | None,
                rows: dict[tuple[str, str | None], dict[str, Any]],
                slides_root: Path | None = None) -> SlideCheck:
    """Check one slide of ``job`` (see the module docstring)."""
    store = fingerprint = status_problem = None
    if status.status == "ok":
        store, fingerprint = _store_problems(job, status)
    elif status.status == "failed":
        status_problem = f"failed: {status.error}"
    elif status.status == "interrupted":
        status_problem = "interrupted (Ctrl-C or SIGTERM) before it finished"
    else:
        status_problem = "running, or interrupted (a killed run leaves this)"
    slide_error = _slide_error(status, job, slides_root)
    manifest_problem = _manifest_problem(manifest, rows, status)
    fixes = []
    if store or fingerprint:
        fixes.append(f"`slidevl job check {job} --fix`, then `slidevl preprocess --out {job}`")
    elif status_problem:
        fixes.append(f"`slidevl preprocess --out {job}` (after fixing the cause, if it failed)")
    if isinstance(slide_error, SlideChangedError):
        fixes.append("point --slides-root at the original file, or recompute from this one with "
                     f"`slidevl preprocess FILE --out {job} --overwrite`")
    elif slide_error is not None:
        fixes.append(relocate_hint(job))
    if manifest_problem and not (store or fingerprint):
        fixes.append(f"`slidevl job check {job} --fix`")
    return SlideCheck(status.slide_id, status.manifest_status, store, fingerprint,
                      slide_error.detail if slide_error else None, manifest_problem, status_problem, "; ".join(fixes) or None)


def _slide_error(status: jobs.SlideStatus, job: Path, slides_root: Path | None) -> SlideFileError | None:
    try:
        resolve_slide(status.slide, job, slides_root)
    except SlideFileError as exc:
        return exc
    return None


def _unlisted(job: Path, rows: dict[tuple[str, str | None], dict[str, Any]],
              keys: set[tuple[str, str | None]]) -> list[SlideCheck]:
    """Manifest rows and status files that do not correspond to a readable status."""
    found = []
    ids = {slide_id for slide_id, _ in keys}
    for path in jobs.status_files(job):
        if path.stem not in ids:
            found.append(SlideCheck(path.stem, "?", status_problem=f"{path.relative_to(job)} unreadable",
                                    fix=f"delete it and re-run `slidevl preprocess SLIDE --out {job}` for this slide"))
    unreadable = {c.slide_id for c in found}
    for key in sorted(set(rows) - keys, key=lambda k: (k[0], k[1] or "")):
        if key[0] in unreadable:
            continue
        slide_id = key[0]
        found.append(SlideCheck(slide_id, str(rows[key].get("status", "?")),
                                manifest_problem="listed, but the job has no status for it",
                                fix=f"`slidevl job check {job} --fix`"))
    return found


def check_job(job: str | os.PathLike[str], *, slides_root: str | os.PathLike[str] | None = None,
              progress: Callable[[str], None] | None = None) -> CheckReport:
    """Check every slide of ``job``; ``progress`` is called with each slide id as it is checked."""
    job = Path(job)
    if not (job / jobs.STATUS_DIR).is_dir():
        raise jobs.UsageError(f"{job}: not a job folder (no {jobs.STATUS_DIR}/); pass the folder `slidevl preprocess --out` wrote")
    root = Path(slides_root) if slides_root else None
    manifest = jobs.read_manifest(job)
    rows = {jobs.row_key(r): r for r in (manifest or {}).get("slides", []) if isinstance(r, dict) and "slide_id" in r}
    checks = []
    statuses = jobs.read_statuses(job)
    for status in statuses:
        if progress:
            progress(status.slide_id)
        checks.append(check_slide(job, status, manifest, rows, root))
    checks += _unlisted(job, rows, {(s.slide_id, s.folder) for s in statuses})
    return CheckReport(job, sorted(checks, key=lambda c: c.slide_id))


def _mark_for_recomputation(job: Path, status: jobs.SlideStatus, reason: str) -> str:
    """Move the broken store aside and mark the slide failed, so the next run recomputes it."""
    note = ""
    if status.output and (job / status.output).is_file():
        aside = job / (status.output + BROKEN_SUFFIX)
        os.replace(job / status.output, aside)
        note = f"; the old file is {aside.relative_to(job)}"
    error = (f"feature store broken ({reason}); marked for recomputation by `slidevl job check --fix`{note}. "
             f"Run `slidevl preprocess --out {job}` to recompute it")
    jobs.write_status(job, replace(status, status="failed", action="processed", error=error, output=None, fingerprint=None))
    return f"{status.slide_id}: {error}"


def fix_job(job: str | os.PathLike[str], report: CheckReport) -> list[str]:
    """Apply what ``fix`` may repair (see the module docstring); return what was done."""
    job = Path(job)
    done = []
    broken = {c.slide_id: c for c in report.slides if c.store_broken}
    for status in jobs.read_statuses(job):
        check = broken.get(status.slide_id)
        # Only the records whose own store is broken: another encoder's features of the slide may be fine.
        if check is not None and status.status == "ok" and any(_store_problems(job, status)):
            done.append(_mark_for_recomputation(job, status, check.store_problem or check.fingerprint_problem or ""))
    if done or any(c.manifest_problem for c in report.slides):
        config = (jobs.read_manifest(job) or {}).get("config")
        manifest, _ = jobs.rebuild_manifest(job, config)
        done.append(f"rebuilt {manifest.relative_to(job)} and {jobs.SUMMARY} from the status files")
    return done


@dataclass(frozen=True)
class Relocation:
    slide_id: str
    old: str
    new: Path
    problem: str | None


def plan_relocation(job: str | os.PathLike[str], slides_root: str | os.PathLike[str]) -> list[Relocation]:
    """Where each slide of ``job`` would be under ``slides_root``, and why it cannot move there."""
    job, root = Path(job), Path(slides_root).expanduser().resolve()
    if not root.is_dir():
        raise jobs.UsageError(f"{root}: no such folder; pass the folder that now holds the slide files")
    # One record per slide: every encoder's record of a slide names the same file.
    statuses = list({s.slide_id: s for s in jobs.read_statuses(job)}.values())
    if not statuses:
        raise jobs.UsageError(f"{job}: the job records no slides (no readable {jobs.STATUS_DIR}/*.json)")
    plan = []
    for status in statuses:
        record = status.slide
        new = root / (record.name or status.slide_id)
        if record.name is None:
            problem = "the job records no file name for it; re-run `slidevl preprocess` with the slide"
        elif not is_slide_path(new):
            problem = f"not found in {root}"
        else:
            difference = record.change(new)
            problem = None if difference is None else f"changed: {difference}; not the file that was preprocessed"
        plan.append(Relocation(status.slide_id, record.path or record.relpath or "", new, problem))
    return plan


def relocate_job(job: str | os.PathLike[str], plan: list[Relocation]) -> Path:
    """Record every slide at its new place and rebuild the manifest.

    Only called with a plan without problems, so no record ever points at a missing or
    changed file. Each status is replaced atomically; an interrupted run leaves a mix of
    old and new records that are each valid, and running relocate again completes it.
    """
    job = Path(job)
    if any(r.problem for r in plan):
        raise ValueError("relocate_job needs a plan without problems; see plan_relocation")
    moved = {r.slide_id: r.new for r in plan}
    for status in jobs.read_statuses(job):  # every encoder's record of each slide
        if status.slide_id in moved:
            jobs.write_status(job, replace(status, **SlideRecord.of_file(status.slide_id, moved[status.slide_id], job).fields()))
    manifest, _ = jobs.rebuild_manifest(job, (jobs.read_manifest(job) or {}).get("config"))
    return manifest

