"""Stage 2: GRPO reinforcement learning of a VideoLM on long-video QA, with MR-SP and a rollout engine.

One GRPO step, as `main()` runs it (each stage one call, defined above `main` in this order):
  1. sample      each data-parallel rank takes --batch-size records (prompts)
  2. encode      MR-SP stage 1: each video's frames are encoded once, split over the SP group, and
                 cached; every later use in this step (and later steps: the vision tower is frozen)
                 reuses that encoding
  3. rollout     the prompt embeddings (text + cached video) go to the engine, which samples
                 --group-size responses per prompt from one prefill (with vLLM, the ranks of an SP
                 group each generate a share of its prompts)
  4. rewards     0.9 x accuracy + 0.1 x format (weights configurable; grading.py reads the answer)
  5. advantages  group-normalised: (r - mean) / (std + 1e-6), or without the std (Dr. GRPO)
  6. update      `update_policy`: old-policy and reference log-probs, then the clipped policy loss with a
                 k3 KL term (and, with --tis-cap, truncated importance sampling on the engine's
                 log-probs); a group's G responses share its prompt: each group is one packed row, the
                 prompt run once (P + G*R positions, not G*(P + R)); the rows are sharded over the SP
                 group (MR-SP stage 2, Ulysses attention). With one mini-batch the old log-probs come
                 from the update's own forward (on-policy), not an extra pass
  7. sync        the new LLM weights go into the engine in place; metrics; checkpoint

Run:
    python rl.py --init runs/sft/final --data data/synth/train.jsonl --out runs/rl
    torchrun --nproc-per-node 2 rl.py --init runs/sft/final --data data/synth/train.jsonl --out runs/rl --sp-size 2
Writes OUT/metrics.jsonl (one row per step), OUT/checkpoint-STEP/, OUT/final/ and OUT/rl_curves.png.
"""
import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import checkpoint
import data
import errors
import grading
import model as M
import mrsp
import rollout
import runs
import train
import video


