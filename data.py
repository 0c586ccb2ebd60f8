"""Data for long-video RL: the public sets' record files, the prompt, the subtitles.

Everything that turns files on disk into what the model sees lives here:

- `load_records` reads LongVideo-Reason and Video-MME as they are published (JSONL, a JSON list, parquet,
  or a folder of such files; the layout is told from the fields) into `Record`s. A bad row is reported
  with its file, line (or parquet row) and field, and skipped.
- The frames of a record's video are read by video.py (sampling, the two readers, the choice between
  them); `data.py check` and `data.py frames` run it from the command line.
- `subtitle_text` gives a record's subtitles: inline text, or the cues of its .srt file that overlap
  the sampled frames (VideoMME's protocol), for training and eval alike.
- `build_prompt` / `format_response` fix the text around the video and the think-then-answer format
  that the rewards in rl.py check.
- synth.py writes a small task in LongVideo-Reason's format (real mp4 files) to run it all on a CPU.

Run it:
    python data.py check data/synth/train.jsonl                        # validate the rows, open every video
    python data.py check data/synth/train.jsonl --decode               # ... and read their sampled frames
    python data.py check Video-MME/videomme/test-00000-of-00001.parquet   # videos in Video-MME/data/
    python data.py frames data/synth/videos/synth-000000.mp4 --fps 1   # which frames get sampled
"""

import argparse
import json
import logging
import math
import os
import re
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import errors
import video

log = logging.getLogger("data")

PROBLEM_TYPES = ("multiple_choice", "numerical", "free_form")


# ---- records ----
# The public sets' files are read as they are published; each layout has one function that reads its row:
#   LongVideo-Reason (`_lvr_record`): problem_id (an int in the release), data_type ("video", "image" or
#     "text"; told from the fields when absent), videos ("<name>.mp4", or a one-element list, relative to the
#     video folder) or images (one picture, the same way; no videos and no images: a text question),
#     problem (the question with its options embedded as "A. ..." lines, or the question alone),
#     problem_type ("multiple choice", "numerical", "general", "free-form", or a reasoning perspective such
#     as "temporal"), reasoning, answer ("<answer>B</answer>" or "B"). An `options` list and `subtitles`
#     (text, or an .srt path relative to the subtitle folder) are read too; every other string field is a
#     label for eval's breakdowns.
#   Video-MME (`_videomme_record`): the Hub's columns video_id, duration, domain, sub_category, url, videoID,
#     question_id, task_type, question, options (["A. ...", ...]), answer; the video is <videoID>.mp4 in the
#     video folder, the subtitles <videoID>.srt in the subtitle folder when that file exists.
# A row with Video-MME's `question_id` or `videoID` is read as Video-MME, any other as LongVideo-Reason.
# Files: JSONL, a JSON list, a JSON file holding one object, parquet, or a folder of such files.

class RecordError(errors.UserError, ValueError):
    """A bad row of a record file. The message names the file, the row and the field, e.g.
    "train.jsonl line 7, field 'answer': 'E' is not one of the 4 options (A-D)". A JSON row is numbered by
    the line it starts on, a parquet row by its index from 0 (as pandas and `datasets` number them)."""

    def __init__(self, path, line: int | None, field: str | None, reason: str, unit: str = "line"):
        self.path, self.line, self.field, self.reason = str(path), line, field, reason
        where = self.path if line is None else f"{self.path} {unit} {line}"
        super().__init__(f"{where}: {reason}" if field is None else f"{where}, field '{field}': {reason}")


class _FieldError(Exception):
    """Raised while reading one row; load_records_report adds the file and the row."""

    def __init__(self, field: str | None, reason: str):
        self.field, self.reason = field, reason


DATA_TYPES = ("text", "image", "video")  # the release's data_type: what a question is asked about


@dataclass
class Record:
    """One question, about a video, an image, or neither (text only). `answer` is normalised: an option
    letter for multiple choice, the number as text for numerical, plain text for free form. `video` and
    `image` are absolute paths (at most one is set); `subtitles` is inline text or an .srt file's absolute
    path (see `subtitle_text`). `labels` holds the row's other string fields (duration, category, ...) for
    eval's breakdowns."""

    problem_id: str
    video: str | None
    problem: str
    options: list[str]
    problem_type: str
    reasoning: str
    answer: str
    subtitles: str | None = None
    labels: dict = field(default_factory=dict)
    image: str | None = None

    @property
    def data_type(self) -> str:
        """"video", "image" or "text", as the release's data_type names the kinds."""
        return "video" if self.video else "image" if self.image else "text"

    @property
    def media(self) -> str | None:
        """The file the question is about (the video or the image), None for a text question."""
        return self.video or self.image


