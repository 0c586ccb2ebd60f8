"""The training plumbing both stages share (train.py): the schedule, the data split over ranks, the
prompts of a batch (cached video, .srt cues, unreadable videos replaced, SP ranks agreeing), and the run
folder (one run per --out, what --resume checks, the trainer state as JSON)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import errors
import model as M
import mrsp
import synth
import train
import video


def test_warmup_then_cosine():
    assert train.lr_at(0, 100, 1e-3, 10) == pytest.approx(1e-4)
    assert train.lr_at(9, 100, 1e-3, 10) == pytest.approx(1e-3)
    assert train.lr_at(55, 100, 1e-3, 10) == pytest.approx(1e-4 + 9e-4 * 0.5)  # halfway down the cosine
    assert train.lr_at(100, 100, 1e-3, 10) == pytest.approx(1e-4)


def test_records_for_step_split_data_parallel_ranks_and_epochs():
    records = list(range(10))
    one = [train.records_for_step(records, s, 4, mrsp.ParallelState(), seed=0) for s in range(5)]
    assert sorted(one[0] + one[1] + one[2][:2]) == records  # epoch 1 is a permutation of every record
    for dp_rank in (0, 1):
        ps = mrsp.ParallelState(dp_rank=dp_rank, dp_size=2)
        assert train.records_for_step(records, 0, 2, ps, seed=0) == one[0][2 * dp_rank:2 * dp_rank + 2]


def test_training_prompts_show_the_srt_cues_within_the_sampled_frames(tiny_model, tmp_path):
    """A record whose subtitles are an .srt file: the training prompt carries the cues that overlap the
    sampled frames' span, as eval does, also when the video embeddings come from the cache."""
    record = srt_record(tmp_path)
    sampling = video.FrameSampling(num_frames=2)                       # frames at 2 s and 7 s
    tiny_model.freeze_vision()
    cache = mrsp.VideoEmbeddingCache(tiny_model)
    prompts = train.VideoPrompts(tiny_model, sampling, mrsp.ParallelState(), cache)
    assert prompts.subtitles(record) == "during"
    with torch.no_grad():
        first, second = prompts(record), prompts(record)              # the second from the cache
        before, after = data.build_prompt(record, subtitles="during")
        expected = tiny_model.prompt(before, prompts.media_embeds(record), after)
    assert cache.vision_runs == 1
    for got in (first, second):
        torch.testing.assert_close(got.embeds, expected.embeds)
        assert torch.equal(got.positions, expected.positions)


def srt_record(folder) -> data.Record:
    """A record over a 10 s video (1 fps) whose subtitles are an .srt file of three cues: "before" (0-1 s),
    "during" (4-5 s) and "after" (20-21 s, past the end)."""
    synth.write_mp4(Path(folder) / "v.mp4", np.zeros((10, 32, 32, 3), np.uint8), fps=1.0)
    (Path(folder) / "v.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nbefore\n\n"
                                        "2\n00:00:04,000 --> 00:00:05,000\nduring\n\n"
                                        "3\n00:00:20,000 --> 00:00:21,000\nafter\n")
    (Path(folder) / "r.jsonl").write_text(json.dumps(
        {"problem_id": "q", "videos": "v.mp4", "problem": "What is said?", "problem_type": "free_form",
         "answer": "during", "subtitles": "v.srt"}) + "\n")
    record, = data.load_records(Path(folder) / "r.jsonl")
    return record


def test_unreadable_videos_are_replaced_by_the_next_readable_record(tiny_model, tmp_path):
    a, b, c = records = write_abc(tmp_path)
    prompts = train.VideoPrompts(tiny_model, video.FrameSampling(num_frames=2), mrsp.ParallelState(), None)
    with torch.no_grad():
        used, embeds = prompts.for_batch([b, a, b], records)
    assert [r.problem_id for r in used] == ["c", "a", "c"] and len(embeds) == 3   # the batch keeps its size
    assert list(prompts.unreadable) == [(b.video, None)] and "b.mp4" in prompts.unreadable[(b.video, None)]
    assert prompts.skipped == 2 and prompts.uncached_runs == 3                      # b was tried once
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "c.mp4").write_bytes(b"")
    with pytest.raises(video.VideoError, match="none of the 3 records"):
        prompts.for_batch([a], records)


def write_abc(folder):
    """Videos a, b, c (b is corrupt) and one record for each: the records, in order."""
    for name in ("a", "c"):
        synth.write_mp4(Path(folder) / f"{name}.mp4", np.zeros((4, 32, 32, 3), np.uint8), fps=2.0)
    (Path(folder) / "b.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 then garbage")
    (Path(folder) / "r.jsonl").write_text("".join(json.dumps(
        {"problem_id": name, "videos": f"{name}.mp4", "problem": "?", "problem_type": "free_form", "answer": "x"})
        + "\n" for name in "abc"))
    return data.load_records(Path(folder) / "r.jsonl")


