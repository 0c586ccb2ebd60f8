"""MR-SP: Multi-modal Reinforcement Sequence Parallelism.

An RL step on a long video runs the same long sequence many times: rollout prefill, old-policy and
reference log-probs, and the policy update. MR-SP makes that affordable in two stages.

Stage 1, video encoding. The frames of a video are split across the ranks of a sequence-parallel (SP)
group; each rank decodes and encodes only its share (`stage1_share`) with the (frozen) vision tower, and
an all-gather rebuilds the whole video embedding on every rank (`stage1_encode`). The result is cached
(`VideoEmbeddingCache`) and reused by rollout and by every training pass, so the vision tower runs once
per video, not once per pass.

Stage 2, the long sequence. Every SP rank holds the same batch but runs the LLM on a contiguous 1/sp
slice of the sequence (`shard_sequence`), with global position ids. Only attention needs the whole
sequence: DeepSpeed-Ulysses swaps the sequence split for a head split with one all-to-all before
attention and swaps it back after (`ulysses_attention`):

    q, k, v  [B, H, S/sp, D]  --all-to-all-->  [B, H/sp, S, D]  --causal attention over all S-->
    out      [B, S, H/sp, D]  --all-to-all-->  [B, S/sp, H, D]

Per-token log-probs are gathered back to the full length (`sp_token_logprobs`), so the loss code of
rl.py never sees shards. Each rank's activations are 1/sp of the sequence's. rl.py's shared-prefix
passes pack a GRPO group into one row [prompt][response 1]...[response G] (model.PackedBatch); each
rank builds only its slice of the rows, and after the all-to-all the packed attention
(model.shared_prefix_attention) runs on the whole rows for the rank's heads.

Layout. `init_distributed(sp_size)` reads the torchrun environment and builds a (dp x sp) device mesh;
consecutive global ranks form an SP group (they share one sample, and on a node they share the fast
links that the per-layer all-to-alls need); the dp dimension spreads different samples.

    torchrun --nproc-per-node 4 rl.py --sp-size 2     # 2 data-parallel groups of 2 SP ranks

Gradient accounting (the rule rl.py follows). Every SP rank computes the same loss on the full gathered
log-probs. `gather_sequence`'s backward keeps the local slice of that gradient, so after backward a rank's
parameter gradients hold the contribution of its own tokens only (the all-to-all backward already routed
the attention gradients to the ranks that own the tokens). The full gradient of one sample group is
therefore the SUM over the SP group; across DP groups, gradients are AVERAGED as usual (without FSDP:
an all-reduce sum over `sp_group`, then a mean over `dp_group`, as the tests do). With FSDP2, we
recommend sharding over a 1-D mesh of all world ranks (`init_device_mesh(device_type, (world_size,))`;
given the 2-D dp x sp mesh, FSDP2 would replicate over dp and shard over sp) and calling
`set_gradient_divide_factor(ps.dp_size)` on every `fully_shard`ed module: FSDP's reduce-scatter then sums
over all ranks and divides by dp_size, the SP sum and the DP mean in one collective. (Keeping FSDP's
default mean over dp*sp ranks and multiplying the loss by sp_size gives the same gradients. Sharding
over the dp dimension only and all-reducing over sp by hand also works, but keeps sp copies of every
parameter shard.)

Run the checks: `python -m pytest tests/test_mrsp.py`.
"""
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from safetensors import safe_open
from safetensors.torch import save_file

import errors
import model as M
from model import IGNORE, PackedBatch, SequenceBatch, VideoLM

ULYSSES = "ulysses"  # the attention implementation name registered with transformers


# ---- process groups ----

