"""alpha-entmax over the last axis of a 2-D tensor: one program per row (``entmax_function``'s
forward on CUDA tensors).

Notation of ``stats.py``: ``z = (alpha - 1) (x - max x)`` (so the row max is z = 0 and tau lies in
[-1, 0]), ``p = [z - tau]_+ ** gamma``. Newton steps on the gamma-norm of the gaps
(``stats.newton_update``), from t = -1, on exact sums over the whole row: a step from below never
passes tau and the steps converge quadratically (at alpha 2 they are the sort-free sparsemax
iteration, which reaches the exact support in finitely many steps). A program stops when a step
moves t by at most ``tolerance`` or after ``MAX_STEPS``; p is then normalised by its sum, which
removes the last rounding of tau, as the PyTorch path does. Rows of at most ``BLOCK`` entries
stay in registers (``ONE_BLOCK``); longer rows are read block by block at every step.

A row holding NaN comes out NaN; a row of -inf (nothing to attend to) comes out NaN as well, as
softmax gives.
"""
import triton
import triton.language as tl

from .triton_common import ADD, MAX, entmax_weights
from .triton_tau import one_minus_root


@triton.jit
def _block_sums(z, t, gamma, POWER: tl.constexpr):
    """``sum (z - t)_+^gamma`` and ``sum (z - t)_+^(gamma - 1)`` over one block of z."""
    p, u = entmax_weights(tl.maximum(z - t, 0.0), gamma, POWER)
    return tl.reduce(p, 0, ADD), tl.reduce(u, 0, ADD)


@triton.jit
def _logits(X, start, num_cols, top, scale_z, BLOCK: tl.constexpr):
    """z of the entries [start, start + BLOCK) of the row at ``X`` (-inf past its end)."""
    cols = start + tl.arange(0, BLOCK)
    x = tl.load(X + cols, mask=cols < num_cols, other=float("-inf")).to(tl.float32)
    return (x - top) * scale_z


@triton.jit
def entmax_rows_kernel(X, P, num_cols, stride_x, stride_p, scale_z, gamma, tolerance,
                       POWER: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,
                       MAX_STEPS: tl.constexpr):
    """``P[row] = entmax(X[row])`` for the row of this program; see the module doc."""
    row = tl.program_id(0).to(tl.int64)
    X = X + row * stride_x
    P = P + row * stride_p
    cols = tl.arange(0, BLOCK)
    # the row's max and whether it holds a NaN (MAX drops NaN)
    top = tl.full([], float("-inf"), tl.float32)
    nans = tl.full([], 0, tl.int32)
    for start in range(0, num_cols, BLOCK):
        x = tl.load(X + start + cols, mask=start + cols < num_cols, other=float("-inf")).to(tl.float32)
        top = tl.maximum(top, tl.reduce(x, 0, MAX))
        nans += tl.reduce((x != x).to(tl.int32), 0, ADD)
    finite = (top > float("-inf")) & (top < float("inf"))
    top = tl.where(finite, top, 0.0)
    if ONE_BLOCK:
        z_row = _logits(X, 0, num_cols, top, scale_z, BLOCK)
    t = tl.full([], -1.0, tl.float32)  # tau >= max - 1
    moved = tl.full([], 1.0, tl.float32)
    step = tl.full([], 0, tl.int32)
    while (step < MAX_STEPS) & (moved > tolerance):
        if ONE_BLOCK:
            f, df = _block_sums(z_row, t, gamma, POWER)
        else:
            f = tl.full([], 0.0, tl.float32)
            df = tl.full([], 0.0, tl.float32)
            for start in range(0, num_cols, BLOCK):
                f_block, df_block = _block_sums(_logits(X, start, num_cols, top, scale_z, BLOCK), t, gamma, POWER)
                f += f_block
                df += df_block
        new = t + one_minus_root(tl.maximum(f, 1e-30), gamma, POWER) * f / tl.maximum(df, 1e-30)
        new = tl.where((df > 0) & (new == new), tl.minimum(new, 0.0), t)  # tau < max: z = 0
        moved = tl.abs(new - t)
        t = new
        step += 1
    if ONE_BLOCK:
        p_row, _ = entmax_weights(tl.maximum(z_row - t, 0.0), gamma, POWER)
        total = tl.reduce(p_row, 0, ADD)
        p_row = tl.where(finite & (nans == 0), p_row / total, float("nan"))
        tl.store(P + cols, p_row.to(P.dtype.element_ty), mask=cols < num_cols)
    else:
        total = tl.full([], 0.0, tl.float32)
        for start in range(0, num_cols, BLOCK):
            p_block, _ = entmax_weights(tl.maximum(_logits(X, start, num_cols, top, scale_z, BLOCK) - t, 0.0), gamma,
                                        POWER)
            total += tl.reduce(p_block, 0, ADD)
        for start in range(0, num_cols, BLOCK):
            p_block, _ = entmax_weights(tl.maximum(_logits(X, start, num_cols, top, scale_z, BLOCK) - t, 0.0), gamma,
                                        POWER)
            p_block = tl.where(finite & (nans == 0), p_block / total, float("nan"))
            tl.store(P + start + cols, p_block.to(P.dtype.element_ty), mask=start + cols < num_cols)
