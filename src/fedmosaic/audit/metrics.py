"""Reconstruction quality: MSE, PSNR, matching reconstructions to true samples, and a test of
whether recovered labels beat chance.

PSNR is ``10 * log10(data_range**2 / MSE)`` per sample (the image-restoration convention),
with ``data_range`` the span of valid feature values (1 for data scaled to [0, 1]).
"""

from __future__ import annotations

import math

import numpy as np
import torch

# A perfect reconstruction has MSE 0 and infinite PSNR; cap it so that reports stay finite
# JSON (float32 round-off alone puts exact recoveries near 110 dB for data in [0, 1]).
PSNR_CAP_DB = 100.0


def per_sample_mse(reconstructed: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample (first axis), as float64."""
    if reconstructed.shape != true.shape:
        raise ValueError(f"shapes differ: {tuple(reconstructed.shape)} vs {tuple(true.shape)}")
    diff = reconstructed.double() - true.double()
    return diff.flatten(1).pow(2).mean(1)


def psnr(mse: torch.Tensor, data_range: float) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for each MSE, capped at ``PSNR_CAP_DB``."""
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    floor = data_range**2 * 10 ** (-PSNR_CAP_DB / 10)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(floor))


def match_to_truth(reconstructed: torch.Tensor, true: torch.Tensor) -> np.ndarray:
    """The assignment of reconstructions to true samples with the least total MSE.

    A batch attack recovers samples in no particular order; ``perm[i]`` is the reconstruction
    matched to true sample ``i`` (Hungarian algorithm on the pairwise MSE matrix).
    """
    from scipy.optimize import linear_sum_assignment

    if len(reconstructed) != len(true):
        raise ValueError(f"{len(reconstructed)} reconstructions for {len(true)} samples")
    r = reconstructed.double().flatten(1)
    t = true.double().flatten(1)
    cost = torch.cdist(t, r).pow(2) / r.shape[1]
    rows, cols = linear_sum_assignment(cost.numpy())
    perm = np.empty(len(true), dtype=np.int64)
    perm[rows] = cols
    return perm


def above_chance_p_value(correct: int, trials: int, num_classes: int) -> float:
    """One-sided binomial test: P(at least ``correct`` of ``trials`` right by guessing).

    Guessing means picking one of ``num_classes`` labels uniformly, right with probability
    ``1/num_classes``. A small value says the attack recovers labels better than chance.
    """
    if not 0 <= correct <= trials:
        raise ValueError(f"need 0 <= correct <= trials, got {correct} of {trials}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    p = 1.0 / num_classes
    return float(sum(math.comb(trials, k) * p**k * (1 - p) ** (trials - k)
                     for k in range(correct, trials + 1)))
