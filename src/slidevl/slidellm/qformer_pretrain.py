"""BLIP-2's representation stage for the Q-Former: contrastive, matching and generative
losses on slide–caption pairs, before stage 1 connects the Q-Former to the LLM.

A Q-Former trained by the LLM's loss alone learns slowly: the gradient reaches its
queries only through a frozen LM that has never seen them. BLIP-2 first trains it as a
vision–language model of its own, with three losses that share one Q-Former (queries and
caption tokens go through the same self-attention layers; the queries alone
cross-attend to the image, here the connector's standardised encoder tokens and patch
features):

* **ITC** (image–text contrastive): queries alone (they do not see the text) and the
  caption alone (``[CLS]`` first) are projected to a shared 256-d space and normalised;
  an image–text similarity is the *largest* similarity between any query and the
  caption's ``[CLS]`` output, divided by a learnt temperature; cross-entropy over the
  in-batch captions (and images), both ways.
* **ITM** (image–text matching): queries and caption together under a bidirectional
  mask, the queries cross-attending to the image; a binary head on every query output,
  averaged over the queries, says whether the caption belongs to the image. Each image
  gets a hard negative caption and each caption a hard negative image, drawn in
  proportion to their ITC similarities (the pairs the contrastive head finds hardest).
* **ITG** (image-grounded text generation): the caption, started by ``[DEC]``, is
  predicted token by token under a multimodal causal mask: a text token attends to every
  query and to the text before it; the queries attend only to each other. Everything the
  text learns about the image must pass through the queries.

Template captions repeat: two regions of similar composition can carry the same text. A
batch's "positives" are therefore every pair with the same caption text or the same image
(slide and box), not only the diagonal: ITC spreads its target over them and ITM never
draws one as a negative. Negatives come from the micro-batch of the process that computes
the loss.

What this stage adds next to the connector (text embeddings, the text feed-forward
blocks of each layer, the two projections, the ITM and LM heads, the temperature) is
:class:`RepresentationHeads`, stored with the stage's checkpoint so it can resume, and
dropped afterwards: only the Q-Former, its queries and the connector's input layers
carry into stage 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerIntermediate, Blip2QFormerOutput

from slidevl.slidellm.connector import QFormerConnector

#: Width of the shared image–text space of ITC (BLIP-2's).
EMBED_DIM = 256
#: BLIP-2's initial contrastive temperature and the range it is kept in.
TEMPERATURE_INIT = 0.07
TEMPERATURE_RANGE = (0.001, 0.5)
#: Label smoothing of the contrastive and generative cross-entropies (BLIP-2's).
LABEL_SMOOTHING = 0.1


class RepresentationHeads(nn.Module):
    """Everything the stage trains besides the connector; discarded after the stage.

    The text side of the Q-Former: word and position embeddings (``[CLS]`` and ``[DEC]``
    are their own learnt vectors, so any tokenizer works), and per layer a feed-forward
    block for text tokens (BLIP-2 gives text and queries separate feed-forward weights
    and shared attention). Then the ITC projections, the ITM head, an LM head tied to the
    word embeddings, and the temperature.
    """

    def __init__(self, connector: QFormerConnector, vocab_size: int, max_text_tokens: int) -> None:
        super().__init__()
        config = connector.qformer.config
        width = config.hidden_size
        self.max_text_tokens = int(max_text_tokens)
        self.word_embeddings = nn.Embedding(vocab_size, width)
        # One position more than the text: the [CLS]/[DEC] token comes first.
        self.position_embeddings = nn.Embedding(self.max_text_tokens + 1, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.dec_token = nn.Parameter(torch.zeros(1, 1, width))
        self.text_intermediate = nn.ModuleList(Blip2QFormerIntermediate(config) for _ in range(config.num_hidden_layers))
        self.text_output = nn.ModuleList(Blip2QFormerOutput(config) for _ in range(config.num_hidden_layers))
        self.vision_proj = nn.Linear(width, EMBED_DIM)
        self.text_proj = nn.Linear(width, EMBED_DIM)
        self.itm_head = nn.Linear(width, 2)
        self.lm_transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=config.layer_norm_eps))
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.temperature = nn.Parameter(torch.tensor(TEMPERATURE_INIT))
        self._init_weights(config.initializer_range)

    def _init_weights(self, std: float) -> None:
        # The Q-Former's own initialisation (BERT's), so both sides of the shared layers start alike.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.cls_token, std=std)
        nn.init.normal_(self.dec_token, std=std)

    def embed_text(self, ids: Tensor, start: Tensor) -> Tensor:
        """(B, 1 + L, width): the start token (``cls_token`` or ``dec_token``) then the words."""
        if ids.shape[1] > self.max_text_tokens:
            raise ValueError(f"captions of {ids.shape[1]} tokens; the text embeddings hold {self.max_text_tokens}")
        words = self.word_embeddings(ids)
        tokens = torch.cat([start.expand(ids.shape[0], -1, -1).to(words.dtype), words], dim=1)
        return tokens + self.position_embeddings(torch.arange(tokens.shape[1], device=ids.device))

    def lm_logits(self, hidden: Tensor) -> Tensor:
        return self.lm_transform(hidden) @ self.word_embeddings.weight.t() + self.lm_bias

    def clamped_temperature(self) -> Tensor:
        return self.temperature.clamp(*TEMPERATURE_RANGE)


def bidirectional_mask(n_query: int, text_valid: Tensor) -> Tensor:
    """(B, Q + 1 + L, Q + 1 + L) bool: every position attends to every query and valid text token."""
    keys = torch.cat([text_valid.new_ones(text_valid.shape[0], n_query + 1), text_valid], dim=1).to(torch.bool)
    return keys[:, None, :].expand(-1, keys.shape[1], -1)


def multimodal_causal_mask(n_query: int, text_valid: Tensor) -> Tensor:
    """(B, Q + 1 + L, Q + 1 + L) bool, BLIP-2's ITG mask: queries attend to the queries only;
    a text position attends to every query and to the valid text up to itself."""
    batch, length = text_valid.shape[0], n_query + 1 + text_valid.shape[1]
    mask = bidirectional_mask(n_query, text_valid).clone()
    mask[:, :n_query, n_query:] = False
    causal = torch.ones(length - n_query, length - n_query, dtype=torch.bool, device=text_valid.device).tril()
    mask[:, n_query:, n_query:] &= causal.expand(batch, -1, -1)
    return mask


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    # A large negative instead of -inf: a padded text row that sees nothing stays finite.
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def run_qformer(
    connector: QFormerConnector,
    heads: RepresentationHeads,
    hidden: Tensor,
    mask: Tensor,
    n_query: int,
    image: Tensor | None = None,
    image_valid: Tensor | None = None,
) -> Tensor:
    """The connector's Q-Former over ``hidden`` (B, Q + T, width): ``n_query`` queries, then text.

    ``mask`` (B, Q + T, Q + T) says which positions each attends to in self-attention; the
    first ``n_query`` rows also cross-attend to ``image`` (B, S, vision_dim) where
    ``image_valid``, and go through the query feed-forward blocks, the text through
    ``heads``' text blocks. With text absent this is exactly ``connector.qformer``'s forward.
    """
    qformer = connector.qformer
    x = qformer.dropout(qformer.layernorm(hidden))
    self_bias = _additive(mask[:, None], x.dtype)
    cross_bias = None
    if n_query:
        if image is None or image_valid is None:
            raise ValueError("queries need the image tokens and their mask to cross-attend to")
        image = image.to(x.dtype)
        cross_bias = _additive(image_valid.to(torch.bool)[:, None, None, :], x.dtype)
    for i, layer in enumerate(qformer.encoder.layer):
        attended = layer.attention(x, attention_mask=self_bias)
        parts = []
        if n_query:
            queries = attended[:, :n_query]
            if layer.has_cross_attention:
                queries = layer.crossattention(queries, encoder_hidden_states=image, encoder_attention_mask=cross_bias)
            parts.append(layer.feed_forward_chunk_query(queries))
        if attended.shape[1] > n_query:
            text = attended[:, n_query:]
            parts.append(heads.text_output[i](heads.text_intermediate[i](text), text))
        x = torch.cat(parts, dim=1)
    return x


def hard_negative_pairs(similarity: Tensor, positives: Tensor) -> Tensor:
    """(N, 2) (image, caption) index pairs for ITM, drawn from the ITC ``similarity`` (B, B).

    For every caption one image and for every image one caption, sampled in proportion to
    ``softmax`` of the similarity over the entries that are not ``positives``; rows whose
    every entry is positive get none. Uses the global torch RNG (restored on resume).
    """
    pairs = []
    for sim, allowed, by_image in ((similarity.t(), ~positives.t(), False), (similarity, ~positives, True)):
        rows = allowed.any(dim=1).nonzero().flatten()
        if rows.numel() == 0:
            continue
        # Softmax over the allowed entries only: a row whose positive dominates could
        # otherwise underflow every negative to zero probability.
        weights = sim[rows].float().masked_fill(~allowed[rows], float("-inf")).softmax(dim=1)
        drawn = torch.multinomial(weights, 1).flatten()
        pairs.append(torch.stack([rows, drawn], dim=1) if by_image else torch.stack([drawn, rows], dim=1))
    if not pairs:
        return torch.zeros(0, 2, dtype=torch.long, device=similarity.device)
    return torch.cat(pairs)


def itc_similarity(image_feats: Tensor, text_feats: Tensor) -> Tensor:
    """(images, captions) similarity: for each pair, that of the query closest to the caption."""
    return torch.einsum("bqe,ce->bcq", image_feats, text_feats).amax(dim=-1)


def _soft_cross_entropy(logits: Tensor, positives: Tensor) -> Tensor:
    """Cross-entropy against a target spread evenly over each row's positives."""
    targets = positives.to(logits.dtype)
    return F.cross_entropy(logits, targets / targets.sum(dim=1, keepdim=True), label_smoothing=LABEL_SMOOTHING)


