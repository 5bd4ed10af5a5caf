"""Triton backend against the PyTorch spec (``torch_blockwise``) and the float64 reference.

CPU: the kernels run under Triton's interpreter. ``TRITON_INTERPRET`` is read when a kernel is
decorated, so the ``interpreted`` fixture sets it and re-imports the kernel modules (and re-imports
them compiled again afterwards, so GPU tests in the same process get real kernels).

Tolerances. On CPU, fp32 inputs multiply in float32 in both backends (the interpreter's tl.dot is a
float32 numpy matmul; the spec is a float32 torch matmul), so only the summation order differs: z
agrees to a few ulps. Hence row maxima and moments to ~1e-6 relative, tau to 1e-5, and histogram
counts (and the fine sub-bin counts) exactly except where a logit lies within a few ulps of a bin edge (z (NUM_BINS - 1) an
integer up to rounding) and the two summation orders round it to different sides: we allow a
handful of such flips and check that each flipped key really lies at an edge. GPU tests use bf16 and
fp16 inputs against the float64 reference: 2e-2 relative.
"""
from __future__ import annotations

import functools
import importlib
import math

import pytest
import torch

pytest.importorskip("triton")

from helpers import random_qkv  # noqa: E402
from kernel_helpers import problem, statistics_pass  # noqa: E402
from ring_adasplash import DeviceAlpha, adasplash_func, adasplash_varlen_func  # noqa: E402
from ring_adasplash.kernels import EntmaxSpec  # noqa: E402
from ring_adasplash.kernels import algorithm as A  # noqa: E402
from ring_adasplash.kernels import stats as S  # noqa: E402
from ring_adasplash.kernels import triton_common, triton_maxima  # noqa: E402
from ring_adasplash.kernels import torch_blockwise as TB  # noqa: E402
from ring_adasplash.kernels.visibility import causal_visibility, padded_visibility, varlen_visibility  # noqa: E402
from ring_adasplash.reference import entmax_attention_reference  # noqa: E402

# numpy warns on inf - inf of masked logits inside the interpreter; the kernels select those away
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

KERNEL_MODULES = ("triton_common", "triton_maxima", "triton_histogram", "triton_refine", "triton_output",
                  "triton_backward", "triton_tau", "triton_newton", "triton_candidates", "triton_tiles",
                  "triton_backend")  # dependency order


def _reload_kernels():
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"ring_adasplash.kernels.{name}")
        importlib.reload(module)
    return importlib.import_module("ring_adasplash.kernels.triton_backend")


def _interpreter_indexes_loaded_scalars() -> bool:
    """Triton's interpreter before 3.7 turns a scalar loaded from memory into a 1-element array and
    calls int() on it for ``range``; NumPy 2.3 and later refuse that (only 0-d arrays convert)."""
    import numpy
    import triton

    def major_minor(version):
        return tuple(int(part) for part in version.split(".")[:2])

    return major_minor(triton.__version__) >= (3, 7) or major_minor(numpy.__version__) < (2, 3)


@pytest.fixture(scope="module")
def interpreted():
    """The Triton backend with interpreted kernels, selected for CPU tensors."""
    if not _interpreter_indexes_loaded_scalars():
        pytest.skip("Triton < 3.7's interpreter cannot run these kernels with NumPy >= 2.3 "
                    "(int() of a 1-element array); the compiled kernels are tested on the GPU")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mp.setenv("RING_ADASPLASH_BACKEND", "triton")
        backend = _reload_kernels()
        # pinned: the test inputs are a few key tiles long, so with a positive FEW_TILES every query
        # tile of the one-launch Newton schedule would take the sweeps, none the candidates
        backend.FEW_TILES = 0
        backend.CROWDED_RATIO = 0  # likewise: their few keys would spill every flat row's query tile
        yield backend
    _reload_kernels()  # compiled again for whatever runs next


_qkv = functools.partial(random_qkv, amp=1.5)


SHAPES = [  # batch, seqlen_q, seqlen_k, heads, heads_kv, dim, causal
    (1, 64, 64, 2, 2, 16, True),
    (2, 100, 130, 4, 2, 32, True),
    (1, 130, 100, 4, 1, 16, False),
    (2, 130, 64, 2, 1, 32, True),
]


def _edge_distance(z: torch.Tensor) -> torch.Tensor:
    scaled = z.double() * (S.NUM_BINS - 1)
    return (scaled - scaled.round()).abs()


