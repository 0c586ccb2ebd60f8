"""Shared fixtures: a tiny VideoLM built from configs and a tokenizer trained here (nothing is downloaded)."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process vLLM engine: starts in seconds
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")           # GiB
torch.set_num_threads(min(2, os.cpu_count() or 1))

import model as M  # noqa: E402

# Text of the shape the task uses, enough for a small byte-level BPE vocabulary.
CORPUS = [
    "Watch the video.\n",
    "\nQuestion: How many scenes are red?\nOptions:\nA. 1\nB. 2\nC. 3\nD. 4\n"
    "Think step by step inside <think> </think>, then give the final answer inside <answer> </answer>."
    " Answer with the option letter.\nResponse: ",
    "<think>Scene 1 is red. Scene 2 is blue. Scene 3 is green. Red appears in scene 1.</think><answer>A</answer>",
    "Which colour comes right after the yellow scene? magenta cyan first last",
] * 10


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return M.train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """A fresh, randomly initialised tiny VideoLM in eval mode (fp32, sdpa), seed 0."""
    return M.build_from_preset("tiny", tiny_tokenizer, seed=0).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_tokenizer, tmp_path_factory):
    """Path of a saved tiny checkpoint (config.json, llm/, vision_tower/, mm_projector/)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    M.build_from_preset("tiny", tiny_tokenizer, seed=0).save(path)
    return path
