"""Subsampled randomized Hadamard transform: an implicit orthonormal basis, O(d log d) per
product, never materialised."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from qem.parameters import Layers
from qem.subspace.base import Subspace

_MAX_FACTOR_BITS = 7


@functools.lru_cache(maxsize=64)
def _sylvester(size: int, normalized: bool, dtype: torch.dtype, device: torch.device):
    """The Sylvester-Hadamard matrix H_size (entries +-1), divided by sqrt(size) if normalized."""
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(size) if normalized else h


def fwht(x: torch.Tensor, dim: int = -1, normalized: bool = False) -> torch.Tensor:
    """Fast Walsh-Hadamard transform H_n x along ``dim`` (n = 2^m), batched over the other
    dimensions; H_n x / sqrt(n) (orthogonal and symmetric) when ``normalized``.

    Uses H_{2^m} = H_{2^{c_1}} (x) ... (x) H_{2^{c_s}} with c_j <= 7: each factor is applied to
    one mixed-radix axis of x by a small matrix product, so the cost is n sum_j 2^{c_j} =
    O(n log n) multiply-adds in s = ceil(m / 7) BLAS calls (the radix-2 butterfly is c_j = 1,
    and is much slower in torch because each of its m passes allocates). Fastest when ``dim``
    is the leading, contiguous dimension.
    """
    y = x.movedim(dim, 0)
    n, rest = y.shape[0], y.shape[1:]
    if n & (n - 1) or n == 0:
        raise ValueError(f"fwht needs a power-of-two length, got {n}.")
    y = y.reshape(n, -1)
    m = n.bit_length() - 1
    steps = max(1, math.ceil(m / _MAX_FACTOR_BITS))
    stride = 1
    for j in range(steps):
        size = 1 << (m // steps + (j < m % steps))
        h = _sylvester(size, normalized, x.dtype, x.device)
        y = h @ y.reshape(n // (size * stride), size, -1)
        stride *= size
    return y.reshape(n, *rest).movedim(0, dim)


class SRHT(Subspace):
    """P = T^T E_S with T an orthogonal d x d randomized Hadamard transform, applied in
    O(d log d) and never stored.

    Construction (exact orthonormality for every d, no padding). Let n = 2^m be the largest
    power of two <= d, so n <= d < 2n, and let H_a = H_n/sqrt(n) (+) I_{d-n} act on the first n
    coordinates and H_b = I_{d-n} (+) H_n/sqrt(n) on the last n: two overlapping blocks that
    together cover all d coordinates. With Pi a random permutation and D_1, D_2 diagonals of
    random signs,

        T = H_b D_2 H_a D_1 Pi      (d not a power of two),
        T = H_n/sqrt(n) D_1 Pi      (d = n: the classic SRHT, Tropp 2011).

    Every factor is orthogonal, so T is. E_S (d x k) holds the unit columns e_s of a random
    k-subset S, and

        P^T g = (T g)_S,    P w = T^T (E_S w),    P^T P = E_S^T T T^T E_S = I_k

    exactly (up to float64 rounding). Every coordinate passes through at least one full n-point
    Hadamard transform after random signs, so T flattens any fixed vector as the classic SRHT
    does (entries O(sqrt(log d / n)) = O(sqrt(2 log d / d)) of its norm), in two n-point
    transforms per product. (Zero-padding to 2n and keeping d rows would break orthonormality;
    a block-diagonal Hadamard over the binary digits of d needs several permuted rounds to
    mix its small blocks and costs more.)
    """

    kind = "srht"

    def __init__(
        self,
        model: nn.Module,
        k: int | None = None,
        seed: int | None = None,
        parameter_names: list[str] | None = None,
        *,
        layers: Layers | None = None,
    ) -> None:
        super().__init__(model, k, parameter_names=parameter_names, seed=seed, layers=layers)
        d = self.d
        self.n = 1 << (d.bit_length() - 1)
        gen = self._generator()
        self.perm = torch.randperm(d, generator=gen).to(self.device)
        self.inverse_perm = torch.argsort(self.perm)
        count = 1 if self.n == d else 2
        self.signs = [
            (torch.randint(0, 2, (d, 1), generator=gen).to(torch.float64) * 2 - 1).to(self.device)
            for _ in range(count)
        ]
        self.selected = torch.randperm(d, generator=gen)[: self.k].sort().values.to(self.device)
        self.blocks = [0] if count == 1 else [0, d - self.n]  # start of each n-point transform

    def _hadamard(self, y: torch.Tensor, start: int) -> torch.Tensor:
        """y with rows start..start+n replaced by their normalised Hadamard transform; y is
        (d, N) and consumed (updated in place)."""
        y[start : start + self.n] = fwht(y[start : start + self.n], dim=0, normalized=True)
        return y

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """P^T g = (T g)_S. Works on the transposed layout (d, N) so that the permutation moves
        whole rows and the Hadamard blocks are contiguous."""
        x = self._vectors(g, self.d)
        y = x.reshape(-1, self.d).T.index_select(0, self.perm)
        for start, signs in zip(self.blocks, self.signs, strict=True):
            y = self._hadamard(y.mul_(signs), start)
        return y.index_select(0, self.selected).T.reshape(*x.shape[:-1], self.k).contiguous()

    def lift(self, w: torch.Tensor) -> torch.Tensor:
        """P w = T^T (E_S w) = Pi^T D_1 H_a D_2 H_b (E_S w) (the Hadamard blocks are symmetric)."""
        w = self._vectors(w, self.k)
        columns = w.reshape(-1, self.k).T
        y = columns.new_zeros((self.d, columns.shape[1]))
        y[self.selected] = columns
        for start, signs in zip(reversed(self.blocks), reversed(self.signs), strict=True):
            y = self._hadamard(y, start).mul_(signs)
        return y.index_select(0, self.inverse_perm).T.reshape(*w.shape[:-1], self.d).contiguous()

    def describe(self) -> dict:
        """The base description plus the Hadamard size n and where its blocks start."""
        return {**super().describe(), "hadamard_size": self.n, "block_starts": self.blocks}
