import math

import pytest
import torch
from torch import nn

from splitveil.metrics import (count_params, flops_per_image, image_metrics, latency_ms_per_image,
                               mean_intra_class_radius, payload_bytes, psnr_per_image, ssim_per_image)


def test_identical_images_mse0_ssim1():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    m = image_metrics(x, x.clone())
    assert m["mse"] == 0.0 and m["ssim"] == pytest.approx(1.0, abs=1e-9) and m["psnr"] == pytest.approx(100.0)


def test_known_error_gives_known_mse_and_psnr():
    x = torch.full((2, 1, 12, 12), 0.5)
    y = x + 0.1                                    # every pixel off by 0.1 -> MSE 0.01 -> PSNR 20 dB
    m = image_metrics(y, x)
    assert m["mse"] == pytest.approx(0.01, rel=1e-5) and m["psnr"] == pytest.approx(20.0, abs=1e-4)
    # per image, then averaged: one perfect and one 0.01-MSE image average to 0.005, PSNR mean of 100 and 20
    z = torch.stack([x[0], y[1]])
    assert image_metrics(z, x)["mse"] == pytest.approx(0.005)
    assert image_metrics(z, x)["psnr"] == pytest.approx(60.0)


def test_gaussian_noise_psnr_matches_sigma():
    g = torch.Generator().manual_seed(1)
    x = torch.full((4, 3, 64, 64), 0.5)
    y = x + 0.05 * torch.randn(x.shape, generator=g)
    expected = 10 * math.log10(1 / 0.05 ** 2)     # 26.02 dB
    assert float(psnr_per_image(y, x).mean()) == pytest.approx(expected, abs=0.1)


def test_ssim_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.image")
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 3, 32, 32, generator=g)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ours = ssim_per_image(y, x)
    ref = tm.structural_similarity_index_measure(y.double(), x.double(), data_range=1.0, reduction="none")
    assert torch.allclose(ours, ref, atol=1e-9)
    assert float(ours.max()) < 0.9


def test_metrics_reject_nan_and_shape_mismatch():
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="non-finite"):
        image_metrics(x * float("nan"), x)
    with pytest.raises(ValueError, match="same shape"):
        image_metrics(x, torch.rand(1, 1, 8, 9))


def test_cost_counts():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_params(conv) == 8 * 3 * 9
    assert flops_per_image(conv, (3, 10, 10)) == 2 * 8 * 3 * 9 * 100      # 2 FLOPs per multiply-add
    assert payload_bytes((8, 4, 4)) == 8 * 4 * 4 * 4
    assert latency_ms_per_image(conv, (3, 10, 10), batch_size=4, repeats=3, warmup=1) > 0


def test_intra_class_radius_hand_computed():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0], [5.0, 7.0], [5.0, 9.0]])
    y = torch.tensor([0, 0, 1, 1, 1])
    # class 0: centre (1,0), radii^2 1,1 -> 1; class 1: centre (5,7), radii^2 4,0,4 -> 8/3
    assert mean_intra_class_radius(z, y) == pytest.approx((1 + 8 / 3) / 2)
