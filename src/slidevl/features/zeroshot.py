"""Zero-shot patch classification of whole slides from text prompts (CONCH, open_clip).

CONCH's authors classify tiles zero-shot: each class is described by a few prompts,
a class embedding is the mean of its normalised prompt embeddings (renormalised),
and a tile's class probabilities are ``softmax(logit_scale · cosine)`` between its
image embedding and the class embeddings. Here the same runs on every tissue patch of
a slide.

Route: image embeddings come from the job's stored patch features. CONCH stores the
embedding its authors extract (``encode_image(x, proj_contrast=False)``), which is
exactly the input of the model's last linear projection; projecting and normalising
it (:meth:`AlignedTextEncoder.image_embeddings`) gives ``encode_image(x)``, so no tile
is read twice. (Features stored as float16, the preprocess default, carry that
rounding, about 1e-3 relative; the summary records it.) Slides, rather than a job,
are first preprocessed with the encoder into a new job (float32, no pack or thumbnail
features), using the same grid, tissue mask and workers as ``slidevl preprocess``.

Outputs, in the results folder:

* ``evidence/<slide>.json``: the viewer's overlay format (:mod:`slidevl.serve.overlays`):
  one "prompt" per class, each patch's argmax class (``prompt_index``) and its
  probability (``alignment``, drawn as a heatmap), plus every class probability
  (``probabilities``, ``classes``) for analysis. Show it with
  ``slidevl serve JOB --survival-run RESULTS``;
* ``heatmaps/<slide>.png``: the argmax class of each patch on the slide's patch
  lattice, its colour faded to white as the probability falls;
* ``summary.json``: classes, prompts, colours, text space and per-slide class counts.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from slidevl.atomic import atomic_path, write_json_atomic
from slidevl.errors import InputError
from slidevl.features.encoders.base import EncoderError, safe_name
from slidevl.features.encoders.text import class_embeddings, class_probabilities
from slidevl.features.store import FeatureStore, FeatureStoreError

MANIFEST = "manifest.json"
# Tableau-10: distinct on the pink/purple of H&E and readable for most colour vision.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
HEATMAP_MAX_SIDE = 2048


class ZeroShotError(InputError):
    """The prompts, the encoder or the input cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class PromptClasses:
    """Class names and the prompts describing each, in file order."""

    names: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]
    source: str

    def as_dict(self) -> dict[str, list[str]]:
        return {name: list(p) for name, p in zip(self.names, self.prompts)}


def load_prompt_classes(path: str | Path) -> PromptClasses:
    """A mapping class name → prompt text(s) from a ``.json``, ``.toml`` or ``.yaml`` file."""
    path = Path(path)
    if not path.is_file():
        raise ZeroShotError(f"{path}: prompts file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # JSONDecodeError, TOMLDecodeError, YAMLError
        raise ZeroShotError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'} ({exc})") from exc
    if not isinstance(data, dict) or len(data) < 2:
        raise ZeroShotError(f"{path}: expected a mapping of at least two class names to prompt lists, e.g. "
                            '{"tumour": ["an H&E image of tumour"], "stroma": ["an H&E image of stroma"]}')
    names, prompts = [], []
    for name, value in data.items():
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ZeroShotError(f"{path}: class {name!r} needs a non-empty prompt string or list of prompt strings")
        names.append(str(name))
        prompts.append(tuple(t.strip() for t in texts))
    return PromptClasses(tuple(names), tuple(prompts), str(path))


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], np.float32)


