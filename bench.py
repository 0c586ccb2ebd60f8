"""Performance measurements behind the README's tables.

    python bench.py memory                                   # MR-SP stage 2: memory per rank, sp=1 vs sp=2
    python bench.py memory --seq-lens 16384 65536 --sp-sizes 1 2 4 --preset small
    python bench.py engines                                  # rollout throughput: torch vs vLLM engine
"""
import argparse
import os
import socket
import time

import torch
import torch.multiprocessing as mp

import model as M
import mrsp


# ---- memory: per-rank peak of one sequence-parallel forward + backward ----

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
    """Print a markdown table: memory per rank (max over the SP group) for each length and sp size."""
    ctx = mp.get_context("spawn")
    rows = []
    for seq_len in args.seq_lens:
        for sp_size in args.sp_sizes:
            results = ctx.SimpleQueue()
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.start_processes(_memory_rank, nprocs=sp_size, start_method="spawn",
                               args=(sp_size, seq_len, args.response_len, args.preset, port, results))
            ranks = [results.get() for _ in range(sp_size)]
            row = (seq_len, sp_size, *(max(r[i] for r in ranks) for i in (1, 2, 3)))
            rows.append(row)
            print(f"# {seq_len} tokens, sp={sp_size}: saved {row[2]:.0f} MiB, peak {row[3]:.0f} MiB per rank, "
                  f"{row[4]:.1f} s", flush=True)
    base = {seq_len: (saved, peak) for seq_len, sp_size, saved, peak, _ in rows if sp_size == 1}
    llm = M.PRESETS[args.preset]["llm"]
    print(f"\nPer rank (max over the SP group), forward + backward of log-probs; preset {args.preset} "
          f"({llm['num_hidden_layers']} layers, hidden {llm['hidden_size']}, {llm['num_attention_heads']} heads), "
          f"{args.response_len} scored tokens, fp32, CPU, 1 thread per rank\n")
    print("| tokens | sp | saved for backward (MiB) | peak RSS growth (MiB) | vs sp=1 (saved / peak) "
          "| step time (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for seq_len, sp_size, saved, peak, seconds in rows:
        ratio = (f"{saved / base[seq_len][0]:.2f}x / {peak / base[seq_len][1]:.2f}x" if seq_len in base else "-")
        print(f"| {seq_len:,} | {sp_size} | {saved:,.0f} | {peak:,.0f} | {ratio} | {seconds:.1f} |")


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
            M.build_from_preset("tiny", M.train_tokenizer(corpus, M.PRESETS["tiny"]["vocab_size"])).save(checkpoint)
        model = M.VideoLM.load(checkpoint).eval()
        size = model.config.image_size
        rng = np.random.default_rng(args.seed)
        with torch.no_grad():
            prompts = [model.prompt_embeds("Watch the video.\n", model.encode_video(
                rng.integers(0, 256, (args.num_frames, size, size, 3), dtype=np.uint8)),
                "\nQuestion: What happens?\nResponse: ") for _ in range(max(args.prompts))]
        rates = {}
        for name in args.engines:
            engine = rollout.make_engine(name, model, checkpoint / "llm", max_model_len=args.max_model_len)
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
            del engine
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    memory = sub.add_parser("memory", formatter_class=fmt,
                            help="peak memory per rank of MR-SP stage 2 (forward + backward) on the CPU")
    memory.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768], help="sequence lengths (tokens)")
    memory.add_argument("--sp-sizes", type=int, nargs="+", default=[1, 2], help="sequence-parallel sizes")
    memory.add_argument("--response-len", type=int, default=512, help="scored tokens at the end of the sequence")
    memory.add_argument("--preset", choices=sorted(M.PRESETS), default="tiny", help="model sizes")
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
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
