"""The trainable pretraining model and its momentum (key) networks."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from slidevl.slidellm.encoder.batch import TopoPackBatch
from slidevl.slidellm.encoder.config import TopoPackConfig
from slidevl.slidellm.encoder.model import TopoPackEncoder
from slidevl.slidellm.pretrain.config import PretrainConfig
from slidevl.slidellm.pretrain.mae import MAEDecoder, MAEMask
from slidevl.slidellm.pretrain.moco import MoCoQueue, ProjectionHead, momentum_copy, momentum_update


class PretrainModel(nn.Module):
    """Encoder + MAE decoder + MoCo projection head; one forward serves both tasks.

    A single ``forward(task, ...)`` lets a DistributedDataParallel wrapper see every
    call, so gradients are synchronised whichever loss is active.
    """

    def __init__(self, encoder_config: TopoPackConfig, config: PretrainConfig) -> None:
        super().__init__()
        self.encoder = TopoPackEncoder(encoder_config)
        self.decoder = MAEDecoder(
            encoder_config.d_model,
            encoder_config.patch_dim,
            encoder_config.pack_size,
            d_model=config.decoder_dim,
            n_layers=config.decoder_layers,
            n_heads=config.decoder_heads,
            ffn_dim=4 * config.decoder_dim,
            pos_encoding=encoder_config.pos_encoding,
            impl=encoder_config.attention_impl,
            chunk_elements=encoder_config.chunk_elements,
        )
        self.head = ProjectionHead(encoder_config.d_model, encoder_config.d_model, config.moco_dim)

    def forward(self, task: str, batch: TopoPackBatch, mask: MAEMask | None = None) -> Tensor:
        """``"mae"``: (B, P, k², D) patch predictions; ``"moco"``: (B, P, dim) unit summary embeddings."""
        if task == "mae":
            if mask is None:
                raise ValueError("the MAE task needs a mask")
            encoded = self.encoder(batch, patch_keep=mask.patch_keep, summary_keep=mask.summary_keep)
            return self.decoder(encoded, batch, mask)
        if task == "moco":
            return self.head(self.encoder(batch).summary_tokens)
        raise ValueError(f"unknown pretraining task {task!r}")


class MomentumNetworks(nn.Module):
    """Key encoder and key head (momentum copies) plus the negative queue."""

    def __init__(self, model: PretrainModel, config: PretrainConfig) -> None:
        super().__init__()
        self.encoder = momentum_copy(model.encoder)
        self.head = momentum_copy(model.head)
        self.queue = MoCoQueue(config.moco_queue, config.moco_dim)

    def train(self, mode: bool = True) -> "MomentumNetworks":
        # Keys are computed without dropout whatever mode the trainer sets.
        super().train(False)
        return self

    @torch.no_grad()
    def keys(self, batch: TopoPackBatch) -> Tensor:
        """(B, P, dim) unit key embeddings of every summary token."""
        return self.head(self.encoder(batch).summary_tokens)

    @torch.no_grad()
    def update(self, model: PretrainModel, momentum: float) -> None:
        momentum_update(model.encoder, self.encoder, momentum)
        momentum_update(model.head, self.head, momentum)


def models_from_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[PretrainModel, MomentumNetworks, PretrainConfig]:
    """Rebuild the pretraining model and momentum networks saved in a checkpoint folder."""
    from slidevl.slidellm.pretrain.checkpoint import load_checkpoint

    ckpt = load_checkpoint(directory, map_location)
    model = PretrainModel(ckpt.encoder_config, ckpt.config)
    momentum = MomentumNetworks(model, ckpt.config)
    model.load_state_dict({k[len("model.") :]: v for k, v in ckpt.weights.items() if k.startswith("model.")}, strict=True)
    momentum.load_state_dict({k[len("momentum.") :]: v for k, v in ckpt.weights.items() if k.startswith("momentum.")}, strict=True)
    return model.to(map_location), momentum.to(map_location), ckpt.config
