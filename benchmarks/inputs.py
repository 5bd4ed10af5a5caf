"""Synthetic attention inputs with controllable block sparsity.

All generators return ``q, k, v`` in the public layout (batch, seqlen, heads, head_dim),
are deterministic given ``seed`` (a private generator on ``device`` is used), and need
O(seqlen * head_dim) memory besides the outputs themselves.

Families
--------
structured: q and k are ``amp * P + noise`` where P is a sinusoidal position code.
    q_i . k_j / sqrt(D) ~ amp^2 * sum_f cos((i - j) w_f) / sqrt(D): the scores peak on
    the diagonal and decay with |i - j|, so larger ``amp`` gives sparser entmax
    attention (mostly near-diagonal tiles survive).
sinkwindow: unit Gaussian q, k plus (a) a common direction shared by all queries and
    the first ``n_sinks`` keys (attention sinks) and (b) a slowly varying random
    component shared by q_i and k_i, so that tokens within about ``window`` positions
    score high (local window).
scattered: content-based attention with no locality (retrieval heads; every head at
    initialisation once ``amp`` is small): every key and every query joins one of ``clusters``
    random content clusters; a query's high-scoring keys are the keys of its cluster, at random
    positions, about one key in ``clusters``, so in nearly every key tile. Larger ``amp``
    gives sparser rows, not sparser tiles.
mixed: one call in which the first half of the heads are ``structured`` at amp 2.0 (local,
    >= 0.99 block-sparse) and the other half ``scattered`` at ``amp``, as a real layer mixes
    local and content heads.
captured: q, k, v of a trained model, saved by ``launch/train.py --capture PATH`` (the scripts'
    ``--captured PATH`` sets ``CAPTURED_PATH``); ``amp`` is the layer's index, and the first
    ``seqlen`` tokens of the first ``batch`` sequences are taken (heads and head_dim as saved).
"""

import math

import torch


def _generator(device, seed):
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(seed)
    return gen


def _gaussian(shape, gen, dtype, device):
    return torch.randn(shape, generator=gen, dtype=dtype, device=device)


