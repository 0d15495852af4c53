"""HiLa: hierarchical vision-language survival prediction (patch OPL → CLP → region OPL → MCL → fusion).

Data flow for one patient:

1. patch and region features are projected into a shared visual space (``dim``);
2. patch-level OPL aligns the patch prompts with the patch tokens, gives one score per
   risk level and keeps the top ``ratio`` of the tokens;
3. CLP averages the kept patch tokens per region and gates them into the region tokens;
4. region-level OPL does the same with the region prompts on the recalibrated regions;
5. MCL pulls the patient's patch and region prototypes (means of the kept tokens)
   together against other patients' prototypes (weighted by ``mcl_weight``);
6. the fusion head (an MLP; the paper leaves it unspecified) reads both prototypes and
   both levels' prompt scores and gives ``n_bins`` hazard logits.

Aligned text space (``text_space`` set, e.g. prompts embedded by CONCH's text tower for
CONCH patch features): the prompts already live in the image features' space, as in the
paper, so there is no learned text bridge. OPL compares the frozen prompt embeddings
with the raw patch and region features mapped by the model's fixed
``feature_projection`` (CONCH's ``proj_contrast``; the identity for open_clip), i.e.
exactly the cosine the model's own zero-shot classifier computes. The learned
projections (and CLP) still make the tokens the prototypes and the head read; CLP then
recalibrates the region tokens of the prototype, while region OPL selects on the
features themselves, the only space the prompts share.

Variants reproduce the paper's ablations:
``A`` one prompt per level with cosine top-r instead of OT; ``B`` without CLP (region
tokens enter region OPL unchanged); ``C`` without MCL; ``D`` patch level only.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from slidevl.survival.data import PatientBag
from slidevl.survival.hila.clp import CrossLevelPropagation
from slidevl.survival.hila.mcl import MutualContrastive
from slidevl.survival.hila.opl import OPLOutput, OptimalPromptLearning
from slidevl.survival.hila.prompts import EncodedPrompts, PromptError
from slidevl.survival.models.base import SURVIVAL_MODELS, ModelOutput, SurvivalModel, to_numpy

VARIANTS = {
    "full": dict(use_ot=True, use_clp=True, use_mcl=True, use_region=True),
    "A": dict(use_ot=False, use_clp=True, use_mcl=True, use_region=True),
    "B": dict(use_ot=True, use_clp=False, use_mcl=True, use_region=True),
    "C": dict(use_ot=True, use_clp=True, use_mcl=False, use_region=True),
    "D": dict(use_ot=True, use_clp=False, use_mcl=False, use_region=False),
}


PROMPT_SCALES = ("patch", "region")


@SURVIVAL_MODELS.register("hila")
class HiLa(SurvivalModel):
    needs_prompts = True
    gives_evidence = True
    variants = tuple(VARIANTS)
    # OPL's top-r selection and the ablations can leave parameters without a gradient on a step.
    find_unused_parameters = True

    def __init__(
        self,
        in_dim: int,
        region_dim: int,
        patch_prompts: torch.Tensor,
        patch_prompt_mask: torch.Tensor,
        region_prompts: torch.Tensor,
        region_prompt_mask: torch.Tensor,
        n_bins: int = 4,
        variant: str = "full",
        dim: int = 256,
        dropout: float = 0.25,
        ratio: float = 0.6,
        eps: float = 0.1,
        sinkhorn_iters: int = 100,
        sinkhorn_tol: float = 1e-6,
        mcl_weight: float = 0.1,
        mcl_tau: float = 0.07,
        mcl_queue: int = 256,
        mcl_momentum: float = 0.99,
        mcl_dim: int = 128,
        text_space: str | None = None,
        feature_projection: torch.Tensor | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown HiLa variant {variant!r}; use one of {list(VARIANTS)}")
        super().__init__(
            in_dim=in_dim, region_dim=region_dim, n_bins=n_bins, variant=variant, dim=dim, dropout=dropout, ratio=ratio,
            eps=eps, sinkhorn_iters=sinkhorn_iters, sinkhorn_tol=sinkhorn_tol, mcl_weight=mcl_weight, mcl_tau=mcl_tau,
            mcl_queue=mcl_queue, mcl_momentum=mcl_momentum, mcl_dim=mcl_dim, text_space=text_space,
            prompt_shape={"patch": list(patch_prompts.shape), "region": list(region_prompts.shape)},
        )
        flags = VARIANTS[variant]
        self.use_clp, self.use_region = flags["use_clp"], flags["use_region"]
        self.use_mcl = flags["use_mcl"] and mcl_weight > 0
        self.mcl_weight = mcl_weight
        opl = dict(ratio=ratio, eps=eps, max_iter=sinkhorn_iters, tol=sinkhorn_tol, use_ot=flags["use_ot"])
        self.text_space = text_space
        if text_space is not None:
            self.register_buffer("feature_projection", _aligned_projection(
                text_space, feature_projection, in_dim, region_dim, patch_prompts, region_prompts, flags["use_region"]))
        self.patch_proj = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.patch_opl = self._opl(patch_prompts, patch_prompt_mask, dim, opl)
        n_levels = self.patch_opl.n_levels
        fused = dim + n_levels
        if self.use_region:
            self.region_proj = nn.Sequential(nn.Linear(region_dim, dim), nn.ReLU(), nn.Dropout(dropout))
            self.region_opl = self._opl(region_prompts, region_prompt_mask, dim, opl)
            fused += dim + self.region_opl.n_levels
            if self.use_clp:
                self.clp = CrossLevelPropagation(dim)
            if self.use_mcl:
                self.mcl = MutualContrastive(dim, mcl_dim, mcl_queue, mcl_tau, mcl_momentum)
        # Prompt scores are cosines (|s| ≤ 1); a learnable scale, started like a CLIP logit
        # scale, lets them compete with the prototypes from the first step.
        self.score_scale = nn.Parameter(torch.tensor(10.0))
        self.head = nn.Sequential(nn.Linear(fused, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, n_bins))

    @classmethod
    def build(
        cls,
        *,
        in_dim: int,
        region_dim: int,
        n_bins: int,
        options: Mapping[str, Any] | None = None,
        prompts: Mapping[str, EncodedPrompts] | None = None,
    ) -> "HiLa":
        """HiLa for a cohort: the encoded ``{"patch": ..., "region": ...}`` prompts become its prompt buffers."""
        if prompts is None:
            raise PromptError("HiLa needs encoded prompts (see slidevl.survival.hila.prompts.encode_bank)")
        tensors = {}
        for scale in PROMPT_SCALES:
            tensors[f"{scale}_prompts"] = torch.from_numpy(prompts[scale].embeddings)
            tensors[f"{scale}_prompt_mask"] = torch.from_numpy(prompts[scale].mask)
        return cls(in_dim=in_dim, region_dim=region_dim, n_bins=n_bins, **tensors, **(options or {}))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "HiLa":
        """The prompt embeddings (and an aligned model's feature projection) are buffers: they are
        created empty here and filled by the checkpoint's state dict, so prediction needs no text encoder."""
        config = dict(config)
        shapes = config.pop("prompt_shape")
        for scale in PROMPT_SCALES:
            config[f"{scale}_prompts"] = torch.zeros(shapes[scale])
            config[f"{scale}_prompt_mask"] = torch.ones(shapes[scale][:2], dtype=torch.bool)
        return cls(**config)

    def _opl(self, prompts: torch.Tensor, mask: torch.Tensor, dim: int, opl: dict) -> OptimalPromptLearning:
        module = OptimalPromptLearning(prompts, mask, dim, **opl)
        if self.text_space is not None:
            # Prompts and features already share a space: no learned bridge.
            module.text_proj = nn.Identity()
        return module

    def _opl_tokens(self, features: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """What OPL compares with the prompts: the features in the text space when aligned, else the learned tokens."""
        return projected if self.text_space is None else features @ self.feature_projection

    def forward(self, bag: PatientBag, *, evidence: bool = False) -> ModelOutput:
        patches = self.patch_proj(bag.patch)
        p_opl = self.patch_opl(self._opl_tokens(bag.patch, patches))
        kept_patches = patches[p_opl.keep]
        patch_proto = kept_patches.mean(dim=0)
        parts = [patch_proto, self.score_scale * p_opl.scores]
        aux = None
        r_opl = None
        if self.use_region:
            regions = self.region_proj(bag.region)
            if self.use_clp:
                regions = self.clp(kept_patches, bag.region_index[p_opl.keep], regions)
            r_opl = self.region_opl(self._opl_tokens(bag.region, regions))
            region_proto = regions[r_opl.keep].mean(dim=0)
            parts += [region_proto, self.score_scale * r_opl.scores]
            if self.use_mcl and self.training:
                aux = self.mcl_weight * self.mcl(patch_proto, region_proto, bag.key)
        out = ModelOutput(self.head(torch.cat(parts)), aux_loss=aux)
        if evidence:
            out.evidence = {"patch": _opl_evidence(p_opl, len(patches))}
            if r_opl is not None:
                out.evidence["region"] = _opl_evidence(r_opl, len(bag.region))
        return out


def _aligned_projection(text_space: str, projection: torch.Tensor | None, in_dim: int, region_dim: int,
                        patch_prompts: torch.Tensor, region_prompts: torch.Tensor, use_region: bool) -> torch.Tensor:
    """The fixed map from patch features into ``text_space``, after checking every dimension agrees.

    ``projection`` is None only when a checkpoint is rebuilt (:meth:`HiLa.from_config`): the
    zeros are then overwritten by the saved buffer, as the prompt embeddings are.
    """
    text_dim = int(patch_prompts.shape[-1])
    if int(region_prompts.shape[-1]) != text_dim:
        raise PromptError(f"text space {text_space}: patch and region prompts differ in size ({text_dim} vs {region_prompts.shape[-1]})")
    proj = torch.zeros(in_dim, text_dim) if projection is None else torch.as_tensor(projection).float().clone()
    if tuple(proj.shape) != (in_dim, text_dim):
        raise PromptError(
            f"text space {text_space} maps {proj.shape[0]}-d image features to {proj.shape[1]}-d prompts, but the patch "
            f"features are {in_dim}-d and the prompts {text_dim}-d; encode the prompts with the text tower of the model "
            "that made the features"
        )
    if use_region and region_dim != in_dim:
        raise PromptError(
            f"text space {text_space}: region tokens are {region_dim}-d, not patch features ({in_dim}-d), so prompts cannot "
            "be compared with them; use --region-tokens pooled or the mean region encoder, or variant D (patch level only)"
        )
    return proj


def _opl_evidence(opl: OPLOutput, n: int) -> dict:
    kept = torch.zeros(n, dtype=torch.bool, device=opl.keep.device)
    kept[opl.keep] = True
    return {
        "kept": to_numpy(kept).astype(bool),
        "prompt_index": opl.prompt_index.cpu().numpy(),
        "alignment": to_numpy(opl.alignment),
        "level_scores": to_numpy(opl.scores),
    }
