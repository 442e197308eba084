"""How LoRA updates of one target combine: a registry of composition methods, one function and its options each.

Every method takes *terms*: ``(A, B, c, w)`` with A of shape [r, in], B of shape [out, r] and a coefficient
c = wᵢ·sᵢ (the input's weight times its LoRA scale), standing for the update c·B·A in the math layout [out, in], and
wᵢ alone (what TIES may divide by), and returns factors :class:`LowRank` of the combined update.

- ``concat`` is exact: Σ cᵢ Bᵢ Aᵢ = [c₁B₁ … cₙBₙ] · [A₁; …; Aₙ], of rank R = Σ rᵢ.
- ``svd`` truncates that sum to a lower rank *without forming the [out, in] matrix*: with the thin QR
  factorisations B = Q_B R_B and Aᵀ = Q_A R_A, B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ, so the SVD of the small R×R core
  R_B R_Aᵀ = U Σ Vᵀ gives the SVD of B·A = (Q_B U) Σ (Q_A V)ᵀ in O((out+in)·R² + R³) operations.
- ``ties`` and ``dare`` are defined on the dense deltas (the papers' task vectors), so they form the [out, in] matrix
  of each input, then re-factorise the result by SVD. TIES's last step, the disjoint merge, divides the sum of the
  agreeing deltas, per entry, by (``normalise``) the *count* of inputs that agree (``count``: Yadav et al. 2023,
  Algorithm 1 — "disjoint mean" over the set of agreeing models — the default), by the sum of their *weights*
  (``weights``: mergekit's ``ties``, a weighted mean; the same as ``count`` when every weight is 1), or not at all
  (``none``: mergekit's ``dare_ties``, whose ``normalize`` is off by default: the sum of the agreeing deltas).

By Eckart-Young, keeping the top r singular values is the best rank-r approximation in Frobenius norm, and the error
is exactly the norm of the discarded ones: ‖ΔW − ΔW_r‖_F = √(Σ_{i>r} σᵢ²). Both factors get √σ ("balanced" split).
All of it runs in float64 numpy; callers store the factors in float32 (``concat``, exact, stacks straight into float32,
each cᵢBᵢ computed in float64 first).

Adding a method: one function ``(terms, request, rng) -> LowRank`` and one :data:`METHODS` entry naming its options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from adapterkit.errors import RequestError

Term = tuple[np.ndarray, np.ndarray, float, float]  #: (A, B, c = w·s, w)
#: how TIES's disjoint merge divides the agreeing sum (see the module docstring)
TIES_NORMALISATIONS = ("count", "weights", "none")


@dataclass
class LowRank:
    """Factors of a (possibly truncated) update, with how far the truncation is from the exact one."""

    a: np.ndarray  #: [rank, in]
    b: np.ndarray  #: [out, rank]
    absolute_error: float = 0.0  #: ‖ΔW − B·A‖_F
    norm: float = 0.0  #: ‖ΔW‖_F of the exact update

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def relative_error(self) -> float:
        return self.absolute_error / self.norm if self.norm > 0 else 0.0


def _f64(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)


def concatenate(terms: Sequence[Term], dtype=np.float64, b_order: str = "C") -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with B·A = Σ cᵢ Bᵢ Aᵢ exactly: the coefficients are folded into B. One pass over each input, cast and
    scaled straight into the stacked arrays of ``dtype``; each cᵢBᵢ is computed in float64 whatever ``dtype``. B is
    laid out in ``b_order`` (``F`` for LAPACK, which works on columns)."""
    rank = sum(int(a.shape[0]) for a, *_ in terms)
    a = np.empty((rank, terms[0][0].shape[1]), dtype)
    b = np.empty((terms[0][1].shape[0], rank), dtype, order=b_order)
    row = 0
    for a_i, b_i, c, *_ in terms:
        rows = slice(row, row + a_i.shape[0])
        a[rows] = a_i
        np.multiply(b_i, c, out=b[:, rows], dtype=np.float64)  # as _f64(b_i) * c, then cast to dtype
        row = rows.stop
    return a, b


def dense_deltas(terms: Sequence[Term]) -> list[np.ndarray]:
    """Each term's cᵢ·Bᵢ·Aᵢ as an [out, in] matrix (for the methods defined on dense deltas)."""
    return [(_f64(term[1]) @ _f64(term[0])) * term[2] for term in terms]


