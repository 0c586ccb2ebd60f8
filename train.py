"""The training plumbing that both stages share: sft.py (CoT-SFT) and rl.py (GRPO) import it.

What is here, in the order a training script uses it:
  - run set-up: process groups and the (dp x sp) layout (`start_run`), a seed per rank, the output folder
    (what it may hold and the metrics written there: runs.py)
  - FSDP2: sharding the model over every rank (`shard_model`), gathering full weights for a checkpoint
    or for the rollout engine (`full_state_dict`, `llm_weights`)
  - the records a run trains on: bad rows and unreadable videos skipped and counted (`load_training_records`)
  - the prompts of a batch: frames decoded, the video encoded once through the MR-SP embedding cache,
    text spliced around it (`VideoPrompts`), and sequence-parallel log-probs (`sequence_logprobs`)
  - checkpoints and resume (`save_checkpoint`, `load_trainer_state`; runs.latest_checkpoint finds them)
  - metrics averaged over ranks (`reduce_metrics`; runs.MetricsLog writes them), the learning-rate
    schedule (`lr_at`)
  - the command-line flags every training script shares (`add_run_args`)

Data flows one way: data.py, model.py and mrsp.py below; sft.py and rl.py above. Nothing here is
specific to one stage: the SFT loss lives in sft.py, the GRPO loss in rl.py.
"""
import argparse
import json
import logging
import math
import os
import random
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

import checkpoint
import data
import errors
import model as M
import mrsp
import runs
import video

logger = logging.getLogger("train")

# ---- distributed model: FSDP2 ----


def shard_model(model: M.VideoLM, ps: mrsp.ParallelState, bf16: bool = False):
    """Shard parameters, gradients and optimizer state over all ranks with FSDP2 (no-op on one process).

    The FSDP units, and when each frees its gathered weights again:

        the LLM's decoder         ONE root over every decoder layer (VILA: llm.model; Qwen2.5-VL:
                                  llm.model.language_model): the layers share its all-gather
                                  streams and buffers, so layer i+1's all-gather overlaps layer i's
                                  compute and backward prefetches the next layer. Its own weights (the
                                  final norm) stay gathered until backward.
          .layers[i]              freed right after its forward (backward gathers it again): a pass
                                  holds one layer's full weights at a time, not the whole LLM.
          .embed_tokens           called on its own too (to embed a prompt's text), so its own unit; it
                                  stays gathered until backward frees it, or `reshard(model)`.
        llm.lm_head               a root of its own (it runs outside the decoder, on scored rows only);
                                  gathered until backward or `reshard(model)`.
        vision_tower, mm_projector  sharded only when they train; frozen, they stay replicated: every
                                  rank encodes its own share of the frames with them.

    Precision (`bf16`): FSDP2's MixedPrecisionPolicy. The sharded weights stay fp32 (the optimizer's
    master copy); each all-gather casts them to bf16 (half the traffic), forward and backward compute in
    bf16, gradients are reduced in fp32. The LM head is the exception: gathered and computed in fp32,
    since log-probs from bf16 logits are off by up to ~0.05 nats at a logit of 25 (see
    `VideoLM.score_rows`). No autocast is used under FSDP (see `autocast`).

    The LLM is always sharded, trainable or not (the frozen reference model too).
    """
    if ps.world_size == 1:
        return model
    if model.llm.get_output_embeddings().weight is model.llm.get_input_embeddings().weight:
        # Sharded as two units, the one tied weight would become two parameters and silently untie.
        raise errors.UsageError("this LLM ties its input and output embeddings (tie_word_embeddings=True, e.g. "
                                "Qwen2-0.5B/1.5B), which FSDP2 cannot shard here; train it in one process, or make "
                                "a checkpoint with its own LM head: python model.py init --untie-embeddings ...")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(ps.device.type, (ps.world_size,))  # shard over every rank, dp and sp alike
    compute = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
               else MixedPrecisionPolicy())
    full = MixedPrecisionPolicy()  # the LM head: gathered and computed in its own dtype (fp32)
    decoder = model.llm.get_decoder()
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True, mp_policy=compute)
    fully_shard(decoder.embed_tokens, mesh=mesh, reshard_after_forward=False, mp_policy=compute)
    fully_shard(decoder, mesh=mesh, reshard_after_forward=False, mp_policy=compute)
    fully_shard(model.llm.get_output_embeddings(), mesh=mesh, reshard_after_forward=False, mp_policy=full)
    for unit in (model.vision_tower, model.mm_projector):
        if any(p.requires_grad for p in unit.parameters()):
            fully_shard(unit, mesh=mesh, reshard_after_forward=False, mp_policy=compute)
    # FSDP2 makes the first unit that runs forward a root. The first call is the embedding's (a prompt's
    # text, before any decoder pass), which would make it a root of its own and then refuse the decoder
    # ("requires running forward through the root module first"): settle the decoder as the root now.
    decoder._get_fsdp_state()._lazy_init()
    return model