def one_rank_cannot_read_job(checkpoint: str, folder: str) -> list[str]:
    """sp=2: video a reads on SP rank 0 but not on rank 1 (a file a rank cannot see, a flaky mount)."""
    ps = mrsp.init_distributed(sp_size=2)
    model = M.VideoLM.load(checkpoint).eval()
    model.freeze_vision()
    a, b, c = records = data.load_records(Path(folder) / "r.jsonl")
    if ps.sp_rank == 1:
        real = video.load_frames
        def load_frames(path, *args):
            if path == a.video:
                raise video.VideoError(f"{path}: cannot decode video (injected on rank 1)")
            return real(path, *args)
        video.load_frames = load_frames
    prompts = train.VideoPrompts(model, video.FrameSampling(num_frames=2), ps,
                               mrsp.VideoEmbeddingCache(model, sp_group=ps.sp_group))
    with torch.no_grad():
        used, _ = prompts.for_batch([a, c], records)
    return [r.problem_id for r in used]


def test_a_file_one_sp_rank_cannot_read_is_skipped_by_the_whole_group(tiny_checkpoint, tmp_path):
    """The SP ranks agree before encoding: both replace a, none waits in an all-gather for the other."""
    from dist import run_ranks
    write_abc(tmp_path)
    ranks = run_ranks(one_rank_cannot_read_job, 2, str(tiny_checkpoint), str(tmp_path), timeout=90)
    assert ranks == [["c", "c"], ["c", "c"]]  # a -> next readable record (b is corrupt) -> c, on both ranks


def test_the_checkpoints_question_prompt_reaches_training_rollout_and_eval(tmp_path):
    """`model.py init --question-prompt plain` writes the text into config.json; training, the engine's
    length check and eval build their prompts with it; a checkpoint without the key (a release one) keeps
    LongVILA-R1's thinking prompt."""
    import eval as evaluation
    import rl
    synth.main(["--out", str(tmp_path / "data"), "--n", "2", "--seed", "0", "--test-frac", "0"])
    records = data.load_records(tmp_path / "data" / "train.jsonl")
    sampling = video.FrameSampling(num_frames=4)
    lengths = {}
    for name in ("thinking", "plain"):
        out = tmp_path / name
        M.main(["init", "--out", str(out), "--data", str(tmp_path / "data" / "train.jsonl"), "--question-prompt", name])
        assert json.loads((out / "config.json").read_text()).get("question_prompt") == \
            (None if name == "thinking" else data.PLAIN_PROMPT)
        model = M.VideoLM.load(out).eval()
        before, after = data.build_prompt(records[0], template=model.question_prompt)
        assert after.startswith("Question: " if name == "plain" else "You are a helpful assistant.")
        with torch.no_grad():
            video_embeds = model.encode_video(video.load_frames(records[0].video, model.config.image_size, sampling)[0])
            expected = model.prompt(before, video_embeds, after)
            built = train.VideoPrompts(model, sampling, mrsp.ParallelState(), None)(records[0])
            torch.testing.assert_close(built.embeds, expected.embeds)                  # SFT and RL
            torch.testing.assert_close(evaluation._prompt(model, records[0], sampling, False, {},
                                                          video.FramePrefetcher(model.config.image_size, 0)).embeds,
                                       expected.embeds)
        lengths[name] = rl.prompt_length(model, records[0], sampling)[1]  # tokens
        assert lengths[name] == len(expected)
        reference = rl.with_own_llm(model, out, torch.float32, model.device)   # the KL's reference model
        with torch.no_grad():
            torch.testing.assert_close(train.VideoPrompts(reference, sampling, mrsp.ParallelState(), None)(records[0]).embeds,
                                       expected.embeds)
    assert lengths["plain"] < lengths["thinking"] - 60                       # the thinking prompt's fixed text


# ---- the run folder: one run per --out; the trainer state without pickle ----

def files_of(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_folder_is_refused_to_a_second_run_replaced_only_on_overwrite(easy_task, tmp_path, capsys):
    import sft
    run = ["--init", str(easy_task["root"] / "init"), "--data", str(easy_task["data"]), "--out", str(tmp_path),
           "--steps", "2", "--batch-size", "2", "--num-frames", "4", "--save-every", "1"]
    sft.main(run)
    first = files_of(tmp_path)
    assert {"metrics.jsonl", "settings.json", "final/config.json", "checkpoint-1/trainer_state.json"} <= set(first)

    with pytest.raises(ValueError, match=r"already holds a run \(metrics.jsonl \(2 steps\), checkpoint-1, final/\)"):
        sft.main(run + ["--lr", "1e-3"])                      # the same command again, or another run: refused
    with pytest.raises(ValueError, match="already finished its 2 steps"):
        sft.main(run + ["--resume"])                          # nothing left to do
    assert files_of(tmp_path) == first                        # every file of the first run, byte for byte

    sft.main(run + ["--overwrite", "--lr", "1e-3", "--save-every", "0"])
    assert capsys.readouterr().out.count("--overwrite: removing the run in") == 1
    assert not (tmp_path / "checkpoint-1").exists()           # the old run's checkpoints went with it
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]                # the new run's rows only, not appended
    assert json.loads((tmp_path / "settings.json").read_text())["lr"] == 1e-3
    assert files_of(tmp_path)["final/llm/model.safetensors"] != first["final/llm/model.safetensors"]


