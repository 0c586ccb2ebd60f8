"""Tests for video.py's readers: the reader chosen per file (PyAV for sparse seeks, decord otherwise), the
other where the first cannot (AV1, open-GOP HEVC).

Every video here is a real file written with PyAV's encoders. A test video numbers its frames: frame i is
gray level 8 * (i % 32) on its left half and 8 * (i // 32) + 4 on its right half, so every decoded frame
says which frame it is (a frame one off is 8 levels away on one side).
"""
import json
import logging
import os
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import decord
import numpy as np
import pytest

import data
import video
from video import DecordReader, FrameSampling, PyAVReader, VideoError, load_frames, read_video, sample_indices

ROOT = Path(__file__).resolve().parents[1]
FPS = 10.0
NUM_FRAMES = 60
# Short GOPs (a keyframe every 8 frames) and B-frames, so that reading seeks and reorders.
CODECS = {
    "h264": ("libx264", {"g": "8", "bf": "2"}),
    "hevc": ("libx265", {"x265-params": "log-level=error:keyint=8:min-keyint=8:bframes=2:open-gop=0"}),
    "vp9": ("libvpx-vp9", {"g": "8"}),
    "av1": ("libsvtav1", {"g": "8"}),
}
# x265's default: open GOPs (CRA keyframes whose leading pictures are shown before them)
OPEN_GOP_HEVC = ("libx265", {"x265-params": "log-level=error:keyint=8:min-keyint=8:bframes=2"})


