"""Where the visual tokens of a slide come from during tuning and answering.

With a frozen encoder (the default) every slide is encoded once and the result is kept
in memory and in a safetensors cache under a folder named after the encoder weights'
fingerprint, so a resumed run or a later ``slidevl ask`` skips the encoder. With a
trainable encoder the tokens are recomputed, with gradients, at every step.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import torch
from rich.progress import Progress
from safetensors import safe_open

from slidevl.features.store import FeatureStore, SlideFeatures
from slidevl.qa.records import VQARecord
from slidevl.slidellm.encoder import TopoPackEncoder
from slidevl.slidellm.encoder.io import save_state_dict
from slidevl.slidellm.model import SlideVLMError, VisualTokens, boxes_intersecting, encode_slide, slide_pack_boxes
from slidevl.slidellm.tuning.state import load_tensors


def encoder_fingerprint(encoder: TopoPackEncoder) -> str:
    """SHA-256 over the encoder's config and weights: equal fingerprints encode identically."""
    h = hashlib.sha256(repr(sorted(encoder.config.to_dict().items())).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _source_stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


class CachedVisuals:
    """Frozen-encoder outputs per slide, computed on first use (memory + disk)."""

    trainable = False

    def __init__(
        self,
        encoder: TopoPackEncoder,
        store: FeatureStore,
        cache_dir: str | Path | None,
        *,
        device: torch.device | str = "cpu",
    ) -> None:
        self.encoder = encoder.eval()
        self.store = store
        self.device = device
        self.fingerprint = encoder_fingerprint(encoder)
        self.cache_dir = Path(cache_dir) / self.fingerprint[:16] if cache_dir is not None else None
        self._memory: dict[str, VisualTokens] = {}

    def _file(self, slide_id: str) -> Path | None:
        return self.cache_dir / f"{slide_id}.safetensors" if self.cache_dir is not None else None

    def get(self, slide_id: str) -> VisualTokens:
        if slide_id in self._memory:
            return self._memory[slide_id]
        source = self.store.path(slide_id)
        if not source.is_file():
            raise SlideVLMError(
                f"slide {slide_id!r}: no feature file {source}; run `slidevl preprocess` for it into {self.store.job_dir}"
            )
        stamp = _source_stamp(source)
        cached = self._file(slide_id)
        vt = None
        if cached is not None and cached.is_file():
            with safe_open(str(cached), framework="pt") as fh:
                meta = fh.metadata() or {}
            if meta.get("source") == stamp:
                vt = VisualTokens.from_tensors(slide_id, load_tensors(cached))
                # Caches written before patch features were kept are encoded again.
                if vt.patch_features is None:
                    vt = None
        if vt is None:
            with torch.no_grad():
                vt = encode_slide(self.encoder, self.store.load(slide_id), device=self.device)
            vt = VisualTokens.from_tensors(slide_id, vt.tensors())
            if cached is not None:
                save_state_dict(vt.tensors(), cached, metadata={"source": stamp, "encoder": self.fingerprint})
        self._memory[slide_id] = vt
        return vt

    def boxes(self, slide_id: str) -> torch.Tensor:
        return self.get(slide_id).pack_boxes

    def precompute(self, slide_ids: Iterable[str]) -> None:
        """Encode every slide up front, with a progress bar."""
        ids = sorted(set(slide_ids))
        with Progress(transient=True) as progress:
            task = progress.add_task("encoding slides", total=len(ids))
            for slide_id in ids:
                self.get(slide_id)
                progress.advance(task)


class LiveVisuals:
    """Trainable-encoder outputs: the features stay in memory, the encoder runs every step."""

    trainable = True

    def __init__(self, encoder: TopoPackEncoder, store: FeatureStore, *, device: torch.device | str = "cpu") -> None:
        self.encoder = encoder
        self.store = store
        self.device = device
        self._features: dict[str, SlideFeatures] = {}
        self._boxes: dict[str, torch.Tensor] = {}

    def features(self, slide_id: str) -> SlideFeatures:
        if slide_id not in self._features:
            if slide_id not in self.store:
                raise SlideVLMError(
                    f"slide {slide_id!r}: no feature file {self.store.path(slide_id)}; run `slidevl preprocess` for it"
                )
            self._features[slide_id] = self.store.load(slide_id)
        return self._features[slide_id]

    def get(self, slide_id: str) -> VisualTokens:
        return encode_slide(self.encoder, self.features(slide_id), device=self.device)

    def boxes(self, slide_id: str) -> torch.Tensor:
        if slide_id not in self._boxes:
            self._boxes[slide_id] = slide_pack_boxes(self.features(slide_id))
        return self._boxes[slide_id]

    def precompute(self, slide_ids: Iterable[str]) -> None:
        for slide_id in sorted(set(slide_ids)):
            self.features(slide_id)


def check_regions(records: Iterable[VQARecord], source: CachedVisuals | LiveVisuals) -> None:
    """Fail before training when a record's bbox covers no pack of its slide."""
    bad = []
    for r in records:
        if r.bbox is None:
            continue
        if boxes_intersecting(source.boxes(r.slide), r.bbox).numel() == 0:
            bad.append(f"{r.id} (slide {r.slide}, bbox {list(r.bbox)})")
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise SlideVLMError(f"{len(bad)} record(s) have a bbox over no tissue pack: {shown}; fix or drop them")
