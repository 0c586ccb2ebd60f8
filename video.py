"""Reading videos: which frames to take, the two readers (decord, PyAV) and the choice between them, and
reading the next batch's videos while the current step runs.

- `sample_indices` picks frames: a fixed number spread evenly over the whole video (training), or a fixed
  rate in frames per second (inference), both capped at `max_frames` (8,192 in the paper).
- `read_video` / `load_frames` decode them, resized straight to the vision tower's size by FFmpeg (a
  1080p frame never reaches Python at full size). `choose_reader` decides per file, before any frame is
  decoded, which reader goes first: PyAV where the sampled frames lie a keyframe interval or more apart
  (its seeks are cheaper), decord otherwise; the other reads what the first cannot (decord has no AV1
  decoder and misreads open-GOP HEVC). Both give the same frames, bit for bit. `decoder_counts` says how
  many files each has read.
- `FramePrefetcher` reads the videos of the next batch in background threads (`--decode-workers`) while
  the current step runs, so the step does not wait for the CPU to decode.
- `check_videos_open` finds the videos that are missing or cannot be read, before a run starts.
- `load_image` reads an image record's picture as a one-frame video; `image_problem` says why one cannot be
  read (missing, corrupt, or a pixel mode with no one way to RGB: CMYK, 16-bit, palette).

Run `python data.py frames VIDEO` to see the frames a setting takes from a file, and which reader reads it.
"""

import bisect
import json
import logging
import math
import os
import queue
import re
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import av
import decord
import numpy as np

import errors

log = logging.getLogger("video")

MAX_FRAMES = 8192  # the paper's maximum frames per video (at inference)


class VideoError(errors.UserError, RuntimeError):
    """A video (or its subtitle file, or an image) that cannot be read; the message names the file and what
    is wrong."""


# ---- frame sampling ----

@dataclass
class FrameSampling:
    """Which frames of a video the model sees: `num_frames` spread evenly over the whole video, or `fps`
    frames per second of video; either way at most `max_frames`. Setting `fps` selects fps mode (then
    `num_frames` is ignored and set to None), so `FrameSampling(fps=0.5)` just works."""

    num_frames: int | None = 16
    fps: float | None = None
    max_frames: int = MAX_FRAMES

    def __post_init__(self):
        if self.fps is not None:
            if not (math.isfinite(self.fps) and self.fps > 0):
                raise errors.UsageError(f"fps must be a positive number, got {self.fps}")
            self.num_frames = None
        elif self.num_frames is None or self.num_frames < 1:
            raise errors.UsageError(f"set num_frames >= 1 or fps > 0 (got num_frames={self.num_frames})")
        if self.max_frames < 1:
            raise errors.UsageError(f"max_frames must be >= 1, got {self.max_frames}")

    def key(self) -> str:
        """A short stable string for cache keys: "n16-max8192" or "fps0.5-max8192"."""
        mode = f"n{self.num_frames}" if self.fps is None else f"fps{float(self.fps)!r}"
        return f"{mode}-max{self.max_frames}"

    @classmethod
    def from_args(cls, args) -> "FrameSampling":
        """The sampling that `add_sampling_args`' flags describe."""
        return cls(num_frames=args.num_frames, fps=args.fps, max_frames=args.max_frames)


def add_sampling_args(parser, num_frames: int | None = 16) -> None:
    """--num-frames, --fps, --max-frames: the same three flags in every script that reads videos.
    `num_frames=None` (eval.py) leaves the choice to the caller, e.g. the checkpoint's own setting."""
    parser.add_argument("--num-frames", type=int, default=num_frames,
                        help="frames spread evenly over each video" + (
                            "" if num_frames else "; None: the checkpoint's config.json setting (num_video_frames, "
                                                  "or fps when it is > 0), as the release's own code samples"))
    parser.add_argument("--fps", type=float, default=None,
                        help="sample this many frames per second of video instead (overrides --num-frames)")
    parser.add_argument("--max-frames", type=int, default=MAX_FRAMES, help="cap on frames per video")


def _centres(total: int, n: int) -> np.ndarray:
    """The middle index of each of n equal segments of range(total): floor((i + 0.5) * total / n),
    in integers so it is exact for any length. _centres(10, 2) -> [2, 7]."""
    i = np.arange(n, dtype=np.int64)
    return ((2 * i + 1) * total) // (2 * n)