def _check_lists(m, counts, index, compact=False):
    """``index`` has a slot per tile, or ``compact``, as many as the longest row needs rounded up
    to a multiple of 16 (at most a slot per tile)."""
    width = min(-(-max(int(m.sum(-1).max()), 1) // 16) * 16, m.shape[-1]) if compact else m.shape[-1]
    assert counts.shape == m.shape[:-1] and index.shape == (*m.shape[:-1], width) and counts.dtype == torch.int32
    assert index.dtype == (torch.int16 if m.shape[-1] < 2**15 else torch.int32)
    assert torch.equal(counts, m.sum(-1, dtype=torch.int32))
    for row, n, flags in zip(index.reshape(-1, width), counts.flatten(), m.reshape(-1, m.shape[-1])):
        assert torch.equal(row[:n].long(), flags.nonzero().flatten())


def _tile_lists():
    """``triton_tiles.tile_lists`` of the (re)loaded module: interpreted inside the fixture."""
    return importlib.import_module("ring_adasplash.kernels.triton_tiles").tile_lists


def test_tile_lists(interpreted):
    """Per row of a block mask (also a transposed view, and rows longer than one chunk): the
    number of True entries and their positions, ascending; with ``columns_too``, the same of the
    transposed mask from the same launch (masks wider than tall and taller than wide)."""
    gen = torch.Generator().manual_seed(11)
    mask = torch.rand(2, 3, 5, 40, generator=gen) < 0.3
    mask[0, 0, 0] = False
    mask[1, 2, 4] = True
    mask[0, 1, :, 7] = False  # an empty column
    long = torch.rand(1, 2, 3, 2500, generator=gen) < 0.1
    for m in (mask, mask.transpose(-1, -2), long):
        counts, index = _tile_lists()(m)
        _check_lists(m, counts, index)
    for m in (mask, mask.transpose(-1, -2)):
        counts, index, counts_t, index_t = _tile_lists()(m, columns_too=True)
        _check_lists(m, counts, index)
        _check_lists(m.transpose(-1, -2), counts_t, index_t)


def test_tile_lists_from_bits(interpreted, monkeypatch):
    """Lists built from the bits of a mask (``packed_cols``, as ``block_mask.pack_tiles`` gives
    them) equal those of the bool mask, rows and columns, full and compact, with a column count
    that is not a multiple of 8 and rows longer than one chunk."""
    from ring_adasplash.kernels.block_mask import pack_tiles

    tiles = importlib.import_module("ring_adasplash.kernels.triton_tiles")
    gen = torch.Generator().manual_seed(14)
    mask = torch.rand(2, 3, 6, 43, generator=gen) < 0.3
    mask[1, 2, 3, :19] = True  # the longest row
    mask[0, 1, :, 42] = True  # the last column, in a byte of its own
    mask[0, 0, :, 8] = False  # an empty column
    long = torch.rand(1, 1, 3, 2501, generator=gen) < 0.1
    for limit in (1 << 40, 0):
        monkeypatch.setattr(tiles, "COMPACT_LISTS_BYTES", limit)
        for m in (mask, long):
            from_bools = tiles.tile_lists(m, columns_too=True)
            from_bits = tiles.tile_lists(pack_tiles(m), columns_too=True, packed_cols=m.shape[-1])
            assert [t.shape for t in from_bits] == [t.shape for t in from_bools]
            _check_lists(m, *from_bits[:2], compact=limit == 0)
            _check_lists(m.transpose(-1, -2), *from_bits[2:], compact=limit == 0)


def test_column_lists_read_only_their_spans(interpreted, monkeypatch):
    """With ``column_spans`` the column lists read rows [first, end) of each column: equal to the
    lists of the whole column where the mask is zero outside the spans (bools and bits, spans of
    several chunks, an empty span), and an entry outside a span is not listed (the spans are the
    caller's promise, and what is outside them is never read)."""
    from ring_adasplash.kernels.block_mask import pack_tiles

    tiles = importlib.import_module("ring_adasplash.kernels.triton_tiles")
    monkeypatch.setattr(tiles, "TILE_LIST_CHUNK", 16)
    gen = torch.Generator().manual_seed(12)
    rows, cols = 150, 19
    first = torch.randint(0, rows, (cols,), generator=gen, dtype=torch.int32)
    end = torch.minimum(first + torch.randint(0, 100, (cols,), generator=gen, dtype=torch.int32),
                        torch.tensor(rows, dtype=torch.int32))
    first[3], end[3] = rows, 0  # a column no query tile spans
    first[5], end[5] = 0, rows  # one spanned whole
    first[4] = max(int(first[4]), 1)
    position = torch.arange(rows)[:, None]
    inside = (position >= first[None, :]) & (position < end[None, :])
    mask = (torch.rand(2, 1, rows, cols, generator=gen) < 0.3) & inside
    for source in ({"mask": mask}, {"mask": pack_tiles(mask), "packed_cols": cols}):
        counts, index, counts_t, index_t = tiles.tile_lists(**source, columns_too=True, column_spans=(first, end))
        _check_lists(mask, counts, index)
        _check_lists(mask.transpose(-1, -2), counts_t, index_t)
    outside = mask.clone()
    outside[0, 0, first[4] - 1, 4] = True  # just above column 4's span
    counts_t = tiles.tile_lists(outside, columns_too=True, column_spans=(first, end))[2]
    assert counts_t[0, 0, 4] == mask[0, 0, :, 4].sum()
    assert counts_t[0, 0, 3] == 0 and counts_t[0, 0, 5] > 16


@pytest.mark.parametrize("window_size,sink_tokens", [((-1, -1), 0), ((700, 0), 0), ((700, 0), 3)])
def test_query_spans_of_the_key_tiles(window_size, sink_tokens):
    """Per key tile, the first and one past the last query tile that may see it (what the
    backward's column lists read): every visible tile lies inside, and each span starts and
    ends on a visible tile (no row read for nothing at either end)."""
    from ring_adasplash.kernels import triton_backend
    from ring_adasplash.kernels.visibility import tile_visible

    vis = causal_visibility(5000, 5000, True, "cpu", window_size, sink_tokens)
    first, end = triton_backend._compute_key_tile_ranges(vis, "cpu")[6:]
    visible = tile_visible(vis, 64, 64)
    rows = torch.arange(visible.shape[0])[:, None]
    inside = (rows >= first[None, :]) & (rows < end[None, :])
    assert not (visible & ~inside).any() and torch.equal(visible.any(0), first < end)
    seen = first < end
    columns = torch.arange(visible.shape[1])[seen]
    assert visible[first[seen].long(), columns].all() and visible[end[seen].long() - 1, columns].all()
    if window_size != (-1, -1) and not sink_tokens:
        assert (end - first).max() <= 700 // 64 + 2  # a window's key tile: a few query tiles


def test_pack_tiles_kernel_matches_the_bits_of_pytorch(interpreted):
    """``triton_tiles.pack_tiles`` (what a GPU forward runs) gives the bytes of
    ``block_mask.pack_tiles``'s PyTorch form, bit for bit, and ``unpack_tiles`` the mask back:
    key tile counts that are and are not a multiple of 8 (a last byte of one bit), rows of one
    byte, all-True and all-False rows, a non-contiguous view, more bytes than one program's."""
    from ring_adasplash.kernels.block_mask import pack_tiles, unpack_tiles

    tiles = importlib.import_module("ring_adasplash.kernels.triton_tiles")
    gen = torch.Generator().manual_seed(15)
    for shape in ((2, 3, 5, 40), (1, 2, 7, 43), (3, 1, 4, 1), (1, 1, 9, 8), (1, 1, 2, 4100)):
        mask = torch.rand(shape, generator=gen) < 0.4
        mask[0, 0, 0] = True
        mask[-1, -1, -1] = False
        for m in (mask, mask.transpose(-1, -2)):
            packed = tiles.pack_tiles(m)
            assert packed.dtype == torch.uint8 and torch.equal(packed, pack_tiles(m))
            assert torch.equal(unpack_tiles(packed, m.shape[-1]), m)


def test_large_tile_lists_take_as_many_slots_as_their_longest_row(interpreted, monkeypatch):
    """Lists above ``COMPACT_LISTS_BYTES`` keep as many slots per row as their longest row (and
    column) needs, rounded up to 16, the same entries; a whole forward and backward reads them as it
    reads full ones."""
    tiles = importlib.import_module("ring_adasplash.kernels.triton_tiles")
    gen = torch.Generator().manual_seed(12)
    mask = torch.rand(2, 3, 6, 40, generator=gen) < 0.1
    mask[1, 2, 3, :17] = True  # the longest row: at least 17
    mask[0, 1, :4, 30] = True  # the longest column: at least 4
    full = tiles.tile_lists(mask, columns_too=True)
    monkeypatch.setattr(tiles, "COMPACT_LISTS_BYTES", 0)
    counts, index, counts_t, index_t = tiles.tile_lists(mask, columns_too=True)
    assert index.shape[-1] < 40 and torch.equal(counts, full[0]) and torch.equal(counts_t, full[2])
    _check_lists(mask, counts, index, compact=True)
    _check_lists(mask.transpose(-1, -2), counts_t, index_t, compact=True)
    assert tiles.tile_lists(torch.zeros(1, 1, 3, 50, dtype=torch.bool))[1].shape[-1] == 16  # nothing listed
    # a call: the same output and gradients as with full lists
    q, k, v = _qkv(1, 200, 200, 4, 2, 32, seed=13)
    runs = []
    for limit in (1 << 40, 0):
        monkeypatch.setattr(tiles, "COMPACT_LISTS_BYTES", limit)
        qa, ka, va = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = adasplash_func(qa, ka, va, alpha=1.5, causal=True)
        out.backward(torch.ones_like(out))
        runs.append((out, qa.grad, ka.grad, va.grad))
    for wide, compact in zip(*runs):
        assert torch.equal(wide, compact)


def test_chunked_calls_keep_their_tiles_as_bits(interpreted, monkeypatch):
    """Through the Triton kernels, a call whose forward takes its queries in chunks
    (``functional.CHUNK_TILES``: one query tile) gives the results of one forward, bit for bit,
    output and gradients, with the tiles it keeps for the backward held as bits from the first
    chunk on and the backward's tile lists built from them, full and compact (``COMPACT_LISTS_BYTES``)."""
    from ring_adasplash import functional, telemetry

    tiles = importlib.import_module("ring_adasplash.kernels.triton_tiles")
    q, k, v = _qkv(1, 150, 150, 2, 1, 16, seed=21)
    runs = []
    for chunk_tiles, list_bytes in ((1 << 40, 1 << 40), (1, 1 << 40), (1, 0)):
        monkeypatch.setattr(functional, "CHUNK_TILES", chunk_tiles)
        monkeypatch.setattr(tiles, "COMPACT_LISTS_BYTES", list_bytes)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with telemetry.record() as record:
            out = adasplash_func(*leaves, alpha=1.5, causal=True)
        out.backward(torch.ones_like(out))
        runs.append([out.detach()] + [t.grad for t in leaves])
        if chunk_tiles == 1:
            assert "as bits" in repr(record.block_masks[0])
    for chunked in runs[1:]:
        for a, b in zip(runs[0], chunked):
            assert torch.equal(a, b)


@pytest.mark.parametrize("shape", SHAPES)
def test_stats_pass_matches_spec(interpreted, shape):
    batch, sq, sk, h, hkv, d, causal = shape
    q, k, _ = _qkv(batch, sq, sk, h, hkv, d)
    vis = causal_visibility(sq, sk, causal, "cpu")
    scale_z = 0.5 / math.sqrt(d)
    ref, ref_tiles, ref_rel = statistics_pass(TB, q, k, vis, scale_z)
    got, got_tiles, got_rel = statistics_pass(interpreted, q, k, vis, scale_z)
    assert got.row_max.shape == ref.row_max.shape and got.hist.shape == ref.hist.shape
    assert got_tiles.shape == ref_tiles.shape and got_tiles.dtype == torch.uint8
    assert torch.equal(got.row_max, ref.row_max)
    torch.testing.assert_close(got_rel.shift, ref_rel.shift, rtol=1e-6, atol=1e-6)
    assert torch.equal(got_tiles != S.GAP_NONE, ref_tiles != S.GAP_NONE)
    # tiles with visible pairs but no key in any row's kept bins: GAP_ZERO in both backends; the
    # others' codes equal up to a gap on a code's edge (float32 rounding apart)
    real = (got_tiles > S.GAP_ZERO) & (ref_tiles > S.GAP_ZERO)
    assert real.any() and (got_tiles[real].int() - ref_tiles[real].int()).abs().max() <= 1
    # Counts: equal up to a few keys at bin edges (see module doc), checked to lie at an edge.
    flips = (got.hist - ref.hist).abs().sum().item()
    assert ((got_tiles == S.GAP_ZERO) != (ref_tiles == S.GAP_ZERO)).sum().item() <= flips
    rows = (got.hist != ref.hist).any(-1)
    assert flips <= 4, flips
    if flips:
        qh = q.double().transpose(1, 2)
        kh = k.double().transpose(1, 2).repeat_interleave(h // hkv, 1)
        z = scale_z * qh @ kh.transpose(-1, -2)
        assert (_edge_distance(z[rows]).amin(-1) < 1e-4).all()
    assert ref.hist.sum() > 0 and torch.equal(ref.hist, ref.hist.round())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.3])
def test_max_pass_tau_floor_matches_spec(interpreted, shape, alpha):
    """The tau floor the tau floor kernel takes from the last two key tiles, and the floor gaps, as in
    ``torch_blockwise.max_pass``; and with the floor given (a later key block), read back as is."""
    batch, sq, sk, h, hkv, d, causal = shape
    q, k, _ = _qkv(batch, sq, sk, h, hkv, d, seed=6)
    vis = causal_visibility(sq, sk, causal, "cpu")
    scale_z = (alpha - 1.0) / math.sqrt(d)
    ref = TB.max_pass(problem(TB, q, k, vis, scale_z, alpha))
    got_problem = problem(interpreted, q, k, vis, scale_z, alpha)
    got = interpreted.max_pass(got_problem)
    assert torch.equal(torch.isfinite(got.tau_floor), torch.isfinite(ref.tau_floor))
    has = torch.isfinite(ref.tau_floor)
    assert has.any()
    # the same Newton steps on logits equal to a few ulps
    torch.testing.assert_close(got.tau_floor[has], ref.tau_floor[has], rtol=1e-5, atol=1e-5)
    # the gaps' codes: the same tiles seen; the float gaps agree to rounding, so a code differs
    # only where a gap lies on the edge between two
    assert torch.equal(got.gap_codes == S.GAP_NONE, ref.gap_codes == S.GAP_NONE)
    assert (ref.gap_codes != S.GAP_NONE).any() and (ref.gap_codes > S.GAP_ZERO).any()
    for codes in (got.gap_codes, interpreted.max_pass(got_problem, tau_floor=ref.tau_floor).gap_codes):
        step = (codes.int() - ref.gap_codes.int()).abs()
        assert step.max() <= 1 and (step > 0).float().mean() <= 0.02
    given = interpreted.max_pass(got_problem, score_max=None, tau_floor=ref.tau_floor)
    assert torch.equal(given.tau_floor, ref.tau_floor)


def test_interpreted_kernels_are_bounds_checked(interpreted):
    """``conftest`` installs ``interpreter_bounds``: an interpreted kernel's masked load or store
    past every tensor of its launch raises, naming the kernel, before it touches memory; the same
    kernel within its tensors runs."""
    import triton
    import triton.language as tl

    import interpreter_bounds

    assert interpreter_bounds.install()

    @triton.jit
    def copy_shifted(X, Y, n, LOAD_SHIFT, STORE_SHIFT, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(Y + offs + STORE_SHIFT, tl.load(X + offs + LOAD_SHIFT, mask=offs < n, other=0.0), mask=offs < n)

    x, y = torch.arange(16.0), torch.zeros(16)
    copy_shifted[(1,)](x, y, 16, 0, 0, BLOCK=32)  # lanes 16-31 masked off: no access
    assert torch.equal(y, x)
    far = 1 << 22  # elements: past both tensors, whatever their addresses
    for load_shift, store_shift, kind in ((far, 0, "load"), (0, far, "store"), (0, 1, "store")):
        with pytest.raises(Exception, match=f"copy_shifted: {kind} of .* outside every tensor"):
            copy_shifted[(1,)](x, y, 16, load_shift, store_shift, BLOCK=32)


def check_relative_kernel(backend, alpha, device="cpu"):
    """``relative`` of the Triton backend (one launch) equals ``stats.relative`` bit for bit, with
    one alpha and one per head: rows with a finite max and floor, rows with no visible key (-inf),
    rows that see a non-finite score (+inf), rows whose floor is -inf, large offsets."""
    g = torch.Generator().manual_seed(3)
    heads = 1 if isinstance(alpha, float) else len(alpha)
    score_max = 30 * torch.randn(2, heads, 1500, generator=g)
    tau_floor = score_max - 3 * torch.rand(score_max.shape, generator=g)
    score_max[..., :5] = float("-inf")
    score_max[..., 5:9] = float("inf")
    tau_floor[..., 9:15] = float("-inf")
    score_max[..., 15:20] += 1e4
    tau_floor[..., 15:20] += 1e4
    score_max, tau_floor = score_max.to(device), tau_floor.to(device)
    spec = EntmaxSpec(alpha)
    got = backend.relative(score_max, tau_floor, spec, 0.125)
    want = S.relative(score_max, tau_floor, spec.scale_z_at(0.125, score_max))
    for name, a, b in zip(S.Relative._fields, got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert want.nonfinite.any() and want.empty.any() and torch.isfinite(want.tau_floor).any()


@pytest.mark.parametrize("alpha", [1.5, (1.5, 2.0, 1.3)])
def test_relative_kernel_is_stats_relative(interpreted, alpha):
    check_relative_kernel(interpreted, alpha)


def test_gap_code_is_encode_gaps(interpreted):
    """The max kernel's code of a gap (``triton_maxima.gap_code``) is ``stats.encode_gaps``'s: at
    -inf, NaN and +-inf, far outside the edges, on every edge (as float32 holds it), at every
    midpoint between two edges and 3e-4 of a step to either side of every edge (the kernel counts
    a gap within 1e-4 of a step above an edge as on it; the codes' rounding allowance is 1e-3)."""
    import triton
    import triton.language as tl

    @triton.jit  # decorated here, under the interpreter; triton_maxima, reloaded in place, is a global
    def codes_kernel(Gap, Code, GAP_LOW: tl.constexpr, GAP_STEP: tl.constexpr, EDGE_SLACK: tl.constexpr,
                     N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Code + offs, triton_maxima.gap_code(tl.load(Gap + offs), GAP_LOW, GAP_STEP, EDGE_SLACK))

    edges = S.GAP_LOW + S.GAP_STEP * torch.arange(254, dtype=torch.float64)
    as_taken = torch.linspace(S.GAP_LOW, S.GAP_HIGH, 254)  # the edges as encode_gaps takes them (float32)
    gaps = torch.cat([torch.tensor([float("-inf"), float("nan"), float("inf"), -50.0, 50.0, 0.0, S.GAP_LOW - 1]),
                      as_taken.double(), edges[:-1] + S.GAP_STEP / 2, edges - 3e-4 * S.GAP_STEP,
                      edges + 3e-4 * S.GAP_STEP]).float()
    padded = torch.cat([gaps, gaps.new_full((1024 - gaps.numel(),), float("-inf"))])
    codes = torch.empty(1024, dtype=torch.uint8)
    codes_kernel[(1,)](padded, codes, S.GAP_LOW, S.GAP_STEP, 0.1 * S.GAP_ROUNDING, 1024)
    assert torch.equal(codes[:gaps.numel()], S.encode_gaps(gaps))


def test_each_head_runs_the_copy_of_its_form(interpreted):
    """``triton_common.runs_form``: with ``POWER_BY_HEAD`` a head runs exactly one copy of a loop
    (``form_copies``) and that copy is compiled for its form (``copy_power``),
    the closed form at gamma 2 (alpha 1.5) and 1 (alpha 2), the approximate log2 at any other
    gamma up to ``APPROX_LOG_MAX_GAMMA`` and the correctly rounded one above it and at NaN, as
    ``EntmaxSpec.power`` chooses for one alpha; with any other ``POWER``, the one copy. The gammas
    of 1.5 and 2 come out of the device table exactly 2 and 1 (float32, as the kernels take them)."""
    import triton
    import triton.language as tl

    from ring_adasplash.kernels.entmax_spec import POWER_BY_HEAD, POWER_GENERAL_EXACT_LOG, alpha_form

    @triton.jit  # decorated here, under the interpreter; triton_common, reloaded in place, is a global
    def forms_kernel(Gamma, Ran, POWER: tl.constexpr):
        head = tl.program_id(0)
        gamma = tl.load(Gamma + head)
        for FORM in tl.static_range(triton_common.form_copies(POWER)):
            if triton_common.runs_form(gamma, FORM, POWER):
                tl.store(Ran + 4 * head + FORM, triton_common.copy_power(POWER, FORM))

    alphas = [1.5, 2.0, 1.25, 1.2, 1.19, 1.01, 1.75]
    table = torch.tensor(alphas, dtype=torch.float64)
    gamma = EntmaxSpec((), table).kernel_constants(1.0, "cpu")["gamma"]
    assert gamma.dtype == torch.float32 and gamma[:2].tolist() == [2.0, 1.0]
    gamma = torch.cat([gamma, torch.tensor([float("nan")])])
    for power in (POWER_BY_HEAD, 2, 0):
        ran = torch.full((gamma.numel(), 4), -9, dtype=torch.int32)
        forms_kernel[(gamma.numel(),)](gamma, ran, power)
        assert ((ran != -9).sum(1) == 1).all(), (power, ran)
        if power == POWER_BY_HEAD:
            assert ran.max(1).values.tolist() == [alpha_form(a) for a in alphas] + [POWER_GENERAL_EXACT_LOG]
        else:  # the one copy, compiled for the kernel's POWER
            assert (ran[:, 0] == power).all() and (ran[:, 1:] == -9).all(), (power, ran)


def test_stats_pass_zero_tiles(interpreted):
    """A key tile whose logits all lie more than 1 below every row max is marked GAP_ZERO (both
    backends)."""
    gen = torch.Generator(device="cpu").manual_seed(3)
    q = 1.5 * torch.randn(1, 128, 2, 16, generator=gen).abs()
    k = 1.5 * torch.randn(1, 192, 2, 16, generator=gen).abs()
    k[:, 64:128] *= -1.0  # the middle key tile: z < 0 < row max - 1 for every row
    vis = causal_visibility(128, 192, False, "cpu")
    scale_z = 0.5 / math.sqrt(16)
    ref, ref_tiles, rel = statistics_pass(TB, q, k, vis, scale_z)
    got, got_tiles, _ = statistics_pass(interpreted, q, k, vis, scale_z)
    assert (scale_z * rel.shift > 1.0).all()
    zero = torch.zeros_like(ref_tiles, dtype=torch.bool)
    zero[..., 1] = True
    assert torch.equal(ref_tiles == S.GAP_ZERO, zero) and torch.equal(got_tiles == S.GAP_ZERO, zero)
    assert (got_tiles[~zero].int() - ref_tiles[~zero].int()).abs().max() <= 1


@pytest.mark.parametrize("shape,alpha", [(SHAPES[1], 1.5), (SHAPES[2], 2.0), (SHAPES[1], 1.3), (SHAPES[2], 1.3)])
def test_passes_match_spec(interpreted, shape, alpha):
    """Refinement, output and backward passes on the spec's own statistics, tau and block mask."""
    batch, sq, sk, h, hkv, d, causal = shape
    q, k, v = _qkv(batch, sq, sk, h, hkv, d, seed=1)
    vis = causal_visibility(sq, sk, causal, "cpu")
    softmax_scale = 1.0 / math.sqrt(d)
    scale_z = (alpha - 1.0) * softmax_scale
    bm = TB.BLOCK_M
    spec = EntmaxSpec(alpha)
    st, tile_gap, rel = statistics_pass(TB, q, k, vis, scale_z)
    ref_problem = problem(TB, q, k, vis, scale_z, alpha, v=v, shift=rel.shift)
    got_problem = problem(interpreted, q, k, vis, scale_z, alpha, v=v, shift=rel.shift)
    bracket = S.coarse_bracket(st, spec)
    active = S.lower_bound_mask(tile_gap, bracket.lower, S.gap_reference(st.row_max), bracket.empty, bm)
    ref_tiles, got_tiles = ref_problem.block_mask(active), got_problem.block_mask(active)
    if spec.closed_form:
        full, _ = TB.fine_histogram_pass(ref_problem, ref_tiles, bracket.bin_index)
        # a lower bound of tau inside the pair: keys below it are left out
        cutoff = torch.nan_to_num(S.fine_tau(bracket, full, spec), posinf=0.0) - 0.01
        ref, ref_keep = TB.fine_histogram_pass(ref_problem, ref_tiles, bracket.bin_index, cutoff)
        got, got_keep = interpreted.fine_histogram_pass(got_problem, got_tiles, bracket.bin_index, cutoff)
        assert ref[..., 0, :-1].sum() < full[..., 0, :-1].sum()  # the cut leaves keys out ...
        torch.testing.assert_close(S.fine_tau(bracket, ref, spec), S.fine_tau(bracket, full, spec))  # ... not tau
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert torch.equal(got_keep, ref_keep) and not (ref_keep & ~active).any()
        assert (got[..., 0, :] != ref[..., 0, :]).sum() <= 2  # edge flips, as above
        assert ref[..., 0, :-1].sum() > 0 and ref[..., 0, -1].sum() > 0  # keys in the pair and above it
        torch.testing.assert_close(got.sum(-1), ref.sum(-1), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(got[..., -1], ref[..., -1], rtol=1e-4, atol=1e-3)  # moments above the pair
        tau = S.fine_tau(bracket, ref, spec)
    else:
        ref = TB.newton_sums_pass(ref_problem, ref_tiles, bracket.estimate)
        got = interpreted.newton_sums_pass(got_problem, got_tiles, bracket.estimate)
        assert got.shape == ref.shape and got.dtype == torch.float64
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        tau = S.finalize_tau(bracket.estimate, bracket.empty)

    ref_out = TB.output_pass(ref_problem, tau, ref_tiles)
    # the block mask (tightened by GAP_ZERO tiles) drops no tile that holds p > 0
    every = TB.output_pass(ref_problem, tau, ref_problem.block_mask(torch.ones_like(active)))
    assert every[4].any() and not (every[4] & ~active).any()
    got_out = interpreted.output_pass(got_problem, tau, got_tiles)
    for name, a, b in zip(("out", "out_u", "u_sum", "support"), got_out[:4], ref_out[:4]):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
    assert got_out[4].dtype == torch.bool and torch.equal(got_out[4], ref_out[4])

    grad_out = torch.randn(batch, sq, h, d)
    fwd = A.ForwardResult(out=ref_out[0], out_u=ref_out[1], u_sum=ref_out[2], tau=tau, shift=rel.shift,
                          support=ref_out[3])
    delta = TB.row_delta(grad_out, fwd.out_u, fwd.u_sum)
    assert (delta != 0).any()
    ref_grads = TB.backward_pass(ref_problem, grad_out, tau, ref_problem.block_mask(ref_out[4]), delta)
    # delta given (a ring's later blocks), and computed by the dQ kernel (one device; a ring's first block)
    for given in (delta, None):
        got_grads = interpreted.backward_pass(got_problem, grad_out, tau, got_problem.block_mask(ref_out[4]), given,
                                              out_u=fwd.out_u, u_sum=fwd.u_sum)
        for name, a, b in zip(("dq", "dk", "dv", "delta"), got_grads, ref_grads):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_tau_kernels_match_spec(interpreted, shape, alpha):
    """The bracket and fine-tau kernels against ``stats.coarse_bracket`` / ``stats.fine_tau`` on the
    statistics of random inputs (SHAPES[3] has rows with no visible key)."""
    batch, sq, sk, h, hkv, d, causal = shape
    q, k, _ = _qkv(batch, sq, sk, h, hkv, d, seed=4)
    vis = causal_visibility(sq, sk, causal, "cpu")
    scale_z = (alpha - 1.0) / math.sqrt(d)
    bm = TB.BLOCK_M
    spec = EntmaxSpec(alpha)
    st, tile_gap, rel = statistics_pass(TB, q, k, vis, scale_z)
    ref = S.coarse_bracket(st, spec)
    got = interpreted.coarse_bracket(st, spec)
    assert torch.equal(got.empty, ref.empty) and got.bin_index.dtype == torch.float64
    assert torch.equal(got.bin_index[~ref.empty], ref.bin_index[~ref.empty])
    assert torch.equal(got.lower[~ref.empty], ref.lower[~ref.empty])
    active = S.lower_bound_mask(tile_gap, ref.lower, S.gap_reference(st.row_max), ref.empty, bm)
    ref_problem = problem(TB, q, k, vis, scale_z, alpha, shift=rel.shift)
    fine, _ = TB.fine_histogram_pass(ref_problem, ref_problem.block_mask(active), ref.bin_index)
    assert fine[..., 0, :].sum() > 0
    tau_ref = S.fine_tau(ref, fine, spec)
    tau_got, exact_got = interpreted.fine_tau(got, fine, spec)
    assert torch.equal(torch.isinf(tau_got), torch.isinf(tau_ref)) and tau_got.dtype == torch.float32
    assert torch.equal(exact_got, S.two_point_exact(ref, fine, tau_got))
    # every other row with three more keys in every sub-bin: those rows are not exact
    crowded = fine.clone()
    crowded[..., 0, :-1] += 3.0 * (torch.arange(crowded.shape[-3]) % 2)[:, None]
    tau_crowded, exact_crowded = interpreted.fine_tau(got, crowded, spec)
    assert torch.equal(exact_crowded, S.two_point_exact(ref, crowded, tau_crowded))
    assert exact_crowded.any() and not exact_crowded[~ref.empty & ~ref.single].all()
    finite = torch.isfinite(tau_ref)
    assert (tau_got[finite] - tau_ref[finite]).abs().max() <= 1e-6
    # rows whose max is the only key at or above the pair (under causal, the first query row at
    # least): tau = max - 1 whatever the fine histogram pass read
    assert torch.equal(got.single, ref.single) and not ref.single.all()
    assert (ref.single & ~ref.empty).any() or not causal
    unread, _ = interpreted.fine_tau(got, torch.zeros_like(fine), spec)
    assert torch.equal(unread[ref.single], tau_got[ref.single])
    torch.testing.assert_close(tau_ref[ref.single & ~ref.empty], st.row_max[ref.single & ~ref.empty] - 1.0)
    # tau lies in the pair of bins the counts gave
    w = 1.0 / (S.NUM_BINS - 1)
    pair = ref.bin_index[finite] * w
    assert (tau_ref[finite] >= pair - 1e-6).all() and (tau_ref[finite] <= pair + 2 * w + 1e-6).all()


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.3])
def test_forward_tau_matches_spec(interpreted, alpha):
    batch, sq, sk, h, hkv, d, causal = 1, 100, 130, 4, 2, 32, True
    q, k, v = _qkv(batch, sq, sk, h, hkv, d, seed=2)
    vis = causal_visibility(sq, sk, causal, "cpu")
    ref = A.entmax_forward(TB, q, A.SingleBlock(k, v, vis), EntmaxSpec(alpha), 1.0 / math.sqrt(d))
    got = A.entmax_forward(interpreted, q, A.SingleBlock(k, v, vis), EntmaxSpec(alpha), 1.0 / math.sqrt(d))
    assert torch.equal(torch.isfinite(got.tau), torch.isfinite(ref.tau))
    finite = torch.isfinite(ref.tau)
    assert (got.tau[finite] - ref.tau[finite]).abs().max() <= 1e-5
    torch.testing.assert_close(got.out, ref.out, rtol=1e-4, atol=1e-4)


def test_final_outputs_and_gradients_are_stored_once_in_the_input_dtype(interpreted):
    """With one key block ``out``, ``dq``, ``dk`` and ``dv`` are final: the kernels store them in
    the caller's dtype, the float32 sums rounded once (to nearest on the GPU, as a cast after
    would; Triton's interpreter truncates: within one bf16 step either way); so is the backward's
    ``out_u`` then."""
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(1, 100, 130, 4, 2, 32, seed=5))
    vis = causal_visibility(100, 130, True, "cpu")
    spec, scale = EntmaxSpec(1.5), 32 ** -0.5
    wide = A.entmax_forward(interpreted, q, A.SingleBlock(k, v, vis), spec, scale)
    final = A.entmax_forward(interpreted, q, A.SingleBlock(k, v, vis), spec, scale, out_dtype=torch.bfloat16)
    assert wide.out.dtype == wide.out_u.dtype == torch.float32
    assert final.out.dtype == final.out_u.dtype == torch.bfloat16
    _rounded_once(final.out, wide.out)
    _rounded_once(final.out_u, wide.out_u)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    dq, dk, dv, _ = A.entmax_backward(interpreted, q, grad_out, A.SingleBlock(k, v, vis), wide, spec, scale)
    dq16, dk16, dv16, _ = A.entmax_backward(interpreted, q, grad_out, A.SingleBlock(k, v, vis), wide, spec, scale,
                                            kv_grad_dtype=torch.bfloat16, q_grad_dtype=torch.bfloat16)
    for wide_grad, final_grad in ((dq, dq16), (dk, dk16), (dv, dv16)):
        assert wide_grad.dtype == torch.float32 and final_grad.dtype == torch.bfloat16
        _rounded_once(final_grad, wide_grad)


def test_calls_store_out_and_dq_in_the_input_dtype_from_the_size_where_memory_limits(interpreted, monkeypatch):
    """Above ``STORE_FINAL_BYTES`` a call's kernels store out and dq in the input dtype; below, in
    float32, cast after: the same output, rounded once. The gradients then start from a 16-bit
    ``out_u`` (as flash attention's from its 16-bit output): against float64, within twice the
    error of the float32 ``out_u``."""
    from ring_adasplash import functional

    q, k, v = (t.to(torch.bfloat16) for t in _qkv(1, 130, 130, 4, 2, 32, seed=7))
    assert functional._stored_final(q) is None and functional._stored_final(q.new_empty(1 << 26)) == torch.bfloat16
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    runs = []
    for limit in (1 << 40, 0):
        monkeypatch.setattr(functional, "STORE_FINAL_BYTES", limit)
        qa, ka, va = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = adasplash_func(qa, ka, va, alpha=1.5, causal=True)
        out.backward(grad_out)
        runs.append((out, qa.grad, ka.grad, va.grad))
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref = entmax_attention_reference(qr, kr, vr, alpha=1.5, causal=True)
    ref.backward(grad_out.double())
    for name, cast_after, stored, want in zip(("out", "dq", "dk", "dv"), *runs, (ref, qr.grad, kr.grad, vr.grad)):
        assert cast_after.dtype == stored.dtype == torch.bfloat16
        if name == "out":
            step = cast_after.float().abs() * 2.0 ** -7 + 1e-30
            assert ((cast_after.float() - stored.float()).abs() <= step).all()
        else:
            assert _rel(stored, want) <= 2 * _rel(cast_after, want), (name, _rel(stored, want), _rel(cast_after, want))
    assert not torch.equal(runs[0][0], runs[0][0] * 0)  # the outputs are not all zero


def test_query_chunks_give_the_whole_calls_results(interpreted, monkeypatch):
    """Through the interpreted kernels (the candidate kernel's output included), a call in chunks
    of two query tiles (``functional.CHUNK_TILES``) gives the output and gradients of one forward,
    bit for bit."""
    from ring_adasplash import functional

    q, k, v = _qkv(1, 300, 300, 2, 2, 32, seed=9)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(10))
    runs = []
    for chunk_tiles in (1 << 40, 2 * (1 * 2 * 5)):
        monkeypatch.setattr(functional, "CHUNK_TILES", chunk_tiles)
        qa, ka, va = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = adasplash_func(qa, ka, va, alpha=1.5, causal=True)
        out.backward(grad_out)
        runs.append((out, qa.grad, ka.grad, va.grad))
    for whole, chunked in zip(*runs):
        assert torch.equal(whole, chunked)


