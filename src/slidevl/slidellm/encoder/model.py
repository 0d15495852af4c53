"""The topo-pack slide encoder: pre-LN transformer over [patches][summaries][global]."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from slidevl.slidellm.encoder.attention import resolve_impl, topo_attention
from slidevl.slidellm.encoder.batch import TopoPackBatch
from slidevl.slidellm.encoder.config import TopoPackConfig
from slidevl.slidellm.encoder.gather import DEFAULT_CHUNK_ELEMENTS
from slidevl.slidellm.encoder.layout import GLOBAL, PATCH, SUMMARY, TokenLayout
from slidevl.slidellm.encoder.mask import check_variant
from slidevl.slidellm.encoder.posenc import relative_grid, sincos_2d


class TopoPackAttention(nn.Module):
    """Multi-head self-attention restricted by the topo-pack mask."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        variant: str = "topo",
        impl: str = "auto",
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        flex_compile: bool = True,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.variant = check_variant(variant)
        self.impl = impl
        self.chunk_elements = chunk_elements
        self.flex_compile = flex_compile
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, layout: TokenLayout, *, impl: str | None = None, block_mask=None) -> Tensor:
        b, n, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(x).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = topo_attention(
            q,
            k,
            v,
            layout,
            self.variant,
            impl=impl or self.impl,
            chunk_elements=self.chunk_elements,
            flex_compile=self.flex_compile,
            block_mask=block_mask,
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TopoPackBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + FFN(LN(x)).

    Dropout sits on the residual branches and the FFN hidden layer, not on attention
    probabilities, so every attention implementation computes the same function.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        ffn_dim: int,
        dropout: float,
        **attn_kwargs,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = TopoPackAttention(d_model, n_heads, **attn_kwargs)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_dim, d_model),
        )
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor, layout: TokenLayout, *, impl: str | None = None, block_mask=None) -> Tensor:
        x = x + self.drop1(self.attn(self.norm1(x), layout, impl=impl, block_mask=block_mask))
        return x + self.drop2(self.ffn(self.norm2(x)))


class TopoPackTransformer(nn.Module):
    """A stack of :class:`TopoPackBlock` with a final LayerNorm; shared by encoder and MAE decoder."""

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        n_heads: int,
        ffn_dim: int,
        dropout: float,
        *,
        variant: str = "topo",
        impl: str = "auto",
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        flex_compile: bool = True,
        checkpoint_layers: bool = False,
    ) -> None:
        super().__init__()
        self.variant = check_variant(variant)
        self.impl = impl
        self.checkpoint_layers = checkpoint_layers
        self.layers = nn.ModuleList(
            TopoPackBlock(
                d_model,
                n_heads,
                ffn_dim,
                dropout,
                variant=variant,
                impl=impl,
                chunk_elements=chunk_elements,
                flex_compile=flex_compile,
            )
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, layout: TokenLayout, *, impl: str | None = None) -> Tensor:
        attn = self.layers[0].attn
        # Under autocast the attention sees the autocast dtype, not the residual stream's.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        impl = resolve_impl(
            impl or self.impl, layout, dtype=dtype, n_heads=attn.n_heads, head_dim=x.shape[-1] // attn.n_heads, variant=self.variant
        )
        block_mask = None
        if impl == "flex":
            from slidevl.slidellm.encoder.flex import topo_block_mask

            # One block mask serves every layer of the stack.
            block_mask = topo_block_mask(layout, self.variant)
        for layer in self.layers:
            if self.checkpoint_layers and torch.is_grad_enabled():
                x = checkpoint(layer, x, layout, impl=impl, block_mask=block_mask, use_reentrant=False)
            else:
                x = layer(x, layout, impl=impl, block_mask=block_mask)
        return self.norm(x)


@dataclass
class TopoPackOutput:
    """Encoder output in sequence order, with views per token type."""

    tokens: Tensor  # (B, N, d); padding rows are zero
    layout: TokenLayout

    @property
    def patch_tokens(self) -> Tensor:
        """(B, P, k², d)"""
        lay = self.layout
        return self.tokens[:, : lay.num_patch_tokens].reshape(lay.batch_size, lay.num_packs, lay.slots, -1)

    @property
    def summary_tokens(self) -> Tensor:
        """(B, P, d)"""
        npt = self.layout.num_patch_tokens
        return self.tokens[:, npt : npt + self.layout.num_packs]

    @property
    def global_token(self) -> Tensor:
        """(B, d)"""
        return self.tokens[:, -1]


