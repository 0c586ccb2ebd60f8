"""CoT-SFT: the loss, the schedule, and sequence-parallel training equal to one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sft

ROOT = Path(__file__).resolve().parents[1]


def test_sft_loss_is_the_token_mean_nll():
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert sft.sft_loss(logprobs, mask).item() == pytest.approx((1 + 2 + 4) / 3)


def test_warmup_then_cosine():
    assert sft.lr_at(0, 100, 1e-3, 10) == pytest.approx(1e-4)
    assert sft.lr_at(9, 100, 1e-3, 10) == pytest.approx(1e-3)
    assert sft.lr_at(55, 100, 1e-3, 10) == pytest.approx(1e-4 + 9e-4 * 0.5)  # halfway down the cosine
    assert sft.lr_at(100, 100, 1e-3, 10) == pytest.approx(1e-4)


def test_records_for_step_split_data_parallel_ranks_and_epochs():
    records = list(range(10))
    one = [sft.records_for_step(records, s, 4, sft.mrsp.ParallelState(), seed=0) for s in range(5)]
    assert sorted(one[0] + one[1] + one[2][:2]) == records  # epoch 1 is a permutation of every record
    for dp_rank in (0, 1):
        ps = sft.mrsp.ParallelState(dp_rank=dp_rank, dp_size=2)
        assert sft.records_for_step(records, 0, 2, ps, seed=0) == one[0][2 * dp_rank:2 * dp_rank + 2]


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_sp2_sft_with_trainable_vision_and_checkpointing_equals_one_process(easy_task, tmp_path):
    """torchrun, 2 ranks, --sp-size 2: FSDP2 over both ranks (vision tower included), Ulysses attention,
    gradient checkpointing. Same data, same losses step after step as a single process."""
    args = ["--init", str(easy_task["root"] / "init"), "--data", str(easy_task["data"]), "--steps", "3",
            "--batch-size", "4", "--num-frames", "8", "--save-every", "0", "--grad-checkpointing"]
    sft.main(args + ["--out", str(tmp_path / "sp1")])
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "sft.py", *args, "--out", str(tmp_path / "sp2"), "--sp-size", "2"],
                   cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    one, two = losses(tmp_path / "sp1"), losses(tmp_path / "sp2")
    assert len(one) == len(two) == 3 and one[-1] < one[0]
    assert two == pytest.approx(one, rel=1e-4)


def test_training_prompts_show_the_srt_cues_within_the_sampled_frames(tiny_model, tmp_path):
    """A record whose subtitles are an .srt file: the training prompt carries the cues that overlap the
    sampled frames' span, as eval does, also when the video embeddings come from the cache."""
    import data
    data.write_mp4(tmp_path / "v.mp4", np.zeros((10, 32, 32, 3), np.uint8), fps=1.0)   # a 10 s video
    (tmp_path / "v.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nbefore\n\n"
                                    "2\n00:00:04,000 --> 00:00:05,000\nduring\n\n"
                                    "3\n00:00:20,000 --> 00:00:21,000\nafter\n")
    (tmp_path / "r.jsonl").write_text(json.dumps(
        {"problem_id": "q", "videos": "v.mp4", "problem": "What is said?", "problem_type": "free_form",
         "answer": "during", "subtitles": "v.srt"}) + "\n")
    record, = data.load_records(tmp_path / "r.jsonl")
    sampling = data.FrameSampling(num_frames=2)                       # frames at 2 s and 7 s
    tiny_model.freeze_vision()
    cache = sft.mrsp.VideoEmbeddingCache(tiny_model)
    prompts = sft.VideoPrompts(tiny_model, sampling, sft.mrsp.ParallelState(), cache)
    assert prompts.subtitles(record) == "during"
    with torch.no_grad():
        first, second = prompts(record), prompts(record)              # the second from the cache
        before, after = data.build_prompt(record, subtitles="during")
        expected = tiny_model.prompt_embeds(before, prompts.video_embeds(record), after)
    assert cache.vision_runs == 1
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)