def fsdp_structure(model: torch.nn.Module) -> list[dict]:
    """The FSDP units of `model` as a table: name, whether it is a root, whether it frees its weights
    after forward, the dtype its weights are gathered and computed in, and its parameter count (its
    own, not its sub-units'). For tests and `bench.py memory --grpo-step`. Empty without FSDP."""
    from torch.distributed.fsdp import FSDPModule
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        group = state._fsdp_param_group
        if group is None:  # a unit with no parameters of its own
            continue
        first = group.fsdp_params[0]
        rows.append({"unit": name or "(model)", "root": bool(state._is_root),
                     "reshard_after_forward": group.post_forward_mesh_info is not None,
                     "compute_dtype": str(first.param_dtype or first.orig_dtype).replace("torch.", ""),
                     "params": sum(p._orig_size.numel() for p in group.fsdp_params)})
    return rows


def reshard(model: M.VideoLM):
    """Free the full weights every FSDP unit of `model` still holds: after a pass without backward
    (log-probs under no_grad, building prompts), which would otherwise leave the token embedding and
    the LM head gathered (see `shard_model`). Also before reading the parameters themselves (to build
    an optimizer, say): a gathered unit's parameters are its full tensors. A no-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state_dict(model: M.VideoLM, ps: mrsp.ParallelState) -> dict:
    """The full, unsharded weights on rank 0, in CPU memory; an empty dict on the other ranks, which
    only write nothing (collective: all ranks must call). For saving: rank 0 writes the checkpoint."""
    if ps.world_size == 1:
        return {k: v.detach() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def llm_weights(model: M.VideoLM, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The LLM's full weights (Hugging Face names) in `dtype`, one tensor at a time: what a rollout
    engine needs after each update, streamed into it (`engine.sync_weights(llm_weights(model, dtype))`).

    A generator: each tensor is gathered where it lives (an all-gather over the FSDP mesh, GPU to GPU),
    cast to the engine's dtype, handed on, and dropped before the next one is gathered, so no rank
    holds more than one full tensor beside its shards and nothing goes through host memory. Collective
    under FSDP: every rank must run the whole stream, in the same order; a rank without an engine
    drains it (`for _ in llm_weights(model): pass`). In one process the tensors are the parameters.
    """
    for name, tensor in model.llm.state_dict().items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        yield name, tensor.detach().to(dtype or tensor.dtype)


def clip_grad_norm(params, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def reduce_metrics(row: dict, ps: mrsp.ParallelState, sum_keys=(), max_keys=()) -> dict:
    """Average a row of scalar metrics over the data-parallel ranks; sum the counts in `sum_keys`, take
    the largest of `max_keys`."""
    if ps.dp_size == 1:
        return row
    keys = [k for k in sorted(row) if k != "step"]
    values = torch.tensor([float(row[k]) for k in keys], dtype=torch.float64, device=ps.device)
    largest = values.clone()
    dist.all_reduce(values, group=ps.dp_group)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=ps.dp_group)
    out = {k: v if k in sum_keys else m if k in max_keys else v / ps.dp_size
           for k, v, m in zip(keys, values.tolist(), largest.tolist())}
    return {"step": row["step"], **out}