@dataclass
class Folders:
    """Where a row's relative paths lead: videos into `video_dir`, .srt files into `subtitle_dir`. A
    relative path that leads outside its folder is a bad row; an absolute one is read only when
    `allow_absolute` (--allow-absolute-paths)."""

    video_dir: Path
    subtitle_dir: Path
    allow_absolute: bool = False

    def resolve(self, folder: Path, value: str, field: str) -> str:
        """The absolute, normalised path of `value` in `folder` (symbolic links are not followed, so a
        folder of links to videos stored elsewhere works)."""
        if os.path.isabs(value):
            if not self.allow_absolute:
                raise _FieldError(field, f"absolute path {value!r:.120}; pass --allow-absolute-paths to read it")
            return os.path.normpath(value)
        folder = os.path.abspath(folder)
        path = os.path.normpath(os.path.join(folder, value))
        if os.path.commonpath([folder, path]) != folder:
            raise _FieldError(field, f"{value!r:.120} leads outside {folder}")
        return path


# problem_type values that name an answer form. Any other value ("general", or a reasoning perspective such
# as "temporal") leaves the form to the options: multiple choice when there are some, free form otherwise.
_FORMS = {"multiple choice": "multiple_choice", "numerical": "numerical", "numeric": "numerical",
          "free form": "free_form", "open ended": "free_form"}
_LVR_FIELDS = {"problem_id", "data_type", "videos", "images", "problem", "options", "problem_type", "reasoning",
               "answer", "subtitles"}
_VIDEOMME_LABELS = ("duration", "domain", "sub_category", "task_type")
_MISSING = object()
_ANSWER_TAG = re.compile(r"\s*<answer>((?:(?!</?answer>).)*)</answer>\s*", re.DOTALL)
_OPTION_PREFIX = re.compile(r"\s*\(?([A-Z])[.):]\s*")


def option_letter(i: int) -> str:
    """The letter of the i-th option: option_letter(0) == "A", option_letter(3) == "D"."""
    if not 0 <= i < 26:
        raise ValueError(f"option index {i} is outside A-Z")
    return chr(ord("A") + i)


def _get(obj: dict, name: str, types: tuple, default=_MISSING):
    """obj[name], checked against `types` (bool never counts as a number)."""
    if name not in obj:
        if default is _MISSING:
            raise _FieldError(name, "missing")
        return default
    value = obj[name]
    if not isinstance(value, types) or isinstance(value, bool):
        expected = " or ".join(t.__name__ for t in types)
        raise _FieldError(name, f"expected {expected}, got {type(value).__name__} {value!r:.60}")
    return value


def split_options(problem: str) -> tuple[str, list[str]]:
    """A question with its options embedded as lines -> (question, options). Option lines are "A. x",
    "A) x" or "(A) x", lettered A, B, C, ... in order; an "Options:" line before them is dropped. Fewer
    than two such lines are no options: the problem stays as it is.

    >>> split_options("Why does he run?\\nA. rain\\nB. a bus\\n")
    ('Why does he run?', ['rain', 'a bus'])
    """
    question, options = [], []
    for line in problem.splitlines():
        m = _OPTION_PREFIX.match(line)
        if m and len(options) < 26 and m.group(1) == option_letter(len(options)):
            options.append(line[m.end():].strip())
        elif not options:
            question.append(line)
        elif line.strip():  # a continuation of the previous option
            options[-1] += " " + line.strip()
    if len(options) < 2:
        return problem, []
    if question and question[-1].strip().lower().rstrip(":") == "options":
        question.pop()
    return "\n".join(question).strip(), options


def _option_texts(options: list) -> list[str]:
    """An options list as texts: Video-MME's "A. red" loses its letter when every option carries its
    own letter in order; plain texts stay as they are."""
    if not all(isinstance(o, str) for o in options):
        raise _FieldError("options", "every option must be a string")
    if len(options) > 26:
        raise _FieldError("options", f"{len(options)} options; at most 26 (A-Z)")
    prefixes = [_OPTION_PREFIX.match(o) for o in options]
    if all(m and m.group(1) == option_letter(i) for i, m in enumerate(prefixes)):
        return [o[m.end():].strip() for o, m in zip(options, prefixes)]
    return list(options)


def _unwrap_answer(answer) -> str:
    """The answer inside the release's "<answer>B</answer>", or as it is when it has no tags. Text outside
    the tags, or a tag without its pair, makes the answer a guess: a bad row."""
    answer = str(answer)  # a JSON number is fine for numerical answers
    if "<answer>" in answer or "</answer>" in answer:
        tagged = _ANSWER_TAG.fullmatch(answer)
        if not tagged:
            raise _FieldError("answer", f"text outside one <answer>...</answer> pair: {answer!r:.80}")
        answer = tagged.group(1)
    if not answer.strip():
        raise _FieldError("answer", "empty")
    return answer.strip()


