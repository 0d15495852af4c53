"""What every survival model takes and returns, and the registry that names them.

A model maps one :class:`~slidevl.survival.data.PatientBag` to ``n_bins`` hazard
logits. It may add an auxiliary loss (HiLa's contrastive term, already weighted) and,
when asked, per-token evidence for the viewer: arrays over the bag's patches
(``patch``) and regions (``region``) that :mod:`slidevl.survival.evidence` splits
per slide.

Models are registered by name (``@SURVIVAL_MODELS.register("abmil")``). What differs
between them is declared on the class, so cross-validation, checkpoints and prediction
treat every model alike: :attr:`SurvivalModel.needs_prompts`,
:attr:`~SurvivalModel.gives_evidence`, :attr:`~SurvivalModel.variants`,
:attr:`~SurvivalModel.find_unused_parameters`, and the classmethods
:meth:`~SurvivalModel.build` (a fresh model for a cohort) and
:meth:`~SurvivalModel.from_config` (the architecture a checkpoint recorded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np
import torch
from torch import nn

from slidevl.registry import Registry
from slidevl.survival.data import PatientBag

if TYPE_CHECKING:
    from slidevl.survival.hila.prompts import EncodedPrompts

SURVIVAL_MODELS: Registry[type["SurvivalModel"]] = Registry("survival model")


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (n_bins,)
    aux_loss: torch.Tensor | None = None
    evidence: dict[str, Any] = field(default_factory=dict)


class SurvivalModel(nn.Module):
    """Base class: subclasses are registered and fill ``self.config`` with their init arguments.

    ``self.config`` is what a checkpoint records; :meth:`from_config` must rebuild the
    same architecture from it, without the training data.
    """

    #: The model reads text prompts (``build`` then needs the encoded prompt bank).
    needs_prompts: ClassVar[bool] = False
    #: ``forward(bag, evidence=True)`` returns per-token evidence in the format of :mod:`slidevl.survival.evidence`.
    gives_evidence: ClassVar[bool] = False
    #: Ablation variants accepted as ``variant=``; empty when the model has one form (``--variant full``).
    variants: ClassVar[tuple[str, ...]] = ()
    #: Some parameters may get no gradient on a step, so DDP must look for them (slower when not needed).
    find_unused_parameters: ClassVar[bool] = False

    def __init__(self, **config: Any) -> None:
        super().__init__()
        self.config: dict[str, Any] = {"name": self.name, **config}

    @property
    def name(self) -> str:
        """The name the class is registered under, recorded in checkpoints."""
        return registered_name(type(self))

    @classmethod
    def build(
        cls,
        *,
        in_dim: int,
        region_dim: int,
        n_bins: int,
        options: Mapping[str, Any] | None = None,
        prompts: Mapping[str, "EncodedPrompts"] | None = None,
    ) -> "SurvivalModel":
        """A fresh model for features of ``in_dim`` (patches) and ``region_dim`` (regions).

        The baselines read patch tokens only, so ``region_dim`` and ``prompts`` do not
        apply to them; ``options`` are the model's own hyper-parameters.
        """
        return cls(in_dim=in_dim, n_bins=n_bins, **(options or {}))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "SurvivalModel":
        """An untrained model with the architecture ``config`` (a saved ``self.config`` without ``name``) records."""
        return cls(**config)

    def forward(self, bag: PatientBag, *, evidence: bool = False) -> ModelOutput:  # pragma: no cover - interface
        raise NotImplementedError


def registered_name(cls: type[SurvivalModel]) -> str:
    """The registry name of ``cls``; an unregistered model class is a programming error."""
    for name, entry in SURVIVAL_MODELS.items():
        if entry is cls:
            return name
    raise TypeError(f"{cls.__name__} is not registered; decorate it with @SURVIVAL_MODELS.register(NAME)")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()