def _rounded_once(final, wide):
    """``final`` (bf16) is ``wide`` (float32) rounded once: to nearest, or toward zero."""
    nearest, truncated = wide.to(torch.bfloat16), (wide.view(torch.int32) & ~0xFFFF).view(torch.float32)
    assert ((final == nearest) | (final.float() == truncated)).all()
    assert (final == nearest).float().mean() > 0.4  # not a constant, nor some other rounding


def _check_against_reference(q, k, v, alpha, causal, tol):
    qa, ka, va = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = adasplash_func(qa, ka, va, alpha=alpha, causal=causal)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = entmax_attention_reference(qr, kr, vr, alpha=alpha, causal=causal)
    grad = torch.randn(out.shape, dtype=torch.float64)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    assert out.dtype == q.dtype
    for name, a, b in (("out", out, ref), ("dq", qa.grad, qr.grad), ("dk", ka.grad, kr.grad), ("dv", va.grad, vr.grad)):
        err = (a.double() - b).norm() / b.norm().clamp(min=1e-12)
        assert err < tol, (name, err.item())


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.3])
@pytest.mark.parametrize("causal", [True, False])
def test_adasplash_func_matches_reference(interpreted, alpha, causal):
    q, k, v = _qkv(1, 100, 130, 4, 2, 16, seed=3)
    _check_against_reference(q, k, v, alpha, causal, tol=1e-4)


