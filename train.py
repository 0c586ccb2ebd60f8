"""The training plumbing that both stages share: sft.py (CoT-SFT) and rl.py (GRPO) import it.

What is here, in the order a training script uses it:
  - run set-up: process groups and the (dp x sp) layout (`start_run`), a seed per rank, the output folder
  - FSDP2: sharding the model over every rank (`shard_model`), gathering full weights for a checkpoint
    or for the rollout engine (`full_state_dict`, `llm_weights`)
  - the prompts of a batch: frames decoded, the video encoded once through the MR-SP embedding cache,
    text spliced around it (`VideoPrompts`), and sequence-parallel log-probs (`sequence_logprobs`)
  - checkpoints and resume (`save_checkpoint`, `latest_checkpoint`, `load_trainer_state`)
  - metrics (`MetricsLog`, `reduce_metrics`), the learning-rate schedule (`lr_at`), curve plots
  - the command-line flags every training script shares (`add_run_args`)

Data flows one way: data.py, model.py and mrsp.py below; sft.py and rl.py above. Nothing here is
specific to one stage: the SFT loss lives in sft.py, the GRPO loss in rl.py.
"""
import argparse
import json
import logging
import math
import random
import re
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import data
import model as M
import mrsp

logger = logging.getLogger("train")

# ---- distributed model: FSDP2 ----


def shard_model(model: M.VideoLM, ps: mrsp.ParallelState):
    """Shard parameters, gradients and optimizer state over all ranks with FSDP2 (no-op on one process).

    FSDP2 gathers a module's weights in the hooks of its `forward`. VideoLM calls its parts directly
    (the vision tower, the token embedding, each decoder layer, the final norm, the LM head), so each of
    those is its own FSDP unit; nothing wraps them all. When a unit frees its gathered weights again:
      - a decoder layer: right after its forward (backward gathers it again), so a pass holds one
        layer's full weights at a time, not the whole LLM;
      - the token embedding, the final norm, the LM head (and a trainable vision tower and projector):
        they run many times in a pass (every piece of every prompt, every chunk of scored positions), so
        they stay gathered until backward frees them; after a pass without backward, `reshard(model)`.
    The LLM is always sharded, trainable or not (the frozen reference model too). A frozen vision
    tower and projector stay replicated: every rank encodes its own share of the frames with them.
    """
    if ps.world_size == 1:
        return model
    if model.llm.get_output_embeddings().weight is model.llm.get_input_embeddings().weight:
        # Sharded as two units, the one tied weight would become two parameters and silently untie.
        raise ValueError("this LLM ties its input and output embeddings (tie_word_embeddings=True, e.g. "
                         "Qwen2-0.5B/1.5B), which FSDP2 cannot shard here; train it in one process, or make a "
                         "checkpoint with its own LM head: python model.py init --untie-embeddings ...")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(ps.device.type, (ps.world_size,))  # shard over every rank, dp and sp alike
    decoder = model.llm.get_decoder()
    # Each unit is an FSDP root of its own, and a root keeps its weights gathered after forward unless
    # told otherwise: reshard_after_forward=True must be explicit (honoured for roots since torch 2.8).
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    for unit in (decoder.embed_tokens, decoder.norm, model.llm.get_output_embeddings()):
        fully_shard(unit, mesh=mesh, reshard_after_forward=False)
    for unit in (model.vision_tower, model.mm_projector):
        if any(p.requires_grad for p in unit.parameters()):
            fully_shard(unit, mesh=mesh, reshard_after_forward=False)
    return model


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


def shutdown(ps: mrsp.ParallelState):
    """Leave the torchrun job. A single process never made a group (an in-process vLLM engine may have
    made one of its own, and tears it down itself)."""
    if ps.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


# ---- checkpoint and resume ----

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)$")


def latest_checkpoint(out_dir) -> Path | None:
    """The newest complete OUT/checkpoint-STEP (half-written ones are temp folders and never match)."""
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob("checkpoint-*")
             if (m := CHECKPOINT_RE.search(p.name)) and M.is_complete_checkpoint(p)
             and (p / "trainer_state.pt").exists()]
    return max(found)[1] if found else None