def group_size(group) -> int:
    """Ranks in `group`. Here `group=None` means "no parallelism": a group of one, no communication."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_ranks_true(flag: bool, group, device) -> bool:
    """True only if `flag` is true on every rank of `group` (a MIN all-reduce; no communication alone).
    Ranks that must take the same branch before a collective agree with this first."""
    if group_size(group) == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def split_evenly(num_items: int, parts: int) -> list[range]:
    """Contiguous, near-equal shares of range(num_items), in order; the first num_items % parts take one
    more. The one rule for every split here: frames over SP ranks, prompts over engines, mini-batches.
    split_evenly(7, 3) -> [range(0, 3), range(3, 5), range(5, 7)]; split_evenly(1, 2) -> [range(0, 1), range(1, 1)]."""
    bounds = [r * (num_items // parts) + min(r, num_items % parts) for r in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def length_runs(costs: list[int], max_items: int, max_tokens: int = 0, parts: int | None = None) -> list[list[int]]:
    """The indices of `costs` (a sequence's length each) in runs of similar length, for batches whose rows
    are padded to their longest: a run costs len(run) x its longest. Longest first, each run takes the
    next index while it holds fewer than `max_items` and, with `max_tokens`, while its padded cost stays
    within it (an index that alone exceeds it runs alone). In that order this is the fewest runs the
    bounds allow. `parts` (at least that many, at most len(costs)) halves the costliest runs until there
    are that many. Each run lists its indices in order.
    length_runs([30, 900, 40, 950], 2) -> [[1, 3], [0, 2]] (padded 1,900 and 80; in order 1,800 and 1,900)."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    runs = []  # a run's longest is its first
    fits = lambda run: len(run) < max_items and (not max_tokens or (len(run) + 1) * costs[run[0]] <= max_tokens)
    for i in order:
        if runs and fits(runs[-1]):
            runs[-1].append(i)
        else:
            runs.append([i])
    while parts is not None and len(runs) < parts:
        j = max((r for r in range(len(runs)) if len(runs[r]) > 1), key=lambda r: len(runs[r]) * costs[runs[r][0]])
        run = runs.pop(j)
        runs[j:j] = [run[:(len(run) + 1) // 2], run[(len(run) + 1) // 2:]]
    return [sorted(run) for run in runs]


def largest_on_all(values: list[int], group, device) -> list[int]:
    """Each of `values` replaced by its largest value on any rank of `group` (a MAX all-reduce). Ranks
    that must run a collective the same number of times agree on the count with this."""
    if group_size(group) == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


@dataclass
class ParallelState:
    """Where this process sits in the (dp x sp) layout.

    A single process started without torchrun gets the defaults: world of one, no process group, and
    `dp_group = sp_group = None`, which every function here treats as a group of one.
    """
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    sp_rank: int = 0
    sp_size: int = 1
    dp_group: dist.ProcessGroup | None = None
    sp_group: dist.ProcessGroup | None = None
    device: torch.device = torch.device("cpu")


def init_distributed(sp_size: int = 1) -> ParallelState:
    """Join the torchrun job (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and build the dp x sp mesh.

    nccl on CUDA (device = cuda:LOCAL_RANK), gloo on CPU. Ranks r*sp ... r*sp + sp-1 form SP group r.
    Without torchrun (no RANK in the environment) this is a single process: no process group is created
    and `ParallelState()` is returned, so `python rl.py` runs on a laptop unchanged.

    Example: WORLD_SIZE=4, sp_size=2 -> SP groups {0,1}, {2,3}; DP groups {0,2}, {1,3}.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if sp_size < 1 or world_size % sp_size:
        raise errors.UsageError(f"world size {world_size} is not a multiple of sp_size {sp_size} "
                         f"(start {sp_size}k processes, e.g. torchrun --nproc-per-node {sp_size})")
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "RANK" not in os.environ and not dist.is_initialized():
        return ParallelState(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    mesh = init_device_mesh(device.type, (world_size // sp_size, sp_size), mesh_dim_names=("dp", "sp"))
    return ParallelState(rank=dist.get_rank(), world_size=world_size,
                         dp_rank=mesh.get_local_rank("dp"), dp_size=world_size // sp_size,
                         sp_rank=mesh.get_local_rank("sp"), sp_size=sp_size,
                         dp_group=mesh.get_group("dp"), sp_group=mesh.get_group("sp"),
                         device=device)


# ---- communication with autograd ----

def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Cut `x` into sp equal pieces along `scatter_dim`, send piece i to SP rank i, and concatenate the
    pieces received, in rank order, along `gather_dim`. No autograd; see `AllToAll`.

    Example (sp=2, Ulysses before attention): scatter_dim=1, gather_dim=2 take [B, H, S/2, D] to [B, H/2, S, D].
    """
    sp = group_size(group)
    if sp == 1:
        return x
    if x.shape[scatter_dim] % sp:
        raise ValueError(f"dim {scatter_dim} of shape {tuple(x.shape)} does not split into {sp} pieces")
    send = torch.stack(x.tensor_split(sp, dim=scatter_dim))  # [..., N, ...] -> [sp, ..., N/sp, ...]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)           # recv[i] is SP rank i's piece for this rank
    return torch.cat(recv.unbind(0), dim=gather_dim)          # [sp, ..., M, ...] -> [..., sp*M, ...]


class AllToAll(torch.autograd.Function):
    """`all_to_all` whose backward is the same all-to-all with the dims swapped: the gradient of each
    piece goes back to the rank it came from."""

    @staticmethod
    def forward(ctx, x, scatter_dim: int, gather_dim: int, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return all_to_all(grad.contiguous(), gather_dim, scatter_dim, ctx.group), None, None, None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim: int, group):
        ctx.dim, ctx.group = dim, group
        pieces = [torch.empty_like(x) for _ in range(group_size(group))]
        dist.all_gather(pieces, x.contiguous(), group=group)  # sp x [..., n, ...]
        return torch.cat(pieces, dim=dim)                      # [..., sp*n, ...]

    @staticmethod
    def backward(ctx, grad):
        # Every SP rank computed the same loss from the same gathered tensor, so `grad` is identical on
        # all of them and already the full gradient: keep this rank's slice. (A reduce-scatter sum here
        # would count each token's gradient sp times.)
        pieces = grad.chunk(group_size(ctx.group), dim=ctx.dim)  # [..., sp*n, ...] -> sp x [..., n, ...]
        local = pieces[group_rank(ctx.group)]
        return local.contiguous(), None, None


def gather_sequence(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """All-gather equal shards along `dim`, in SP rank order: [..., n, ...] -> [..., sp*n, ...].

    Backward contract: every SP rank computes the SAME loss from the gathered tensor (true in MR-SP: the
    ranks of an SP group hold the same batch). The backward then keeps the local slice of the incoming
    gradient, and parameter gradients must afterwards be summed over the SP group (module docstring).
    """
    return x if group_size(group) == 1 else _GatherSequence.apply(x, dim, group)


# ---- Ulysses attention ----

def kv_head_repeats(num_heads: int, num_kv_heads: int, sp_size: int) -> int:
    """Copies of each key/value head that Ulysses needs so that every SP rank gets whole GQA groups.

    Query heads are split evenly over the ranks, so sp_size must divide num_heads. Key/value heads are
    repeated (repeat_interleave) up to lcm(num_kv_heads, sp_size), which sp_size divides and which keeps
    every query head next to its own key/value head. Example: 4 query heads, 2 KV heads, sp=4 -> 2 copies
    [k0 k0 k1 k1]; rank r gets query head r and KV copy r, and query head r uses k(r // 2). With sp <= the
    KV head count and dividing it, nothing is copied.
    """
    if num_heads % sp_size:
        raise errors.UsageError(f"sp_size {sp_size} does not divide {num_heads} query heads")
    return math.lcm(num_kv_heads, sp_size) // num_kv_heads


@dataclass
class UlyssesSetup:
    """What `enable_ulysses` attaches to every attention module (as `module.ulysses`)."""
    sp_group: dist.ProcessGroup | None
    inner: str             # the attention that runs on the full sequence: "sdpa" or "flash_attention_2"
    inner_attention: Callable  # transformers' function registered under `inner`
    inner_config: object   # a copy of the LLM config that names `inner` (flash-attn reads the name from it)


def ulysses_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention over the full sequence for a sequence shard: the `AttentionInterface` entry "ulysses".

    transformers calls it with this rank's shard, query [B, Hq, S/sp, D] and key/value [B, Hkv, S/sp, D],
    and expects [B, S/sp, Hq, D] back. The model built no mask: "ulysses" has no entry in transformers'
    `AttentionMaskInterface` on purpose, so `create_causal_mask` returns None (a mask built from the
    local length S/sp would be wrong for the full S). The inner attention runs with is_causal=True over
    all S positions instead; sequences are right-padded, so no padding mask is needed. A PackedBatch
    forward (kwarg `group_layouts`) runs `model.shared_prefix_attention` on the whole rows instead.
    """
    setup: UlyssesSetup = module.ulysses
    if attention_mask is not None:
        raise ValueError("Ulysses attention is causal over the full sequence and takes no attention mask; "
                         "right-pad the batch instead")
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("Ulysses attention does not implement sliding-window layers")
    kwargs.pop("position_ids", None)  # the shard's; the inner attention sees all S positions
    group, sp = setup.sp_group, group_size(setup.sp_group)
    repeats = kv_head_repeats(query.shape[1], key.shape[1], sp)
    key = key.repeat_interleave(repeats, dim=1)                  # [B, Hkv, S/sp, D] -> [B, Hkv*r, S/sp, D]
    value = value.repeat_interleave(repeats, dim=1)              # [B, Hkv, S/sp, D] -> [B, Hkv*r, S/sp, D]
    query = AllToAll.apply(query, 1, 2, group)                   # [B, Hq, S/sp, D] -> [B, Hq/sp, S, D]
    key = AllToAll.apply(key, 1, 2, group)                       # [B, Hkv*r, S/sp, D] -> [B, Hkv*r/sp, S, D]
    value = AllToAll.apply(value, 1, 2, group)                   # [B, Hkv*r, S/sp, D] -> [B, Hkv*r/sp, S, D]
    layouts = kwargs.pop("group_layouts", None)                  # set for a PackedBatch (model.py)
    if layouts is not None:  # the whole packed rows are here, for this rank's heads
        out = M.shared_prefix_attention(query, key, value, layouts, module.scaling)   # -> [B, S, Hq/sp, D]
    else:
        view = M.InnerAttentionView(module, setup.inner_config, num_key_value_groups=query.shape[1] // key.shape[1])
        out, _ = setup.inner_attention(view, query, key, value, None, is_causal=True,
                                       **kwargs)                 # -> [B, S, Hq/sp, D]
    return AllToAll.apply(out, 1, 2, group), None                # [B, S, Hq/sp, D] -> [B, S/sp, Hq, D]


def _attention_modules(model: VideoLM):
    return [layer.self_attn for layer in model.llm.get_decoder().layers]


def enable_ulysses(model: VideoLM, sp_group) -> None:
    """Switch `model.llm` to Ulysses attention over `sp_group`, wrapping its current attention.

    The current implementation (sdpa, or flash_attention_2 on a GPU) becomes the inner attention; the
    group is remembered on every attention module. Raises ValueError when the heads cannot be split.
    While enabled, every forward of the LLM must be a sharded one run by all SP ranks together
    (`sp_token_logprobs`); generate with another model (rl.py's engines do). Enable it on every model
    that runs sharded (policy and reference), after any copy.deepcopy of it.
    """
    from transformers import AttentionInterface  # imported on first use, as in model.py: it is slow
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    AttentionInterface.register(ULYSSES, ulysses_attention)
    cfg = model.llm_config
    kv_head_repeats(cfg.num_attention_heads, cfg.num_key_value_heads, group_size(sp_group))
    if cfg._attn_implementation == ULYSSES:  # enabled before: keep the inner attention, take the new group
        inner_config = _attention_modules(model)[0].ulysses.inner_config
        inner = inner_config._attn_implementation
    else:
        inner, inner_config = M.inner_attention_setup(cfg, "Ulysses attention")
    for attn in _attention_modules(model):
        attn.ulysses = UlyssesSetup(sp_group, inner, ALL_ATTENTION_FUNCTIONS[inner], inner_config)
    model.llm.get_decoder().set_attn_implementation(ULYSSES)  # the LLM's layers only, never a vision tower


# ---- stage 2: sequence shards ----

def shard_sequence(batch: SequenceBatch, sp_rank: int, sp_size: int) -> SequenceBatch:
    """SP rank `sp_rank`'s contiguous slice of the sequence, as if S were padded up to a multiple of sp_size.

    Padding goes at the end: zero embeddings, IGNORE targets, positions continuing. A causal LM never
    lets a real token see a later one, so padding changes no real token's result. Position ids stay
    global, on every axis ([B, S] or M-RoPE's [3, B, S]: cut along the sequence, the last axis). Only the
    shard is copied, never the full sequence. Example: S=10, sp=3 -> shards of 4; rank 1 gets positions
    4..7, rank 2 gets 8, 9 and two padding positions 10, 11.
    A batch built with `build_sequence_batch(..., sp_rank, sp_size)` holds this slice of the embeddings
    already; only its targets and positions are cut.
    """
    S = batch.targets.shape[1]
    if batch.sp_size > 1:
        if (batch.sp_rank, batch.sp_size) != (sp_rank, sp_size):
            raise ValueError(f"the batch was built for SP rank {batch.sp_rank} of {batch.sp_size}, "
                             f"not rank {sp_rank} of {sp_size}")
        local = slice(sp_rank * (S // sp_size), (sp_rank + 1) * (S // sp_size))     # S is a multiple of sp
        return SequenceBatch(batch.inputs_embeds, batch.targets[:, local], batch.position_ids[..., local])
    n = -(-S // sp_size)                                                   # shard length: ceil(S / sp)
    start = sp_rank * n
    real = slice(min(start, S), min(start + n, S))                         # may be empty when S < sp
    pad = n - (real.stop - real.start)
    embeds = F.pad(batch.inputs_embeds[:, real], (0, 0, 0, pad))           # [B, n-pad, D] -> [B, n, D]
    targets = F.pad(batch.targets[:, real], (0, pad), value=IGNORE)        # [B, n-pad] -> [B, n]
    padded = torch.arange(start + n - pad, start + n, device=batch.position_ids.device)  # their global indices
    extra = batch.position_ids[..., -1:] + (padded - S + 1)                # [..., B, 1] + [pad] -> [..., B, pad]
    positions = torch.cat([batch.position_ids[..., real], extra], dim=-1)  # [..., B, n]
    return SequenceBatch(embeds, targets, positions)


def sp_token_logprobs(model: VideoLM, batch: SequenceBatch | PackedBatch, sp_group,
                      temperature: float = 1.0, num_blocks: int | None = None) -> torch.Tensor:
    """`model.token_logprobs(batch)` computed sequence-parallel, the full result on every SP rank:
    [B, S] for a SequenceBatch (each rank runs its `shard_sequence` of it), [E, R_max] for a PackedBatch
    (built as this rank's slice: `build_packed_batch(..., sp_rank, sp_size)`).

    Each rank runs the LLM on its shard (Ulysses attention must be enabled for sp > 1), then the shards'
    log-probs are combined: gathered along the sequence and the padding dropped, or, for packed groups,
    summed (each response token is scored on exactly one rank). Gradients flow back into the local shard
    (see `gather_sequence` for the contract); sum parameter gradients over the SP group afterwards.
    """
    sp_rank, sp_size = group_rank(sp_group), group_size(sp_group)
    enabled = model.llm_config._attn_implementation == ULYSSES
    ulysses_group = _attention_modules(model)[0].ulysses.sp_group if enabled else None
    if (enabled or sp_size > 1) and ulysses_group is not sp_group:
        raise RuntimeError("sequence-parallel log-probs need Ulysses attention over this sp_group: "
                           "call enable_ulysses(model, sp_group) first")
    if isinstance(batch, PackedBatch):
        local = model.token_logprobs(batch, temperature, num_blocks=num_blocks)  # [E, R_max], this rank's tokens
        return sum_over_ranks(local, sp_group)                                    # [E, R_max], all tokens
    S = batch.targets.shape[1]
    shard = shard_sequence(batch, sp_rank, sp_size)
    local = model.token_logprobs(shard, temperature, num_blocks=num_blocks)     # [B, S_pad/sp]
    return gather_sequence(local, dim=1, group=sp_group)[:, :S]               # [B, S_pad/sp] -> [B, S]


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        # As in gather_sequence: every rank computed the same loss from the same sum, so `grad` is already
        # the full gradient of each rank's own term.
        return grad, None


def sum_over_ranks(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of equal-shaped tensors over `group`, where each rank filled in its own entries (zero elsewhere).
    Backward follows `gather_sequence`'s contract: the incoming gradient goes to the local term unchanged."""
    return x if group_size(group) == 1 else _SumOverRanks.apply(x, group)


# ---- stage 1: frame-sharded video encoding ----

def stage1_share(model: VideoLM, num_frames: int, sp_group) -> slice:
    """The frames (of a video's `num_frames` sampled ones) this rank encodes in MR-SP stage 1: its
    contiguous share of the vision tower's steps (`split_evenly`), on step boundaries. A step is what the
    tower encodes on its own: a frame (VILA) or a pair of frames (Qwen2.5-VL, whose attention never
    crosses pairs). stage1_share(VILA, 7, sp=2) -> slice(0, 4) on rank 0, slice(4, 7) on rank 1;
    stage1_share(Qwen, 7, sp=2) -> slice(0, 4) (pairs 0 and 1), slice(4, 7) (pair 2 and the half pair 3);
    a rank with no step gets an empty slice: stage1_share(Qwen, 1, sp=2) -> slice(1, 1) on rank 1."""
    fps = model.config.frames_per_step
    steps = split_evenly(-(-num_frames // fps), group_size(sp_group))[group_rank(sp_group)]
    return slice(min(steps.start * fps, num_frames), min(steps.stop * fps, num_frames))


@torch.no_grad()
def stage1_encode(model: VideoLM, frames, sp_group, num_frames: int | None = None,
                  chunk_size: int = 32) -> torch.Tensor:
    """MR-SP stage 1: frames [T, H, W, 3] -> video embeddings [steps * tokens_per_step, D] on every SP rank.

    Each rank encodes its share of the video (`stage1_share`) and an all-gather rebuilds the whole
    embedding in order. `frames` are all T sampled frames, or, with `num_frames=T`, only this rank's share
    of them: a rank then decodes just the frames it encodes (`video.load_frames(..., share=...)`), not the
    whole video. Shares may differ by one step and may be empty (steps < sp): they are padded to the
    largest share for the all-gather and trimmed after. Runs without autograd: the vision tower and
    projector are frozen in RL (LongVILA-R1), which is also what makes the embeddings cacheable.
    """
    sp_rank, sp_size = group_rank(sp_group), group_size(sp_group)
    total = len(frames) if num_frames is None else num_frames
    if total == 0:
        raise ValueError("no frames to encode")
    share = stage1_share(model, total, sp_group)
    local_frames = frames[share] if num_frames is None else frames
    if len(local_frames) != share.stop - share.start:
        raise ValueError(f"rank {sp_rank} has {len(local_frames)} frames; its share of {total} is {share}")
    tps, D = model.config.tokens_per_step, model.config.llm_hidden
    counts = [len(s) for s in split_evenly(-(-total // model.config.frames_per_step), sp_size)]  # steps per rank
    # One dtype on every rank for the all-gather, whatever autocast did to the encoder's output.
    dtype = model.llm.get_input_embeddings().weight.dtype
    if counts[sp_rank]:  # the last share may end in half a step: encode_frames completes it
        local = model.encode_video(local_frames, chunk_size).to(dtype)                  # [n_r * tps, D]
    else:
        local = torch.zeros(0, D, dtype=dtype, device=model.device)                    # [0, D]
    if sp_size == 1:
        return local
    padded = F.pad(local, (0, 0, 0, max(counts) * tps - len(local)))   # [n_r * tps, D] -> [max_n * tps, D]
    pieces = [torch.empty_like(padded) for _ in range(sp_size)]
    dist.all_gather(pieces, padded, group=sp_group)                    # sp x [max_n * tps, D]
    return torch.cat([p[:n * tps] for p, n in zip(pieces, counts)])   # [steps * tps, D]


# ---- the video-embedding cache ----

def vision_fingerprint(model: VideoLM) -> str:
    """A short hash of everything that decides a video's embeddings besides its frames: the vision
    tower's and projector's weights (names, dtypes, shapes, bytes) and the VideoLM settings."""
    h = hashlib.sha256(json.dumps(asdict(model.config), sort_keys=True).encode())
    for prefix, module in (("vision_tower.", model.vision_tower), ("mm_projector.", model.mm_projector)):
        for name, t in module.state_dict().items():
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{prefix}{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()[:16]


class VideoEmbeddingCache:
    """Video embeddings by (video file, frame sampling, vision weights): in memory, optionally on disk.

        cache = VideoEmbeddingCache(model, cache_dir="runs/embeds", sp_group=ps.sp_group,
                                    max_bytes=8 * 2**30, dtype=torch.bfloat16, storage="cpu")
        share = lambda num_frames: stage1_share(model, num_frames, ps.sp_group)  # this rank's frames
        video_embeds = cache.get(path, sampling,
                                 frames_fn=lambda: video.load_frames(path, image_size, sampling, share),
                                 encode_fn=lambda read: stage1_encode(model, read[0], ps.sp_group,
                                                                      num_frames=len(read[1])))

    Frames are loaded and encoded only on a miss. The key is (absolute path, file size, mtime_ns,
    sampling.key(), vision_fingerprint(model), stored dtype): editing or touching the video, changing the
    sampling, different vision weights or another storage dtype all miss. The fingerprint is computed
    once, at construction, so the cache is valid only while the vision tower and projector are frozen
    (RL). If they train, call `clear()` after every optimizer step: it empties memory and
    re-fingerprints, so old disk entries are never hit.

    Memory. One video of a 7B model at 256 frames is 256 frames x 256 tokens x 3584 values: 0.94 GB in
    fp32, 0.47 GB in bf16. So entries are stored in `dtype` (the compute dtype, bf16 under --bf16; None keeps the encoder's
    dtype), on `storage` ("cpu": host memory, and `get` copies the entry to the model's device for each
    use; None: the model's device), and the entries held stay within `max_bytes` in all: the least
    recently used go first (None: no bound; 0: nothing in memory, only on disk). `held` maps key to
    entry, least recently used first; `metrics()` reports the bytes held, the entries, the hits and the
    misses.

    On disk: one safetensors file per key, named sha256(key), with the full key and the shape in its
    metadata, written to a temporary name and renamed. A file that is unreadable (truncated, garbage),
    holds another key, or has a shape that is not [steps * tokens_per_step, D] is recomputed and
    rewritten, never used (the release this follows could substitute another video's embeddings).

    Within an SP group all ranks call `get` with the same arguments in the same order (a miss runs the
    collective `stage1_encode`); with `sp_group`, ranks also agree on disk hits, since another DP group
    may finish writing a file between two ranks' reads. Only SP rank 0 writes.
    """

    def __init__(self, model: VideoLM, cache_dir=None, sp_group=None, max_bytes: int | None = None,
                 dtype: torch.dtype | None = None, storage=None):
        self.model, self.sp_group, self.max_bytes = model, sp_group, max_bytes
        self.dtype = dtype or model.llm.get_input_embeddings().weight.dtype  # what stage1_encode returns
        self.storage = torch.device(storage) if storage is not None else model.device
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        if any(p.requires_grad for p in [*model.vision_tower.parameters(), *model.mm_projector.parameters()]):
            warnings.warn("the vision tower or projector is trainable: cached video embeddings go stale when "
                          "it trains; call cache.clear() after every optimizer step (or model.freeze_vision())")
        self.vision_id = vision_fingerprint(model)
        self.held: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0  # held in memory, the sum of the entries' sizes
        self.hits = self.misses = self.vision_runs = 0
        self._warned = False

    def key(self, video_path, sampling) -> str:
        path = os.path.abspath(video_path)
        st = os.stat(path)
        sampling_key = sampling if isinstance(sampling, str) else sampling.key()
        return json.dumps([path, st.st_size, st.st_mtime_ns, sampling_key, self.vision_id, str(self.dtype)])

    def holds(self, video_path, sampling) -> bool:
        """Whether `get` would find this video's embeddings (in memory or on disk) without reading it."""
        try:
            key = self.key(video_path, sampling)
        except OSError:  # a missing file: nothing cached; reading it reports why
            return False
        return key in self.held or (self.cache_dir is not None and self.path(key).exists())

    def get(self, video_path, sampling, frames_fn, encode_fn) -> torch.Tensor:
        """Video embeddings [steps * tokens_per_step, D] on the model's device, in the stored dtype: from
        memory, else disk, else encode_fn(frames_fn())."""
        key = self.key(video_path, sampling)
        if key in self.held:
            self.held.move_to_end(key)
            self.hits += 1
            return self.held[key].to(self.model.device, non_blocking=True)
        embeds = self._load(key)
        if all_ranks_true(embeds is not None, self.sp_group, self.model.device):  # all load, or all encode
            self.hits += 1
        else:
            self.misses += 1
            embeds = self._to_storage(encode_fn(frames_fn()))
            self.vision_runs += 1
            self._save(key, embeds)
        self._hold(key, embeds)
        return embeds.to(self.model.device, non_blocking=True)

    def metrics(self) -> dict:
        """The cache's footprint for a metrics row: bytes and entries held now, hits and misses so far."""
        return {"embed_cache_bytes": self.bytes, "embed_cache_entries": len(self.held),
                "embed_cache_hits": self.hits, "embed_cache_misses": self.misses}

    def _to_storage(self, embeds: torch.Tensor) -> torch.Tensor:
        embeds = embeds.detach().to(self.storage, self.dtype)
        if self.storage.type == "cpu" and self.model.device.type == "cuda":
            embeds = embeds.pin_memory()  # page-locked: the copy to the GPU at each use runs at full speed
        return embeds

    def _hold(self, key: str, embeds: torch.Tensor) -> None:
        """Keep `embeds` in memory, then drop the least recently used until within max_bytes (the new
        entry too, if it alone is larger)."""
        self.held[key] = embeds
        self.bytes += embeds.nbytes
        while self.max_bytes is not None and self.bytes > self.max_bytes:
            self.bytes -= self.held.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        """Forget the in-memory entries and re-fingerprint the vision weights (after they trained)."""
        self.held.clear()
        self.bytes = 0
        self.vision_id = vision_fingerprint(self.model)

    def path(self, key: str) -> Path:
        return self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"

    def _load(self, key: str) -> torch.Tensor | None:
        if self.cache_dir is None or not self.path(key).exists():
            return None
        path = self.path(key)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                embeds = f.get_tensor("video_embeds")
        except Exception as e:  # truncated or garbage: safetensors raises its own error types
            return self._reject(path, f"unreadable ({e})")
        if meta.get("key") != key:
            return self._reject(path, "written for another video, sampling or vision tower")
        tps, D = self.model.config.tokens_per_step, self.model.config.llm_hidden
        shape = list(embeds.shape)
        if json.loads(meta.get("shape", "null")) != shape or len(shape) != 2 or shape[1] != D \
                or shape[0] == 0 or shape[0] % tps:
            return self._reject(path, f"shape {shape}, expected [steps * {tps}, {D}] as recorded")
        return self._to_storage(embeds)

    def _reject(self, path: Path, why: str) -> None:
        if not self._warned:
            warnings.warn(f"video-embedding cache file {path} is {why}; recomputing it "
                          "(further bad files are recomputed silently)")
            self._warned = True
        return None

    def _save(self, key: str, embeds: torch.Tensor) -> None:
        if self.cache_dir is None or group_rank(self.sp_group) != 0:
            return
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"video_embeds": embeds.detach().cpu().contiguous()}, tmp,
                      metadata={"key": key, "shape": json.dumps(list(embeds.shape))})
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