def test_bf16_and_strided_inputs(interpreted):
    """bf16 operands (rounded as on the GPU, then multiplied in float32) and non-contiguous q, k, v
    (views into one packed tensor): the kernels take strides, no copies."""
    packed = torch.randn(1, 130, 3, 4, 32).mul(1.5).to(torch.bfloat16)
    q, k, v = packed.unbind(2)
    assert not q.is_contiguous()
    _check_against_reference(q, k, v, 1.5, True, tol=2e-2)


def _call_with_gradients(q, k, v, alpha):
    qa, ka, va = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = adasplash_func(qa, ka, va, alpha=alpha, causal=True)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype))
    return out, qa.grad, ka.grad, va.grad


def test_wide_offsets_match_int32_offsets(interpreted, monkeypatch):
    """With every launch taking int64 offsets (``WIDE_OFFSETS``, ``triton_common.offset_strides``;
    below 2^31 elements the kernels take int32), output and gradients are those of int32 offsets
    bit for bit, and the float64 reference's, with strided inputs (position stride 3 x heads x D)."""
    backend = importlib.import_module("ring_adasplash.kernels.triton_backend")
    packed = torch.randn(1, 300, 3, 2, 32, generator=torch.Generator().manual_seed(8)).mul(1.5)
    q, k, v = packed.unbind(2)
    launched = []
    launch = backend.launch

    def recording(kernel, grid):
        run = launch(kernel, grid)
        return lambda **kwargs: (launched.append((kernel.fn.__name__, kwargs.get("WIDE_OFFSETS"))), run(**kwargs))[1]

    monkeypatch.setattr(backend, "launch", recording)
    narrow = _call_with_gradients(q, k, v, 1.5)
    monkeypatch.setattr(backend, "INT32_OFFSETS", 1)
    wide = _call_with_gradients(q, k, v, 1.5)
    strided = {name for name, flag in launched if flag is not None}
    assert {"max_kernel", "output_kernel", "dq_kernel", "dkdv_kernel"} <= strided
    half = len(launched) // 2
    assert all(flag is False for _, flag in launched[:half] if flag is not None)
    assert all(flag is True for _, flag in launched[half:] if flag is not None)
    for name, a, b in zip(("out", "dq", "dk", "dv"), wide, narrow):
        assert torch.equal(a, b), name
    _check_against_reference(q, k, v, 1.5, True, tol=1e-4)  # and right, not only alike


def test_wide_offsets_from_the_reach_of_each_tensor():
    """int64 offsets from an offset of 2^31 within a batch element: two million tokens at 16 heads
    and D 64 (contiguous), a strided view whose positions lie far apart, or a broadcast view whose
    gradient (contiguous) reaches that far; a head_dim stride that alone overflows int32 is refused."""
    backend = importlib.import_module("ring_adasplash.kernels.triton_backend")

    def meta(shape, strides=None):
        x = torch.empty(shape, device="meta")
        return x if strides is None else x.as_strided(shape, strides)

    assert not backend.wide_offsets(meta((4, 2**20 - 128, 16, 64)))  # 2^31 elements in all, not per batch
    assert backend.wide_offsets(meta((1, 2**21, 16, 64)))
    assert backend.wide_offsets(meta((1, 2**16, 1, 64), (2**32, 2**15, 64, 1)))
    assert backend.wide_offsets(meta((1, 2**21, 16, 64), (0, 0, 64, 1)))  # broadcast keys: their gradient's reach
    assert not backend.wide_offsets(meta((1, 2**16, 16, 64)))
    with pytest.raises(ValueError, match=r"q: its head_dim stride \(33554432\)"):
        backend._strides("q", meta((1, 8, 2, 64), (2**31, 1, 8, 2**25)))


def test_varlen_documents(interpreted):
    cu = torch.tensor([0, 37, 100, 150], dtype=torch.int32)
    q, k, v = (t[0] for t in _qkv(1, 150, 150, 2, 1, 16, seed=4))
    vis = varlen_visibility(cu, cu, True)
    qr, kr, vr = (t.double()[None] for t in (q, k, v))
    ref = entmax_attention_reference(qr, kr, vr, alpha=1.5, visibility=vis)[0]
    out = adasplash_varlen_func(q, k, v, cu, cu, 63, 63, alpha=1.5, causal=True)
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-4


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


