"""Tests for data.py and for video.py's frame sampling: real mp4 files written with synth.write_mp4 and read back.

The test videos count: frame i is solid gray at level 8 * i, so a frame read one index off is 8 levels
away, far outside the few levels H.264 moves a flat gray.
"""
import bisect
import itertools
import json
import os
import re
import shutil
from fractions import Fraction

import decord
import numpy as np
import pytest

import data
import synth
import video
from data import (Cue, Record, RecordError, build_prompt, format_response, load_records, load_records_report,
                  option_letter, parse_srt, subtitle_text, subtitles_for_window)
from synth import PALETTE, write_mp4
from video import MAX_FRAMES, FrameSampling, VideoError, frame_timestamps, load_frames, sample_indices

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


def frames_showing(video_rate: Fraction, total_frames: int, fps: Fraction) -> list[int]:
    """Written out in exact integers: the frame on screen at each time (k + 0.5) / fps inside the video,
    frame i showing from i / video_rate until the next one starts. Times are counted in units of
    1 / (2 * p * a) s for video_rate = p / q and fps = a / b: frame i starts at 2 * i * q * a, the
    k-th sample is at (2k + 1) * b * p."""
    (p, q), (a, b) = video_rate.as_integer_ratio(), fps.as_integer_ratio()
    starts = [2 * i * q * a for i in range(total_frames)]
    end = 2 * total_frames * q * a
    times = itertools.takewhile(lambda t: t < end, ((2 * k + 1) * b * p for k in itertools.count()))
    return [bisect.bisect_right(starts, t) - 1 for t in times]


@pytest.mark.parametrize("video_rate", [Fraction(30000, 1001), Fraction(25)], ids=["29.97fps", "25fps"])
@pytest.mark.parametrize("fps", [Fraction(2), Fraction(7, 10)], ids=["2fps", "0.7fps"])
def test_fps_at_a_rate_that_does_not_divide_the_videos(video_rate, fps):
    """NTSC's 29.97 fps and PAL's 25 fps sampled at 2 and 0.7 fps, an hour long: a frame rate rounded to
    30, or a time rounded to the nearest frame, lands on another frame within seconds."""
    total = int(3600 * video_rate)
    indices, timestamps = sample_indices(total, float(video_rate), FrameSampling(fps=float(fps)))
    expected = frames_showing(video_rate, total, fps)
    assert len(expected) == int(3600 * fps) and indices.tolist() == expected
    np.testing.assert_allclose(timestamps, [float(i / video_rate) for i in expected], rtol=1e-12)


@pytest.mark.parametrize("video_rate", [Fraction(30000, 1001), Fraction(25)], ids=["29.97fps", "25fps"])
def test_load_frames_fps_from_a_29_97_and_a_25_fps_file(tmp_path, video_rate):
    """The rate comes from the file: 70 frames whose left half is gray 8 * (i % 32) and right half
    8 * (i // 32), sampled at 2 fps."""
    i = np.arange(70)
    frames = np.zeros((70, 32, 32, 3), dtype=np.uint8)
    frames[:, :, :16] = (8 * (i % 32)).astype(np.uint8)[:, None, None, None]
    frames[:, :, 16:] = (8 * (i // 32)).astype(np.uint8)[:, None, None, None]
    write_mp4(tmp_path / "v.mp4", frames, fps=float(video_rate))
    decoded, timestamps = load_frames(tmp_path / "v.mp4", 32, FrameSampling(fps=2.0))
    numbers = frame_numbers(decoded[:, :, 4:12]) + 32 * frame_numbers(decoded[:, :, 20:28])
    expected = frames_showing(video_rate, 70, Fraction(2))
    assert numbers.tolist() == expected
    np.testing.assert_allclose(timestamps, [float(k / video_rate) for k in expected], rtol=1e-6)


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


# ---- records: the public sets' files as they are published (contents invented) ----

LVR_ROWS = [  # LongVideo-Reason's fields and values as released
    {"problem_id": 0, "data_type": "video", "videos": "sports_1.mp4",
     "problem": "Why does the runner stop?\nA. rain\nB. a whistle\nC. a bus\nD. the finish line",
     "problem_type": "multiple choice", "reasoning": "He hears it.", "answer": "<answer>B</answer>"},
    {"problem_id": 1, "data_type": "video", "videos": ["vlog_2.mp4"], "problem": "What does she cook?",
     "problem_type": "general", "reasoning": "Eggs are shown.", "answer": "<answer>an omelette</answer>"},
    {"problem_id": 2, "data_type": "video", "videos": "game_3.mp4",
     "problem": "What happens after the goal?\nOptions:\n(A) a replay\n(B) a foul", "problem_type": "temporal",
     "reasoning": "", "answer": "A", "source": "youtube"},
]
# What each row reads as, written out by hand: problem_id, video, problem, options, form, answer, labels.
LVR_EXPECTED = [
    ("0", "sports_1.mp4", "Why does the runner stop?", ["rain", "a whistle", "a bus", "the finish line"],
     "multiple_choice", "B", {}),
    ("1", "vlog_2.mp4", "What does she cook?", [], "free_form", "an omelette", {}),
    ("2", "game_3.mp4", "What happens after the goal?", ["a replay", "a foul"], "multiple_choice", "A",
     {"source": "youtube", "category": "temporal"}),
]


def write_parquet(path, rows, schema=None):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))  # every row's fields (Arrow reads the first's)
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows], schema=schema), path)
    return path


