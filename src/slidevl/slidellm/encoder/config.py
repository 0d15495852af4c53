"""Configuration of the topo-pack slide encoder, saved as JSON next to its weights."""

from __future__ import annotations

from dataclasses import dataclass

from slidevl.config import Config
from slidevl.errors import ConfigError

#: Who may attend to whom. ``topo`` is the paper's mask; the other two are ablations.
MASK_VARIANTS = ("topo", "patch_sees_summary", "dense")
#: ``auto`` times split, gather (and flex_attention on CUDA) once per device and shape
#: class and keeps the fastest (see :mod:`slidevl.slidellm.encoder.autoselect`).
ATTENTION_IMPLS = ("auto", "split", "gather", "flex", "dense")


@dataclass
class TopoPackConfig(Config):
    """Hyper-parameters of :class:`~slidevl.slidellm.encoder.model.TopoPackEncoder`.

    The defaults follow Hepato-LLaVA: 6 pre-LN layers, width 512, 8 heads, FFN 2048,
    dropout 0.1, 3x3 packs. Feature widths depend on the patch/pack/thumbnail encoders
    that filled the feature store, so they have no default. ``pack_dim = 0`` or
    ``global_dim = 0`` means the store has no such features: every summary (or the
    global token) then starts from a learned "missing" embedding.
    """

    patch_dim: int
    pack_dim: int
    global_dim: int
    pack_size: int = 3
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    mask_variant: str = "topo"
    pos_encoding: bool = True
    slot_embedding: bool = True
    attention_impl: str = "auto"
    # Upper bound on score-matrix elements materialised at once by the gather path;
    # this is what keeps the summary-to-summary term linear in memory.
    chunk_elements: int = 1 << 21
    # flex_attention is only fast once compiled; tests may switch compilation off.
    flex_compile: bool = True
    # Recompute each layer in backward instead of storing its activations: trades
    # about a third more compute for memory that no longer grows with depth.
    checkpoint_layers: bool = False

    def __post_init__(self) -> None:
        if self.mask_variant not in MASK_VARIANTS:
            raise ConfigError(f"mask_variant must be one of {MASK_VARIANTS}, got {self.mask_variant!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.pos_encoding and self.d_model % 4:
            raise ConfigError(f"2-D sin-cos positions need d_model divisible by 4, got {self.d_model}")
        if self.pack_size < 1:
            raise ConfigError(f"pack_size must be >= 1, got {self.pack_size}")
        for name in ("patch_dim", "pack_dim", "global_dim"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        if self.patch_dim == 0:
            raise ConfigError("patch_dim must be > 0: patch features are the encoder's main input")
