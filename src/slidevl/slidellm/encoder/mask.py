"""The topo-pack attention mask, written once and used by every implementation.

Rules (query → keys it may attend to), for the ``topo`` variant of Hepato-LLaVA:

* global  → itself;
* patch   → the patches of its own pack, and the global token;
* summary → the patches of its own pack, itself, all summaries, and the global token.

``patch_sees_summary`` additionally lets a patch attend to its own pack's summary;
``dense`` lets every token attend to every token. In all variants a key must be
valid (not padding). :func:`allowed` is the single statement of these rules: the
dense reference evaluates it on an N×N grid, flex_attention evaluates it per element
inside the kernel, and the gather implementation is tested against it.
"""

from __future__ import annotations

from torch import Tensor

from slidevl.slidellm.encoder.config import MASK_VARIANTS
from slidevl.slidellm.encoder.layout import GLOBAL, PAD, PATCH, SUMMARY, TokenLayout


def check_variant(variant: str) -> str:
    if variant not in MASK_VARIANTS:
        raise ValueError(f"mask variant must be one of {MASK_VARIANTS}, got {variant!r}")
    return variant


def allowed(
    q_type: Tensor,
    q_pack: Tensor,
    k_type: Tensor,
    k_pack: Tensor,
    k_valid: Tensor,
    variant: str = "topo",
) -> Tensor:
    """Whether a query may attend to a key; all arguments broadcast against each other.

    Only elementwise tensor operations are used, so the same function serves as a
    flex_attention ``mask_mod`` body (scalars per call) and as a dense mask builder.
    """
    if variant == "dense":
        # Every query (q_type >= PAD is always true; it only broadcasts over queries).
        return k_valid & (k_type >= 0) & (q_type >= PAD)
    same_pack = q_pack == k_pack
    k_patch = k_type == PATCH
    k_summary = k_type == SUMMARY
    k_global = k_type == GLOBAL
    patch_rule = (k_patch & same_pack) | k_global
    if variant == "patch_sees_summary":
        patch_rule = patch_rule | (k_summary & same_pack)
    summary_rule = (k_patch & same_pack) | k_summary | k_global
    rule = ((q_type == PATCH) & patch_rule) | ((q_type == SUMMARY) & summary_rule) | ((q_type == GLOBAL) & k_global)
    return rule & k_valid


def dense_mask(layout: TokenLayout, variant: str = "topo") -> Tensor:
    """(B, N, N) bool mask: entry [b, i, j] is True when token i may attend to token j.

    Rows of padding queries follow the same rules (their outputs are discarded by the
    attention implementations), so every row keeps at least the global key.
    This is O(N²) memory and exists as the reference and for inspection.
    """
    check_variant(variant)
    t = layout.token_type()
    p = layout.token_pack()
    valid = layout.token_valid()
    return allowed(t[None, :, None], p[None, :, None], t[None, None, :], p[None, None, :], valid[:, None, :], variant)
