"""Integrations against the float64 reference: DeepSpeed-Ulysses DistributedAttention wrapping
entmax attention (gloo, 2 ranks), a tiny randomly initialised Llama of Hugging Face transformers
(one device and sequence-parallel), and torch.compile of entmax attention, Ulysses and USP."""
import copy

import pytest
import torch
import torch.distributed as dist

from distributed_utils import run_distributed, value_error_message
from helpers import gather_sequence, random_qkv, reference_with_grads, rel_err
from test_distributed_attention import TOL

# ----------------------------------------------------------------------------------------------
# DeepSpeed
# ----------------------------------------------------------------------------------------------


def _deepspeed_case(rank, world):
    import deepspeed.ops

    # DeepSpeed compiles a shared-memory C++ op when its CPU backend starts (about a minute on a
    # cold cache); the all-to-all used here runs on gloo without it.
    getattr(deepspeed.ops, "__compatible_ops__", {})["deepspeed_shm_comm"] = False
    from ring_adasplash.integrations.deepspeed import (BATCH_DIM, deepspeed_adasplash_func,
                                                       deepspeed_distributed_attention)
    from ring_adasplash.parallel import layouts

    errors = {}
    for layout, alpha, causal, seed in (("bshd", 1.5, True, 1), ("sbhd", 1.3, False, 2), ("functional", 2.0, True, 3)):
        seqlen = 2 * world * 48
        q, k, v, grad_out = random_qkv(1, seqlen, seqlen, 4, 2, 16, seed=seed, grad_out=True)
        local = [layouts.shard(t, "contiguous", rank, world).requires_grad_() for t in (q, k, v)]
        if layout == "functional":
            out = deepspeed_adasplash_func(*local, alpha=alpha, causal=causal)
        else:
            attention = deepspeed_distributed_attention(alpha=alpha, causal=causal, layout=layout)
            to_layout = (lambda t: t.transpose(0, 1)) if layout == "sbhd" else (lambda t: t)
            out = to_layout(attention(*(to_layout(t) for t in local), BATCH_DIM[layout]))
        grads = torch.autograd.grad(out, local, layouts.shard(grad_out, "contiguous", rank, world))
        got = [gather_sequence(t, "contiguous", world) for t in (out, *grads)]
        errors[layout] = [rel_err(a, b) for a, b in zip(got, reference_with_grads(q, k, v, grad_out, alpha, causal))]
    return errors


@pytest.mark.distributed
def test_deepspeed_distributed_attention_matches_float64():
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    errors = run_distributed(_deepspeed_case, 2, timeout=300)[0]
    bad = {name: errs for name, errs in errors.items() if max(errs) >= TOL}
    assert not bad, f"relative errors (out, dq, dk, dv) above {TOL}: {bad}"


# ----------------------------------------------------------------------------------------------
# Hugging Face transformers
# ----------------------------------------------------------------------------------------------


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """float64 reference in the transformers calling convention: (b, h, s, d) in, (b, s, h, d) out,
    with the 4D mask transformers builds for SDPA (padding, windows) where there is one."""
    from ring_adasplash.reference import entmax_attention_reference

    q, k, v = (x.transpose(1, 2).double() for x in (query, key, value))
    alpha = getattr(module.config, "entmax_alpha", 1.5)
    if attention_mask is None:
        return entmax_attention_reference(q, k, v, alpha, module.is_causal, scaling).to(query.dtype), None
    keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    keep = keep[..., :k.shape[1]].expand(q.shape[0], 1, q.shape[1], k.shape[1])
    rows = [entmax_attention_reference(q[b:b + 1], k[b:b + 1], v[b:b + 1], alpha, softmax_scale=scaling,
                                       mask=keep[b, 0]) for b in range(q.shape[0])]
    return torch.cat(rows).to(query.dtype), None


