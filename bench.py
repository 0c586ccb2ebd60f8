"""Performance measurements behind the README's tables.

    python bench.py memory                                   # MR-SP stage 2: memory per rank, sp=1 vs sp=2
    python bench.py memory --seq-lens 16384 65536 --sp-sizes 1 2 4 --preset small
    python bench.py memory --grpo-step                       # one GRPO step per rank, LLM of the 7B's width
    python bench.py engines                                  # rollout throughput: torch vs vLLM engine
    python bench.py step                                     # s per GRPO step: no cache / stage 1 / stages 1+2 / shared prefix
    python bench.py step --frames 64 256 --preset small
    python bench.py prefill                                  # prefill tokens/s and MFU (Qwen2-1.5B shape on a GPU)
    python bench.py capacity                                 # most frames that fit: prefill and training step
    python bench.py decode                                   # sampled frames from an hour-long video: decord vs PyAV
    python bench.py decode --sizes 640x360 1280x720 1920x1080 --codecs h264 vp9 av1 --frames 16 256 1024
"""
import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

import errors
import model as M
import mrsp
import vila


# ---- memory: per-rank peak of one sequence-parallel forward + backward ----

def _spawn_ranks(target, nprocs: int, *args) -> list:
    """Run target(rank, *args, port, results) in `nprocs` spawned processes that rendezvous on a free local
    port; each puts one result on `results`. Returns them in the order they arrived."""
    results = mp.get_context("spawn").SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(target, nprocs=nprocs, start_method="spawn", args=(*args, port, results))
    return [results.get() for _ in range(nprocs)]


def _memory_rank(rank: int, sp_size: int, seq_len: int, response_len: int, preset: str, port: int, results):
    """One SP rank: forward + backward of the per-token log-probs of one long sequence, on the CPU.

    Two measures. Saved for backward: the bytes of the distinct tensors autograd keeps from the forward
    (a saved-tensors hook), the activation memory that sequence parallelism divides. Peak RSS growth:
    this process's resident-set high-water mark (VmHWM, reset by writing 5 to /proc/self/clear_refs just
    before the step) minus VmRSS before; it adds transient buffers, gradients and allocator slack. The
    model and the full input batch (which every SP rank holds) are in the baseline. One thread per rank.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(sp_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ps = mrsp.init_distributed(sp_size=sp_size)
    tokenizer = M.train_tokenizer(["a long video and a short answer"], vocab_size=300)
    model = M.build_from_preset(preset, tokenizer, seed=0)
    model.freeze_vision()
    mrsp.enable_ulysses(model, ps.sp_group)
    torch.manual_seed(0)
    embeds = torch.randn(1, seq_len, model.config.llm_hidden)                         # [1, S, D]
    targets = torch.full((1, seq_len), M.IGNORE)                                      # [1, S]
    targets[0, -response_len:] = torch.randint(0, len(tokenizer), (response_len,))    # the response is scored
    batch = M.SequenceBatch(embeds, targets, torch.arange(seq_len)[None])

    def status_kib(field: str) -> int:
        line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
        return int(line.split()[1])

    saved = {}  # storage address -> bytes

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.distributed.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    before = status_kib("VmRSS")
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        logprobs = mrsp.sp_token_logprobs(model, batch, ps.sp_group)                  # [1, S]
    (-logprobs.sum()).backward()
    seconds = time.perf_counter() - start
    results.put((rank, sum(saved.values()) / 2**20, (status_kib("VmHWM") - before) / 1024, seconds))
    torch.distributed.destroy_process_group()


def cmd_memory(args):
    """Print a markdown table: memory per rank (max over the SP group) for each length and sp size.
    With --grpo-step: the per-rank footprint of one whole GRPO step instead (`cmd_grpo_memory`)."""
    if args.grpo_step:
        return cmd_grpo_memory(args)
    too_short = [n for n in args.seq_lens if n <= args.response_len]
    if too_short:
        raise errors.UsageError(f"bench.py memory: --seq-lens {too_short} must be longer than --response-len "
                         f"{args.response_len} (the scored tokens are part of the sequence); lower --response-len")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU measurement: the spawned ranks must not see a GPU
    rows = []
    for seq_len in args.seq_lens:
        for sp_size in args.sp_sizes:
            ranks = _spawn_ranks(_memory_rank, sp_size, sp_size, seq_len, args.response_len, args.preset)
            row = (seq_len, sp_size, *(max(r[i] for r in ranks) for i in (1, 2, 3)))
            rows.append(row)
            print(f"# {seq_len} tokens, sp={sp_size}: saved {row[2]:.0f} MiB, peak {row[3]:.0f} MiB per rank, "
                  f"{row[4]:.1f} s", flush=True)
    base = {seq_len: (saved, peak) for seq_len, sp_size, saved, peak, _ in rows if sp_size == 1}
    llm = vila.PRESETS[args.preset]["llm"]
    print(f"\nPer rank (max over the SP group), forward + backward of log-probs; preset {args.preset} "
          f"({llm['num_hidden_layers']} layers, hidden {llm['hidden_size']}, {llm['num_attention_heads']} heads), "
          f"{args.response_len} scored tokens, fp32, CPU, 1 thread per rank\n")
    print("| tokens | sp | saved for backward (MiB) | peak RSS growth (MiB) | vs sp=1 (saved / peak) "
          "| step time (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for seq_len, sp_size, saved, peak, seconds in rows:
        ratio = (f"{saved / base[seq_len][0]:.2f}x / {peak / base[seq_len][1]:.2f}x" if seq_len in base else "-")
        print(f"| {seq_len:,} | {sp_size} | {saved:,.0f} | {peak:,.0f} | {ratio} | {seconds:.1f} |")


# ---- memory: per-rank footprint of one GRPO step at the 7B's width ----

# LLM widths: the 7B's, and a narrow one that shows the same sharding in seconds (the tests use it)
WIDTHS = {"7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4),
          "narrow": dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=2)}


def _wide_videolm(layers: int, vocab_size: int, seed: int, width: str = "7b", dtype=torch.bfloat16) -> M.VideoLM:
    """A VideoLM whose LLM has the width WIDTHS[width] (7b: hidden 3584, 28 query / 4 KV heads, MLP 18944;
    untied head) and `layers` decoder layers, its LLM in `dtype`, its vision parts in bf16; a small SigLIP
    at 448 px with patch 14 gives the 7B's 256 tokens per frame. Random weights: memory does not depend on
    their values."""
    from transformers import AutoModelForCausalLM, Qwen2Config, SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(seed)
    tokenizer = M.train_tokenizer([CAPACITY_TEXT_BEFORE, CAPACITY_TEXT_AFTER, "\n"] * 4, vocab_size=300)
    vision = SiglipVisionModel(SiglipVisionConfig(image_size=448, patch_size=14, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=1, num_attention_heads=2, vision_use_head=False))
    llm_config = Qwen2Config(vocab_size=vocab_size, num_hidden_layers=layers, tie_word_embeddings=False,
                             max_position_embeddings=32768, **WIDTHS[width])
    llm = AutoModelForCausalLM.from_config(llm_config, attn_implementation="sdpa", dtype=dtype)
    config = vila.VilaConfig(448, 14, 64, WIDTHS[width]["hidden_size"])
    projector = vila.MultimodalProjector(config.projector, config.vision_hidden, config.llm_hidden)
    return M.VideoLM(config, vision.to(torch.bfloat16), projector.to(torch.bfloat16), llm, tokenizer)


def _local_bytes(tensors) -> int:
    """Bytes this rank holds of `tensors` (a DTensor counts its local shard only)."""
    from torch.distributed.tensor import DTensor
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors if torch.is_tensor(t))


def _grpo_memory_rank(rank: int, world_size: int, settings: dict, checkpoint: str, video_path: str, port: int, results):
    """One rank of one GRPO update of rl.py, run by rl.py's own functions with its defaults: the
    models loaded by `rl.load_models` (the policy's fp32 weights, the reference computing as the policy, AdamW, the
    embedding cache), the video encoded through the cache, then `rl.update_policy` on one group of random
    responses (packed with its prompt once, on-policy, reference log-probs, clipped loss + k3 KL, backward,
    clip, AdamW). Both models FSDP2-sharded over all ranks, one SP group of all ranks (Ulysses). Reports
    bytes held per rank (gradients just before the optimizer step) and the process's peak RSS (VmHWM)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import dataclasses

    import data
    import rl
    import rollout
    import train
    import video
    ps = mrsp.init_distributed(sp_size=world_size)
    start = time.perf_counter()
    G = settings["group_size"]
    args = rl.parse_args(["--init", checkpoint, "--data", video_path, "--out", video_path,
                          "--bf16" if settings["bf16"] else "--no-bf16", "--group-size", str(G),
                          "--sp-size", str(world_size), "--num-frames", str(settings["frames"])])
    models = rl.load_models(args, Path(checkpoint), video.FrameSampling.from_args(args), ps)
    grad_bytes = []
    models.optimizer.register_step_pre_hook(
        lambda *_: grad_bytes.append(_local_bytes([p.grad for p in models.params if p.grad is not None])))
    if ps.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ps.device)

    # ---- 2. encode (through the cache), the group's episodes ----
    frames = np.random.default_rng(0).integers(0, 256, (settings["frames"], 448, 448, 3), dtype=np.uint8)
    record = data.Record("bench", video_path, "What happens?", [], "free_form", "", "x")
    with torch.no_grad():
        video_embeds = models.cache.get(video_path, f"n{settings['frames']}", frames_fn=lambda: frames,
                                        encode_fn=lambda f: mrsp.stage1_encode(models.policy, f, ps.sp_group))
        prompt = models.policy.prompt(CAPACITY_TEXT_BEFORE, video_embeds, CAPACITY_TEXT_AFTER,
                                      nominal_timestamps(settings["frames"]))
    train.reshard(models.policy)
    generator = torch.Generator().manual_seed(0)
    episodes = [rl.Episode(record, rollout.Sample(torch.randint(3, 300, (settings["response_len"],), generator=generator
                                                                ).tolist(), [0.0] * settings["response_len"], "length", ""),
                           reward=float(i % 2), accuracy=0.0, format=0.0, advantage=1.0 if i % 2 else -1.0)
                for i in range(G)]

    # ---- 6. the update, as rl.py runs it ----
    models = dataclasses.replace(models, policy_prompt=lambda r: prompt, reference_prompt=lambda r: prompt)
    rl.update_policy(models, [episodes], [len(prompt)], args, ps, rl.PhaseTimer(ps.device))
    optim_bytes = _local_bytes([v for state in models.optimizer.state.values() for v in state.values()])
    seconds = time.perf_counter() - start
    peak_rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
    cuda_peak = torch.cuda.max_memory_allocated(ps.device) if ps.device.type == "cuda" else None
    results.put(dict(rank=rank, positions=len(prompt) + G * settings["response_len"],
                     params=_local_bytes(models.policy.parameters()), grads=grad_bytes[0], optimizer=optim_bytes,
                     reference=_local_bytes([*models.reference.llm.parameters(), *models.reference.llm.buffers()]),
                     cache=models.cache.bytes, peak_rss=peak_rss, cuda_peak=cuda_peak, seconds=seconds,
                     structure=train.fsdp_structure(models.policy)))
    train.shutdown(ps)