def _answer_letter(answer: str, options: list[str]) -> str:
    """A multiple-choice answer as its option letter; a letter is read as a letter before as option text."""
    letters = [option_letter(i) for i in range(len(options))]
    if answer in letters:
        return answer
    if answer in options:
        return letters[options.index(answer)]
    span = f"{len(options)} options (A-{letters[-1]})"
    if len(answer) == 1 and answer.isalpha():
        raise _FieldError("answer", f"{answer!r} is not one of the {span}")
    raise _FieldError("answer", f"{answer!r:.60} is neither a letter nor the text of one of the {span}")


def _normalise_answer(answer: str, problem_type: str, options: list[str]) -> str:
    if problem_type == "multiple_choice":
        return _answer_letter(answer, options)
    if problem_type == "numerical":
        try:
            ok = math.isfinite(float(answer))
        except ValueError:
            ok = False
        if not ok:
            raise _FieldError("answer", f"{answer!r:.60} is not a number")
    return answer


def _is_srt_path(subtitles: str | None) -> bool:
    return bool(subtitles) and "\n" not in subtitles and subtitles.strip().lower().endswith(".srt")


def _one_path(row: dict, name: str) -> str | None:
    """A row's `videos` / `images`: one path, a one-element list, or absent (None, "" and [] too) -> the
    path or None. A record is about one file: more is a bad row."""
    value = _get(row, name, (str, list, type(None)), default=None)
    if isinstance(value, list):
        if len(value) > 1 or not all(isinstance(v, str) for v in value):
            raise _FieldError(name, f"expected one path, got {value!r:.80} (a record asks about one file)")
        value = value[0] if value else None
    return value or None


def _media(row: dict, folders: Folders) -> tuple[str | None, str | None]:
    """(video, image) absolute paths of a LongVideo-Reason row, checked against its data_type: a row with
    neither is a text question; with both, a bad row (no family here reads both in one prompt)."""
    videos, images = _one_path(row, "videos"), _one_path(row, "images")
    if videos and images:
        raise _FieldError("images", "a record with both images and videos is not supported: one video, one "
                                    "image, or neither (a text question)")
    found = "video" if videos else "image" if images else "text"
    data_type = _get(row, "data_type", (str,), default=found)
    if data_type not in DATA_TYPES:
        raise _FieldError("data_type", f"{data_type!r} is not one of {', '.join(DATA_TYPES)}")
    if data_type != found:
        raise _FieldError("data_type", f"{data_type!r}, but the row has " + (
            f"a{'n' * (found == 'image')} {found}" if found != "text" else "no videos and no images"))
    video = folders.resolve(folders.video_dir, videos, "videos") if videos else None
    return video, folders.resolve(folders.video_dir, images, "images") if images else None


def _lvr_record(row: dict, folders: Folders) -> Record:
    """One LongVideo-Reason row (see the section's comment) as a Record; raises _FieldError."""
    video, image = _media(row, folders)
    problem = _get(row, "problem", (str,))
    options = _get(row, "options", (list,), default=None)
    options_field = "options" if options is not None else "problem"
    problem, options = split_options(problem) if options is None else (problem, _option_texts(options))
    kind = _get(row, "problem_type", (str,))
    key = " ".join(kind.lower().replace("_", " ").replace("-", " ").split())
    problem_type = _FORMS.get(key) or ("multiple_choice" if options else "free_form")
    if problem_type == "multiple_choice" and not options:
        raise _FieldError(options_field, f"no options, but problem_type is {kind!r}" + (
            " (the release embeds them in the problem as lines 'A. ...')" if options_field == "problem" else ""))
    subtitles = _get(row, "subtitles", (str, type(None)), default=None)
    if subtitles and not video:
        raise _FieldError("subtitles", "only a video record has subtitles")
    if _is_srt_path(subtitles):
        subtitles = folders.resolve(folders.subtitle_dir, subtitles.strip(), "subtitles")
    labels = {k: v for k, v in row.items() if k not in _LVR_FIELDS and isinstance(v, str)}
    if key not in _FORMS and key != "general":
        labels["category"] = kind.strip()  # the perspective: temporal, goal, plot, spatial
    return Record(
        problem_id=str(_get(row, "problem_id", (str, int))),
        video=video,
        image=image,
        problem=problem,
        options=options,
        problem_type=problem_type,
        reasoning=_get(row, "reasoning", (str,), default=""),  # RL-only data needs no reasoning
        answer=_normalise_answer(_unwrap_answer(_get(row, "answer", (str, int, float))), problem_type, options),
        subtitles=subtitles,
        labels=labels,
    )


