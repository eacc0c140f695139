"""Frechet distance (FID) and kernel inception distance (KID) between two sets of features, in float64.

FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), with the trace of the square root computed exactly but
without scipy.linalg.sqrtm (its complex round-off, its trouble with the singular covariances of a few hundred
images, and its cost: minutes per call on a small CPU at d = 2048):
- from statistics: S1 = L L^T (Cholesky), and S1 S2 is similar to the PSD matrix L^T S2 L, so the trace is
  sum sqrt(eigvalsh(L^T S2 L)); a singular S1 uses its eigendecomposition square root instead of L;
- from features when N <= d: with centred features A (n1, d), B (n2, d) scaled by 1/sqrt(n - 1), S1 = A^T A and
  S2 = B^T B, and tr((S1 S2)^1/2) is the nuclear norm of A B^T (n1 x n2): exact and fast.
FID is biased upwards at small N; KID (Binkowski et al. 2018) is unbiased: the MMD^2 with the polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets (as torch-fidelity and clean-fid compute it). Both sets must
be independent samples: subsets drawn from one set twice overlap and read below 0.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
_GRAM_LIMIT = 4096  # up to this many features per set, the kernel matrices are computed once for all subsets
ArrayLike = np.ndarray | Tensor


def _float64(array: ArrayLike) -> Tensor:
    """Any array -> float64 CPU tensor."""
    return torch.as_tensor(np.asarray(array) if not isinstance(array, Tensor) else array).detach().cpu().double()


def feature_statistics(features: ArrayLike) -> tuple[Tensor, Tensor]:
    """(N, D) features -> mean (D,) and covariance (D, D) (unbiased, N - 1), float64."""
    x = _float64(features)
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D) for a covariance, got shape {tuple(x.shape)}")
    centred = x - x.mean(dim=0)
    return x.mean(dim=0), centred.T @ centred / (x.shape[0] - 1)


def _sqrt_factor(sigma: Tensor) -> Tensor:
    """F with F F^T = sigma: Cholesky when sigma is positive definite, else the symmetric PSD square root."""
    factor, info = torch.linalg.cholesky_ex(sigma)
    if int(info) == 0:
        return factor
    values, vectors = torch.linalg.eigh(sigma)
    return (vectors * values.clamp(min=0.0).sqrt()) @ vectors.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), float64."""
    mu1, mu2, sigma1, sigma2 = map(_float64, (mu1, mu2, sigma1, sigma2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu1 {tuple(mu1.shape)}, sigma1 {tuple(sigma1.shape)}, "
                         f"mu2 {tuple(mu2.shape)}, sigma2 {tuple(sigma2.shape)}")
    factor = _sqrt_factor((sigma1 + sigma1.T) / 2)
    middle = factor.T @ sigma2 @ factor  # (d, d) PSD, similar to sigma1 @ sigma2
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0.0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2.0 * trace_sqrt)


def fid_from_features(feats1: ArrayLike, feats2: ArrayLike) -> float:
    """FID between two (N, D) feature sets; equals frechet_distance of their statistics, computed in the N-space
    (nuclear norm) when both sets have at most D features."""
    x, y = _float64(feats1), _float64(feats2)
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"expected two (N >= 2, D) feature sets of the same D, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if max(len(x), len(y)) > x.shape[1]:
        return frechet_distance(*feature_statistics(x), *feature_statistics(y))
    a = (x - x.mean(dim=0)) / (len(x) - 1) ** 0.5  # (n1, d): S1 = a^T a
    b = (y - y.mean(dim=0)) / (len(y) - 1) ** 0.5  # (n2, d): S2 = b^T b
    trace_sqrt = torch.linalg.svdvals(a @ b.T).sum()  # tr((S1 S2)^1/2) = ||a b^T||_*
    mean_term = (x.mean(dim=0) - y.mean(dim=0)).square().sum()
    return float(mean_term + a.square().sum() + b.square().sum() - 2.0 * trace_sqrt)


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3 for all pairs: (n, d), (m, d) -> (n, m)."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    m = kxx.shape[0]
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.mean())


def kid(feats1: ArrayLike, feats2: ArrayLike, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = 0) -> tuple[float, float]:
    """Kernel inception distance: (mean, std) of the unbiased MMD^2 over `subsets` random subsets of
    min(subset_size, N1, N2) features drawn without replacement from each set (seeded)."""
    # numpy, not torch: torch's many small multi-threaded ops are slow on a busy CPU
    x, y = _float64(feats1).numpy(), _float64(feats2).numpy()
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected two (N, D) feature sets of the same D, got {x.shape} and {y.shape}")
    m = min(int(subset_size), len(x), len(y))
    if m < 2 or subsets < 1:
        raise ValueError(f"KID needs subsets >= 1 of at least 2 features per set, got {subsets} subsets of {m}")
    full = max(len(x), len(y)) <= _GRAM_LIMIT
    if full:
        gram_xx, gram_yy, gram_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        i = np.sort(rng.choice(len(x), m, replace=False))
        j = np.sort(rng.choice(len(y), m, replace=False))
        if full:
            blocks = gram_xx[np.ix_(i, i)], gram_yy[np.ix_(j, j)], gram_xy[np.ix_(i, j)]
        else:
            blocks = polynomial_kernel(x[i], x[i]), polynomial_kernel(y[j], y[j]), polynomial_kernel(x[i], y[j])
        values.append(_mmd2_unbiased(*blocks))
    return float(np.mean(values)), float(np.std(values))
