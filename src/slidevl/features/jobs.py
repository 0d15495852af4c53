"""Job folders: slide discovery, sharding, per-slide status, manifest and summary.

A job may hold the features of several tile encoders (``features/<encoder>/``); each
encoder folder has its own statuses (``status/<encoder>/<slide>.json``), so running one
encoder never marks another's slides for recomputation. Jobs written before that keep a
single status per slide (``status/<slide>.json``); it still counts for the encoder folder
its features were written to, and is moved to that folder's place when next written.

Shards (processes, Slurm array tasks, torchrun ranks) share one job folder without
locks: each slide's status is its own file, written atomically by the one shard that
owns the slide, and ``manifest.json`` / ``summary.md`` are rebuilt from all status files
(every shard rebuilds when it finishes, so the last one to finish leaves them complete).

A slide is *complete* only when its status says ok, its feature file exists, and the
file's recorded configuration fingerprint equals the current one: a file that merely
exists (from a killed run or another configuration) is not done.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py

from slidevl.atomic import write_json_atomic, write_text_atomic
from slidevl.errors import InputError
from slidevl.features.slidepaths import SlideFileError, SlideRecord, resolve_slide
from slidevl.features.store import FeatureStoreError, read_slide_attrs
from slidevl.slide.formats import DICOM_EXTENSION, MIRAX_EXTENSION, SLIDE_EXTENSIONS, is_dicom_folder, is_visible, slide_of

# How many names a one-line list shows before it only counts the rest.
SHOWN_NAMES = 5
# How many not-slide entries summary.md lists (the manifest lists all of them).
SUMMARY_NAMES = 50
STATUS_DIR = "status"
# The fingerprint entries that decide a slide's tissue outline and QC picture (not the encoder's).
OUTLINE_SETTINGS = ("tissue", "grid", "min_tissue", "mpp", "slide_bytes")
MANIFEST = "manifest.json"
MANIFEST_LOCK = ".manifest.lock"
SUMMARY = "summary.md"


class UsageError(InputError):
    """Bad command-line input (no slides, duplicate ids, bad options): exit code 2."""


def slide_id_of(path: Path) -> str:
    """A slide's id: the file stem, or the folder name of a DICOM slide (also for one of its ``.dcm`` files)."""
    slide = slide_of(path)
    return slide.name if slide.is_dir() else slide.stem


def is_slide_file(path: Path) -> bool:
    """Whether a file found in a slide folder has a known slide extension."""
    return path.is_file() and path.suffix.lower() in SLIDE_EXTENSIONS


def scan_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    """(slides, entries that are not slides) of one input folder, read one level deep.

    A folder holding ``.dcm`` files is one DICOM slide. Any other folder is a folder of
    slides: its files with a slide extension and its sub-folders holding ``.dcm`` files
    (one DICOM slide each) are slides; every other entry is not, except hidden ones and
    the data folder a MIRAX ``.mrxs`` file keeps beside it.
    """
    if is_dicom_folder(folder):
        mixed = [_entry_name(p) for p in sorted(folder.iterdir()) if is_slide_file(p) or is_dicom_folder(p)]
        if mixed:
            raise UsageError(
                f"{folder}: holds DICOM (.dcm) files, which make a folder one DICOM slide, and also other slides "
                f"({', '.join(mixed[:SHOWN_NAMES])}); move the DICOM series into a folder of its own"
            )
        return [folder], []
    entries = [p for p in sorted(folder.iterdir()) if is_visible(p)]
    mirax_data = {p.stem for p in entries if p.suffix.lower() == MIRAX_EXTENSION and p.is_file()}
    slides: list[Path] = []
    others: list[Path] = []
    for entry in entries:
        if is_slide_file(entry) or is_dicom_folder(entry):
            slides.append(entry)
        elif not (entry.is_dir() and entry.name in mirax_data):
            others.append(entry)
    return slides, others