def _videomme_record(row: dict, folders: Folders) -> Record:
    """One Video-MME row (see the section's comment) as a Record; raises _FieldError."""
    video_id = _get(row, "videoID", (str,))
    options = _option_texts(_get(row, "options", (list,)))
    if not options:
        raise _FieldError("options", "empty")
    srt = folders.resolve(folders.subtitle_dir, f"{video_id}.srt", "videoID")
    return Record(
        problem_id=str(_get(row, "question_id", (str, int))),
        video=folders.resolve(folders.video_dir, f"{video_id}.mp4", "videoID"),
        problem=_get(row, "question", (str,)),
        options=options,
        problem_type="multiple_choice",
        reasoning="",
        answer=_answer_letter(_unwrap_answer(_get(row, "answer", (str,))), options),
        subtitles=srt if os.path.isfile(srt) else None,  # some videos have none
        labels={k: str(row[k]) for k in _VIDEOMME_LABELS if row.get(k) is not None},
    )


# ---- reading record files ----

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")  # the files a folder of records is read from
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as errors="surrogateescape" keeps them


def _utf8_error(text: str) -> _FieldError | None:
    bad = _NOT_UTF8.search(text)
    return bad and _FieldError(None, f"not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02x})")


def _jsonl_rows(text: str):
    """(line, row or _FieldError) for each non-blank line."""
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield line_no, _utf8_error(line) or json.loads(line)
        except json.JSONDecodeError as e:
            yield line_no, _FieldError(None, f"invalid JSON ({e})")


def _json_list_rows(text: str):
    """(line, row or _FieldError) for each item of a JSON list, numbered by the line it starts on. An item
    that is not valid JSON (a file cut short) ends the list: the items before it are kept, one error names
    the line it starts on."""
    decoder, pos, line = json.JSONDecoder(), text.index("[") + 1, 1
    skip = re.compile(r"\s*")
    while True:
        start = skip.match(text, pos).end()
        line += text.count("\n", pos, start)
        if text.startswith("]", start):
            return
        try:
            row, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError as e:
            yield line, _FieldError(None, f"invalid JSON ({e}); the rest of the file is not read")
            return
        yield line, _utf8_error(text[start:end]) or row
        line += text.count("\n", start, end)
        pos = skip.match(text, end).end()
        line += text.count("\n", end, pos)
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos):
            yield line, _FieldError(None, "invalid JSON (expected ',' or ']' after an item); the rest of the "
                                          "file is not read")
            return


def _file_rows(path: Path):
    """(number, unit, row or _FieldError) for each row of one record file (see the section's comment)."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            yield None, "row", _FieldError(None, f"cannot read the parquet file ({e})")
            return
        yield from ((i, "row", row) for i, row in enumerate(rows))
        return
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    if text.lstrip().startswith("["):
        yield from ((line, "line", row) for line, row in _json_list_rows(text))
        return
    try:  # a JSON file holding one (perhaps indented) object: one row
        row = json.loads(text)
        if isinstance(row, dict):
            yield 1, "line", _utf8_error(text) or row
            return
    except json.JSONDecodeError:
        pass
    yield from ((line, "line", row) for line, row in _jsonl_rows(text))


def default_folders(path, video_dir=None, subtitle_dir=None, allow_absolute_paths=False) -> dict[str, Folders]:
    """The Folders for each layout of the record file or folder `path`. Unset folders default to where the
    downloads put them: LongVideo-Reason's videos in the record file's folder (a folder of record files:
    that folder), subtitles beside the videos; Video-MME's in data/ and subtitle/ of the data set's folder,
    the one above its annotations' videomme/ folder."""
    here = Path(path) if Path(path).is_dir() else Path(path).parent
    root = here.parent if here.name == "videomme" else here
    lvr_videos = Path(video_dir) if video_dir else here
    return {"lvr": Folders(lvr_videos, Path(subtitle_dir) if subtitle_dir else lvr_videos, allow_absolute_paths),
            "videomme": Folders(Path(video_dir) if video_dir else root / "data",
                                Path(subtitle_dir) if subtitle_dir else root / "subtitle", allow_absolute_paths)}