def cmd_grpo_memory(args):
    """Print a markdown table: per rank, the bytes of one GRPO step's state and its peak memory, for
    each process count (all ranks one SP group, the policy FSDP2-sharded over them)."""
    settings = dict(layers=args.layers, vocab_size=args.vocab_size, frames=args.frames,
                    group_size=args.group_size, response_len=args.response_len, bf16=args.bf16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "video.mp4"  # the cache keys on the file's path, size and mtime; nothing decodes it
        video.write_bytes(b"frames come from a random array")
        checkpoint = Path(tmp) / "policy"  # rl.py loads its policy and reference from a checkpoint
        _wide_videolm(args.layers, args.vocab_size, seed=0, width=args.width).save(checkpoint)
        for ranks in args.ranks:
            rows += sorted((dict(r, ranks=ranks) for r in _spawn_ranks(_grpo_memory_rank, ranks, ranks, settings,
                                                                        str(checkpoint), str(video))),
                           key=lambda r: r["rank"])
            print(f"# {ranks} rank(s) done", flush=True)
    mib = lambda b: "-" if b is None else f"{b / 2**20:,.0f}"
    precision = ("--bf16: fp32 master weights computing in bf16, FSDP2 mixed precision (autocast in one process), "
                 "fp32 LM head" if args.bf16 else "fp32")
    print(f"\ncommand: `{_command_line()}`\ndevice: {_device_name()}\n"
          f"One GRPO update (encode through the cache, old + reference log-probs, loss, backward, clip, AdamW) "
          f"of one group of {args.group_size} responses x {args.response_len} tokens on a {args.frames}-frame video "
          f"(packed with its prompt once: {rows[0]['positions']:,} positions); LLM of the {args.width} width "
          f"({WIDTHS[args.width]['hidden_size']}) with {args.layers} layer(s), "
          f"vocabulary {args.vocab_size:,}; rl.py's models ({precision}); all ranks one SP group, "
          f"both models FSDP2-sharded. MiB per rank:\n")
    for r in rows:
        if r["structure"] and r["rank"] == 0:
            print(f"FSDP units of the policy with {r['ranks']} ranks (train.fsdp_structure):\n")
            print("| unit | root | frees after forward | computes in | parameters |\n|---|---|---|---|---:|")
            for u in r["structure"]:
                print(f"| {u['unit']} | {'yes' if u['root'] else ''} | {'yes' if u['reshard_after_forward'] else ''} "
                      f"| {u['compute_dtype']} | {u['params']:,} |")
            print()
    print("| ranks | rank | params | grads | optimizer state | params + grads + optimizer | reference | cache "
          "| peak RSS | CUDA peak | seconds |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['ranks']} | {r['rank']} | {mib(r['params'])} | {mib(r['grads'])} | {mib(r['optimizer'])} | "
              f"{mib(r['params'] + r['grads'] + r['optimizer'])} | {mib(r['reference'])} | {mib(r['cache'])} | "
              f"{mib(r['peak_rss'])} | {mib(r['cuda_peak'])} | {r['seconds']:.0f} |")


# ---- engines: rollout throughput of the torch and vLLM engines ----

def bench_engines(args):
    """Print a markdown table: generated tokens per second of each rollout engine for prompts x group sizes.

    Prompts hold the video embeddings of random frames; sampling at temperature 1. A rate is all response
    tokens over the wall time of one generate call (prefill included), the fastest of `--repeats` runs.
    """
    import tempfile
    from pathlib import Path

    import numpy as np

    import rollout
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "tiny"
        if not args.checkpoint:  # a fresh tiny model; its tokenizer learns this repository's text
            corpus = [p.read_text() for p in Path(__file__).parent.glob("*.py")]
            M.build_from_preset("tiny", M.train_tokenizer(corpus, vila.PRESETS["tiny"]["vocab_size"])).save(checkpoint)
        model = M.VideoLM.load(checkpoint).eval()
        size = model.config.image_size
        rng = np.random.default_rng(args.seed)
        with torch.no_grad():
            prompts = [model.prompt("Watch the video.\n", model.encode_video(
                rng.integers(0, 256, (args.num_frames, size, size, 3), dtype=np.uint8)),
                "\nQuestion: What happens?\nResponse: ", nominal_timestamps(args.num_frames))
                for _ in range(max(args.prompts))]
        rates = {}
        for name in args.engines:
            engine = rollout.make_engine(name, model, model.family.llm_folder(checkpoint), max_model_len=args.max_model_len)
            engine.generate(prompts[:1], n=1, max_new_tokens=4)  # warm-up
            for num_prompts in args.prompts:
                for n in args.group_sizes:
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        groups = engine.generate(prompts[:num_prompts], n=n, max_new_tokens=args.max_new_tokens,
                                                 temperature=1.0, seed=args.seed)
                        tokens = sum(len(s.token_ids) for group in groups for s in group)
                        rate = tokens / (time.perf_counter() - start)
                        rates[name, num_prompts, n] = max(rate, rates.get((name, num_prompts, n), 0.0))
            engine.close()
    both = len(args.engines) == 2
    print(f"\nprompt: {len(prompts[0])} positions ({args.num_frames} frames); up to {args.max_new_tokens} new "
          f"tokens; temperature 1.0; best of {args.repeats} runs; {torch.get_num_threads()} torch threads\n")
    print("| prompts | n | " + " | ".join(f"{e} tok/s" for e in args.engines)
          + (" | vllm / torch |" if both else " |"))
    print("|---:|---:|" + "---:|" * (len(args.engines) + both))
    for num_prompts in args.prompts:
        for n in args.group_sizes:
            row = [f"{rates[e, num_prompts, n]:,.0f}" for e in args.engines]
            if both:
                row.append(f"{rates['vllm', num_prompts, n] / rates['torch', num_prompts, n]:.2f}x")
            print(f"| {num_prompts} | {n} | " + " | ".join(row) + " |")


# ---- step: seconds per GRPO step, no cache vs MR-SP stage 1 vs stages 1+2 vs shared prefix ----

STEP_CONFIGS = ("no cache", "stage 1", "stage 1+2", "shared prefix")
PHASES = ("time_encode", "time_rollout", "time_logprobs", "time_update", "time_sync")
ROOT = Path(__file__).resolve().parent


def _run(cmd: list, log: Path):
    """Run a command in the repository root; its output goes to `log`, and to the error if it fails."""
    with open(log, "w") as f:
        done = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n"
                           + "".join(log.read_text().splitlines(True)[-30:]))