def find_inputs(inputs: Path | str | Sequence[Path | str]) -> tuple[list[Path], list[Path]]:
    """(slides sorted by id, input entries that are not slides) from files and folders.

    Folders are read by :func:`scan_folder`; a file given by name is a slide whatever its
    extension, and a ``.dcm`` file stands for the DICOM slide of its folder. Raises
    :class:`UsageError` when no slide is found or two slides share an id (their outputs
    would overwrite each other).
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    found: list[Path] = []
    others: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            slides, rest = scan_folder(item)
            found += slides
            others += rest
        elif item.exists():
            found.append(slide_of(item))
        else:
            raise UsageError(f"{item}: no such file or folder")
    if not found:
        where = ", ".join(str(p) for p in map(Path, inputs)) or "(nothing given)"
        note = not_slides_note(others)
        raise UsageError(f"no slides found in {where} (looked for {', '.join('*' + e for e in SLIDE_EXTENSIONS)} "
                         f"and folders of *{DICOM_EXTENSION} files){'; ' + note if note else ''}")
    by_id: dict[str, Path] = {}
    for path in found:
        sid = slide_id_of(path)
        if sid in by_id and by_id[sid].resolve() != path.resolve():
            raise UsageError(f"two slides share the id {sid!r}: {by_id[sid]} and {path}; rename one "
                             "(ids are file stems, and folder names for DICOM slides)")
        by_id[sid] = path
    return [by_id[sid] for sid in sorted(by_id)], others


def discover_slides(inputs: Path | str | Sequence[Path | str]) -> list[Path]:
    """The slides of :func:`find_inputs`, sorted by slide id."""
    return find_inputs(inputs)[0]


def _entry_name(path: Path) -> str:
    return f"{path.name}/" if path.is_dir() else path.name


def not_slides_note(others: Sequence[Path]) -> str | None:
    """One line naming the input entries that are not slides (None: there are none)."""
    if not others:
        return None
    n_dirs = sum(p.is_dir() for p in others)
    counted = " and ".join(f"{n} {kind}" for n, kind in ((len(others) - n_dirs, "file(s)"), (n_dirs, "folder(s)")) if n)
    names = [_entry_name(p) for p in others]
    shown = ", ".join(names[:SHOWN_NAMES]) + (f" … ({len(names) - SHOWN_NAMES} more)" if len(names) > SHOWN_NAMES else "")
    return f"skipped {counted} that are not slides: {shown}"


def shard_slides(slides: Sequence[Path], shard: tuple[int, int] | None) -> list[Path]:
    """The ``i``-th of ``n`` deterministic shards: every ``n``-th slide in sorted-id order."""
    ordered = sorted(slides, key=slide_id_of)
    if shard is None:
        return ordered
    i, n = shard
    return ordered[i::n]


@dataclass
class SlideStatus:
    """The record of one slide and one encoder in a job (``<job>/status/<encoder>/<slide>.json``).

    ``encoder_folder`` is the feature folder the record belongs to; None for a record of
    the older one-status-per-slide layout (``<job>/status/<slide>.json``).

    ``slide_path`` is absolute and ``slide_relpath`` relative to the job folder (older
    records hold the path as given, relative to where preprocess ran); ``slide_bytes`` and
    ``slide_fingerprint`` tell the processed file from another one (see
    :mod:`slidevl.features.slidepaths`).
    """

    slide_id: str
    slide_path: str
    status: str  # running | ok | failed | interrupted (Ctrl-C/SIGTERM mid-slide)
    action: str = "processed"  # processed | skipped (what the latest run did)
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    n_patches: int | None = None
    n_regions: int | None = None
    n_packs: int | None = None
    output: str | None = None
    tissue: str | None = None
    qc: str | None = None
    encoder: str | None = None
    fingerprint: dict[str, Any] | None = None
    slide_relpath: str | None = None
    slide_bytes: int | None = None
    slide_fingerprint: str | None = None
    encoder_folder: str | None = None
    updated: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SlideStatus":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @property
    def manifest_status(self) -> str:
        return "skipped" if self.status == "ok" and self.action == "skipped" else self.status

    @property
    def slide(self) -> SlideRecord:
        return SlideRecord.from_entry(self.to_dict())

    @property
    def folder(self) -> str | None:
        """The encoder folder of the record; for an older record, that of the features it names."""
        if self.encoder_folder is not None:
            return self.encoder_folder
        return Path(self.output).parent.name if self.output else None


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def status_path(job: Path, slide_id: str, folder: str | None = None) -> Path:
    """Where the status of ``slide_id`` for encoder folder ``folder`` lives (None: the older layout)."""
    status_dir = Path(job) / STATUS_DIR
    return (status_dir if folder is None else status_dir / folder) / f"{slide_id}.json"


def write_status(job: Path, status: SlideStatus) -> Path:
    """Write ``status`` to its encoder folder's place; an older record of the same folder is then dropped."""
    status.updated = now_iso()
    written = write_json_atomic(status_path(job, status.slide_id, status.encoder_folder), status.to_dict())
    if status.encoder_folder is not None:
        legacy = _read_file(status_path(job, status.slide_id))
        if legacy is not None and legacy.folder in (None, status.encoder_folder):
            status_path(job, status.slide_id).unlink(missing_ok=True)
    return written


