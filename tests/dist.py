"""Run a function on N real processes, as torchrun would: for distributed tests on a CPU (gloo).

    results = run_ranks(my_job, 2, "some", "args")   # [rank 0's return value, rank 1's]

Each process gets the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a
free local port) and one CPU thread, calls `fn(*args)`, and returns its result through a torch.save
file. `fn` must be importable by name (a module-level function), because each rank imports it afresh.
A rank that raises fails the whole run with its traceback; a run that hangs is killed after `timeout`.

The ranks are forked from a server process (multiprocessing's "forkserver", started at the first call) that
has imported torch, transformers' model classes and this project's modules once. Each rank is still a new
process with its own process group and nothing from earlier runs; it starts in about a second instead of
the ~8 s a fresh interpreter spends importing all that again (the suite starts ~30 ranks). A rank's
environment is the server's (the test process's when the first run began) plus the torchrun variables:
set anything else a job needs inside the job.
"""
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

# What the forkserver imports before forking a rank: everything a job's test module imports that is slow.
PRELOAD = ["torch", "torch.distributed.fsdp", "torch.distributed.checkpoint", "pytest", "numpy", "safetensors.torch",
           "transformers.models.qwen2.modeling_qwen2", "transformers.models.siglip.modeling_siglip",
           "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
           "data", "model", "vila", "qwen_vl", "mrsp", "train", "runs", "rollout", "rl", "sft"]
if Path.cwd() == Path(__file__).resolve().parents[1]:  # the server finds the project's modules on its working
    mp.get_context("forkserver").set_forkserver_preload(PRELOAD)  # folder; from elsewhere each rank imports them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        result = fn(*args)
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_entry, args=(world_size, free_port(), out_dir, fn, args),
                                 nprocs=world_size, join=False, start_method="forkserver")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):  # raises if a rank failed
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout:.0f} s")
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def allreduce_gradients(model: torch.nn.Module, ps) -> None:
    """Turn per-rank gradients into the step's gradient: SUM over the SP group, MEAN over DP groups.

    Use after backward, before clipping and the optimizer step, when the model is not wrapped by FSDP
    (mrsp.py's docstring: gradient accounting; the trainers let FSDP do this). A trainable parameter that got no gradient on this rank
    counts as zero, so every rank runs the same collectives in the same order.
    """
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if ps.sp_size > 1:
            torch_dist.all_reduce(p.grad, group=ps.sp_group)
        if ps.dp_size > 1:
            torch_dist.all_reduce(p.grad, group=ps.dp_group)
            p.grad.div_(ps.dp_size)
