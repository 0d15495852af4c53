"""Connectors: slide-encoder tokens → a short sequence of vectors at the LLM's width.

* :class:`QFormerConnector` (the default, Hepato-LLaVA): a fixed number of learnable
  queries (32) run through ``transformers.Blip2QFormerModel`` with cross-attention in
  every layer (``cross_attention_frequency=1``) over the encoder's summary tokens (and the
  global token when configured), then a linear projection to the LLM width. The queries
  live here, outside the Q-Former, and are passed as ``query_embeds``; padded encoder
  tokens are excluded through ``encoder_attention_mask``.
* :class:`MLPConnector` (the "all tokens" ablation): a 2-layer MLP applied to every token;
  every valid token reaches the LLM, so its sequence grows with the slide. With
  ``pooled_tokens`` it also appends the mean of its outputs over the summary tokens and
  over the patches: an area fraction under the box is a mean of per-patch evidence, and a
  pooled token hands the LLM that mean directly instead of leaving a 4-layer LLM to learn
  uniform attention over hundreds of tokens (a DeepSets read: the MLP learns the per-patch
  feature, the LLM reads its average).

Both take ``tokens`` (B, T, D) and a boolean ``valid`` (B, T), plus the patch features
under the question's box when configured (``patches`` (B, N, D_patch) and
``patch_valid``), and return a :class:`ConnectorOutput` whose ``valid`` says which
output rows are real. They are registered by name in :data:`CONNECTORS` (``kind`` in
:class:`ConnectorConfig`); a new one derives from :class:`Connector` and is decorated
with ``@CONNECTORS.register(NAME)`` (see ``docs/adding-a-model.md``).

Both first standardise the encoder tokens with statistics of the training slides
(:class:`TokenStandardizer`, fitted once before stage 1 and saved with the weights). The
encoder's tokens share a large common component (mean norm 17 against a spread of 14 on
the synthetic cohort, and a global token that barely changes between slides), so raw
tokens give a fresh Q-Former near-uniform attention and nearly the same output for every
slide: the tuned model then learned answer priors and ignored the image (its visual
embeddings differed between slides by 3e-4 of their norm).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
import math
from typing import Any, ClassVar, Mapping, NamedTuple

import torch
from torch import Tensor, nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from slidevl.config import Config
from slidevl.errors import ConfigError
from slidevl.registry import Registry

#: Connector kinds → classes, filled by ``@CONNECTORS.register(NAME)`` below.
CONNECTORS: Registry[type["Connector"]] = Registry("connector")
#: Connector options that change how it reads, not its weights: a run continuing a checkpoint may set them.
READ_OPTIONS = frozenset({"max_patches", "pooled_tokens"})
#: How patch features are scaled before their linear map: one scale for all dimensions, or one each.
PATCH_SCALINGS = ("shared", "per_dim")
#: Options a continued run may change because the weights are converted to keep the function.
CONVERTIBLE_OPTIONS = frozenset({"patch_scaling"})


@dataclass
class ConnectorConfig(Config):
    """Hyper-parameters of a connector, saved as JSON next to its weights.

    ``use_global`` adds the slide's global token to the summary tokens the connector
    reads (and keeps it for region questions, whose summaries are restricted to the
    packs under the box).

    ``patch_dim > 0`` makes the connector also read the tile-encoder features of the
    patches under the question's box (at most ``max_patches``, evenly spaced, for large
    boxes and whole-slide questions), through their own standardiser and a linear map to
    ``vision_dim``. ``use_patches`` asks for that when a run fills in the widths;
    ``patch_dim`` is then the feature store's patch width.

    ``use_summaries=False`` drops the encoder's tokens (the pack summaries and the global
    token): the connector reads the patch features alone, in grid order and without the
    encoder's 2-D context. It is the "no slide encoder" ablation of the spatial questions
    and needs ``use_patches``.

    ``pooled_tokens`` (mlp only) appends the mean output over the summary tokens, and over
    the patches when they are read; ``None`` means on for a connector that can pool.

    The defaults are the best measured recipe (``recipes/vqa.yaml``): the MLP connector with
    pooled tokens reached 0.905 single-choice accuracy (``benchmarks/results/vqa_ss_fresh_3ep.md``);
    the paper's Q-Former (``recipes/qformer.yaml``) stayed at 0.447 in the ablations
    (``benchmarks/results/vqa_ablations.md``, variant ``full``). It adds no weights, so ``max_patches`` and it are the
    read options a continued run (``--init``) may still change.

    ``patch_scaling`` standardises the patch features with one scale per dimension
    (``per_dim``, the default) or one for all (``shared``, what checkpoints written before
    the option used). Hand-crafted tile features span four decades of spread (a standard
    deviation of 0.008 to 49 on the synthetic cohort), and under one shared scale the
    quiet dimensions, colour fractions among them, reach the linear map at a hundredth of
    unit size, where Adam's steps barely move their weights. A continued run may switch
    to ``per_dim``: the linear map is rescaled so the connector computes the same function.

    ``positions`` adds to every summary token and patch its place in the tissue in view
    (:class:`PositionEncoding`), so the LLM, whose own positions are the 1-D order of its
    sequence, can tell where on the slide each row lies.
    """

    @property
    def reads_patches(self) -> bool:
        return self.patch_dim > 0

    vision_dim: int
    llm_dim: int
    kind: str = "mlp"
    num_queries: int = 32
    hidden_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    intermediate_size: int = 2048
    dropout: float = 0.1
    use_global: bool = True
    use_patches: bool = True
    use_summaries: bool = True
    patch_dim: int = 0
    max_patches: int = 1024
    pooled_tokens: bool | None = None
    patch_scaling: str = "per_dim"
    positions: bool = False

    def __post_init__(self) -> None:
        if self.kind not in CONNECTORS:
            raise ConfigError(f"connector kind must be one of {list_connectors()}, got {self.kind!r}")
        if self.patch_scaling not in PATCH_SCALINGS:
            raise ConfigError(f"connector patch_scaling must be one of {PATCH_SCALINGS}, got {self.patch_scaling!r}")
        if self.pooled_tokens is None:
            self.pooled_tokens = CONNECTORS.get(self.kind).pools_tokens
        if self.pooled_tokens and not CONNECTORS.get(self.kind).pools_tokens:
            pooling = ", ".join(name for name, cls in CONNECTORS.items() if cls.pools_tokens)
            raise ConfigError(f"pooled_tokens applies to the {pooling} connector, not to {self.kind}")
        for name in ("vision_dim", "llm_dim", "num_queries", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_patches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"connector {name} must be >= 1, got {getattr(self, name)}")
        if self.patch_dim < 0:
            raise ConfigError(f"connector patch_dim must be >= 0, got {self.patch_dim}")
        if not self.use_summaries and not self.use_patches:
            raise ConfigError("a connector that reads no encoder tokens (use_summaries off) must read the patch features "
                              "(use_patches on)")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"connector hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> "ConnectorConfig":
        # Saved configs keep the meaning they were written with: before patch_scaling existed
        # patches had one shared scale, and before pooled_tokens existed nothing was pooled.
        return super().from_dict({"patch_scaling": "shared", "pooled_tokens": False, **data}, source=source)


class ConnectorInputs(NamedTuple):
    """A padded batch, in the order of a connector's ``forward`` arguments.

    ``tokens`` (B, T, vision_dim) and ``valid`` (B, T); ``patches`` (B, N, patch_dim) and
    ``patch_valid`` (B, N) for a connector that reads patches; ``token_xy`` (B, T, 2) and
    ``patch_xy`` (B, N, 2), places in the tissue in view, for one that reads positions.
    """

    tokens: Tensor
    valid: Tensor
    patches: Tensor | None = None
    patch_valid: Tensor | None = None
    token_xy: Tensor | None = None
    patch_xy: Tensor | None = None


@dataclass
class ConnectorOutput:
    """Visual embeddings for the LLM: ``embeds`` (B, T', llm_dim), ``valid`` (B, T') bool."""

    embeds: Tensor
    valid: Tensor


class TokenStandardizer(nn.Module):
    """``(x - mean) / scale`` with a per-dimension mean and a fitted scale.

    ``per_dim=False``: one scalar scale, the root-mean-square deviation over all
    dimensions, which keeps near-constant dimensions, such as a global token's, from being
    blown up into noise. ``per_dim=True``: each dimension's own standard deviation (a
    constant dimension keeps scale 1), for inputs whose dimensions have unrelated units.
    Unfitted, it is the identity.
    """

    def __init__(self, dim: int, *, per_dim: bool = False) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim if per_dim else ()))

    @property
    def per_dim(self) -> bool:
        return self.scale.dim() == 1

    @torch.no_grad()
    def fit(self, tokens: Tensor) -> None:
        """Fit on (N, D) tokens pooled over the training slides."""
        tokens = self._checked(tokens)
        mean = tokens.mean(0)
        self.mean.copy_(mean)
        self.scale.copy_(self._scale_about(tokens, mean, self.per_dim))

    @torch.no_grad()
    def make_per_dim(self, tokens: Tensor) -> Tensor:
        """Switch a shared scale to per-dimension scales fitted on ``tokens`` about the kept mean.

        Returns the (D,) factor ``new / old`` by which each standardised dimension shrank,
        so a linear map reading this output can be rescaled to compute the same function.
        """
        if self.per_dim:
            raise ValueError("the standardiser already scales each dimension on its own")
        new = self._scale_about(self._checked(tokens), self.mean, True)
        factor = new / self.scale
        self.scale = new
        return factor

    def _checked(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2 or tokens.shape[1] != self.mean.shape[0] or tokens.shape[0] < 2:
            raise ValueError(
                f"standardiser needs (N >= 2, {self.mean.shape[0]}) tokens to fit, got {tuple(tokens.shape)}"
            )
        return tokens.to(self.mean.device, torch.float32)

    @staticmethod
    def _scale_about(tokens: Tensor, mean: Tensor, per_dim: bool) -> Tensor:
        deviation = (tokens - mean).pow(2)
        rms = deviation.mean().sqrt()
        if not torch.isfinite(rms) or rms <= 0:
            raise ValueError("the visual tokens are all identical (or not finite); the encoder output carries nothing")
        if not per_dim:
            return rms
        std = deviation.mean(0).sqrt()
        return torch.where(std > 1e-6 * rms, std, torch.ones_like(std))

    def forward(self, tokens: Tensor) -> Tensor:
        return (tokens - self.mean.to(tokens.dtype)) / self.scale.to(tokens.dtype)


class PositionEncoding(nn.Module):
    """Sin-cos features of a place ``(x, y)`` in [0, 1]², through a linear map to ``dim``.

    ``bands`` octaves per axis, from one period over the frame (where in the tissue) down
    to 1/2**(bands-1) of it (which rows are neighbours). The map starts at zero, so
    switching positions on leaves a connector's function unchanged until training moves
    it. A place that is not finite (the global token's) gets no position.
    """

    def __init__(self, dim: int, bands: int = 6) -> None:
        super().__init__()
        self.register_buffer("frequencies", 2.0 ** torch.arange(bands) * math.pi, persistent=False)
        self.proj = nn.Linear(4 * bands, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, xy: Tensor) -> Tensor:
        """(..., dim) position embeddings of (..., 2) places; zero where a place is NaN."""
        placed = torch.isfinite(xy).all(-1, keepdim=True)
        angles = (xy.nan_to_num(0.0)[..., None] * self.frequencies.to(xy.dtype)).flatten(-2)
        features = torch.cat([angles.sin(), angles.cos()], dim=-1)
        return self.proj(features) * placed.to(features.dtype)


def _check_inputs(tokens: Tensor, valid: Tensor, dim: int) -> None:
    if tokens.dim() != 3 or tokens.shape[-1] != dim:
        raise ValueError(f"connector expects tokens of shape (B, T, {dim}), got {tuple(tokens.shape)}")
    if valid.shape != tokens.shape[:2]:
        raise ValueError(f"valid mask shape {tuple(valid.shape)} does not match tokens {tuple(tokens.shape[:2])}")
    if not bool(valid.any(dim=1).all()):
        raise ValueError("every sample needs at least one valid visual token")


class Connector(nn.Module):
    """What every connector shares: standardised encoder tokens, plus projected patch features.

    A subclass builds its layers from a :class:`ConnectorConfig`, maps the merged inputs
    to a :class:`ConnectorOutput` in ``forward(*inputs)`` (a :class:`ConnectorInputs`),
    and says in :meth:`output_length` how many rows that gives.
    """

    #: ``pooled_tokens`` applies: the connector can append mean outputs (one row per token group).
    pools_tokens: ClassVar[bool] = False

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        if not config.use_summaries and not config.reads_patches:
            raise ConfigError("a connector without the encoder's tokens needs the patch width (patch_dim > 0)")
        self.config = config
        self.standardize = TokenStandardizer(config.vision_dim)
        if config.reads_patches:
            self.patch_standardize = TokenStandardizer(config.patch_dim, per_dim=config.patch_scaling == "per_dim")
            self.patch_proj = nn.Linear(config.patch_dim, config.vision_dim)
        if config.positions:
            self.position = PositionEncoding(config.vision_dim)

    def output_length(self, n_tokens: int, n_patches: int = 0) -> int:  # pragma: no cover - interface
        """Rows of ``embeds`` for one slide of ``n_tokens`` encoder tokens and ``n_patches`` patch features.

        What the LLM's context must hold for the image; padding rows, marked invalid, may come on top.
        """
        raise NotImplementedError

    @torch.no_grad()
    def scale_patches_per_dim(self, patches: Tensor) -> None:
        """Convert a shared patch scale to per-dimension scales fitted on ``patches`` (N, patch_dim),
        rescaling the patch projection so the connector's outputs stay the same."""
        if not self.config.reads_patches:
            raise ValueError("this connector reads no patch features")
        factor = self.patch_standardize.make_per_dim(patches)
        self.patch_proj.weight.mul_(factor.to(self.patch_proj.weight.dtype)[None, :])
        self.config = replace(self.config, patch_scaling="per_dim")

    def merged_inputs(
        self, tokens: Tensor, valid: Tensor, patches: Tensor | None, patch_valid: Tensor | None,
        token_xy: Tensor | None = None, patch_xy: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(B, T [+ N], vision_dim) standardised inputs, with their places when configured, and their validity.

        Padding is zeroed. Without summaries (``use_summaries`` off) only the N projected patches are returned.
        """
        _check_inputs(tokens, valid, self.config.vision_dim)
        valid = valid.to(torch.bool)
        # The attention mask already hides padded keys; zeroing them as well keeps a NaN or
        # inf left in a padded slot from leaking through 0 * inf in the value product.
        tokens = self._placed(self.standardize(tokens), token_xy, "token").masked_fill(~valid[..., None], 0.0)
        if not self.config.reads_patches:
            if patches is not None:
                raise ValueError("this connector reads no patch features (patch_dim=0), but patches were given")
            return tokens, valid
        if patches is None or patch_valid is None:
            raise ValueError(
                f"this connector reads patch features (patch_dim={self.config.patch_dim}); pass patches and their mask"
            )
        if patches.dim() != 3 or patches.shape[0] != tokens.shape[0] or patches.shape[-1] != self.config.patch_dim:
            raise ValueError(
                f"connector expects patches of shape ({tokens.shape[0]}, N, {self.config.patch_dim}), "
                f"got {tuple(patches.shape)}"
            )
        patch_valid = patch_valid.to(torch.bool)
        projected = self.patch_proj(self.patch_standardize(patches).masked_fill(~patch_valid[..., None], 0.0))
        projected = self._placed(projected, patch_xy, "patch").masked_fill(~patch_valid[..., None], 0.0)
        if not self.config.use_summaries:
            if not bool(patch_valid.any(dim=1).all()):
                raise ValueError("a connector without summary tokens needs at least one valid patch per sample")
            return projected, patch_valid
        return torch.cat([tokens, projected], dim=1), torch.cat([valid, patch_valid], dim=1)

    def _placed(self, rows: Tensor, xy: Tensor | None, what: str) -> Tensor:
        """``rows`` plus their position embeddings, for a connector that reads positions."""
        if not self.config.positions:
            if xy is not None:
                raise ValueError(f"this connector reads no positions (positions off), but {what} places were given")
            return rows
        if xy is None or xy.shape != (*rows.shape[:2], 2):
            got = None if xy is None else tuple(xy.shape)
            raise ValueError(f"this connector reads positions: pass {what} places of shape "
                             f"({rows.shape[0]}, {rows.shape[1]}, 2), got {got}")
        return rows + self.position(xy.to(rows.dtype))


@CONNECTORS.register("qformer")
class QFormerConnector(Connector):
    """Learnable queries cross-attending to the visual tokens through a BLIP-2 Q-Former."""

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__(config)
        qconf = Blip2QFormerConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.dropout,
            cross_attention_frequency=1,
            encoder_hidden_size=config.vision_dim,
        )
        self.qformer = Blip2QFormerModel(qconf)
        self.queries = nn.Parameter(torch.randn(1, config.num_queries, config.hidden_size) * qconf.initializer_range)
        self.proj = nn.Linear(config.hidden_size, config.llm_dim)

    def forward(
        self, tokens: Tensor, valid: Tensor, patches: Tensor | None = None, patch_valid: Tensor | None = None,
        token_xy: Tensor | None = None, patch_xy: Tensor | None = None,
    ) -> ConnectorOutput:
        tokens, valid = self.merged_inputs(tokens, valid, patches, patch_valid, token_xy, patch_xy)
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        out = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=tokens,
            encoder_attention_mask=valid.to(torch.long),
        ).last_hidden_state
        embeds = self.proj(out)
        return ConnectorOutput(embeds, torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device))

    def output_length(self, n_tokens: int, n_patches: int = 0) -> int:
        """One row per query, however many tokens the slide has."""
        return self.config.num_queries


@CONNECTORS.register("mlp")
class MLPConnector(Connector):
    """A 2-layer MLP per token; the output keeps the input's validity mask."""

    pools_tokens = True

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__(config)
        self.mlp = nn.Sequential(
            nn.Linear(config.vision_dim, config.llm_dim),
            nn.GELU(),
            nn.Linear(config.llm_dim, config.llm_dim),
        )

    def forward(
        self, tokens: Tensor, valid: Tensor, patches: Tensor | None = None, patch_valid: Tensor | None = None,
        token_xy: Tensor | None = None, patch_xy: Tensor | None = None,
    ) -> ConnectorOutput:
        n_summary = tokens.shape[1] if self.config.use_summaries else 0
        tokens, valid = self.merged_inputs(tokens, valid, patches, patch_valid, token_xy, patch_xy)
        embeds = self.mlp(tokens)
        if not self.config.pooled_tokens:
            return ConnectorOutput(embeds, valid)
        groups = ([slice(0, n_summary)] if n_summary else []) + (
            [slice(n_summary, tokens.shape[1])] if self.config.reads_patches else [])
        pooled, pooled_valid = zip(*(_masked_mean(embeds[:, g], valid[:, g]) for g in groups))
        return ConnectorOutput(torch.cat([embeds, torch.stack(pooled, 1)], 1),
                               torch.cat([valid, torch.stack(pooled_valid, 1)], 1))

    def output_length(self, n_tokens: int, n_patches: int = 0) -> int:
        """Every token (when read) and patch, plus the pooled rows (summaries and patches, when read)."""
        summaries = int(self.config.use_summaries)
        pooled = (summaries + int(self.config.reads_patches)) if self.config.pooled_tokens else 0
        return summaries * n_tokens + (n_patches if self.config.reads_patches else 0) + pooled


def _masked_mean(x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(B, D) mean of ``x`` (B, T, D) over its valid rows, and (B,) whether any row was valid."""
    weight = valid.to(x.dtype)[..., None]
    count = weight.sum(1)
    return (x * weight).sum(1) / count.clamp_min(1.0), count[:, 0] > 0


def list_connectors() -> list[str]:
    """Every registered connector kind, in registration order."""
    return CONNECTORS.names()


def build_connector(config: ConnectorConfig) -> Connector:
    """The connector named by ``config.kind``."""
    return CONNECTORS.get(config.kind)(config)