def sample_indices(total_frames: int, video_fps: float, sampling: FrameSampling
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The frames to decode and their times: (indices int64 [T], timestamps float64 [T] seconds).

    num_frames mode takes the centre frame of num_frames equal segments; a video with fewer frames than
    asked gives every frame once (never duplicates). fps mode takes the frame showing at times
    (k + 0.5) / fps for every such time inside the video (at least the middle frame; a rate above the
    video's own gives each frame once). Then, if T > max_frames, T is cut to max_frames evenly.
    A timestamp is the start time of the frame taken: index / video_fps.

    >>> sample_indices(100, 10.0, FrameSampling(num_frames=4))
    (array([12, 37, 62, 87]), array([1.2, 3.7, 6.2, 8.7]))
    >>> sample_indices(100, 10.0, FrameSampling(fps=0.5))[0]   # one frame per 2 s of a 10 s video
    array([10, 30, 50, 70, 90])
    """
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if not (math.isfinite(video_fps) and video_fps > 0):
        raise ValueError(f"video_fps must be a positive number, got {video_fps}")
    if sampling.fps is None:
        indices = _centres(total_frames, min(sampling.num_frames, total_frames))  # n >= total: every frame
    else:
        duration = total_frames / video_fps
        times = (np.arange(int(duration * sampling.fps) + 1) + 0.5) / sampling.fps
        times = times[times < duration]
        if len(times) == 0:  # video shorter than half a sampling period
            times = np.array([duration / 2])
        # The 1e-6 keeps float error in t * video_fps (e.g. 1.9999999) from landing one frame early.
        indices = np.minimum(np.floor(times * video_fps + 1e-6).astype(np.int64), total_frames - 1)
        indices = np.unique(indices)
    if len(indices) > sampling.max_frames:
        indices = indices[_centres(len(indices), sampling.max_frames)]
    return indices, indices / video_fps


# ---- video readers: decord first, PyAV for what decord cannot decode ----
# decord 0.6.0 (its last release) bundles FFmpeg 4.1, which has no AV1 decoder, and AV1 is what YouTube
# serves many videos in today. When decord cannot open or decode a file, PyAV (a newer FFmpeg: AV1 via
# dav1d, VP9, HEVC, H.264, ...) reads the same frames. The two readers agree by construction:
#   - frame i is the video packet with the i-th smallest presentation timestamp, and the frame count is
#     the number of video packets (decord indexes a file this way when it opens it);
#   - the frame rate is the stream's average frame rate;
#   - frames are resized straight to RGB by FFmpeg's scale filter with bilinear interpolation, after the
#     rotation the container asks for (decord's filter graph).
# On files both decode (H.264, HEVC, VP9) the two give the same pixels, bit for bit (tests/test_decode.py).

class _ReadError(Exception):
    """Why one reader could not read a file (no path: `read_video` names the file once, for all readers)."""


_DECORD_LOG_PREFIX = re.compile(r"^(\[[\d:]+\] \S+:\d+: )+(Check failed: .*?\(-?\d+ vs\. -?\d+\) )?")


def _reason(error: Exception) -> str:
    """The first line of a reader's error, without decord's log prefix ("[12:00:00] src/x.cc:151: Check
    failed: st_nb >= 0 (-1 vs. 0) ") or PyAV's errno and file name."""
    if isinstance(error, av.FFmpegError) and error.strerror:
        return error.strerror
    text = str(error).strip()
    return _DECORD_LOG_PREFIX.sub("", text.splitlines()[0]) if text else type(error).__name__


def _declared(container, stream) -> tuple[int, float]:
    """What a container's header declares about its video stream: (frames listed, 0 where the container
    keeps no count, as Matroska/WebM; duration in seconds from the stream's start, nan if none)."""
    if not container.duration:
        return stream.frames, float("nan")
    start = (stream.start_time or 0) * float(stream.time_base)
    return stream.frames, ((container.start_time or 0) + container.duration) / av.time_base - start


def _cut_short(num_frames: int, avg_fps: float, declared: tuple[int, float]) -> str | None:
    """Why a video's packets look cut short of what its container's header declares (a partial download),
    or None. mp4 lists its frames: fewer packets than listed is cut. Matroska/WebM do not, so there the
    frames' span (count / rate) is held against the declared duration, with room for an audio track that
    runs a little longer: more than 2 s and 1% short is cut."""
    listed, seconds = declared
    if listed > num_frames:
        return f"its index lists {listed} frames, the file holds {num_frames}"
    if math.isfinite(seconds) and math.isfinite(avg_fps) and avg_fps > 0:
        span = num_frames / avg_fps
        if span < seconds - max(2.0, 0.01 * seconds):
            return f"its header says {seconds:.1f} s, the video's {num_frames} frames last {span:.1f} s"
    return None


@dataclass
class Layout:
    """What a file's header and its first GOPs say, read with PyAV before any frame is decoded."""

    declared: tuple[int, float]  # `_declared`: frames listed (0: none), duration in seconds (nan: none)
    fps: float                   # the stream's average frame rate, nan if the header has none
    gop: float                   # packets from one keyframe to the next in the first GOPs; inf: one keyframe
    open_gop: bool               # a packet after a keyframe (decoding order) is shown before it

    def frames(self) -> int:
        """Frames in the video as the header tells: listed (mp4), else duration x rate (Matroska); 0 unknown."""
        listed, seconds = self.declared
        if listed:
            return listed
        return int(seconds * self.fps) if math.isfinite(seconds * self.fps) else 0


def _first_gops(container, stream, max_packets: int = 1000) -> tuple[float, bool]:
    """(packets per GOP, open GOP) from the first few GOPs (at most max_packets packets): encoders keep one
    GOP structure through a file. An open GOP is a packet that follows a keyframe in decoding order and is
    shown before it: HEVC's CRA keyframes with leading pictures, x265's default."""
    keyframe_pts, keyframes_at = None, []  # packet numbers of the keyframes
    for n, packet in enumerate(container.demux(stream)):
        if n >= max_packets or packet.pts is None:
            break
        if packet.is_keyframe:
            keyframes_at.append(n)
            if len(keyframes_at) > 3:
                break
            keyframe_pts = packet.pts
        elif keyframe_pts is not None and packet.pts < keyframe_pts:
            return _mean_gap(keyframes_at), True
    return _mean_gap(keyframes_at), False


def _mean_gap(positions: list[int]) -> float:
    return (positions[-1] - positions[0]) / (len(positions) - 1) if len(positions) > 1 else math.inf


def probe(path: str) -> Layout | None:
    """The file's `Layout`, or None where PyAV cannot open it or finds no video stream (the readers then
    say why)."""
    try:
        with av.open(path) as container:
            stream = container.streams.best("video")
            if stream is None:
                return None
            rate = stream.average_rate
            return Layout(_declared(container, stream), float(rate) if rate else math.nan,
                          *_first_gops(container, stream))
    except (av.FFmpegError, OSError):
        return None


class DecordReader:
    """decord's VideoReader, resizing while it decodes (one decoding thread): num_frames, avg_fps,
    end_time(), cut_short (why the file looks truncated, or None), frames(indices), close().

    decord finds a frame after a seek by counting decoded frames. In an open-GOP stream the decoder drops
    the leading pictures of the keyframe it seeks to, the count slips, and decord returns other frames than
    asked (measured: 9 of 16 frames wrong in an x265 file with the default open GOP). Such files are left to
    PyAV, which matches frames by timestamp."""

    name = "decord"

    def __init__(self, path: str, image_size: int | None, layout: Layout | None = None):
        layout = layout or probe(path)  # what decord does not check: the header and the first GOPs' structure
        if layout is not None and layout.open_gop:
            raise _ReadError("open GOPs (frames that follow a keyframe are shown before it), in which "
                             "decord's seeking returns wrong frames")
        try:
            self.vr = decord.VideoReader(path, ctx=decord.cpu(0), width=image_size or -1,
                                         height=image_size or -1, num_threads=1)
        except (RuntimeError, decord.DECORDError) as e:
            raise _ReadError(_reason(e)) from e
        self.num_frames = len(self.vr)
        if self.num_frames == 0:
            raise _ReadError("video has no frames")
        self.avg_fps = float(self.vr.get_avg_fps())
        self.cut_short = layout and _cut_short(self.num_frames, self.avg_fps, layout.declared)

    def end_time(self) -> float:
        """When the last frame ends (seconds), from the packet index; nan if decord has no times."""
        try:
            return float(self.vr.get_frame_timestamp([self.num_frames - 1])[0, 1])
        except (RuntimeError, decord.DECORDError, IndexError):
            return float("nan")

    def frames(self, indices: np.ndarray, chunk: int = 32) -> np.ndarray:
        """Frames uint8 [T, H, W, 3] RGB at these indices (any order, repeats allowed). Read `chunk` at a
        time into one array: decord's own batch would be a second copy of all T frames at the peak."""
        try:
            first = self.vr.get_batch(indices[:chunk].tolist()).asnumpy()
            out = np.empty((len(indices), *first.shape[1:]), dtype=first.dtype)   # [T, H, W, 3]
            out[:chunk] = first
            for start in range(chunk, len(indices), chunk):
                out[start:start + chunk] = self.vr.get_batch(indices[start:start + chunk].tolist()).asnumpy()
            return out
        except (RuntimeError, decord.DECORDError) as batch_error:
            try:  # a width hit by the padding bug below fails in get_batch only: read frame by frame
                return np.stack([_strip_row_padding(self.vr[int(i)].asnumpy()) for i in indices])
            except (RuntimeError, decord.DECORDError):
                raise _ReadError(f"cannot decode frames ({_reason(batch_error)})") from batch_error

    def close(self):
        del self.vr


def _strip_row_padding(frame: np.ndarray) -> np.ndarray:
    """Undo a decord bug (dmlc/decord#336): when ffmpeg pads each RGB row to the CPU's alignment and the
    padded row happens to be a multiple of the width (e.g. width 16: 48 bytes -> 96), decord reports the
    frame as [H, W, padded / W] and get_batch fails. The pixels are the first 3 * W bytes of each row."""
    height, width, channels = frame.shape
    return frame.reshape(height, width * channels)[:, : width * 3].reshape(height, width, 3)


_TRANSPOSE = {90: ["1"], 180: ["1", "1"], 270: ["2"]}  # clockwise angle -> transpose filters ("1": 90 clockwise)


class PyAVReader:
    """PyAV, reading a few frames of a long video by seeking: for each wanted frame, jump to the keyframe
    at or before it and decode forward to the frame with the wanted timestamp; wanted frames between the
    same two keyframes are decoded in one pass. `decoded` counts the frames the decoder produced. Same
    interface as DecordReader: num_frames, avg_fps, end_time(), cut_short, frames(indices), close()."""

    name = "pyav"

    def __init__(self, path: str, image_size: int | None):
        self.image_size, self.decoded, self._graph, self._graph_for = image_size, 0, None, None
        try:
            self.container = av.open(path)
        except (av.FFmpegError, OSError) as e:
            raise _ReadError(f"cannot open ({_reason(e)})") from e
        try:
            self.stream = self.container.streams.best("video")  # FFmpeg's choice, as decord's
            if self.stream is None:
                raise _ReadError("no video stream")
            self._index()
        except BaseException:
            self.container.close()
            raise

    def _index(self):
        """Every video packet's timestamp, in presentation order, from one pass over the packets (no
        decoding), as decord does when it opens a file."""
        packets = []  # (pts, duration, is_keyframe)
        try:
            for packet in self.container.demux(self.stream):
                if packet.size == 0:  # the empty packet that ends the stream
                    continue
                if packet.pts is None:
                    raise _ReadError(f"video packet {len(packets)} has no timestamp")
                packets.append((packet.pts, packet.duration or 0, packet.is_keyframe))
        except av.FFmpegError as e:
            raise _ReadError(f"cannot read video packet {len(packets)} ({_reason(e)})") from e
        packets.sort()
        self.pts = [p[0] for p in packets]
        self.key_pts = [p[0] for p in packets if p[2]]
        self.num_frames = len(packets)
        rate = self.stream.average_rate
        self.avg_fps = float(rate) if rate else float("nan")
        start = self.stream.start_time or 0
        self._end = (packets[-1][0] + packets[-1][1] - start) * float(self.stream.time_base) if packets \
            else float("nan")
        self.cut_short = _cut_short(self.num_frames, self.avg_fps, _declared(self.container, self.stream))
        if not packets and not self.cut_short:
            raise _ReadError("video has no frames")

    def end_time(self) -> float:
        """When the last frame ends (seconds after the stream's start)."""
        return self._end

    def frames(self, indices: np.ndarray) -> np.ndarray:
        """Frames uint8 [T, H, W, 3] RGB at these indices (any order, repeats allowed)."""
        out, position = None, None  # position: pts of the last frame decoded (None: not decoding yet)
        for i in sorted(set(indices.tolist())):
            target = self.pts[i]
            keyframe = self._keyframe_before(target)
            if position is None or keyframe > position:  # a jump to the keyframe skips decoding the gap
                decoding = self._seek(keyframe)
            frame = self._decode_to(decoding, target, i)
            position = frame.pts
            rgb = self._rgb(frame)                                                   # [H, W, 3]
            if out is None:
                out = np.empty((len(indices), *rgb.shape), dtype=rgb.dtype)         # [T, H, W, 3]
            out[indices == i] = rgb  # every place frame i is asked for
        return out

    def _keyframe_before(self, pts: int) -> int:
        """The pts of the last keyframe shown at or before `pts` (the first frame's if none is marked)."""
        k = bisect.bisect_right(self.key_pts, pts) - 1
        return self.key_pts[k] if k >= 0 else self.pts[0]

    def _seek(self, pts: int):
        try:
            self.container.seek(pts, stream=self.stream, backward=True)
        except av.FFmpegError as e:
            raise _ReadError(f"cannot seek ({_reason(e)})") from e
        return self.container.decode(self.stream)

    def _decode_to(self, decoding, target: int, index: int) -> av.VideoFrame:
        """Decode forward to the frame whose pts is `target`."""
        try:
            for frame in decoding:
                self.decoded += 1
                if frame.pts is None:
                    raise _ReadError(f"a decoded frame has no timestamp (looking for frame {index})")
                if frame.pts >= target:
                    break
            else:
                raise _ReadError(f"the stream ended before frame {index}")
        except av.FFmpegError as e:
            raise _ReadError(f"cannot decode frame {index} ({_reason(e)})") from e
        if frame.pts != target:
            raise _ReadError(f"frame {index} did not decode (pts {target}; decoding reached pts {frame.pts})")
        return frame

    def _rgb(self, frame: av.VideoFrame) -> np.ndarray:
        """The frame rotated, resized and converted to RGB uint8 [H, W, 3] by the filter graph decord uses."""
        shape = (frame.width, frame.height, frame.format.name, frame.rotation)
        if self._graph_for != shape:
            self._graph, self._graph_for = self._filter_graph(frame), shape
        self._graph.vpush(frame)
        return self._graph.vpull().to_ndarray()

    def _filter_graph(self, frame: av.VideoFrame) -> av.filter.Graph:
        clockwise = -round(frame.rotation) % 360  # PyAV gives the display matrix's counter-clockwise angle
        width, height = (frame.height, frame.width) if clockwise in (90, 270) else (frame.width, frame.height)
        size = (self.image_size, self.image_size) if self.image_size else (width, height)
        graph = av.filter.Graph()
        graph.threads = 1
        chain = [graph.add_buffer(width=frame.width, height=frame.height, format=frame.format,
                                  time_base=self.stream.time_base)]
        chain += [graph.add("transpose", direction) for direction in _TRANSPOSE.get(clockwise, [])]
        chain.append(graph.add("scale", f"{size[0]}:{size[1]}:flags=bilinear"))
        chain.append(graph.add("format", "rgb24"))
        chain.append(graph.add("buffersink"))
        graph.link_nodes(*chain).configure()
        return graph

    def close(self):
        self.container.close()


VIDEO_READERS = (DecordReader, PyAVReader)
_decoder_of: dict[str, str] = {}  # video path -> the reader that read it last, in this process
_fell_back: dict[str, str] = {}   # video path -> the reader that read it where the one chosen first could not


def choose_reader(layout: Layout | None, sampling: FrameSampling) -> tuple[type, str]:
    """The reader to try first on a file, and why: PyAV when the sampled frames lie a keyframe interval
    (GOP) or more apart, decord otherwise.

    Why: both readers seek to the keyframe before each wanted frame and decode forward from it, but a
    decord seek costs far more (it rewinds and restarts its decoder each time), so where every sampled
    frame is a seek of its own, PyAV is faster, by more the longer the file: 256 frames of an hour of 720p
    H.264 at 30 fps with a keyframe every 2 s took decord 32.5 s and PyAV 9.6 s. Where the frames are
    denser than the keyframes, decoding runs on without seeking and decord is as fast or faster (1,024 of
    1,800 frames: decord 5.9 s, PyAV 6.7 s). BENCHMARKS.md section 4 has the table. Both give the same
    frames; the other reader reads the file where the first cannot. A file PyAV cannot probe goes to decord.
    """
    if layout is None or layout.frames() == 0 or not math.isfinite(layout.fps):
        return DecordReader, "the header tells no frame count or rate"
    sampled = len(sample_indices(layout.frames(), layout.fps, sampling)[0])
    apart = layout.frames() / sampled
    if apart >= layout.gop:
        return PyAVReader, (f"{sampled} sampled frames lie {apart:.0f} frames apart, a keyframe every "
                            f"{layout.gop:.0f}: each frame is a seek, and PyAV seeks faster")
    return DecordReader, (f"{sampled} sampled frames lie {apart:.1f} frames apart, a keyframe every "
                          f"{layout.gop:.0f}: decoding runs on between seeks, where decord is as fast or faster")


def decoder_of(path) -> str | None:
    """Which reader ("decord" or "pyav") read this video last in this process; None if none has."""
    return _decoder_of.get(os.path.abspath(path))


def decoder_counts() -> dict[str, int]:
    """How many distinct videos each reader has read in this process so far, e.g. {"decord": 980,
    "pyav": 20}: what training metrics and eval reports show, so that a fallback is never silent."""
    return dict(sorted(Counter(_decoder_of.values()).items()))


def _note_decoder(path: str, name: str, failures: list[str]) -> None:
    """Remember which reader read `path`; warn the first time the reader chosen first could not."""
    if failures and _fell_back.get(path) != name:
        log.warning("%s: %s; reading it with %s", path, "; ".join(failures), "PyAV" if name == "pyav" else name)
        _fell_back[path] = name
    _decoder_of[path] = name


@dataclass
class VideoRead:
    """What reading a video gave: the sampled frames (None when only the index was read) and where they
    come from."""

    frames: np.ndarray | None  # uint8 [T, H, W, 3] RGB (with a `share`: only those, [t, H, W, 3])
    timestamps: np.ndarray     # float64 [T] seconds
    indices: np.ndarray        # int64 [T] frame indices
    num_frames: int            # frames in the video
    fps: float                 # its frame rate
    decoder: str               # the reader that read it: "decord" or "pyav"
    failures: list[str]        # why the readers tried before it could not ("decord: ...")
    why: str                   # why the reader tried first was chosen (`choose_reader`)


def read_video(path, image_size: int | None, sampling: FrameSampling, decode: bool = True,
               share: Callable[[int], slice] | None = None) -> VideoRead:
    """Read a video's sampled frames (resized to image_size x image_size; None: native size) with the
    reader `choose_reader` picks, or with the other where that one cannot open or decode the file. A file
    that needed the other reader once goes straight to it after. A file neither can read raises
    VideoError naming it, with each reader's reason. With decode=False only the index is read (frame
    count, rate, timestamps). With `share` (the number of sampled frames -> a slice of them), only the
    frames in that slice are decoded: under MR-SP each rank reads just the frames it encodes
    (`mrsp.stage1_share`); the timestamps and indices stay those of all sampled frames.

    >>> read = read_video("youtube_av1.mp4", 224, FrameSampling(num_frames=16))
    >>> read.decoder, read.failures, read.frames.shape
    ('pyav', ['decord: ... cannot find video stream with wanted index: -1'], (16, 224, 224, 3))
    """
    path = os.path.abspath(path)
    # Check the file ourselves first: the readers' messages for these cases name no reason.
    if not os.path.isfile(path):
        raise VideoError(f"{path}: video file not found")
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: video file is empty (0 bytes)")
    layout = probe(path)
    if path in _fell_back:
        first = next(r for r in VIDEO_READERS if r.name == _fell_back[path])
        why = "the reader chosen first could not read it before"
    else:
        first, why = choose_reader(layout, sampling)
    failures = []
    for reader_class in (first, *(r for r in VIDEO_READERS if r is not first)):
        try:
            reader = reader_class(path, image_size, layout) if reader_class is DecordReader \
                else reader_class(path, image_size)
        except _ReadError as e:
            failures.append(f"{reader_class.name}: {e}")
            continue
        try:
            # A cut file or a rate the metadata lacks is the file's problem, not the reader's: the next
            # reader would find the same, so these raise at once.
            if reader.cut_short:
                failed = f" ({'; '.join(failures)})" if failures else ""
                raise VideoError(f"{path}: the file is cut short: {reader.cut_short}{failed}")
            fps = _video_fps(reader, path, sampling)
            indices, timestamps = sample_indices(reader.num_frames, fps, sampling)
            wanted = indices[share(len(indices))] if share is not None else indices
            frames = None if not decode else reader.frames(wanted) if len(wanted) else \
                np.zeros((0, image_size or 0, image_size or 0, 3), np.uint8)  # a rank with no share
        except _ReadError as e:
            failures.append(f"{reader_class.name}: {e}")
            continue
        finally:
            reader.close()
        if decode:
            _note_decoder(path, reader_class.name, failures)
        return VideoRead(frames, timestamps, indices, reader.num_frames, fps, reader_class.name, failures, why)
    raise VideoError(f"{path}: cannot decode video ({'; '.join(failures)})")


def _video_fps(reader, path, sampling: FrameSampling) -> float:
    """The video's frame rate. Broken metadata (0, nan, inf) falls back to the frame count over the end
    time of the last frame; if that fails too, fps mode is impossible (VideoError) while num_frames
    mode goes on with timestamps counted in frames (fps 1.0) and a warning."""
    fps = reader.avg_fps
    if math.isfinite(fps) and fps > 0:
        return fps
    end = reader.end_time()
    estimate = reader.num_frames / end if math.isfinite(end) and end > 0 else float("nan")
    if math.isfinite(estimate) and estimate > 0:
        log.warning("%s: frame rate metadata is %s; estimated %.3f fps from frame times", path, fps, estimate)
        return estimate
    if sampling.fps is not None:
        raise VideoError(f"{path}: frame rate unknown (metadata {fps}, no frame times); cannot sample by fps")
    log.warning("%s: frame rate unknown; timestamps are frame indices", path)
    return 1.0


def load_frames(path, image_size: int, sampling: FrameSampling,
                share: Callable[[int], slice] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode the sampled frames of a video, resized to a square (no cropping):
    (frames uint8 [T, image_size, image_size, 3] RGB, timestamps float64 [T] seconds).
    decord reads the file, or PyAV where decord cannot; `decoder_of(path)` says which did. With `share`,
    only the frames share(T) are decoded (`read_video`); the timestamps are all T.

    >>> frames, times = load_frames("clip.mp4", 224, FrameSampling(fps=1.0))   # a 60 s clip
    >>> frames.shape, times[:2]
    ((60, 224, 224, 3), array([0.5, 1.5]))
    """
    read = read_video(path, image_size, sampling, share=share)
    return read.frames, read.timestamps


def frame_timestamps(path, sampling: FrameSampling) -> np.ndarray:
    """The times (seconds) of the frames `load_frames` takes, from the container's index alone (no frame
    is decoded): what subtitles need when the video embeddings come from the cache."""
    return read_video(path, None, sampling, decode=False).timestamps



# ---- reading ahead: the next batch's videos decoded while the current step runs ----

class FramePrefetcher:
    """`load_frames` with the reads started ahead of time in background threads.

        reader = FramePrefetcher(image_size=448, workers=2)
        reader.prefetch([(path, sampling) for path in this_batch + next_batch])   # returns at once
        frames, timestamps = reader.load_frames(path, sampling)                     # waits only if not done

    `load_frames` returns what `video.load_frames` returns, and raises what it raises (a VideoError for an
    unreadable file, so a caller skips and counts it exactly as inline), for a read started ahead or not;
    any other exception in a worker is a RuntimeError naming the file. workers=0 reads inline, as if there
    were no prefetcher. `waited` is the seconds `load_frames` has spent waiting for frames (an inline read
    counts whole).

    Threads, not processes: decord and PyAV decode outside the GIL, the frames need no copy between
    processes, and `decoder_counts` stays in this process. Memory is bounded: `prefetch` keeps only the
    reads of the paths it is given (the current and the next batch), and drops any earlier read that was
    never claimed (a record replaced, or its embeddings found in a cache). The threads are daemons: a run
    that ends (an error, Ctrl-C) exits at once, not after the reads still queued (a ThreadPoolExecutor's
    threads are joined at exit, each finishing its queue first: up to two batches of long videos).
    """

    def __init__(self, image_size: int, workers: int, share: Callable[[int], slice] | None = None):
        self.image_size, self.share = image_size, share  # share: see `load_frames`
        self.queue: queue.SimpleQueue = queue.SimpleQueue()  # (Future, path, sampling) to read, in order
        self.threads = [threading.Thread(target=self._work, name=f"decode-{k}", daemon=True) for k in range(workers)]
        for thread in self.threads:
            thread.start()
        self.pending: dict[tuple, Future] = {}  # (path, sampling key) -> the read
        self.waited = 0.0
        self.frames_read = 0  # frames decoded for the reads handed out so far

    def _work(self) -> None:
        """A worker thread: read what is queued, in order; a read cancelled while queued is skipped."""
        while True:
            read, path, sampling = self.queue.get()
            if read.set_running_or_notify_cancel():
                try:
                    read.set_result(load_frames(path, self.image_size, sampling, self.share))
                except BaseException as e:  # handed to whoever waits for this read
                    read.set_exception(e)

    def _submit(self, path, sampling: FrameSampling) -> Future:
        read = Future()
        self.queue.put((read, path, sampling))
        return read

    def prefetch(self, reads) -> None:
        """Start these reads ((path, sampling) pairs, in this order) unless already started; forget the
        reads of any others."""
        if not self.threads:
            return
        wanted = {(os.path.abspath(path), sampling.key()): (path, sampling) for path, sampling in reads}
        for key in self.pending.keys() - wanted.keys():
            self.pending[key].cancel()  # a queued read no longer wanted never starts (a running one ends)
        self.pending = {key: self.pending.get(key) or self._submit(path, sampling)
                        for key, (path, sampling) in wanted.items()}

    def load_frames(self, path, sampling: FrameSampling) -> tuple[np.ndarray, np.ndarray]:
        """The sampled frames and timestamps of a video, as `video.load_frames` gives them."""
        start = time.perf_counter()
        try:
            read = self.pending.pop((os.path.abspath(path), sampling.key()), None)
            if read is None:
                frames, timestamps = load_frames(path, self.image_size, sampling, self.share)
            else:
                try:
                    frames, timestamps = read.result()
                except VideoError:
                    raise
                except Exception as e:
                    raise RuntimeError(f"{path}: the background read of this video failed: {type(e).__name__}: {e}") from e
        finally:
            self.waited += time.perf_counter() - start
        self.frames_read += len(frames)
        return frames, timestamps


def add_prefetch_args(parser) -> None:
    """--decode-workers: the one flag of every script that reads videos while it trains or evaluates."""
    parser.add_argument("--decode-workers", type=int, default=0,
                        help="threads that read the next batch's videos while the current step runs "
                             "(0: read each video when the step needs it)")


# ---- which videos open, found before a run ----

VIDEO_CHECK_THREADS = 8  # decord and PyAV read files outside the GIL; threads spare a process pool's start-up


def video_check_file(data_path) -> Path:
    """Where `check_videos_open`'s result for a record file (or folder) is kept: beside it, as
    "train.jsonl.videos.json"."""
    path = Path(data_path).resolve()
    return path.with_name(path.name + ".videos.json")


def _stamp(path: str) -> list | None:
    """[size, modification time in ns] of a file, None if there is none: what says it is unchanged."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _open_problem(path: str) -> str | None:
    """Why a video cannot be read, or None: `read_video`'s checks, its index read and no frame decoded."""
    try:
        read_video(path, None, FrameSampling(num_frames=1), decode=False)
    except VideoError as e:
        return str(e)
    return None


def check_videos_open(paths, cache_file=None, threads: int = VIDEO_CHECK_THREADS) -> dict[str, str | None]:
    """video path -> why it cannot be read (missing, empty, not a video, cut short), or None when it opens,
    for each of `paths`, in parallel threads. A file whose size and modification time match its entry in
    `cache_file` (written by `save_video_check`) is not opened again, so a restarted run starts at once.

    >>> check_videos_open(["/data/a.mp4", "/data/gone.mp4"])
    {'/data/a.mp4': None, '/data/gone.mp4': '/data/gone.mp4: video file not found'}
    """
    cached = {}
    if cache_file is not None and Path(cache_file).is_file():
        try:
            cached = json.loads(Path(cache_file).read_text())
        except (OSError, ValueError):
            log.warning("%s: unreadable; every video is checked again", cache_file)
    result, todo = {}, []
    for path in dict.fromkeys(paths):
        stamp = _stamp(path)
        if stamp is None:
            result[path] = f"{path}: video file not found"
        elif isinstance(cached.get(path), list) and cached[path][:2] == stamp:
            result[path] = cached[path][2]
        else:
            todo.append(path)
    with ThreadPoolExecutor(threads) as pool:
        for path, problem in zip(todo, pool.map(_open_problem, todo)):
            result[path] = problem
    return result


def save_video_check(cache_file, result: dict[str, str | None]) -> None:
    """Keep `check_videos_open`'s result for the files that exist (with each one's size and modification
    time) in `cache_file`, written whole or not at all. A folder that cannot be written is a warning."""
    entries = {path: [*stamp, problem] for path, problem in result.items() if (stamp := _stamp(path))}
    tmp = Path(f"{cache_file}.tmp")
    try:
        tmp.write_text(json.dumps(entries) + "\n")
        os.replace(tmp, cache_file)
    except OSError as e:
        log.warning("cannot keep the video check in %s (%s); the next run checks every video again",
                    cache_file, e.strerror or e)



# ---- images ----

# Pixel modes read as RGB: RGBA loses its alpha and L (grey) repeats its channel, as the releases' convert("RGB")
# does. Others are refused: CMYK needs a colour profile to become RGB, 16-bit values would be cut to 8 bits
# ("I;16" clips at 255), a palette may carry transparency; convert such files to RGB first.
IMAGE_MODES = ("RGB", "RGBA", "L")


def _open_image(path: str):
    """The decoded PIL image of `path`, in an RGB-able mode, or VideoError naming the file and why."""
    from PIL import Image, UnidentifiedImageError
    if not os.path.isfile(path):
        raise VideoError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            image.load()  # a truncated file opens lazily; decoding it is what fails
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise VideoError(f"{path}: cannot read the image ({e})") from e
    if image.mode not in IMAGE_MODES:
        raise VideoError(f"{path}: pixel mode {image.mode} is not read (only {', '.join(IMAGE_MODES)}); "
                         "convert the image to 8-bit RGB")
    return image


def image_problem(path: str) -> str | None:
    """Why an image cannot be read (missing, corrupt, an unsupported mode), or None."""
    try:
        _open_image(path)
    except VideoError as e:
        return str(e)
    return None


def load_image(path, image_size: int) -> np.ndarray:
    """An image as a one-frame video: uint8 [1, image_size, image_size, 3] RGB, resized whole to the square
    with bicubic interpolation (VILA's image_aspect_ratio "resize": PIL's resize, then the processor's x / 255
    and normalisation, which the vision encoders do)."""
    from PIL import Image
    image = _open_image(str(path)).convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.array(image, dtype=np.uint8)[None]                                  # [1, S, S, 3]
