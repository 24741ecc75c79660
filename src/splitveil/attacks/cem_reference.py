"""The CEM reference code's attacker (xiasong0501/CEM, behind Table 1 of Xia et al., CVPR 2025) as named
settings of the inverse-network and GAN attacks (docs/cem.md):

- ``inverse_network_cem``: the inverse network in the reference's *inference-time* mode (fit on a seeded 90% of
  the test split, attack the other 10%), a residual decoder of 8 blocks x 64 channels, batch 256, 50 epochs,
  the *last* epoch kept (the reference does no held-out epoch selection);
- ``gan_cem``: the GAN attack with the same mode, decoder, batch and selection, warm-started from an inverse
  network of that architecture fitted 50 epochs.

They are the registered attacks ``inverse_network`` and ``gan`` with other defaults (every field can still be
set), so a config names the reference's attacker in one word and the records say which attacker ran. The
decoder is splitveil's residual decoder at the reference's depth and width, not the reference's layer for
layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import ATTACKS
from .gan import GanAttack, GanParams
from .inverse_network import InverseNetworkAttack, InverseNetworkParams

# the reference attacker's setting (field -> value), shared by both attacks below
CEM_REFERENCE = {"mode": "inference-time", "arch": "residual", "channels": 64, "blocks": 8, "batch_size": 256,
                 "select": "last", "epochs": 50}


@dataclass
class CEMReferenceInverseParams(InverseNetworkParams):
    epochs: int = 50
    batch_size: int = 256
    arch: Literal["residual", "plain", "ir"] = "residual"
    channels: int | None = 64
    blocks: int = 8
    select: Literal["best", "last"] = "last"
    mode: Literal["training-time", "inference-time"] = "inference-time"


@dataclass
class CEMReferenceGanParams(GanParams):
    batch_size: int = 256
    arch: Literal["residual", "plain", "ir"] = "residual"
    channels: int | None = 64
    blocks: int = 8
    select: Literal["best", "last"] = "last"
    mode: Literal["training-time", "inference-time"] = "inference-time"
    init_epochs: int | None = 50      # the warm start: an inverse network of this setting, 50 epochs


@ATTACKS.register("inverse_network_cem", "the CEM reference's attacker: inverse network, inference-time mode, "
                  "8 residual blocks x 64 channels, batch 256, last epoch")
class CEMReferenceInverseAttack(InverseNetworkAttack):
    Params = CEMReferenceInverseParams


@ATTACKS.register("gan_cem", "GAN attack in the CEM reference's setting (inference-time mode, 8 blocks x 64 "
                  "channels, batch 256, last epoch), warm-started from such an inverse network")
class CEMReferenceGanAttack(GanAttack):
    Params = CEMReferenceGanParams
