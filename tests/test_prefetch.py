"""Tests for reading ahead (video.FramePrefetcher, --decode-workers): the frames, the errors and the
training run are those of reading each video when the step needs it."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import mrsp
import rl
import synth
import train
import video
from conftest import ROOT
from test_decode import ScriptedEngine, cut_webm
from video import FramePrefetcher, FrameSampling, VideoError


@pytest.fixture
def clips(tmp_path):
    """Three 10-frame mp4s of different grey levels, and a file that is no video."""
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"clip{k}.mp4")
        synth.write_mp4(paths[-1], np.full((10, 32, 32, 3), 40 * k + 20, np.uint8), fps=5.0)
    (broken := tmp_path / "broken.mp4").write_bytes(b"not a video\n" * 40)
    return paths, broken


def test_reads_ahead_give_the_frames_and_errors_of_reading_inline(clips):
    paths, broken = clips
    sampling = FrameSampling(num_frames=4)
    reader = FramePrefetcher(image_size=24, workers=2)
    reader.prefetch([(p, sampling) for p in [*paths, broken]])
    for path in paths:
        frames, timestamps = reader.load_frames(path, sampling)
        inline_frames, inline_timestamps = video.load_frames(path, 24, sampling)
        np.testing.assert_array_equal(frames, inline_frames)
        np.testing.assert_array_equal(timestamps, inline_timestamps)
    with pytest.raises(VideoError, match=f"^{broken}: cannot decode video"):  # as inline: the caller skips it
        reader.load_frames(broken, sampling)
    assert reader.pending == {}   # every read claimed once
    assert reader.waited > 0


def test_only_the_reads_asked_for_last_are_kept(clips):
    paths, _ = clips
    reader = FramePrefetcher(image_size=24, workers=2)
    reader.prefetch([(p, FrameSampling(num_frames=4)) for p in paths])
    reader.prefetch([(paths[2], FrameSampling(num_frames=4)), (paths[2], FrameSampling(num_frames=2))])
    assert sorted(reader.pending) == [(str(paths[2]), "n2-max8192"), (str(paths[2]), "n4-max8192")]


def test_a_failing_worker_is_an_error_naming_the_file(clips, monkeypatch):
    paths, _ = clips
    monkeypatch.setattr(video, "load_frames", lambda path, *args: 1 / 0)
    reader = FramePrefetcher(image_size=24, workers=2)
    reader.prefetch([(paths[0], FrameSampling(num_frames=4))])
    with pytest.raises(RuntimeError, match=f"^{paths[0]}: the background read of this video failed: ZeroDivision"):
        reader.load_frames(paths[0], FrameSampling(num_frames=4))


def test_a_run_that_ends_does_not_wait_for_the_reads_still_queued():
    """A process whose main thread ends (an error, Ctrl-C) while reads are queued exits at once: here each
    read would take an hour (load_frames replaced by a sleep, in the child process only)."""
    code = ("import time, video\n"
            "video.load_frames = lambda *args: time.sleep(3600)\n"
            "reader = video.FramePrefetcher(32, 2)\n"
            "reader.prefetch([(f'v{k}.mp4', video.FrameSampling(num_frames=4)) for k in range(4)])\n"
            "time.sleep(0.5)  # both workers are inside a read, two more reads queued\n"
            "raise SystemExit(3)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr


def test_a_video_whose_embeddings_are_cached_is_not_read_ahead(tiny_model, clips):
    paths, _ = clips
    sampling = FrameSampling(num_frames=2)
    cache = mrsp.VideoEmbeddingCache(tiny_model)
    prompts = train.VideoPrompts(tiny_model, sampling, mrsp.ParallelState(), cache, decode_workers=2)
    records = [data.Record(f"q{k}", str(p), "?", [], "free_form", "", "x") for k, p in enumerate(paths)]
    prompts.media_embeds(records[0])  # encoded once: now in the cache
    prompts.prefetch((records, sampling))
    assert sorted(prompts.reader.pending) == [(str(p), sampling.key()) for p in paths[1:]]


def test_rl_with_two_decode_workers_logs_the_rows_of_inline_reading(tiny_checkpoint, tmp_path):
    # 6 synthetic videos and one that opens but whose last frames' bytes are gone (its sampled frame 56 of
    # 60 does not decode): the run skips that record and counts it, with or without workers.
    synth.main(["--out", str(tmp_path / "data"), "--n", "6", "--seed", "0", "--test-frac", "0"])
    (tmp_path / "data" / "videos" / "cut.webm").write_bytes(cut_webm(tmp_path, "libvpx-vp9", keep=0.97))
    rows = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    rows.append(dict(rows[0], problem_id=99, videos="videos/cut.webm"))
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--init", str(tiny_checkpoint), "--data", str(tmp_path / "data" / "train.jsonl"), "--steps", "2",
            "--num-frames", "8", "--batch-size", "3", "--group-size", "2", "--max-new-tokens", "8",
            "--engine", "torch", "--kl-coef", "0"]
    logged = {}
    for workers in (0, 2):
        rl.main(args + ["--out", str(tmp_path / f"w{workers}"), "--decode-workers", str(workers)])
        logged[workers] = [json.loads(line) for line in (tmp_path / f"w{workers}" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped_records"] for r in logged[0]) >= 1
    # Timings differ; the videos read so far (a count for this process) run ahead with workers, and by the
    # last step both runs have read the same files.
    volatile = lambda key: key.startswith(("time_", "videos_")) or key == "video_wait_s"
    for inline, ahead in zip(logged[0], logged[2], strict=True):
        assert inline.keys() == ahead.keys()
        for key in inline:
            if not volatile(key):
                assert ahead[key] == inline[key], (inline["step"], key)
    assert {k: v for k, v in logged[2][-1].items() if k.startswith("videos_")} == \
        {k: v for k, v in logged[0][-1].items() if k.startswith("videos_")}


class PromptsEngine(ScriptedEngine):
    """Answers "A" and keeps every prompt it was given."""
    def __init__(self):
        self.prompts = []

    def generate(self, prompts, n, **kw):
        self.prompts += [p.embeds.clone() for p in prompts]
        return super().generate(prompts, n, **kw)


def test_eval_with_two_decode_workers_asks_what_inline_reading_asks(tiny_model, clips, tmp_path):
    import eval as evaluation
    paths, broken = clips
    videos = [paths[0], paths[0], broken, paths[1], paths[2], paths[1]]  # VideoMME asks several questions a video
    records = [data.Record(f"q{k}", str(v), "?", ["a", "b"], "multiple_choice", "", "A") for k, v in enumerate(videos)]
    engines, reports = {}, {}
    for workers in (0, 2):
        engines[workers] = PromptsEngine()
        reports[workers] = evaluation.evaluate(tiny_model, engines[workers], records, FrameSampling(num_frames=4),
                                               tmp_path / f"w{workers}", batch_size=2, decode_workers=workers)
    assert reports[2]["errors"] == reports[0]["errors"] and reports[0]["errors"]["count"] == 1  # the broken video
    assert len(engines[2].prompts) == len(engines[0].prompts) == 5
    for ahead, inline in zip(engines[2].prompts, engines[0].prompts):
        torch.testing.assert_close(ahead, inline, rtol=0, atol=0)  # the same prompt embeddings, video included
