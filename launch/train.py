"""Train a small sequence-parallel entmax transformer on long-range associative recall.

    torchrun --standalone --nproc_per_node 2 launch/train.py              # CPU (gloo), a minute or two
    torchrun --standalone --nproc_per_node 8 launch/train.py --strategy zigzag   # GPUs (NCCL)
    NPROC=2 bash launch/deepspeed.sh                     # DeepSpeed engine (--deepspeed_config)
    torchrun --standalone --nproc_per_node 1 launch/train.py --seqlen 8192 --capture qkv.pt
        # after training: every layer's q, k, v of one batch saved, block sparsity per layer and head

Every rank draws the same global batch (same seed) and keeps its shard of the sequence in
the layout its strategy expects; the attention callable exchanges keys and values between
ranks. Parameters start identical on every rank (same seed) and stay identical because
every rank applies the same all-reduced gradient.

Why the gradient equals the single-device one: the single-device loss is the mean over all
N answer tokens, L = (1/N) sum_r L_r, where L_r sums the token losses on rank r. Each rank
back-propagates L_r / N; the distributed attention's backward returns the gradients with
respect to keys and values to the ranks that own them, so rank r ends up holding the part
of dL/dtheta that flows through its own tokens' activations. Those parts add up to dL/dtheta,
hence one SUM all-reduce of the gradients. N is known on every rank, since every rank sees
the whole batch. A DeepSpeed engine (--deepspeed_config) instead averages gradients over the
ranks, taking them for data-parallel replicas, so there each rank back-propagates P L_r / N.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data import IGNORE, RecallTask
from model import Transformer
from ring_adasplash import parallel
from ring_adasplash.comm import shutdown
from ring_adasplash.config import STRATEGIES, AttentionConfig

CPU_DEFAULTS = dict(seqlen=512, d_model=64, layers=2, heads=2, steps=150, lr=3e-3, batch=8, log_every=10,
                    curriculum=[])
GPU_DEFAULTS = dict(seqlen=16384, d_model=512, layers=8, heads=8, steps=2000, lr=1e-3, batch=4, log_every=50,
                    curriculum=[(64, 1500), (1024, 300)])

# the sequence-parallel strategies of ring_adasplash.config.STRATEGIES ("single" is one device)
STRATEGY_NAMES = [name for name, strategy in STRATEGIES.items() if strategy.layout is not None]


def resolve_strategy(args):
    """``(shard, positions_of, attend)`` of this rank for ``--strategy``.

    ``shard(x)`` cuts a global (batch, seqlen) tensor to this rank's tokens,
    ``positions_of(seqlen)`` are their global positions, and ``attend(q, k, v, alpha, group)`` is
    the attention (``alpha`` is the config's, ``group`` the world: launch/model.py passes both).
    """
    config = AttentionConfig(alpha=args.alpha, causal=True, strategy=args.strategy)
    strategy = STRATEGIES[args.strategy]
    rank, world = dist.get_rank(), dist.get_world_size()
    if strategy.heads_divisible and args.heads % world:
        raise SystemExit(f"--strategy {args.strategy} needs --heads divisible by the {world} ranks")

    if strategy.two_groups:
        # usp: Ulysses over as many ranks as the key/value heads allow, a ring across those groups
        ulysses = math.gcd(world, args.kv_heads)
        ulysses_group, ring_group = parallel.build_usp_groups(ulysses, world // ulysses)
        mesh = parallel.UspMesh.from_groups(ulysses_group, ring_group)
        if rank == 0:
            print(f"usp mesh: ulysses {mesh.ulysses_degree} x ring {mesh.ring_degree}", flush=True)
        attention = config.attention(ulysses_group=ulysses_group, ring_group=ring_group)
        shard = functools.partial(parallel.usp_shard, mesh=mesh, ring_layout=config.layout)
        positions_of = functools.partial(parallel.usp_positions, mesh=mesh, ring_layout=config.layout)
    else:
        attention = config.attention()
        shard = functools.partial(parallel.layouts.shard, layout=config.layout, rank=rank, world_size=world)
        positions_of = functools.partial(parallel.layouts.positions, config.layout, rank=rank, world_size=world)
    return shard, positions_of, lambda q, k, v, alpha, group: attention(q, k, v, alpha=alpha)


def stages_of(text: str) -> list:
    """``--curriculum``: "64:600,1024:200" -> [(64, 600), (1024, 200)]; "" -> []."""
    stages = []
    for item in filter(None, text.split(",")):
        seqlen, _, steps = item.partition(":")
        if not (seqlen.isdigit() and steps.isdigit() and int(seqlen) > 0 and int(steps) > 0):
            raise argparse.ArgumentTypeError(
                f"stages are SEQLEN:STEPS with positive integers, e.g. 64:600; got {item!r}")
        stages.append((int(seqlen), int(steps)))
    return stages


class Stage(NamedTuple):
    """A part of the training: its task, this rank's positions, the batch and the steps."""

    task: RecallTask
    positions: torch.Tensor
    batch: int
    steps: int


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", default="ring", choices=STRATEGY_NAMES, help="sequence-parallel strategy")
    p.add_argument("--seqlen", type=int, help="global sequence length (tokens)")
    p.add_argument("--d-model", type=int, help="model width")
    p.add_argument("--layers", type=int, help="transformer layers")
    p.add_argument("--heads", type=int, help="query heads")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads)")
    p.add_argument("--alpha", type=float, default=1.5, help="entmax alpha (> 1; 2 is sparsemax)")
    p.add_argument("--learn-alpha", action="store_true",
                   help="learn alpha per head and layer (starting at --alpha, kept in (1, 2)); prints them at the end")
    p.add_argument("--steps", type=int, help="training steps at --seqlen")
    p.add_argument("--curriculum", type=stages_of, metavar="SEQLEN:STEPS,...",
                   help="shorter sequences trained first, in this order, each for its steps at the tokens a step "
                        "of --seqlen takes (batch x seqlen / SEQLEN sequences): recall is learned on short "
                        "sequences and carries over to long ones (launch/data.py); default: 64:1500,1024:300 on "
                        "GPUs, none on CPU")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--batch", type=int, help="batch size")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    p.add_argument("--log-every", type=int, help="log every N steps (default: about ten lines per run)")
    p.add_argument("--capture", metavar="PATH",
                   help="after training, save every layer's q, k, v (after RoPE, in sequence order) on one batch "
                        "to PATH (torch.save) and print the block sparsity of each layer and head")
    p.add_argument("--deepspeed_config", metavar="PATH",
                   help="train with a DeepSpeed engine configured by this JSON (optimizer, precision, ZeRO)")
    # the deepspeed launcher passes --local_rank unless told --no_local_rank; LOCAL_RANK says the same
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    defaults = GPU_DEFAULTS if torch.cuda.is_available() else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.kv_heads = args.kv_heads or args.heads
    for seqlen, _ in args.curriculum:
        if args.batch * args.seqlen % seqlen:
            p.error(f"--curriculum: each SEQLEN must divide batch x seqlen ({args.batch} x {args.seqlen}); "
                    f"got {seqlen}")
    return args