def test_resume_without_a_checkpoint_stops_unless_the_folder_holds_no_run(easy_task, tmp_path, capsys):
    import sft
    run = ["--init", str(easy_task["root"] / "init"), "--data", str(easy_task["data"]), "--out", str(tmp_path),
           "--steps", "1", "--batch-size", "2", "--num-frames", "4", "--save-every", "0", "--resume"]
    sft.main(run)                                             # an empty folder: a fresh start
    assert "no run in" in capsys.readouterr().out
    finished = files_of(tmp_path)
    with pytest.raises(ValueError, match="no complete checkpoint to continue from; pass --overwrite"):
        sft.main(run[:-2] + ["2", "--resume"])                # more steps asked, but nothing to continue from
    assert files_of(tmp_path) == finished
    (tmp_path / "checkpoint-1").mkdir()                       # an older version's checkpoint: pickled state
    (tmp_path / "checkpoint-1" / "trainer_state.pt").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="pickled trainer_state.pt, which is not loaded"):
        sft.main(run[:-2] + ["2", "--resume"])


# ---- experiment tracking: --report-to ----

def tensorboard_events(folder: Path):
    """What TensorBoard itself reads back from the event files in `folder`: its EventAccumulator, every
    scalar kept (its default keeps a sample of 10,000 per tag), and the hparams of the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata as hparams_metadata
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    content = events.SummaryMetadata(hparams_metadata.SESSION_START_INFO_TAG).plugin_data.content
    hparams = hparams_metadata.parse_session_start_info_plugin_data(content).hparams
    return events, {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in hparams.items()}


@pytest.mark.parametrize("script", ["sft", "rl"])
def test_report_to_tensorboard_logs_every_metrics_row_at_its_step(script, easy_task, tmp_path):
    """Every number of every metrics.jsonl row comes back from TensorBoard's own reader at the row's step
    (stored as float32), and the run's settings.json as the run's hparams."""
    import rl
    import sft
    common = ["--data", str(easy_task["data"]), "--out", str(tmp_path), "--steps", "2", "--batch-size", "2",
              "--num-frames", "4", "--save-every", "0", "--report-to", "tensorboard"]
    if script == "sft":
        sft.main(common + ["--init", str(easy_task["root"] / "init")])
    else:
        rl.main(common + ["--init", str(easy_task["init"]), "--engine", "torch", "--group-size", "2",
                          "--max-new-tokens", "16"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events, hparams = tensorboard_events(tmp_path / "tensorboard")

    metrics = {k for r in rows for k in r if k != "step"}
    assert len(metrics) > 5 and set(events.Tags()["scalars"]) == metrics
    for key in metrics:
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], np.float32(r[key])) for r in rows if key in r], key
    settings = json.loads((tmp_path / "settings.json").read_text())
    as_hparam = lambda v: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (
        v if isinstance(v, (str, bool)) else json.dumps(v))
    assert hparams == {k: as_hparam(v) for k, v in settings.items() if v is not None}


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_report_to_a_tracker_not_installed_stops_before_anything_is_written(package, monkeypatch, tmp_path):
    """The package missing (None in sys.modules: `import` fails as if it were not installed): a one-line
    usage error with the command that installs it, before the run folder is made."""
    import sft
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(errors.UsageError, match=rf"--report-to {package}: the {package} package is not installed.*"
                                                rf"`pip install {package}`"):
        sft.main(["--init", str(tmp_path / "no-model"), "--data", str(tmp_path / "no.jsonl"),
                  "--out", str(tmp_path / "run"), "--report-to", package])
    assert not (tmp_path / "run").exists()


def test_rng_state_round_trips_through_json():
    """The trainer state is JSON: what comes back from the file must draw exactly what the saved state
    would have drawn, from all three generators."""
    import random
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()                                        # numpy now holds a cached gaussian as well
    state = json.loads(json.dumps(train.rng_state()))
    draws = lambda: (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.normal(),
                     torch.rand(3).tolist())
    expected = draws()
    draws()                                                   # move every generator on
    train.set_rng_state(state)
    assert draws() == expected


def test_a_setting_the_earlier_run_did_not_have_is_named_as_such(tmp_path):
    """A run folder written before a flag existed: the refusal says so rather than showing None."""
    import json
    import runs
    (tmp_path / "settings.json").write_text(json.dumps({"steps": 30, "lr": 1e-6}))
    runs.check_settings(tmp_path / "settings.json", {"steps": 30, "lr": 1e-6})      # the same: nothing raised
    with pytest.raises(ValueError) as refused:
        runs.check_settings(tmp_path / "settings.json", {"steps": 30, "lr": 1e-6, "micro_batch_tokens": 0})
    assert "(micro_batch_tokens: (a setting this code did not have then) -> 0)" in str(refused.value)
