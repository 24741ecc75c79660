"""Metrics: image quality of reconstructions, edge cost, representation probes."""
from .cost import count_params, edge_cost, flops_per_image, latency_ms_per_image, payload_bytes
from .image import image_metrics, mse_per_image, psnr_per_image, ssim_per_image
from .probes import (decision_entropy_bound, feature_entropy_bound, global_variance, intra_class_radius,
                     mean_intra_class_radius, probe_values)

__all__ = ["count_params", "edge_cost", "flops_per_image", "latency_ms_per_image", "payload_bytes",
           "image_metrics", "mse_per_image", "psnr_per_image", "ssim_per_image", "global_variance",
           "intra_class_radius", "mean_intra_class_radius", "probe_values", "feature_entropy_bound",
           "decision_entropy_bound"]