def numbered_frames(n: int, height: int = 48, width: int = 64) -> np.ndarray:
    frames = np.zeros((n, height, width, 3), dtype=np.uint8)
    for i in range(n):
        frames[i, :, : width // 2] = 8 * (i % 32)
        frames[i, :, width // 2:] = 8 * (i // 32) + 4
    return frames


def frame_numbers(frames: np.ndarray) -> np.ndarray:
    """Which frame of a numbered video each decoded frame is (fails if it is not clearly one)."""
    half = frames.shape[2] // 2
    left = frames[:, :, : half - 2].reshape(len(frames), -1).mean(axis=1)
    right = frames[:, :, half + 2:].reshape(len(frames), -1).mean(axis=1)
    low, high = np.round(left / 8), np.round((right - 4) / 8)
    assert np.all(np.abs(left - 8 * low) < 3) and np.all(np.abs(right - 4 - 8 * high) < 3), \
        f"frames are not clean gray levels: {left}, {right}"
    return (low + 32 * high).astype(int)


def write_video(path, encoder: str, options: dict, frames: np.ndarray, fps: float = FPS, rotation: int = 0,
                **container_options):
    """Write frames with one of PyAV's encoders; skips the test if this FFmpeg build lacks the encoder."""
    try:
        av.codec.Codec(encoder, "w")
    except av.codec.codec.UnknownCodecError:
        pytest.skip(f"PyAV's FFmpeg has no {encoder} encoder")
    with av.open(str(path), "w", options=container_options) as container:
        stream = container.add_stream(encoder, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt, stream.options = "yuv420p", options
        if rotation:
            stream.set_display_rotation(rotation)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """codec name -> a 6 s numbered mp4 (60 frames at 10 fps, 64x48) in that codec (lazily written)."""
    folder = tmp_path_factory.mktemp("codecs")

    class Videos(dict):
        def __missing__(self, name):
            encoder, options = CODECS[name] if name in CODECS else OPEN_GOP_HEVC
            self[name] = write_video(folder / f"{name}.mp4", encoder, options, numbered_frames(NUM_FRAMES))
            return self[name]

    return Videos()


@pytest.fixture
def no_hang():
    """Fail a test that runs longer than 30 s instead of hanging the suite."""
    def fail(signum, frame):
        raise TimeoutError("a video read hung for 30 s")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


SAMPLINGS = [FrameSampling(num_frames=7), FrameSampling(num_frames=500), FrameSampling(fps=2.5),
             FrameSampling(fps=4.0, max_frames=5)]


# ---- frame for frame the same as decord ----

@pytest.mark.parametrize("codec", ["h264", "hevc", "vp9"])
@pytest.mark.parametrize("image_size", [None, 32, 20])
def test_pyav_reads_the_same_frames_as_decord(videos, codec, image_size):
    # Same count, rate, indices and timestamps; same pixels bit for bit (the same scale filter, bilinear).
    decord_reader, pyav_reader = DecordReader(str(videos[codec]), image_size), PyAVReader(str(videos[codec]), image_size)
    assert decord_reader.num_frames == pyav_reader.num_frames == NUM_FRAMES
    assert decord_reader.avg_fps == pyav_reader.avg_fps == FPS
    # used only when the rate is unknown; FFmpeg 4.1 and 8 differ on the last frame's duration in VP9 mp4s
    assert decord_reader.end_time() == pytest.approx(pyav_reader.end_time(), abs=1 / FPS)
    for sampling in SAMPLINGS:
        indices, _ = sample_indices(NUM_FRAMES, FPS, sampling)
        from_decord, from_pyav = decord_reader.frames(indices), pyav_reader.frames(indices)
        assert from_pyav.shape == (len(indices), image_size or 48, image_size or 64, 3)
        np.testing.assert_array_equal(from_pyav, from_decord)
        assert frame_numbers(from_pyav).tolist() == indices.tolist()


def test_rotated_video_is_turned_as_decord_turns_it(tmp_path):
    path = write_video(tmp_path / "phone.mp4", *CODECS["h264"], numbered_frames(16), rotation=90)
    for image_size in (None, 24):
        indices = np.array([1, 9, 14])
        from_decord = DecordReader(str(path), image_size).frames(indices)
        from_pyav = PyAVReader(str(path), image_size).frames(indices)
        assert from_pyav.shape == (3, image_size or 64, image_size or 48, 3)  # portrait, as the phone meant
        np.testing.assert_array_equal(from_pyav, from_decord)


def test_frames_in_any_order_and_repeated(videos):
    frames = PyAVReader(str(videos["h264"]), 32).frames(np.array([59, 0, 30, 30, 7]))
    assert frame_numbers(frames).tolist() == [59, 0, 30, 30, 7]


# ---- what decord cannot read ----

def test_av1_is_read_with_pyav_and_said_once(videos, caplog):
    with pytest.raises(video._ReadError, match="cannot find video stream"):  # decord 0.6.0 has no AV1 decoder
        DecordReader(str(videos["av1"]), 32)
    with caplog.at_level(logging.WARNING, logger="video"):  # frames denser than the keyframes: decord is chosen
        frames, timestamps = load_frames(videos["av1"], 32, FrameSampling(num_frames=16))
        load_frames(videos["av1"], 32, FrameSampling(fps=4.0))
    indices, expected_times = sample_indices(NUM_FRAMES, FPS, FrameSampling(num_frames=16))
    assert frame_numbers(frames).tolist() == indices.tolist()
    np.testing.assert_array_equal(timestamps, expected_times)
    np.testing.assert_array_equal(video.frame_timestamps(videos["av1"], FrameSampling(num_frames=16)), timestamps)
    assert video.decoder_of(videos["av1"]) == "pyav" and video.decoder_counts()["pyav"] >= 1
    warnings = [r.getMessage() for r in caplog.records if str(videos["av1"]) in r.getMessage()]
    assert len(warnings) == 1 and "reading it with PyAV" in warnings[0]


def test_open_gop_hevc_goes_to_pyav(videos):
    path = str(videos["hevc-open-gop"])
    indices, _ = sample_indices(NUM_FRAMES, FPS, FrameSampling(num_frames=16))
    # Why: decord counts frames after a seek, and the leading pictures it cannot decode there shift the count.
    wrong = decord.VideoReader(path, width=32, height=32, num_threads=1).get_batch(indices.tolist()).asnumpy()
    assert (frame_numbers(wrong) != indices).any()
    read = read_video(path, 32, FrameSampling(num_frames=16))
    assert read.decoder == "pyav" and "open GOP" in read.failures[0]
    assert frame_numbers(read.frames).tolist() == indices.tolist()


def test_a_file_decord_opens_but_cannot_decode_falls_back(videos, monkeypatch):
    class FailingDecode(decord.VideoReader):
        def get_batch(self, indices):
            raise decord.DECORDError("injected decoding error")

        def __getitem__(self, i):
            raise decord.DECORDError("injected decoding error")

    monkeypatch.setattr(decord, "VideoReader", FailingDecode)
    read = read_video(videos["vp9"], 32, FrameSampling(num_frames=16))  # denser than the keyframes: decord first
    assert read.decoder == "pyav" and read.failures == ["decord: cannot decode frames (injected decoding error)"]
    assert frame_numbers(read.frames).tolist() == [(2 * i + 1) * NUM_FRAMES // 32 for i in range(16)]


# ---- long videos: seek, do not decode everything ----

@pytest.mark.parametrize("codec", ["h264", "av1"])
def test_pyav_seeks_to_keyframes(tmp_path, codec):
    # 960 frames, a keyframe every 24: four sampled frames cost at most four runs from a keyframe.
    encoder, options = CODECS[codec]
    path = write_video(tmp_path / f"long_{codec}.mp4", encoder, {**options, "g": "24"}, numbered_frames(960, 32, 32),
                       fps=24)
    reader = PyAVReader(str(path), None)
    indices, _ = sample_indices(960, 24.0, FrameSampling(num_frames=4))
    assert frame_numbers(reader.frames(indices)).tolist() == indices.tolist()
    assert reader.decoded <= 4 * 24


# ---- which reader goes first: measured per file before decoding ----

def test_sparse_frames_of_a_long_file_go_to_pyav_and_dense_ones_to_decord(tmp_path, videos, capsys):
    # 1,000 frames (50 s at 20 fps, 32x32), a keyframe every 100: cheap to write, long in frames.
    long = write_video(tmp_path / "long.mp4", "libx264", {"g": "100", "keyint_min": "100", "sc_threshold": "0"},
                       numbered_frames(1000, 32, 32), fps=20)
    layout = video.probe(str(long))
    assert layout.frames() == 1000 and layout.fps == 20 and layout.gop == 100 and not layout.open_gop
    # 8 frames: 1,000 / 8 = 125 frames apart >= 100 -> PyAV; 50 frames: 20 apart < 100 -> decord
    for sampling, reader, apart in [(FrameSampling(num_frames=8), "pyav", "125"),
                                    (FrameSampling(num_frames=50), "decord", "20.0"),
                                    (FrameSampling(fps=0.1), "pyav", "200")]:  # 5 frames, one per 10 s
        read = read_video(long, 32, sampling)
        assert (read.decoder, read.failures) == (reader, []), sampling
        assert f"frames lie {apart} frames apart, a keyframe every 100" in read.why
        assert frame_numbers(read.frames).tolist() == read.indices.tolist()
        other = (DecordReader if reader == "pyav" else PyAVReader)(str(long), 32)
        np.testing.assert_array_equal(read.frames, other.frames(read.indices))  # the same pixels either way
    # the fixture's files: 60 frames, a keyframe every 8; 7 frames lie 60 / 7 = 8.6 apart -> PyAV, 16: 3.75 -> decord
    assert read_video(videos["h264"], 32, FrameSampling(num_frames=7)).decoder == "pyav"
    assert read_video(videos["h264"], 32, FrameSampling(num_frames=16)).decoder == "decord"
    assert data.main(["frames", str(long), "--num-frames", "8", "--image-size", "32"]) == 0
    assert ("reader: pyav, chosen first because 8 sampled frames lie 125 frames apart, a keyframe every 100: "
            "each frame is a seek, and PyAV seeks faster") in capsys.readouterr().out


def test_a_file_whose_header_tells_no_rate_goes_to_decord(tmp_path):
    assert video.choose_reader(None, FrameSampling(num_frames=8))[0] is DecordReader
    no_rate = video.Layout(declared=(100, float("nan")), fps=float("nan"), gop=10.0, open_gop=False)
    assert video.choose_reader(no_rate, FrameSampling(num_frames=8))[0] is DecordReader


# ---- bad files: a clear error naming the file, from the last reader tried; nothing hangs ----

def faststart_mp4(tmp_path) -> bytes:
    """An mp4 whose index (moov) comes before the frames, as web video is written."""
    return write_video(tmp_path / "fast.mp4", *CODECS["h264"], numbered_frames(40), movflags="faststart").read_bytes()


def index_at_end_mp4(tmp_path) -> bytes:
    """An mp4 as encoders write it by default: the index (moov) after the frames."""
    return write_video(tmp_path / "end.mp4", *CODECS["h264"], numbered_frames(40)).read_bytes()


def audio_only_mp4(tmp_path) -> bytes:
    with av.open(str(tmp_path / "audio.mp4"), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return (tmp_path / "audio.mp4").read_bytes()


def cut_webm(tmp_path, encoder: str, keep: float = 0.6) -> bytes:
    path = write_video(tmp_path / "full.webm", encoder, {"g": "8"}, numbered_frames(NUM_FRAMES))
    return path.read_bytes()[: int(path.stat().st_size * keep)]


BAD_FILES = {  # name: (bytes of the file, what the error says)
    "zero-byte": (lambda tmp: b"", "empty"),
    "text-as-mp4": (lambda tmp: b"not a video at all\n" * 50, r"cannot decode video \(decord: .*; pyav: "),
    "audio-only": (audio_only_mp4, "no video stream"),
    "header-only": (lambda tmp: (b := faststart_mp4(tmp))[: b.find(b"mdat") - 4],
                    "cut short: its index lists 40 frames, the file holds 0"),
    "truncated-faststart": (lambda tmp: (b := faststart_mp4(tmp))[: len(b) * 2 // 3], "cut short: its index lists 40"),
    "truncated-index-at-end": (lambda tmp: (b := index_at_end_mp4(tmp))[: len(b) // 2],
                               r"cannot decode video \(.*Invalid data"),
    "truncated-vp9-webm": (lambda tmp: cut_webm(tmp, "libvpx-vp9"), "cut short: its header says 6.0 s"),
    "truncated-av1-webm": (lambda tmp: cut_webm(tmp, "libsvtav1"), "cut short: its header says 6.0 s"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_files_raise_video_error_naming_the_file(tmp_path, name, no_hang):
    make, reason = BAD_FILES[name]
    path = tmp_path / f"{name}.mp4"
    path.write_bytes(make(tmp_path))
    for read in (lambda: load_frames(path, 32, FrameSampling(num_frames=8)),
                 lambda: video.frame_timestamps(path, FrameSampling(num_frames=8))):
        with pytest.raises(VideoError, match=reason) as error:
            read()
        assert str(error.value).startswith(f"{path}: ")
    assert video.decoder_of(path) is None


def test_a_frame_whose_bytes_are_cut_off_is_an_error(tmp_path, no_hang):
    # 97% of a webm: within the rule's room (below), but the last frames' bytes are gone and frame 56 is sampled.
    path = tmp_path / "cut.webm"
    path.write_bytes(cut_webm(tmp_path, "libvpx-vp9", keep=0.97))
    with pytest.raises(VideoError, match=f"{path}: cannot decode video .*pyav: cannot decode frame 56"):
        load_frames(path, 32, FrameSampling(num_frames=8))


def test_a_video_track_a_little_shorter_than_its_audio_is_whole(tmp_path):
    # Matroska keeps no frame count, so a cut file shows in frames that stop short of the declared duration;
    # the rule leaves room (2 s, or 1% of the duration) for audio that runs on: here 1.5 s.
    path = tmp_path / "talk.mkv"
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=10)
        video.height, video.width, video.pix_fmt = 48, 64, "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        for frame in numbered_frames(NUM_FRAMES):
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        for i in range(7_500 * 16 // 1024):  # 7.5 s of silence
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            samples.sample_rate, samples.pts = 16000, i * 1024
            container.mux(audio.encode(samples))
        container.mux(audio.encode())
    read = read_video(path, 32, FrameSampling(num_frames=8))
    assert read.num_frames == NUM_FRAMES and read.decoder == "decord"
    assert frame_numbers(read.frames).tolist() == read.indices.tolist()


# ---- data.py check --decode ----

def test_check_decode_reports_every_video(videos, tmp_path, capsys):
    (tmp_path / "cut.mp4").write_bytes((b := faststart_mp4(tmp_path))[: len(b) // 2])
    (tmp_path / "av1.mp4").write_bytes(videos["av1"].read_bytes())  # a file this process has not read yet
    lines = [{"problem_id": f"q{i}", "videos": str(video), "problem": "?", "options": ["a", "b"],
              "problem_type": "multiple_choice", "answer": "A"}
             for i, video in enumerate([videos["h264"], tmp_path / "av1.mp4", tmp_path / "cut.mp4", videos["h264"]])]
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert data.main(["check", str(records), "--allow-absolute-paths"]) == 1  # each video opened, its index read
    assert f"unreadable         {tmp_path / 'cut.mp4'}: the file is cut short" in capsys.readouterr().out
    assert data.main(["check", str(records), "--allow-absolute-paths", "--decode", "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert f"readable   decord  {videos['h264']}\n" in out
    assert f"readable   pyav    {tmp_path / 'av1.mp4'}  (decord: ERROR cannot find video stream" in out
    assert f"unreadable         {tmp_path / 'cut.mp4'}: the file is cut short" in out
    assert "3 videos: 1 read with decord, 1 with PyAV, 1 unreadable (1 record)" in out
    records.write_text("".join(json.dumps(line) + "\n" for line in lines[:2]))
    assert data.main(["check", str(records), "--allow-absolute-paths", "--decode", "--fps", "1"]) == 0


# ---- the eval report counts the readers ----

class ScriptedEngine:
    def generate(self, prompts, n, **kw):
        from rollout import Sample
        return [[Sample(token_ids=[1], logprobs=[0.0], finish_reason="eos", text="<answer>A</answer>")]
                for _ in prompts]


def test_eval_report_counts_videos_by_reader(tiny_model, videos, tmp_path):
    import eval as evaluation
    lines = [{"problem_id": f"q{i}", "videos": str(video), "problem": "?", "options": ["a", "b"],
              "problem_type": "multiple_choice", "answer": "A"}
             for i, video in enumerate([videos["h264"], videos["av1"], videos["av1"]])]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = data.load_records(tmp_path / "eval.jsonl", allow_absolute_paths=True)
    # 16 frames of 60 lie closer than the keyframes (every 8): decord reads the H.264 file, PyAV the AV1 one
    report = evaluation.evaluate(tiny_model, ScriptedEngine(), records, FrameSampling(num_frames=16), tmp_path / "out")
    assert report["decoders"] == {"decord": 1, "pyav": 1}  # distinct videos, not questions


# ---- bench.py decode, in small ----

def test_bench_decode_prints_the_table(tmp_path):
    # 20 s at 2 fps, a keyframe every 2 s: 4 s encoded, tiled 5 times
    done = subprocess.run([sys.executable, "bench.py", "decode", "--sizes", "64x48", "--codecs", "h264", "av1",
                           "--video-fps", "2", "--seconds", "20", "--segment-s", "4", "--frames", "4", "--image-sizes",
                           "32", "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "SVT_LOG": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    # 4 frames of 40 lie 10 apart, a keyframe every 4: PyAV is chosen
    assert "| 64x48 | h264 | 2 | 2 s | 4 | 32 | decord |" in done.stdout
    assert "| 64x48 | h264 | 2 | 2 s | 4 | 32 | pyav (chosen) |" in done.stdout
    assert "| 64x48 | av1 | 2 | 2 s | 4 | 32 | decord | cannot decode: ERROR cannot find video stream" in done.stdout
    assert "of 40 |" in done.stdout  # PyAV's count of decoded frames, of the 20 s x 2 fps
    tiled = av.open(str(tmp_path / "h264-20s-64x48-2fps-key2s.mp4"))
    assert tiled.streams.video[0].frames == 40 and sum(p.is_keyframe for p in tiled.demux(video=0)) == 10
