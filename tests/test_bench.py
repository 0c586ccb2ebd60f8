"""bench.py's step, prefill, capacity and memory subcommands at their tiniest sizes on the CPU: each runs the real
code path and prints its table. Smoke tests only: nothing here asserts on a timing."""
import subprocess
import sys
from pathlib import Path

import torch

import bench

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args) -> str:
    done = subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def table_rows(out: str, header_start: str) -> list[list[str]]:
    """The cells of the markdown table whose header line starts with `header_start` (header included)."""
    lines = out.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return [rows[0]] + rows[2:]  # drop the |---| line


def test_step_runs_rl_three_ways_in_one_process_and_prints_the_table(tmp_path):
    """bench.py step at --sp-size 1: (a), (b) and (d), each a real rl.py process; (c), the same rl.py under
    torchrun with --sp-size, is left out here (rl.py under torchrun: test_rl.py's sp = 2 runs)."""
    out = run_bench("step", "--frames", "8", "--steps", "2", "--group-size", "2", "--max-new-tokens", "8",
                    "--sp-size", "1", "--workdir", str(tmp_path))
    header, row = table_rows(out, "| frames | prompt tokens")
    assert header[2:5] == ["(a) no cache s", "(b) stage 1 s", "(d) shared prefix s"]
    assert header[5:7] == ["(a)/(b)", "(a)/(d)"]
    assert row[0] == "8" and all(float(c) > 0 for c in row[2:5])
    positions = [float(p.replace(",", "")) for p in row[8].split("/")]
    assert positions[0] == positions[1] > positions[2]  # the prompt once per group in (d)
    no_cache, stage1, shared = (float(r) for r in row[9].split("/"))
    assert no_cache > stage1 == shared == 2  # re-encoded for every sequence vs once per video (2 prompts per step)
    phases = table_rows(out, "| frames | config")
    assert [r[1] for r in phases[1:]] == ["(a) no cache", "(b) stage 1", "(d) shared prefix"]
    assert "command: `python bench.py step --frames 8 --steps 2 --group-size 2" in out


def test_prefill_tiny_prints_throughput_and_mfu():
    out = run_bench("prefill", "--shape", "tiny", "--tokens", "64", "256", "--repeats", "1")
    header, *rows = table_rows(out, "| tokens")
    assert header == ["tokens", "seconds", "tokens/s", "TFLOP/s", "MFU", "peak memory (GiB)"]
    assert [r[0] for r in rows] == ["64", "256"] and all(r[4].endswith("%") for r in rows)


def test_capacity_tiny_reaches_its_bound():
    out = run_bench("capacity", "--shape", "tiny", "--max-frames", "16", "--response-len", "16")
    header, *rows = table_rows(out, "| pass")
    assert header[1] == "most frames that fit"
    assert [r[1] for r in rows] == [">= 16", ">= 16"]  # nothing runs out of memory at this size


def test_capacity_search_doubles_then_bisects():
    """A fake attempt that runs out of memory above 100 frames: doubling brackets it (64 fits, 128 not),
    bisection narrows the bracket to the resolution."""
    tried = []

    def attempt(model, num_frames, response_len):
        tried.append(num_frames)
        if num_frames > 100:
            raise torch.OutOfMemoryError("fake")
        return num_frames * 5

    frames, (positions, _, _), reached_bound = bench.largest_fitting(attempt, None, start=8, max_frames=1024,
                                                                    resolution=4, response_len=0)
    assert tried[:5] == [8, 16, 32, 64, 128]
    assert 96 < frames <= 100 and positions == frames * 5 and not reached_bound


def test_prefill_and_capacity_need_neither_decord_nor_pyav():
    """The GPU image has no decord, PyAV or vLLM: bench.py must import without them (step imports data.py
    only when it runs). A None in sys.modules makes that import fail."""
    code = ("import sys; sys.modules.update(av=None, decord=None, vllm=None); import bench; "
            "assert 'data' not in sys.modules and 'rollout' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_memory_grpo_step_reports_each_ranks_share():
    """One GRPO step (a narrow LLM of one decoder layer and a small vocabulary, to stay fast; BENCHMARKS.md
    has the 7B's width) on 1 and 2 ranks: FSDP2 gives each of 2 ranks half the gradients and optimizer
    state of one process."""
    out = run_bench("memory", "--grpo-step", "--ranks", "1", "2", "--layers", "1", "--vocab-size", "1024",
                    "--width", "narrow", "--frames", "4", "--response-len", "8")
    header, *rows = table_rows(out, "| ranks")
    assert header[:8] == ["ranks", "rank", "params", "grads", "optimizer state", "params + grads + optimizer",
                          "reference", "cache"]
    assert [(r[0], r[1]) for r in rows] == [("1", "0"), ("2", "0"), ("2", "1")]
    mib = lambda cell: float(cell.replace(",", ""))
    one, half = rows[0], rows[1]
    for col in (3, 4):  # grads, optimizer state: each rank holds half (+ rounding to whole MiB)
        assert mib(half[col]) <= mib(one[col]) / 2 + 1 and mib(one[col]) > 4
    assert mib(one[7]) > 0  # the video's embeddings are held by the cache
    _, *units = table_rows(out, "| unit")  # the 2-rank policy's FSDP units: one root for the decoder's layers
    assert {u[0] for u in units if u[1] == "yes"} == {"llm.model", "llm.lm_head"}
    assert {u[3] for u in units} == {"float32"}  # rl.py's default on a CPU (no --bf16); bf16: test_precision.py


def test_memory_refuses_sequences_shorter_than_the_scored_tokens():
    done = subprocess.run([sys.executable, "bench.py", "memory", "--seq-lens", "256"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--seq-lens [256] must be longer than --response-len 512" in done.stderr