def _structured(batch, seqlen, heads, heads_kv, dim, dtype, amp=1.5, seed=0, device="cuda"):
    """q, k = amp * sinusoidal position code + noise (sparse, diagonal-heavy attention)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    half = dim // 2
    freqs = 4096.0 ** (-torch.arange(half, dtype=torch.float64, device=device) / half)
    angles = torch.arange(seqlen, dtype=torch.float64, device=device)[:, None] * freqs
    code = (amp * torch.cat([angles.cos(), angles.sin()], -1)).float()[None, :, None, :]
    q = torch.randn(batch, seqlen, heads, dim, device=device, generator=gen) + code
    k = torch.randn(batch, seqlen, heads_kv, dim, device=device, generator=gen) + code
    v = torch.randn(batch, seqlen, heads_kv, dim, device=device, generator=gen)
    return [t.to(dtype) for t in (q, k, v)]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.3])
def test_gpu_fwd_bwd_against_reference(dtype, dim, alpha, monkeypatch):
    monkeypatch.delenv("RING_ADASPLASH_BACKEND", raising=False)
    q, k, v = _structured(2, 1000, 4, 2, dim, dtype, seed=dim)
    _ = q.sum().item()
    qa, ka, va = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = adasplash_func(qa, ka, va, alpha=alpha, causal=True)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = entmax_attention_reference(qr, kr, vr, alpha=alpha, causal=True)
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    for name, a, b in (("out", out, ref), ("dq", qa.grad, qr.grad), ("dk", ka.grad, kr.grad), ("dv", va.grad, vr.grad)):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 2e-2, (name, _rel(a, b))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("seqlen", [4096, 16384])
def test_gpu_long_forward_rows_against_reference(dtype, dim, seqlen, monkeypatch):
    """Long sequences: the float64 reference on a subset of query rows (bounded memory)."""
    monkeypatch.delenv("RING_ADASPLASH_BACKEND", raising=False)
    q, k, v = _structured(1, seqlen, 4, 2, dim, dtype, seed=seqlen)
    out = adasplash_func(q, k, v, alpha=1.5, causal=True)
    rows = torch.cat([torch.arange(0, 64), torch.randint(64, seqlen, (448,), generator=torch.Generator().manual_seed(0))])
    rows = rows.to("cuda")
    vis = causal_visibility(seqlen, seqlen, True, "cuda")
    sub = type(vis)(vis.q_limit[rows], vis.q_doc[rows], vis.k_pos, vis.k_doc)
    ref = entmax_attention_reference(q[:, rows].double(), k.double(), v.double(), alpha=1.5, visibility=sub)
    assert torch.isfinite(out).all()
    assert _rel(out[:, rows], ref) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128])
def test_gpu_long_fwd_bwd_against_spec(dim, monkeypatch):
    """fwd+bwd at 16K against the PyTorch spec backend run on the same GPU in float64."""
    q, k, v = _structured(1, 16384, 4, 1, dim, torch.bfloat16, seed=7)
    grad = torch.randn_like(q)
    results = []
    for backend, cast in (("triton", lambda t: t), ("torch", torch.Tensor.double)):
        monkeypatch.setenv("RING_ADASPLASH_BACKEND", backend)
        leaves = [cast(t).detach().requires_grad_() for t in (q, k, v)]
        out = adasplash_func(*leaves, alpha=1.5, causal=True)
        out.backward(cast(grad))
        results.append([out] + [t.grad for t in leaves])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 2e-2, (name, _rel(a, b))


@pytest.mark.gpu
def test_gpu_head_dims_and_strides(monkeypatch):
    monkeypatch.delenv("RING_ADASPLASH_BACKEND", raising=False)
    for dim in (16, 32, 256):
        packed = torch.randn(1, 700, 3, 6, dim, device="cuda").to(torch.bfloat16)
        q, k, v = packed.unbind(2)  # strided views
        q = q.transpose(1, 2).contiguous().transpose(1, 2)  # head-major storage
        qa, ka, va = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = adasplash_func(qa, ka, va, alpha=1.5, causal=False)
        grad = torch.randn(out.shape, device="cuda", dtype=torch.float64)
        out.backward(grad.to(out.dtype))
        qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = entmax_attention_reference(qr, kr, vr, alpha=1.5, causal=False)
        ref.backward(grad)
        for name, a, b in (("out", out, ref), ("dq", qa.grad, qr.grad), ("dk", ka.grad, kr.grad),
                           ("dv", va.grad, vr.grad)):
            assert _rel(a, b) < 2e-2, (dim, name, _rel(a, b))


@pytest.mark.gpu
def test_gpu_offsets_beyond_int32(monkeypatch):
    """Tensors of 2^31 elements (32K tokens at 1024 heads, D 64: as many as 2M tokens at 16 heads,
    D 128), where a row's offset ``s * stride_s`` no longer fits in int32: the last heads' output
    and gradients equal those of the same heads called alone (small offsets)."""
    from ring_adasplash import functional

    if torch.cuda.get_device_properties(0).total_memory < 80 * 2**30:
        pytest.skip("needs 80 GiB of GPU memory")
    monkeypatch.delenv("RING_ADASPLASH_BACKEND", raising=False)
    # out, sum u v and dq stored in bf16 by their kernels in both calls (the whole call's are large
    # enough to be anyway), so that the two differ by the order of float32 sums at most
    monkeypatch.setattr(functional, "STORE_FINAL_BYTES", 1)
    seqlen, heads, dim, tail = 32768, 1024, 64, 4
    gen = torch.Generator(device="cuda").manual_seed(0)
    freqs = 4096.0 ** (-torch.arange(dim // 2, device="cuda") / (dim // 2))
    angles = torch.arange(seqlen, device="cuda")[:, None] * freqs
    code = (2.0 * torch.cat([angles.cos(), angles.sin()], -1)).to(torch.bfloat16)[None, :, None, :]
    q, k, v = (torch.randn(1, seqlen, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    q += code
    k += code
    assert q.numel() >= 2**31
    grad = torch.randn(1, seqlen, tail, dim, device="cuda", dtype=torch.bfloat16, generator=gen)

    def run(q, k, v, head_grad):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = adasplash_func(*leaves, alpha=1.5, causal=True)
        out_grad = torch.zeros_like(out)
        out_grad[:, :, -tail:] = head_grad
        out.backward(out_grad)
        return [t[:, :, -tail:].float() for t in (out.detach(), *(x.grad for x in leaves))]

    whole = run(q, k, v, grad)
    alone = run(*(t[:, :, -tail:].contiguous() for t in (q, k, v)), grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), whole, alone):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 5e-3, (name, _rel(a, b))


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_match_eager(monkeypatch):
    """A captured and replayed forward gives the eager results, bit for bit, and the float64 ones,
    and so do the gradients taken from what it saved: two layers of one shape run forward,
    forward, backward, backward (so a replay must not overwrite an earlier call's results), over
    three rounds of new inputs (eager, capture, replay), causal and not (same shapes, different
    visibility)."""
    from ring_adasplash import cuda_graphs

    monkeypatch.delenv("RING_ADASPLASH_BACKEND", raising=False)
    cuda_graphs.clear()

    def step(inputs, causal):
        leaves = [[t.detach().clone().requires_grad_() for t in qkv] for qkv in inputs]
        outs = [adasplash_func(*qkv, alpha=1.5, causal=causal) for qkv in leaves]
        grads = [torch.randn_like(o) for o in outs]
        for out, grad in reversed(list(zip(outs, grads))):
            out.backward(grad)
        return [[out.detach()] + [t.grad for t in qkv] for out, qkv in zip(outs, leaves)], grads

    for causal in (True, False):
        for round_ in range(3):
            inputs = [_structured(2, 1000, 4, 2, 64, torch.bfloat16, seed=10 * round_ + layer) for layer in (0, 1)]
            monkeypatch.setenv(cuda_graphs.MODE_ENV, "on")
            torch.manual_seed(round_)
            graphed, grads = step(inputs, causal)
            monkeypatch.setenv(cuda_graphs.MODE_ENV, "off")
            torch.manual_seed(round_)
            eager, _ = step(inputs, causal)
            for layer, (a_all, b_all) in enumerate(zip(graphed, eager)):
                for name, a, b in zip(("out", "dq", "dk", "dv"), a_all, b_all):
                    assert torch.equal(a, b), (causal, round_, layer, name, _rel(a, b))
            qr, kr, vr = (t.double().requires_grad_() for t in inputs[0])
            ref = entmax_attention_reference(qr, kr, vr, alpha=1.5, causal=causal)
            ref.backward(grads[0].double())
            for name, a, b in zip(("out", "dq", "dk", "dv"), graphed[0], (ref, qr.grad, kr.grad, vr.grad)):
                assert _rel(a, b) < 2e-2, (causal, round_, name, _rel(a, b))
    captured = [key[0] for key, graph in cuda_graphs._graphs.items() if graph is not None]
    assert len(captured) == 2 and captured[0] == captured[1], captured  # one per visibility, same settings
    cuda_graphs.clear()


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_an_alpha_that_moves_every_step(monkeypatch):
    """A learnable alpha per head that an optimizer moves between calls (in place, as a training
    step does) keeps one captured graph, whose replays read the new values: the results match
    the eager ones bit for bit at every step, and alpha's gradient too. Heads at 1.5 and 2 stay
    there (their closed forms' powers, ``POWER_BY_HEAD``); the others move."""
    from ring_adasplash import cuda_graphs

    monkeypatch.delenv("RING_ADASPLASH_BACKEND", raising=False)
    cuda_graphs.clear()
    q, k, v = _structured(1, 1000, 4, 2, 64, torch.bfloat16, seed=3)
    alpha = torch.tensor([1.3, 1.5, 1.75, 2.0], device=q.device, requires_grad=True)
    moving = torch.tensor([1.0, 0.0, -1.0, 0.0], device=q.device)

    def step(mode):
        monkeypatch.setenv(cuda_graphs.MODE_ENV, mode)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = adasplash_func(*leaves, alpha=alpha, causal=True)
        out.backward(torch.ones_like(out))
        results = [out.detach(), alpha.grad.clone(), *(t.grad for t in leaves)]
        alpha.grad = None
        return results

    for round_ in range(4):  # eager, capture, replay, replay
        graphed, eager = step("on"), step("off")
        for name, a, b in zip(("out", "dalpha", "dq", "dk", "dv"), graphed, eager):
            assert torch.equal(a, b), (round_, name, _rel(a, b))
        with torch.no_grad():
            alpha.add_(0.01 * moving)
    captured = [key for key, graph in cuda_graphs._graphs.items() if graph is not None]
    assert len(captured) == 1, captured
    cuda_graphs.clear()


@pytest.mark.parametrize("alphas", [(1.5,), (1.5, 2.0, 1.5, 1.3), (1.5, 2.0, 1.7, 1.3)],
                         ids=["one alpha", "three alphas", "alpha per head"])
def test_compile_ahead_dry_run_launches_what_the_call_launches(interpreted, alphas):
    """``functional._dry_run``, which ``compile_ahead`` runs with compile-only launches on a GPU,
    launches every kernel the call's forward and backward launch, with the same specializations
    (``offline_compile.specialization_key``; here interpreted on CPU, where compiling ahead is off,
    the dry run's kernels recorded and skipped)."""
    from offline_compile import recorded_launches, specialization_key

    from ring_adasplash import functional

    def specializations(launched):
        return {specialization_key(getattr(importlib.import_module(module), name), arguments)
                for (module, name), calls in launched.items() for arguments in calls}

    q, k, v = (t.to(torch.float16) for t in _qkv(1, 130, 130, 4, 2, 32, seed=5))
    with recorded_launches(skip=lambda: True) as launched:
        functional._dry_run(q, k, v, causal_visibility(130, 130, True, "cpu"), alphas, 32 ** -0.5, True)
    ahead = specializations(launched)
    qa, ka, va = (t.clone().requires_grad_() for t in (q, k, v))
    with recorded_launches() as launched:
        out = adasplash_func(qa, ka, va, alpha=torch.tensor(alphas) if len(alphas) > 1 else alphas[0], causal=True)
        out.backward(torch.randn_like(out))
    assert {"max_kernel", "candidate_schedule_kernel", "dq_kernel", "dkdv_kernel", "tile_list_kernel"} <= {
        name for _, name in launched}
    late = specializations(launched) - ahead
    assert not late, late


@pytest.mark.gpu
def test_gpu_compile_ahead_leaves_the_call_nothing_to_compile(monkeypatch):
    """The first call of a configuration compiles every kernel its forward and backward launch
    ahead, from a dry run (Triton's ``jit_cache_hook`` sees each compile; ``is_manual_warmup``
    marks the dry run's), so the call itself compiles nothing; its results match float64. The
    configuration (float16, D 32, two query heads per key head) is one no other test runs, and the
    test passes alone or after the others."""
    import triton

    monkeypatch.delenv("RING_ADASPLASH_BACKEND", raising=False)
    monkeypatch.setenv("RING_ADASPLASH_CUDA_GRAPHS", "off")
    compiles = []

    def record(**info):
        compiles.append((info["fn"].name, info["is_manual_warmup"], str(info.get("key"))))
        return False  # go on compiling

    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", record)
    q, k, v = _structured(1, 700, 4, 2, 32, torch.float16, seed=5)
    qa, ka, va = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = adasplash_func(qa, ka, va, alpha=1.5, causal=True)
    grad = torch.randn_like(out)
    out.backward(grad)
    # every kernel whose code depends on the dtype, the head dim or the group (the tile-list and
    # tau kernels do not, and earlier tests compiled them); alpha 1.5 on one device takes the
    # one-launch Newton schedule (algorithm.default_schedule)
    names = {name for name, _, _ in compiles}
    assert {"max_kernel", "tau_floor_kernel", "candidate_schedule_kernel", "newton_schedule_kernel", "output_kernel",
            "dq_kernel", "dkdv_kernel"} <= names, names
    # a kernel compiled by the call: its specialization, beside those the dry run compiled of it
    late = {(name, key): [k for n, ahead, k in compiles if ahead and n == name]
            for name, ahead, key in compiles if not ahead}
    assert not late, late
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = entmax_attention_reference(qr, kr, vr, alpha=1.5, causal=True)
    ref.backward(grad.double())
    for name, a, b in (("out", out, ref), ("dq", qa.grad, qr.grad), ("dk", ka.grad, kr.grad), ("dv", va.grad, vr.grad)):
        assert _rel(a, b) < 2e-2, (name, _rel(a, b))


@pytest.mark.parametrize("alpha", (1.1, 1.5, 2.0))
def test_interpreted_probabilities_match_the_entmax_package(interpreted, alpha):
    """The oracle families of ``test_exactness`` (ties, one-key rows, bin edges, integer scores,
    zeros, rows shifted by 1e4) through the Triton kernels: float32 probabilities within 1e-5 of
    the ``entmax`` package."""
    from test_exactness import families, oracle, probabilities

    pytest.importorskip("entmax")
    for name, scores in families(alpha, seqlen_k=100, offsets=True).items():
        err = (probabilities(scores, alpha) - oracle(scores, alpha)).abs().max().item()
        assert err <= 1e-5, (name, err)


@pytest.mark.parametrize("alpha", (1.25, 1.5, 2.0))
def test_interpreted_flat_rows_sum_to_one(interpreted, alpha):
    """Causal rows with dozens of keys in each fine sub-bin near tau (scores 0.01 x N(0, 1)): the
    closed form's Newton steps (alpha 1.5, 2) and the Newton path reach tau; rows sum to 1."""
    g = torch.Generator().manual_seed(1)
    q, k = (0.01 * torch.randn(1, 512, 1, 16, generator=g) for _ in range(2))
    q[..., 0] = 1
    out = adasplash_func(q, k, torch.ones_like(k), alpha=alpha, softmax_scale=1.0, causal=True)
    assert (out - 1).abs().max().item() < 1e-5


@pytest.mark.parametrize("tiles_per_program", [8, 2])
def test_interpreted_nan_propagates(interpreted, tiles_per_program, monkeypatch):
    """Also with two query tiles a program of the kernel that marks the NaN rows' keys: several
    programs along the sequence, the last one short."""
    from test_exactness import check_nan_keys_under_a_window, check_nan_propagation

    monkeypatch.setattr(interpreted, "NAN_KEYS_TILES", tiles_per_program)
    check_nan_propagation()
    check_nan_keys_under_a_window(products_read_nan_as_zero=False)


def test_interpreted_key_padding(interpreted):
    """``key_padding_mask`` through the Triton kernels (left padding, causal) against the masked
    float64 reference."""
    from test_masks import _padding, _reference

    q, k, v, grad_out = random_qkv(2, 100, 100, 2, 2, 16, seed=8, grad_out=True, requires_grad=True)
    mask = _padding("left", 2, 100)
    out = adasplash_func(q, k, v, key_padding_mask=mask)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = _reference(q.detach(), k.detach(), v.detach(), grad_out, mask, 1.5, True)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), ref):
        assert _rel(got, want) < 1e-4, (name, _rel(got, want))


@pytest.mark.parametrize("dkdv_q_step", [None, 16])
@pytest.mark.parametrize("window_size,sink_tokens,causal", [((20, 0), 3, True), ((15, 30), 0, False)])
def test_interpreted_window_and_sinks(interpreted, window_size, sink_tokens, causal, dkdv_q_step, monkeypatch):
    """``window_size`` and ``sink_tokens`` through the Triton kernels against the explicit mask's
    float64 reference (full tiles inside the window, masked ones at its edges, a sink tile); the
    dK/dV kernel also a quarter of a query tile's rows a step (``DKDV_Q_STEP``)."""
    from test_masks import _close, _masked_reference, explicit_mask

    if dkdv_q_step:
        monkeypatch.setattr(interpreted, "DKDV_Q_STEP", {16: dkdv_q_step})

    q, k, v, grad_out = random_qkv(1, 200, 200, 2, 2, 16, seed=15, grad_out=True, requires_grad=True)
    out = adasplash_func(q, k, v, causal=causal, window_size=window_size, sink_tokens=sink_tokens)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    mask = explicit_mask(200, 200, causal, window_size, sink_tokens)
    ref = _masked_reference(q.detach(), k.detach(), v.detach(), grad_out, [mask], 1.5)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), ref):
        assert _close(got, want), (name, _rel(got, want))


