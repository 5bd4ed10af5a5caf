"""Where the coarse histogram pass spends its time: variants of its loop on the same tile lists.

    python benchmarks/histogram_variants.py

``full_pass`` is the shipped pass (``triton_refine.histogram_kernel``: counts, packed words).
Variants: 0 count, sum u and sum u^2 per bin, one distinct bin of every row at a time, atomics
(the earlier design); 5 counts from row sums of packed words (4 bins of 8 bits to an int32),
unpacked into (rows, bins) every tile; 6 the same with one (rows, 4) accumulator per word; 7 int64
words of 16-bit fields, summed across tiles and unpacked once; 2 binning and the any-key test
only; 9 the dot and a max only. Each variant's counts are checked against the pass.
Under TRITON_INTERPRET=1 it runs a small CPU smoke test instead of timing.
"""
import sys, os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch, triton, triton.language as tl
from triton.testing import do_bench
from inputs import structured_qkv
from ring_adasplash.kernels import stats as S, triton_backend as TB
from ring_adasplash.kernels.triton_stats import ADD, MAX, MIN, listed_tiles, query_tile, tile_logits
from ring_adasplash.kernels.triton_refine import add_moments_by_row
from ring_adasplash.kernels.visibility import causal_visibility


@triton.jit
def coarse_variant(Q, K, Q_limit, Q_doc, K_pos, K_doc, K_full_lo, K_full_hi, Tile_count, Tile_index, Target, Bins, Out, Keep,
                   stride_qb, stride_qs, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh, stride_kd,
                   seqlen_q, seqlen_k, num_heads, num_k_tiles, scale_z,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   NUM_BINS: tl.constexpr, VARIANT: tl.constexpr):
    tile_q, bh, b, h, offs_m, in_q, q, q_limit, q_doc = query_tile(
        Q, Q_limit, Q_doc, stride_qb, stride_qs, stride_qh, stride_qd, seqlen_q, num_heads, HEAD_DIM, BLOCK_M, False)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = bh.to(tl.int64) * seqlen_q + offs_m
    K = K + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    target = tl.load(Target + rows, mask=in_q, other=0.0)
    bins = tl.load(Bins + rows, mask=in_q, other=0.0)
    count, Tile_index, tile_row, full_lo, full_hi = listed_tiles(Tile_count, Tile_index, K_full_lo, K_full_hi,
                                                                 tile_q, bh, num_k_tiles)
    dummy = tl.full([BLOCK_M], 0.0, tl.float32)
    acc_n = tl.full([BLOCK_M, NUM_BINS], 0, tl.int32)
    acc0 = tl.full([BLOCK_M, 4], 0, tl.int32)
    acc1 = tl.full([BLOCK_M, 4], 0, tl.int32)
    acc2 = tl.full([BLOCK_M, 4], 0, tl.int32)
    acc3 = tl.full([BLOCK_M, 4], 0, tl.int32)
    p0 = tl.full([BLOCK_M], 0, tl.int64)
    p1 = tl.full([BLOCK_M], 0, tl.int64)
    p2 = tl.full([BLOCK_M], 0, tl.int64)
    p3 = tl.full([BLOCK_M], 0, tl.int64)
    for i in range(0, count):
        tile_k = tl.load(Tile_index + i)
        offs_n = tile_k * BLOCK_N + tl.arange(0, BLOCK_N)
        z = tile_logits(q, K, K_pos, K_doc, q_limit, q_doc, offs_m, offs_n, offs_d, stride_ks, stride_kd,
                        seqlen_q, seqlen_k, scale_z, (tile_k >= full_lo) & (tile_k < full_hi), False, False)
        if VARIANT == 9:  # dot only
            dummy += tl.reduce(z, 1, MAX)
        else:
            scaled = z * (NUM_BINS - 1)
            idx = tl.floor(scaled)
            local = tl.maximum(target[:, None] - idx, 0.0)
            keep = local < bins[:, None]
            if VARIANT == 2:  # binning and the any test only
                anyk = tl.reduce(tl.reduce(keep.to(tl.int32), 1, MAX), 0, MAX)
                tl.store(Keep + tile_row + tile_k, anyk.to(tl.int8))
            elif VARIANT == 0:  # moments, one distinct bin per row at a time (the earlier design)
                kept = tl.reduce(tl.reduce(keep.to(tl.int32), 1, ADD), 0, ADD)
                if kept > 0:
                    tl.store(Keep + tile_row + tile_k, 1)
                    add_moments_by_row(Out, rows, local, scaled - idx, keep, NUM_BINS)
            else:  # counts only: each kept key sets one field of the word of its 4 bins
                kept = tl.reduce(tl.reduce(keep.to(tl.int32), 1, MAX), 0, MAX)
                if kept > 0:
                    tl.store(Keep + tile_row + tile_k, 1)
                    li = tl.where(keep, local, 2 * NUM_BINS).to(tl.int32)
                    word = li >> 2
                    if VARIANT == 5:  # 8-bit fields of int32 words, one row sum per word
                        one = 1 << ((li & 3) * 8)
                        cols = tl.arange(0, NUM_BINS)
                        for w in tl.static_range(NUM_BINS // 4):
                            packed = tl.reduce(tl.where(word == w, one, 0), 1, ADD)
                            acc_n += tl.where((cols // 4)[None, :] == w,
                                              (packed[:, None] >> ((cols % 4) * 8)[None, :]) & 255, 0)
                    elif VARIANT == 6:  # 8-bit fields of 4 int32 words, (BM, 4) accumulators
                        one = 1 << ((li & 3) * 8)
                        sh = (tl.arange(0, 4) * 8)[None, :]
                        acc0 += (tl.reduce(tl.where(word == 0, one, 0), 1, ADD)[:, None] >> sh) & 255
                        acc1 += (tl.reduce(tl.where(word == 1, one, 0), 1, ADD)[:, None] >> sh) & 255
                        acc2 += (tl.reduce(tl.where(word == 2, one, 0), 1, ADD)[:, None] >> sh) & 255
                        acc3 += (tl.reduce(tl.where(word == 3, one, 0), 1, ADD)[:, None] >> sh) & 255
                    else:  # VARIANT 7: 16-bit fields of 4 int64 words, packed across tiles
                        one = tl.full([BLOCK_M, BLOCK_N], 1, tl.int64) << ((li & 3) * 16).to(tl.int64)
                        p0 += tl.reduce(tl.where(word == 0, one, 0), 1, ADD)
                        p1 += tl.reduce(tl.where(word == 1, one, 0), 1, ADD)
                        p2 += tl.reduce(tl.where(word == 2, one, 0), 1, ADD)
                        p3 += tl.reduce(tl.where(word == 3, one, 0), 1, ADD)
    if VARIANT == 7:
        sh = (tl.arange(0, 4) * 16).to(tl.int64)[None, :]
        acc0 = ((p0[:, None] >> sh) & 65535).to(tl.int32)
        acc1 = ((p1[:, None] >> sh) & 65535).to(tl.int32)
        acc2 = ((p2[:, None] >> sh) & 65535).to(tl.int32)
        acc3 = ((p3[:, None] >> sh) & 65535).to(tl.int32)
    if VARIANT == 6 or VARIANT == 7:
        Row = Out + rows[:, None] * (3 * NUM_BINS) + tl.arange(0, 4)[None, :]
        tl.store(Row, acc0.to(tl.float32), mask=in_q[:, None])
        tl.store(Row + 4, acc1.to(tl.float32), mask=in_q[:, None])
        tl.store(Row + 8, acc2.to(tl.float32), mask=in_q[:, None])
        tl.store(Row + 12, acc3.to(tl.float32), mask=in_q[:, None])
    if VARIANT == 5:
        Row = Out + rows[:, None] * (3 * NUM_BINS) + tl.arange(0, NUM_BINS)[None, :]
        tl.store(Row, acc_n.to(tl.float32), mask=in_q[:, None])
    if VARIANT == 9:
        tl.store(Out + rows, dummy, mask=in_q)


SMOKE = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if SMOKE else "cuda"
if SMOKE:
    do_bench = lambda fn, warmup, rep: (fn(), 0.0)[1]  # noqa


def main():
    for seqlen, amp, dim in ([(512, 1.5, 64)] if SMOKE else [(32768, 1.5, 64), (32768, 1.0, 64), (8192, 2.0, 64)]):
        q, k, v = structured_qkv(1, seqlen, 16, dim, amp, torch.bfloat16 if not SMOKE else torch.float32, DEV)
        vis = causal_visibility(seqlen, seqlen, True, DEV)
        scale_z = 0.5 / dim ** 0.5
        row_max, tau_floor, gap = TB.max_pass(q, k, vis, scale_z, 64, 64, 1.5)
        mask = S.histogram_mask(gap)
        ref_hist, _ = TB.histogram_pass(q, k, vis, scale_z, 64, 64, row_max, gap.clone(), mask, tau_floor)
        counts, index = TB._tile_lists(mask)
        target = S.bin_reference(row_max).contiguous()
        bins = S.kept_bins(row_max, tau_floor)
        nq = -(-seqlen // 64)
        line = [f"S={seqlen} amp={amp} share={mask.float().mean().item():.3f}"]
        line.append(f"full_pass={do_bench(lambda: TB.histogram_pass(q, k, vis, scale_z, 64, 64, row_max, gap.clone(), mask, tau_floor), warmup=25, rep=100):.3f}")
        for variant in (0, 5, 6, 7, 2, 9):
            nw = 4
            out = torch.zeros(1, 16, seqlen, 3, 16, device=DEV)
            keep = torch.zeros(mask.shape, device=DEV, dtype=torch.int8)
            def run():
                if variant == 0:  # adds atomically
                    out.zero_()
                coarse_variant[(nq, 16)](q, k, *TB._vis_args(vis, q.device), *TB._key_tile_ranges(vis, q.device)[2:],
                                         counts, index, target, bins, out, keep, *q.stride(), *k.stride(),
                                         seqlen, seqlen, 16, mask.shape[-1], scale_z,
                                         GROUP=1, HEAD_DIM=dim, BLOCK_M=64, BLOCK_N=64, NUM_BINS=16, VARIANT=variant,
                                         num_warps=nw, num_stages=3)
            run()
            ok = ""
            if variant != 2 and variant != 9:  # counts against the shipped pass's
                ok = "ok" if torch.equal(out[..., 0, :], ref_hist) else f"DIFF {(out[..., 0, :] - ref_hist).abs().max().item():.3g}"
            line.append(f"v{variant}={do_bench(run, warmup=25, rep=100):.3f}{ok}")
        print(" ".join(line), flush=True)


main()