def _median(values):
    return statistics.median(values) if values else float("nan")


def _step_rows(metrics: Path) -> list[dict]:
    """metrics.jsonl rows of steps 2..N (step 1 warms up: first calls, allocator, caches)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] > 1]


def _prompt_tokens(model: M.VideoLM, records_file: Path, num_frames: int) -> float:
    """Mean prompt length in tokens over the records (the family counts: text + frame steps x tokens per
    step). An .srt file counts with every cue (training shows only those within the frames' span): an
    upper bound."""
    import data  # here, not at the top: data.py needs decord and PyAV, which prefill/capacity must run without
    lengths = [model.family.prompt_length(model, *model.user_turn(r, data.subtitle_text(r)), num_frames)
               for r in data.load_records(records_file)]
    return sum(lengths) / len(lengths)


def default_step_sp_size(num_heads: int, devices: int) -> int:
    """The most processes, at most `devices`, that split the preset's query heads evenly (Ulysses gives
    each SP rank whole heads). Example: the tiny preset's 4 heads on an 8-GPU node -> 4; the small's 8 -> 8."""
    return max(sp for sp in range(1, max(devices, 1) + 1) if num_heads % sp == 0)


def cmd_step(args):
    """Print markdown tables: seconds per GRPO step of the real rl.py, per frame count and configuration.

    (a) no cache: `--no-embed-cache --no-shared-prefix`, the video re-encoded for every sequence in every pass;
    (b) stage 1: `--no-shared-prefix`, each video encoded once per step (cached);
    (c) stage 1+2: stage 1 plus the sequences sharded over `--sp-size` processes (torchrun);
    (d) shared prefix: rl.py's default, stage 1 (+ 2 where sp > 1) with each group's prompt run once in
        the log-prob and update passes, and the on-policy old log-probs taken from the update's forward.
    A step's time is the sum of rl.py's phase timers; the table shows the median over steps 2..N.
    """
    preset = M.family_of(args.family).presets[args.preset]
    heads = preset["llm"]["num_attention_heads"]
    sp_size = args.sp_size
    if sp_size is None:
        sp_size = default_step_sp_size(heads, torch.cuda.device_count() if torch.cuda.is_available() else 2)
    mrsp.kv_head_repeats(heads, preset["llm"]["num_key_value_heads"], sp_size)  # refuses now, not in rl.py
    configs = [c for c in STEP_CONFIGS if c != "stage 1+2" or sp_size > 1]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-step-"))
    work.mkdir(parents=True, exist_ok=True)
    # ---- a synthetic dataset with enough frames per video, and a fresh checkpoint ----
    scenes = 8
    num_records = max(16, args.batch_size * args.steps)  # a new video in every step: stage 1 encodes once per step
    _run([sys.executable, "synth.py", "--out", work / "data", "--answers", "open", "--n", num_records,
          "--min-scenes", scenes, "--max-scenes", scenes, "--frames-per-scene", math.ceil(max(args.frames) / scenes),
          "--size", preset.get("image_size") or preset["frame_size"], "--test-frac", 0, "--seed", args.seed],
         work / "synth.log")
    records_file, init = work / "data" / "train.jsonl", work / "init"
    with open(work / "init.log", "w") as log, contextlib.redirect_stdout(log):  # here: a process costs ~7 s of imports
        M.main(["init", "--family", args.family, "--preset", args.preset, "--data", str(records_file), "--out", str(init)])
    # ---- rl.py per frame count and configuration ----
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", sp_size, "rl.py"]
    sharded = (torchrun, ["--sp-size", sp_size]) if sp_size > 1 else ([sys.executable, "rl.py"], [])
    launch = {"no cache": ([sys.executable, "rl.py"], ["--no-embed-cache", "--no-shared-prefix"]),
              "stage 1": ([sys.executable, "rl.py"], ["--no-shared-prefix"]),
              "stage 1+2": (sharded[0], sharded[1] + ["--no-shared-prefix"]),
              "shared prefix": sharded}
    common = ["--init", init, "--data", records_file, "--engine", "torch", "--steps", args.steps, "--save-every", 0,
              "--batch-size", args.batch_size, "--group-size", args.group_size,
              "--max-new-tokens", args.max_new_tokens, "--seed", args.seed, "--micro-batch-size", 16]
    results = {}  # (frames, config) -> rows of steps 2..N
    for frames in args.frames:
        for config in configs:
            out = work / f"f{frames}-{config.replace(' ', '').replace('+', '-')}"
            shutil.rmtree(out, ignore_errors=True)
            launcher, extra = launch[config]
            start = time.perf_counter()
            _run(launcher + common + ["--num-frames", frames, "--out", out] + extra, work / f"{out.name}.log")
            results[frames, config] = _step_rows(out / "metrics.jsonl")
            step = _median([sum(r[k] for k in PHASES) for r in results[frames, config]])
            print(f"# {frames} frames, {config}: {step:.2f} s/step "
                  f"({time.perf_counter() - start:.0f} s with start-up)", flush=True)
    # ---- tables ----
    model = M.VideoLM.load(init)
    prompts = {frames: _prompt_tokens(model, records_file, frames) for frames in args.frames}
    device = _device_name()
    median = lambda frames, c, key: _median([key(r) for r in results[frames, c]])
    step_s = lambda r: sum(r[k] for k in PHASES)
    passes_s = lambda r: r["time_logprobs"] + r["time_update"]
    print(f"\ncommand: `{_command_line()}`\ndevice: {device}; rl.py with --engine torch, "
          f"{'bf16' if torch.cuda.is_available() else 'fp32'}; work folder {work}\n"
          f"model: preset {args.preset}: {model.family.describe(model)}; LLM {model.llm_config.num_hidden_layers} "
          f"layers, hidden {model.llm_config.hidden_size}, {heads} heads ({model.llm_config.num_key_value_heads} KV)\n"
          f"step: {args.batch_size} prompts x {args.group_size} responses, up to {args.max_new_tokens} new tokens, "
          f"KL to a reference; median over steps 2..{args.steps}"
          + ("" if "stage 1+2" in configs else "; stage 1+2 skipped and shared prefix on one process: sp size 1")
          + (f"; stage 1+2 and shared prefix are {sp_size} processes" + (" with 1 thread each (torchrun's default)"
                                                                         if not torch.cuda.is_available() else "")
             if "stage 1+2" in configs else "") + "\n")
    letters = dict(zip(STEP_CONFIGS, "abcd"))
    head = " | ".join(f"({letters[c]}) {c} s" for c in configs)
    ratios = [f"(a)/({letters[c]})" for c in configs[1:]]
    all_letters = "/".join(letters[c] for c in configs)
    print(f"| frames | prompt tokens | {head} | " + " | ".join(ratios)
          + f" | log-probs + update (b)/(d) | LLM positions / step ({all_letters}) | vision-tower runs / step ({all_letters}) |")
    print("|---:|---:|" + "---:|" * (len(configs) + len(ratios)) + "---:|---:|---:|")
    for frames in args.frames:
        steps = {c: median(frames, c, step_s) for c in configs}
        passes = median(frames, "stage 1", passes_s) / median(frames, "shared prefix", passes_s)
        positions = "/".join(f"{median(frames, c, lambda r: r['llm_positions']):,.0f}" for c in configs)
        runs = "/".join(f"{median(frames, c, lambda r: r['vision_runs']):g}" for c in configs)
        print(f"| {frames} | {prompts[frames]:,.0f} | " + " | ".join(f"{steps[c]:.2f}" for c in configs)
              + " | " + " | ".join(f"{steps['no cache'] / steps[c]:.2f}x" for c in configs[1:])
              + f" | {passes:.2f}x | {positions} | {runs} |")
    print("\nMedian seconds per phase (rl.py's timers):\n")
    print("| frames | config | encode | rollout | log-probs (old + ref) | update | sync | step |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for frames in args.frames:
        for c in configs:
            phases = [median(frames, c, lambda r: r[k]) for k in PHASES]
            print(f"| {frames} | ({letters[c]}) {c} | " + " | ".join(f"{p:.3f}" for p in phases)
                  + f" | {median(frames, c, step_s):.3f} |")


# ---- shapes for prefill and capacity: a SigLIP-400M-like tower and a Qwen2-1.5B-like LLM ----

SHAPES = {
    "tiny": vila.PRESETS["tiny"],
    # SigLIP-so400m at 392 px: 28x28 patches -> 196 tokens per frame, as many as LongVILA-7B's 384 px (27x27,
    # zero-padded to 28x28); kept at 392 so the numbers in BENCHMARKS.md stay comparable.
    "qwen2-1.5b": dict(
        image_size=392, patch_size=14,
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
        llm=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=True),
        vocab_size=151936,
    ),
}
DEFAULT_SHAPE = "qwen2-1.5b" if torch.cuda.is_available() else "tiny"


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "CPU")
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _command_line() -> str:
    return " ".join(["python", "bench.py"] + [shlex.quote(a) for a in sys.argv[1:]])


def _dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def build_llm(shape: str, max_positions: int):
    """A causal LM of the shape's sizes with random weights, built on the device in bf16 (fp32 on a CPU)."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    s = SHAPES[shape]
    config = Qwen2Config(vocab_size=s["vocab_size"], max_position_embeddings=max_positions, **s["llm"])
    torch.manual_seed(0)
    with _device():
        return AutoModelForCausalLM.from_config(config, dtype=_dtype(),
                                                attn_implementation=M.default_attn_implementation(_dtype()))