def all_reduce_gradients(model: torch.nn.Module, group=None) -> None:
    """Sum gradients over the sequence-parallel group in one flat buffer."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class PlainTrainer:
    """AdamW on the gradients summed over the ranks (module docstring: why a sum)."""

    def __init__(self, model: torch.nn.Module, args):
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step(self, lr: float) -> None:
        all_reduce_gradients(self.model)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        set_lr(self.optimizer, lr)
        self.optimizer.step()


class DeepSpeedTrainer:
    """A DeepSpeed engine: its optimizer, precision, ZeRO stage and clipping come from the JSON config;
    batch size and learning-rate schedule stay train.py's, as in ``PlainTrainer``."""

    def __init__(self, model: torch.nn.Module, args, use_cuda: bool):
        import deepspeed

        # the engine, which also runs the model's forward; it wraps the process group main() made
        self.model, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                              config=deepspeed_config(args, use_cuda), dist_init_required=False)
        self.world = dist.get_world_size()

    def backward(self, loss: torch.Tensor) -> None:
        # the engine averages the ranks' gradients, but they are parts of one gradient that add up
        self.model.backward(loss * self.world)

    def step(self, lr: float) -> None:
        set_lr(self.model.optimizer, lr)
        self.model.step()  # clips, steps and zeroes the gradients