def _read_file(path: Path) -> SlideStatus | None:
    try:
        return SlideStatus.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def slide_statuses(job: Path, slide_id: str) -> list[SlideStatus]:
    """Every readable record of ``slide_id``: one per encoder folder, and one of the older layout if left."""
    status_dir = Path(job) / STATUS_DIR
    paths = [status_path(job, slide_id), *sorted(status_dir.glob(f"*/{glob.escape(slide_id)}.json"))]
    return [s for s in map(_read_file, paths) if s is not None]


def read_status(job: Path, slide_id: str, folder: str | None = None) -> SlideStatus | None:
    """The slide's status for encoder folder ``folder``, or None if absent or unreadable (then it is re-run).

    A record of the older layout counts for the folder its features were written to.
    Without ``folder``: the slide's most recently updated record of any encoder.
    """
    if folder is None:
        records = slide_statuses(job, slide_id)
        return max(records, key=lambda s: s.updated) if records else None
    status = _read_file(status_path(job, slide_id, folder))
    if status is None:
        legacy = _read_file(status_path(job, slide_id))
        if legacy is not None and legacy.folder == folder:
            status = replace(legacy, encoder_folder=folder)
    return status


def normalise(obj: Any) -> Any:
    """JSON round trip, so tuples/lists and numpy scalars compare equal to stored values."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def complete_status(job: Path, slide_id: str, feature_path: Path, fingerprint: dict[str, Any],
                    slide_path: Path | None = None) -> SlideStatus | None:
    """The slide's status if it is complete, else None.

    Complete = status ok AND feature file present AND its recorded config equals
    ``fingerprint`` (a file left by another configuration does not count) AND, given
    ``slide_path``, that file is the one recorded (a same-size file with other content
    would otherwise keep the features of the old one). The status read is that of the
    encoder folder holding ``feature_path``.
    """
    folder = Path(feature_path).parent.name
    status = read_status(job, slide_id, folder) or _adopted(job, slide_id, Path(feature_path), normalise(fingerprint))
    if status is None or status.status != "ok" or not feature_path.is_file():
        return None
    if slide_path is not None and status.slide.change(slide_path) is not None:
        return None
    try:
        stored = read_slide_attrs(feature_path).get("config_fingerprint")
    except (FeatureStoreError, OSError):
        return None
    return status if stored == normalise(fingerprint) else None


def status_files(job: Path) -> list[Path]:
    """Every status file of the job: those of each encoder folder and those of the older layout."""
    status_dir = Path(job) / STATUS_DIR
    if not status_dir.is_dir():
        return []
    return sorted(p for p in [*status_dir.glob("*.json"), *status_dir.glob("*/*.json")] if not p.name.startswith("."))


def _adopted(job: Path, slide_id: str, feature_path: Path, fingerprint: dict[str, Any]) -> SlideStatus | None:
    """A record for a feature file that an older-layout job left without one, or None.

    Before statuses were kept per encoder, a second encoder's run replaced the first one's
    record of each slide, so the first encoder's (complete, atomically written) feature
    files have no record. The older record still names the slide file; the feature file
    gives the counts. Its tissue outline and QC picture count only if they were made with
    the same settings. :func:`complete_status` then checks the file's fingerprint as usual.
    """
    legacy = _read_file(status_path(job, slide_id))
    if legacy is None or legacy.status != "ok" or not isinstance(legacy.fingerprint, dict) or not feature_path.is_file():
        return None
    try:
        with h5py.File(feature_path, "r") as f:
            n_patches, n_regions, n_packs = (int(f[name].shape[0]) if name in f else None
                                             for name in ("patch/coords", "region/coords", "pack/coords"))
        encoder = read_slide_attrs(feature_path).get("encoder")
    except (FeatureStoreError, OSError, KeyError):
        return None
    same_outline = all(normalise(legacy.fingerprint).get(k) == fingerprint.get(k) for k in OUTLINE_SETTINGS)
    return replace(legacy, encoder_folder=feature_path.parent.name, encoder=str(encoder) if encoder else None,
                   output=str(feature_path.relative_to(job)), fingerprint=fingerprint, timings={},
                   n_patches=n_patches, n_regions=n_regions, n_packs=n_packs,
                   tissue=legacy.tissue if same_outline else None, qc=legacy.qc if same_outline else None)


def read_statuses(job: Path, folder: str | None = None) -> list[SlideStatus]:
    """Every readable status of the job (of encoder folder ``folder`` only, if given), by slide id and folder.

    An older-layout record is left out where its encoder folder has a record of its own.
    """
    records: dict[tuple[str, str | None], SlideStatus] = {}
    for path in status_files(job):
        status = _read_file(path)
        if status is None:
            continue  # a status being replaced right now; the next rebuild sees it
        if path.parent.name != STATUS_DIR:
            status.encoder_folder = path.parent.name
        key = (status.slide_id, status.folder)
        if key not in records or records[key].encoder_folder is None:
            records[key] = status
    chosen = [s for s in records.values() if folder is None or s.folder == folder]
    return sorted(chosen, key=lambda s: (s.slide_id, s.folder or ""))


def manifest_entry(status: SlideStatus) -> dict[str, Any]:
    """The manifest row of one slide, derived from its status alone."""
    return {
        "slide_id": status.slide_id,
        "status": status.manifest_status,
        "error": status.error,
        "timings": status.timings,
        "n_patches": status.n_patches,
        "n_regions": status.n_regions,
        "n_packs": status.n_packs,
        "output": status.output,
        "tissue": status.tissue,
        "qc": status.qc,
        "encoder": status.encoder,
        "encoder_folder": status.folder,
        **status.slide.fields(),
        "updated": status.updated,
    }


def row_key(row: dict[str, Any]) -> tuple[str, str | None]:
    """(slide id, encoder folder) of a manifest row; older rows name the folder only through their output."""
    folder = row.get("encoder_folder") or (Path(row["output"]).parent.name if row.get("output") else None)
    return str(row.get("slide_id")), folder


def read_manifest(job: Path) -> dict[str, Any] | None:
    """The job's manifest, or None if absent or unreadable."""
    try:
        data = json.loads((Path(job) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def _manifest_lock(job: Path) -> Iterator[None]:
    """Hold an exclusive lock on the job's manifest while it is read, rebuilt and written.

    Slurm array tasks, Ray drivers and two encoders' runs may end at the same moment. A
    rebuild that read the statuses before another task wrote its last one must not be the
    one written last, nor drop the other encoder's ``configs`` entry. Where the filesystem
    has no locks (some network mounts), the rebuild goes on unlocked, as before.
    """
    Path(job).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(job) / MANIFEST_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def rebuild_manifest(job: Path, config: dict[str, Any] | None = None,
                     not_slides: Sequence[Path] | None = None, folder: str | None = None) -> tuple[Path, Path]:
    """Rebuild ``manifest.json`` and ``summary.md`` from every status file in the job.

    The manifest has one row per slide and encoder folder. ``config`` is the latest run's
    (``config``; its folder is ``latest_encoder``), and, given ``folder``, that encoder folder's (``configs``, which keeps the
    other folders' from the previous manifest). ``not_slides`` are the entries of the latest
    run's input folders that are not slides (see :func:`find_inputs`); None keeps the list
    the manifest already holds.
    """
    job = Path(job)
    with _manifest_lock(job):
        return _rebuild_manifest(job, config, not_slides, folder)


def _rebuild_manifest(job: Path, config: dict[str, Any] | None, not_slides: Sequence[Path] | None,
                      folder: str | None) -> tuple[Path, Path]:
    previous = read_manifest(job) or {}
    entries = [manifest_entry(r) for r in read_statuses(job)]
    counts = dict(Counter(e["status"] for e in entries))
    if not_slides is None:
        kept = previous.get("not_slides")
        listed = [str(p) for p in kept] if isinstance(kept, list) else []
    else:
        listed = [str(Path(p).resolve()) + ("/" if Path(p).is_dir() else "") for p in not_slides]
    configs = previous.get("configs") if isinstance(previous.get("configs"), dict) else {}
    if folder is not None:
        configs = {**configs, folder: config}
    folders = sorted({e["encoder_folder"] for e in entries if e["encoder_folder"]})
    latest = folder if folder is not None else previous.get("latest_encoder")
    manifest = {"job": str(job.resolve()), "updated": now_iso(), "counts": counts, "config": config,
                "latest_encoder": latest, "encoders": folders, "configs": configs, "slides": entries,
                "not_slides": listed}
    from slidevl import __version__

    manifest["slidevl_version"] = __version__
    manifest_path = write_json_atomic(job / MANIFEST, manifest)
    summary_path = write_text_atomic(job / SUMMARY, render_summary(manifest))
    return manifest_path, summary_path


def recorded_slides(job: Path, slides_root: Path | None = None) -> list[Path]:
    """The slide files of every slide the job records, found as :func:`resolve_slide` does.

    For re-running a job without naming its slides again. Raises :class:`UsageError`
    listing every slide that cannot be found or has changed, before anything is run.
    """
    # One record per slide: every encoder's record of a slide names the same file.
    statuses = list({s.slide_id: s for s in read_statuses(job)}.values())
    if not statuses:
        raise UsageError(f"{job}: the job records no slides; give the slides to preprocess")
    found, problems = [], []
    for status in statuses:
        try:
            found.append(resolve_slide(status.slide, job, slides_root))
        except SlideFileError as exc:
            problems.append(str(exc))
    if problems:
        raise UsageError("\n".join(problems))
    return found


def recorded_slide(job: Path, slide_id: str, slides_root: Path | None = None) -> Path | None:
    """The file of slide ``slide_id`` of ``job``, or None if the job has no record of it.

    Raises :class:`~slidevl.features.slidepaths.SlideFileError` (naming the paths tried and
    the fix) when the job records the slide but its file is gone or changed.
    """
    status = read_status(job, slide_id)
    return None if status is None else resolve_slide(status.slide, job, slides_root)


def render_summary(manifest: dict[str, Any]) -> str:
    """Human summary of a manifest as Markdown."""
    counts = manifest["counts"]
    lines = [
        "# Preprocessing summary",
        "",
        f"Job folder: `{manifest['job']}`  ",
        f"Updated: {manifest['updated']}  ",
        "Slides: " + (", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none") + "  ",
        "Encoders: " + (", ".join(f"`{name}`" for name in manifest.get("encoders") or []) or "none"),
        "",
        "| slide | encoder | status | patches | regions | packs | seconds | error |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for e in manifest["slides"]:
        seconds = sum(e["timings"].values()) if e["timings"] else 0.0
        error = (e["error"] or "").replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {e['slide_id']} | {e.get('encoder_folder') or ''} | {e['status']} "
            f"| {e['n_patches'] if e['n_patches'] is not None else ''} "
            f"| {e['n_regions'] if e['n_regions'] is not None else ''} | {e['n_packs'] if e['n_packs'] is not None else ''} "
            f"| {seconds:.1f} | {error} |"
        )
    failed = [e for e in manifest["slides"] if e["status"] == "failed"]
    if failed:
        lines += ["", f"{len(failed)} slide(s) failed; fix the cause named above and run the same command again: "
                  "completed slides are skipped."]
    interrupted = [e for e in manifest["slides"] if e["status"] == "interrupted"]
    if interrupted:
        lines += ["", f"{len(interrupted)} slide(s) were interrupted; run the same command again to finish them."]
    others = manifest.get("not_slides") or []
    if others:
        lines += ["", f"## Not slides ({len(others)})", "",
                  "Entries of the input folders that were not read as slides (a slide is a file with a slide "
                  "extension, or a folder of DICOM .dcm files):", ""]
        lines += [f"- `{name}`" for name in others[:SUMMARY_NAMES]]
        if len(others) > SUMMARY_NAMES:
            lines.append(f"- … and {len(others) - SUMMARY_NAMES} more, listed under `not_slides` in {MANIFEST}")
    return "\n".join(lines) + "\n"