def shape_config(shape: str) -> vila.VilaConfig:
    s = SHAPES[shape]
    return vila.VilaConfig(s["image_size"], s["patch_size"], s["vision"]["hidden_size"], s["llm"]["hidden_size"])


def build_videolm(shape: str, max_positions: int) -> M.VideoLM:
    """A VideoLM of the shape's sizes with random weights (vision frozen); its tokenizer only maps the prompt
    text to ids below the LLM's vocabulary size."""
    from transformers import SiglipVisionConfig, SiglipVisionModel
    s = SHAPES[shape]
    llm = build_llm(shape, max_positions)
    with _device():
        vision = SiglipVisionModel(SiglipVisionConfig(image_size=s["image_size"], patch_size=s["patch_size"],
                                                      vision_use_head=False, **s["vision"])).to(_dtype())
        config = shape_config(shape)
        projector = vila.MultimodalProjector(config.projector, config.vision_hidden, config.llm_hidden,
                                          config.block_order).to(_dtype())
    tokenizer = M.train_tokenizer([CAPACITY_TEXT_BEFORE, CAPACITY_TEXT_AFTER, "\n"] * 4, vocab_size=300)
    model = M.VideoLM(config, vision, projector, llm, tokenizer)
    model.freeze_vision()
    return model


def _prefill(llm, inputs_embeds: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """A prefill as an engine runs it: every position through the decoder, the LM head on the last only."""
    hidden = llm.get_decoder()(inputs_embeds=inputs_embeds, position_ids=position_ids,
                               use_cache=False).last_hidden_state                               # [1, S, D]
    return llm.get_output_embeddings()(hidden[:, -1])                                           # [1, V]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peak_gib() -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if torch.cuda.is_available() else "-"


def _reset_peak():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


# ---- prefill: tokens per second and MFU of a long no-grad forward ----

def prefill_flops(matmul_params: int, layers: int, hidden: int, tokens: int) -> float:
    """2 x params x tokens (every weight one multiply-add per token) + causal attention,
    4 x layers x hidden x tokens^2 / 2 (QK^T and AV over the lower triangle)."""
    return 2 * matmul_params * tokens + 4 * layers * hidden * tokens ** 2 / 2


def cmd_prefill(args):
    """Print a markdown table: prefill throughput (tokens/s) and MFU per prompt length, or OOM."""
    tokens = args.tokens or ([8192, 32768, 131072, 524288] if args.shape != "tiny" else [256, 1024])
    llm = build_llm(args.shape, max(tokens)).eval()
    cfg = llm.config
    # Weights that multiply every token: the decoder without its embedding table (a lookup, no FLOPs).
    matmul_params = M.count_parameters(llm.get_decoder()) - llm.get_input_embeddings().weight.numel()
    rows = []
    with torch.no_grad():
        _prefill(llm, torch.randn(1, min(tokens), cfg.hidden_size, dtype=_dtype(), device=_device()))  # warm-up
        _sync()
        for n in tokens:
            _free()
            _reset_peak()
            embeds = None
            try:
                embeds = torch.randn(1, n, cfg.hidden_size, dtype=_dtype(), device=_device())   # [1, S, D]
                best = float("inf")
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    _prefill(llm, embeds)
                    _sync()
                    best = min(best, time.perf_counter() - start)
                flops = prefill_flops(matmul_params, cfg.num_hidden_layers, cfg.hidden_size, n)
                rows.append((n, f"{best:.3f}", f"{n / best:,.0f}", f"{flops / best / 1e12:.1f}",
                             f"{100 * flops / best / (args.peak_tflops * 1e12):.1f}%", _peak_gib()))
            except torch.OutOfMemoryError:
                rows.append((n, "OOM", "OOM", "-", "-", _peak_gib()))
            finally:
                embeds = None  # an OOM's tensors must not count against the next length
            print(f"# {n} tokens: {rows[-1][1]} s", flush=True)
    print(f"\ncommand: `{_command_line()}`\ndevice: {_device_name()}; {_dtype()}, "
          f"{cfg._attn_implementation}, forward only (no grad), LM head on the last position\n"
          f"model: {args.shape}-shaped LLM with random weights: {cfg.num_hidden_layers} layers, hidden "
          f"{cfg.hidden_size}, {cfg.num_attention_heads} heads ({cfg.num_key_value_heads} KV), intermediate "
          f"{cfg.intermediate_size}, vocab {cfg.vocab_size}; {matmul_params:,} non-embedding params\n"
          f"FLOPs = 2 x params x tokens + 4 x layers x hidden x tokens^2 / 2; MFU against {args.peak_tflops} "
          f"TFLOP/s; best of {args.repeats}\n")
    print("| tokens | seconds | tokens/s | TFLOP/s | MFU | peak memory (GiB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, *rest in rows:
        print(f"| {n:,} | " + " | ".join(rest) + " |")


# ---- capacity: the most frames that fit, prefill and training step ----

CAPACITY_TEXT_BEFORE = "Watch the video.\n"
CAPACITY_TEXT_AFTER = "\nQuestion: What happens in the video?\nResponse: "


def nominal_timestamps(num_frames: int, fps: float = 2.0) -> np.ndarray:
    """Frame times of `num_frames` frames sampled at `fps` (2, Qwen2.5-VL's default rate): what a prompt
    of random frames tells M-RoPE's time axis."""
    return (np.arange(num_frames) + 0.5) / fps


def _video_prompt(model: M.VideoLM, num_frames: int) -> M.Prompt:
    """The prompt of `num_frames` frames. The video embeddings are random tensors [steps * tokens_per_step,
    D] standing in for the tower's output: the tower runs `chunk_size` frames at a time, so its memory
    does not grow with T (one chunk of it is measured separately)."""
    steps = -(-num_frames // model.config.frames_per_step)
    video_embeds = torch.randn(steps * model.config.tokens_per_step, model.config.llm_hidden,
                               dtype=_dtype(), device=model.device)                # [steps * tps, D]
    return model.prompt(CAPACITY_TEXT_BEFORE, video_embeds, CAPACITY_TEXT_AFTER, nominal_timestamps(num_frames))


def _try_prefill(model: M.VideoLM, num_frames: int, response_len: int) -> int:
    with torch.no_grad():
        prompt = _video_prompt(model, num_frames)
        _prefill(model.llm, prompt.embeds[None], model.position_arg(prompt.positions[..., None, :]))
    return len(prompt)


def _try_train_step(model: M.VideoLM, num_frames: int, response_len: int) -> int:
    """Forward + backward of the response's log-probs with the video prefix (one sequence)."""
    with torch.no_grad():
        prompt = _video_prompt(model, num_frames)
    response = torch.randint(0, len(model.tokenizer), (response_len,)).tolist()
    try:
        batch = model.build_sequence_batch([prompt], [response])                   # [1, L + R, D]
        logprobs = model.token_logprobs(batch)                                     # [1, L + R]
        (-logprobs.sum()).backward()
        return batch.targets.shape[1]
    finally:
        model.llm.zero_grad(set_to_none=True)  # gradients of a failed try must not count against the next


def _fits(attempt, model, num_frames: int, response_len: int):
    """(positions, seconds, peak GiB) if one attempt at `num_frames` runs, None if it runs out of memory."""
    _free()
    _reset_peak()
    try:
        start = time.perf_counter()
        positions = attempt(model, num_frames, response_len)
        _sync()
        return positions, time.perf_counter() - start, _peak_gib()
    except torch.OutOfMemoryError:
        return None
    except RuntimeError as e:  # cuBLAS/cuDNN workspaces fail with their own errors under memory pressure
        if "ALLOC_FAILED" in str(e) or "out of memory" in str(e):
            return None
        raise
    finally:
        _free()


def _report_try(frames: int, result) -> None:
    # Every try is printed with its numbers as it ends, so a run cut short still says what fitted.
    if result is None:
        print(f"#   {frames} frames: OOM", flush=True)
    else:
        positions, seconds, peak = result
        print(f"#   {frames} frames: fits ({positions:,} positions, {seconds:.1f} s, peak {peak} GiB)", flush=True)


def largest_fitting(attempt, model, start: int, max_frames: int, resolution: int, response_len: int):
    """Double the frame count from `start` until it fails or passes `max_frames`, then bisect the bracket
    down to `resolution` frames. Returns (frames, result at that count, whether max_frames was reached)."""
    best, result, frames, failed = 0, None, start, None
    while frames <= max_frames:
        r = _fits(attempt, model, frames, response_len)
        _report_try(frames, r)
        if r is None:
            failed = frames
            break
        best, result, frames = frames, r, frames * 2
    if failed is None:
        return best, result, True
    lo, hi = best, failed
    while hi - lo > resolution:
        mid = (lo + hi) // 2
        r = _fits(attempt, model, mid, response_len)
        _report_try(mid, r)
        if r:
            lo, result = mid, r
        else:
            hi = mid
    return lo, result, False


def cmd_capacity(args):
    """Print a markdown table: the most frames that fit for a no-grad prefill and for a training step."""
    max_frames = args.max_frames or (8192 if args.shape != "tiny" else 64)
    tpf = shape_config(args.shape).tokens_per_frame
    model = build_videolm(args.shape, max_positions=max_frames * (tpf + 1) + args.response_len + 256)
    model.llm.gradient_checkpointing_enable()
    model.llm.train()  # Hugging Face checkpoints activations only in training mode (Qwen2 has no dropout)
    # One chunk of the vision tower: its memory is the same for any frame count.
    size = model.config.image_size
    _reset_peak()
    with torch.no_grad():
        model.encode_video(torch.randint(0, 256, (args.chunk_size, size, size, 3), dtype=torch.uint8),
                           chunk_size=args.chunk_size)
    tower_peak = _peak_gib()
    rows = []
    passes = {"prefill": ("prefill (no grad)", _try_prefill), "train": ("GRPO step (fwd + bwd of log-probs)", _try_train_step)}
    for name, attempt in (passes[p] for p in args.passes):
        print(f"# {name}", flush=True)
        frames, result, bound = largest_fitting(attempt, model, args.start_frames, max_frames,
                                                args.resolution, args.response_len)
        if result is None:
            rows.append((name, f"< {args.start_frames}", "-", "-", "-"))
        else:
            positions, seconds, peak = result
            rows.append((name, f"{'>= ' if bound else ''}{frames:,}", f"{positions:,}", f"{seconds:.2f}", peak))
    llm, vision = model.llm.config, model.vision_tower.config
    head_dim = llm.hidden_size // llm.num_attention_heads
    kv_per_token = 2 * llm.num_hidden_layers * llm.num_key_value_heads * head_dim * torch.finfo(_dtype()).bits // 8
    print(f"\ncommand: `{_command_line()}`\ndevice: {_device_name()}; {_dtype()}, {llm._attn_implementation}, "
          f"gradient checkpointing on\nmodel: {args.shape} shape, random weights: vision {vision.num_hidden_layers} "
          f"layers x {vision.hidden_size} ({vision.num_attention_heads} heads, intermediate "
          f"{vision.intermediate_size}), image {size} px, patch {vision.patch_size}, {tpf} tokens per frame + "
          f"separator; LLM {llm.num_hidden_layers} layers, hidden {llm.hidden_size}, {llm.num_attention_heads} "
          f"heads ({llm.num_key_value_heads} KV), vocab {llm.vocab_size}\n"
          f"video embeddings for the LLM are random tensors [T x {tpf}, D]; the vision tower runs "
          f"{args.chunk_size} frames at a time (peak {tower_peak} GiB for one chunk); the step scores "
          f"{args.response_len} response tokens, no optimizer state; search: doubling from {args.start_frames} "
          f"up to {max_frames}, then bisection to {args.resolution} frames\n"
          f"the prefill is one forward over the whole prompt (no KV cache kept, nothing chunked): its bound is the "
          f"activations of the longest layer, not a cache. An engine with chunked prefill is bound by its KV cache "
          f"instead: {kv_per_token / 2**10:.0f} KiB per position here, {kv_per_token * max_frames * (tpf + 1) / 2**30:.1f} "
          f"GiB at {max_frames:,} frames\n")
    print("| pass | most frames that fit | positions | seconds at that size | peak memory (GiB) |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


# ---- decode: sampled frames from an hour-long video, decord vs PyAV ----

DECODE_CODECS = {  # codec -> (PyAV encoder, its fastest settings with a keyframe every `keyint` frames)
    "h264": ("libx264", lambda keyint: {"g": str(keyint), "keyint_min": str(keyint), "sc_threshold": "0",
                                        "preset": "ultrafast"}),
    "vp9": ("libvpx-vp9", lambda keyint: {"g": str(keyint), "deadline": "realtime", "cpu-used": "8"}),
    "av1": ("libsvtav1", lambda keyint: {"g": str(keyint), "preset": "12"}),
}


def _encode_segment(path: Path, codec: str, seconds: float, fps: int, width: int, height: int,
                    keyint_s: float) -> None:
    """A few seconds of video, encoded for real: a picture of stripes that slides a pixel per frame (low
    motion, as a lecture or a game stream; every frame between keyframes is a real predicted frame)."""
    import av
    encoder, options = DECODE_CODECS[codec]
    y, x = np.mgrid[0:height, 0:width]
    picture = np.stack([(x // 4) % 256, (y // 4) % 256, (x + y) // 8 % 256], axis=-1).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options(round(keyint_s * fps))
        for t in range(round(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.roll(picture, t, axis=1), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _tile(segment: Path, path: Path, copies: int) -> None:
    """`copies` of a segment's packets one after another, timestamps shifted, without re-encoding: a long
    file written in seconds whose every frame is still a real encoded frame to decode. The segment holds
    whole GOPs (its length is a multiple of the keyframe interval), so each copy starts on a keyframe."""
    import av
    with av.open(str(segment)) as source, av.open(str(path), "w") as container:
        stream = source.streams.video[0]
        out = container.add_stream_from_template(stream, opaque=True)  # no encoder lookup: AV1 decodes by dav1d
        packets = [p for p in source.demux(stream) if p.size]
        span = max(p.pts + (p.duration or 0) for p in packets) - min(p.pts for p in packets)
        for k in range(copies):
            for p in packets:
                copy = av.Packet(bytes(p))
                copy.pts, copy.dts, copy.duration = p.pts + k * span, p.dts + k * span, p.duration
                copy.is_keyframe, copy.time_base, copy.stream = p.is_keyframe, stream.time_base, out
                container.mux(copy)


def write_long_video(path: Path, codec: str, seconds: float, fps: int, width: int, height: int, keyint_s: float,
                     segment_s: float = 60.0) -> None:
    """A `seconds`-long test video: a `segment_s` piece encoded (the expensive part, at the encoder's
    fastest preset), then tiled to the length."""
    segment_s = min(segment_s, seconds)
    segment = path.with_suffix(".segment.mp4")
    _encode_segment(segment, codec, segment_s, fps, width, height, keyint_s)
    _tile(segment, path, math.ceil(seconds / segment_s))
    segment.unlink()


def _rss_bytes(field: str) -> int:
    """VmRSS or VmHWM (the peak) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _time_read(reader_class, path: Path, image_size: int, num_frames: int) -> dict:
    """One cold read with one reader: seconds to open (index the packets) and to decode the sampled frames,
    the frames PyAV's decoder produced (decord does not say), and the read's peak memory above what the
    process held before it (the peak is reset through /proc/self/clear_refs), the frames returned included."""
    import ctypes

    import video
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so that this read's pages count as new
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _rss_bytes("VmRSS")
    start = time.perf_counter()
    reader = reader_class(str(path), image_size)
    opened = time.perf_counter()
    indices, _ = video.sample_indices(reader.num_frames, reader.avg_fps, video.FrameSampling(num_frames=num_frames))
    frames = reader.frames(indices)
    done = time.perf_counter()
    reader.close()
    return {"open": opened - start, "decode": done - opened, "total": done - start, "frames": len(frames),
            "decoded": getattr(reader, "decoded", None), "video_frames": reader.num_frames,
            "peak": _rss_bytes("VmHWM") - before, "output": frames.nbytes}


def cmd_decode(args):
    """Print a markdown table: one cold read of `--frames` frames spread over a long video, per source
    (size, codec, rate, keyframe interval), tower size and reader, and which reader `choose_reader` picks."""
    import video  # here, not at the top: video.py needs decord and PyAV, which prefill/capacity must run without
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-decode-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size, codec, fps, keyint_s in itertools.product(args.sizes, args.codecs, args.video_fps, args.keyint_s):
        width, height = (int(v) for v in size.split("x"))
        path = work / f"{codec}-{int(args.seconds)}s-{size}-{fps}fps-key{keyint_s:g}s.mp4"
        if not path.exists():
            start = time.perf_counter()
            write_long_video(path, codec, args.seconds, fps, width, height, keyint_s, args.segment_s)
            print(f"# wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.0f} s",
                  flush=True)
        if not rows:  # the first read of a process loads libraries and starts threads: not timed
            for reader_class in video.VIDEO_READERS:
                try:
                    _time_read(reader_class, path, 32, 1)
                except video._ReadError:
                    pass
        for num_frames, image_size in itertools.product(args.frames, args.image_sizes):
            chosen = video.choose_reader(video.probe(str(path)), video.FrameSampling(num_frames=num_frames))[0].name
            for reader_class in video.VIDEO_READERS:
                try:
                    result = _time_read(reader_class, path, image_size, num_frames)
                except video._ReadError as e:
                    result = {"error": str(e)}
                rows.append((size, codec, fps, keyint_s, num_frames, image_size, reader_class.name, chosen, result))
                print(f"# {rows[-1]}", flush=True)
    print(f"\n{args.seconds:g} s videos ({args.segment_s:g} s encoded, then tiled); one cold read each; "
          f"{_device_name()}; `{_command_line()}`\n")
    print("| source | codec | fps | keyframe every | frames | tower px | reader | open (s) | decode (s) | total (s) "
          "| frames decoded | peak MiB (frames returned) |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for size, codec, fps, keyint_s, num_frames, image_size, reader, chosen, r in rows:
        cells = f"| {size} | {codec} | {fps} | {keyint_s:g} s | {num_frames} | {image_size} | {reader}{' (chosen)' * (reader == chosen)} |"
        if "error" in r:
            print(f"{cells} cannot decode: {r['error'][:50]} | | | | |")
            continue
        decoded = "-" if r["decoded"] is None else f"{r['decoded']:,} of {r['video_frames']:,}"
        print(f"{cells} {r['open']:.2f} | {r['decode']:.2f} | {r['total']:.2f} | {decoded} "
              f"| {r['peak'] / 2**20:,.0f} ({r['output'] / 2**20:,.0f}) |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    memory = sub.add_parser("memory", formatter_class=fmt,
                            help="peak memory per rank of MR-SP stage 2 (forward + backward) on the CPU")
    memory.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768], help="sequence lengths (tokens)")
    memory.add_argument("--sp-sizes", type=int, nargs="+", default=[1, 2], help="sequence-parallel sizes")
    memory.add_argument("--response-len", type=int, default=512,
                        help="scored tokens at the end of the sequence (--grpo-step: tokens per response)")
    memory.add_argument("--preset", choices=sorted(vila.PRESETS), default="tiny", help="model sizes")
    memory.add_argument("--grpo-step", action="store_true",
                        help="measure one whole GRPO step per rank instead (policy update + reference + cache) with "
                             "an LLM of the 7B's width; then --ranks, --layers, --vocab-size, --frames, --group-size "
                             "and --response-len apply")
    memory.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="--grpo-step: process counts to compare")
    memory.add_argument("--layers", type=int, default=1, help="--grpo-step: decoder layers")
    memory.add_argument("--width", choices=sorted(WIDTHS), default="7b",
                        help="--grpo-step: the LLM's width (7b: hidden 3584, MLP 18944; narrow: hidden 512, MLP 2048)")
    memory.add_argument("--vocab-size", type=int, default=152064, help="--grpo-step: LLM vocabulary (Qwen2-7B's)")
    memory.add_argument("--frames", type=int, default=2, help="--grpo-step: frames of the video (257 positions each)")
    memory.add_argument("--group-size", type=int, default=2, help="--grpo-step: responses in the group")
    memory.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                        help="--grpo-step: rl.py's --bf16, with its default (on with a GPU). A CPU without bf16 "
                             "matrix instructions runs bf16 products on a slow generic path: minutes per step")
    memory.set_defaults(fn=cmd_memory)
    engines = sub.add_parser("engines", formatter_class=fmt,
                             help="rollout throughput (generated tokens/s) of the torch and vLLM engines")
    engines.add_argument("--checkpoint", default=None, help="VideoLM checkpoint (default: a fresh tiny model)")
    engines.add_argument("--engines", nargs="+", choices=["torch", "vllm"], default=["torch", "vllm"],
                         help="which engines to measure")
    engines.add_argument("--prompts", type=int, nargs="+", default=[1, 4], help="prompts per generate call")
    engines.add_argument("--group-sizes", type=int, nargs="+", default=[1, 4, 8], help="samples per prompt (n)")
    engines.add_argument("--max-new-tokens", type=int, default=64, help="response length cap")
    engines.add_argument("--num-frames", type=int, default=16, help="random frames in each prompt's video")
    engines.add_argument("--max-model-len", type=int, default=1024, help="engines' longest prompt + response")
    engines.add_argument("--repeats", type=int, default=3, help="runs per setting; the table shows the fastest")
    engines.add_argument("--seed", type=int, default=0, help="frames and sampling seed")
    engines.set_defaults(fn=bench_engines)
    step = sub.add_parser("step", formatter_class=fmt,
                          help="seconds per GRPO step of rl.py: no cache vs MR-SP stage 1 vs stages 1+2 vs shared prefix")
    step.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32, 64], help="frames per video (--num-frames)")
    step.add_argument("--family", choices=sorted(M.FAMILIES), default="vila",
                      help="model family of the fresh checkpoint (model.py init --family)")
    step.add_argument("--preset", choices=sorted(vila.PRESETS), default="tiny",
                      help="model sizes (small: 16 tokens per frame, so video tokens dominate)")
    step.add_argument("--steps", type=int, default=3, help="GRPO steps per run; step 1 is warm-up and not counted")
    step.add_argument("--batch-size", type=int, default=2, help="prompts per step")
    step.add_argument("--group-size", type=int, default=4, help="responses per prompt")
    step.add_argument("--max-new-tokens", type=int, default=32, help="longest response")
    step.add_argument("--sp-size", type=int, default=None,
                      help="processes of the stage 1+2 and shared-prefix runs (default: 2 on a CPU; on GPUs the most, "
                           "up to the GPU count, that divide the preset's heads; 1 skips the stage 1+2 column and runs "
                           "shared prefix in one process)")
    step.add_argument("--workdir", default=None,
                      help="folder for the data, checkpoint and runs (default: a new temp folder)")
    step.add_argument("--seed", type=int, default=0, help="data and sampling seed")
    step.set_defaults(fn=cmd_step)
    prefill = sub.add_parser("prefill", formatter_class=fmt,
                             help="prefill throughput (tokens/s, MFU) of a long no-grad LLM forward")
    prefill.add_argument("--shape", choices=sorted(SHAPES), default=DEFAULT_SHAPE,
                         help="LLM sizes (qwen2-1.5b on a GPU, tiny on a CPU)")
    prefill.add_argument("--tokens", type=int, nargs="+", default=None,
                         help="prompt lengths (default: 8192 32768 131072 524288; 256 1024 for tiny)")
    prefill.add_argument("--peak-tflops", type=float, default=790.0,
                         help="the device's peak TFLOP/s for the MFU column (bf16)")
    prefill.add_argument("--repeats", type=int, default=2, help="timed runs per length; the table shows the fastest")
    prefill.set_defaults(fn=cmd_prefill)
    capacity = sub.add_parser("capacity", formatter_class=fmt,
                              help="most frames that fit: no-grad prefill and a GRPO training step")
    capacity.add_argument("--shape", choices=sorted(SHAPES), default=DEFAULT_SHAPE,
                          help="model sizes (SigLIP-400M + Qwen2-1.5B shape on a GPU, tiny on a CPU)")
    capacity.add_argument("--max-frames", type=int, default=None,
                          help="stop doubling here (default: 8192; 64 for tiny)")
    capacity.add_argument("--start-frames", type=int, default=8, help="first frame count tried")
    capacity.add_argument("--resolution", type=int, default=16, help="bisect until the bracket is this many frames")
    capacity.add_argument("--response-len", type=int, default=512, help="response tokens scored in the training step")
    capacity.add_argument("--chunk-size", type=int, default=32, help="frames per vision-tower call")
    capacity.add_argument("--passes", nargs="+", choices=["prefill", "train"], default=["prefill", "train"],
                          help="which searches to run (one per call keeps a call short on a GPU)")
    capacity.set_defaults(fn=cmd_capacity)
    decode = sub.add_parser("decode", formatter_class=fmt,
                            help="seconds and peak memory to read sampled frames from a long video: decord vs PyAV")
    decode.add_argument("--sizes", nargs="+", default=["1280x720"], help="source sizes, WIDTHxHEIGHT")
    decode.add_argument("--codecs", nargs="+", choices=sorted(DECODE_CODECS), default=["h264"],
                        help="codecs of the test videos (decord cannot decode AV1)")
    decode.add_argument("--video-fps", type=int, nargs="+", default=[30], help="frame rates of the test videos")
    decode.add_argument("--keyint-s", type=float, nargs="+", default=[2.0], help="seconds between keyframes")
    decode.add_argument("--frames", type=int, nargs="+", default=[16, 256], help="frames sampled (--num-frames)")
    decode.add_argument("--image-sizes", type=int, nargs="+", default=[448],
                        help="frames are resized to these square sizes (the vision tower's)")
    decode.add_argument("--seconds", type=float, default=3600.0, help="length of the test videos")
    decode.add_argument("--segment-s", type=float, default=60.0,
                        help="seconds actually encoded; the file repeats them to --seconds (a multiple of --keyint-s)")
    decode.add_argument("--workdir", default=None,
                        help="folder for the test videos, kept for reruns (default: a new temp folder)")
    decode.set_defaults(fn=cmd_decode)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    errors.run_main(main)