# ---- flags ----

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=train.HelpFormatter)
    ap.add_argument("--init", required=True, help="checkpoint to start from (usually the SFT run's final/)")
    data.add_data_args(ap, "training records")
    ap.add_argument("--out", required=True, help="output folder")
    video.add_sampling_args(ap)
    video.add_prefetch_args(ap)
    ap.add_argument("--steps", type=int, default=30, help="GRPO steps (one rollout batch each)")
    ap.add_argument("--batch-size", type=int, default=8,
                    help="prompts (records) per step per data-parallel rank; each gets --group-size responses, "
                         "so a step trains on batch-size x group-size x data-parallel ranks responses")
    ap.add_argument("--group-size", type=int, default=5, help="responses sampled per prompt (G)")
    ap.add_argument("--mini-batches", type=int, default=1,
                    help="optimizer updates per rollout batch (the batch is split into runs of whole groups; >1 "
                         "makes the clip matter)")
    ap.add_argument("--micro-batch-size", type=int, default=2,
                    help="most sequences per forward/backward; with the shared prefix, whole groups (at least one). "
                         "Each carries a whole video, ~66k positions for a 7B model at 256 frames: keep it small there")
    ap.add_argument("--micro-batch-tokens", type=int, default=0,
                    help="most padded LLM positions per forward/backward: rows x the longest row (prompt + "
                         "responses; a longer row runs alone); 0: no bound. Either way rows of similar length "
                         "share a pass, so a text question is not padded to a video's length")
    ap.add_argument("--shared-prefix", action=argparse.BooleanOptionalAction, default=True,
                    help="run each group's prompt once in the log-prob and update passes (P + G*R positions, not "
                         "G*(P + R)); --no-shared-prefix runs every response as its own sequence")
    ap.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (the paper's 1e-6 suits 7B)")
    ap.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip")
    ap.add_argument("--kl-coef", type=float, default=1e-2, help="weight of the k3 KL to the reference (0: no reference)")
    ap.add_argument("--clip-low", type=float, default=0.2, help="ratio clip below: 1 - clip_low")
    ap.add_argument("--clip-high", type=float, default=0.3, help="ratio clip above: 1 + clip_high")
    ap.add_argument("--dual-clip", type=float, default=3.0, help="dual-clip bound for negative advantages")
    ap.add_argument("--loss-agg", default="token-mean",
                    choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"], help="see aggregate()")
    ap.add_argument("--std-norm", action=argparse.BooleanOptionalAction, default=True,
                    help="divide the group-centred rewards by the group's std; --no-std-norm leaves it out (Dr. GRPO)")
    ap.add_argument("--tis-cap", type=float, default=0.0,
                    help="truncated importance sampling: weight each token's policy-gradient term by "
                         "min(pi_old / pi_engine, C) with C this cap (0: off); see tis_weights()")
    ap.add_argument("--type-label", default="category",
                    help="record field whose values split the per-step accuracy (accuracy_<value> in metrics.jsonl "
                         "and rl_curves.png); records without it count only in the overall accuracy")
    ap.add_argument("--accuracy-weight", type=float, default=0.9, help="reward weight of accuracy")
    ap.add_argument("--format-weight", type=float, default=0.1, help="reward weight of the think/answer format")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="longest response")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    ap.add_argument("--top-p", type=float, default=0.99, help="nucleus sampling")
    ap.add_argument("--engine", choices=["vllm", "torch"], default="vllm", help="rollout engine")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="engine's longest prompt + response; checked at start-up against the first records' "
                         "prompts + --max-new-tokens (default: derived from them, see engine_max_model_len)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                    help="share of GPU memory the vLLM engine may take (the trainer needs the rest)")
    ap.add_argument("--engine-sleep", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                    help="vLLM sleep mode: free the engine's GPU memory while training (GPU only)")
    train.add_cache_args(ap, default=True)
    train.add_run_args(ap, save_every=10)
    args = ap.parse_args(argv)
    if args.mini_batches > args.batch_size:
        ap.error(f"--mini-batches {args.mini_batches} is more than --batch-size {args.batch_size}: a mini-batch is a "
                 "run of whole groups")
    return args


# ---- set-up: the models of a run ----

def load_policy(path, ps: mrsp.ParallelState, bf16: bool = False, grad_checkpointing: bool = False,
                shared_prefix: bool = False) -> M.VideoLM:
    """The policy, ready to train: fp32 weights (the optimizer's master copy) that compute in bf16 under
    --bf16 (train.shard_model, train.autocast), with the attention that dtype takes (flash-attn on a GPU
    under FSDP); its LLM in training mode (Hugging Face checkpoints activations only in training mode;
    Qwen2 has no dropout, and the torch engine decodes in eval mode by itself); the vision tower and
    projector frozen (LongVILA-R1), stored in the compute dtype; Ulysses attention over the SP group
    (which also runs the shared-prefix attention) or, in one process, the shared-prefix attention alone;
    FSDP2 shards."""
    attention = M.default_attn_implementation(train.compute_dtype(ps, bf16))
    policy = M.VideoLM.load(path, device=ps.device, attn_implementation=attention)
    policy.freeze_vision(dtype=torch.bfloat16 if bf16 else None)
    policy.llm.train()
    if grad_checkpointing:
        policy.llm.gradient_checkpointing_enable()
    enable_attention(policy, ps, shared_prefix)
    return train.shard_model(policy, ps, bf16)


def enable_attention(model: M.VideoLM, ps: mrsp.ParallelState, shared_prefix: bool) -> None:
    """Ulysses attention over the SP group (it runs packed groups too), or in one process the
    shared-prefix attention for packed groups (the model's own attention for everything else)."""
    if ps.sp_size > 1:
        mrsp.enable_ulysses(model, ps.sp_group)
    elif shared_prefix:
        M.enable_shared_prefix(model)


def with_own_llm(policy: M.VideoLM, path, dtype: torch.dtype, device) -> M.VideoLM:
    """A VideoLM with the LLM of checkpoint `path` (in `dtype`, on `device`) and the policy's own
    frozen vision tower and projector: a second model for what only needs a second LLM. The vision
    weights of `path` are read on the CPU and dropped (in RL they equal the policy's: they never train)."""
    loaded = M.VideoLM.load(path, dtype=dtype)
    return M.VideoLM(loaded.config, policy.vision_tower, policy.mm_projector, loaded.llm.to(device),
                     loaded.tokenizer, release_config=loaded.release_config)  # with it the question prompt


def load_reference(path, policy: M.VideoLM, ps: mrsp.ParallelState, bf16: bool = False,
                   shared_prefix: bool = False) -> M.VideoLM:
    """The reference model of the KL term: the LLM of checkpoint `path` (the initial policy), frozen,
    sharded with FSDP2 like the policy's, computing exactly as the policy computes, so that at step 0
    their log-probs are equal and the KL is 0, not rounding noise:
      - under FSDP with --bf16 the policy's fp32 weights are gathered as bf16 and its LM head as fp32:
        the reference stores its LLM in bf16 (half the memory) and its head in fp32, as stored in `path`;
      - in one process the policy computes fp32 weights under autocast: so does the reference.
    The same attention implementation as the policy's. It owns no vision weights: prompts reuse the
    policy's cached video embeddings."""
    dtype = train.compute_dtype(ps, bf16)
    reference = with_own_llm(policy, path, dtype, ps.device)
    if dtype != torch.float32:
        head = reference.llm.get_output_embeddings()
        stored = checkpoint.read_tensor(policy.family.llm_folder(Path(path)), "lm_head.weight")   # [V, D]
        head.weight = torch.nn.Parameter(stored.to(ps.device, torch.float32))
    reference.llm.requires_grad_(False)
    reference.llm.eval()
    enable_attention(reference, ps, shared_prefix)
    return train.shard_model(reference, ps, bf16)



@dataclass
class Models:
    """What the update works on: the policy and its optimizer, the frozen reference of the KL term (None
    with --kl-coef 0), a prompt builder for each (record -> model.Prompt: `train.VideoPrompts`,
    both through the one embedding cache) and that cache (None with --no-embed-cache)."""
    policy: M.VideoLM
    reference: M.VideoLM | None
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    policy_prompt: Callable
    reference_prompt: Callable | None
    cache: "mrsp.VideoEmbeddingCache | None" = None


def load_models(args, start: Path, sampling: video.FrameSampling, ps: mrsp.ParallelState) -> Models:
    """The policy from checkpoint `start`, the reference from --init (when --kl-coef > 0), AdamW over the
    policy's trainable weights, and the prompt builders of both."""
    policy = load_policy(start, ps, args.bf16, grad_checkpointing=args.grad_checkpointing,
                         shared_prefix=args.shared_prefix)
    reference = (load_reference(args.init, policy, ps, args.bf16, shared_prefix=args.shared_prefix)
                 if args.kl_coef > 0 else None)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    cache = train.embedding_cache(policy, args, ps) if args.embed_cache else None
    reference_prompt = train.VideoPrompts(reference, sampling, ps, cache) if reference is not None else None
    policy_prompt = train.VideoPrompts(policy, sampling, ps, cache, args.decode_workers)
    return Models(policy, reference, params, optimizer, policy_prompt, reference_prompt, cache)


# ---- start-up check: the engine's length ----

PROMPT_SCAN = 64    # records whose prompts are measured at start-up
TEXT_SLACK = 512    # positions a derived --max-model-len leaves for later records with longer text


def prompt_length(model: M.VideoLM, record: data.Record, sampling: video.FrameSampling) -> tuple[int, int]:
    """(frames, tokens) of `record`'s chat prompt, without decoding a frame (the family counts the tokens:
    text + frame steps x tokens per step, VILA's separators included). The frame count is the sampling's
    bound with --num-frames (no file opened) and the container's count with --fps; an .srt counts every cue.
    An image is one frame, a text question none."""
    if record.data_type != "video":
        frames = int(record.data_type == "image")
    else:
        frames = (min(sampling.num_frames, sampling.max_frames) if sampling.fps is None
                  else len(video.frame_timestamps(record.video, sampling)))
    before, after = model.user_turn(record, data.subtitle_text(record))
    return frames, model.family.prompt_length(model, before, after, frames, media=record.data_type)


def engine_max_model_len(model: M.VideoLM, records: list[data.Record], sampling: video.FrameSampling, args) -> int:
    """The engine's max_model_len, settled before the first step: the longest prompt among the first
    PROMPT_SCAN records of each kind (video, image, text) plus --max-new-tokens must fit in --max-model-len,
    or the run is refused now with the numbers (not mid-step, after the models and the engine have loaded).
    Without --max-model-len it is that sum plus TEXT_SLACK. Lengths count tokens (the KV cache's unit), not
    positions, which M-RoPE spaces differently. A 7B VILA prompt of 256 frames is 256 x (256 + 1) ~ 66k tokens.

    Example (tiny VILA model, 4 tokens per frame + 1 separator, 8 frames, 80 text tokens, 64 new tokens):
    needs 8 x 5 + 80 + 64 = 184; --max-model-len 150 raises, no flag gives 184 + 512 = 696.
    """
    longest = None
    # each kind's first records: a set that opens with text questions would otherwise miss its long video prompts
    scan = [r for kind in data.DATA_TYPES for r in [r for r in records if r.data_type == kind][:PROMPT_SCAN]]
    for record in scan:
        try:
            frames, tokens = prompt_length(model, record, sampling)
        except video.VideoError:
            continue  # the step replaces an unreadable record; it makes no prompt
        if longest is None or tokens > longest[0]:
            longest = (tokens, frames, record.problem_id)
    if longest is None:
        raise video.VideoError(f"none of the first {PROMPT_SCAN} records of {args.data} has a readable video")
    tokens, frames, problem_id = longest
    needed = tokens + args.max_new_tokens
    limit = model.llm_config.max_position_embeddings
    where = model.family.llm_folder(model.source) / "config.json" if model.source else "the LLM's config.json"
    if needed > limit:
        raise errors.UsageError(
            f"{args.data}: the prompt of record {problem_id!r} is {tokens} tokens; with --max-new-tokens "
            f"{args.max_new_tokens} it needs {needed}, past the LLM's max_position_embeddings {limit} "
            f"({where}), which vLLM refuses. Lower --num-frames / --max-frames / --fps")
    if args.max_model_len is None:
        return min(needed + TEXT_SLACK, limit)
    if args.max_model_len > limit:
        raise errors.UsageError(f"--max-model-len {args.max_model_len} is past the LLM's max_position_embeddings "
                                f"{limit} ({where}), which vLLM refuses: use at most {limit}")
    if needed > args.max_model_len:
        raise errors.UsageError(
            f"{args.data}: the prompt of record {problem_id!r} is {tokens} tokens ({frames} frames and its "
            f"text); with --max-new-tokens {args.max_new_tokens} "
            f"it needs --max-model-len of at least {needed}, got {args.max_model_len}. Raise --max-model-len "
            f"(or leave it out to derive it), or lower --num-frames / --max-frames / --fps or --max-new-tokens")
    return args.max_model_len



# ---- set-up: the engine ----

def engines_per_group(args, ps: mrsp.ParallelState) -> int:
    """The SP ranks that own an engine. With vLLM every rank owns one and the SP group's ranks split its
    prompts for rollout. (An in-process vLLM engine takes the training process group as its world and
    builds groups of its own from it, a collective step, so every rank must build one anyway; vLLM's
    executor for engines started by an external launcher such as torchrun puts each on its rank's GPU,
    where the default executor would put them all on GPU 0.) The torch engine runs on SP rank 0 only."""
    return ps.sp_size if args.engine == "vllm" else 1


def start_engine(args, policy: M.VideoLM, start: Path, max_model_len: int, ps: mrsp.ParallelState):
    """This rank's rollout engine, or None (see engines_per_group). Under FSDP the policy's weights are
    sharded, so the torch engine decodes with an unsharded copy of the LLM, kept current by sync_engine."""
    if ps.sp_rank >= engines_per_group(args, ps):
        return None
    separate = args.engine == "torch" and ps.world_size > 1
    decoding = (with_own_llm(policy, start, torch.bfloat16 if args.bf16 else torch.float32, ps.device)
                if separate else policy)
    return rollout.make_engine(
        args.engine, decoding, policy.family.llm_folder(start),
        max_model_len=max_model_len, seed=args.seed, dtype="bfloat16" if args.bf16 else "float32",
        gpu_memory_utilization=args.gpu_memory_utilization, enable_sleep_mode=args.engine_sleep,
        distributed_executor_backend="external_launcher" if ps.world_size > 1 else None)


# ---- 3. rollout ----

class PhaseTimer:
    """Seconds per phase of a step (time_<phase> in metrics.jsonl), each taken once the device has finished
    its queued work: CUDA runs asynchronously, and without the synchronize a phase's kernels would be timed
    in the next phase."""

    def __init__(self, device: torch.device):
        self.device, self.times, self.tick = device, {}, time.time()

    def lap(self, phase: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.time()
        self.times[f"time_{phase}"], self.tick = now - self.tick, now


def rollout_share(num_prompts: int, ps: mrsp.ParallelState, engines: int) -> range:
    """The prompts this rank generates: the SP group's first `engines` ranks own engines and split the
    group's prompts into contiguous, near-equal shares (the other ranks get none).
    rollout_share(5, ps, 2) is range(0, 3) on SP rank 0 and range(3, 5) on SP rank 1."""
    if ps.sp_rank >= engines:
        return range(0)
    return mrsp.split_evenly(num_prompts, engines)[ps.sp_rank]


def rollout_groups(engine, prompts: list[torch.Tensor], step: int, args, ps: mrsp.ParallelState) -> list[list]:
    """G = --group-size samples (rollout.Sample) for each prompt, one prefill each, in prompt order on
    every rank of the SP group: its engines generate a contiguous share of the prompts each, then the
    group gathers them. Seeds differ per step and DP rank; within an SP group each prompt keeps the seed of
    its place in the group's batch (vLLM derives the G samples' seeds from a request's), so for one DP layout
    the engines sample with the seeds one engine would use, whatever --sp-size. The engine then sleeps, giving
    its memory to training (a no-op without sleep mode)."""
    groups = []
    share = rollout_share(len(prompts), ps, engines_per_group(args, ps))
    if len(share):
        seed = args.seed + 100_003 * (step * ps.dp_size + ps.dp_rank)
        groups = engine.generate([prompts[i] for i in share], n=args.group_size, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p, seed=seed, first=share.start)
    if engine is not None:
        engine.sleep()
    if ps.sp_size == 1:
        return groups
    shares = [None] * ps.sp_size
    dist.all_gather_object(shares, groups, group=ps.sp_group)
    return [g for share in shares for g in share]


# ---- 4. rewards ----

def format_reward(response: str) -> float:
    """1.0 when the whole response is <think>...</think><answer>...</answer>, nothing nested, answer not empty.

    Example: format_reward("<think>red</think><answer>B</answer>") == 1.0; format_reward("<answer>B</answer>") == 0.0
    """
    return 1.0 if grading.is_well_formed(response) else 0.0


def accuracy_reward(record: data.Record, response: str) -> float:
    """1.0 when the answer inside the last complete <answer>...</answer> matches the ground truth (option
    letter, number within tolerance, or exact text). Only the tagged answer counts, as in the release: an
    untagged "The answer is B" scores 0 here, though grading's lenient reading (eval.py's) accepts it,
    since paying for an answer outside the tags would teach the policy to drop the format.

    Example: accuracy_reward(record, "<think>.</think><answer>B</answer>") == 1.0 and
    accuracy_reward(record, "The answer is B") == 0.0 when record.answer == "B".
    """
    if grading.extract_answer(response) is None:
        return 0.0
    return 1.0 if grading.score_answer(record, response)[0] else 0.0


@dataclass
class Episode:
    """One sampled response with everything the update needs."""
    record: data.Record
    sample: rollout.Sample
    reward: float
    accuracy: float
    format: float
    advantage: float = 0.0


def score_group(record: data.Record, samples: list[rollout.Sample], args) -> list[Episode]:
    """The episodes of one prompt's G samples: reward = accuracy_weight x accuracy + format_weight x format."""
    episodes = []
    for s in samples:
        acc, fmt = accuracy_reward(record, s.text), format_reward(s.text)
        episodes.append(Episode(record, s, args.accuracy_weight * acc + args.format_weight * fmt, acc, fmt))
    return episodes


# ---- 5. advantages ----

def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantage of each response relative to its group.   rewards: [N, G] -> [N, G]

        A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + eps)      (scale_by_std=False: r_ij - mean_j r_ij, Dr. GRPO)

    std is the unbiased sample std. A group whose rewards are all equal gets A = 0: it carries no signal.
    So does a group of one (G = 1), whose unbiased std would be 0/0 = NaN.
    Example: [[1, 0, 0, 1]] -> [[0.866, -0.866, -0.866, 0.866]]; [[1]] -> [[0]].
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centred
    std = rewards.std(dim=1, keepdim=True, correction=1 if rewards.shape[1] > 1 else 0)
    return centred / (std + eps)


def set_advantages(episodes_by_group: list[list[Episode]], args) -> None:
    """Each episode's advantage within its group: group_advantages of the groups' rewards, divided by the
    std unless --no-std-norm."""
    rewards = torch.tensor([[e.reward for e in g] for g in episodes_by_group])             # [N, G]
    advantages = group_advantages(rewards, scale_by_std=args.std_norm)                    # [N, G]
    for g, adv in zip(episodes_by_group, advantages):
        for e, a in zip(g, adv.tolist()):
            e.advantage = a


# ---- 6. update: the loss pieces ----

def policy_loss(logprobs, old_logprobs, advantages, clip_low=0.2, clip_high=0.3, dual_clip=3.0):
    """Per-token clipped-ratio policy-gradient loss with separate low/high clip and dual clip.   all [B, S]

        r = exp(clamp(logp - logp_old, -20, 20))
        l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
        l = min(l, -A dual_clip)   where A < 0   (bounds the loss when a bad action became very likely)

    The log-ratio is clamped to [-20, 20] before the exp, as verl does: unclamped, a gap past ~88 makes
    r = inf, and even where the clip discards that branch its backward is inf * 0 = NaN.
    Returns (l [B, S], clipped [B, S]: where the ratio clip changed the loss).
    Example: A = 1, r = 1.5 -> l = -1.3 (clipped); A = -1, r = 5 -> max(5, 1.3) = 5, dual clip -> 3.
    """
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20, 20))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    per_token = torch.where(advantages < 0, torch.minimum(per_token, -advantages * dual_clip), per_token)
    return per_token, clipped > unclipped