def shutdown(ps: mrsp.ParallelState, *engines):
    """End the run: close the rollout `engines` (None: a rank without one), then leave the torchrun job.

    The order matters: an in-process vLLM engine builds process groups of its own on the training's
    and tears them down when it closes. Left to the garbage collector, it closed after the training's
    group was gone and every rank printed a traceback at exit ("Invalid process group specified").
    A single process never made a group of its own (vLLM's, if any, goes with the engine)."""
    for engine in engines:
        if engine is not None:
            engine.close()
    if ps.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def autocast(ps: mrsp.ParallelState, bf16: bool):
    """bf16 autocast for a run in one process; nothing under FSDP, where `shard_model`'s mixed-precision
    policy already computes in bf16 (autocast on top would keep a bf16 copy of every gathered weight for
    the whole block, and leave the residual stream, RoPE and Ulysses' q/k/v in fp32)."""
    return torch.autocast(ps.device.type, dtype=torch.bfloat16) if bf16 and ps.world_size == 1 else nullcontext()


def compute_dtype(ps: mrsp.ParallelState, bf16: bool) -> torch.dtype:
    """The dtype the LLM's weights compute in: bf16 under FSDP with --bf16 (gathered as bf16), else the
    stored fp32 (a one-process run computes under autocast but holds fp32 weights). It picks the
    attention (flash-attn needs bf16 weights) and the dtype of a model that must compute like the policy."""
    return torch.bfloat16 if bf16 and ps.world_size > 1 else torch.float32


# ---- run set-up ----

def start_run(args, resumable=()) -> tuple[mrsp.ParallelState, Path, Path | None]:
    """What sft.py and rl.py do first: check what --out holds (`check_run_folder`; every rank reads the
    folder before any rank writes to it), the process groups, a seed per rank, the output folder with
    the run's settings.json, and the checkpoint to resume from (None: start from --init).
    `resumable`: the script's flags that may change on --resume besides runs.RESUMABLE (rl.py's --steps:
    its learning rate has no schedule that the step count would stretch)."""
    out = Path(args.out)
    runs.check_tracker(args.report_to)
    settings = runs.run_settings(args)
    resume_from = runs.check_run_folder(out, args, settings, resumable)
    ps = mrsp.init_distributed(args.sp_size)  # once its groups stand, every rank has checked the folder
    torch.manual_seed(args.seed + ps.rank)
    if ps.rank == 0:
        if args.overwrite and (found := runs.run_outputs(out)):
            print(f"--overwrite: removing the run in {out} ({', '.join(found)})")
            runs.remove_run(out)
        elif args.resume and resume_from is None:
            print(f"--resume: no run in {out} yet; starting from --init")
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    if ps.world_size > 1:
        dist.barrier()  # the old run is gone before any rank writes into the folder
    return ps, out, resume_from


# ---- checkpoint and resume ----

def rng_state() -> dict:
    """This process's RNG states as JSON values: python's `random`, numpy's global generator, torch's
    CPU generator and each GPU's (their bytes in hex). `set_rng_state` restores them exactly."""
    version, words, gauss = random.getstate()                     # Mersenne Twister: 624 words + position
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": [version, list(words), gauss],
            "numpy": [keys.tolist(), pos, has_gauss, cached_gaussian],
            "torch": torch.get_rng_state().numpy().tobytes().hex(),
            "cuda": [s.numpy().tobytes().hex() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def set_rng_state(state: dict):
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(torch.frombuffer(bytearray.fromhex(state["torch"]), dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():  # one generator per GPU
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray.fromhex(h), dtype=torch.uint8) for h in state["cuda"]])