def test_unreadable_videos_are_replaced_by_the_next_readable_record(tiny_model, tmp_path):
    import data
    a, b, c = records = write_abc(tmp_path)
    prompts = sft.VideoPrompts(tiny_model, data.FrameSampling(num_frames=2), sft.mrsp.ParallelState(), None)
    with torch.no_grad():
        used, embeds = prompts.for_batch([b, a, b], records)
    assert [r.problem_id for r in used] == ["c", "a", "c"] and len(embeds) == 3   # the batch keeps its size
    assert list(prompts.unreadable) == [(b.video, None)] and "b.mp4" in prompts.unreadable[(b.video, None)]
    assert prompts.skipped == 2 and prompts.uncached_runs == 3                      # b was tried once
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "c.mp4").write_bytes(b"")
    with pytest.raises(sft.data.VideoError, match="none of the 3 records"):
        prompts.for_batch([a], records)


def test_sft_run_goes_on_past_a_corrupt_video(easy_task, tmp_path):
    rows = [json.loads(line) for line in Path(easy_task["data"]).read_text().splitlines()]
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    bad = {**rows[0], "problem_id": "broken", "videos": str(tmp_path / "broken.mp4")}
    with_bad = Path(easy_task["data"]).with_name(f"with_bad_{tmp_path.name}.jsonl")  # beside the videos
    with_bad.write_text("".join(json.dumps(r) + "\n" for r in [bad, *rows]))
    sft.main(["--init", str(easy_task["root"] / "init"), "--data", str(with_bad),
              "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", str(len(rows) + 1),
              "--num-frames", "4", "--save-every", "0"])
    row, = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["skipped_records"] == 1 and (tmp_path / "run" / "final" / "config.json").exists()


def write_abc(folder):
    """Videos a, b, c (b is corrupt) and one record for each: the records, in order."""
    import data
    for name in ("a", "c"):
        data.write_mp4(Path(folder) / f"{name}.mp4", np.zeros((4, 32, 32, 3), np.uint8), fps=2.0)
    (Path(folder) / "b.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 then garbage")
    (Path(folder) / "r.jsonl").write_text("".join(json.dumps(
        {"problem_id": name, "videos": f"{name}.mp4", "problem": "?", "problem_type": "free_form", "answer": "x"})
        + "\n" for name in "abc"))
    return sft.data.load_records(Path(folder) / "r.jsonl")


def one_rank_cannot_read_job(checkpoint: str, folder: str) -> list[str]:
    """sp=2: video a reads on SP rank 0 but not on rank 1 (a file a rank cannot see, a flaky mount)."""
    import data
    ps = sft.mrsp.init_distributed(sp_size=2)
    model = sft.M.VideoLM.load(checkpoint).eval()
    model.freeze_vision()
    a, b, c = records = data.load_records(Path(folder) / "r.jsonl")
    if ps.sp_rank == 1:
        real = data.load_frames
        def load_frames(path, *args):
            if path == a.video:
                raise data.VideoError(f"{path}: cannot decode video (injected on rank 1)")
            return real(path, *args)
        data.load_frames = load_frames
    prompts = sft.VideoPrompts(model, data.FrameSampling(num_frames=2), ps,
                               sft.mrsp.VideoEmbeddingCache(model, sp_group=ps.sp_group))
    with torch.no_grad():
        used, _ = prompts.for_batch([a, c], records)
    return [r.problem_id for r in used]


def test_a_file_one_sp_rank_cannot_read_is_skipped_by_the_whole_group(tiny_checkpoint, tmp_path):
    """The SP ranks agree before encoding: both replace a, none waits in an all-gather for the other."""
    from dist import run_ranks
    write_abc(tmp_path)
    ranks = run_ranks(one_rank_cannot_read_job, 2, str(tiny_checkpoint), str(tmp_path), timeout=90)
    assert ranks == [["c", "c"], ["c", "c"]]  # a -> next readable record (b is corrupt) -> c, on both ranks
