"""Facts of real slides from a vision-language model behind an OpenAI-compatible endpoint.

A job without ``truth.json`` has no label map, so what a slide, an ROI or a field of view
shows is estimated by a model that looks at it. For each unit one request sends

* the image, read from the slide file the job records (the whole slide at most
  :data:`SLIDE_PX` px a side, an ROI at most :data:`ROI_PX`, a field at its own size and
  resolution), as a base64 PNG in an ``image_url`` content part, and
* what the job measured: the physical size and the tissue area from the tissue mask,

and asks for JSON: the share of the tissue taken by each tissue class of
:data:`slidevl.vqa.templates_facts.TISSUE_NAMES` and, for the whole slide, the tumour
grade and nodule count. The replies become the same :class:`SlideFacts`,
:class:`RegionFacts` and :class:`WindowFacts` the synthetic truth gives, so the same
questions are written from them. The answers are the model's estimates, not ground
truth: ``summary.json`` (``facts``) says so.

The endpoint must accept images (e.g. ``vllm serve Qwen/Qwen2.5-VL-7B-Instruct`` or an
Ollama vision model); a text-only model answers an image request with an HTTP error,
which stops the build with the endpoint's message. Replies go through
:class:`~slidevl.llmclient.LLMClient`, so they are cached and a rerun sends nothing.
The patient of a slide is its TCGA patient barcode (``TCGA-XX-XXXX``) when the id has
one, else the slide id itself.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from slidevl.features.jobs import recorded_slide
from slidevl.features.slidepaths import SlideFileError
from slidevl.features.store import FeatureStore, SlideFeatures, read_slide_attrs
from slidevl.llmclient import LLMClient
from slidevl.slide.reader import open_slide
from slidevl.vqa.facts import FactsError
from slidevl.vqa.judge import JudgeReplyError, parse_json_reply
from slidevl.vqa.roi import ROI, patch_step, slide_mpp
from slidevl.vqa.templates_facts import TISSUE_NAMES, Composition, RegionFacts, SlideFacts, WindowFacts
from slidevl.vqa.windows import Window

#: Longest side of the whole-slide image and of an ROI image sent to the model.
SLIDE_PX = 1024
ROI_PX = 768
_TCGA_PATIENT = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})", re.I)
SYSTEM = (
    "You are a pathologist estimating what an H&E-stained histology image shows. "
    "Judge only from the image. Reply with one JSON object and nothing else."
)
_CLASSES = ", ".join(f'"{key}" ({name})' for key, name in TISSUE_NAMES.items())
COMPOSITION_TASK = (
    f"Estimate the percent of the tissue (not the background) taken by each of: {_CLASSES}. "
    "The percents sum to 100."
)
SLIDE_TASK = (
    " If there is carcinoma, also give its histological grade (1 well, 2 moderately, 3 poorly differentiated) "
    "and the number of separate tumour nodules; otherwise grade null and 0 nodules."
)


class LLMFacts:
    """Facts estimated by a vision-language model from the job's slide images (see the module docstring)."""

    def __init__(self, job: Path, store: FeatureStore, client: LLMClient, slides_root: Path | None = None) -> None:
        self.job = Path(job)
        self.store = store
        self.client = client
        self.slides_root = slides_root
        self._slide_replies: dict[str, dict[str, Any]] = {}

    def describe(self) -> dict[str, Any]:
        return {"source": "llm", **self.client.describe(),
                "note": "facts are the model's estimates from the images, not ground truth"}

    def slide_ids(self) -> list[str]:
        return self.store.slide_ids()

    def patient_of(self, slide_id: str) -> str:
        match = _TCGA_PATIENT.match(slide_id)
        return match.group(1).upper() if match else slide_id

    def patient_strata(self) -> dict[str, int]:
        self._fetch_slides(self.slide_ids())
        strata: dict[str, int] = {}
        for slide_id, reply in self._slide_replies.items():
            patient = self.patient_of(slide_id)
            strata[patient] = max(strata.get(patient, 0), reply["grade"] or 0)
        return strata

    def check(self, job: Path, store: FeatureStore) -> None:
        problems = []
        for slide_id in store.slide_ids():
            try:
                if recorded_slide(job, slide_id, self.slides_root) is None:
                    problems.append(f"{slide_id}: the job records no slide file for it")
            except SlideFileError as exc:
                problems.append(str(exc))
        if problems:
            raise FactsError(
                f"{job}: the model must see each slide, but {len(problems)} slide file(s) cannot be read: "
                + "; ".join(problems[:5])
            )

    def slide(self, slide_id: str, features: SlideFeatures) -> SlideFacts:
        reply = self._fetch_slides([slide_id])[slide_id]
        patch_mm2 = (patch_step(features) * slide_mpp(features) / 1000.0) ** 2
        n = reply["tumour_nodules"]
        return SlideFacts(
            slide_id=slide_id,
            patient_id=self.patient_of(slide_id),
            grade=reply["grade"] or 1,  # only read when there is tumour (n_nodules > 0)
            composition=reply["composition"],
            n_nodules=n,
            nodule_areas_mm2=(),
            planted_nodules=n,
            tissue_area_mm2=float(np.asarray(features.patch_tissue, np.float64).sum() * patch_mm2),
        )

    def region(self, slide_id: str, roi: ROI) -> RegionFacts:
        composition = self._composition(slide_id, roi.bbox, ROI_PX, f"region {roi.id}")
        return RegionFacts(slide_id=slide_id, roi_id=roi.id, bbox=roi.bbox, area_mm2=roi.tissue_area_mm2,
                           composition=composition, grade=self._grade(slide_id, composition))

    def window(self, slide_id: str, window: Window) -> WindowFacts:
        composition = self._composition(slide_id, window.bbox, window.spec.size_px,
                                        f"{window.spec.name} field of view, {window.spec.size_um:.0f} µm wide")
        return WindowFacts(slide_id=slide_id, window_id=window.id, roi_id=window.roi, magnification=window.spec.name,
                           mpp=window.spec.mpp, size_um=window.spec.size_um, bbox=window.bbox,
                           composition=composition, grade=self._grade(slide_id, composition))

    def _grade(self, slide_id: str, composition: Composition) -> int:
        grade = self._slide_replies[slide_id]["grade"]
        if grade is None and composition.tissue["tumour"] > 0:
            # The model saw tumour here but called the slide tumour-free: no grade to ask about.
            raise ValueError(f"the model sees tumour in this box of {slide_id} but none on the slide")
        return grade or 1

    def _fetch_slides(self, slide_ids: list[str]) -> dict[str, dict[str, Any]]:
        todo = [s for s in slide_ids if s not in self._slide_replies]
        conversations = []
        for slide_id in todo:
            with open_slide(self._slide_file(slide_id)) as slide:
                width, height = slide.dimensions
                image = slide.read_box((0, 0, width, height), _fit(width, height, SLIDE_PX))
            mpp = float(read_slide_attrs(self.store.path(slide_id))["mpp"])  # as resolved by preprocess
            task = (f"This is a whole-slide image ({width * mpp / 1000:.1f} x {height * mpp / 1000:.1f} mm). "
                    f"{COMPOSITION_TASK}{SLIDE_TASK} Reply as "
                    '{"composition_percent": {' + ", ".join(f'"{k}": 0' for k in TISSUE_NAMES)
                    + '}, "grade": null, "tumour_nodules": 0}')
            conversations.append(_messages(task, image))
        for slide_id, reply in zip(todo, self.client.chat_many(conversations)):
            self._slide_replies[slide_id] = _parse_slide(reply, slide_id)
        return {s: self._slide_replies[s] for s in slide_ids}

    def _composition(self, slide_id: str, bbox: tuple[int, int, int, int], max_px: int, what: str) -> Composition:
        x0, y0, x1, y1 = bbox
        with open_slide(self._slide_file(slide_id)) as slide:
            image = slide.read_box(bbox, _fit(x1 - x0, y1 - y0, max_px))
        task = (f"This is a {what} of a whole-slide image. {COMPOSITION_TASK} Reply as "
                '{"composition_percent": {' + ", ".join(f'"{k}": 0' for k in TISSUE_NAMES) + "}}")
        return _parse_composition(parse_json_reply_or_raise(self.client.chat(_messages(task, image)), slide_id))

    def _slide_file(self, slide_id: str) -> Path:
        try:
            path = recorded_slide(self.job, slide_id, self.slides_root)
        except SlideFileError as exc:
            raise FactsError(str(exc)) from exc
        if path is None:
            raise FactsError(f"{self.job}: no slide file recorded for {slide_id}; run `slidevl preprocess` for it")
        return path