def compress_factors(a: np.ndarray, b: np.ndarray, rank: int | None = None, tol: float | None = None) -> LowRank:
    """Best approximation of B·A of rank ``rank`` (or the smallest rank with relative error ≤ ``tol``), from the
    factors alone."""
    q_b = Householder(_f64(b))  # Q_B [out, m], R_B [m, R]
    q_a = Householder(_f64(a).T)  # Q_A [in, n], R_A [n, R]
    u, sigma, v_t = np.linalg.svd(q_b.r @ q_a.r.T, full_matrices=False)  # the small core, at most R×R
    r = chosen_rank(sigma, rank, tol)
    root = np.sqrt(sigma[:r])
    # only the kept r columns of Q_B·U and rows of Vᵀ·Q_Aᵀ are formed
    return LowRank(a=root[:, None] * q_a.times_transpose(v_t[:r]), b=q_b.times(u[:, :r]) * root,
                   absolute_error=math.sqrt(float(np.square(sigma[r:]).sum())),
                   norm=math.sqrt(float(np.square(sigma).sum())))


class Householder:
    """The thin QR factorisation X = Q·R of an [m, n] matrix by Householder reflections (LAPACK's geqrf, the one
    ``np.linalg.qr`` calls: the same R, bit for bit), with Q kept as its k = min(m, n) reflectors instead of formed.

    Forming Q (``np.linalg.qr``'s orgqr) would cost about as much again as the factorisation (both column by column:
    LAPACK's unblocked path for fewer than 128 columns, memory-bound on the tall, narrow stacks of LoRA factors), and
    only r ≤ k of its combinations are needed. So Q is applied in the compact WY form of Schreiber and Van Loan (1989),
    Q = H₁⋯H_k = I − V·T·Vᵀ, with T upper triangular and T⁻¹ = striu(VᵀV) + diag(1/τ) (Puglisi 1992; Joffrain et al.
    2006): two matrix products per use.
    """

    def __init__(self, x: np.ndarray) -> None:
        h, tau = np.linalg.qr(x, mode="raw")  # h is the transpose of LAPACK's [m, n] output
        packed = h.T  # [m, n]: R on and above the diagonal, the reflectors below (overwritten with V below)
        m, n = packed.shape
        k = min(m, n)
        self.r = np.triu(packed[:k])  # [k, n], as np.linalg.qr's
        square = packed[:k, :k]
        square[...] = np.tril(square, -1) + np.eye(k)  # vᵢ has a unit i-th entry
        kept = tau != 0  # τᵢ = 0: Hᵢ = I (the column was already reduced), left out of the product
        self.v = packed[:, :k] if kept.all() else packed[:, :k][:, kept]  # [m, k']
        self.top = self.v[:k]  # [k, k']: the rows that meet [z; 0]
        t_inverse = np.triu(self.v.T @ self.v, 1)
        t_inverse[np.diag_indices_from(t_inverse)] = 1.0 / tau[kept]
        self.t_inverse = t_inverse
        self.m, self.k = m, k

    def times(self, z: np.ndarray) -> np.ndarray:
        """Q·z for z of shape [k, p]: [z; 0] − V·T·(Vᵀ[z; 0]), shape [m, p]."""
        if not self.v.shape[1]:
            return np.concatenate([z, np.zeros((self.m - self.k, z.shape[1]))])
        out = self.v @ -np.linalg.solve(self.t_inverse, self.top.T @ z)
        out[: self.k] += z
        return out

    def times_transpose(self, x: np.ndarray) -> np.ndarray:
        """x·Qᵀ for x of shape [p, k]: [x, 0] − ((x·V_top)·Tᵀ)·Vᵀ, shape [p, m] (C-contiguous)."""
        if not self.v.shape[1]:
            return np.concatenate([x, np.zeros((x.shape[0], self.m - self.k))], axis=1)
        out = -np.linalg.solve(self.t_inverse, self.top.T @ x.T).T @ self.v.T
        out[:, : self.k] += x
        return out


def compress_dense(delta: np.ndarray, rank: int | None = None, tol: float | None = None) -> LowRank:
    """Best approximation of the [out, in] matrix ``delta`` of rank ``rank`` (or meeting ``tol``)."""
    u, sigma, v_t = np.linalg.svd(_f64(delta), full_matrices=False)
    return _truncate(u, sigma, v_t, rank, tol)


def chosen_rank(sigma: np.ndarray, rank: int | None, tol: float | None) -> int:
    """``rank`` (at most the number of singular values), or the smallest rank ≥ 1 whose discarded singular values
    have a norm ≤ tol·‖σ‖."""
    if tol is None:
        return max(1, min(int(rank), sigma.size))
    energy = np.square(sigma)
    # tail[r] = Σ_{i≥r} σᵢ², the squared error of keeping the first r values (tail[len] = 0)
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    allowed = (tol * math.sqrt(float(energy.sum()))) ** 2
    return max(1, int(np.flatnonzero(tail <= allowed)[0]))