def sinusoidal_code(seqlen, head_dim, device):
    """P[i] = (cos(i w_f), sin(i w_f)) for f = 0..D/2-1 with w_f = 4096 ** (-f / (D/2)).

    Shape (seqlen, head_dim), float32. Angles are formed in float64 so that large
    positions keep their phase.
    """
    half = head_dim // 2
    freqs = 4096.0 ** (-torch.arange(half, dtype=torch.float64, device=device) / half)
    angles = torch.arange(seqlen, dtype=torch.float64, device=device)[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


def structured_qkv(batch, seqlen, heads, head_dim, amp, dtype, device, kv_heads=None, seed=0):
    """q, k = amp * P + N(0, 1) (same P for every head and batch entry); v = N(0, 1)."""
    kv_heads = kv_heads or heads
    gen = _generator(device, seed)
    code = (amp * sinusoidal_code(seqlen, head_dim, device)).to(dtype)[None, :, None, :]
    q = _gaussian((batch, seqlen, heads, head_dim), gen, dtype, device).add_(code)
    k = _gaussian((batch, seqlen, kv_heads, head_dim), gen, dtype, device).add_(code)
    v = _gaussian((batch, seqlen, kv_heads, head_dim), gen, dtype, device)
    return q, k, v


def sink_window_qkv(batch, seqlen, heads, head_dim, amp, dtype, device, kv_heads=None, seed=0,
                    n_sinks=4, window=256, sink_scale=1.0):
    """Random q, k, v with attention sinks and a local window.

    * window: anchors A_m ~ N(0, I) every ``window`` tokens, linearly interpolated to
      W(i) and rescaled to norm sqrt(D); q_i += amp * W(i), k_j += amp * W(j), so nearby
      tokens get a score bonus of about amp^2 * sqrt(D) that fades over ~``window`` tokens.
    * sinks: a direction u with norm sqrt(D); every query gets + amp * u and the first
      ``n_sinks`` keys get + amp * sink_scale * u (a bonus of about
      sink_scale * amp^2 * sqrt(D) towards the sinks for every query).
    """
    kv_heads = kv_heads or heads
    gen = _generator(device, seed)
    q = _gaussian((batch, seqlen, heads, head_dim), gen, dtype, device)
    k = _gaussian((batch, seqlen, kv_heads, head_dim), gen, dtype, device)
    v = _gaussian((batch, seqlen, kv_heads, head_dim), gen, dtype, device)

    anchors = _gaussian((seqlen // window + 2, head_dim), gen, torch.float32, device)
    pos = torch.arange(seqlen, device=device, dtype=torch.float32) / window
    left = pos.floor().long()
    frac = (pos - left)[:, None]
    local = (1 - frac) * anchors[left] + frac * anchors[left + 1]
    local = local * (math.sqrt(head_dim) / local.norm(dim=-1, keepdim=True))
    local = (amp * local).to(dtype)[None, :, None, :]

    sink = _gaussian((head_dim,), gen, torch.float32, device)
    sink = sink * (math.sqrt(head_dim) / sink.norm())
    q.add_(local).add_((amp * sink).to(dtype))
    k.add_(local)
    k[:, :n_sinks].add_((amp * sink_scale * sink).to(dtype))
    return q, k, v


def scattered_qkv(batch, seqlen, heads, head_dim, amp, dtype, device, kv_heads=None, seed=0, clusters=64):
    """q, k = amp * (the centroid of a random cluster, norm sqrt(D)) + N(0, 1), clusters drawn per
    token and head; v = N(0, 1). A query scores about amp^2 sqrt(D) higher on the keys of its
    own cluster, wherever they are."""
    kv_heads = kv_heads or heads
    gen = _generator(device, seed)
    q = _gaussian((batch, seqlen, heads, head_dim), gen, dtype, device)
    k = _gaussian((batch, seqlen, kv_heads, head_dim), gen, dtype, device)
    v = _gaussian((batch, seqlen, kv_heads, head_dim), gen, dtype, device)
    centroids = _gaussian((kv_heads, clusters, head_dim), gen, torch.float32, device)
    centroids = amp * math.sqrt(head_dim) * centroids / centroids.norm(dim=-1, keepdim=True)
    kv_of_query_head = torch.arange(heads, device=device) // (heads // kv_heads)
    for x, head_of in ((q, kv_of_query_head), (k, torch.arange(kv_heads, device=device))):
        cluster = torch.randint(0, clusters, x.shape[:3], generator=gen, device=device)
        x.add_(centroids[head_of[None, None, :], cluster].to(dtype))
    return q, k, v


def mixed_qkv(batch, seqlen, heads, head_dim, amp, dtype, device, kv_heads=None, seed=0):
    """The first half of the (query and key) heads ``structured`` at amp 2.0, the rest
    ``scattered`` at ``amp``."""
    kv_heads = kv_heads or heads
    if heads % 2 or kv_heads % 2:
        raise ValueError(f"mixed needs an even number of heads and kv heads; got {heads} and {kv_heads}")
    local = structured_qkv(batch, seqlen, heads // 2, head_dim, 2.0, dtype, device, kv_heads // 2, seed)
    content = scattered_qkv(batch, seqlen, heads // 2, head_dim, amp, dtype, device, kv_heads // 2, seed + 1)
    return tuple(torch.cat(pair, dim=2) for pair in zip(local, content))


CAPTURED_PATH = None  # the file of the ``captured`` family


def captured_qkv(batch, seqlen, heads, head_dim, amp, dtype, device, kv_heads=None, seed=0):
    """Layer ``int(amp)`` of the capture at ``CAPTURED_PATH``, cut to ``batch`` x ``seqlen``;
    ``heads`` None: the capture's heads (and kv heads)."""
    if CAPTURED_PATH is None:
        raise ValueError("the captured family needs --captured PATH (a file of launch/train.py --capture)")
    layers = torch.load(CAPTURED_PATH, map_location="cpu")["layers"]
    layer = int(amp)
    if not 0 <= layer < len(layers) or layer != amp:
        raise ValueError(f"amp picks the layer of a capture: an integer in [0, {len(layers)}); got {amp}")
    q, k, v = (layers[layer][name] for name in "qkv")
    if heads is None:
        heads, kv_heads = q.shape[2], kv_heads or k.shape[2]
    want = {"batch": (batch, q.shape[0]), "seqlen": (seqlen, q.shape[1]), "heads": (heads, q.shape[2]),
            "head_dim": (head_dim, q.shape[3]), "kv_heads": (kv_heads or heads, k.shape[2])}
    if any(asked > have for asked, have in (want["batch"], want["seqlen"])) or any(
            asked != have for asked, have in (want["heads"], want["head_dim"], want["kv_heads"])):
        raise ValueError(f"the capture holds batch {q.shape[0]}, seqlen {q.shape[1]}, heads {q.shape[2]}, "
                         f"kv heads {k.shape[2]}, head_dim {q.shape[3]}; asked for {({n: a for n, (a, _) in want.items()})}")
    return tuple(x[:batch, :seqlen].to(device=device, dtype=dtype).contiguous() for x in (q, k, v))


FAMILIES = {"structured": structured_qkv, "sinkwindow": sink_window_qkv, "scattered": scattered_qkv,
            "mixed": mixed_qkv, "captured": captured_qkv}


def make_qkv(family, *args, **kwargs):
    """Dispatch to the generator named ``family`` (a key of FAMILIES)."""
    return FAMILIES[family](*args, **kwargs)
