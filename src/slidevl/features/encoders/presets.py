"""Named pathology foundation models: how each is built, fed and pooled, as its authors do.

A preset is the declarative record of one published tile encoder: the library and
constructor that build its architecture, the weight files its hub repository ships,
the input it expects (edge, resize, interpolation, mean/std, the mpp it was trained
at), the embedding it returns and its licence. ``NAME:PATH`` specs resolve here
(:mod:`slidevl.features.encoders.registry`); the builders live in
:mod:`slidevl.features.encoders.timm_presets` (timm), :mod:`...hf` (transformers)
and :mod:`...conch` (the CONCH code).

The facts come from each model's card and its authors' loading code (sources in
``docs/encoders.md``). Layers named by strings in ``kwargs`` (``"timm.layers.SwiGLUPacked"``,
``"torch.nn.SiLU"``) are resolved when the model is built, so this module imports
neither timm nor torch and ``slidevl encoders list`` stays fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HALF = (0.5, 0.5, 0.5)

Library = Literal["timm", "transformers", "conch"]
# How a (B, tokens, D) output becomes one feature row:
#   cls            the class token (timm's global_pool="token", transformers' last_hidden_state[:, 0]);
#   cls+mean_patch the class token concatenated with the mean of the patch tokens, register
#                  tokens skipped (Virchow / Virchow2);
#   contrast       CONCH's image embedding before the contrastive projection (encode_image with
#                  proj_contrast=False, normalize=False), as its authors extract patch features.
Pooling = Literal["cls", "cls+mean_patch", "contrast"]


@dataclass(frozen=True)
class EncoderPreset:
    """One named foundation model (see module docstring)."""

    name: str
    library: Library
    architecture: str
    feature_dim: int
    weight_files: tuple[str, ...]
    hub_repo: str
    license: str
    input_size: int = 224
    # The edge the tile is first resized to (its shorter side, as torchvision's Resize(int)),
    # then centre-cropped to input_size.
    resize: int = 224
    interpolation: Literal["bicubic", "bilinear"] = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    mpp: float = 0.5
    pooling: Pooling = "cls"
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    gated: bool = True
    notes: str = ""

    @property
    def magnification(self) -> float:
        """The objective power matching :attr:`mpp` (10 µm / mpp, so 0.5 µm/px is 20x)."""
        return round(10.0 / self.mpp, 1)

    def with_kwargs(self, **overrides: Any) -> "EncoderPreset":
        """A copy whose constructor kwargs are updated, e.g. ``depth=2`` for a fast test model."""
        return dataclasses.replace(self, kwargs={**self.kwargs, **overrides})

    def describe(self) -> dict[str, Any]:
        """JSON-able record for provenance, ``slidevl encoders list --json`` and the docs."""
        record = dataclasses.asdict(self)
        record["kwargs"] = dict(self.kwargs)
        record["magnification"] = self.magnification
        return record


_UNI2_KWARGS = {
    "img_size": 224,
    "patch_size": 14,
    "depth": 24,
    "num_heads": 24,
    "init_values": 1e-5,
    "embed_dim": 1536,
    "mlp_ratio": 2.66667 * 2,
    "num_classes": 0,
    "no_embed_class": True,
    "mlp_layer": "timm.layers.SwiGLUPacked",
    "act_layer": "torch.nn.SiLU",
    "reg_tokens": 8,
    "dynamic_img_size": True,
}
_VIRCHOW_KWARGS = {
    "img_size": 224,
    "init_values": 1e-5,
    "num_classes": 0,
    "mlp_ratio": 5.3375,
    "global_pool": "",
    "dynamic_img_size": True,
    "mlp_layer": "timm.layers.SwiGLUPacked",
    "act_layer": "torch.nn.SiLU",
}
_HOPTIMUS_KWARGS = {
    "img_size": 224,
    "num_classes": 0,
    "global_pool": "token",
    "init_values": 1e-5,
    "dynamic_img_size": True,
}


def _kaiko(name: str, architecture: str, dim: int, kwargs: Mapping[str, Any] | None = None) -> EncoderPreset:
    return EncoderPreset(
        name=name,
        library="timm",
        architecture=architecture,
        feature_dim=dim,
        weight_files=("model.safetensors", "pytorch_model.bin"),
        hub_repo=f"1aurent/{architecture}.kaiko_ai_towards_large_pathology_fms",
        license="kaiko non-commercial (research)",
        mean=HALF,
        std=HALF,
        interpolation="bicubic",
        kwargs={"img_size": 224, "num_classes": 0, "dynamic_img_size": True, **(kwargs or {})},
        gated=False,
        notes="trained on 5-40x; 0.5 µm/px is the common choice. Ports that store a 518 px position "
        "embedding load too: the grid is read from the file",
    )


PRESETS: dict[str, EncoderPreset] = {
    preset.name: preset
    for preset in (
        EncoderPreset(
            name="uni",
            library="timm",
            architecture="vit_large_patch16_224",
            feature_dim=1024,
            weight_files=("pytorch_model.bin",),
            hub_repo="MahmoodLab/UNI",
            license="CC-BY-NC-ND-4.0",
            kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
        ),
        EncoderPreset(
            name="uni2-h",
            library="timm",
            architecture="vit_giant_patch14_224",
            feature_dim=1536,
            weight_files=("pytorch_model.bin",),
            hub_repo="MahmoodLab/UNI2-h",
            license="CC-BY-NC-ND-4.0",
            kwargs=_UNI2_KWARGS,
        ),
        EncoderPreset(
            name="conch",
            library="conch",
            architecture="conch_ViT-B-16",
            feature_dim=512,
            weight_files=("pytorch_model.bin",),
            hub_repo="MahmoodLab/CONCH",
            license="CC-BY-NC-ND-4.0",
            input_size=448,
            resize=448,
            interpolation="bicubic",
            mean=OPENAI_CLIP_MEAN,
            std=OPENAI_CLIP_STD,
            pooling="contrast",
            notes="vision-language: its text tower encodes prompts into the same space",
        ),
        EncoderPreset(
            name="virchow",
            library="timm",
            architecture="vit_huge_patch14_224",
            feature_dim=2560,
            weight_files=("pytorch_model.bin",),
            hub_repo="paige-ai/Virchow",
            license="Apache-2.0",
            interpolation="bicubic",
            pooling="cls+mean_patch",
            kwargs=_VIRCHOW_KWARGS,
        ),
        EncoderPreset(
            name="virchow2",
            library="timm",
            architecture="vit_huge_patch14_224",
            feature_dim=2560,
            weight_files=("pytorch_model.bin",),
            hub_repo="paige-ai/Virchow2",
            license="CC-BY-NC-ND-4.0",
            interpolation="bicubic",
            pooling="cls+mean_patch",
            kwargs={**_VIRCHOW_KWARGS, "reg_tokens": 4},
            notes="trained on 5-40x; the 4 register tokens are skipped in the patch mean",
        ),
        EncoderPreset(
            name="gigapath",
            library="timm",
            architecture="vit_giant_patch14_dinov2",
            feature_dim=1536,
            weight_files=("pytorch_model.bin",),
            hub_repo="prov-gigapath/prov-gigapath",
            license="Apache-2.0 (research use)",
            resize=256,
            interpolation="bicubic",
            kwargs={
                "img_size": 224,
                "in_chans": 3,
                "patch_size": 16,
                "embed_dim": 1536,
                "depth": 40,
                "num_heads": 24,
                "init_values": 1e-5,
                "mlp_ratio": 5.33334,
                "num_classes": 0,
                "dynamic_img_size": True,
            },
            notes="tile encoder only; resized to 256 then centre-cropped to 224",
        ),
        EncoderPreset(
            name="h-optimus-0",
            library="timm",
            architecture="vit_giant_patch14_reg4_dinov2",
            feature_dim=1536,
            weight_files=("pytorch_model.bin",),
            hub_repo="bioptimus/H-optimus-0",
            license="Apache-2.0",
            mean=HOPTIMUS_MEAN,
            std=HOPTIMUS_STD,
            kwargs=_HOPTIMUS_KWARGS,
            gated=False,
            notes="the card feeds 224 px tiles at 0.5 µm/px unresized; preprocess with --patch-px 224 to match",
        ),
        EncoderPreset(
            name="h-optimus-1",
            library="timm",
            architecture="vit_giant_patch14_reg4_dinov2",
            feature_dim=1536,
            weight_files=("pytorch_model.bin",),
            hub_repo="bioptimus/H-optimus-1",
            license="CC-BY-NC-ND-4.0",
            mean=HOPTIMUS_MEAN,
            std=HOPTIMUS_STD,
            kwargs=_HOPTIMUS_KWARGS,
        ),
        _kaiko("kaiko-vits16", "vit_small_patch16_224", 384),
        _kaiko("kaiko-vits8", "vit_small_patch8_224", 384),
        _kaiko("kaiko-vitb16", "vit_base_patch16_224", 768),
        _kaiko("kaiko-vitb8", "vit_base_patch8_224", 768),
        _kaiko("kaiko-vitl14", "vit_large_patch14_reg4_dinov2", 1024),
        EncoderPreset(
            name="phikon",
            library="transformers",
            architecture="ViTModel",
            feature_dim=768,
            weight_files=("pytorch_model.bin", "model.safetensors"),
            hub_repo="owkin/phikon",
            license="Owkin non-commercial",
            kwargs={"add_pooling_layer": False},
            gated=False,
        ),
        EncoderPreset(
            name="phikon-v2",
            library="transformers",
            architecture="Dinov2Model",
            feature_dim=1024,
            weight_files=("model.safetensors", "pytorch_model.bin"),
            hub_repo="owkin/phikon-v2",
            license="Owkin non-commercial",
            gated=False,
        ),
    )
}


def preset_names() -> list[str]:
    """Every preset name, in the order of :data:`PRESETS`."""
    return list(PRESETS)


def preset_for_spec(spec: str) -> EncoderPreset | None:
    """The preset an encoder spec (``uni``, ``uni:/models/uni``) names, else None."""
    return PRESETS.get(spec.strip().partition(":")[0].lower())


def default_mpp(spec: str, fallback: float = 0.5) -> float:
    """The patch mpp to read for an encoder spec: the preset's training mpp, else ``fallback`` (20x)."""
    preset = preset_for_spec(spec)
    return preset.mpp if preset is not None else fallback
