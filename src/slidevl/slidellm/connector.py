"""Connectors: slide-encoder tokens → a short sequence of vectors at the LLM's width.

* :class:`QFormerConnector` (the default, Hepato-LLaVA): a fixed number of learnable
  queries (32) run through ``transformers.Blip2QFormerModel`` with cross-attention in
  every layer (``cross_attention_frequency=1``) over the encoder's summary tokens (and the
  global token when configured), then a linear projection to the LLM width. The queries
  live here, outside the Q-Former, and are passed as ``query_embeds``; padded encoder
  tokens are excluded through ``encoder_attention_mask``.
* :class:`MLPConnector` (the "all tokens" ablation): a 2-layer MLP applied to every token;
  every valid token reaches the LLM, so its sequence grows with the slide.

Both take ``tokens`` (B, T, D) and a boolean ``valid`` (B, T) and return a
:class:`ConnectorOutput` whose ``valid`` says which output rows are real.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

CONNECTOR_KINDS = ("qformer", "mlp")


@dataclass
class ConnectorConfig:
    """Hyper-parameters of a connector, saved as JSON next to its weights.

    ``use_global`` adds the slide's global token to the summary tokens the connector
    reads (and keeps it for region questions, whose summaries are restricted to the
    packs under the box).
    """

    vision_dim: int
    llm_dim: int
    kind: str = "qformer"
    num_queries: int = 32
    hidden_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    intermediate_size: int = 2048
    dropout: float = 0.1
    use_global: bool = True

    def __post_init__(self) -> None:
        if self.kind not in CONNECTOR_KINDS:
            raise ValueError(f"connector kind must be one of {CONNECTOR_KINDS}, got {self.kind!r}")
        for name in ("vision_dim", "llm_dim", "num_queries", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"connector {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"connector hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ConnectorConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown connector config fields {unknown}; was it written by a newer slidevl?")
        return cls(**data)


@dataclass
class ConnectorOutput:
    """Visual embeddings for the LLM: ``embeds`` (B, T', llm_dim), ``valid`` (B, T') bool."""

    embeds: Tensor
    valid: Tensor


def _check_inputs(tokens: Tensor, valid: Tensor, dim: int) -> None:
    if tokens.dim() != 3 or tokens.shape[-1] != dim:
        raise ValueError(f"connector expects tokens of shape (B, T, {dim}), got {tuple(tokens.shape)}")
    if valid.shape != tokens.shape[:2]:
        raise ValueError(f"valid mask shape {tuple(valid.shape)} does not match tokens {tuple(tokens.shape[:2])}")
    if not bool(valid.any(dim=1).all()):
        raise ValueError("every sample needs at least one valid visual token")


class QFormerConnector(nn.Module):
    """Learnable queries cross-attending to the visual tokens through a BLIP-2 Q-Former."""

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        self.config = config
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

    def forward(self, tokens: Tensor, valid: Tensor) -> ConnectorOutput:
        _check_inputs(tokens, valid, self.config.vision_dim)
        valid = valid.to(torch.bool)
        # The attention mask already hides padded keys; zeroing them as well keeps a NaN or
        # inf left in a padded slot from leaking through 0 * inf in the value product.
        tokens = tokens.masked_fill(~valid[..., None], 0.0)
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        out = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=tokens,
            encoder_attention_mask=valid.to(torch.long),
        ).last_hidden_state
        embeds = self.proj(out)
        return ConnectorOutput(embeds, torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device))


class MLPConnector(nn.Module):
    """A 2-layer MLP per token; the output keeps the input's validity mask."""

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        self.config = config
        self.mlp = nn.Sequential(
            nn.Linear(config.vision_dim, config.llm_dim),
            nn.GELU(),
            nn.Linear(config.llm_dim, config.llm_dim),
        )

    def forward(self, tokens: Tensor, valid: Tensor) -> ConnectorOutput:
        _check_inputs(tokens, valid, self.config.vision_dim)
        valid = valid.to(torch.bool)
        embeds = self.mlp(tokens.masked_fill(~valid[..., None], 0.0))
        return ConnectorOutput(embeds, valid)


def build_connector(config: ConnectorConfig) -> QFormerConnector | MLPConnector:
    """The connector named by ``config.kind``."""
    return QFormerConnector(config) if config.kind == "qformer" else MLPConnector(config)
