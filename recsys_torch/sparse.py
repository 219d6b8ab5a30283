"""Sparse products shared by the losses, the models and ALS.

* :func:`csr`: a CSR tensor, without torch's "sparse CSR support is in beta" warning (we use a stable
  corner of it: construction, ``sampled_addmm`` and CSR x dense).
* :func:`transposed`: the same cells column-major, for a ``A^T @ x`` that is a CSR product too: a
  prebuilt transpose is 7 to 10 times faster on the CPU than the CSC product ``A.t() @ x``.
* :func:`csr_dots` / :class:`Pairs`: the dot products ``<left[r], right[c]>`` over a set of (r, c)
  cells as one sampled product (SDDMM) forward and two sparse products backward, never gathering a
  ``[cells, d]`` tensor of rows (several times faster than gathers on the CPU).
* :class:`SparseMatrix`: ``A @ x`` for a fixed ``A`` and an ``x`` that needs a gradient.
"""

from __future__ import annotations

import warnings

import torch


def csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def transposed(crow: torch.Tensor, col: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(crow_t, col_t, order_t)``: the cells of the CSR pattern (``crow``, ``col``) column-major;
    ``order_t[k]`` is the position in the CSR sequence of the transpose's k-th cell (its values are
    ``values[order_t]``)."""
    n_rows = len(crow) - 1
    rows = torch.repeat_interleave(torch.arange(n_rows, device=crow.device), crow[1:] - crow[:-1])
    order_t = torch.argsort(col * n_rows + rows)
    crow_t = torch.cat([crow.new_zeros(1), torch.cumsum(torch.bincount(col, minlength=n_cols), 0)])
    return crow_t, rows.index_select(0, order_t), order_t


class _CsrDots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, left, right, crow, col, transpose):
        ctx.save_for_backward(left, right)
        ctx.pattern = (crow, col, transpose)
        pattern = csr(crow, col, left.new_ones(len(col)), (len(left), len(right)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.sparse.sampled_addmm(pattern, left.contiguous(), right.T, beta=0.0).values()

    @staticmethod
    def backward(ctx, grad):
        left, right = ctx.saved_tensors
        crow, col, transpose = ctx.pattern
        grad_left = grad_right = None
        if ctx.needs_input_grad[0]:
            grad_left = csr(crow, col, grad, (len(left), len(right))) @ right
        if ctx.needs_input_grad[1]:
            if transpose is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    grad_right = csr(crow, col, grad, (len(left), len(right))).t() @ left
            else:
                crow_t, col_t, order_t = transpose
                grad_right = csr(crow_t, col_t, grad.index_select(0, order_t), (len(right), len(left))) @ left
        return grad_left, grad_right, None, None, None


def csr_dots(left: torch.Tensor, right: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
             transpose: tuple | None = None) -> torch.Tensor:
    """``<left[r], right[col[k]]>`` for every cell k of the CSR pattern (``crow``, ``col``), in CSR
    order. ``transpose`` (:func:`transposed` of the pattern) makes the backward to ``right`` a CSR
    product; without it, a CSC one (no setup, slower per call)."""
    return _CsrDots.apply(left, right, crow, col, transpose)


class Pairs:
    """A batch's (row, column) pairs, in any order and possibly repeated, as a CSR pattern and its
    transpose, built once for every :meth:`dots` over them."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int) -> None:
        self.order = torch.argsort(rows * n_cols + cols)  # the pairs row-major
        self.crow = torch.cat([rows.new_zeros(1), torch.cumsum(torch.bincount(rows, minlength=n_rows), 0)])
        self.col = cols.index_select(0, self.order)
        self.transpose = transposed(self.crow, self.col, n_cols)

    def dots(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``<left[rows[b]], right[cols[b]]>`` for every pair b, in the pairs' own order."""
        values = csr_dots(left, right, self.crow, self.col, self.transpose)
        return values.new_zeros(values.shape).index_copy(0, self.order, values)


class SparseMatrix:
    """A fixed sparse ``A`` (CSR ``crow``, ``col``, ``values``, ``shape``): ``A(x) = A @ x`` with
    ``A^T @ grad`` backward, the transpose built once."""

    def __init__(self, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape) -> None:
        crow_t, col_t, order_t = transposed(crow, col, shape[1])
        self.a = csr(crow, col, values, shape)
        self.a_t = csr(crow_t, col_t, values.index_select(0, order_t), (shape[1], shape[0]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _Product.apply(x, self)


class _Product(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, matrix):
        ctx.matrix = matrix
        return matrix.a @ x

    @staticmethod
    def backward(ctx, grad):
        return ctx.matrix.a_t @ grad.contiguous(), None
