"""CoT-SFT: the loss, a run past a corrupt video, and sequence-parallel training equal to one process."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sft
from test_rl import assert_same_adamw_updates, rows_of

ROOT = Path(__file__).resolve().parents[1]


def test_sft_loss_is_the_token_mean_nll():
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert sft.sft_loss(logprobs, mask).item() == pytest.approx((1 + 2 + 4) / 3)


def test_the_embedding_cache_flags_mean_the_same_in_sft_and_rl():
    """--embed-cache / --embed-cache-dir in both scripts; in SFT the cache follows --freeze-vision (on by
    default) unless set, and asking for it with a trained vision tower is refused; rl.py (always frozen) has it
    on by default."""
    import rl
    base = ["--init", "i", "--data", "d.jsonl", "--out", "o"]
    assert sft.parse_args(base).embed_cache
    assert not sft.parse_args(base + ["--no-freeze-vision"]).embed_cache
    assert not sft.parse_args(base + ["--no-embed-cache"]).embed_cache
    assert sft.parse_args(base + ["--embed-cache-dir", "e"]).embed_cache_dir == "e"
    with pytest.raises(SystemExit):
        sft.parse_args(base + ["--no-freeze-vision", "--embed-cache"])
    assert rl.parse_args(base).embed_cache and rl.parse_args(base + ["--embed-cache-dir", "e"]).embed_cache_dir == "e"
    assert not rl.parse_args(base + ["--no-embed-cache"]).embed_cache
    with pytest.raises(SystemExit):
        rl.parse_args(base + ["--no-freeze-vision"])


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_mix_num_frames_draws_depend_on_seed_and_step_only():
    import video
    mix = [video.FrameSampling(num_frames=n) for n in (4, 8, 16)]
    draws = [sft.mix_sampling(mix, 0, step).num_frames for step in range(60)]
    assert draws == [sft.mix_sampling(mix, 0, step).num_frames for step in range(60)]  # what a resume redraws
    assert set(draws) == {4, 8, 16} and draws != [sft.mix_sampling(mix, 1, s).num_frames for s in range(60)]
    with pytest.raises(SystemExit):  # a count and a rate at once: refused, not one silently ignored
        sft.parse_args(["--init", "i", "--data", "d", "--out", "o", "--fps", "1", "--mix-num-frames", "8", "16"])


def test_sp2_sft_with_trainable_vision_and_checkpointing_equals_one_process(easy_task, tmp_path):
    """torchrun, 2 ranks, --sp-size 2: FSDP2 over both ranks (vision tower included), Ulysses attention,
    gradient checkpointing, a frame count drawn per step (--mix-num-frames: both ranks of the group must
    draw the same, or their shards would not fit together). Same data, same losses step after step as a
    single process."""
    args = ["--init", str(easy_task["root"] / "init"), "--data", str(easy_task["data"]), "--steps", "3",
            "--batch-size", "4", "--mix-num-frames", "4", "8", "--save-every", "0", "--grad-checkpointing",
            "--lr", "1e-3", "--no-freeze-vision"]
    sft.main(args + ["--out", str(tmp_path / "sp1")])
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "sft.py", *args, "--out", str(tmp_path / "sp2"), "--sp-size", "2"],
                   cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    one, two = losses(tmp_path / "sp1"), losses(tmp_path / "sp2")
    assert len(one) == len(two) == 3 and one[-1] < one[0]
    frames = [json.loads(line)["num_frames"] for line in (tmp_path / "sp2" / "metrics.jsonl").read_text().splitlines()]
    assert frames == [8, 4, 4]  # sft.mix_sampling's draws for seed 0, steps 0-2
    assert two == pytest.approx(one, rel=1e-4)


def test_sft_run_skips_a_corrupt_video_found_before_training(easy_task, tmp_path, capsys):
    rows = [json.loads(line) for line in Path(easy_task["data"]).read_text().splitlines()]
    name = f"broken_{tmp_path.name}.mp4"  # beside the record file: its folder is the video folder
    (Path(easy_task["data"]).parent / name).write_bytes(b"not a video at all")
    bad = {**rows[0], "problem_id": "broken", "videos": name}
    with_bad = Path(easy_task["data"]).with_name(f"with_bad_{tmp_path.name}.jsonl")
    with_bad.write_text("".join(json.dumps(r) + "\n" for r in [bad, *rows]))
    sft.main(["--init", str(easy_task["root"] / "init"), "--data", str(with_bad),
              "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", str(len(rows)),
              "--num-frames", "4", "--save-every", "0"])
    row, = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["skipped_records"] == 0 and (tmp_path / "run" / "final" / "config.json").exists()
    assert "skipped 0 whose file is missing, 1 whose file cannot be read" in capsys.readouterr().err


def test_the_sft_target_is_the_formatted_response_then_eos(tiny_model):
    """The response SFT trains on ends with the tokenizer's eos (`<|im_end|>`): without it the model never
    learns to stop, and rollouts run to --max-new-tokens."""
    import data
    record = data.Record("q", "v.mp4", "Which colour?", ["red", "blue"], "multiple_choice", "Red is first.", "A")
    ids = sft.response_ids(tiny_model, record)
    text = "<think>Red is first.</think><answer>A</answer>"  # written out here, not data.format_response's
    assert ids[:-1] == tiny_model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_model.tokenizer.convert_ids_to_tokens(ids[-1]) == "<|im_end|>" == tiny_model.tokenizer.eos_token


# ---- one set of short runs: --grad-accum, --freeze-vision with the cache, --resume ----

REASONING = "Scene 1 is red."


@pytest.fixture(scope="module")
def sft_runs(easy_task, tmp_path_factory):
    """Three-step SFT runs on easy_task's records, every record given the same reasoning (so every response
    has the same token count, and the token mean over 4 responses is the mean of two token means over 2):
      accum:   --batch-size 2 --grad-accum 2, the embedding cache on (the default with --freeze-vision),
               a checkpoint after step 2;
      batch:   --batch-size 4, no cache: each step sees the same 4 records as accum's two micro-batches;
      resumed: accum's folder as a kill during step 3 leaves it (no final/, step 3's row written after the
               checkpoint, here with a loss no run gives), then --resume."""
    root = tmp_path_factory.mktemp("sft_runs")
    rows = [json.loads(line) for line in Path(easy_task["data"]).read_text().splitlines()]
    same = Path(easy_task["data"]).with_name(f"same_reasoning_{root.name}.jsonl")  # beside the videos
    same.write_text("".join(json.dumps({**r, "reasoning": REASONING}) + "\n" for r in rows))
    common = ["--init", str(easy_task["root"] / "init"), "--data", str(same), "--steps", "3", "--num-frames", "4",
              "--lr", "1e-3", "--warmup-steps", "1"]
    accum = common + ["--out", str(root / "accum"), "--batch-size", "2", "--grad-accum", "2", "--save-every", "2"]
    sft.main(accum)
    sft.main(common + ["--out", str(root / "batch"), "--batch-size", "4", "--save-every", "0", "--no-embed-cache"])

    shutil.copytree(root / "accum", root / "resumed")
    shutil.rmtree(root / "resumed" / "final")
    metrics = root / "resumed" / "metrics.jsonl"
    written = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in written[:2] + [{**written[2], "loss": 999.0}]))
    sft.main([*accum[:accum.index("--out")], "--out", str(root / "resumed"), *accum[accum.index("--out") + 2:],
              "--resume"])
    return {"root": root, "data": same, "init": easy_task["root"] / "init",
            **{name: rows_of(root / name) for name in ("accum", "batch", "resumed")}}


def test_grad_accum_2_of_2_records_equals_one_batch_of_4(sft_runs):
    """Same records per step, so the same loss, the same gradient (its norm before clipping) and, after the
    same AdamW steps, the same weights. The expected values are the run with no accumulation."""
    accum, batch = sft_runs["accum"], sft_runs["batch"]
    assert [r["step"] for r in accum] == [r["step"] for r in batch] == [1, 2, 3]
    for a, b in zip(accum, batch):
        assert (a["loss"], a["grad_norm"], a["lr"]) == pytest.approx((b["loss"], b["grad_norm"], b["lr"]), rel=1e-5)
        assert a["response_tokens"] == b["response_tokens"]
    root = sft_runs["root"]
    before = load_file(str(sft_runs["init"] / "llm" / "model.safetensors"))
    one = load_file(str(root / "accum" / "final" / "llm" / "model.safetensors"))
    two = load_file(str(root / "batch" / "final" / "llm" / "model.safetensors"))
    assert max((one[k] - before[k]).abs().max().item() for k in one) > 1e-5
    assert_same_adamw_updates(one, two)


def test_every_target_token_is_counted_eos_included(sft_runs, tiny_tokenizer):
    """response_tokens: 4 records a step, each the formatted response's tokens plus eos, counted here with
    the tokenizer itself."""
    text = f"<think>{REASONING}</think><answer>A</answer>"  # every easy_task answer is A
    per_record = len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
    assert [r["response_tokens"] for r in sft_runs["accum"]] == [4 * per_record] * 3


def test_freeze_vision_keeps_the_tower_fixed_and_encodes_each_video_once(sft_runs):
    """With --freeze-vision (the default) the tower and projector are saved unchanged and the cache encodes
    each video once per sampling: step by step, the new videos of the step (the records_for_step order
    written out here: a seeded permutation per epoch), every other look-up a hit."""
    import numpy as np
    root, accum = sft_runs["root"], sft_runs["accum"]
    for part in ("vision_tower", "mm_projector"):
        saved = load_file(str(root / "accum" / "final" / part / "model.safetensors"))
        init = load_file(str(sft_runs["init"] / part / "model.safetensors"))
        assert saved.keys() == init.keys() and all(torch.equal(saved[k], init[k]) for k in init), part
    n = len(Path(sft_runs["data"]).read_text().splitlines())
    seen, new = set(), []
    for step in range(3):
        videos = [(i // n, np.random.default_rng(i // n).permutation(n)[i % n]) for i in range(4 * step, 4 * step + 4)]
        new.append(len({v for _, v in videos} - seen))
        seen |= {v for _, v in videos}
    assert [r["vision_runs"] for r in accum] == new
    assert accum[-1]["embed_cache_misses"] == len(seen) and accum[-1]["embed_cache_hits"] == 12 - len(seen)
    assert all(r["vision_runs"] == 4 and "embed_cache_hits" not in r for r in sft_runs["batch"])  # no cache


def test_resume_drops_the_rows_after_the_checkpoint_and_repeats_the_run(sft_runs):
    """--resume from checkpoint-2: step 3's row of the killed run is dropped (its loss of 999 gone), step 3
    runs again to the same loss and weights as the run that was never stopped."""
    volatile = ("time_s", "vision_runs", "embed_cache_", "videos_", "video_wait_s")
    keep = lambda r: {k: v for k, v in r.items() if not k.startswith(volatile)}
    accum, resumed = sft_runs["accum"], sft_runs["resumed"]
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(accum, resumed):
        assert keep(a).keys() == keep(b).keys()
        for k in keep(a):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["step"], k)
    root = sft_runs["root"]
    one = load_file(str(root / "accum" / "final" / "llm" / "model.safetensors"))
    two = load_file(str(root / "resumed" / "final" / "llm" / "model.safetensors"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6)