def load_records_report(path, video_dir=None, subtitle_dir=None, allow_absolute_paths=False,
                        check_subtitle_files: bool = False) -> tuple[list[Record], list[RecordError]]:
    """Read a record file (or a folder of them), keeping the good records and a RecordError for each bad
    row, and one for a file that holds no rows.

    Video and .srt paths resolve in `video_dir` / `subtitle_dir` (see `default_folders`). Whether a video
    exists is not checked here (see `check_videos_open`); a missing .srt file is a bad row only with
    `check_subtitle_files` (it matters only where subtitles are shown).

    >>> records, bad_rows = load_records_report("my_data.jsonl")
    >>> [(e.line, e.field) for e in bad_rows]
    [(7, 'answer')]
    """
    path = Path(path)
    if not path.exists():
        raise RecordError(path, None, None, "no such file or folder")
    files = sorted(p for p in path.iterdir() if p.suffix in RECORD_SUFFIXES) if path.is_dir() else [path]
    folders = default_folders(path, video_dir, subtitle_dir, allow_absolute_paths)
    records, bad_rows, first = [], [], {}
    for file in files:
        rows = 0
        for number, unit, row in _file_rows(file):
            rows += 1
            try:
                if isinstance(row, _FieldError):
                    raise row
                if not isinstance(row, dict):
                    raise _FieldError(None, f"expected a JSON object, got {type(row).__name__}")
                is_videomme = "question_id" in row or "videoID" in row
                record = (_videomme_record if is_videomme else _lvr_record)(
                    row, folders["videomme" if is_videomme else "lvr"])
                if check_subtitle_files and (srt := subtitle_file(record)) and not os.path.isfile(srt):
                    raise _FieldError("subtitles", f"subtitle file not found: {srt}")
                if record.problem_id in first:
                    where = first[record.problem_id]
                    raise _FieldError("problem_id", f"duplicate {record.problem_id!r} (first on {where[1]} "
                                                    f"{where[2]}{'' if where[0] == file else f' of {where[0]}'})")
            except _FieldError as e:
                bad_rows.append(RecordError(file, number, e.field, e.reason, unit))
                continue
            first[record.problem_id] = (file, unit, number)
            records.append(record)
        if not rows:
            bad_rows.append(RecordError(file, None, None, "holds no records"))
    return records, bad_rows


def summary(path, records: list[Record], bad_rows: list[RecordError], shown: int = 10) -> str:
    """What a run says about its data when it starts: the first `shown` bad rows, then
    "data/train.jsonl: 2,847 records, 3 skipped (bad rows above; `python data.py check ...` lists all)"."""
    lines = [f"skipped: {e}" for e in bad_rows[:shown]]
    if len(bad_rows) > shown:
        lines.append(f"... and {len(bad_rows) - shown} more")
    tail = f" (`python data.py check {path}` lists each)" if bad_rows else ""
    lines.append(f"{path}: {len(records):,} records, {len(bad_rows):,} skipped{tail}")
    return "\n".join(lines)


def load_records(path, video_dir=None, subtitle_dir=None, allow_absolute_paths=False, strict=False,
                 quiet=False) -> list[Record]:
    """Read and validate a record file (see `load_records_report`). Bad rows are skipped, and the
    `summary` is printed (unless quiet); `strict` raises the first bad row instead. No good record at
    all raises RecordError.

    >>> records = load_records("data/synth/train.jsonl")   # python synth.py --out data/synth
    data/synth/train.jsonl: 160 records, 0 skipped
    >>> records[0].problem, records[0].options, records[0].answer
    ('What colour is the first scene?', ['blue', 'yellow', 'cyan', 'red'], 'D')
    """
    records, bad_rows = load_records_report(path, video_dir, subtitle_dir, allow_absolute_paths)
    if bad_rows and strict:
        raise bad_rows[0]
    if not quiet:
        print(summary(path, records, bad_rows), file=sys.stderr, flush=True)
    if not records:
        raise RecordError(path, None, None, f"no usable records ({len(bad_rows)} bad)")
    return records


def add_folder_args(parser) -> None:
    """--video-dir, --subtitle-dir, --allow-absolute-paths: where a record file's paths lead."""
    parser.add_argument("--video-dir", default=None,
                        help="folder the videos and images are in (LongVideo-Reason's `videos` and `images`, "
                             "Video-MME's <videoID>.mp4); None: the data file's folder, or Video-MME's data/ beside "
                             "its videomme/ folder")
    parser.add_argument("--subtitle-dir", default=None,
                        help="folder the .srt files are in; None: the video folder, or Video-MME's subtitle/")
    parser.add_argument("--allow-absolute-paths", action="store_true",
                        help="read records whose video or subtitle path is absolute (else such a row is skipped)")


def add_data_args(parser, data_help: str) -> None:
    """--data, the folder flags, --strict: the same flags, with the same meaning, in every script that
    reads records."""
    parser.add_argument("--data", required=True, help=data_help + ": a LongVideo-Reason or Video-MME file as "
                        "published (.jsonl, .json, .parquet) or a folder of such files")
    add_folder_args(parser)
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad row or unreadable video instead of skipping it")