def _fit(width: int, height: int, max_px: int) -> tuple[int, int]:
    scale = min(1.0, max_px / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _messages(task: str, image: np.ndarray) -> list[dict[str, Any]]:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "text", "text": task}, {"type": "image_url", "image_url": {"url": url}}]},
    ]


def parse_json_reply_or_raise(reply: str, slide_id: str) -> dict[str, Any]:
    try:
        obj = parse_json_reply(reply)
    except JudgeReplyError:
        obj = None
    if not isinstance(obj, dict):
        raise ValueError(f"the model's reply about {slide_id} holds no JSON object: {reply[:200]!r}")
    return obj


def _parse_composition(obj: dict[str, Any]) -> Composition:
    percent = obj.get("composition_percent")
    if not isinstance(percent, dict):
        raise ValueError(f"the model's reply has no composition_percent object: {json.dumps(obj)[:200]}")
    try:
        values = {key: float(percent.get(key, 0) or 0) for key in TISSUE_NAMES}
    except (TypeError, ValueError):
        raise ValueError(f"composition_percent must hold numbers: {json.dumps(percent)[:200]}") from None
    total = sum(values.values())
    if total <= 0 or any(v < 0 for v in values.values()):
        raise ValueError(f"the model sees no tissue here (composition_percent {json.dumps(percent)[:200]})")
    # Rescaled to sum to 1, as the truth's fractions do; tissue_fraction is unknown to the model.
    return Composition(tissue={k: v / total for k, v in values.items()}, tissue_fraction=1.0)


def _parse_slide(reply: str, slide_id: str) -> dict[str, Any]:
    try:
        obj = parse_json_reply_or_raise(reply, slide_id)
        composition = _parse_composition(obj)
        grade, nodules = obj.get("grade"), obj.get("tumour_nodules", 0)
        if grade is not None and grade not in (1, 2, 3):
            raise ValueError(f"grade must be 1, 2, 3 or null, got {grade!r}")
        if not isinstance(nodules, int) or nodules < 0:
            raise ValueError(f"tumour_nodules must be a whole number >= 0, got {nodules!r}")
        if (grade is None) != (nodules == 0):
            raise ValueError(f"grade {grade!r} and {nodules} tumour nodule(s) disagree")
    except ValueError as exc:
        raise FactsError(
            f"slide {slide_id}: the model's reply cannot be used ({exc}); use a vision-language model that follows "
            "the JSON instruction (e.g. Qwen2.5-VL-7B-Instruct), or remove its cached reply to ask again"
        ) from None
    return {"composition": composition, "grade": grade, "tumour_nodules": nodules}
