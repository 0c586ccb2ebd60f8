"""Tests for data.py: real mp4 files written with data.write_mp4 and read back with decord.

The test videos count: frame i is solid gray at level 8 * i, so a frame read one index off is 8 levels
away, far outside the few levels H.264 moves a flat gray.
"""
import json
import re

import decord
import numpy as np
import pytest

import data
from data import (MAX_FRAMES, PALETTE, Cue, FrameSampling, Record, RecordError, VideoError, build_prompt,
                  format_response, frame_timestamps, load_frames, load_records, load_records_report,
                  option_letter, parse_srt, sample_indices, subtitle_text, subtitles_for_window, write_mp4)

VIDEO_FPS = 4.0
NUM_FRAMES = 30  # levels 0..232


@pytest.fixture(scope="module")
def counting_video(tmp_path_factory):
    """A 7.5 s, 4 fps, 32x32 mp4 whose frame i is gray level 8 * i."""
    path = tmp_path_factory.mktemp("video") / "count.mp4"
    levels = 8 * np.arange(NUM_FRAMES, dtype=np.uint8)
    write_mp4(path, np.broadcast_to(levels[:, None, None, None], (NUM_FRAMES, 32, 32, 3)), fps=VIDEO_FPS)
    return path


def frame_numbers(frames: np.ndarray) -> np.ndarray:
    """Which frame of the counting video each decoded frame is (fails if it is not clearly one)."""
    levels = frames.reshape(len(frames), -1).mean(axis=1)
    numbers = np.round(levels / 8).astype(int)
    assert np.all(np.abs(levels - 8 * numbers) < 3), f"frames are not clean gray levels: {levels}"
    return numbers


# ---- sample_indices: pure arithmetic ----

def test_num_frames_takes_the_centre_of_equal_segments():
    indices, timestamps = sample_indices(100, 10.0, FrameSampling(num_frames=4))
    assert indices.tolist() == [12, 37, 62, 87]
    assert indices.dtype == np.int64 and timestamps.dtype == np.float64
    np.testing.assert_allclose(timestamps, [1.2, 3.7, 6.2, 8.7])


def test_fewer_frames_than_asked_gives_every_frame_once():
    indices, timestamps = sample_indices(5, 2.0, FrameSampling(num_frames=16))
    assert indices.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(timestamps, [0, 0.5, 1, 1.5, 2])


@pytest.mark.parametrize("fps, count", [(0.5, 5), (1.0, 10), (2.0, 20)])
def test_fps_takes_one_frame_per_period(fps, count):
    # A 10 s video at 10 fps: sample times (k + 0.5) / fps, each mapped to the frame showing then.
    indices, timestamps = sample_indices(100, 10.0, FrameSampling(fps=fps))
    assert len(indices) == count
    targets = (np.arange(count) + 0.5) / fps
    assert np.all((timestamps <= targets) & (targets < timestamps + 0.1))


def test_fps_edge_cases():
    # faster than the video: each frame once; shorter than half a period: the middle frame
    assert sample_indices(8, 4.0, FrameSampling(fps=30))[0].tolist() == list(range(8))
    assert sample_indices(3, 30.0, FrameSampling(fps=1))[0].tolist() == [1]


def test_max_frames_caps_both_modes():
    assert len(sample_indices(1000, 10.0, FrameSampling(num_frames=64, max_frames=10))[0]) == 10
    indices, _ = sample_indices(100, 10.0, FrameSampling(fps=2.0, max_frames=4))
    assert indices.tolist() == [12, 37, 62, 87]  # evenly spread over the 20 fps-mode frames


def test_the_paper_cap_applies_by_default():
    # 100,000 frames at 30 fps (55 minutes) sampled at its full rate: capped at 8,192, evenly spread.
    indices, timestamps = sample_indices(100_000, 30.0, FrameSampling(fps=30.0))
    assert len(indices) == MAX_FRAMES == 8192
    assert np.all(np.diff(indices) > 0) and indices[0] >= 0 and indices[-1] < 100_000
    assert timestamps[-1] == pytest.approx(100_000 / 30, abs=1.0)


