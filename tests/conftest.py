"""Shared fixtures: a tiny VideoLM built from configs and a tokenizer trained here (nothing is downloaded)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process vLLM engine: starts in seconds
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")           # GiB
torch.set_num_threads(min(2, os.cpu_count() or 1))

import data  # noqa: E402
import model as M  # noqa: E402
import synth  # noqa: E402

# Text of the shape the task uses, enough for a small byte-level BPE vocabulary.
CORPUS = [
    data.THINKING_PROMPT.format(question="How many scenes are red?\nA. 1\nB. 2\nC. 3\nD. 4"),
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
    """Path of a saved tiny checkpoint in the release layout (config.json, llm/, vision_tower/, mm_projector/)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    M.build_from_preset("tiny", tiny_tokenizer, seed=0).save(path)
    return path


@pytest.fixture(scope="session")
def easy_task(tmp_path_factory):
    """Synthetic videos whose correct option is always A, and a tiny model briefly SFT-ed on them
    (so it writes the think/answer format and answers some letter). Used by test_rl.py and test_sft.py."""
    root = tmp_path_factory.mktemp("easy")
    synth.main(["--out", str(root / "data"), "--n", "12", "--seed", "3", "--max-scenes", "4",
               "--test-frac", "0.01"])
    rows = [json.loads(line) for line in (root / "data" / "train.jsonl").read_text().splitlines()]
    for row in rows:  # move the correct option to the front (the release format: options in the problem)
        question, options = data.split_options(row["problem"])
        i = ord(row["answer"].removeprefix("<answer>")[0]) - ord("A")
        options = [options[i]] + options[:i] + options[i + 1:]
        row["problem"] = question + "".join(f"\n{data.option_letter(k)}. {o}" for k, o in enumerate(options))
        row["answer"] = "<answer>A</answer>"
    easy = root / "data" / "easy.jsonl"
    easy.write_text("".join(json.dumps(r) + "\n" for r in rows))
    M.main(["init", "--out", str(root / "init"), "--data", str(easy)])
    # SFT on the original (balanced) answers: the format is learned, the letter is not yet biased to A.
    # In a process of its own, as a user runs it: 80 steps at lr 3e-3 run inside the test process after
    # other tests ended elsewhere (what those tests leave in the process moves the last bits), and the
    # RL tests that start from this model then saw a different policy in a full-suite run than alone.
    subprocess.run([sys.executable, "sft.py", "--init", str(root / "init"), "--data", str(root / "data" / "train.jsonl"),
                    "--out", str(root / "sft"), "--steps", "80", "--batch-size", "4", "--lr", "3e-3", "--num-frames", "8",
                    "--save-every", "0", "--no-freeze-vision"], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "2"})
    return {"data": easy, "init": root / "sft" / "final", "root": root}