def save_checkpoint(out_dir, step: int, model, optimizer, ps: mrsp.ParallelState, extra: dict | None = None):
    """OUT/checkpoint-STEP (collective: all ranks call):

        config.json, llm/, vision_tower/, mm_projector/   the model in the release layout (full weights, rank 0)
        optimizer/rank-R.safetensors   the optimizer state in shards: each rank writes the part it holds
        trainer_state.json    step, the RNG state of every rank (`rng_state`), `extra` (JSON values)

    Under FSDP no rank ever holds the whole optimizer state (AdamW's is twice the fp32 model: ~56 GB at
    7B). Nothing is pickled: a resume runs no code from the folder. Everything is written into a
    temporary folder, renamed once every rank has finished: a killed run leaves no half checkpoint.
    """
    weights = full_state_dict(model, ps)
    rngs = [rng_state()]
    if ps.world_size > 1:
        rngs = [None] * ps.world_size
        dist.all_gather_object(rngs, rng_state())
    with checkpoint.atomic_directory(Path(out_dir) / f"checkpoint-{step}") if ps.rank == 0 else nullcontext() as tmp:
        tmp = Path(broadcast_from_rank0(str(tmp) if ps.rank == 0 else None, ps))
        save_optimizer(tmp / "optimizer", model, optimizer, ps)
        if ps.rank == 0:
            model.write(tmp, weights)
            state = {"step": step, "world_size": ps.world_size, "extra": extra or {}, "rng": rngs}
            (tmp / runs.TRAINER_STATE).write_text(json.dumps(state))
        if ps.world_size > 1:
            dist.barrier()  # every rank's shard is written before rank 0 renames the folder
    if ps.world_size > 1:
        dist.barrier()


def broadcast_from_rank0(value, ps: mrsp.ParallelState):
    """Rank 0's `value` (any picklable object) on every rank."""
    if ps.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly FSDP-sharded) tensor that this rank holds."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def save_optimizer(folder: Path, model, optimizer, ps: mrsp.ParallelState) -> None:
    """This rank's part of the optimizer state as folder/rank-R.safetensors: every tensor of the state
    (AdamW: exp_avg, exp_avg_sq, step of each parameter) as "PARAMETER/NAME", the shard this rank holds
    under FSDP; the param groups (lr, betas, ...) as JSON in the file's metadata."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    optim = get_optimizer_state_dict(model, optimizer)
    tensors = {f"{param}/{name}": _local(value).detach().contiguous()
               for param, state in optim["state"].items() for name, value in state.items()}
    folder.mkdir(exist_ok=True)
    save_file(tensors, folder / f"rank-{ps.rank}.safetensors",
              metadata={"param_groups": json.dumps(optim["param_groups"])})


def load_optimizer(folder: Path, model, optimizer, ps: mrsp.ParallelState) -> None:
    """Read back what `save_optimizer` wrote on this rank (same number of processes: the shards are
    per rank). Collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    optim = get_optimizer_state_dict(model, optimizer)  # the layout to read into: this rank's shards
    with safe_open(folder / f"rank-{ps.rank}.safetensors", framework="pt") as f:
        for param, state in optim["state"].items():
            for name, value in state.items():
                _local(value).copy_(f.get_tensor(f"{param}/{name}"))
        optim["param_groups"] = json.loads(f.metadata()["param_groups"])
    set_optimizer_state_dict(model, optimizer, optim)


def load_trainer_state(path, model, optimizer, ps) -> dict:
    """Restore the optimizer (each rank reads back the shards it holds) and this rank's RNG from
    checkpoint `path`; returns its trainer_state.json (step, world_size, extra, rng). Nothing is
    unpickled: tensors come from safetensors, the rest from JSON. Collective under FSDP."""
    state = json.loads((Path(path) / runs.TRAINER_STATE).read_text())
    load_optimizer(Path(path) / "optimizer", model, optimizer, ps)
    set_rng_state(state["rng"][ps.rank])
    return state