def _tiny_llamas(implementations, seed=0, family="llama", **extra):
    """The same randomly initialised tiny Llama (GQA, alpha 1.3) once per attention implementation;
    ``family="mistral"``: a tiny Mistral (``extra``: e.g. its sliding_window)."""
    from transformers import (AttentionInterface, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM)
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from ring_adasplash.integrations import register_transformers

    register_transformers()
    AttentionInterface.register("entmax_reference", _reference_attention)
    AttentionMaskInterface.register("entmax_reference", sdpa_mask)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "mistral": (MistralConfig, MistralForCausalLM),
                                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    config = config_class(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          entmax_alpha=1.3, **extra)
    torch.manual_seed(seed)
    first = model_class(copy.deepcopy(config))
    models = []
    for name in implementations:
        model = model_class(copy.deepcopy(config))
        model.load_state_dict(first.state_dict())
        model.set_attn_implementation(name)
        models.append(model)
    return models


def _logits_and_grads(model, **inputs):
    out = model(**inputs)
    out.logits.mul(inputs.pop("weights")).sum().backward()
    return out.logits, {name: p.grad for name, p in model.named_parameters()}


def _matches_reference(ours, reference, seqlen: int):
    """Logits and parameter gradients of ``ours`` within TOL of ``reference`` on random ids; returns
    our logits."""
    ids = torch.randint(0, 97, (2, seqlen))
    weights = torch.randn(2, seqlen, 97)
    logits, grads = _logits_and_grads(ours, input_ids=ids, weights=weights)
    ref_logits, ref_grads = _logits_and_grads(reference, input_ids=ids, weights=weights)
    assert rel_err(logits, ref_logits) < TOL
    assert max(rel_err(grads[name], ref_grads[name]) for name in grads) < TOL
    return ids, logits


def test_transformers_llama_matches_reference():
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    ours, reference = _tiny_llamas(["adasplash", "entmax_reference"])
    ids, _ = _matches_reference(ours, reference, 80)
    with pytest.raises(ValueError, match="output_attentions"):
        ours(input_ids=ids, output_attentions=True)


@pytest.mark.parametrize("side", ["left", "right"])
def test_transformers_padded_training_matches_the_masked_reference(side):
    """A padded batch: logits of the real tokens and parameter gradients of a loss over them equal
    the float64 reference with transformers' own mask (padding and causal)."""
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    ours, reference = _tiny_llamas(["adasplash", "entmax_reference"])
    ids = torch.randint(0, 97, (3, 70))
    mask = torch.ones(3, 70, dtype=torch.long)
    pad = [0, 9, 30]
    for b, n in enumerate(pad):
        if n:
            mask[b, :n] = 0 if side == "left" else 1
            mask[b, -n:] = 1 if side == "left" else 0
    real = mask.bool()[..., None]
    weights = torch.randn(3, 70, 97) * real
    logits, grads = _logits_and_grads(ours, input_ids=ids, attention_mask=mask, weights=weights)
    ref_logits, ref_grads = _logits_and_grads(reference, input_ids=ids, attention_mask=mask, weights=weights)
    assert rel_err(logits * real, ref_logits * real) < TOL
    assert max(rel_err(grads[name], ref_grads[name]) for name in grads) < TOL


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_transformers_batched_left_padded_generate(cache):
    """Greedy generate on a left-padded batch gives each prompt's tokens alone (dynamic and static
    caches)."""
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    (model,) = _tiny_llamas(["adasplash"])
    prompts = [torch.randint(1, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (12, 7, 3)]
    ids = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, -len(p):], mask[b, -len(p):] = p, 1
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation=cache)
    batched = model.generate(input_ids=ids, attention_mask=mask, **options)[:, 12:]
    for b, p in enumerate(prompts):
        alone = model.generate(input_ids=p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               **options)[0, len(p):]
        assert torch.equal(batched[b], alone), (b, batched[b], alone)


def test_transformers_packing_by_position_ids():
    """Two documents packed into one row, marked only by position_ids that restart at 0 (as
    transformers' flash attention takes them): each document's logits equal its logits alone."""
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    (model,) = _tiny_llamas(["adasplash"])
    first, second = torch.randint(0, 97, (1, 30)), torch.randint(0, 97, (1, 45))
    position_ids = torch.cat([torch.arange(30), torch.arange(45)])[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat([first, second], 1), position_ids=position_ids).logits
        alone = [model(input_ids=ids).logits for ids in (first, second)]
    assert rel_err(packed[:, :30], alone[0]) < TOL and rel_err(packed[:, 30:], alone[1]) < TOL