def tis_weights(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling weight of each sampled token (verl, TRL).   [B, S] -> [B, S], detached

        w = min(pi_old / pi_engine, C) = min(exp(clamp(logp_old - logp_engine, -20, 20)), C)

    The engine samples with its own numerics (bf16 vLLM kernels) while the loss assumes the samples came
    from the trainer's pi_old; w reweights each token's policy-gradient term to the trainer's
    distribution, and the cap C bounds the variance a token the engine found unlikely would bring.
    Example: logp_old = log 0.5, logp_engine = log 0.25, C = 1.5 -> w = min(2, 1.5) = 1.5.
    """
    return torch.exp((old_logprobs - engine_logprobs).detach().clamp(-20, 20)).clamp(max=cap)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference) from samples of the policy:

        k3 = exp(ref - logp) - (ref - logp) - 1   >= 0, unbiased, low variance (Schulman, "Approximating KL").

    Clamped as verl does: the log-ratio to [-20, 20] before the exp, and k3 to at most 10. A token the
    two models disagree on wildly (a log-prob gap past ~88 overflows exp, in bf16 as in fp32) then adds a
    bounded loss and a zero gradient, instead of inf, whose backward is inf * 0 = NaN.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-20, 20)
    return (torch.exp(log_ratio) - log_ratio - 1).clamp(max=10)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce a per-token loss [B, S] to a scalar over the response tokens (mask [B, S]).

        token-mean           sum_i sum_t l_it / sum_i |o_i|          every token weighs the same (default, DAPO)
        seq-mean-token-mean  1/B sum_i (1/|o_i|) sum_t l_it         the original GRPO: long answers weigh less per token
        seq-mean-token-sum   1/B sum_i sum_t l_it                   Dr. GRPO style: no length normalisation
    """
    mask = mask.to(per_token.dtype)
    if mode == "token-mean":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    per_seq = (per_token * mask).sum(dim=1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / mask.sum(dim=1).clamp(min=1)
    elif mode != "seq-mean-token-sum":
        raise ValueError(f"unknown --loss-agg {mode!r}")
    return per_seq.mean()


def grpo_loss(logprobs, old_logprobs, ref_logprobs, engine_logprobs, advantages, mask, args):
    """The GRPO objective of one micro-batch.   all tensors [B, S]; ref_logprobs None without the KL term

        loss = agg_t(w_t l_t) + kl_coef agg_t(k3_t)

    l_t: policy_loss (--clip-low, --clip-high, --dual-clip); w_t: tis_weights with --tis-cap (1 when 0);
    k3_t: kl_k3 to the reference (--kl-coef); agg: aggregate (--loss-agg).
    Returns (loss, metrics): loss, kl, clip_frac and, with TIS, tis_weight_mean and tis_capped_share
    (the share of response tokens whose weight hit the cap), as detached scalars.
    """
    share = lambda where: (where & mask).sum() / mask.sum().clamp(min=1)
    per_token, clipped = policy_loss(logprobs, old_logprobs, advantages, args.clip_low, args.clip_high,
                                     args.dual_clip)
    metrics = {"clip_frac": share(clipped)}
    if args.tis_cap > 0:
        weights = tis_weights(old_logprobs, engine_logprobs, args.tis_cap)
        per_token = per_token * weights
        metrics["tis_weight_mean"] = aggregate(weights, mask, "token-mean")
        metrics["tis_capped_share"] = share(weights >= args.tis_cap)
    kl = aggregate(kl_k3(logprobs, ref_logprobs), mask, args.loss_agg) if ref_logprobs is not None else torch.zeros(())
    loss = aggregate(per_token, mask, args.loss_agg) + args.kl_coef * kl
    return loss, {"loss": loss.detach(), "kl": kl.detach(), **{k: v.detach() for k, v in metrics.items()}}


# ---- 6. update: the passes ----

def plan_passes(episodes_by_group, prompt_lens: list[int], args, ps: mrsp.ParallelState) -> tuple[list, int]:
    """The update's passes: per mini-batch (--mini-batches near-equal runs of whole groups, in order) its
    micro-batches, the episodes of each forward/backward.

    A pass's rows are padded to its longest (P + R per sequence; P + G*R per packed group), so sequences
    of similar length share a pass (mrsp.length_runs): a text question is not padded to an hour of video
    beside it. A micro-batch holds at most --micro-batch-size sequences (with the shared prefix whole
    groups, as many as fit, at least one) and, with --micro-batch-tokens, at most that many padded
    positions (rows x longest row; a longer row runs alone); each mini-batch takes the fewest passes
    those bounds allow. Every data-parallel rank takes the largest count any rank needs (FSDP runs its
    collectives once per pass on each rank). Returns [mini-batch][micro-batch][episode] and the largest
    pass's padded positions."""
    def units(groups, lens):  # (episodes, row length) of each thing a micro-batch holds whole
        if args.shared_prefix:    # a packed group: its prompt once, then its G responses
            return [(g, P + sum(len(e.sample.token_ids) for e in g)) for g, P in zip(groups, lens)]
        return [([e], P + len(e.sample.token_ids)) for g, P in zip(groups, lens) for e in g]  # [prompt; response]
    per = max(1, args.micro_batch_size // len(episodes_by_group[0])) if args.shared_prefix else args.micro_batch_size
    minis = [units(episodes_by_group[r.start:r.stop], prompt_lens[r.start:r.stop])
             for r in mrsp.split_evenly(len(episodes_by_group), min(args.mini_batches, len(episodes_by_group)))]
    runs = lambda mini, parts=None: mrsp.length_runs([c for _, c in mini], per, args.micro_batch_tokens, parts)
    counts = mrsp.largest_on_all([len(runs(mini)) for mini in minis], ps.dp_group, ps.device)
    splits = [(mini, runs(mini, k)) for mini, k in zip(minis, counts)]
    largest = max(len(run) * max(mini[i][1] for i in run) for mini, parts in splits for run in parts)
    return [[[e for i in run for e in mini[i][0]] for run in parts] for mini, parts in splits], largest


def batch_logprobs(model, prompt_fn, episodes, ps, temperature, shared_prefix: bool, group_size: int):
    """Log-probs of the episodes' response tokens under `model`, and the mask of real tokens.

    shared_prefix: the episodes are whole groups (G consecutive episodes share a prompt); each group is
    one packed row [prompt][response 1]...[response G], the prompt run once: [E, R_max] per response.
    Otherwise each episode is its own sequence [prompt; response]: [E, S]. Either way sharded over SP;
    the losses only sum over the mask, so they do not care which layout it is.
    """
    if shared_prefix:
        groups = [episodes[i:i + group_size] for i in range(0, len(episodes), group_size)]
        batch = model.build_packed_batch([prompt_fn(g[0].record) for g in groups],
                                         [[e.sample.token_ids for e in g] for g in groups],
                                         sp_rank=ps.sp_rank, sp_size=ps.sp_size)   # this rank's slice
        return train.sequence_logprobs(model, batch, ps, temperature), batch.response_mask
    batch = model.build_sequence_batch([prompt_fn(e.record) for e in episodes],
                                       [e.sample.token_ids for e in episodes],
                                       sp_rank=ps.sp_rank, sp_size=ps.sp_size)          # this rank's slice
    return train.sequence_logprobs(model, batch, ps, temperature), batch.loss_mask


def engine_logprobs(episodes: list[Episode], mask: torch.Tensor) -> torch.Tensor:
    """The engine's log-prob of each sampled token, laid out like the trainer's: [B, S] (0 off the mask;
    the mask's row b holds episode b's tokens in order, in either layout of batch_logprobs)."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)                 # [B, S]
    out[mask] = torch.tensor([lp for e in episodes for lp in e.sample.logprobs], device=mask.device)
    return out


def micro_batch_weight(micro, mini_batch, loss_agg: str) -> float:
    """The share of its mini-batch's loss that a micro-batch's `aggregate` stands for, so that the
    micro-batches add up to the mini-batch's loss taken whole, whatever the split:

        token-mean          tokens in the micro-batch / tokens in the mini-batch
        seq-mean-token-*    sequences in the micro-batch / sequences in the mini-batch

    Example: 40 sequences in micro-batches of 16/16/8 under seq-mean -> 0.4, 0.4, 0.2 (equal weights of
    1/3 would count the last 8 sequences double).
    """
    if loss_agg == "token-mean":
        tokens = lambda eps: sum(len(e.sample.token_ids) for e in eps)
        return tokens(micro) / tokens(mini_batch)
    return len(micro) / len(mini_batch)


def update_policy(models: Models, episodes_by_group: list[list[Episode]], prompt_lens: list[int], args,
                  ps: mrsp.ParallelState, timer: PhaseTimer) -> dict:
    """One GRPO update on a step's episodes (prompt_lens: each group's prompt length): --mini-batches
    optimizer steps, each over its micro-batches (plan_passes).

    Old-policy log-probs: with one mini-batch the update is on-policy, so they equal the current ones
    before the update and are taken (detached) from the update's own forward, as verl does; with more,
    later mini-batches score samples of an older policy, so they come from a pass over the whole batch
    before the first step. Reference log-probs come from a pass before it too. Each micro-batch's loss is
    grpo_loss; the micro-batches add up to their mini-batch's loss taken whole (micro_batch_weight).
    Returns the step's metrics: loss, kl, clip_frac (TIS: tis_*), grad_norm, logprob_gap_max (the largest
    |engine - trainer old log-prob| of a sampled token: the rollout/training mismatch), old_logprobs_reused,
    micro_batches and micro_positions_max (the passes, and the most padded LLM positions one of them held).
    """
    passes, largest = plan_passes(episodes_by_group, prompt_lens, args, ps)     # [mini-batch][micro-batch]
    on_policy = len(passes) == 1
    logprobs = lambda model, prompt_fn, micro: batch_logprobs(model, prompt_fn, micro, ps, args.temperature,
                                                              args.shared_prefix, args.group_size)
    with torch.no_grad(), train.autocast(ps, args.bf16):
        old_lp = [[None if on_policy else logprobs(models.policy, models.policy_prompt, micro)[0] for micro in mini]
                  for mini in passes]
        ref_lp = [[None if models.reference is None else logprobs(models.reference, models.reference_prompt, micro)[0]
                   for micro in mini] for mini in passes]
    if models.reference is not None:
        train.reshard(models.reference)  # it has no backward to free its embedding and LM head
    timer.lap("logprobs")

    stats, gap = defaultdict(float), 0.0
    for m, mini in enumerate(passes):
        mini_episodes = [e for micro in mini for e in micro]
        for k, micro in enumerate(mini):
            with train.autocast(ps, args.bf16):
                lp, mask = logprobs(models.policy, models.policy_prompt, micro)      # [B, S] each
                old = lp.detach() if on_policy else old_lp[m][k]                     # the old policy's log-probs
                engine_lp = engine_logprobs(micro, mask)                             # [B, S]
                adv = torch.tensor([e.advantage for e in micro], device=lp.device)[:, None].expand_as(lp)
                loss, metrics = grpo_loss(lp, old, ref_lp[m][k], engine_lp, adv, mask, args)
            # The micro-batches add up to the mini-batch's loss taken whole (micro_batch_weight). FSDP
            # averages over all ranks; x sp_size makes that a sum over the SP group.
            weight = micro_batch_weight(micro, mini_episodes, args.loss_agg)
            (loss * weight * ps.sp_size).backward()
            for name, value in metrics.items():
                stats[name] += value.item() * weight / len(passes)
            gap = max(gap, ((old.float() - engine_lp).abs() * mask).max().item())
        stats["grad_norm"] += train.clip_grad_norm(models.params, args.max_grad_norm) / len(passes)
        models.optimizer.step()
        models.optimizer.zero_grad(set_to_none=True)
    timer.lap("update")
    return {**stats, "logprob_gap_max": gap, "old_logprobs_reused": float(on_policy),
            "micro_batches": sum(len(mini) for mini in passes), "micro_positions_max": largest}


# ---- 7. sync, metrics ----

def sync_engine(engine, model, ps):
    """Stream the trainer's current LLM weights into the engine, one full tensor at a time in the
    engine's dtype (collective: every rank gathers each tensor; a rank without an engine drops it)."""
    weights = train.llm_weights(model, dtype=engine.dtype if engine is not None else None)
    if engine is None:
        for _ in weights:
            pass
    else:
        engine.sync_weights(weights)  # a sleeping vLLM engine wakes its weights' memory only, then its KV cache


def counters(models: Models) -> dict:
    """Running totals that a step's metrics report as differences: vision-tower runs, replaced records,
    seconds the step waited for video frames."""
    builders = [b for b in (models.policy_prompt, models.reference_prompt) if b is not None]
    return {"vision_runs": train.count_vision_runs(models.cache, *builders),
            "skipped_records": models.policy_prompt.skipped, "video_wait_s": models.policy_prompt.reader.waited}


def type_counts(episodes: list[Episode], label: str, types: list[str]) -> dict:
    """Right answers and responses per question type (the records' `label` field, e.g. category) in one
    step: {"correct/count": 3, "responses/count": 16, ...}, every type present (zeros) so that all ranks
    sum the same keys. `type_accuracy` turns the summed counts into accuracy_<type>."""
    counts = {f"{kind}/{t}": 0 for t in types for kind in ("correct", "responses")}
    for e in episodes:
        t = e.record.labels.get(label)
        if t in types:
            counts[f"correct/{t}"] += e.accuracy
            counts[f"responses/{t}"] += 1
    return counts


def type_accuracy(row: dict, types: list[str]) -> dict:
    """The summed counts of `type_counts` -> accuracy_<type> added for the types this step saw, plus the share
    of groups whose G rewards were all equal (no_signal_share: those groups teach nothing)."""
    out = dict(row)
    for t in types:
        if row[f"responses/{t}"]:
            out[f"accuracy_{t}"] = row[f"correct/{t}"] / row[f"responses/{t}"]
    out["no_signal_share"] = row["no_signal_groups"] / max(1, row["groups"])
    return out


def llm_positions(prompt_lens: list[int], episodes_by_group, shared_prefix: bool) -> int:
    """LLM positions of one pass over the step's episodes: sum of P + G*R per group with the shared
    prefix, of G*(P + R) without."""
    responses = [sum(len(e.sample.token_ids) for e in g) for g in episodes_by_group]
    copies = [1 if shared_prefix else len(g) for g in episodes_by_group]
    return sum(c * P + R for c, P, R in zip(copies, prompt_lens, responses))


def step_metrics(step: int, episodes_by_group: list[list[Episode]], prompt_lens: list[int], stats: dict,
                 timer: PhaseTimer, models: Models, before: dict, types: list[str], args,
                 ps: mrsp.ParallelState) -> dict:
    """The step's row of metrics.jsonl, reduced over the data-parallel ranks (means, and sums of counts):
    reward, accuracy, format, response_len; no_signal_groups of groups (all G rewards equal: zero
    advantage) and their share; accuracy_<type> per --type-label value (from correct/<type> and
    responses/<type>); loss, kl, clip_frac, grad_norm, tis_*, micro_* (`update_policy`); time_<phase>; vision_runs
    (tower runs in all passes); llm_positions (rollout and training passes); old_logprobs_reused (1: the
    on-policy update's forward gave them); logprob_gap_max (largest |engine - trainer| log-prob of a sampled
    token); skipped_records; the cache's bytes and entries (fullest rank) and hits and misses (since start);
    video_wait_s (the step's wait for frames) and videos_decord / videos_pyav (files each reader read)."""
    episodes = [e for g in episodes_by_group for e in g]
    rewards = torch.tensor([[e.reward for e in g] for g in episodes_by_group])              # [N, G]
    passes = 1 + (not stats["old_logprobs_reused"]) + (models.reference is not None)      # forward passes
    mean = lambda values: sum(values) / len(episodes)
    row = {"step": step + 1, "reward": rewards.mean().item(), "accuracy": mean(e.accuracy for e in episodes),
           "format": mean(e.format for e in episodes),
           "response_len": mean(len(e.sample.token_ids) for e in episodes),
           "no_signal_groups": int((rewards.max(dim=1).values == rewards.min(dim=1).values).sum()),
           "groups": len(episodes_by_group), **type_counts(episodes, args.type_label, types), **stats,
           "llm_positions": (llm_positions(prompt_lens, episodes_by_group, True)                # rollout
                             + passes * llm_positions(prompt_lens, episodes_by_group, args.shared_prefix)),
           **timer.times, **{k: v - before[k] for k, v in counters(models).items()},
           **train.cache_metrics(models.cache), **train.reader_counts()}
    row = train.reduce_metrics(row, ps, sum_keys=("no_signal_groups", "groups", "vision_runs", "skipped_records",
                                                  "llm_positions", *train.CACHE_SUM_KEYS, *train.READER_SUM_KEYS,
                                                  *(k for k in row if k.startswith(("correct/", "responses/")))),
                               max_keys=("logprob_gap_max", "micro_positions_max", *train.CACHE_MAX_KEYS))
    return type_accuracy(row, types)


# ---- main ----

def main(argv=None):
    args = parse_args(argv)
    ps, out, resume_from = train.start_run(args, resumable=("steps",))
    start = Path(resume_from or args.init)

    # ---- data, models, engine ----
    records = train.load_training_records(args, ps)
    types = sorted({r.labels[args.type_label] for r in records if args.type_label in r.labels})  # accuracy_<type>
    sampling = video.FrameSampling.from_args(args)
    models = load_models(args, start, sampling, ps)
    max_model_len = engine_max_model_len(models.policy, records, sampling, args)  # refuses too long prompts now
    start_step = (train.load_trainer_state(resume_from, models.policy, models.optimizer, ps)["step"]
                  if resume_from else 0)
    engine = start_engine(args, models.policy, start, max_model_len, ps)
    log = runs.MetricsLog(out, enabled=ps.rank == 0, resume_step=start_step, report_to=args.report_to)

    from tqdm import tqdm
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=ps.rank != 0, desc="grpo")
    for step in bar:
        timer, before = PhaseTimer(ps.device), counters(models)
        # ---- 1. sample ----
        recs = train.records_for_step(records, step, args.batch_size, ps, args.seed)
        models.policy_prompt.prefetch(*[(train.records_for_step(records, s, args.batch_size, ps, args.seed), sampling)
                                        for s in range(step, min(step + 2, args.steps))])  # read while the step runs

        # ---- 2. MR-SP stage 1: encode each video once (cached); an unreadable one is replaced ----
        with torch.no_grad():
            recs, prompts = models.policy_prompt.for_batch(recs, records)       # a model.Prompt each
        timer.lap("encode")

        # ---- 3. rollout: G responses per prompt, one prefill each; the SP group's engines share the prompts ----
        train.reshard(models.policy)  # the token embedding, gathered to build the prompts, goes back to its shards
        groups = rollout_groups(engine, prompts, step, args, ps)
        prompt_lens = [len(p) for p in prompts]
        del prompts  # each pass builds them again (video from the cache): a 7B prompt of 256 frames is ~66k x 3584
        timer.lap("rollout")

        # ---- 4. rewards, 5. advantages ----
        episodes_by_group = [score_group(r, g, args) for r, g in zip(recs, groups)]
        set_advantages(episodes_by_group, args)

        # ---- 6. update: old-policy and reference log-probs, clipped ratio + k3 KL, sequences sharded over SP ----
        stats = update_policy(models, episodes_by_group, prompt_lens, args, ps, timer)

        # ---- 7. sync weights into the engine, log, checkpoint ----
        sync_engine(engine, models.policy, ps)
        timer.lap("sync")
        row = step_metrics(step, episodes_by_group, prompt_lens, stats, timer, models, before,
                           types, args, ps)
        log.log(row)
        bar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.2f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            train.save_checkpoint(out, step + 1, models.policy, models.optimizer, ps)

    # ---- finish ----
    weights = train.full_state_dict(models.policy, ps)
    if ps.rank == 0:
        models.policy.save(out / "final", weights)
        runs.plot_metrics(log.path, ["reward", "accuracy", "accuracy_*", "no_signal_share", "format", "kl",
                                      "response_len"], out / "rl_curves.png", f"GRPO: {args.data}")
        print(f"wrote {out / 'final'} and {out / 'rl_curves.png'}")
    log.close()
    train.shutdown(ps, engine)  # the engine first: an in-process vLLM engine holds groups of its own


if __name__ == "__main__":
    errors.run_main(main)