@dataclass
class RepresentationLosses:
    """The three losses of one batch, and (detached) the ITC features they came from:
    ``image_feats`` (B, Q, 256) per query, ``text_feats`` (B, 256) per caption."""

    itc: Tensor
    itm: Tensor
    itg: Tensor
    image_feats: Tensor
    text_feats: Tensor

    @property
    def total(self) -> Tensor:
        return self.itc + self.itm + self.itg


def representation_losses(
    connector: QFormerConnector,
    heads: RepresentationHeads,
    image: Tensor,
    image_valid: Tensor,
    text_ids: Tensor,
    text_valid: Tensor,
    positives: Tensor,
) -> RepresentationLosses:
    """ITC + ITM + ITG of a batch of B image–caption pairs.

    ``image`` (B, S, vision_dim) / ``image_valid`` (B, S) are the connector's merged,
    standardised inputs; ``text_ids`` / ``text_valid`` (B, L) the right-padded captions;
    ``positives`` (B, B) bool marks the image–caption pairs that belong together (the
    diagonal and every pair with the same caption or the same image).
    """
    batch, n_query = image.shape[0], connector.queries.shape[1]
    if positives.shape != (batch, batch) or not bool(positives.diagonal().all()):
        raise ValueError(f"positives must be a ({batch}, {batch}) bool matrix with a true diagonal")
    text_valid = text_valid.to(torch.bool)
    queries = connector.queries.expand(batch, -1, -1)

    # ITG, and the unimodal query outputs for ITC: under the multimodal causal mask the
    # queries never see the text, so their rows of this pass are the query-only forward.
    joint = torch.cat([queries, heads.embed_text(text_ids, heads.dec_token)], dim=1)
    out = run_qformer(connector, heads, joint, multimodal_causal_mask(n_query, text_valid), n_query, image, image_valid)
    # The output at [DEC] predicts the first word, each word's output the next one.
    logits = heads.lm_logits(out[:, n_query : n_query + text_ids.shape[1]])
    labels = text_ids.masked_fill(~text_valid, -100)
    itg = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=LABEL_SMOOTHING)

    image_feats = F.normalize(heads.vision_proj(out[:, :n_query]), dim=-1)
    caption = run_qformer(connector, heads, heads.embed_text(text_ids, heads.cls_token), bidirectional_mask(0, text_valid), 0)
    text_feat = F.normalize(heads.text_proj(caption[:, 0]), dim=-1)
    similarity = itc_similarity(image_feats, text_feat) / heads.clamped_temperature()
    itc = (_soft_cross_entropy(similarity, positives) + _soft_cross_entropy(similarity.t(), positives.t())) / 2

    with torch.no_grad():
        negatives = hard_negative_pairs(similarity.detach(), positives)
    own = torch.arange(batch, device=image.device)
    image_idx = torch.cat([own, negatives[:, 0]])
    text_idx = torch.cat([own, negatives[:, 1]])
    pair_text = heads.embed_text(text_ids[text_idx], heads.cls_token)
    pair = torch.cat([connector.queries.expand(len(image_idx), -1, -1), pair_text], dim=1)
    out = run_qformer(connector, heads, pair, bidirectional_mask(n_query, text_valid[text_idx]), n_query,
                      image[image_idx], image_valid[image_idx])
    itm_logits = heads.itm_head(out[:, :n_query]).mean(dim=1)
    itm_labels = torch.cat([own.new_ones(batch), own.new_zeros(len(negatives))])
    itm = F.cross_entropy(itm_logits, itm_labels)
    return RepresentationLosses(itc, itm, itg, image_feats.detach(), text_feat.detach())