def start_run(args) -> tuple[mrsp.ParallelState, Path, Path | None]:
    """What sft.py and rl.py do first: the process groups, a seed per rank, the output folder, and the
    checkpoint to resume from (None: start from --init)."""
    ps = mrsp.init_distributed(args.sp_size)
    torch.manual_seed(args.seed + ps.rank)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return ps, out, latest_checkpoint(out) if args.resume else None


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(out_dir, step: int, model, optimizer, ps: mrsp.ParallelState, extra: dict | None = None):
    """OUT/checkpoint-STEP (collective: all ranks call):

        config.json, llm/, vision_tower/, mm_projector/   the model in the release layout (full weights, rank 0)
        optimizer/            the optimizer state in shards: each rank writes the part it holds
                              (torch.distributed.checkpoint: __RANK_0.distcp files and a .metadata index)
        trainer_state.pt      step, the RNG state of every rank, `extra`

    Under FSDP no rank ever holds the whole optimizer state (AdamW's is twice the fp32 model: ~56 GB at
    7B). Everything is written into a temporary folder, renamed once every rank has finished: a killed
    run leaves no half checkpoint behind.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    weights = full_state_dict(model, ps)
    rngs = [rng_state()]
    if ps.world_size > 1:
        rngs = [None] * ps.world_size
        dist.all_gather_object(rngs, rng_state())
    with M.atomic_directory(Path(out_dir) / f"checkpoint-{step}") if ps.rank == 0 else nullcontext() as tmp:
        tmp = Path(broadcast_from_rank0(str(tmp) if ps.rank == 0 else None, ps))
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=tmp / "optimizer")
        if ps.rank == 0:
            model.write(tmp, weights)
            torch.save({"step": step, "rng": rngs, "extra": extra or {}}, tmp / "trainer_state.pt")
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


def load_trainer_state(path, model, optimizer, ps) -> dict:
    """Restore the optimizer (each rank reads back the shards it holds) and this rank's RNG from
    checkpoint `path`; returns trainer_state.pt (step, rng, extra). Collective under FSDP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    state = torch.load(Path(path) / "trainer_state.pt", weights_only=False)
    optim = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the layout to read into
    dcp.load(optim, checkpoint_id=Path(path) / "optimizer")
    set_optimizer_state_dict(model, optimizer, optim["optimizer"])
    set_rng_state(state["rng"][ps.rank])
    return state


# ---- metrics, schedule, plot ----