def write_lvr(folder, layout: str, rows=LVR_ROWS):
    """The rows in one of the layouts the release is published in; returns what --data names."""
    if layout == "jsonl":
        (path := folder / "lvr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif layout == "json":
        (path := folder / "lvr.json").write_text(json.dumps(rows, indent=2))
    elif layout == "folder":  # one indented JSON object per file
        (path := folder / "lvr").mkdir()
        for r in rows:
            (path / f"{r['problem_id']}.json").write_text(json.dumps(r, indent=2))
    else:  # a column holds one type: the one-element `videos` list as its string
        path = write_parquet(folder / "lvr.parquet",
                             [{**r, "videos": r["videos"] if isinstance(r["videos"], str) else r["videos"][0]}
                              for r in rows])
    return path


def as_tuple(r: Record, video_dir) -> tuple:
    return (r.problem_id, os.path.relpath(r.video, video_dir), r.problem, r.options, r.problem_type, r.answer,
            r.labels)


@pytest.mark.parametrize("layout", ["jsonl", "json", "folder", "parquet"])
def test_longvideo_reason_is_read_in_every_published_layout(tmp_path, layout, capsys):
    path = write_lvr(tmp_path, layout)
    records = load_records(path, video_dir=tmp_path / "videos")
    assert [as_tuple(r, tmp_path / "videos") for r in records] == LVR_EXPECTED
    assert capsys.readouterr().err.endswith(f"{path}: 3 records, 0 skipped\n")


@pytest.fixture
def videomme(tmp_path):
    """Video-MME as the Hub lays it out: videomme/test-00000-of-00001.parquet, data/<videoID>.mp4,
    subtitle/<videoID>.srt (one of the two videos has none)."""
    root = tmp_path / "Video-MME"
    rows = []
    for v, (video_id, duration) in enumerate([("fFjv93ACGo8", "short"), ("k0aYt2Hq9aA", "long")]):
        for q in range(2):
            rows.append({"video_id": f"00{v + 1}", "duration": duration, "domain": "Knowledge",
                         "sub_category": "Humanity & History", "url": f"https://www.youtube.com/watch?v={video_id}",
                         "videoID": video_id, "question_id": f"00{v + 1}-{q + 1}", "task_type": "Counting Problem",
                         "question": f"Question {q} about video {v}?",
                         "options": ["A. one", "B. two", "C. three", "D. four"], "answer": "ABCD"[v + 2 * q]})
    write_parquet(root / "videomme" / "test-00000-of-00001.parquet", rows)
    (root / "data").mkdir()
    (root / "subtitle").mkdir()
    (root / "subtitle" / "fFjv93ACGo8.srt").write_text("1\n00:00:00,000 --> 00:00:05,000\nHello there\n")
    return root, rows


def test_videomme_parquet_is_read_with_its_videos_and_subtitles(videomme):
    root, rows = videomme
    records = load_records(root / "videomme" / "test-00000-of-00001.parquet")
    assert [r.problem_id for r in records] == ["001-1", "001-2", "002-1", "002-2"]
    assert [r.answer for r in records] == ["A", "C", "B", "D"]
    for r, row in zip(records, rows):
        assert r.video == str(root / "data" / f"{row['videoID']}.mp4") and r.problem == row["question"]
        assert r.options == ["one", "two", "three", "four"] and r.problem_type == "multiple_choice"
        assert r.labels == {"duration": row["duration"], "domain": "Knowledge",
                            "sub_category": "Humanity & History", "task_type": "Counting Problem"}
    assert [r.subtitles for r in records] == [str(root / "subtitle" / "fFjv93ACGo8.srt")] * 2 + [None] * 2


def lvr_jsonl(*rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


GOOD = dict(LVR_ROWS[0], problem_id=7)  # a good row with a new id
# Hostile files: (file name, its bytes, problem_ids read, [(row, field, part of the message)])
HOSTILE = {
    "non-UTF-8": ("a.jsonl", lvr_jsonl(LVR_ROWS[0]) + json.dumps(LVR_ROWS[1]).encode().replace(b"she", b"sh\xff")
                  + b"\n" + lvr_jsonl(LVR_ROWS[2]), ["0", "2"], [(2, None, "not UTF-8 text (byte 0xff)")]),
    "truncated line": ("a.jsonl", lvr_jsonl(*LVR_ROWS)[:-30], ["0", "1"], [(3, None, "invalid JSON")]),
    "truncated list": ("a.json", json.dumps(LVR_ROWS, indent=2).encode()[:-30], ["0", "1"],
                       [(json.dumps(LVR_ROWS, indent=2).count("\n", 0, json.dumps(LVR_ROWS, indent=2).index(
                           '"problem_id": 2')), None, "invalid JSON")]),
    "empty file": ("a.jsonl", b"", [], [(None, None, "holds no records")]),
    "option-less multiple choice": ("a.jsonl", lvr_jsonl(dict(GOOD, problem="Why does he stop?"), LVR_ROWS[1]),
                                    ["1"], [(1, "problem", "no options, but problem_type is 'multiple choice'")]),
    "answer outside the tags": ("a.jsonl", lvr_jsonl(dict(GOOD, answer="B <answer>C</answer>"), LVR_ROWS[1]),
                                ["1"], [(1, "answer", "text outside one <answer>...</answer> pair")]),
    "answer not an option": ("a.jsonl", lvr_jsonl(dict(GOOD, answer="<answer>E</answer>")), [],
                             [(1, "answer", "'E' is not one of the 4 options (A-D)")]),
    "../ path": ("a.jsonl", lvr_jsonl(LVR_ROWS[1], dict(GOOD, videos="clips/../../secret.mp4")), ["1"],
                 [(2, "videos", "leads outside")]),
    "absolute path": ("a.jsonl", lvr_jsonl(dict(GOOD, videos="/etc/secret.mp4")), [],
                      [(1, "videos", "absolute path '/etc/secret.mp4'; pass --allow-absolute-paths")]),
    "../ subtitles": ("a.jsonl", lvr_jsonl(dict(GOOD, subtitles="../x.srt")), [], [(1, "subtitles", "leads outside")]),
    "duplicate id": ("a.jsonl", lvr_jsonl(LVR_ROWS[0], LVR_ROWS[0]), ["0"],
                     [(2, "problem_id", "duplicate '0' (first on line 1)")]),
    "unknown data_type": ("a.jsonl", lvr_jsonl(dict(GOOD, data_type="audio")), [],
                          [(1, "data_type", "'audio' is not one of text, image, video")]),
    "data_type not the file's": ("a.jsonl", lvr_jsonl(dict(GOOD, data_type="image")), [],
                                 [(1, "data_type", "'image', but the row has a video")]),
    "video type, no video": ("a.jsonl", lvr_jsonl({k: v for k, v in GOOD.items() if k != "videos"}), [],
                             [(1, "data_type", "'video', but the row has no videos and no images")]),
    "images and videos": ("a.jsonl", lvr_jsonl(dict(GOOD, images="a.png"), LVR_ROWS[1]), ["1"],
                          [(1, "images", "both images and videos is not supported")]),
    "two images": ("a.jsonl", lvr_jsonl(dict(GOOD, videos=[], data_type="image", images=["a.png", "b.png"])), [],
                   [(1, "images", "expected one path")]),
    "subtitles on an image": ("a.jsonl", lvr_jsonl(dict(GOOD, videos=None, data_type="image", images="a.png",
                                                        subtitles="hi")), [],
                              [(1, "subtitles", "only a video record has subtitles")]),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_bad_rows_are_skipped_and_named_by_file_line_and_field(tmp_path, case, capsys):
    name, content, good_ids, expected = HOSTILE[case]
    (path := tmp_path / name).write_bytes(content)
    records, errors = load_records_report(path)
    assert [r.problem_id for r in records] == good_ids
    assert [(e.line, e.field) for e in errors] == [(line, field) for line, field, _ in expected]
    for e, (line, field, message) in zip(errors, expected):
        where = f"{path} line {line}" if line is not None else str(path)
        assert str(e).startswith(where + (f", field '{field}': " if field else ": ")) and message in str(e)
    if good_ids:  # not fatal by default; --strict stops at the first
        assert [r.problem_id for r in load_records(path)] == good_ids
        assert f"{path}: {len(good_ids)} records, {len(errors)} skipped" in capsys.readouterr().err
    else:
        with pytest.raises(RecordError, match="no usable records"):
            load_records(path)
    with pytest.raises(RecordError) as first:
        load_records(path, strict=True)
    assert str(first.value) == str(errors[0])


def test_absolute_paths_are_read_only_when_allowed(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(lvr_jsonl(dict(GOOD, videos="/data/clips/a.mp4")))
    record, = load_records(path, allow_absolute_paths=True)
    assert record.video == "/data/clips/a.mp4"


def test_videomme_hostile_files(videomme, tmp_path):
    root, rows = videomme
    missing_column = write_parquet(tmp_path / "no_answer.parquet", [{k: v for k, v in r.items() if k != "answer"}
                                                                     for r in rows])
    records, errors = load_records_report(missing_column)
    assert records == [] and [(e.line, e.field) for e in errors] == [(i, "answer") for i in range(4)]
    assert str(errors[3]) == f"{missing_column} row 3, field 'answer': missing"
    import pyarrow.parquet as pq
    schema = pq.read_schema(root / "videomme" / "test-00000-of-00001.parquet")
    empty = write_parquet(tmp_path / "empty.parquet", [], schema=schema)
    assert [str(e) for e in load_records_report(empty)[1]] == [f"{empty}: holds no records"]
    escape = write_parquet(tmp_path / "escape.parquet", [dict(rows[0], videoID="../../x")])
    assert [(e.line, e.field) for e in load_records_report(escape)[1]] == [(0, "videoID")]
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not a parquet file")
    assert "cannot read the parquet file" in str(load_records_report(broken)[1][0])


def test_other_string_fields_are_labels_and_numbers_are_checked(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(lvr_jsonl(dict(GOOD, duration="medium", duration_s=12.0),
                               dict(GOOD, problem_id=8, problem_type="numerical", problem="How many?", answer=2.5),
                               dict(GOOD, problem_id=9, problem_type="numerical", problem="How many?", answer="many"),
                               dict(GOOD, problem_id=10, options=["A. red", "B. green"], problem="Which?",
                                    answer="green")))
    records, errors = load_records_report(path)
    assert [(r.problem_id, r.answer, r.labels) for r in records] == [
        ("7", "B", {"duration": "medium"}), ("8", "2.5", {}), ("10", "B", {})]
    assert records[2].options == ["red", "green"] and records[1].problem_type == "numerical"
    assert [(e.line, e.field) for e in errors] == [(3, "answer")] and "'many' is not a number" in str(errors[0])


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


def test_build_prompt_names_the_image_or_nothing_for_image_and_text_questions():
    image = Record("q", None, "What colour?", [], "free_form", "", "red", image="/d/p.png")
    text = Record("q", None, "What is 2 + 3?", [], "numerical", "", "5")
    thinking = "Please first think deeply about the question{} and then provide the final answer."
    assert thinking.format(" based on the given image,") in build_prompt(image)[1]
    assert thinking.format(",") in build_prompt(text)[1] and "video" not in build_prompt(text)[1]
    assert build_prompt(text, template="Question: {question}")[1] == "Question: What is 2 + 3?"


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
    (path := tmp_path / "train.jsonl").write_bytes(lvr_jsonl(
        dict(GOOD, problem_id="srt", subtitles="subs/v.srt"), dict(GOOD, problem_id="inline", subtitles="inline words"),
        dict(GOOD, problem_id="none"), dict(GOOD, problem_id="missing", subtitles="subs/missing.srt")))
    srt, inline, none, missing = load_records(path)  # a missing .srt is found when it is read, not here
    assert srt.subtitles == str(tmp_path / "subs" / "v.srt")
    assert subtitle_text(srt, np.array([2.0, 3.0, 4.0])) == "Hello there\nan overlapping cue"
    assert subtitle_text(srt) == "Hello there\nan overlapping cue\n42 second line"  # no frame times: all cues
    assert subtitle_text(inline, np.array([0.0])) == "inline words"
    assert subtitle_text(none) is None
    with pytest.raises(VideoError, match="missing.srt"):
        subtitle_text(missing, np.array([0.0]))
    assert data.main(["check", str(path)]) == 1  # check looks for the files: the missing one is an error there
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
    assert synth.main(["--out", str(out), "--n", "6", "--seed", "1"]) == 0
    return out


def expected_answer(category: str, problem: str, scenes: list[str]) -> str:
    """The answer worked out again from the scene list, independently of synth.ask."""
    colour = re.search(r"\b(" + "|".join(PALETTE) + r")\b", problem)
    if category == "count":
        return str(scenes.count(colour.group(1)))
    if category == "after":
        return scenes[scenes.index(colour.group(1)) + 1]
    return scenes[0] if category == "first" else scenes[-1]


def test_synth_is_deterministic_by_seed(synth_dir, tmp_path):
    synth.main(["--out", str(tmp_path / "again"), "--n", "6", "--seed", "1"])
    synth.main(["--out", str(tmp_path / "other"), "--n", "6", "--seed", "2"])
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "again" / name).read_bytes() == (synth_dir / name).read_bytes()
    assert (tmp_path / "other" / "train.jsonl").read_bytes() != (synth_dir / "train.jsonl").read_bytes()


def test_synth_records_answers_and_videos_agree(synth_dir):
    train, test = load_records(synth_dir / "train.jsonl"), load_records(synth_dir / "test.jsonl")
    assert (len(train), len(test)) == (5, 1)
    assert not {r.video for r in train} & {r.video for r in test}
    assert {r.labels["category"] for r in train + test} == set(synth.QUESTION_TYPES)
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
    rows = [json.loads(line) for line in (synth_dir / "train.jsonl").read_text().splitlines()]
    (bad := tmp_path / "bad.jsonl").write_bytes(lvr_jsonl(
        *rows[:2], dict(rows[2], answer="<answer>E</answer>"), dict(rows[3], videos="videos/gone.mp4")))
    (tmp_path / "videos").symlink_to(synth_dir / "videos")
    assert data.main(["check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"error: {bad} line 3, field 'answer': 'E' is not one of the 4 options" in out
    assert f"unreadable         {tmp_path / 'videos' / 'gone.mp4'}: video file not found" in out
    assert "3 good records, 1 bad" in out and "3 videos: 1 missing or unreadable (1 record)" in out
    assert data.main(["check", str(bad), "--skip-bad"]) == 0


def test_check_reads_videomme_as_downloaded(videomme, counting_video, capsys):
    root, _ = videomme
    shutil.copy(counting_video, root / "data" / "fFjv93ACGo8.mp4")  # k0aYt2Hq9aA could not be downloaded
    assert data.main(["check", str(root / "videomme" / "test-00000-of-00001.parquet")]) == 1
    out = capsys.readouterr().out
    assert "4 good records, 0 bad" in out and "duration long: 2" in out and "task_type Counting Problem: 4" in out
    assert "2 videos: 1 missing or unreadable (2 records)" in out


def test_synth_writes_the_longvideo_reason_release_format(synth_dir):
    for line in (synth_dir / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert type(row["problem_id"]) is int and row["data_type"] == "video"
        assert row["problem_type"] == "multiple choice" and re.fullmatch(r"<answer>[A-D]</answer>", row["answer"])
        assert re.fullmatch(r"[^\n]+\?\nA\. \w+\nB\. \w+\nC\. \w+\nD\. \w+", row["problem"])
        assert (synth_dir / row["videos"]).is_file() and "options" not in row


def test_frames_command(counting_video, capsys):
    assert data.main(["frames", str(counting_video), "--fps", "1", "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "30 frames at 4 fps" in out and "[ 2,  6, 10, 14, 18, 22, 26]" in out and "(7, 32, 32, 3)" in out


def test_synth_open_answers_ask_the_same_questions_without_options(synth_dir, tmp_path):
    synth.main(["--out", str(tmp_path / "open"), "--n", "6", "--seed", "1", "--answers", "open"])
    choice = data.load_records(synth_dir / "train.jsonl") + data.load_records(synth_dir / "test.jsonl")
    open_ = data.load_records(tmp_path / "open" / "train.jsonl") + data.load_records(tmp_path / "open" / "test.jsonl")
    for c, o in zip(choice, open_):
        assert (o.problem, o.reasoning, o.labels["category"]) == (c.problem, c.reasoning, c.labels["category"])
        assert o.options == [] and o.answer == c.options[ord(c.answer) - ord("A")]
        assert o.problem_type == ("numerical" if o.labels["category"] == "count" else "free_form")
        assert o.answer in o.reasoning.rsplit(".", 2)[-2]  # the last sentence derives the answer


# ---- videos found before a run; the training scripts on the release format ----

def test_check_videos_open_finds_missing_and_broken_videos_and_caches_the_rest(counting_video, tmp_path,
                                                                                monkeypatch):
    shutil.copy(counting_video, good := tmp_path / "good.mp4")
    (broken := tmp_path / "broken.mp4").write_bytes(b"\x00not a video" * 100)
    paths, cache = [str(good), str(broken), str(tmp_path / "gone.mp4")], tmp_path / "check.json"
    found = video.check_videos_open(paths, cache)
    assert found[str(good)] is None and found[paths[2]] == f"{paths[2]}: video file not found"
    assert found[str(broken)].startswith(f"{broken}: cannot decode video")
    video.save_video_check(cache, found)
    opened = []
    monkeypatch.setattr(video, "_open_problem", lambda path: opened.append(path))
    assert video.check_videos_open(paths, cache) == found and opened == []  # a restart opens nothing again
    broken.write_bytes(b"\x00not a video, changed" * 100)
    assert video.check_videos_open(paths, cache)[str(broken)] is None and opened == [str(broken)]


@pytest.fixture(scope="module")
def release_parquet(synth_dir, tmp_path_factory):
    """The synthetic training set as a LongVideo-Reason parquet file, its videos named "<name>.mp4" in a
    folder of their own; one more row whose video could not be downloaded, and a bad row."""
    rows = [json.loads(line) for line in (synth_dir / "train.jsonl").read_text().splitlines()]
    rows = [dict(r, videos=os.path.basename(r["videos"])) for r in rows]
    rows += [dict(rows[0], problem_id=100, videos="gone.mp4"), dict(rows[1], problem_id=101, answer="<answer>E</answer>")]
    return write_parquet(tmp_path_factory.mktemp("lvr") / "train.parquet", rows), synth_dir / "videos"


def test_sft_and_rl_train_on_the_release_skipping_bad_rows_and_missing_videos(release_parquet, tiny_checkpoint,
                                                                              tmp_path, capsys):
    import rl
    import sft
    path, videos = release_parquet
    common = ["--init", str(tiny_checkpoint), "--data", str(path), "--video-dir", str(videos), "--steps", "1",
              "--num-frames", "4", "--save-every", "0"]
    sft.main(common + ["--out", str(tmp_path / "sft"), "--batch-size", "5"])
    err = capsys.readouterr().err
    assert f"skipped: {path} row 6, field 'answer': 'E' is not one of the 4 options" in err
    assert f"{path}: 6 records, 1 skipped" in err
    assert f"{path}: 5 records with a readable video or image (or none); skipped 1 whose file is missing, 0 whose file cannot" in err
    assert len((tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()) == 1
    assert video.video_check_file(path).is_file()
    rl.main(common + ["--out", str(tmp_path / "rl"), "--batch-size", "2", "--group-size", "2",
                      "--max-new-tokens", "4", "--kl-coef", "0", "--engine", "torch"])
    assert len((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_run_with_fewer_usable_records_than_a_batch_stops_saying_what_was_lost(release_parquet):
    import argparse
    import mrsp
    import train
    path, videos = release_parquet
    args = argparse.Namespace(data=str(path), video_dir=str(videos), subtitle_dir=None, allow_absolute_paths=False,
                              strict=False, batch_size=5)
    assert [r.problem_id for r in train.load_training_records(args, mrsp.ParallelState())] == ["0", "1", "2", "3", "4"]
    with pytest.raises(RecordError, match=r"5 usable records, fewer than one batch \(6 on each of 1 data-parallel "
                                          r"ranks\): 1 bad rows, 1 records whose video or image is missing, 0 whose"):
        train.load_training_records(argparse.Namespace(**{**vars(args), "batch_size": 6}), mrsp.ParallelState())
    with pytest.raises(RecordError, match="row 6, field 'answer'"):
        train.load_training_records(argparse.Namespace(**{**vars(args), "strict": True}), mrsp.ParallelState())


# ---- image and text records beside videos ----

def write_image(path, mode: str, size=(40, 30), **save):
    """An image file in a PIL mode: its pixels a gradient, so a resize has work to do."""
    from PIL import Image
    ramp = np.add.outer(np.arange(size[1]), np.arange(size[0])).astype(np.uint16) * 3
    if mode == "I;16":
        image = Image.fromarray((ramp * 257).astype(np.uint16))
    else:
        image = Image.fromarray(np.stack([ramp % 256, (2 * ramp) % 256, 255 - ramp % 256], -1).astype(np.uint8))
        image = image.convert(mode) if mode != "P" else image.quantize(16)
    image.save(path, **save)
    return path


MIXED = [  # a text question, an image question (release fields), and a video question with data_type absent
    {"problem_id": "t1", "data_type": "text", "problem": "What is 3 + 4?", "problem_type": "numerical",
     "reasoning": "3 + 4 = 7.", "answer": "<answer>7</answer>"},
    {"problem_id": "i1", "data_type": "image", "images": ["pic.png"], "problem": "Which colour?\nA. red\nB. blue",
     "problem_type": "multiple choice", "answer": "B"},
    dict(LVR_ROWS[0], problem_id="v1"),
]


def test_text_image_and_video_records_are_read_with_their_kind(tmp_path):
    (path := tmp_path / "mixed.jsonl").write_bytes(lvr_jsonl(*MIXED))
    records, errors = load_records_report(path)
    assert errors == []
    assert [(r.problem_id, r.data_type) for r in records] == [("t1", "text"), ("i1", "image"), ("v1", "video")]
    assert [r.video for r in records] == [None, None, str(tmp_path / "sports_1.mp4")]
    assert [r.image for r in records] == [None, str(tmp_path / "pic.png"), None]
    assert [r.media for r in records] == [None, str(tmp_path / "pic.png"), str(tmp_path / "sports_1.mp4")]
    assert records[0].answer == "7" and records[1].options == ["red", "blue"] and records[1].answer == "B"


def test_load_image_resizes_bicubic_as_pil_does(tmp_path):
    from PIL import Image
    path = write_image(tmp_path / "a.png", "RGB")
    got = video.load_image(path, 32)
    expected = np.asarray(Image.open(path).resize((32, 32), Image.Resampling.BICUBIC))   # [32, 32, 3]
    assert got.shape == (1, 32, 32, 3) and got.dtype == np.uint8
    assert np.array_equal(got[0], expected)
    grey = write_image(tmp_path / "g.png", "L")  # one channel repeated three times
    assert np.array_equal(video.load_image(grey, 8)[0], np.repeat(np.asarray(
        Image.open(grey).resize((8, 8), Image.Resampling.BICUBIC))[..., None], 3, axis=-1))


def test_check_names_images_that_cannot_be_read(tmp_path, capsys):
    """Missing, corrupt (cut short), CMYK, 16-bit and palette images: each named, its record counted bad."""
    write_image(tmp_path / "pic.png", "RGB")
    write_image(tmp_path / "cmyk.jpg", "CMYK")
    write_image(tmp_path / "deep.png", "I;16")
    write_image(tmp_path / "palette.png", "P")
    whole = write_image(tmp_path / "whole.png", "RGB", size=(64, 64)).read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[:len(whole) // 2])
    rows = [MIXED[0], MIXED[1]] + [dict(MIXED[1], problem_id=name, images=name) for name in
                                    ("gone.png", "cut.png", "cmyk.jpg", "deep.png", "palette.png")]
    (path := tmp_path / "mixed.jsonl").write_bytes(lvr_jsonl(*rows))
    assert data.main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "7 good records, 0 bad" in out and "data_type image: 6" in out and "data_type text: 1" in out
    for line in (f"{tmp_path / 'gone.png'}: image file not found", f"{tmp_path / 'cut.png'}: cannot read the image",
                 f"{tmp_path / 'cmyk.jpg'}: pixel mode CMYK is not read", f"{tmp_path / 'deep.png'}: pixel mode I;16",
                 f"{tmp_path / 'palette.png'}: pixel mode P is not read"):
        assert f"unreadable         {line}" in out
    assert "6 images: 5 missing or unreadable (5 records)" in out
    assert data.main(["check", str(path), "--skip-bad"]) == 0