def deepspeed_config(args, use_cuda: bool) -> dict:
    """The JSON config of --deepspeed_config, fitted to this run."""
    with open(args.deepspeed_config) as f:
        config = json.load(f)
    # DeepSpeed's batch bookkeeping (it loads no data here): every rank holds a shard of --batch sequences
    config["train_micro_batch_size_per_gpu"] = args.batch
    config.pop("train_batch_size", None)
    if not use_cuda and config.get("bf16", {}).get("enabled"):
        # as the plain path, whose bf16 autocast is CUDA-only: CPU runs in float32
        config["bf16"]["enabled"] = False
        if dist.get_rank() == 0:
            print("deepspeed: no CUDA device, bf16 of the config turned off (float32)", flush=True)
    return config


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 10% of the ``steps``, then cosine decay to 10% of the ``peak``."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def block_sparsity_recorder():
    """``telemetry.record()`` of ring_adasplash when it is there, else a no-op context."""
    try:
        from ring_adasplash import telemetry
    except ImportError:
        return nullcontext()
    return telemetry.record()


def global_block_sparsity(telemetry, device) -> float:
    """Fraction of visible (query tile, key tile) pairs that were all zero, over all ranks."""
    if telemetry is None or not hasattr(telemetry, "nonzero_tiles"):
        return float("nan")
    tiles = torch.tensor([telemetry.nonzero_tiles, telemetry.visible_tiles], dtype=torch.float64, device=device)
    dist.all_reduce(tiles)
    nonzero, visible = tiles.tolist()
    return 1.0 - nonzero / visible if visible else float("nan")


def capture_attention(model, tokens, positions, layout: str, autocast):
    """Every layer's (q, k, v) (batch, seqlen, heads, head_dim) of one forward on ``tokens`` (this
    rank's shard), gathered from all ranks into sequence order (rank 0 gets them, others None),
    and per layer the block sparsity of each head (one single-device call per layer)."""
    from ring_adasplash import adasplash_func, telemetry

    captured = []
    originals = [block.attn.attend for block in model.blocks]
    for block, attend in zip(model.blocks, originals):
        def capturing(q, k, v, alpha, group, attend=attend):
            captured.append((q.detach(), k.detach(), v.detach()))
            return attend(q, k, v, alpha, group)

        block.attn.attend = capturing
    try:
        with torch.no_grad(), autocast:
            model(tokens, positions)
    finally:
        for block, attend in zip(model.blocks, originals):
            block.attn.attend = attend
    world = dist.get_world_size()
    layers = []
    for tensors in captured:
        whole = []
        for x in tensors:
            shards = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(shards, x.contiguous())
            whole.append(parallel.layouts.unshard(shards, layout, world))
        layers.append(whole)
    if dist.get_rank() != 0:
        return None, None
    sparsity = []
    for q, k, v in layers:
        with torch.no_grad(), telemetry.record() as record:
            adasplash_func(q, k, v, alpha=model.blocks[0].attn.alpha, causal=True)
        mask = record.block_masks[0]
        visible = mask.visible.sum() * mask.tiles.shape[0]  # the visibility rule is shared by all heads
        sparsity.append((1 - mask.tiles.sum((0, 2, 3)).double() / visible).tolist())
    return [[x.cpu() for x in layer] for layer in layers], sparsity


