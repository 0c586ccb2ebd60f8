"""CoT-SFT: the loss, a run past a corrupt video, and sequence-parallel training equal to one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sft

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
    assert f"skipped 0 whose video is missing, 1 whose video cannot be read" in capsys.readouterr().err