class TopoPackEmbedding(nn.Module):
    """Input projections, token-type, slot and 2-D pack-position embeddings."""

    def __init__(self, config: TopoPackConfig) -> None:
        super().__init__()
        d = config.d_model
        self.config = config
        self.patch_proj = nn.Linear(config.patch_dim, d)
        self.pack_proj = nn.Linear(config.pack_dim, d) if config.pack_dim else None
        self.global_proj = nn.Linear(config.global_dim, d) if config.global_dim else None
        # A pack without a summary feature (or a slide without a thumbnail feature)
        # still gets a token; it starts from a learned "missing" embedding.
        self.missing_summary = nn.Parameter(torch.zeros(d))
        self.missing_global = nn.Parameter(torch.zeros(d))
        self.type_embed = nn.Parameter(torch.zeros(3, d))
        s = config.pack_size * config.pack_size
        self.slot_embed = nn.Parameter(torch.zeros(s, d)) if config.slot_embedding else None
        for p in (self.missing_summary, self.missing_global, self.type_embed):
            nn.init.normal_(p, std=0.02)
        if self.slot_embed is not None:
            nn.init.normal_(self.slot_embed, std=0.02)

    def _check(self, batch: TopoPackBatch) -> None:
        c = self.config
        if batch.pack_size != c.pack_size:
            raise ValueError(f"batch has pack size {batch.pack_size}, the encoder was built for {c.pack_size}")
        if batch.patch_features.shape[-1] != c.patch_dim:
            raise ValueError(f"patch features are {batch.patch_features.shape[-1]}-d, the encoder expects {c.patch_dim}")
        for name, width, feats in (
            ("pack", c.pack_dim, batch.pack_features),
            ("global", c.global_dim, batch.global_feature),
        ):
            got = feats.shape[-1]
            if got not in (0, width) and width:
                raise ValueError(f"{name} features are {got}-d, the encoder expects {width}")

    def forward(self, batch: TopoPackBatch) -> Tensor:
        """(B, N, d) input tokens in sequence order (padding rows included, not yet zeroed)."""
        self._check(batch)
        c = self.config
        b, p, s, _ = batch.patch_features.shape
        dtype = self.patch_proj.weight.dtype
        patch = self.patch_proj(batch.patch_features.to(dtype)) + self.type_embed[PATCH]
        if self.slot_embed is not None:
            patch = patch + self.slot_embed
        missing = self.missing_summary.expand(b, p, -1)
        if self.pack_proj is not None and batch.pack_features.shape[-1]:
            summary = torch.where(batch.pack_present[..., None], self.pack_proj(batch.pack_features.to(dtype)), missing)
        else:
            summary = missing
        summary = summary + self.type_embed[SUMMARY]
        if c.pos_encoding:
            pos = sincos_2d(relative_grid(batch.pack_grid, batch.pack_valid), c.d_model).to(dtype)
            patch = patch + pos[:, :, None]
            summary = summary + pos
        g_missing = self.missing_global.expand(b, -1)
        if self.global_proj is not None and batch.global_feature.shape[-1]:
            glob = torch.where(batch.global_present[:, None], self.global_proj(batch.global_feature.to(dtype)), g_missing)
        else:
            glob = g_missing
        glob = glob + self.type_embed[GLOBAL]
        return torch.cat([patch.reshape(b, p * s, -1), summary, glob[:, None]], dim=1)


class TopoPackEncoder(nn.Module):
    """Slide encoder with sparse topo-pack attention (Hepato-LLaVA's slide encoder).

    ``forward(batch)`` returns a :class:`TopoPackOutput`. ``patch_keep`` / ``summary_keep``
    hide tokens exactly as if they were removed from the slide (MAE): hidden tokens are
    never attended to and their outputs are zero.
    """

    def __init__(self, config: TopoPackConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = TopoPackEmbedding(config)
        self.transformer = TopoPackTransformer(
            config.d_model,
            config.n_layers,
            config.n_heads,
            config.ffn_dim,
            config.dropout,
            variant=config.mask_variant,
            impl=config.attention_impl,
            chunk_elements=config.chunk_elements,
            flex_compile=config.flex_compile,
            checkpoint_layers=config.checkpoint_layers,
        )

    def forward(
        self,
        batch: TopoPackBatch,
        *,
        patch_keep: Tensor | None = None,
        summary_keep: Tensor | None = None,
        impl: str | None = None,
    ) -> TopoPackOutput:
        layout = TokenLayout.from_batch(batch, patch_keep=patch_keep, summary_keep=summary_keep)
        valid = layout.token_valid()[..., None]
        x = self.embed(batch) * valid.to(self.embed.patch_proj.weight.dtype)
        x = self.transformer(x, layout, impl=impl)
        return TopoPackOutput(tokens=x * valid.to(x.dtype), layout=layout)
