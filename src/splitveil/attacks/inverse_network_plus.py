"""The Golden Partition Zone paper's enhanced inversion model: the inverse-network decoder with attention
blocks between its upsampling stages (weak-to-strong: Attention-as-Conv + SE early, large-kernel attention +
multi-scale channel attention late, optional multi-head self-attention) and attacker-side feature
enhancements of z (global normalisation, FFT view, dropout-regularised NN enrichment). Every part is
switchable; the training objective (MSE), optimiser, schedule, loop, held-out epoch selection, budgets and
checkpoints are the inverse network's, so the two compare at equal steps. The normalisation of z is per
channel with statistics over the attacker's own features (as the GPZ reference does), not per sample (which
would discard each image's brightness and contrast)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..params import require
from .base import ATTACKS
from .blocks import (AttentionAsConv, FeatureEnhancer, LargeKernelAttention, MultiHeadSelfAttention,
                     MultiScaleChannelAttention, SqueezeExcitation)
from ..models.decoder import InversionDecoder, auto_width
from .inverse_network import InverseNetworkAttack, InverseNetworkParams


@dataclass
class InverseNetworkPlusParams(InverseNetworkParams):
    # attention blocks (weak -> strong): the first half of the stages gets the early blocks, the rest the late
    attention_as_conv: bool = True   # early
    squeeze_excitation: bool = True  # early
    large_kernel: bool = True        # late
    multi_scale_channel: bool = True  # late
    self_attention: bool = False     # multi-head self-attention (costly: ~10x training time in the paper)
    mhsa_heads: int = 4
    mhsa_max_positions: int = 256    # self-attention only on stages with at most this many positions
    # feature enhancements of z (attacker side)
    normalize: Literal["channel", "sample", "none"] = "channel"  # channel: per-channel statistics of the attacker's features
    fft: Literal["none", "residual", "concat"] = "none"
    nn_enrich: Literal["none", "residual", "concat"] = "concat"
    enrich_dropout: float = 0.1
    enrich_hidden: int = 64

    def validate(self) -> None:
        super().validate()
        require(0.0 <= self.enrich_dropout < 1.0, "enrich_dropout", "must be in [0, 1)")
        require(self.enrich_hidden >= 1, "enrich_hidden", "must be >= 1")
        require(self.mhsa_heads >= 1, "mhsa_heads", "must be >= 1")
        require(self.arch != "ir", "arch", "ir has no stages for the attention blocks; use residual or plain "
                "(or inverse_network / gan with arch: ir)")


def count_stages(feature_shape: tuple[int, ...], image_shape: tuple[int, int, int], channels: int | None) -> int:
    """Number of stage_hook calls the decoder will make (the stem plus one per upsampling)."""
    calls = []
    InversionDecoder(feature_shape, image_shape, channels or 8, stage_hook=lambda c, s: calls.append(s) or nn.Identity())
    return len(calls)


@ATTACKS.register("inverse_network_plus", "GPZ-enhanced inverse network: attention blocks between upsampling "
                  "stages (weak-to-strong) and feature enhancements of z, each switchable")
class InverseNetworkPlusAttack(InverseNetworkAttack):
    Params = InverseNetworkPlusParams

    def stage_blocks(self, channels: int, size: int, stage: int, n_stages: int) -> nn.Module:
        p = self.params
        early = stage < n_stages / 2
        blocks: list[nn.Module] = []
        if early:
            if p.attention_as_conv:
                blocks.append(AttentionAsConv(channels))
            if p.squeeze_excitation:
                blocks.append(SqueezeExcitation(channels))
        else:
            if p.large_kernel:
                blocks.append(LargeKernelAttention(channels))
            if p.multi_scale_channel:
                blocks.append(MultiScaleChannelAttention(channels))
        if p.self_attention and size * size <= p.mhsa_max_positions:
            blocks.append(MultiHeadSelfAttention(channels, p.mhsa_heads))
        return nn.Sequential(*blocks) if blocks else nn.Identity()

    def build_decoder(self, feature_shape: tuple[int, ...], image_shape: tuple[int, int, int]) -> nn.Module:
        p = self.params
        enhancer = FeatureEnhancer(feature_shape, p.normalize, p.fft, p.nn_enrich, p.enrich_dropout, p.enrich_hidden)
        with torch.no_grad():
            enhancer.eval()
            shape = tuple(enhancer(torch.zeros(2, *feature_shape)).shape[1:])
            enhancer.train()
        n_stages = count_stages(shape, image_shape, p.channels)
        counter = iter(range(n_stages))
        # the width follows the transmitted features (not the enhanced, concatenated ones)
        c_in = feature_shape[0] if len(feature_shape) == 3 else None
        width = p.channels or (auto_width(c_in) if c_in else None)
        if p.arch == "plain":
            width = width or 128
        decoder = InversionDecoder(shape, image_shape, width, p.activation, arch=p.arch, blocks=p.blocks,
                                   stage_hook=lambda c, s: self.stage_blocks(c, s, next(counter), n_stages))
        return nn.Sequential(enhancer, decoder)

    def calibrate(self, z: torch.Tensor) -> None:
        """Per-channel statistics of the attacker's transmitted features for the normalisation of z."""
        self.decoder[0].set_statistics(z)