@pytest.mark.parametrize("family,options,without", [
    ("mistral", {"sliding_window": 16}, {"sliding_window": None}),
    ("qwen2", {"sliding_window": 16, "use_sliding_window": True, "layer_types": ["full_attention",
                                                                                 "sliding_attention"]},
     {"use_sliding_window": False, "layer_types": ["full_attention", "full_attention"]}),
])
def test_transformers_sliding_window_models_match_reference(family, options, without):
    """A Mistral (every layer) and a Qwen2 (its sliding layer only) with sliding_window 16 at 60
    tokens: the window maps to window_size."""
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    ours, reference = _tiny_llamas(["adasplash", "entmax_reference"], family=family, **options)
    ids, logits = _matches_reference(ours, reference, 60)
    (full,) = _tiny_llamas(["adasplash"], family=family, **(options | without))
    assert rel_err(full(input_ids=ids).logits, logits) > 10 * TOL  # the window matters at this length


def test_transformers_compile_fullgraph_with_padding():
    """torch.compile(fullgraph=True) of a tiny Llama with a padding mask: no graph break, and the
    logits of the eager model."""
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    (model,) = _tiny_llamas(["adasplash"])
    ids = torch.randint(0, 97, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :7] = 0
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    real = mask.bool()[..., None]
    with torch.no_grad():
        assert rel_err(compiled(input_ids=ids, attention_mask=mask).logits * real,
                       model(input_ids=ids, attention_mask=mask).logits * real) < 1e-6


def _transformers_sequence_parallel(rank, world):
    from ring_adasplash.integrations.transformers import set_sequence_parallel_group
    from ring_adasplash.parallel import layouts

    names = {"adasplash_ulysses": "contiguous", "adasplash_zigzag": "zigzag", "adasplash_ring": "contiguous"}
    single, *parallel = _tiny_llamas(["adasplash", *names])
    set_sequence_parallel_group(dist.group.WORLD)
    ids = torch.randint(0, 97, (1, 2 * world * 32))
    weights = torch.randn(1, ids.shape[1], 97)
    logits, grads = _logits_and_grads(single, input_ids=ids, weights=weights)
    errors = {}
    for (name, layout), model in zip(names.items(), parallel):
        positions = layouts.positions(layout, ids.shape[1], rank, world)
        local_logits, local_grads = _logits_and_grads(
            model, input_ids=ids[:, positions], position_ids=positions[None], weights=weights[:, positions])
        for g in local_grads.values():  # every rank holds the part of the gradient that flows through its tokens
            dist.all_reduce(g)
        errors[name] = [rel_err(gather_sequence(local_logits, layout, world), logits),
                        max(rel_err(local_grads[n], grads[n]) for n in grads)]
    return errors


def _transformers_sequence_parallel_refusals(rank, world):
    """Missing position_ids on every rank, then padding on rank 0 only: each raises on every rank."""
    from ring_adasplash.integrations.transformers import set_sequence_parallel_group
    from ring_adasplash.parallel import layouts

    (model,) = _tiny_llamas(["adasplash_zigzag"])
    set_sequence_parallel_group(dist.group.WORLD)
    ids = torch.randint(0, 97, (1, 64))
    messages = []
    for options in ({}, {"position_ids": layouts.positions("zigzag", 128, rank, world)[None],
                         "attention_mask": torch.ones(1, 64, dtype=torch.long).index_fill(1, torch.tensor([0]),
                                                                                       int(rank != 0))}):
        messages.append(value_error_message(lambda: model(input_ids=ids, **options)))
    return messages


@pytest.mark.distributed
def test_transformers_sequence_parallel_refusals_reach_every_rank():
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    for missing, padded in run_distributed(_transformers_sequence_parallel_refusals, 2, timeout=120):
        assert "position_ids" in missing and "padding" in padded, (missing, padded)


@pytest.mark.distributed
def test_transformers_sequence_parallel_matches_one_device():
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    errors = run_distributed(_transformers_sequence_parallel, 2, timeout=300)[0]
    bad = {name: errs for name, errs in errors.items() if max(errs) >= TOL}
    assert not bad, f"relative errors (logits, parameter gradients) above {TOL}: {bad}"


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------