# ---- learning-rate schedule ----

def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to base_lr over warmup_steps, then cosine decay to min_ratio * base_lr.

    Example: lr_at(0, 100, 1e-3, 10) == 1e-4; lr_at(10, 100, 1e-3, 10) == 1e-3; lr_at(100, 100, 1e-3, 10) == 1e-4.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- command-line flags both stages share ----

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the module docstring's layout and shows every flag's default."""


def add_run_args(ap, save_every: int):
    """The flags every training script shares: parallelism, precision, checkpoints, seed."""
    ap.add_argument("--sp-size", type=int, default=1, help="sequence-parallel group size (MR-SP)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="recompute LLM activations in backward")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                    help="compute in bf16 with fp32 master weights (default on a GPU): FSDP2 mixed precision "
                         "under torchrun, autocast in one process; log-probs always in fp32")
    ap.add_argument("--save-every", type=int, default=save_every, help="checkpoint every N steps (0: only final)")
    folder = ap.add_mutually_exclusive_group()
    folder.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its newest complete checkpoint, with the same "
                             "settings (a folder with no run: start there)")
    folder.add_argument("--overwrite", action="store_true",
                        help="replace the run in --out (a folder that holds a run is refused without "
                             "--resume or --overwrite)")
    ap.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and initial RNG")
    ap.add_argument("--report-to", choices=["none", *runs.TRACKERS], default="none",
                    help="also log every metrics.jsonl row, and the run's settings as its config, to TensorBoard "
                         "(OUT/tensorboard/) or Weights & Biases (OUT/wandb/, offline without an API key); "
                         "needs `pip install tensorboard` or `pip install wandb`")


# ---- the prompts and log-probs of a batch ----

class VideoPrompts:
    """Prompts (model.Prompt) for records: frames decoded (read ahead in `decode_workers` threads after
    `prefetch`), video encoded (through the MR-SP embedding cache when the vision tower is frozen), text
    spliced around the video, positions given. An image record's picture goes the same way as a one-frame
    video (its cache key: the file and the family's `image_setting`); a text record skips the vision tower."""

    def __init__(self, model: M.VideoLM, sampling: video.FrameSampling, ps: mrsp.ParallelState,
                 cache: "mrsp.VideoEmbeddingCache | None", decode_workers: int = 0):
        self.model, self.sampling, self.ps, self.cache = model, sampling, ps, cache
        # With the cache, stage 1 encodes: each SP rank decodes only the frames it encodes.
        share = (lambda num_frames: mrsp.stage1_share(model, num_frames, ps.sp_group)) if cache is not None else None
        self.reader = video.FramePrefetcher(model.config.image_size, decode_workers, share)
        self.uncached_runs = 0
        self.unreadable: dict[tuple, str] = {}
        self.skipped = 0  # records replaced so far
        self._srt_text: dict[tuple, str | None] = {}
        self._times: dict[tuple, np.ndarray] = {}

    def media_embeds(self, record: data.Record) -> torch.Tensor | None:
        """The embeddings of the record's video, or of its image as one frame; None for a text record."""
        if record.data_type == "text":
            return None
        if record.video:
            setting = self.sampling

            def read_fn():  # this rank's frames (with the cache; else all) and the video's frame count
                frames, timestamps = self._read_agreed(lambda: self.reader.load_frames(record.video, self.sampling))
                self._times[(record.video, self.sampling.key())] = timestamps  # read on every rank: kept by all
                return frames, len(timestamps)
        else:
            setting = self.model.family.image_setting(self.model)
            # the one frame, whole on every rank
            read_fn = lambda: (self._read_agreed(lambda: self.model.image_frames(record.image)), None)
        if self.cache is not None:
            encode_fn = lambda got: mrsp.stage1_encode(self.model, got[0], self.ps.sp_group, num_frames=got[1])
            return self.cache.get(record.media, setting, read_fn, encode_fn)
        # No cache: decode and encode again, with grad if the vision tower trains.
        embeds = self.model.encode_video(read_fn()[0])
        self.uncached_runs += 1
        return embeds

    def prefetch(self, *batches: tuple[list[data.Record], video.FrameSampling]) -> None:
        """Start reading the videos of these (records, sampling) batches in the background, the current
        batch first, then the next: those whose embeddings the cache holds are not read at all."""
        self.reader.prefetch([(r.video, sampling) for recs, sampling in batches for r in recs
                              if r.video and (r.video, r.subtitles) not in self.unreadable
                              and not (self.cache is not None and self.cache.holds(r.video, sampling))])

    def subtitles(self, record: data.Record) -> str | None:
        """The subtitle text of the prompt. An .srt file shows the cues within the sampled frames' span, as
        eval.py does; the frame times come from the container (a cached video is not decoded again), and
        the text is kept, since every pass of a step builds the prompt again."""
        path = data.subtitle_file(record)
        if path is None:
            return data.subtitle_text(record)
        key = (record.video, path, self.sampling.key())
        if key not in self._srt_text:
            times = self.frame_times(record)
            self._srt_text[key] = self._read_agreed(lambda: data.subtitle_text(record, times))
        return self._srt_text[key]

    def _read_agreed(self, read):
        """read() on every rank of the SP group; if it raises VideoError on any of them, it raises on all,
        so that no rank goes on to a collective (the encoding's all-gather) that the others skip."""
        try:
            value, error = read(), None
        except video.VideoError as e:
            value, error = None, e
        if not mrsp.all_ranks_true(error is None, self.ps.sp_group, self.ps.device):
            raise error or video.VideoError("another rank of the sequence-parallel group could not read this record's files")
        return value

    def frame_times(self, record: data.Record) -> np.ndarray:
        """The sampled frames' times (seconds) of the record's video, kept: from the read that decoded its
        frames, or else from the container's index alone (a cached video is not decoded again)."""
        key = (record.video, self.sampling.key())
        if key not in self._times:
            self._times[key] = self._read_agreed(lambda: video.frame_timestamps(record.video, self.sampling))
        return self._times[key]

    def timestamps(self, record: data.Record) -> np.ndarray | None:
        """The frame times where the family's positions use them (Qwen2.5-VL's M-RoPE time axis), else None."""
        return self.frame_times(record) if self.model.family.needs_timestamps and record.video else None

    def __call__(self, record: data.Record) -> M.Prompt:
        before, after = self.model.user_turn(record, self.subtitles(record))
        return self.model.prompt(before, self.media_embeds(record), after, self.timestamps(record),
                                 media=record.data_type)

    def for_batch(self, recs: list[data.Record], records: list[data.Record]):
        """(records, their Prompts) for one step's batch.

        A record whose video, image or subtitle file cannot be read is reported once and replaced by the
        next readable record of `records` (counted in `self.skipped`); its files are remembered in
        `self.unreadable` ((video or image, subtitles) -> reason) and not tried again. The batch keeps its size on
        every rank, so the collectives stay in step, and a long run is not lost to one corrupt file. For a
        file that always fails, a resumed run makes the same replacement.
        """
        used, prompts = [], []
        for record in recs:
            for candidate in _this_then_next(record, records):
                files = (candidate.media, candidate.subtitles)
                if files in self.unreadable:
                    continue
                try:
                    prompt = self(candidate)
                except video.VideoError as e:
                    self.unreadable[files] = str(e)
                    if self.ps.sp_rank == 0:
                        logger.warning("skipping record %s: %s", candidate.problem_id, e)
                    continue
                used.append(candidate)
                prompts.append(prompt)
                self.skipped += candidate is not record
                break
            else:
                raise video.VideoError(f"none of the {len(records)} records has a readable video")
        return used, prompts


def _this_then_next(record: data.Record, records: list[data.Record]):
    """`record`, then the records after it in `records`, wrapping around (the search runs only on a failure)."""
    yield record
    i = records.index(record)
    for k in range(1, len(records)):
        yield records[(i + k) % len(records)]


def count_vision_runs(cache, *builders: VideoPrompts) -> int:
    """Vision-tower runs so far: the shared cache's misses plus every builder's uncached encodes."""
    return (cache.vision_runs if cache is not None else 0) + sum(b.uncached_runs for b in builders)


def add_cache_args(ap, default: bool | None):
    """The flags of the video-embedding cache (MR-SP stage 1), the same in both stages. The cache needs
    a frozen vision tower; `default` None: on exactly when the stage freezes it (sft.py --freeze-vision)."""
    ap.add_argument("--embed-cache", action=argparse.BooleanOptionalAction, default=default,
                    help="MR-SP stage 1: encode each video once and reuse its embeddings (needs a frozen vision "
                         "tower); --no-embed-cache re-encodes the video for every sequence in every pass (the "
                         "baseline the paper compares against)" + ("" if default is not None else
                                                                    " (default: on with --freeze-vision)"))
    ap.add_argument("--embed-cache-dir", default=None,
                    help="also keep the video embeddings on disk here (one safetensors file per video and sampling)")
    ap.add_argument("--embed-cache-gb", type=float, default=8.0,
                    help="GiB of video embeddings the cache keeps in memory per rank, least recently used "
                         "dropped first (a 7B video of 256 frames is 0.44 GiB in bf16)")
    ap.add_argument("--embed-cache-offload", action=argparse.BooleanOptionalAction, default=True,
                    help="keep cached video embeddings in host memory; each is copied to the GPU when a "
                         "prompt uses it (no effect on a CPU)")


def embedding_cache(model: M.VideoLM, args, ps: mrsp.ParallelState) -> "mrsp.VideoEmbeddingCache":
    """The run's video-embedding cache, as the flags of `add_cache_args` and --bf16 ask: entries in the
    compute dtype, in host memory when offloaded, within --embed-cache-gb, on disk in --embed-cache-dir."""
    return mrsp.VideoEmbeddingCache(model, cache_dir=args.embed_cache_dir, sp_group=ps.sp_group,
                                    max_bytes=int(args.embed_cache_gb * 2**30),
                                    dtype=torch.bfloat16 if args.bf16 else None,
                                    storage="cpu" if args.embed_cache_offload else None)


def cache_metrics(cache: "mrsp.VideoEmbeddingCache | None") -> dict:
    """The cache's footprint for a metrics row (nothing without a cache); see VideoEmbeddingCache.metrics."""
    return cache.metrics() if cache is not None else {}


CACHE_SUM_KEYS = ("embed_cache_hits", "embed_cache_misses")  # reduce_metrics: totals over data-parallel ranks
CACHE_MAX_KEYS = ("embed_cache_bytes", "embed_cache_entries")  # and the fullest rank's footprint


def sequence_logprobs(model, batch: "M.SequenceBatch | M.PackedBatch", ps: mrsp.ParallelState,
                      temperature: float = 1.0, block_rows: int = 4096):
    """Per-token log-probs, the sequence sharded over the SP group when there is one: [B, S] for a
    SequenceBatch, [E, R_max] for a PackedBatch. Under SP the batch is the whole one, or (rl.py) built
    as this rank's slice: `build_sequence_batch` / `build_packed_batch(..., sp_rank, sp_size)`.

    With FSDP every rank must run the (sharded) LM head the same number of times, so the ranks agree on
    a row-block count that covers the largest number of scored positions anywhere.
    """
    num_blocks = None
    if ps.world_size > 1:
        count = torch.tensor([math.ceil(batch.num_scored / block_rows)], device=ps.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        num_blocks = max(1, int(count))
    if ps.sp_size > 1:
        return mrsp.sp_token_logprobs(model, batch, ps.sp_group, temperature=temperature, num_blocks=num_blocks)
    return model.token_logprobs(batch, temperature=temperature, block_rows=block_rows, num_blocks=num_blocks)


def reader_counts() -> dict:
    """Distinct videos this process has read so far, by reader (decord first, PyAV where decord cannot):
    {"videos_decord": n, "videos_pyav": m}, both keys always, so every rank's metrics row has the same keys.
    Sum them over data-parallel ranks (`READER_SUM_KEYS`): an SP group's ranks read the same files."""
    counts = video.decoder_counts()
    return {f"videos_{reader.name}": counts.get(reader.name, 0) for reader in video.VIDEO_READERS}


READER_SUM_KEYS = tuple(f"videos_{reader.name}" for reader in video.VIDEO_READERS)


def records_for_step(records, step: int, per_rank: int, ps: mrsp.ParallelState, seed: int):
    """This rank's records for `step`: a seeded shuffle per epoch, split by data-parallel rank.
    A pure function of the step, so a resumed run sees exactly the records the original would have."""
    per_step = per_rank * ps.dp_size
    start = step * per_step
    out = []
    for i in range(start + ps.dp_rank * per_rank, start + (ps.dp_rank + 1) * per_rank):
        epoch, pos = divmod(i, len(records))
        order = np.random.default_rng(seed + epoch).permutation(len(records))
        out.append(records[order[pos]])
    return out


def load_training_records(args, ps: mrsp.ParallelState) -> list[data.Record]:
    """The records of --data that a run can train on. Bad rows are reported and skipped (with --strict the
    first one stops the run). Then every video and image is opened once, each rank checking its share, and
    records whose file is missing or unreadable (an image in a mode we do not read too) are skipped; the
    videos' result is kept beside the data (`video.video_check_file`), so a restarted run does not open
    every video again. Fewer usable records than one batch (--batch-size on each data-parallel rank) stop
    the run, saying what was lost."""
    records, errors = data.load_records_report(args.data, **data.folder_args(args))
    if errors and args.strict:
        raise errors[0]
    if ps.rank == 0:
        print(data.summary(args.data, records, errors), file=sys.stderr, flush=True)
    cache_file = video.video_check_file(args.data)
    videos = list(dict.fromkeys(r.video for r in records if r.video))
    images = list(dict.fromkeys(r.image for r in records if r.image))
    opened = video.check_videos_open(videos[ps.rank::ps.world_size], cache_file)
    opened.update({path: video.image_problem(path) for path in images[ps.rank::ps.world_size]})
    if ps.world_size > 1:
        shares = [None] * ps.world_size
        dist.all_gather_object(shares, opened)
        opened = {path: problem for share in shares for path, problem in share.items()}
    if ps.rank == 0:
        video.save_video_check(cache_file, {path: opened[path] for path in videos})
    problems = [problem for problem in opened.values() if problem]
    if problems and args.strict:
        raise video.VideoError(problems[0])
    usable = [r for r in records if r.media is None or not opened[r.media]]
    missing = sum(not os.path.isfile(r.media) for r in records if r.media and opened[r.media])
    unreadable = len(records) - len(usable) - missing
    if ps.rank == 0 and problems:
        for problem in problems[:10]:
            logger.warning("skipped: %s", problem)
        print(f"{args.data}: {len(usable):,} records with a readable video or image (or none); skipped "
              f"{missing:,} whose file is missing, {unreadable:,} whose file cannot be read", file=sys.stderr,
              flush=True)
    if len(usable) < args.batch_size * ps.dp_size:
        raise data.RecordError(
            args.data, None, None,
            f"{len(usable)} usable records, fewer than one batch ({args.batch_size} on each of {ps.dp_size} "
            f"data-parallel ranks): {len(errors)} bad rows, {missing} records whose video or image is missing, "
            f"{unreadable} whose video or image cannot be read")
    return usable