def test_frame_sampling_key_and_modes():
    assert FrameSampling().key() == "n16-max8192"
    assert FrameSampling(fps=0.5).key() == "fps0.5-max8192"
    assert FrameSampling(num_frames=32, fps=2.0).num_frames is None  # fps selects fps mode
    with pytest.raises(ValueError):
        FrameSampling(num_frames=None)
    with pytest.raises(ValueError):
        FrameSampling(fps=float("nan"))


# ---- load_frames: real decoding ----

def test_load_frames_num_frames(counting_video):
    frames, timestamps = load_frames(counting_video, 32, FrameSampling(num_frames=5))
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
    assert frame_numbers(frames).tolist() == [3, 9, 15, 21, 27]
    np.testing.assert_allclose(timestamps, np.array([3, 9, 15, 21, 27]) / VIDEO_FPS)


def test_load_frames_fps(counting_video):
    frames, timestamps = load_frames(counting_video, 32, FrameSampling(fps=1.0))
    # sample times 0.5 .. 6.5 s in a 7.5 s video -> frames 2, 6, ..., 26
    assert frame_numbers(frames).tolist() == [2, 6, 10, 14, 18, 22, 26]
    np.testing.assert_allclose(timestamps, [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5])


def test_load_frames_max_frames_and_resize(counting_video):
    frames, timestamps = load_frames(counting_video, 16, FrameSampling(fps=2.0, max_frames=4))
    assert frames.shape == (4, 16, 16, 3)
    assert frame_numbers(frames).tolist() == [3, 11, 19, 27]  # 4 of the 15 frames at 2 fps
    frames, _ = load_frames(counting_video, 16, FrameSampling(num_frames=100))
    assert frame_numbers(frames).tolist() == list(range(NUM_FRAMES))


@pytest.mark.parametrize("image_size", [16, 20, 24, 48])
def test_any_image_size_gives_rgb_frames(tmp_path, image_size):
    # 16, 24 and 48 hit a decord bug (padded rows read as extra channels) that load_frames undoes.
    frames = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    frames[:, :, :16] = PALETTE["red"]
    frames[:, :, 16:] = PALETTE["blue"]
    write_mp4(tmp_path / "halves.mp4", frames, fps=VIDEO_FPS)
    decoded, _ = load_frames(tmp_path / "halves.mp4", image_size, FrameSampling(num_frames=2))
    assert decoded.shape == (2, image_size, image_size, 3)
    np.testing.assert_allclose(decoded[:, :, 1], np.broadcast_to(PALETTE["red"], (2, image_size, 3)), atol=12)
    np.testing.assert_allclose(decoded[:, :, -2], np.broadcast_to(PALETTE["blue"], (2, image_size, 3)), atol=12)


def test_broken_fps_metadata_falls_back(counting_video, monkeypatch):
    class ZeroFps(decord.VideoReader):
        def get_avg_fps(self):
            return 0.0

    class NoTiming(ZeroFps):
        def get_frame_timestamp(self, idx):
            raise decord.DECORDError("no timestamps")

    monkeypatch.setattr(decord, "VideoReader", ZeroFps)  # fps estimated from frame times
    frames, timestamps = load_frames(counting_video, 32, FrameSampling(fps=1.0))
    assert frame_numbers(frames).tolist() == [2, 6, 10, 14, 18, 22, 26]
    monkeypatch.setattr(decord, "VideoReader", NoTiming)  # no rate at all: counts still work
    frames, timestamps = load_frames(counting_video, 32, FrameSampling(num_frames=3))
    assert frame_numbers(frames).tolist() == [5, 15, 25] and timestamps.tolist() == [5, 15, 25]
    with pytest.raises(VideoError, match="frame rate unknown"):
        load_frames(counting_video, 32, FrameSampling(fps=1.0))


@pytest.mark.parametrize("content, reason", [
    (None, "not found"),
    (b"", "empty"),
    (bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)), "cannot decode"),
])
def test_unreadable_videos_raise_video_error(tmp_path, content, reason):
    path = tmp_path / "bad.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VideoError, match=reason) as err:
        load_frames(path, 32, FrameSampling())
    assert str(path) in str(err.value)