def folder_args(args) -> dict:
    """The keyword arguments of `load_records` / `load_records_report` that `add_data_args`' flags set."""
    return dict(video_dir=args.video_dir, subtitle_dir=args.subtitle_dir,
                allow_absolute_paths=args.allow_absolute_paths)


# ---- prompt and response ----

# LongVILA-R1's thinking prompt, word for word as the model was trained with it (its model card's
# `system_prompt_thinking`, grammar included): the model answers best to the text it learned.
THINKING_PROMPT = ("You are a helpful assistant. The user asks a question, and then you solves it.\n\n"
                   "Please first think deeply about the question based on the given video, and then provide the "
                   "final answer. The reasoning process and answer are enclosed within <think> </think> and "
                   "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
                   "<answer> answer here </answer>.\n\n Question: {question}")
# The question alone, for models trained from scratch here. In our runs the tiny preset, given 600 SFT
# steps, did not learn to look past the thinking prompt's 80 fixed tokens to the question: it answered
# "first" to "what colour is the last scene?" (last-scene accuracy 21%), and reached 100% with this prompt.
PLAIN_PROMPT = "Question: {question}"
QUESTION_PROMPTS = {"thinking": THINKING_PROMPT, "plain": PLAIN_PROMPT}  # model.py init --question-prompt
SUBTITLES_INTRO = "This video's subtitles are listed below:\n"  # VideoMME's wording
# The thinking prompt names the video; an image question names the image instead (as the release's image
# evaluation template words it) and a text question nothing: "... think deeply about the question, and ...".
MEDIA_WORDS = {"image": (" based on the given video", " based on the given image"),
               "text": (" based on the given video", "")}


def build_prompt(record: Record, subtitles: str | None = None, template: str | None = None) -> tuple[str, str]:
    """The user's turn as (text before the video, text after it). The video comes first, as in Long-RL's
    training; model.py wraps the turn in the chat template and puts the video embeddings between the
    two pieces. The question is the record's problem with its options on lines "A. ...", as the
    LongVideo-Reason and VideoMME annotations write them. `subtitles` is the subtitle text (eval reads
    .srt files); None leaves it out. `template` holds "{question}": the checkpoint's `question_prompt`
    (VideoLM.question_prompt); None is THINKING_PROMPT, what LongVILA-R1 was trained with, its "the given
    video" changed for an image or a text question (MEDIA_WORDS).

    >>> before, after = build_prompt(record)   # a multiple-choice record with options red, green
    >>> print(before + "<video>" + after)
    <video>You are a helpful assistant. The user asks a question, and then you solves it.
    <BLANKLINE>
    Please first think deeply about the question based on the given video, and then provide the final ...
    <BLANKLINE>
     Question: What colour is the first scene?
    A. red
    B. green
    """
    question = record.problem + "".join(f"\n{option_letter(i)}. {o}" for i, o in enumerate(record.options))
    intro = f"{SUBTITLES_INTRO}{subtitles}\n\n" if subtitles else ""
    template = (template or THINKING_PROMPT).replace(*MEDIA_WORDS.get(record.data_type, ("", "")))
    return "", intro + template.replace("{question}", question)


def format_response(reasoning: str, answer: str) -> str:
    """The target response for SFT: format_response("Red is first.", "A") ==
    "<think>Red is first.</think><answer>A</answer>"."""
    return f"<think>{reasoning}</think><answer>{answer}</answer>"


# ---- subtitles ----
# A record's `subtitles` is either the text itself or the path of an .srt file (resolved against the data
# folder when the records are loaded, read when a prompt is built).

@dataclass
class Cue:
    start: float  # seconds
    end: float
    text: str


_SRT_TIME = r"(?:(\d+):)?(\d{1,2}):(\d{1,2})(?:[,.](\d{1,3}))?"
_SRT_TIMING = re.compile(rf"\s*{_SRT_TIME}\s*-->\s*{_SRT_TIME}.*")
_MARKUP = re.compile(r"<[^>]*>|\{\\[^}]*\}")  # <i>, <font color=...>, {\an8}


def _seconds(hours, minutes, seconds, fraction) -> float:
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds) + float(f"0.{fraction or 0}")