def heatmap_image(grid: np.ndarray, labels: np.ndarray, confidence: np.ndarray, shape: Sequence[int], n_classes: int) -> Image.Image:
    """The argmax class per patch cell of a ``shape`` = (cols, rows) lattice, faded to white by (1 - probability)."""
    cols, rows = int(shape[0]), int(shape[1])
    img = np.full((rows, cols, 3), 255.0, np.float32)
    colours = np.stack([_rgb(PALETTE[c % len(PALETTE)]) for c in range(n_classes)])
    # Fade from white (probability 1/C, no preference) to the full class colour (probability 1).
    floor = 1.0 / n_classes
    alpha = np.clip((confidence - floor) / (1.0 - floor), 0.15, 1.0)[:, None]
    img[grid[:, 1], grid[:, 0]] = alpha * colours[labels] + (1 - alpha) * 255.0
    scale = max(1, HEATMAP_MAX_SIDE // max(cols, rows))
    return Image.fromarray(img.round().astype(np.uint8)).resize((cols * scale, rows * scale), Image.NEAREST)


@dataclass
class ZeroShotReport:
    """What a zero-shot run wrote."""

    job: Path
    results: Path
    text_space: str
    slides: dict[str, dict[str, int]] = field(default_factory=dict)  # slide -> class -> patch count

    def serve_command(self) -> str:
        return f"slidevl serve {self.job} --survival-run {self.results}"


def is_job(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def zero_shot(
    source: str | Path | Sequence[str | Path],
    encoder: str,
    prompts: str | Path,
    out: str | Path | None = None,
    *,
    device: str = "cpu",
    config: Any = None,
    console: Console | None = None,
    progress: bool = True,
) -> ZeroShotReport:
    """Zero-shot class maps for a job's slides, or for slides preprocessed first (see module docstring).

    ``source`` is a job folder (with ``manifest.json``) or slide file(s)/folder. For a
    job, results go to ``out`` (default ``JOB/zeroshot/<prompts stem>``); for slides,
    ``out`` is the job folder to create and results go to ``OUT/zeroshot/<prompts stem>``.
    ``config`` (a :class:`~slidevl.features.config.PreprocessConfig`) sets the grid,
    tissue and workers for slides.
    """
    from slidevl.features.encoders.text import get_text_encoder, is_aligned_spec

    console = console or Console(stderr=True)
    classes = load_prompt_classes(prompts)
    sources = [Path(source)] if isinstance(source, (str, Path)) else [Path(s) for s in source]
    if not is_aligned_spec(encoder):
        raise ZeroShotError(f"--encoder {encoder!r} has no text tower; zero-shot needs conch:PATH or an openclip: model")
    try:
        text = get_text_encoder(encoder, device)
    except EncoderError as exc:
        raise ZeroShotError(str(exc)) from exc
    stem = safe_name(Path(prompts).stem)
    if len(sources) == 1 and is_job(sources[0]):
        job = sources[0]
        results = Path(out) if out is not None else job / "zeroshot" / stem
    else:
        if out is None:
            raise ZeroShotError(f"{sources[0]}: not a job folder (no {MANIFEST}); pass --out JOB to preprocess these slides into")
        job = Path(out)
        _preprocess(sources, job, encoder, text, config, device, console, progress)
        results = job / "zeroshot" / stem
    report = ZeroShotReport(job=job, results=results, text_space=text.space)
    _classify_job(report, text, classes, console, progress)
    return report


def _preprocess(slides: list[Path], job: Path, spec: str, text: Any, config: Any, device: str, console: Console,
                progress: bool) -> None:
    """Patch features of ``slides`` into ``job`` with the text tower's own image encoder."""
    import dataclasses

    from slidevl.features.config import PreprocessConfig
    from slidevl.features.encoders import get_region_encoder
    from slidevl.features.jobs import UsageError
    from slidevl.features.pipeline import Encoders, preprocess

    # float32, and no pack or thumbnail features: zero-shot reads only the patch features.
    base = config or PreprocessConfig(device=device)
    cfg = dataclasses.replace(base, encoder=spec, device=device, float16=False, pack_features=False,
                              global_feature=False, progress=progress)
    encoders = Encoders(tile=text.image_encoder, region=get_region_encoder("mean"), tile_spec=spec, region_spec="mean")
    try:
        report = preprocess(slides, job, cfg, encoders=encoders, console=console)
    except UsageError as exc:
        raise ZeroShotError(str(exc)) from exc
    if not report.n_ok + report.n_skipped:
        raise ZeroShotError(f"{job}: no slide could be preprocessed; see {job / 'manifest.json'} for each slide's error")


def _classify_job(report: ZeroShotReport, text: Any, classes: PromptClasses, console: Console, progress: bool) -> None:
    folder = safe_name(text.image_encoder.name)
    try:
        store = FeatureStore(report.job, folder)
    except FeatureStoreError as exc:
        raise ZeroShotError(str(exc)) from exc
    slide_ids = store.slide_ids()
    if not slide_ids:
        found = sorted(p.name for p in (report.job / "features").glob("*") if p.is_dir())
        raise ZeroShotError(
            f"{report.job}: no features from {text.image_encoder.name} (feature folders: {found or 'none'}); run "
            f"`slidevl preprocess SLIDES --out {report.job} --encoder <the same spec>`, or pass the slides instead of the job"
        )
    class_emb = class_embeddings(text, classes.prompts)
    prompt_table = [{"index": c, "level": c, "label": name, "text": " | ".join(group)}
                    for c, (name, group) in enumerate(zip(classes.names, classes.prompts))]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    dtypes: dict[str, str] = {}
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("zero-shot slides", total=len(slide_ids))
        for slide_id in slide_ids:
            bar.update(task, description=f"zero-shot ({slide_id})")
            sf = store.load(slide_id, load=())
            try:
                text.check_features(sf.attrs, str(store.path(slide_id)))
            except EncoderError as exc:
                raise ZeroShotError(str(exc)) from exc
            probs = class_probabilities(text.image_embeddings(sf.patch_features), class_emb, text.logit_scale)
            labels = probs.argmax(axis=1)
            _write_slide(report.results, slide_id, sf, probs, labels, prompt_table, classes, report.text_space)
            report.slides[slide_id] = {name: int((labels == c).sum()) for c, name in enumerate(classes.names)}
            fp = sf.attrs.get("config_fingerprint") or {}
            dtypes[slide_id] = {True: "float16", False: "float32"}.get(fp.get("float16"), "unknown")
            bar.advance(task)
    write_json_atomic(report.results / "summary.json", {
        "job": str(report.job),
        "text_space": report.text_space,
        "encoder_provenance": text.image_encoder.provenance(),
        "logit_scale": text.logit_scale,
        "prompts_file": classes.source,
        "classes": classes.as_dict(),
        "colours": dict(zip(classes.names, (PALETTE[c % len(PALETTE)] for c in range(len(classes.names))))),
        "image_embeddings": "stored patch features through the model's final projection, L2-normalised",
        "stored_feature_dtype": dtypes,
        "patch_counts": report.slides,
        "view": report.serve_command(),
    })


def _write_slide(results: Path, slide_id: str, sf: Any, probs: np.ndarray, labels: np.ndarray,
                 prompt_table: list[dict[str, Any]], classes: PromptClasses, text_space: str) -> None:
    confidence = probs[np.arange(len(labels)), labels]
    evidence = {
        "slide_id": slide_id,
        "model": f"zero-shot {text_space}",
        "text_space": text_space,
        "classes": list(classes.names),
        "prompts": {"patch": prompt_table},
        "patch": {
            "index": list(range(len(labels))),
            "coords": np.asarray(sf.patch_coords).astype(int).tolist(),
            "kept": [True] * len(labels),
            "prompt_index": labels.astype(int).tolist(),
            "alignment": np.round(confidence, 5).tolist(),
            "probabilities": np.round(probs, 5).tolist(),
        },
    }
    write_json_atomic(results / "evidence" / f"{slide_id}.json", evidence, indent=None)
    shape = sf.attrs.get("grid_shape") or (np.asarray(sf.patch_grid).max(axis=0) + 1).tolist()
    image = heatmap_image(np.asarray(sf.patch_grid), labels, confidence, shape, len(classes.names))
    with atomic_path(results / "heatmaps" / f"{slide_id}.png") as tmp:
        image.save(tmp, format="PNG")