def test_interpreted_telemetry_counts_the_tile_lists(interpreted):
    """With the Triton kernels, the per-tile state a forward holds includes the tile lists the
    passes build (``telemetry.tile_state_bytes``; one device, causal, the Newton schedule): per
    (query tile, key tile, head) before the output pass a tile gap's code, the schedule's read
    mask and the candidates; at the output pass the candidates with their list (two bytes a
    slot) and the nonzero tiles, plus per query tile and head the list's int32 count; and the
    visible tiles once (the visibility rule's, shared by every batch entry and head). Kept for
    the backward: the nonzero tiles, as bits (``block_mask.pack_tiles``)."""
    from ring_adasplash import telemetry

    q, k, v = (torch.randn(2, 640, 3, 16) for _ in range(3))
    with telemetry.record() as t:
        adasplash_func(q, k, v, causal=True)
    n_tiles = 10
    per_head, once, counts = 2 * 3 * n_tiles * n_tiles, n_tiles * n_tiles, 4 * 2 * 3 * n_tiles
    before_output = per_head + per_head + per_head + once
    at_output = (per_head + 2 * per_head + counts) + per_head + once
    assert t.tile_state_bytes == max(before_output, at_output)
    assert t.saved_tile_bytes == 2 * 3 * n_tiles * -(-n_tiles // 8)


def test_interpreted_window_far_into_a_long_key_range(interpreted):
    """Tile lists are stored in 16 bits where their tiles fit (``triton_tiles.index_dtype``): 64
    queries at the end of 40,000 keys, a window and sink tokens, so the lists hold tile 0 and tiles
    past 600, whose token offsets (tile x 64) overflow 16 bits unless every kernel widens what it
    reads. Forward and gradients against the explicit mask's float64 reference."""
    from test_masks import _close, _masked_reference, explicit_mask

    from ring_adasplash.kernels.triton_tiles import index_dtype

    seqlen_k = 40_000
    assert index_dtype(-(-seqlen_k // 64)) == torch.int16 and seqlen_k // 64 * 64 > 2**15
    q, k, v, grad_out = random_qkv(1, 64, seqlen_k, 2, 2, 16, seed=21, grad_out=True, requires_grad=True)
    window, sinks = (100, 0), 3
    out = adasplash_func(q, k, v, causal=True, window_size=window, sink_tokens=sinks)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    mask = explicit_mask(64, seqlen_k, True, window, sinks)
    ref = _masked_reference(q.detach(), k.detach(), v.detach(), grad_out, [mask], 1.5)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), ref):
        assert _close(got, want), (name, _rel(got, want))


@pytest.mark.parametrize("alpha", (1.25, 1.5, (1.25, 1.7)), ids=("1.25", "1.5", "per head"))
def test_newton_schedule_agrees_with_the_histogram_schedule(interpreted, alpha):
    """Both schedules through the interpreted Triton kernels, float32, causal, 2 heads of 300
    tokens at three spreads: the same tau (to float32 rounding), output and tiles with p > 0;
    one alpha, or one per head (the kernels read it per head)."""
    for spread in (0.3, 1.0, 3.0):
        g = torch.Generator().manual_seed(int(spread * 10))
        q, k, v = (spread * torch.randn(1, 300, 2, 32, generator=g) for _ in range(3))
        vis = causal_visibility(300, 300, True, "cpu")
        runs = {schedule: A.entmax_forward(interpreted, q, A.SingleBlock(k, v, vis), EntmaxSpec(alpha), 32 ** -0.5,
                                           schedule=schedule) for schedule in ("newton", "histogram")}
        newton_run, histogram_run = runs["newton"], runs["histogram"]
        torch.testing.assert_close(newton_run.tau, histogram_run.tau, rtol=0, atol=2e-6)
        torch.testing.assert_close(newton_run.out, histogram_run.out, rtol=1e-5, atol=1e-5)
        assert torch.equal(newton_run.block_masks[0].tiles, histogram_run.block_masks[0].tiles)
        # every tile with p > 0 was read by the Newton schedule's output pass
        assert not (histogram_run.block_masks[0].tiles & ~newton_run.read_masks[0].tiles).any()


# How ``triton_backend.newton_schedule`` runs: (candidate slots per row, most key tiles a query tile
# may list and still take the sweeps, ``CROWDED_RATIO``). "sweeps": every query tile in one sweep per
# step; "candidates": every query tile on its candidate keys; "spilled": 64 slots, too few for the flat
# rows' 400 keys, so their query tiles spill to the sweeps and the others do not; "dropped": 512
# slots, so the flat rows' query tiles hold more than ``DROP_LONGEST`` candidates and drop those below
# the bracket after ``DROP_STEP`` steps; "few tiles": 256 slots, and the query tiles that list at most
# 3 key tiles take the sweeps (the first 3 causal query tiles, most windowed ones), the others their
# candidates; "crowded": 256 slots, and a query tile with a row of more candidates than an eighth of
# its listed keys spills (the flat rows'; no ``CROWDED_FLOOR``).
SCHEDULE_ROUTES = {"sweeps": (0, None, 0), "candidates": (256, 0, 0), "spilled": (64, 0, 0),
                   "dropped": (512, 0, 0), "few tiles": (256, 3, 0), "crowded": (256, 0, 8)}


@pytest.mark.parametrize("alpha, route", [(1.25, "sweeps"), (1.5, "sweeps"), (1.25, "candidates"),
                                          (1.5, "candidates"), (1.5, "spilled"), (1.25, "dropped"),
                                          (1.5, "dropped"), (1.5, "few tiles"), (1.5, "crowded")])
def test_newton_schedule_kernel_matches_the_pytorch_schedule(interpreted, alpha, route, monkeypatch):
    """The whole Newton schedule (``triton_newton``, ``triton_candidates``, interpreted) against
    ``torch_blockwise.newton_schedule`` in the same forward, float32: a batch of two entries with
    padded keys (rows with no visible key) and a window of 90 keys with 2 sinks, and causal rows of
    up to 400 keys, a NaN score in one row; flat rows, spread rows (several steps, tiles marked),
    peaked rows (done before the tiles are marked) and rows whose support is one key tile, with
    the next between max - 1 and tau (marked out): the same tau (to float32 rounding), NaN and inf
    on the same rows, the same output, the same tiles with p > 0, and the output pass read every
    one of them. The sweeps read the same tiles as the PyTorch schedule; the candidates read no
    other tile (they mark the tiles of keys above tau itself, where a sweep marks those above its
    last point, a step below)."""
    slots, few_tiles, crowded_ratio = SCHEDULE_ROUTES[route]
    monkeypatch.setenv(interpreted.CANDIDATES_ENV, str(slots))
    if few_tiles is not None:
        monkeypatch.setattr(interpreted, "FEW_TILES", few_tiles)
    monkeypatch.setattr(interpreted, "CROWDED_RATIO", crowded_ratio)
    monkeypatch.setattr(interpreted, "CROWDED_FLOOR", 0)
    keep = torch.ones(2, 200, dtype=torch.bool)
    keep[0, :70] = False  # left padding: the first 70 queries of entry 0 see no key
    keep[1, 150:] = False
    windowed = padded_visibility(keep, 200, True, window_size=(89, 0), sink_tokens=2)
    causal = causal_visibility(400, 400, True, "cpu")
    cases = [(windowed, spread) for spread in (0.02, 4.0)] + [(causal, spread) for spread in (0.02, 0.3, 1.0)]
    for vis, spread in cases + [(causal, None)]:
        g = torch.Generator().manual_seed(int((spread or 7) * 100))
        q, k, v = (torch.randn(1, 400, 2, 32, generator=g) for _ in range(3))
        if spread is None:  # key tile 0 holds the support, tile 1 lies between max - 1 and tau, tiles
            q, k = torch.zeros_like(q), torch.zeros_like(k)  # 2-6 below max - 1
            q[..., 0] = 1.0
            k[0, :, :, 0] = 2.0 * torch.cat((-0.01 * torch.rand(64, 2, generator=g), torch.full((64, 2), -0.5),
                                              torch.full((272, 2), -2.0)))
        else:
            q, k, v = spread * q, spread * k, spread * v
        q[0, 333, 1, 0] = float("nan")
        scale = 32 ** -0.5 if spread else 1.0
        runs = [A.entmax_forward(backend, q, A.SingleBlock(k, v, vis), EntmaxSpec(alpha), scale, schedule="newton")
                for backend in (TB, interpreted)]
        want, got = runs
        assert torch.equal(torch.isnan(got.tau), torch.isnan(want.tau))
        assert torch.equal(torch.isinf(got.tau), torch.isinf(want.tau))
        finite = torch.isfinite(want.tau)
        torch.testing.assert_close(got.tau[finite], want.tau[finite].to(got.tau.dtype), rtol=0, atol=2e-6)
        # a row of the output is a convex combination of rows of v: float32's error is in units of
        # the largest |v| (at spread 4.0 both schedules lie 5e-5 from the float64 output)
        torch.testing.assert_close(got.out, want.out.to(got.out.dtype), rtol=1e-5, atol=1e-5 * float(v.abs().max()),
                                   equal_nan=True)
        if route == "sweeps":
            assert torch.equal(got.read_masks[0].tiles, want.read_masks[0].tiles)
        else:
            assert not (got.read_masks[0].tiles & ~want.read_masks[0].tiles).any()
        assert torch.equal(got.block_masks[0].tiles, want.block_masks[0].tiles)
        assert not (want.block_masks[0].tiles & ~got.read_masks[0].tiles).any()


def _recorded_spills(interpreted, monkeypatch) -> list:
    """A list that gets the ``Spilled`` flags (int8 per query tile) of every Newton schedule the
    ``interpreted`` backend runs from here on, as the candidate kernel left them."""
    spilled = []
    launch = interpreted.launch

    def recording(kernel, grid):
        run = launch(kernel, grid)

        def call(**arguments):
            if kernel is interpreted.triton_newton.newton_schedule_kernel:  # after the candidate kernel
                spilled.append(arguments["Spilled"].clone())
            return run(**arguments)

        return call

    monkeypatch.setattr(interpreted, "launch", recording)
    return spilled


def test_crowded_query_tiles_spill(interpreted, monkeypatch):
    """``CROWDED_RATIO`` r: a query tile spills where a row holds more candidates than 1/r of its
    listed keys and than ``CROWDED_FLOOR``, even with room in the slots (256 here, more than any
    row's 400 keys hold above the reference at spread 1.0). Of 2 heads x 7 causal query tiles,
    floor 0: none spill at r 0 (only the slots), some at r 4, and more at r 8, those included;
    at r 8 with a floor of 256 (the slots), none. The same tau, output and tiles with p > 0 as
    the PyTorch schedule on every route."""
    monkeypatch.setenv(interpreted.CANDIDATES_ENV, "256")
    spilled = _recorded_spills(interpreted, monkeypatch)
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 400, 2, 32, generator=g) for _ in range(3))
    blocks, spec = A.SingleBlock(k, v, causal_visibility(400, 400, True, "cpu")), EntmaxSpec(1.5)
    want = A.entmax_forward(TB, q, blocks, spec, 32 ** -0.5, schedule="newton")
    for ratio, floor in ((0, 0), (4, 0), (8, 0), (8, 256)):
        monkeypatch.setattr(interpreted, "CROWDED_RATIO", ratio)
        monkeypatch.setattr(interpreted, "CROWDED_FLOOR", floor)
        got = A.entmax_forward(interpreted, q, blocks, spec, 32 ** -0.5, schedule="newton")
        torch.testing.assert_close(got.tau, want.tau.to(got.tau.dtype), rtol=0, atol=2e-6)
        torch.testing.assert_close(got.out, want.out.to(got.out.dtype), rtol=1e-5, atol=1e-5)
        assert torch.equal(got.block_masks[0].tiles, want.block_masks[0].tiles)
    by_ratio = [s.bool() for s in spilled]
    assert not by_ratio[0].any()
    assert 0 < int(by_ratio[1].sum()) < by_ratio[1].numel()
    assert not (by_ratio[1] & ~by_ratio[2]).any() and by_ratio[2].sum() > by_ratio[1].sum()
    assert not by_ratio[3].any()


def test_general_form_spills_only_past_the_slots(interpreted, monkeypatch):
    """In the general form (alpha 1.25) ``CROWDED_RATIO`` is not applied: with 448 slots (more
    than the 400 keys) and the ratio at 4 with no floor, no query tile spills, where at alpha 1.5
    the same settings spill some; tau, the output and the tiles with p > 0 are the PyTorch
    schedule's."""
    monkeypatch.setenv(interpreted.CANDIDATES_ENV, "448")
    monkeypatch.setattr(interpreted, "CROWDED_RATIO", 4)
    monkeypatch.setattr(interpreted, "CROWDED_FLOOR", 0)
    spilled = _recorded_spills(interpreted, monkeypatch)
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 400, 2, 32, generator=g) for _ in range(3))
    blocks = A.SingleBlock(k, v, causal_visibility(400, 400, True, "cpu"))
    for alpha in (1.25, 1.5):
        want = A.entmax_forward(TB, q, blocks, EntmaxSpec(alpha), 32 ** -0.5, schedule="newton")
        got = A.entmax_forward(interpreted, q, blocks, EntmaxSpec(alpha), 32 ** -0.5, schedule="newton")
        torch.testing.assert_close(got.tau, want.tau.to(got.tau.dtype), rtol=0, atol=2e-6)
        torch.testing.assert_close(got.out, want.out.to(got.out.dtype), rtol=1e-5, atol=1e-5)
        assert torch.equal(got.block_masks[0].tiles, want.block_masks[0].tiles)
    general, closed = (s.bool() for s in spilled)
    assert not general.any()
    assert closed.any()