def parse_srt(text: str) -> tuple[list[Cue], int]:
    """Subtitle cues of an .srt file's text, sorted by start time, and the number of malformed cues
    skipped: (cues, skipped).

    Tolerates a byte-order mark, CRLF or CR line ends, missing blank lines between cues, "." for ","
    in times, markup (<i>, <font>, {\\an8}; removed) and overlapping cues (kept). A cue whose timing
    line does not parse or ends before it starts is skipped with all its text.

    >>> parse_srt("1\\n00:00:01,000 --> 00:00:02,500\\n<i>Hello</i>\\n\\n")
    ([Cue(start=1.0, end=2.5, text='Hello')], 0)
    """
    lines = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    cues, skipped, current = [], 0, None  # current: [start, end, text lines] of the cue being read
    for i, line in enumerate(lines):
        if "-->" in line:
            m = _SRT_TIMING.fullmatch(line)
            start, end = (_seconds(*m.groups()[:4]), _seconds(*m.groups()[4:])) if m else (0.0, -1.0)
            if end < start:
                skipped += 1
                current = None
            else:
                current = [start, end, []]
                cues.append(current)
            continue
        is_index = line.strip().isdigit() and i + 1 < len(lines) and "-->" in lines[i + 1]
        if current is not None and line.strip() and not is_index:
            current[2].append(_MARKUP.sub("", line).strip())
    cues = [Cue(start, end, " ".join(t for t in words if t)) for start, end, words in cues]
    return sorted((c for c in cues if c.text), key=lambda c: (c.start, c.end)), skipped


def subtitles_for_window(cues: list[Cue], t0: float, t1: float) -> str:
    """The text of the cues whose time span overlaps [t0, t1], in time order, one per line; a cue
    repeating the text of the one before it (rolling captions) is kept once.

    VideoMME's protocol: t0, t1 are the times of the first and last sampled frames.
    """
    kept = []
    for cue in sorted(cues, key=lambda c: (c.start, c.end)):
        if cue.end >= t0 and cue.start <= t1 and (not kept or kept[-1] != cue.text):
            kept.append(cue.text)
    return "\n".join(kept)


def subtitle_file(record: Record) -> str | None:
    """The .srt file this record's subtitles come from, or None when they are inline text (or absent)."""
    return record.subtitles if _is_srt_path(record.subtitles) else None


def subtitle_text(record: Record, timestamps=None) -> str | None:
    """The subtitles to show with this record's sampled frames: inline text as is; for an .srt file, the
    cues that overlap the span of the frames' `timestamps` (seconds), or every cue when `timestamps` is
    None. Raises VideoError naming the file when it cannot be read.

    >>> subtitle_text(record, timestamps=np.array([2.0, 3.0, 4.0]))   # record.subtitles = "/data/v.srt"
    'Hello there\nan overlapping cue'
    """
    path = subtitle_file(record)
    if path is None:
        return record.subtitles or None
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise video.VideoError(f"{path}: cannot read subtitle file ({e.strerror or e})") from e
    cues, skipped = parse_srt(text)
    if skipped:
        log.warning("%s: skipped %d malformed subtitle cue(s)", path, skipped)
    if timestamps is None or len(timestamps) == 0:
        return "\n".join(c.text for c in cues) or None
    return subtitles_for_window(cues, float(timestamps[0]), float(timestamps[-1])) or None


# ---- command line ----

def cmd_check(args) -> int:
    """Validate a record file and find its videos, print what it holds; 1 if anything is wrong (0 with
    --skip-bad, while some record is usable)."""
    records, bad_rows = load_records_report(args.file, **folder_args(args), check_subtitle_files=True)
    for e in bad_rows:
        print(f"error: {e}")
    print(f"{len(records)} good records, {len(bad_rows)} bad, in {args.file}")
    for key in ("data_type", "problem_type"):
        for value, n in sorted(Counter(getattr(r, key) for r in records).items()):
            print(f"  {key} {value}: {n}")
    for (label, value), n in sorted(Counter(kv for r in records for kv in r.labels.items()).items()):
        print(f"  {label} {value}: {n}")
    videos = [r for r in records if r.video]
    if args.decode:
        bad_records = check_videos(videos, video.FrameSampling.from_args(args), args.workers) if videos else 0
    else:
        opened = video.check_videos_open([r.video for r in videos], video.video_check_file(args.file))
        video.save_video_check(video.video_check_file(args.file), opened)
        for problem in filter(None, opened.values()):
            print(f"unreadable         {problem}")
        bad_records = sum(opened[r.video] is not None for r in videos)
        print(f"{len(opened)} videos: {sum(p is not None for p in opened.values())} missing or unreadable "
              f"({bad_records} record{'s' * (bad_records != 1)})")
    bad_records += check_images(records)
    usable = len(records) - bad_records
    return int(not usable or (bool(bad_rows or bad_records) and not args.skip_bad))




CHECK_IMAGE_SIZE = 32  # frames decoded by `check --decode` are resized to this; the size does not matter