class MetricsLog:
    """OUT/metrics.jsonl, one JSON object per optimizer step. On resume, rows past the resumed step
    (written after the last checkpoint by the run that died) are dropped so the file reads as one run."""

    def __init__(self, out_dir, enabled: bool, resume_step: int = 0):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            rows = self.read(self.path) if resume_step else []
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= resume_step))

    @staticmethod
    def read(path) -> list[dict]:
        rows = []
        for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut short by a kill
        return rows

    def log(self, row: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to base_lr over warmup_steps, then cosine decay to min_ratio * base_lr.

    Example: lr_at(0, 100, 1e-3, 10) == 1e-4; lr_at(10, 100, 1e-3, 10) == 1e-3; lr_at(100, 100, 1e-3, 10) == 1e-4.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def plot_metrics(metrics_path, keys: list[str], png_path, title: str):
    """A PNG with one panel per metric against the step, four panels a row. A key ending in "*" (e.g.
    "accuracy_*") draws every metric that starts with it in one panel, each as its rolling mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = MetricsLog.read(metrics_path)
    present = sorted({k for r in rows for k in r})
    panels = []  # (title, keys drawn in it)
    for key in keys:
        if key.endswith("*"):  # "accuracy_*": one panel, a smoothed line per matching key
            matching = [k for k in present if k.startswith(key[:-1])]
            if matching:
                panels.append((key[:-1].rstrip("_") + " by " + "/".join(k[len(key) - 1:] for k in matching)
                               if len(matching) <= 4 else key, matching))
        elif key in present:
            panels.append((key, [key]))
    if not panels:
        return
    n_cols = min(4, len(panels))
    n_rows = -(-len(panels) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4 * n_cols, 3 * n_rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (panel_title, panel_keys) in zip(axes.flat, panels):
        for key in panel_keys:
            steps, values = zip(*[(r["step"], r[key]) for r in rows if key in r])
            window = max(1, len(values) // 8)  # a rolling mean: one RL step's batch is a noisy sample
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            if len(panel_keys) == 1:
                ax.plot(steps, values, marker=".", alpha=0.35, label="per step")
                ax.plot(steps[window - 1:], smooth, label=f"mean of {window}")
            else:
                ax.plot(steps[window - 1:], smooth, label=f"{key} (mean of {window})")
        ax.set_xlabel("step")
        ax.set_title(panel_title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# ---- command-line flags both stages share ----

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the module docstring's layout and shows every flag's default."""


def add_run_args(ap, save_every: int):
    """The flags every training script shares: parallelism, precision, checkpoints, seed."""
    ap.add_argument("--sp-size", type=int, default=1, help="sequence-parallel group size (MR-SP)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="recompute LLM activations in backward")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                    help="bf16 autocast (default on a GPU)")
    ap.add_argument("--save-every", type=int, default=save_every, help="checkpoint every N steps (0: only final)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    ap.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and initial RNG")


# ---- the prompts and log-probs of a batch ----

class VideoPrompts:
    """Prompt embeddings for records: frames decoded, video encoded (through the MR-SP embedding cache
    when the vision tower is frozen), text spliced around the video."""

    def __init__(self, model: M.VideoLM, sampling: data.FrameSampling, ps: mrsp.ParallelState,
                 cache: "mrsp.VideoEmbeddingCache | None"):
        self.model, self.sampling, self.ps, self.cache = model, sampling, ps, cache
        self.uncached_runs = 0
        self.unreadable: dict[tuple, str] = {}
        self.skipped = 0  # records replaced so far
        self._srt_text: dict[tuple, str | None] = {}

    def video_embeds(self, record: data.Record) -> torch.Tensor:
        frames_fn = lambda: self._read_agreed(
            lambda: data.load_frames(record.video, self.model.config.image_size, self.sampling)[0])
        encode_fn = lambda frames: mrsp.stage1_encode(self.model, frames, self.ps.sp_group)
        if self.cache is not None:
            return self.cache.get(record.video, self.sampling, frames_fn, encode_fn)
        # No cache: decode and encode again, with grad if the vision tower trains.
        video_embeds = self.model.encode_video(frames_fn())
        self.uncached_runs += 1
        return video_embeds

    def subtitles(self, record: data.Record) -> str | None:
        """The subtitle text of the prompt. An .srt file shows the cues within the sampled frames' span, as
        eval.py does; the frame times come from the container (a cached video is not decoded again), and
        the text is kept, since every pass of a step builds the prompt again."""
        path = data.subtitle_file(record)
        if path is None:
            return data.subtitle_text(record)
        key = (record.video, path, self.sampling.key())
        if key not in self._srt_text:
            self._srt_text[key] = self._read_agreed(
                lambda: data.subtitle_text(record, data.frame_timestamps(record.video, self.sampling)))
        return self._srt_text[key]

    def _read_agreed(self, read):
        """read() on every rank of the SP group; if it raises VideoError on any of them, it raises on all,
        so that no rank goes on to a collective (the encoding's all-gather) that the others skip."""
        try:
            value, error = read(), None
        except data.VideoError as e:
            value, error = None, e
        if not mrsp.all_ranks_true(error is None, self.ps.sp_group, self.ps.device):
            raise error or data.VideoError("another rank of the sequence-parallel group could not read this record's files")
        return value

    def __call__(self, record: data.Record) -> torch.Tensor:
        before, after = self.model.user_turn(record, self.subtitles(record))
        return self.model.prompt_embeds(before, self.video_embeds(record), after)   # [L, D]

    def for_batch(self, recs: list[data.Record], records: list[data.Record]):
        """(records, prompt embeddings [L_i, D] each) for one step's batch.

        A record whose video or subtitle file cannot be read is reported once and replaced by the next
        readable record of `records` (counted in `self.skipped`); its files are remembered in
        `self.unreadable` ((video, subtitles) -> reason) and not tried again. The batch keeps its size on
        every rank, so the collectives stay in step, and a long run is not lost to one corrupt file. For a
        file that always fails, a resumed run makes the same replacement.
        """
        used, prompts = [], []
        for record in recs:
            for candidate in _this_then_next(record, records):
                files = (candidate.video, candidate.subtitles)
                if files in self.unreadable:
                    continue
                try:
                    prompt = self(candidate)
                except data.VideoError as e:
                    self.unreadable[files] = str(e)
                    if self.ps.sp_rank == 0:
                        logger.warning("skipping record %s: %s", candidate.problem_id, e)
                    continue
                used.append(candidate)
                prompts.append(prompt)
                self.skipped += candidate is not record
                break
            else:
                raise data.VideoError(f"none of the {len(records)} records has a readable video")
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
    counts = data.decoder_counts()
    return {f"videos_{reader.name}": counts.get(reader.name, 0) for reader in data.VIDEO_READERS}


READER_SUM_KEYS = tuple(f"videos_{reader.name}" for reader in data.VIDEO_READERS)


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