def _truncate(left: np.ndarray, sigma: np.ndarray, right_t: np.ndarray, rank, tol) -> LowRank:
    r = chosen_rank(sigma, rank, tol)
    root = np.sqrt(sigma[:r])
    return LowRank(a=root[:, None] * right_t[:r], b=left[:, :r] * root,
                   absolute_error=math.sqrt(float(np.square(sigma[r:]).sum())),
                   norm=math.sqrt(float(np.square(sigma).sum())))


def keep_largest(delta: np.ndarray, density: float) -> np.ndarray:
    """``delta`` with all but its ⌊density·n⌋ largest-magnitude entries set to zero (TIES step 1, "trim")."""
    keep = int(density * delta.size)
    mask = np.zeros(delta.size, dtype=bool)
    if keep:
        mask[np.argpartition(np.abs(delta).reshape(-1), delta.size - keep)[delta.size - keep:]] = True
    return delta * mask.reshape(delta.shape)


def ties_delta(deltas: Sequence[np.ndarray], density: float, weights: Sequence[float] | None = None,
               normalise: str = "count") -> np.ndarray:
    """TIES-Merging (Yadav et al. 2023, §3): trim each weighted delta to its top-``density`` magnitudes, elect a sign
    per entry from the sum of the trimmed deltas, and add, per entry, the trimmed values that agree with it, divided
    by their count (``normalise="count"``, the paper's disjoint mean), by the sum of their inputs' ``weights``
    (``"weights"``, mergekit's ``ties``; a divisor of 0 counts as 1, as there) or by nothing (``"none"``)."""
    if normalise not in TIES_NORMALISATIONS:
        raise RequestError(f"unknown TIES normalisation {normalise!r} (known: {', '.join(TIES_NORMALISATIONS)})")
    trimmed = np.stack([keep_largest(d, density) for d in deltas])
    elected = np.where(trimmed.sum(axis=0) >= 0, 1.0, -1.0)
    agrees = np.sign(trimmed) == elected  # zeros (trimmed away) never agree
    total = (trimmed * agrees).sum(axis=0)
    if normalise == "none":
        return total
    if normalise == "weights":
        shape = (-1,) + (1,) * (trimmed.ndim - 1)
        divisor = (np.asarray(weights, dtype=np.float64).reshape(shape) * agrees).sum(axis=0)
        return total / np.where(divisor == 0, 1.0, divisor)
    return total / np.maximum(agrees.sum(axis=0), 1)


def dare_delta(deltas: Sequence[np.ndarray], density: float, rng: np.random.Generator) -> np.ndarray:
    """DARE (Yu et al. 2023, "Language Models are Super Mario", eq. 2): drop each entry of each delta with
    probability 1 − density, rescale the kept ones by 1/density so the expectation is unchanged, and add."""
    total = np.zeros_like(deltas[0])
    for delta in deltas:
        kept = rng.random(delta.shape) < density
        total += delta * kept / density
    return total


# -- the methods --------------------------------------------------------------------------------------------------------


def _concat(terms, request, rng) -> LowRank:
    return LowRank(*concatenate(terms, np.float32))  # exact: straight into the stored dtype


def _svd(terms, request, rng) -> LowRank:
    # B in columns and A in rows: both stacks are read by LAPACK as they lie (Aᵀ in columns), no transposing copy
    return compress_factors(*concatenate(terms, b_order="F"), rank=request.rank, tol=request.tol)


def _ties(terms, request, rng) -> LowRank:
    delta = ties_delta(dense_deltas(terms), request.density, [term[3] for term in terms], request.normalise)
    return compress_dense(delta, rank=request.rank, tol=request.tol)


def _dare(terms, request, rng) -> LowRank:
    return compress_dense(dare_delta(dense_deltas(terms), request.density, rng), rank=request.rank, tol=request.tol)


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    combine: Callable  #: (terms, request, rng) -> LowRank
    exact: bool = False
    random: bool = False  #: draws from the rng: its targets must be combined one after the other, in order
    #: the request's options it reads (rank, tol, density, seed, normalise); ``required`` must be given
    options: tuple[str, ...] = ()
    required: tuple[str, ...] = ()


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("concat", "exact, rank Σrᵢ", _concat, exact=True),
    Method("svd", "compress to --rank/--tol from the factors, never forming ΔW", _svd, options=("rank", "tol")),
    Method("ties", "TIES-Merging of the dense deltas (needs --density; --ties-normalise), then compress", _ties,
           options=("rank", "tol", "density", "normalise"), required=("density",)),
    Method("dare", "DARE drop-and-rescale of the dense deltas (needs --density), then compress", _dare,
           random=True, options=("rank", "tol", "density", "seed"), required=("density",)),
)}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise RequestError(f"unknown composition method {name!r} (known: {', '.join(METHODS)})") from None