def _check_video(path: str, sampling: video.FrameSampling) -> tuple[str | None, str]:
    """(the reader that read the video, or None; the line that reports it)."""
    try:
        read = video.read_video(path, CHECK_IMAGE_SIZE, sampling)
    except video.VideoError as e:
        return None, f"unreadable         {e}"
    why = f"  ({'; '.join(read.failures)})" if read.failures else ""
    return read.decoder, f"readable   {read.decoder:<7} {path}{why}"


def check_videos(records: list[Record], sampling: video.FrameSampling, workers: int = 1) -> int:
    """Read the sampled frames of every record's video with the real readers, as a run will, and print
    one line per video: readable and by which reader (with decord's reason where PyAV had to read it),
    or unreadable and why. Returns how many records have an unreadable video.

    >>> check_videos(load_records("train.jsonl"), video.FrameSampling(num_frames=16))
    readable   decord  /data/videos/a.mp4
    readable   pyav    /data/videos/b.mp4  (decord: ERROR cannot find video stream with wanted index: -1)
    unreadable         /data/videos/c.mp4: the file is cut short: its index lists 9000 frames, the file holds 4100
    3 videos: 1 read with decord, 1 with PyAV, 1 unreadable (1 record)
    1
    """
    paths = list(dict.fromkeys(r.video for r in records))
    read_with = {}
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        results = (pool.map(_check_video, paths, [sampling] * len(paths), chunksize=4) if pool
                   else (_check_video(p, sampling) for p in paths))
        for path, (decoder, line) in zip(paths, results):
            print(line, flush=True)
            read_with[path] = decoder
    counts = Counter(read_with.values())
    bad_records = sum(read_with[r.video] is None for r in records)
    print(f"{len(paths)} videos: {counts['decord']} read with decord, {counts['pyav']} with PyAV, "
          f"{counts[None]} unreadable ({bad_records} record{'s' * (bad_records != 1)})")
    return bad_records


def check_images(records: list[Record]) -> int:
    """Open every image record's image as a run will, print one line per image that cannot be read (missing,
    corrupt, CMYK / 16-bit / palette), and a count; returns how many records have such an image."""
    problems = {path: video.image_problem(path) for path in dict.fromkeys(r.image for r in records if r.image)}
    for problem in filter(None, problems.values()):
        print(f"unreadable         {problem}")
    bad_records = sum(problems[r.image] is not None for r in records if r.image)
    if problems:
        print(f"{len(problems)} images: {sum(p is not None for p in problems.values())} missing or unreadable "
              f"({bad_records} record{'s' * (bad_records != 1)})")
    return bad_records


def cmd_frames(args) -> int:
    """Print which frames a sampling setting takes from a video, and which reader reads them and why."""
    sampling = video.FrameSampling.from_args(args)
    read = video.read_video(args.video, args.image_size, sampling)
    indices, timestamps, pixels = read.indices, read.timestamps, read.frames
    print(f"{args.video}: {read.num_frames} frames at {read.fps:g} fps ({read.num_frames / read.fps:.2f} s)")
    print(f"reader: {read.decoder}, chosen first because {read.why}"
          + "".join(f"; could not: {failure}" for failure in read.failures))
    print(f"sampling {sampling.key()}: {len(indices)} frames")
    print("indices:   ", np.array2string(indices, separator=", ", threshold=64))
    print("timestamps:", np.array2string(timestamps, separator=", ", threshold=64, precision=3))
    print(f"frames: {pixels.dtype} {pixels.shape}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = commands.add_parser("check", formatter_class=fmt,
                            help="validate a record file (or folder) and find its videos")
    p.add_argument("file", help="a LongVideo-Reason or Video-MME record file (.jsonl, .json, .parquet) or folder")
    add_folder_args(p)
    p.add_argument("--skip-bad", action="store_true",
                   help="exit 0 when bad rows and unreadable videos are only skipped, as training skips them")
    p.add_argument("--decode", action="store_true",
                   help="read every video's sampled frames with the real readers (decord, else PyAV) and report "
                        "each one, instead of opening each video and reading its index")
    video.add_sampling_args(p)  # with --decode: the frames to read, as training samples them
    p.add_argument("--workers", type=int, default=1, help="with --decode: videos read in parallel processes")
    p.set_defaults(run=cmd_check)

    p = commands.add_parser("frames", formatter_class=fmt, help="show the frames sampled from a video")
    p.add_argument("video", help="a video file")
    video.add_sampling_args(p)
    p.add_argument("--image-size", type=int, default=64, help="frames are resized to this square size")
    p.set_defaults(run=cmd_frames)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.run(args)  # a RecordError or VideoError: errors.run_main prints it as one line


if __name__ == "__main__":
    errors.run_main(main)