def test_truncated_video_raises_video_error(tmp_path, counting_video):
    path = tmp_path / "cut.mp4"
    path.write_bytes(counting_video.read_bytes()[: counting_video.stat().st_size // 2])
    with pytest.raises(VideoError, match="cut.mp4"):
        load_frames(path, 32, FrameSampling())


# ---- records ----

def good_record(**changes):
    record = {"problem_id": "q1", "videos": ["videos/a.mp4"], "problem": "What colour is the first scene?",
              "options": ["red", "green", "blue", "cyan"], "problem_type": "multiple_choice",
              "reasoning": "Scene 1 is red.", "answer": "<answer>A</answer>", "category": "first"}
    record.update(changes)
    return {k: v for k, v in record.items() if v is not ...}  # `...` deletes a field


def write_records(folder, *lines) -> str:
    (folder / "videos").mkdir(exist_ok=True)
    (folder / "videos" / "a.mp4").write_bytes(b"only its existence is checked here")
    path = folder / "train.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_load_records_normalises_answers_and_keeps_labels(tmp_path):
    path = write_records(
        tmp_path,
        good_record(duration_s=12.0, duration="medium"),
        "",  # blank lines are ignored
        good_record(problem_id=7, videos="videos/a.mp4", answer="blue", subtitles="hello"),
        good_record(problem_id="q3", problem_type="numerical", options=..., answer=2.5),
        good_record(problem_id="q4", problem_type="free_form", options=[], answer="a red ball"),
    )
    first, second, third, fourth = load_records(path)
    assert first.video == str(tmp_path / "videos" / "a.mp4")
    assert first.answer == "A" and first.labels == {"category": "first", "duration": "medium"}
    assert (second.problem_id, second.answer, second.subtitles) == ("7", "C", "hello")
    assert (third.answer, third.options) == ("2.5", [])
    assert fourth.answer == "a red ball"


@pytest.mark.parametrize("record, field, message", [
    (good_record(problem=...), "problem", "missing"),
    (good_record(options="red, green"), "options", "expected list"),
    (good_record(problem_type="essay"), "problem_type", "'essay' is not one of"),
    (good_record(answer="E"), "answer", "'E' is not one of the 4 options (A-D)"),
    (good_record(answer="purple"), "answer", "neither a letter nor the text"),
    (good_record(options=[]), "options", "empty"),
    (good_record(problem_type="numerical", options=[], answer="many"), "answer", "not a number"),
    (good_record(videos="videos/missing.mp4"), "videos", "video file not found"),
    (good_record(problem_id="q0"), "problem_id", "duplicate 'q0' (first on line 1)"),
])
def test_bad_record_names_file_line_and_field(tmp_path, record, field, message):
    path = write_records(tmp_path, good_record(problem_id="q0"), "", record)
    with pytest.raises(RecordError) as err:
        load_records(path)
    assert (err.value.line, err.value.field) == (3, field)
    assert str(err.value).startswith(f"{path} line 3, field '{field}': ")
    assert message in str(err.value)


def test_bad_json_names_file_and_line(tmp_path):
    path = write_records(tmp_path, good_record(), '{"problem_id": "q2", ')
    with pytest.raises(RecordError, match=r"train.jsonl line 2: invalid JSON"):
        load_records(path)


def test_skip_bad_keeps_good_records_and_reports_each_bad_one(tmp_path, caplog):
    path = write_records(tmp_path, good_record(), "not json", good_record(problem_id="q2", answer="Z"),
                         good_record(problem_id="q3"))
    records = load_records(path, skip_bad=True)
    assert [r.problem_id for r in records] == ["q1", "q3"]
    assert "skipped 2 of 4 records" in caplog.text and "line 2" in caplog.text and "line 3" in caplog.text
    _, errors = load_records_report(path)
    assert [(e.line, e.field) for e in errors] == [(2, None), (3, "answer")]


def test_data_root_overrides_the_files_folder(tmp_path):
    path = write_records(tmp_path, good_record())
    other = tmp_path / "elsewhere"
    other.mkdir()
    with pytest.raises(RecordError, match="video file not found"):
        load_records(path, data_root=other)


# ---- prompt ----

def test_build_prompt_multiple_choice():
    record = Record("q", "v.mp4", "What colour is the first scene?", ["red", "green"], "multiple_choice",
                    "", "A")
    before, after = build_prompt(record)
    assert before == ""  # the video opens the user's turn
    assert after == data.THINKING_PROMPT.format(question="What colour is the first scene?\nA. red\nB. green")
    assert after.startswith("You are a helpful assistant.") and after.endswith(" Question: What colour is the "
                                                                              "first scene?\nA. red\nB. green")


def test_build_prompt_free_form_with_subtitles():
    record = Record("q", "v.mp4", "What happens?", [], "free_form", "", "a goal")
    _, after = build_prompt(record, subtitles="GOAL!")
    assert after == ("This video's subtitles are listed below:\nGOAL!\n\n"
                     + data.THINKING_PROMPT.format(question="What happens?"))


# ---- subtitles ----

SRT = ("\ufeff1\r\n00:00:01,000 --> 00:00:03,000\r\n<i>Hello</i> there\r\n\r\n"
       "2\r\n00:00:02,500 --> 00:00:05,000\r\nan overlapping {\\an8}cue\r\n"  # no blank line after it
       "3\r\n00:00:06,000 --> later\r\nlost with its cue\r\n\r\n"            # bad timing: skipped
       "4\r\n00:00:09,000 --> 00:00:08,000\r\nbackwards\r\n\r\n"              # ends before it starts: skipped
       "5\r\n00:01:00.5 --> 00:01:02,000 X1:0 Y1:0\r\n42\r\nsecond line\r\n")  # "." for ",", a numeric line


def test_parse_srt_is_tolerant():
    cues, skipped = parse_srt(SRT)
    assert cues == [Cue(1.0, 3.0, "Hello there"), Cue(2.5, 5.0, "an overlapping cue"),
                    Cue(60.5, 62.0, "42 second line")]
    assert skipped == 2
    assert parse_srt("") == ([], 0)


def test_subtitles_for_window_keeps_overlapping_cues_in_time_order():
    cues = [Cue(10, 12, "late"), Cue(0, 2, "early"), Cue(4, 6, "middle"), Cue(5, 7, "middle"), Cue(3, 3.5, "gap")]
    assert subtitles_for_window(cues, 3.2, 5.5) == "gap\nmiddle"   # the repeated rolling caption once
    assert subtitles_for_window(cues, 2.0, 4.0) == "early\ngap\nmiddle"  # touching the edges counts
    assert subtitles_for_window(cues, 20, 30) == ""


def test_srt_paths_are_resolved_on_load_and_read_when_used(tmp_path, capsys):
    (tmp_path / "subs").mkdir()
    (tmp_path / "subs" / "v.srt").write_text(SRT, encoding="utf-8")
    path = write_records(tmp_path, good_record(problem_id="srt", subtitles="subs/v.srt"),
                         good_record(problem_id="inline", subtitles="inline words"), good_record(problem_id="none"),
                         good_record(problem_id="missing", subtitles="subs/missing.srt"))
    srt, inline, none, missing = load_records(path)  # a missing .srt is found when it is read, not here
    assert srt.subtitles == str(tmp_path / "subs" / "v.srt")
    assert subtitle_text(srt, np.array([2.0, 3.0, 4.0])) == "Hello there\nan overlapping cue"
    assert subtitle_text(srt) == "Hello there\nan overlapping cue\n42 second line"  # no frame times: all cues
    assert subtitle_text(inline, np.array([0.0])) == "inline words"
    assert subtitle_text(none) is None
    with pytest.raises(VideoError, match="missing.srt"):
        subtitle_text(missing, np.array([0.0]))
    assert data.main(["check", path]) == 1  # check looks for the files: the missing one is an error there
    assert "train.jsonl line 4, field 'subtitles': subtitle file not found" in capsys.readouterr().out


def test_frame_timestamps_match_the_decoded_frames(counting_video):
    for sampling in (FrameSampling(num_frames=5), FrameSampling(fps=1.0)):
        _, decoded = load_frames(counting_video, 32, sampling)
        np.testing.assert_array_equal(frame_timestamps(counting_video, sampling), decoded)


def test_format_response_round_trip():
    response = format_response("Scene 1 is red.", "A")
    assert response == "<think>Scene 1 is red.</think><answer>A</answer>"
    think, answer = re.fullmatch(r"<think>(.*)</think><answer>(.*)</answer>", response).groups()
    assert (think, answer) == ("Scene 1 is red.", "A")
    assert [option_letter(i) for i in (0, 1, 25)] == ["A", "B", "Z"]


# ---- the synthetic task ----

@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert data.main(["synth", "--out", str(out), "--n", "6", "--seed", "1"]) == 0
    return out


def expected_answer(category: str, problem: str, scenes: list[str]) -> str:
    """The answer worked out again from the scene list, independently of data.ask."""
    colour = re.search(r"\b(" + "|".join(PALETTE) + r")\b", problem)
    if category == "count":
        return str(scenes.count(colour.group(1)))
    if category == "after":
        return scenes[scenes.index(colour.group(1)) + 1]
    return scenes[0] if category == "first" else scenes[-1]


def test_synth_is_deterministic_by_seed(synth_dir, tmp_path):
    data.main(["synth", "--out", str(tmp_path / "again"), "--n", "6", "--seed", "1"])
    data.main(["synth", "--out", str(tmp_path / "other"), "--n", "6", "--seed", "2"])
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "again" / name).read_bytes() == (synth_dir / name).read_bytes()
    assert (tmp_path / "other" / "train.jsonl").read_bytes() != (synth_dir / "train.jsonl").read_bytes()


def test_synth_records_answers_and_videos_agree(synth_dir):
    train, test = load_records(synth_dir / "train.jsonl"), load_records(synth_dir / "test.jsonl")
    assert (len(train), len(test)) == (5, 1)
    assert not {r.video for r in train} & {r.video for r in test}
    assert {r.labels["category"] for r in train + test} == set(data.QUESTION_TYPES)
    for r in train + test:
        scenes = re.findall(r"Scene \d+ is (\w+)\.", r.reasoning)
        truth = r.options[ord(r.answer) - ord("A")]
        assert truth == expected_answer(r.labels["category"], r.problem, scenes), r
        conclusion = r.reasoning.split(". ")[-1]  # after the scene-by-scene walk
        assert re.search(rf"(is|are) {truth}\b", conclusion), conclusion
        k = len(scenes)
        assert r.labels["duration"] == ("short" if k <= 4 else "medium" if k <= 6 else "long")
        # One frame from the middle of each scene shows that scene's colour.
        frames, _ = load_frames(r.video, 64, FrameSampling(num_frames=len(scenes)))
        palette = np.array(list(PALETTE.values()))
        means = frames.reshape(len(frames), -1, 3).mean(axis=1)
        seen = [list(PALETTE)[np.argmin(np.abs(palette - m).sum(axis=1))] for m in means]
        assert seen == scenes


def test_check_command(synth_dir, tmp_path, capsys):
    assert data.main(["check", str(synth_dir / "train.jsonl")]) == 0
    assert "5 good records, 0 bad" in capsys.readouterr().out
    bad = write_records(tmp_path, good_record(), good_record(answer="E"))
    assert data.main(["check", bad]) == 1
    assert data.main(["check", bad, "--skip-bad"]) == 0


def test_frames_command(counting_video, capsys):
    assert data.main(["frames", str(counting_video), "--fps", "1", "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "30 frames at 4 fps" in out and "[ 2,  6, 10, 14, 18, 22, 26]" in out and "(7, 32, 32, 3)" in out


def test_synth_open_answers_ask_the_same_questions_without_options(synth_dir, tmp_path):
    data.main(["synth", "--out", str(tmp_path / "open"), "--n", "6", "--seed", "1", "--answers", "open"])
    choice = data.load_records(synth_dir / "train.jsonl") + data.load_records(synth_dir / "test.jsonl")
    open_ = data.load_records(tmp_path / "open" / "train.jsonl") + data.load_records(tmp_path / "open" / "test.jsonl")
    for c, o in zip(choice, open_):
        assert (o.problem, o.reasoning, o.labels["category"]) == (c.problem, c.reasoning, c.labels["category"])
        assert o.options == [] and o.answer == c.options[ord(c.answer) - ord("A")]
        assert o.problem_type == ("numerical" if o.labels["category"] == "count" else "free_form")
        assert o.answer in o.reasoning.rsplit(".", 2)[-2]  # the last sentence derives the answer
