"""The math of combining LoRA updates of one target: exact concatenation, low-rank compression, TIES and DARE.

Every function takes *terms*: ``(A, B, c)`` triples with A of shape [r, in], B of shape [out, r] and a coefficient
c = wᵢ·sᵢ (the input's weight times its LoRA scale), standing for the update c·B·A in the math layout [out, in].

- :func:`concatenate` is exact: Σ cᵢ Bᵢ Aᵢ = [c₁B₁ … cₙBₙ] · [A₁; …; Aₙ], of rank R = Σ rᵢ.
- :func:`compress_factors` truncates that sum to a lower rank *without forming the [out, in] matrix*: with the thin
  QR factorisations B = Q_B R_B and Aᵀ = Q_A R_A, B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ, so the SVD of the small R×R core
  R_B R_Aᵀ = U Σ Vᵀ gives the SVD of B·A = (Q_B U) Σ (Q_A V)ᵀ in O((out+in)·R² + R³) operations.
- :func:`ties_delta` and :func:`dare_delta` are defined on the dense deltas (the papers' task vectors), so they form
  the [out, in] matrix of each input; :func:`compress_dense` then re-factorises the result.

By Eckart-Young, keeping the top r singular values is the best rank-r approximation in Frobenius norm, and the error
is exactly the norm of the discarded ones: ‖ΔW − ΔW_r‖_F = √(Σ_{i>r} σᵢ²). Both factors get √σ ("balanced" split).
All of it runs in float64; callers store the factors in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

COMPUTE_DTYPE = torch.float64

Term = tuple[torch.Tensor, torch.Tensor, float]


@dataclass
class LowRank:
    """Factors of a (possibly truncated) update, with how far the truncation is from the exact one."""

    a: torch.Tensor  #: [rank, in]
    b: torch.Tensor  #: [out, rank]
    absolute_error: float  #: ‖ΔW − B·A‖_F
    norm: float  #: ‖ΔW‖_F of the exact update

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def relative_error(self) -> float:
        return self.absolute_error / self.norm if self.norm > 0 else 0.0


def concatenate(terms: Sequence[Term]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B·A = Σ cᵢ Bᵢ Aᵢ exactly: the coefficients are folded into B."""
    a = torch.cat([a.to(COMPUTE_DTYPE) for a, _, _ in terms], dim=0)
    b = torch.cat([b.to(COMPUTE_DTYPE) * c for _, b, c in terms], dim=1)
    return a, b


def dense_deltas(terms: Sequence[Term]) -> list[torch.Tensor]:
    """Each term's cᵢ·Bᵢ·Aᵢ as an [out, in] matrix (for the methods defined on dense deltas)."""
    return [(b.to(COMPUTE_DTYPE) @ a.to(COMPUTE_DTYPE)) * c for a, b, c in terms]


def compress_factors(a: torch.Tensor, b: torch.Tensor, rank: int | None = None, tol: float | None = None) -> LowRank:
    """Best approximation of B·A of rank ``rank`` (or the smallest rank with relative error ≤ ``tol``), from the
    factors alone."""
    q_b, r_b = torch.linalg.qr(b.to(COMPUTE_DTYPE))  # [out, m], [m, R]
    q_a, r_a = torch.linalg.qr(a.to(COMPUTE_DTYPE).T)  # [in, n], [n, R]
    u, sigma, v_t = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # the small core, at most R×R
    return _truncate(q_b @ u, sigma, v_t @ q_a.T, rank, tol)


def compress_dense(delta: torch.Tensor, rank: int | None = None, tol: float | None = None) -> LowRank:
    """Best approximation of the [out, in] matrix ``delta`` of rank ``rank`` (or meeting ``tol``)."""
    u, sigma, v_t = torch.linalg.svd(delta.to(COMPUTE_DTYPE), full_matrices=False)
    return _truncate(u, sigma, v_t, rank, tol)


def chosen_rank(sigma: torch.Tensor, rank: int | None, tol: float | None) -> int:
    """``rank`` (at most the number of singular values), or the smallest rank ≥ 1 whose discarded singular values
    have a norm ≤ tol·‖σ‖."""
    if tol is None:
        return max(1, min(int(rank), sigma.numel()))
    energy = sigma.square()
    # tail[r] = Σ_{i≥r} σᵢ², the squared error of keeping the first r values (tail[len] = 0)
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    allowed = (tol * math.sqrt(float(energy.sum()))) ** 2
    meeting = torch.nonzero(tail <= allowed).flatten()
    return max(1, int(meeting[0]))


def _truncate(left: torch.Tensor, sigma: torch.Tensor, right_t: torch.Tensor, rank, tol) -> LowRank:
    r = chosen_rank(sigma, rank, tol)
    root = sigma[:r].sqrt()
    return LowRank(
        a=root[:, None] * right_t[:r],
        b=left[:, :r] * root,
        absolute_error=math.sqrt(float(sigma[r:].square().sum())),
        norm=math.sqrt(float(sigma.square().sum())),
    )


def keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ⌊density·n⌋ largest-magnitude entries set to zero (TIES step 1, "trim")."""
    keep = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    if keep:
        mask[torch.topk(delta.abs().flatten(), keep).indices] = True
    return delta * mask.view_as(delta)


def ties_delta(deltas: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023, §3): trim each weighted delta to its top-``density`` magnitudes, elect a sign
    per entry from the sum of the trimmed deltas, and average, per entry, the trimmed values that agree with it."""
    trimmed = torch.stack([keep_largest(d, density) for d in deltas])
    elected = torch.where(trimmed.sum(dim=0) >= 0, 1.0, -1.0).to(trimmed.dtype)
    agrees = torch.sign(trimmed) == elected  # zeros (trimmed away) never agree
    return (trimmed * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)


def dare_delta(deltas: Sequence[torch.Tensor], density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al. 2023, "Language Models are Super Mario", eq. 2): drop each entry of each delta with
    probability 1 − density, rescale the kept ones by 1/density so the expectation is unchanged, and add."""
    total = torch.zeros_like(deltas[0])
    for delta in deltas:
        kept = torch.bernoulli(torch.full_like(delta, density), generator=generator)
        total += delta * kept / density
    return total