def main() -> None:
    args = parse_args()
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if args.capture and STRATEGIES[args.strategy].two_groups:
        raise SystemExit(f"--capture gathers the sequence of one group of ranks; --strategy {args.strategy} has two")
    shard, positions_of, attend = resolve_strategy(args)
    task = RecallTask.for_seqlen(args.seqlen)
    # the curriculum's stages, then --seqlen; one vocabulary for all, and the tokens of a step
    stages = [Stage(RecallTask.for_seqlen(seqlen, key_tokens=task.key_tokens), positions_of(seqlen).to(device),
                    args.batch * args.seqlen // seqlen, steps) for seqlen, steps in args.curriculum]
    stages.append(Stage(task, positions_of(args.seqlen).to(device), args.batch, args.steps))
    total_steps = sum(stage.steps for stage in stages)
    torch.manual_seed(args.seed)  # same initial parameters on every rank
    model = Transformer(task.vocab_size, args.d_model, args.layers, args.heads, args.kv_heads,
                        args.alpha, attend, learn_alpha=args.learn_alpha).to(device)
    trainer = DeepSpeedTrainer(model, args, use_cuda) if args.deepspeed_config else PlainTrainer(model, args)
    engine = "deepspeed" if args.deepspeed_config else "plain"
    data_rng = torch.Generator().manual_seed(args.seed + 1)  # same global batches on every rank
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else nullcontext()

    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"strategy={args.strategy} engine={engine} world={world} device={device.type} params={params} "
              f"seqlen={args.seqlen} batch={args.batch} pairs={task.pairs}x{task.repeats} queries={task.queries} "
              f"chance={1 / task.value_tokens:.3f}", flush=True)
        for stage in stages[:-1]:
            print(f"curriculum: {stage.steps} steps at seqlen={stage.task.seqlen} batch={stage.batch} first",
                  flush=True)
    schedule = (stage for stage in stages for _ in range(stage.steps))
    progress = tqdm(schedule, total=total_steps, disable=rank != 0, dynamic_ncols=True)
    window = torch.zeros(3, dtype=torch.float64)  # loss sum, correct answers, answers since last log
    first_loss = final_loss = recall = float("nan")
    tokens_timed, time_timed = 0, 0.0
    stage_end = 0
    for step, stage in enumerate(progress):
        start = time.perf_counter()
        if step == stage_end:
            stage_end += stage.steps
        tokens, targets = stage.task.sample(stage.batch, data_rng)
        answers = int((targets != IGNORE).sum())
        tokens, targets = shard(tokens).to(device), shard(targets).to(device)

        log_step = (step + 1) % args.log_every == 0 or step + 1 == stage_end  # a log line ends each stage
        recorder = block_sparsity_recorder() if log_step else nullcontext()  # counting syncs: log steps only
        with recorder as telemetry:
            with autocast:
                logits = trainer.model(tokens, stage.positions)
            loss_sum = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                       reduction="sum")
            trainer.backward(loss_sum / answers)
        trainer.step(lr_at(step, total_steps, args.lr))

        mask = targets != IGNORE
        correct = (logits.argmax(-1)[mask] == targets[mask]).sum()
        stats = torch.stack([loss_sum.detach().double(), correct.double()])
        dist.all_reduce(stats)
        loss_total, correct_total = stats.tolist()
        window += torch.tensor([loss_total, correct_total, answers], dtype=torch.float64)
        if step == 0:
            first_loss = loss_total / answers
        else:  # step 0 pays for warm-up and compilation
            tokens_timed += args.batch * args.seqlen
            time_timed += time.perf_counter() - start

        if log_step:  # the summary's final loss and recall are those of the last log window
            final_loss, recall = (window[0] / window[2]).item(), (window[1] / window[2]).item()
            window.zero_()
            sparsity = global_block_sparsity(telemetry, device)
            tokens_per_s = tokens_timed / time_timed if time_timed else float("nan")
            progress.set_postfix(loss=f"{final_loss:.3f}", recall=f"{recall:.3f}")
            if rank == 0:
                tqdm.write(f"step {step + 1:5d}  seqlen {stage.task.seqlen}  loss {final_loss:.4f}  "
                           f"recall {recall:.3f}  block_sparsity {sparsity:.3f}  tokens/s {tokens_per_s:,.0f}")

    if rank == 0:
        tokens_per_s = tokens_timed / time_timed if time_timed else float("nan")
        print(f"summary: strategy={args.strategy} engine={engine} world={world} seqlen={args.seqlen} "
              f"first_loss={first_loss:.4f} final_loss={final_loss:.4f} recall={recall:.3f} "
              f"tokens_per_s={tokens_per_s:.0f}", flush=True)
        if args.learn_alpha:
            for i, block in enumerate(model.blocks):
                learned = " ".join(f"{a:.3f}" for a in block.attn.alpha.detach().float().cpu().tolist())
                print(f"learned alpha: layer {i} per head {learned}", flush=True)
    if args.capture:
        tokens, _ = task.sample(args.batch, data_rng)
        layers, sparsity = capture_attention(model, shard(tokens).to(device), stages[-1].positions,
                                             AttentionConfig(strategy=args.strategy).layout, autocast)
        if rank == 0:
            torch.save({"layers": [dict(zip("qkv", layer)) for layer in layers], "alpha": args.alpha,
                        "seqlen": args.seqlen, "strategy": args.strategy, "steps": args.steps,
                        "curriculum": args.curriculum, "recall": recall},
                       args.capture)
            for i, heads in enumerate(sparsity):
                print(f"capture: layer {i} block sparsity per head " + " ".join(f"{s:.3f}" for s in heads),
                      flush=True)
            print(f"capture: saved q, k, v of {len(layers)} layers to {args.capture}", flush=True)
    shutdown()  # destroys the process group; see ring_adasplash.comm.shutdown


if __name__ == "__main__":
    main()
