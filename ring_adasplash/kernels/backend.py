"""The seam between the schedule (``algorithm.py``) and the kernels: one ``Problem`` per query block
and key block, and the ``Backend`` protocol that ``torch_blockwise`` (PyTorch, any device) and
``triton_backend`` (Triton kernels) implement.

Tensors come in the public layout (batch, seqlen, heads, head_dim) with any strides; per-row
results are head-major (batch, heads, seqlen_q, ...); per-tile results are (batch, heads, nQ, nK)
over tiles of ``block_m`` queries by ``block_n`` keys. GQA: query head ``h`` reads key head
``h // (heads_q // heads_kv)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from .block_mask import BlockMask
from .entmax_spec import EntmaxSpec
from .visibility import Visibility

BACKEND_ENV = "RING_ADASPLASH_BACKEND"
# candidate slots per row of the Triton Newton schedule (``triton_backend.candidate_slots``)
CANDIDATES_ENV = "RING_ADASPLASH_CANDIDATES"
BACKEND_CHOICES = ("auto", "torch", "triton")


@dataclass(frozen=True, eq=False)
class Problem:
    """One query block against one key block: what every pass reads, built once per key block.

    ``q`` (B, Sq, Hq, D); ``k``, ``v`` (B, Sk, Hkv, D) (``v`` None for the passes that read no
    values); ``vis``: which keys each query sees; ``softmax_scale`` multiplies ``q . k``.
    ``shift`` (B, Hq, Sq): the raw score ``q . k`` subtracted before scaling, so that the passes
    after the max pass read ``z = scale_z * (q . k - shift)`` (``stats.Relative``: the row's score
    max, 0 on rows without one); None for the max pass, which reads raw scores.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor | None
    vis: Visibility
    spec: EntmaxSpec
    softmax_scale: float
    block_m: int
    block_n: int
    shift: torch.Tensor | None = None

    # derived from the shapes once, in __post_init__
    batch: int = field(init=False)
    seqlen_q: int = field(init=False)
    seqlen_k: int = field(init=False)
    heads: int = field(init=False)
    heads_kv: int = field(init=False)
    head_dim: int = field(init=False)
    group: int = field(init=False)  # query heads per key head
    num_q_tiles: int = field(init=False)
    num_k_tiles: int = field(init=False)

    def __post_init__(self):
        batch, seqlen_q, heads, head_dim = self.q.shape
        seqlen_k, heads_kv = self.k.shape[1], self.k.shape[2]
        derived = dict(batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads=heads, heads_kv=heads_kv,
                       head_dim=head_dim, group=heads // heads_kv, num_q_tiles=-(-seqlen_q // self.block_m),
                       num_k_tiles=-(-seqlen_k // self.block_n))
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    def scale_z_at(self, like: torch.Tensor) -> float | torch.Tensor:
        """The factor from ``q . k`` to the entmax logit z, as it meets ``like`` (B, Hq, ...)
        (``EntmaxSpec.scale_z_at``)."""
        return self.spec.scale_z_at(self.softmax_scale, like)

    @property
    def rows(self) -> tuple[int, int, int]:
        """Shape of a per-row result, (B, Hq, Sq)."""
        return (self.batch, self.heads, self.seqlen_q)

    @property
    def tiles(self) -> tuple[int, int, int, int]:
        """Shape of a per-tile result, (B, Hq, nQ, nK)."""
        return (self.batch, self.heads, self.num_q_tiles, self.num_k_tiles)

    def block_mask(self, tiles: torch.Tensor, visible: torch.Tensor | None = None) -> BlockMask:
        """``tiles`` (B, Hq, nQ, nK) bool as a ``BlockMask`` of this problem's tiling."""
        return BlockMask(tiles, self.block_m, self.block_n, self.seqlen_q, self.seqlen_k, visible)


class Maxima(NamedTuple):
    """What the max pass of one key block gives. The first two are in raw score units (``q . k``,
    before any scale), so that nothing depends on a constant added to a row's scores
    (``stats.Relative`` turns them into z relative to the row max).

    ``score_max``: (B, H, Sq) running max of the raw score over the visible keys of this and
    earlier blocks; -inf where none; +inf where one of them is not finite (NaN or inf in q or k).
    ``tau_floor``: (B, H, Sq) a lower bound of tau as a raw score: the tau of the row's visible keys
    in the last two key tiles of its query tile's span (of the first block; under causal, the
    diagonal and the tile before it), less ``stats.FLOOR_MARGIN`` in z and two float ulps of their
    max: tau only grows as keys are added, since each adds to ``sum (z - t)_+^gamma``. -inf where
    those tiles hold no visible key of the row.
    ``gap_codes``: (B, H, nQ, nK) uint8 per tile, the one-byte code (``stats.encode_gaps``) of its
    gap, in z: max over its rows of (the row's largest z in the tile -
    ``stats.gap_reference(running max, tau floor)`` just after the tile); ``stats.GAP_NONE`` where
    the tile has no visible pair.
    """

    score_max: torch.Tensor
    tau_floor: torch.Tensor
    gap_codes: torch.Tensor


class OutputSums(NamedTuple):
    """What the output pass of one key block adds (all additive across key blocks).

    ``out`` (B, Sq, Hq, D) = sum p v; ``out_u`` (B, Sq, Hq, D) = sum u v; ``u_sum`` (B, Hq, Sq) =
    sum u; ``support`` (B, Hq, Sq) = number of keys with p > 0 (float32; float64 for float64
    inputs); ``nonzero`` (B, Hq, nQ, nK) bool: tiles holding any p > 0. ``out_u`` and ``u_sum``
    are what the backward needs: None where the pass was asked for the output alone.
    """

    out: torch.Tensor
    out_u: torch.Tensor | None
    u_sum: torch.Tensor | None
    support: torch.Tensor
    nonzero: torch.Tensor


class OutputRequest(NamedTuple):
    """What the output pass is to compute (``Backend.output_pass``'s arguments), told to
    ``Backend.newton_schedule`` so that a backend that holds each row's keys with p > 0 there can
    compute their output at once (``PartialOutput``)."""

    backward_sums: bool
    out_dtype: torch.dtype | None
    alpha_sums: bool = False  # also the forward's part of dL/dalpha, where the backend can (``AlphaSplit``)


class AlphaSplit(NamedTuple):
    """The forward's part of the row sums of dL/dalpha (``EntmaxSpec.alpha_terms``), ``sum_j (g_j
    - delta) c_j`` with ``c = p (1 - log gap)``, split as ``dO . out_c - delta c_sum``: ``out_c``
    (B, Sq, Hq, D) float32 = sum c v and ``c_sum`` (B, Hq, Sq) = sum c, on the rows of the query
    tiles not marked in ``open`` ((B, Hq, nQ) int8; the backward sums the marked ones term by
    term)."""

    out_c: torch.Tensor
    c_sum: torch.Tensor
    open: torch.Tensor


class PartialOutput(NamedTuple):
    """Output sums that ``newton_schedule`` computed: ``sums`` (as ``output_pass`` gives them) are
    final on the rows of every query tile not marked in ``open`` ((B x Hq x nQ) int8, 1: still to
    compute); ``output_pass(..., partial=)`` computes those into the same tensors. ``alpha``: with
    ``OutputRequest.alpha_sums``, the ``AlphaSplit`` of the same query tiles, else None."""

    sums: OutputSums
    open: torch.Tensor
    alpha: AlphaSplit | None = None


class Gradients(NamedTuple):
    """What the backward pass of one key block gives: dq (B, Sq, Hq, D) of this block's keys,
    dk and dv (B, Sk, Hkv, D), delta (B, Hq, Sq), the row term (given or computed), and where
    asked (``alpha_sums``) the row sums of ``EntmaxSpec.alpha_gradient`` over this block's keys
    (B, Hq, Sq), else None."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    delta: torch.Tensor
    alpha_sums: torch.Tensor | None = None


class Backend(Protocol):
    """The passes of the algorithm over one ``Problem`` (see ``algorithm.py`` for their order).
    Each backend is a module that defines these names (a module satisfies a Protocol).

    Every pass reads only the tiles its ``BlockMask`` names; tiles it does not read count as zero.
    """

    NAME: str
    BLOCK_M: int
    BLOCK_N: int

    def problem(self, q, k, v, vis: Visibility, spec: EntmaxSpec, softmax_scale: float,
                shift: torch.Tensor | None = None) -> Problem:
        """The per-block problem in this backend's form (checked; derived launch data cached)."""

    def max_pass(self, problem: Problem, score_max=None, tau_floor=None) -> Maxima:
        """The dense pass over raw scores (``problem.shift`` None), nearest key tiles first:
        running score max from ``score_max`` (the max over earlier key blocks) or from -inf; the
        tau floor of this block unless ``tau_floor`` is given (every block after the first); tile
        gaps against ``stats.gap_reference`` of the two."""

    def relative(self, score_max, tau_floor, spec: EntmaxSpec, softmax_scale: float):
        """``stats.relative`` of the merged score max and the tau floor (the max pass's, raw), with
        ``spec``'s scale of z."""

    def lower_bound_mask(self, gap_codes, lower, reference, empty, within=None) -> torch.Tensor:
        """``stats.lower_bound_mask`` with this backend's query tiles: (B, H, nQ, nK) bool, the tiles
        whose gap code may exceed the smallest ``lower - reference`` among their rows, and among
        the tiles of ``within`` ((B, H, nQ, nK) bool) where it is given."""

    def histogram_pass(self, problem: Problem, row_max, tau_floor, gap_codes, tiles: BlockMask):
        """Coarse counts ``hist`` (B, H, Sq, NUM_BINS) of the keys of ``tiles`` in the bins
        ``stats.kept_bins`` keeps, against ``stats.bin_reference(row_max)`` (``row_max``, ``tau_floor``:
        ``stats.Relative``, z relative to the max over every key block, so histograms of all
        blocks add exactly); returns ``(hist, gap_codes)``: the tile gaps' codes
        (``stats.encode_gaps``) with ``stats.GAP_ZERO`` on the visible tiles where no row has a kept
        key. From here on every pass reads ``problem.shift``."""

    def fine_histogram_pass(self, problem: Problem, tiles: BlockMask, bin_index, cutoff):
        """alpha 1.5 and 2: the sums of ``stats.fine_tau`` (B, H, Sq, 3, FINE_BINS + 1) over
        ``tiles``, of the keys at or above ``cutoff`` (B, H, Sq; keys below have p = 0), and
        ``keep`` (B, H, nQ, nK) bool: tiles where some row has such a key no lower than one coarse
        bin below the pair starting at ``bin_index``. Returns ``(sums, keep)``."""

    def newton_sums_pass(self, problem: Problem, tiles: BlockMask, point, rows=None):
        """(B, H, Sq, 2) float64 ``sum (z - t)_+^gamma, sum (z - t)_+^(gamma - 1)`` at ``t = point``
        over ``tiles``; with ``rows`` (B, H, Sq) bool, only the query tiles holding a marked row
        read their key tiles (zeros elsewhere), without a mask of their own."""

    def newton_step(self, state, sums, spec: EntmaxSpec, tolerance: float, step_tolerance: float):
        """``stats.newton_step`` on a ``stats.NewtonState`` with the merged Newton sums (the
        Triton backend in one launch, updating the state's tensors in place)."""

    def newton_polish(self, problem: Problem, tiles: BlockMask, state, steps: int) -> torch.Tensor:
        """``steps`` Newton steps (``newton_sums_pass`` and ``newton_step``, no stopping rule) on the
        rows of a ``stats.NewtonState`` not done, for a query block that holds all its keys: the
        last point (B, H, Sq) float64 (the Triton backend in one launch, in place)."""

    def newton_schedule(self, problem: Problem, tiles: BlockMask, reference, row_max, tolerance: float,
                        step_tolerance: float, output: OutputRequest | None = None):
        """Every step of the Newton schedule for a query block that holds all its keys, from the
        max pass's ``reference`` (``stats.gap_reference``) and relative ``row_max`` (NaN on rows
        that see a score that is not finite), over ``tiles``: ``(tau, keep, partial)``, tau (B, H,
        Sq) float64 and (B, H, nQ, nK) bool, the tiles that may hold p > 0
        (``torch_blockwise.newton_schedule``; the Triton backend in one launch), and, where
        ``output`` asks and the backend can, a ``PartialOutput`` (``problem.v`` given), else None."""

    def output_pass(self, problem: Problem, tau, tiles: BlockMask, backward_sums: bool = True,
                    out_dtype=None, partial: PartialOutput | None = None) -> OutputSums:
        """Partial output for a known ``tau`` over ``tiles``; rows whose tau is NaN (they see a
        score that is not finite) come out NaN. ``backward_sums``: also ``out_u`` and ``u_sum``
        (a call with no backward to come leaves out their product with V). ``out_dtype``: the
        dtype of ``out`` where it is final (one key block), and of ``out_u`` then (only the
        backward's row term reads it); default float32 (float64 for float64 inputs). ``partial``:
        what ``newton_schedule`` computed for the same request; only its open query tiles run."""

    def backward_pass(self, problem: Problem, grad_out, tau, tiles: BlockMask, delta=None, out_u=None, u_sum=None,
                      kv_grad_dtype=None, alpha_sums: bool = False, q_grad_dtype=None,
                      alpha_split: AlphaSplit | None = None) -> Gradients:
        """Gradients through the ``tiles`` of one key block; dq is NaN on rows whose tau is NaN
        (they see a score that is not finite), dk and dv on the keys such a row sees, as in dense
        attention.
        ``delta`` None: computed from ``out_u`` and ``u_sum`` (the merged forward row terms).
        ``kv_grad_dtype``, ``q_grad_dtype``: the dtype of dk and dv, and of dq, where they are final
        (one key block); default float32. ``alpha_sums``: also the row sums the gradient with respect to alpha needs
        (``Gradients.alpha_sums``), from ``alpha_split`` where the forward computed its part (one
        key block: its sums are the row's)."""

    def coarse_bracket(self, stats, spec: EntmaxSpec):
        """``stats.coarse_bracket``: where tau lies after the coarse counts."""

    def fine_tau(self, bracket, fine, spec: EntmaxSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """``stats.fine_tau``: tau (B, H, Sq) float32 from the fine sums (alpha 1.5 and 2), and
        the rows where it is exact (``stats.two_point_exact``, bool)."""


def backend_for(x: torch.Tensor) -> Backend:
    """The backend for tensors like ``x``: the Triton kernels for CUDA tensors, PyTorch otherwise,
    and always PyTorch for float64 (no kernel computes in float64).
    ``RING_ADASPLASH_BACKEND=triton`` runs the Triton kernels on CPU tensors under
    ``TRITON_INTERPRET=1`` (tests do); ``=torch`` forces the PyTorch path."""
    choice = os.environ.get(BACKEND_ENV, "auto")
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(BACKEND_CHOICES)}; got {choice!r}")
    if x.dtype != torch.float64 and (choice == "triton" or (choice == "auto" and x.is_cuda)):
        from . import triton_backend

        return triton_backend
    from . import torch_blockwise

    return torch_blockwise