def test_sampled_flat_query_tiles_spill_before_their_gather(interpreted, monkeypatch):
    """``SAMPLE_TILES``: a query tile whose fullest row's candidates in a sample of its full key
    tiles, which its gather takes first, scaled to its listed tiles, pass ``SAMPLE_MARGIN`` times
    its limit spills without the rest of its gather. Flat keys (every one a candidate of every row
    that sees it): all of key tiles 0 and 3, every other key of tiles 1, 2, 4 and 5; the others,
    and key tile 6, far below; 320 slots.
    The gather alone spills nothing (the last query tile's rows hold 256 candidates); with 2 of the
    full tiles sampled (margin 1), the last query tile, whose sample is tiles 0 and 3 of its 6
    listed ones (128 x 6 / 2 = 384 > 320), spills in both heads, and no other (query tile 5: tiles
    0 and 2 of 6 listed, 96 x 6 / 2 = 288). Tau, the output and the tiles with p > 0 are the
    PyTorch schedule's either way."""
    monkeypatch.setenv(interpreted.CANDIDATES_ENV, "320")
    spilled = _recorded_spills(interpreted, monkeypatch)
    g = torch.Generator().manual_seed(5)
    q = torch.zeros(1, 448, 2, 32)
    q[..., 0] = 1.0
    keys = torch.arange(448)
    flat = (keys < 384) & (((keys // 64) % 3 == 0) | (keys % 2 == 0))
    k = torch.zeros(1, 448, 2, 32)
    k[0, :, :, 0] = torch.where(flat[:, None], 2.0 + 0.001 * torch.rand(448, 2, generator=g), -3.0)
    v = torch.randn(1, 448, 2, 32, generator=g)
    blocks, spec = A.SingleBlock(k, v, causal_visibility(448, 448, True, "cpu")), EntmaxSpec(1.5)
    want = A.entmax_forward(TB, q, blocks, spec, 1.0, schedule="newton")
    monkeypatch.setattr(interpreted, "SAMPLE_FROM", 2)
    monkeypatch.setattr(interpreted, "SAMPLE_MARGIN", 1)
    for sample_tiles in (0, 2):
        monkeypatch.setattr(interpreted, "SAMPLE_TILES", sample_tiles)
        got = A.entmax_forward(interpreted, q, blocks, spec, 1.0, schedule="newton")
        torch.testing.assert_close(got.tau, want.tau.to(got.tau.dtype), rtol=0, atol=2e-6)
        torch.testing.assert_close(got.out, want.out.to(got.out.dtype), rtol=1e-5, atol=1e-5)
        assert torch.equal(got.block_masks[0].tiles, want.block_masks[0].tiles)
    last_tiles = torch.tensor([0, 0, 0, 0, 0, 0, 1] * 2, dtype=torch.int8)
    assert not spilled[0].any() and torch.equal(spilled[1].view(-1), last_tiles)


def test_gather_in_parts_changes_no_bit(interpreted, monkeypatch):
    """``GATHER_PARTS``: a query tile whose row has passed its limit after a part of its full key
    tiles gathers no further, and that changes no bit. 128 queries against 1024 keys (16 full key
    tiles), 320 slots, parts of 4 tiles, no sample: the first query tile's rows are flat on key tiles
    0-5 (384 candidates: past the limit in the second part, so it spills), the second's on 19 keys
    of every tile (304, under the limit only once every part is gathered: a stop that ends the
    gather early anywhere else leaves it a wrong tau). Tau, the output, the tiles with p > 0 and the
    spills are the same bits in one part as in four, in both heads, and tau within float32 rounding
    of the PyTorch schedule's."""
    monkeypatch.setenv(interpreted.CANDIDATES_ENV, "320")
    monkeypatch.setattr(interpreted, "SAMPLE_TILES", 0)
    monkeypatch.setattr(interpreted, "GATHER_PART_TILES", 2)
    spilled = _recorded_spills(interpreted, monkeypatch)
    g = torch.Generator().manual_seed(3)
    q = torch.zeros(1, 128, 2, 32)
    q[:, :64, :, 0] = 1.0
    q[:, 64:, :, 1] = 1.0
    keys = torch.arange(1024)
    k = torch.zeros(1, 1024, 2, 32)
    for dim, flat in ((0, keys < 384), (1, keys % 64 < 19)):
        k[0, :, :, dim] = torch.where(flat[:, None], 2.0 + 0.001 * torch.rand(1024, 2, generator=g), -3.0)
    v = torch.randn(1, 1024, 2, 32, generator=g)
    blocks, spec = A.SingleBlock(k, v, causal_visibility(128, 1024, False, "cpu")), EntmaxSpec(1.5)
    want = A.entmax_forward(TB, q, blocks, spec, 1.0, schedule="newton")
    runs = []
    for parts in (1, 4):
        monkeypatch.setattr(interpreted, "GATHER_PARTS", parts)
        runs.append(A.entmax_forward(interpreted, q, blocks, spec, 1.0, schedule="newton"))
    one, four = runs
    assert torch.equal(one.tau, four.tau) and torch.equal(one.out, four.out)
    assert torch.equal(one.block_masks[0].tiles, four.block_masks[0].tiles)
    assert torch.equal(spilled[0], spilled[1])
    assert torch.equal(spilled[1].view(-1), torch.tensor([1, 0] * 2, dtype=torch.int8))
    torch.testing.assert_close(four.tau, want.tau.to(four.tau.dtype), rtol=0, atol=2e-6)
    torch.testing.assert_close(four.out, want.out.to(four.out.dtype), rtol=1e-5, atol=1e-5)


def test_candidate_slots_setting_is_checked(monkeypatch):
    """``RING_ADASPLASH_CANDIDATES``: 0 or a multiple of the chunk, else a ValueError that names it."""
    from ring_adasplash.kernels import triton_backend

    monkeypatch.delenv(triton_backend.CANDIDATES_ENV, raising=False)
    assert triton_backend.candidate_slots() == triton_backend.CANDIDATES
    for value, slots in (("0", 0), ("128", 128)):
        monkeypatch.setenv(triton_backend.CANDIDATES_ENV, value)
        assert triton_backend.candidate_slots() == slots
    for value in ("100", "-64", "many"):
        monkeypatch.setenv(triton_backend.CANDIDATES_ENV, value)
        with pytest.raises(ValueError, match="RING_ADASPLASH_CANDIDATES must be 0 or a multiple of 64"):
            triton_backend.candidate_slots()


def test_newton_schedule_flat_rows_sum_to_one_with_float32_sums(interpreted, monkeypatch):
    """Flat causal rows of up to 2048 keys, alpha 1.5, through the interpreted kernels (float32
    sums, as on the GPU): rows sum to 1 within 1e-5. Far below tau the quadratic's upper bound
    cancels (``stats.newton_step``); taken there, it fell 3e-7 below tau and the rows summed to
    1 - 2.3e-5."""
    monkeypatch.setenv(A.SCHEDULE_ENV, "newton")
    g = torch.Generator().manual_seed(1)
    q, k = (0.01 * torch.randn(1, 2048, 2, 64, generator=g) for _ in range(2))
    q[..., 0] = 1
    vis = causal_visibility(2048, 2048, True, "cpu")
    run = A.entmax_forward(interpreted, q, A.SingleBlock(k, torch.ones_like(k), vis), EntmaxSpec(1.5), 1.0)
    assert (run.out - 1).abs().max().item() < 1e-5


@pytest.mark.parametrize("chunk", [1024, 16])
def test_lower_bound_mask_kernel_matches_the_pytorch_mask(interpreted, chunk, monkeypatch):
    """``triton_tiles.lower_bound_mask`` (interpreted) and ``S.lower_bound_mask``: random codes and
    bounds, empty rows, a partial last query tile, rows far below and above their reference, and
    (chunk 16) key tiles read over several steps; with ``within``, the same mask and-ed with it
    (also a ``within`` broadcast over the batch)."""
    from ring_adasplash.kernels import triton_tiles

    monkeypatch.setattr(triton_tiles, "MASK_CHUNK", chunk)
    g = torch.Generator().manual_seed(5)
    batch, heads, seqlen, num_k_tiles = 2, 3, 150, 40
    num_q_tiles = -(-seqlen // 64)
    codes = torch.randint(0, 256, (batch, heads, num_q_tiles, num_k_tiles), generator=g).to(torch.uint8)
    reference = torch.randn(batch, heads, seqlen, generator=g)
    lower = reference + torch.randn(batch, heads, seqlen, generator=g).clamp(min=-0.1) * 0.3
    lower[0, 0, :64] = reference[0, 0, :64] + 5.0  # above every code's gap: only code 255 kept
    empty = torch.rand(batch, heads, seqlen, generator=g) < 0.1
    empty[1, 2, 128:] = True  # the last query tile: every row empty, nothing kept
    expected = S.lower_bound_mask(codes, lower, reference, empty, 64)
    got = interpreted.lower_bound_mask(codes, lower, reference, empty)
    assert got.dtype == torch.bool and torch.equal(got, expected)
    assert 0 < expected.float().mean() < 1 and not expected[1, 2, -1].any()
    assert torch.equal(expected[0, 0, 0], codes[0, 0, 0] == 255)
    within = torch.rand(codes.shape, generator=g) < 0.5
    for w in (within, within[:1].expand(batch, -1, -1, -1)):
        got = interpreted.lower_bound_mask(codes, lower, reference, empty, w)
        assert torch.equal(got, expected & w) and torch.equal(S.lower_bound_mask(codes, lower, reference, empty, 64, w),
                                                              expected & w)
        assert (expected & ~w).any()  # the and-ing removes tiles


def test_newton_step_kernel_matches_the_pytorch_step(interpreted):
    """``triton_tau.newton_step_kernel`` (interpreted) and ``S.newton_step`` on the same
    state and sums (B, H, Sq), rows below, at and above tau, alpha 1.5, 1.25 and one per head
    (read by the kernel as float32: to its rounding)."""
    g = torch.Generator().manual_seed(3)
    rows = (2, 2, 50)
    for alpha, tol in ((1.5, 1e-12), (1.25, 1e-12), ((1.25, 1.7), 1e-6)):
        point = -torch.rand(rows, generator=g, dtype=torch.float64)
        sums = torch.stack((0.5 + 2 * torch.rand(rows, generator=g, dtype=torch.float64),
                            0.5 + torch.rand(rows, generator=g, dtype=torch.float64),
                            torch.randint(1, 20, rows, generator=g).double()), -1)
        start = S.NewtonState(point, point - 0.5, torch.zeros_like(point), torch.rand(rows, generator=g) < 0.2)
        expected = S.newton_step(start, sums, EntmaxSpec(alpha), 2e-6, 1e-6)
        copy = S.NewtonState(*(t.clone() for t in start))
        got = interpreted.newton_step(copy, sums, EntmaxSpec(alpha), 2e-6, 1e-6)
        for name, a, b in zip(S.NewtonState._fields, got, expected):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)
        assert (got.point != start.point).any() and torch.equal(got.point[start.done], start.point[start.done])


@pytest.mark.parametrize("alpha", (1.5, 2.0))
def test_newton_polish_kernel_matches_the_steps_pass_by_pass(interpreted, alpha, monkeypatch):
    """The closed form's exact finish in one launch (``triton_newton.newton_polish_kernel``,
    interpreted) against ``torch_blockwise.newton_polish`` on the same state, in a forward of flat
    causal rows (dozens of keys in the fine sub-bin near tau, so that some rows are not exact) of
    two heads, one of them spread: the rows not done move, the same points (to float32 rounding),
    done rows and the query tiles with none keep their point; and the forward's tau as
    the pass-by-pass schedule's."""
    calls = []
    kernel_polish = interpreted.newton_polish

    def checked_polish(problem, tiles, state, steps):
        start = S.NewtonState(*(t.clone() for t in state))
        cpu_problem = TB.problem(problem.q, problem.k, problem.v, problem.vis, problem.spec, problem.softmax_scale,
                                 problem.shift)
        want = TB.newton_polish(cpu_problem, tiles, S.NewtonState(*(t.clone() for t in state)), steps)
        got = kernel_polish(problem, tiles, state, steps)
        calls.append((start, got, want))
        return got

    monkeypatch.setattr(interpreted, "newton_polish", checked_polish)
    g = torch.Generator().manual_seed(5)
    q, k = (0.01 * torch.randn(1, 400, 2, 16, generator=g) for _ in range(2))
    q[..., 0] = 1
    q[:, :, 1] *= 30  # the second head: spread rows, most of them exact
    vis = causal_visibility(400, 400, True, "cpu")
    run = A.entmax_forward(interpreted, q, A.SingleBlock(k, k, vis), EntmaxSpec(alpha), 1.0, schedule="histogram")
    (start, got, want), = calls
    live = ~start.done
    assert live.any() and start.done.any()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    assert (got[live] != start.point[live]).any()
    assert torch.equal(got[start.done], start.point[start.done])
    # pass by pass, as where sums are merged between steps: the same tau
    monkeypatch.setattr(interpreted, "newton_polish", lambda *a: pytest.fail("the polish ran in one launch"))
    merged = A.LocalReduce()
    merged.complete = False
    by_pass = A.entmax_forward(interpreted, q, A.SingleBlock(k, k, vis), EntmaxSpec(alpha), 1.0, merged,
                               schedule="histogram")
    torch.testing.assert_close(by_pass.tau, run.tau, rtol=0, atol=2e-6)


@pytest.mark.parametrize("alpha", (1.5, 2.0))
def test_output_kernel_without_backward_sums(interpreted, alpha):
    """The output kernel with ``BACKWARD_SUMS`` off (a forward with no backward to come),
    interpreted: no ``out_u`` or ``u_sum``, and the output, support and nonzero tiles exactly as
    with them; those sums as ``torch_blockwise``'s."""
    q, k, v = random_qkv(1, 200, 200, 4, 2, 32, seed=21)
    vis = causal_visibility(200, 200, True, "cpu")
    runs = [A.entmax_forward(interpreted, q, A.SingleBlock(k, v, vis), EntmaxSpec(alpha), 32 ** -0.5,
                             backward_sums=sums) for sums in (True, False)]
    with_sums, without = runs
    assert without.out_u is None and without.u_sum is None
    assert torch.equal(without.out, with_sums.out) and torch.equal(without.support, with_sums.support)
    assert torch.equal(without.block_masks[0].tiles, with_sums.block_masks[0].tiles)
    want = A.entmax_forward(TB, q, A.SingleBlock(k, v, vis), EntmaxSpec(alpha), 32 ** -0.5)
    torch.testing.assert_close(with_sums.out_u, want.out_u.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(with_sums.u_sum, want.u_sum.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("alpha", (1.01, 1.25, 1.5, 2.0))
def test_entmax_over_tensors_runs_the_row_kernel(interpreted, alpha, monkeypatch):
    """``ring_adasplash.entmax`` on CPU tensors with the Triton backend selected: the row kernel
    (``triton_entmax``) against the ``entmax`` package on the families of
    ``test_entmax_function``; rows read block by block (``row_block`` below their
    length) give the same; NaN, -inf and masked rows; gradients as the PyTorch path's."""
    from test_entmax_function import _oracle, _rows, check_special_rows, special_rows

    from ring_adasplash import entmax

    calls = []
    rows_kernel = interpreted.entmax_rows
    monkeypatch.setattr(interpreted, "entmax_rows", lambda *a, **k: calls.append(1) or rows_kernel(*a, **k))
    for name, x in _rows(0).items():
        # along the last dim, and along dim 0 of a short leading axis (every program runs
        # interpreted, one row at a time)
        for dim in (-1, 0) if x.numel() <= 1000 else (-1,):
            got = entmax(x, alpha, dim)
            assert got.shape == x.shape and got.dtype == x.dtype
            assert (got.double() - _oracle(x.double(), alpha, dim)).abs().max().item() <= 1e-5, (name, dim)
        flat = x.reshape(-1, x.shape[-1])
        blocked = rows_kernel(flat, alpha, row_block=16 if flat.shape[-1] <= 64 else 1024)
        assert (blocked.double() - _oracle(flat.double(), alpha, -1)).abs().max().item() <= 1e-5, name
    assert calls
    check_special_rows(special_rows(), alpha)
    x = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(5))
    grad = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(6))
    a, b = x.clone().requires_grad_(), x.double().requires_grad_()
    (entmax(a, alpha, 1) * grad).sum().backward()
    monkeypatch.setenv("RING_ADASPLASH_BACKEND", "torch")
    (entmax(b, alpha, 1) * grad.double()).sum().backward()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5)


# alpha per head: the closed forms beside a general alpha (a GQA group of heads of different forms);
# the closed forms beside two general alphas; and no closed form (one general form). Every kernel
# reads alpha per head; where the forms differ, each head runs its own (``POWER_BY_HEAD``)
HEAD_ALPHAS = {"closed forms and one other": [1.5, 1.25, 2.0, 1.5],
               "closed forms and two others": [1.5, 1.25, 2.0, 1.75],
               "no closed form": [1.37, 1.81, 1.12, 1.64]}


def _alpha_gradient_case(device, dtype, tol, alphas, on_device=False):
    """Learnable alpha per head through the Triton kernels: out, dq, dk, dv and dalpha against
    ``entmax_bisect`` in float64; ``on_device``: given as a ``DeviceAlpha`` (every head in the
    general form's schedule, its alpha read from the device)."""
    from helpers import bisect_attention

    q, k, v = _structured(2, 300, 4, 2, 32, dtype, seed=17, device=device)
    alpha = torch.tensor(alphas, device=device, requires_grad=True)
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = adasplash_func(*inputs, alpha=DeviceAlpha(alpha) if on_device else alpha)
    ref_in = [t.detach().double().cpu().requires_grad_() for t in (q, k, v, alpha)]
    ref = bisect_attention(*ref_in[:3], ref_in[3])
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (*inputs, alpha), grad.to(device, dtype))
    expected = torch.autograd.grad(ref, ref_in, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dalpha"), (out, *got), (ref, *expected)):
        assert torch.isfinite(a).all(), name
        assert _rel(a.double().cpu(), b) < tol, (name, _rel(a.double().cpu(), b))


@pytest.mark.parametrize("on_device", [False, True], ids=["host read", "DeviceAlpha"])
@pytest.mark.parametrize("alphas", list(HEAD_ALPHAS.values()), ids=list(HEAD_ALPHAS))
def test_interpreted_learnable_alpha_per_head(interpreted, alphas, on_device):
    _alpha_gradient_case("cpu", torch.float32, 2e-2, alphas, on_device)


@pytest.mark.gpu
@pytest.mark.parametrize("on_device", [False, True], ids=["host read", "DeviceAlpha"])
@pytest.mark.parametrize("alphas", list(HEAD_ALPHAS.values()), ids=list(HEAD_ALPHAS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_learnable_alpha_per_head(dtype, alphas, on_device, monkeypatch):
    monkeypatch.delenv("RING_ADASPLASH_BACKEND", raising=False)
    _alpha_gradient_case("cuda", dtype, 2e-2 if dtype == torch.bfloat16 else 1e-4, alphas, on_device)


@pytest.mark.gpu
def test_gpu_device_alpha_forward_waits_for_nothing(monkeypatch):
    """A ``DeviceAlpha``'s forward, once compiled and captured, makes no call that waits for the
    device (``torch.cuda.set_sync_debug_mode("error")`` raises on one); the same alpha as a plain
    tensor is read on the host, which that mode catches."""
    monkeypatch.delenv("RING_ADASPLASH_BACKEND", raising=False)
    q, k, v = _structured(1, 1024, 4, 2, 64, torch.bfloat16, seed=5, device="cuda")
    alpha = torch.tensor([1.3, 1.6, 1.8, 1.2], device="cuda", requires_grad=True)
    with torch.no_grad():
        for _ in range(3):  # compiled, then captured as a CUDA graph, then replayed
            adasplash_func(q, k, v, alpha=DeviceAlpha(alpha))
            adasplash_func(q, k, v, alpha=alpha)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            adasplash_func(q, k, v, alpha=DeviceAlpha(alpha))
            with pytest.raises(RuntimeError, match="synchroniz"):
                adasplash_func(q, k, v, alpha=alpha)
        finally:
            torch.cuda.set_sync_debug_mode(0)


def _split_alpha_sums_case(backend, alpha, device="cpu"):
    """dL/dalpha's row sums as the forward's ``AlphaSplit`` and the dQ kernel's dot product give
    them, against the dQ kernel's term-by-term sums in the same backward (float32): 64 candidate
    slots, too few for the flat rows' keys, so one call holds query tiles of both kinds; NaN
    rows, rows with no visible key and a window as in the schedule routes above. A forward in
    chunks of queries gives the same forward sums."""
    g = torch.Generator(device=device).manual_seed(3)
    q, k, v = (torch.randn(1, 400, 2, 32, generator=g, device=device) for _ in range(3))
    q[:, :200] *= 0.02  # flat rows: more candidates than the slots
    q[0, 333, 1, 0] = float("nan")
    do = torch.randn(1, 400, 2, 32, generator=g, device=device)
    keep = torch.ones(1, 400, dtype=torch.bool, device=device)
    keep[0, :70] = False
    cases = [causal_visibility(400, 400, True, device),
             padded_visibility(keep, 400, True, window_size=(89, 0), sink_tokens=2)]
    spec, scale = EntmaxSpec(alpha), 32 ** -0.5
    for vis in cases:
        sums = {}
        for split in (True, False):
            blocks = A.SingleBlock(k, v, vis)
            fwd = A.entmax_forward(backend, q, blocks, spec, scale, alpha_sums=split)
            assert (fwd.alpha_split is not None) == split
            if split:  # both kinds of query tile in one call
                opened = fwd.alpha_split.open
                assert opened.any() and not opened.all()
            sums[split] = A.entmax_backward(backend, q, do, blocks, fwd, spec, scale, alpha_grad=True)[3]
            if split:  # in chunks of queries (a long call), the same sums (defined on the closed tiles' rows)
                chunked = A.entmax_forward_in_query_chunks(backend, q, k, v, vis, spec, scale, 128,
                                                           alpha_sums=True).alpha_split
                assert torch.equal(chunked.open, opened)
                closed = (opened == 0).repeat_interleave(backend.BLOCK_M, -1)[..., :q.shape[1]]  # (B, H, S)
                assert torch.equal(chunked.c_sum[closed], fwd.alpha_split.c_sum[closed])
                assert torch.equal(chunked.out_c[closed.transpose(1, 2)], fwd.alpha_split.out_c[closed.transpose(1, 2)])
        assert torch.equal(torch.isnan(sums[True]), torch.isnan(sums[False]))
        finite = torch.isfinite(sums[False])
        largest = sums[False][finite].abs().max().item()
        assert largest > 1e-3
        # float32 rounding of the rows' terms (the two forms sum them in other orders), and the
        # heads' totals, which the gradient with respect to alpha takes: rows of both signs, so
        # their rounding is measured against the sum of the rows' magnitudes, not the total
        torch.testing.assert_close(sums[True][finite], sums[False][finite], rtol=1e-4, atol=4e-6 * largest)
        magnitude = sums[False].abs().nansum(-1)
        total_error = (sums[True].nansum(-1) - sums[False].nansum(-1)).abs()
        assert (total_error <= 1e-5 * magnitude).all(), (total_error / magnitude).max().item()


@pytest.mark.parametrize("alpha", [1.5, 1.25])
def test_interpreted_alpha_sums_split_between_forward_and_backward(interpreted, alpha, monkeypatch):
    monkeypatch.setenv(interpreted.CANDIDATES_ENV, "64")
    _split_alpha_sums_case(interpreted, alpha)


@pytest.mark.gpu
@pytest.mark.parametrize("alpha", [1.5, 1.25])
def test_gpu_alpha_sums_split_between_forward_and_backward(alpha, monkeypatch):
    from ring_adasplash.kernels import triton_backend

    monkeypatch.setenv(triton_backend.CANDIDATES_ENV, "64")
    monkeypatch.setattr(triton_backend, "CROWDED_RATIO", 0)  # as the interpreted backend: the slots decide
    _split_alpha_sums_case(triton_backend, alpha, "cuda")


def _one_launch_case(device, dtype):
    """Heads of four different alphas, none 1.5 or 2, run in one launch per kernel (the kernels
    read each head's alpha): out, dq, dk and dv as each head run alone with its alpha as a float,
    within rounding (dk and dv sum the two query heads of a key head in the kernel or after; the
    interpreter computes with a float argument in float64 where a kernel takes it as float32)."""
    alphas = [1.37, 1.81, 1.12, 1.64]
    q, k, v = _structured(1, 200, 4, 2, 32, dtype, seed=19, device=device)
    grad = torch.randn(q.shape, device=device, generator=torch.Generator(device).manual_seed(1)).to(dtype)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = adasplash_func(*inputs, alpha=torch.tensor(alphas, device=device))
    dq, dk, dv = torch.autograd.grad(out, inputs, grad)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    dk_heads, dv_heads = torch.zeros_like(dk, dtype=torch.float64), torch.zeros_like(dv, dtype=torch.float64)
    for h, alpha in enumerate(alphas):
        one = [t.clone().requires_grad_() for t in (q[:, :, h:h + 1], k[:, :, h // 2:h // 2 + 1],
                                                     v[:, :, h // 2:h // 2 + 1])]
        out_h = adasplash_func(*one, alpha=alpha)
        grads = torch.autograd.grad(out_h, one, grad[:, :, h:h + 1])
        assert _rel(out[:, :, h:h + 1].double(), out_h.double()) < tol, h
        assert _rel(dq[:, :, h:h + 1].double(), grads[0].double()) < tol, h
        dk_heads[:, :, h // 2] += grads[1][:, :, 0].double()
        dv_heads[:, :, h // 2] += grads[2][:, :, 0].double()
    assert _rel(dk.double(), dk_heads) < tol and _rel(dv.double(), dv_heads) < tol


def test_interpreted_alphas_per_head_in_one_launch(interpreted):
    _one_launch_case("cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("alpha", [1.5, (1.5, 2.0, 1.3)])
def test_gpu_relative_kernel_is_stats_relative(alpha):
    from ring_adasplash.kernels import triton_backend

    check_relative_kernel(triton_backend, alpha, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_alphas_per_head_in_one_launch(dtype, monkeypatch):
    monkeypatch.delenv("RING_ADASPLASH_BACKEND", raising=False)
    _one_launch_case("cuda", dtype)


@pytest.mark.gpu
@pytest.mark.filterwarnings("error:ring_adasplash. CUDA graph capture")
def test_gpu_per_head_alphas_run_as_a_cuda_graph(monkeypatch):
    """A forward with a different alpha per head (1.5 and 2 beside two others: each head runs its
    own form) is captured as a CUDA graph at its second call, as a one-alpha forward is (its
    per-head constants are made on the device once, not copied from the host in the capture),
    and the replays give the eager output."""
    monkeypatch.delenv("RING_ADASPLASH_BACKEND", raising=False)
    monkeypatch.setenv("RING_ADASPLASH_CUDA_GRAPHS", "on")
    q, k, v = _structured(1, 512, 4, 2, 64, torch.bfloat16, seed=7)
    alpha = torch.tensor([1.5, 1.25, 2.0, 1.75], device="cuda")
    with torch.no_grad():
        eager = adasplash_func(q, k, v, alpha=alpha)
        for _ in range(2):  # the capture, then a replay
            assert torch.equal(adasplash_func(q, k, v, alpha=alpha), eager)