class _TinyAttention(torch.nn.Module):
    """x (batch, seqlen, 16) -> q, k, v (batch, seqlen, 2, 8) -> attention -> (batch, seqlen, 2, 8)."""

    def __init__(self, attend):
        super().__init__()
        self.proj, self.attend = torch.nn.Linear(16, 48), attend

    def forward(self, x):
        q, k, v = self.proj(x).unflatten(-1, (3, 2, 8)).unbind(2)
        return self.attend(q, k, v, alpha=1.5, causal=True)


def _compiled_vs_eager(module, x, backend, fullgraph=True):
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=fullgraph, backend=backend)
    results = []
    for run in (compiled, module):
        module.zero_grad()
        out = run(x)
        out.square().sum().backward()
        results.append((out.detach(), module.proj.weight.grad.clone()))
    (out, grad), (ref_out, ref_grad) = results
    return rel_err(out, ref_out), rel_err(grad, ref_grad)


def test_compile_fullgraph_single_device():
    from ring_adasplash import adasplash_func

    torch.manual_seed(0)
    module, x = _TinyAttention(adasplash_func), torch.randn(2, 100, 16)  # q, k, v are strided views
    assert max(_compiled_vs_eager(module, x, "inductor")) < 1e-6


def _compile_ulysses_and_usp(rank, world):
    from ring_adasplash.parallel import build_usp_groups, ulysses_adasplash_func, usp_adasplash_func

    torch.manual_seed(0)
    x = torch.randn(1, 64, 16)  # each rank: its own tokens
    ulysses = _compiled_vs_eager(_TinyAttention(ulysses_adasplash_func), x, "aot_eager")
    ulysses_group, ring_group = build_usp_groups(1, 2)

    def usp(q, k, v, **kwargs):
        return usp_adasplash_func(q, k, v, ulysses_group=ulysses_group, ring_group=ring_group, **kwargs)

    return ulysses, _compiled_vs_eager(_TinyAttention(usp), x, "aot_eager", fullgraph=False)


@pytest.mark.distributed
def test_compile_ulysses_fullgraph_and_usp():
    """Ulysses: the all-to-alls are functional collectives, traced into one graph. USP: the ring
    exchange is left out of the graph (a graph break), the rest compiles."""
    for ulysses, usp in run_distributed(_compile_ulysses_and_usp, 2, timeout=300):
        assert max(ulysses) < 1e-6 and max(usp) < 1e-6, (ulysses, usp)


def _bisect_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``entmax_bisect`` with the module's alpha (``module_alpha``: per head, learnable), causal,
    no mask: (b, h, s, d) in, (b, s, h, d) out."""
    from helpers import bisect_attention

    from ring_adasplash.integrations.transformers import module_alpha

    q, k, v = (x.transpose(1, 2).double() for x in (query, key, value))
    alpha = module_alpha(module)
    alpha = alpha.double() if isinstance(alpha, torch.Tensor) else alpha
    return bisect_attention(q, k, v, alpha, causal=True, softmax_scale=scaling).to(query.dtype), None


@pytest.mark.parametrize("learnable", [False, True])
def test_transformers_alpha_per_head_and_learnable(learnable):
    """``config.entmax_alpha`` as a list per query head, or a learnable ``entmax_alpha`` parameter
    on each attention module: logits and every gradient (alpha's too) against ``entmax_bisect``."""
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("entmax_bisect_reference", _bisect_reference_attention)
    AttentionMaskInterface.register("entmax_bisect_reference", sdpa_mask)
    per_head = [1.3, 1.5, 2.0, 1.25]
    ours, reference = _tiny_llamas(["adasplash", "entmax_bisect_reference"])
    for model in (ours, reference):
        model.config.entmax_alpha = per_head
        for layer in model.model.layers:
            layer.self_attn.config.entmax_alpha = per_head
            if learnable:
                layer.self_attn.entmax_alpha = torch.nn.Parameter(torch.tensor([1.4, 1.5, 1.75, 1.2]))
    _, logits = _matches_reference(ours, reference, 40)
    if learnable:
        grads = [layer.self_attn.entmax_alpha.grad for layer in ours.model.layers]
        assert all(g is not None and g.shape == (4,) and g.abs().sum() > 0 for g in grads)
