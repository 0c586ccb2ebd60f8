"""Benchmark evaluation: VideoMME-style and LongVideo-Reason-style video question answering.

A checkpoint answers every question of a record file (data.py's format) through a rollout engine
(rollout.py), greedy by default; each answer is scored and the results are written as

    OUT/predictions.jsonl   one line per question, appended as questions finish (resume reads it back)
    OUT/report.json         accuracy, n, a breakdown by every label, format compliance, extraction counts,
                            errors, the videos each reader decoded (decord, or PyAV where decord
                            cannot), and the settings used
    OUT/settings.json       the settings that change answers; a resumed run must use the same ones

Run it (record files as published: LongVideo-Reason's JSON/JSONL/parquet, Video-MME's parquet; data.py):
    python eval.py --checkpoint runs/rl/final --data data/synth/test.jsonl --out runs/eval
    python eval.py --checkpoint CKPT --data Video-MME/videomme/test-00000-of-00001.parquet --out runs/videomme \
        --fps 1 --subtitles          # videos in Video-MME/data/, subtitles in Video-MME/subtitle/
    python eval.py --checkpoint CKPT --data LongVideo-Reason/eval.json --video-dir LongVideo-Reason/videos \
        --out runs/lvr-eval

Scoring: grading.py (`score_answer`), shared with rl.py's rewards.

Errors: a question that cannot be asked (a bad row in the record file, a video or subtitle file that
is missing or cannot be decoded) counts in `n` as wrong, so accuracy stays comparable to a run on the
whole benchmark; `errors` lists each with its reason and `accuracy_answered` leaves them out. `--strict`
stops at the first one instead. Bad rows have no trustworthy labels, so they appear in no `by_<label>`
breakdown. A run in which no question could be asked exits with status 1.

Resume: rerunning the same command skips every problem_id already in predictions.jsonl (errors
included; delete their lines to retry them), and the report is always computed from that file, so it
equals the report of an uninterrupted run.
"""
import argparse
import json
import logging
import os
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

import data
import errors
import grading
import runs
import video
from data import Record
from video import FrameSampling, VideoError

log = logging.getLogger("eval")


# ---------------------------------------------------------------------------------------------------
# Converting public annotation files into our record format
# ---------------------------------------------------------------------------------------------------

def read_rows(path) -> list[dict]:
    """The rows of a JSON list file or a JSONL file."""
    text = Path(path).read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _field(row: dict, name: str, where: str):
    if name not in row:
        raise ValueError(f"{where}: missing field {name!r}")
    return row[name]


_OPTION_PREFIX = re.compile(r"^\s*\(?([A-Z])[.):]\s*")


def convert_videomme(rows: list[dict], videos_dir, subtitles_dir=None, root=".") -> list[dict]:
    """VideoMME annotation rows -> our record dicts (see the module docstring's table). Paths are
    written relative to `root`, the folder the record file will live in.

    >>> convert_videomme([{"video_id": "001", "videoID": "fFjv93ACGo8", "question_id": "001-1",
    ...     "question": "What colour?", "options": ["A. red", "B. blue"], "answer": "B",
    ...     "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
    ...     "task_type": "Counting Problem"}], "videos")[0]["options"]
    ['red', 'blue']
    """
    records = []
    flat = [{**{k: v for k, v in row.items() if k != "questions"}, **q} if "questions" in row else row
            for row in rows for q in (row.get("questions") or [None])]
    for i, row in enumerate(flat):
        where = f"VideoMME row {i} ({row.get('question_id', '?')})"
        video_name = _field(row, "videoID", where)
        options = [_OPTION_PREFIX.sub("", o, count=1).strip() for o in _field(row, "options", where)]
        srt = Path(subtitles_dir) / f"{video_name}.srt" if subtitles_dir else None
        records.append({
            "problem_id": str(_field(row, "question_id", where)),
            "videos": os.path.relpath(Path(videos_dir) / f"{video_name}.mp4", root),
            "problem": _field(row, "question", where),
            "options": options,
            "problem_type": "multiple_choice",
            "reasoning": "",
            "answer": _field(row, "answer", where).strip(),
            "subtitles": os.path.relpath(srt, root) if srt and srt.is_file() else None,
            **{k: str(row[k]) for k in ("duration", "domain", "sub_category", "task_type") if k in row},
        })
    return records


_PROBLEM_TYPES = {"multiple choice": "multiple_choice", "multiple_choice": "multiple_choice",
                  "numerical": "numerical", "numeric": "numerical",
                  "free-form": "free_form", "free_form": "free_form", "free form": "free_form"}


def split_options(problem: str) -> tuple[str, list[str]]:
    """A question with its options embedded as lines -> (question, options). Option lines are "A. x",
    "A) x" or "(A) x", lettered A, B, C, ... in order; an "Options:" line before them is dropped.

    >>> split_options("Why does he run?\\nA. rain\\nB. a bus\\n")
    ('Why does he run?', ['rain', 'a bus'])
    """
    lines = problem.splitlines()
    question, options = [], []
    for line in lines:
        m = _OPTION_PREFIX.match(line)
        if m and m.group(1) == data.option_letter(len(options)):
            options.append(line[m.end():].strip())
        elif not options:
            question.append(line)
        elif line.strip():  # a continuation of the previous option
            options[-1] += " " + line.strip()
    if question and question[-1].strip().lower().rstrip(":") == "options":
        question.pop()
    return "\n".join(question).strip(), options


def convert_longvideo_reason(rows: list[dict], videos_dir, root=".") -> list[dict]:
    """LongVideo-Reason release rows -> our record dicts (see the module docstring's table)."""
    records = []
    for i, row in enumerate(rows):
        where = f"LongVideo-Reason row {i} ({row.get('problem_id', '?')})"
        video = _field(row, "videos", where)
        video = video[0] if isinstance(video, list) and len(video) == 1 else video
        if not isinstance(video, str):
            raise ValueError(f"{where}: field 'videos' must be one path, got {video!r:.80}")
        kind = str(_field(row, "problem_type", where)).strip().lower()
        if kind not in _PROBLEM_TYPES:
            raise ValueError(f"{where}: unknown problem_type {kind!r}")
        problem_type = _PROBLEM_TYPES[kind]
        question, options = _field(row, "problem", where), []
        if problem_type == "multiple_choice":
            question, options = split_options(question)
            if len(options) < 2:
                raise ValueError(f"{where}: found {len(options)} option line(s) ('A. ...') in 'problem'")
        answer = str(_field(row, "answer", where)).strip()
        answer = (grading.extract_answer(answer) if "<answer>" in answer else answer) or answer
        record = {"problem_id": str(_field(row, "problem_id", where)),
                  "videos": os.path.relpath(Path(videos_dir) / video, root), "problem": question,
                  "options": options, "problem_type": problem_type, "reasoning": row.get("reasoning", ""),
                  "answer": answer}
        category = row.get("reasoning_type", row.get("type"))
        if category:
            record["category"] = str(category).strip().lower()
        records.append(record)
    return records


def write_jsonl(records: list[dict], path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


# ---------------------------------------------------------------------------------------------------
# Predictions file, report
# ---------------------------------------------------------------------------------------------------

def read_predictions(path) -> dict[str, dict]:
    """problem_id -> prediction row of a predictions.jsonl. A truncated last line (a run killed while
    writing it) is cut off the file, so appending goes on from a clean line end."""
    path = Path(path)
    if not path.exists():
        return {}
    raw = path.read_bytes()
    rows, good_end = {}, 0
    for n, line in enumerate(raw.splitlines(keepends=True), start=1):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no line end")
            row = json.loads(line)
        except ValueError:
            if good_end + len(line) < len(raw):
                raise errors.UsageError(f"{path} line {n} is corrupt; delete the line to redo that question")
            log.warning("%s: dropping a truncated last line (%d bytes)", path, len(line))
            with open(path, "r+b") as f:
                f.truncate(good_end)
            break
        good_end += len(line)
        rows[row["problem_id"]] = row
    return rows


def _breakdown(rows: list[dict]) -> dict:
    correct = sum(r["correct"] for r in rows)
    return {"accuracy": correct / len(rows) if rows else 0.0, "correct": correct, "n": len(rows)}


def build_report(records: list[Record], predictions: dict[str, dict], record_errors=(),
                 settings: dict | None = None) -> dict:
    """The report of a finished run, from its prediction rows (in record order) and the malformed
    lines of the record file. Error rows and malformed lines count as wrong.

    Keys: accuracy, n, correct; accuracy_answered and n_answered (errors left out); by_<label> for every
    label and by_data_type (video, image, text), each value -> {accuracy, correct, n}; format_compliance
    (fraction of answered questions with a well-formed <think>...</think><answer>...</answer>); extraction
    (answered questions by `how`); truncated (responses cut at the length limit); errors {count, items:
    [{problem_id or line, reason}]}; decoders (answered videos by the reader that decoded them: {"decord":
    950, "pyav": 50}); settings. Predictions of problem_ids not in `records` are ignored.
    """
    rows = [predictions[r.problem_id] for r in records if r.problem_id in predictions]
    answered = [r for r in rows if r.get("error") is None]
    n = len(rows) + len(record_errors)
    correct = sum(r["correct"] for r in rows)
    report = {"accuracy": correct / n if n else 0.0, "n": n, "correct": correct,
              "accuracy_answered": correct / len(answered) if answered else 0.0, "n_answered": len(answered)}
    by_label = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for label, value in row["labels"].items():
            by_label[label][value].append(row)
    kinds = {r.problem_id: r.data_type for r in records}
    for row in rows:  # by kind (video, image, text), whatever the labels say
        by_label["data_type"][kinds[row["problem_id"]]].append(row)
    for label in sorted(by_label):
        report[f"by_{label}"] = {value: _breakdown(group) for value, group in sorted(by_label[label].items())}
    report["format_compliance"] = sum(r["format_ok"] for r in answered) / len(answered) if answered else 0.0
    report["extraction"] = dict(sorted(Counter(r["how"] for r in answered).items()))
    report["truncated"] = sum(r.get("finish_reason") == "length" for r in answered)
    video = {r.problem_id: r.video for r in records}
    read_by = {video[r["problem_id"]]: r["decoder"] for r in answered if r.get("decoder")}
    report["decoders"] = dict(sorted(Counter(read_by.values()).items()))
    report["errors"] = {
        "count": n - len(answered),
        "items": [{"problem_id": r["problem_id"], "reason": r["error"]} for r in rows if r.get("error")]
                 + [{"line": e.line, "reason": str(e)} for e in record_errors],
    }
    report["settings"] = settings or {}
    return report


def format_table(report: dict) -> str:
    """The report as a few aligned lines: overall, then one block per label."""
    pct = lambda x: f"{100 * x:5.1f}%"
    lines = [f"accuracy {pct(report['accuracy'])}  ({report['correct']}/{report['n']})   "
             f"errors {report['errors']['count']}   format {pct(report['format_compliance'])}   "
             f"extraction " + ", ".join(f"{k} {v}" for k, v in report["extraction"].items())]
    for key in (k for k in report if k.startswith("by_")):
        lines.append(f"{key[3:]}:")
        width = max(len(v) for v in report[key])
        lines += [f"  {value:<{width}}  {pct(b['accuracy'])}  {b['correct']:>5}/{b['n']}"
                  for value, b in report[key].items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Running a model over the records
# ---------------------------------------------------------------------------------------------------

# Settings that do not change answers: a resumed run may use other values.
_RESUMABLE = {"batch_size", "strict"}


def _check_settings(out_dir: Path, settings: dict, resuming: bool) -> None:
    """Write settings.json; when resuming, first make sure the earlier part used the same settings."""
    path = out_dir / "settings.json"
    if resuming:
        runs.check_settings(path, settings, ignore=_RESUMABLE, holds="predictions",
                             remedy="use another output folder or delete it")
    path.write_text(json.dumps(settings, indent=2) + "\n")


class PromptTooLong(ValueError):
    """A question whose prompt (video included) leaves the engine no room for a response."""


def _prompt(model, record: Record, sampling: FrameSampling, subtitles: bool, cache: dict,
            reader: video.FramePrefetcher):
    """The model.Prompt of one record. `cache` keeps the last video's (or image's) embeddings: VideoMME asks
    three questions about each video, one after another. `reader` reads the frames (or has them read ahead).
    An image is encoded as one frame; a text question has no media."""
    if record.media is not None and record.media not in cache:
        cache.clear()
        frames, timestamps = reader.load_frames(record.video, sampling) if record.video else \
            (model.image_frames(record.image), None)
        with torch.no_grad():
            cache[record.media] = (model.encode_video(frames), timestamps)   # [steps * tps, D]
    media_embeds, timestamps = cache[record.media] if record.media is not None else (None, None)
    subs = data.subtitle_text(record, timestamps) if subtitles else None
    before, after = model.user_turn(record, subs)
    with torch.no_grad():
        return model.prompt(before, media_embeds, after, timestamps, media=record.data_type)


def _prediction_row(record: Record, response: str | None, finish_reason: str | None = None,
                    error: str | None = None) -> dict:
    correct, prediction, how = grading.grade(record, response) if error is None else (False, None, "error")
    return {"problem_id": record.problem_id, "problem_type": record.problem_type, "answer": record.answer,
            "prediction": prediction, "correct": correct, "how": how,
            "format_ok": error is None and grading.is_well_formed(response), "labels": record.labels,
            "finish_reason": finish_reason, "error": error, "response": response,
            "decoder": None if error or not record.video else video.decoder_of(record.video)}


def _answer_batch(model, engine, batch: list[Record], sampling, subtitles, cache, strict,
                  generate_kw, reader: video.FramePrefetcher) -> list[dict]:
    """Prediction rows for a batch of records: one generate call for every record whose inputs load."""
    rows, prompts, asked = [], [], []
    max_len = getattr(engine, "max_model_len", None)
    for record in batch:
        try:
            prompt = _prompt(model, record, sampling, subtitles, cache, reader)
            if max_len is not None and len(prompt) >= max_len:
                raise PromptTooLong(f"the prompt has {len(prompt)} tokens, the engine's max_model_len is "
                                    f"{max_len} (use fewer frames or a larger --max-model-len)")
            prompts.append(prompt)
            asked.append(record)
        except (VideoError, OSError, PromptTooLong) as e:
            if strict:
                raise
            log.warning("%s: %s", record.problem_id, e)
            rows.append(_prediction_row(record, None, error=f"{type(e).__name__}: {e}"))
    if prompts:
        samples = engine.generate(prompts, n=1, **generate_kw)
        rows += [_prediction_row(r, s[0].text, s[0].finish_reason) for r, s in zip(asked, samples)]
    return rows


def evaluate(model, engine, records: list[Record], sampling: FrameSampling, out_dir, *,
             subtitles: bool = False, max_new_tokens: int = 512, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 8, record_errors=(),
             strict: bool = False, resume: bool = True,
             settings: dict | None = None, decode_workers: int = 0) -> dict:
    """Answer every record with `engine`, score, write OUT/predictions.jsonl and OUT/report.json,
    and return the report.

    `record_errors` are the malformed lines from data.load_records_report (counted as wrong).
    `settings` adds entries to the report's settings (e.g. the checkpoint). `decode_workers` threads read
    the next batch's videos while the engine answers the current one (0: read each when needed). With
    `resume`, questions already in predictions.jsonl are not asked again, so a call after training must use a fresh
    `out_dir` or resume=False. Greedy decoding (temperature 0) makes a resumed run's answers those of
    an uninterrupted one; with sampling they are other samples (the seed stream follows the batches).

    >>> report = evaluate(model, engine, records, FrameSampling(num_frames=16), "runs/sft/eval")
    >>> print(f"held-out accuracy after SFT: {report['accuracy']:.3f}")
    """
    if strict and record_errors:
        raise record_errors[0]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path = out_dir / "predictions.jsonl"
    if not resume:
        pred_path.unlink(missing_ok=True)
    generate_kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    settings = {**(settings or {}), "num_frames": sampling.num_frames, "fps": sampling.fps,
                "max_frames": sampling.max_frames, "subtitles": subtitles, **generate_kw,
                "batch_size": batch_size, "strict": strict}
    done = read_predictions(pred_path)
    _check_settings(out_dir, settings, resuming=bool(done))
    todo = [r for r in records if r.problem_id not in done]
    if done:
        log.info("resuming: %d of %d questions already answered in %s", len(records) - len(todo),
                 len(records), pred_path)
    cache, reader = {}, video.FramePrefetcher(model.config.image_size, decode_workers)
    with open(pred_path, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc="eval") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            reader.prefetch((r.video, sampling) for r in todo[start:start + 2 * batch_size]  # this batch, the next
                            if r.video and r.video not in cache)  # the last video's embeddings are kept
            for row in _answer_batch(model, engine, batch, sampling, subtitles, cache, strict,
                                     generate_kw, reader):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(batch))
    report = build_report(records, read_predictions(pred_path), record_errors, settings)
    tmp = out_dir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out_dir / "report.json")
    return report


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

def _eval_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="VideoLM checkpoint folder (config.json, llm/, ...)")
    data.add_data_args(p, "the questions")
    p.add_argument("--out", required=True,
                   help="report folder: predictions.jsonl, report.json; an unfinished run there resumes")
    video.add_sampling_args(p, num_frames=None)  # None: the checkpoint's own setting
    video.add_prefetch_args(p)
    p.add_argument("--subtitles", action=argparse.BooleanOptionalAction, default=False,
                   help="show each record's subtitles (the .srt cues within the sampled frames' span)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest response")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="prompts per generate call (each holds its whole video: lower it for long videos)")
    p.add_argument("--engine", choices=["torch", "vllm"], default="torch",
                   help="rollout engine; vllm is much faster on long runs but takes a while to start")
    p.add_argument("--max-model-len", type=int, default=8192,
                   help="longest prompt + response in tokens; a longer prompt is reported as an error")
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="device of the model")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16" if cuda else "float32",
                   help="model weights' dtype")
    return p


def checkpoint_sampling(config: dict, num_frames: int | None, fps: float | None, max_frames: int) -> FrameSampling:
    """The frame sampling asked for on the command line, else the checkpoint's own: its config.json's `fps`
    when that is > 0, else its `num_video_frames` (16 when it has neither)."""
    if num_frames is None and fps is None:
        fps = config.get("fps") or None
        num_frames = config.get("num_video_frames") or 16
    return FrameSampling(num_frames=num_frames, fps=fps, max_frames=max_frames)


def main(argv=None) -> int:
    args = _eval_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import rollout
    from model import VideoLM

    records, record_errors = data.load_records_report(args.data, **data.folder_args(args))
    print(data.summary(args.data, records, record_errors), file=sys.stderr, flush=True)
    model = VideoLM.load(args.checkpoint, dtype=getattr(torch, args.dtype), device=args.device).eval()
    sampling = checkpoint_sampling(model.release_config, args.num_frames, args.fps, args.max_frames)
    log.info("frames: %s", sampling.key())
    engine = rollout.make_engine(args.engine, model, model.family.llm_folder(Path(args.checkpoint)),
                                 max_model_len=args.max_model_len, dtype=args.dtype)
    report = evaluate(model, engine, records, sampling, args.out, subtitles=args.subtitles,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      seed=args.seed, batch_size=args.batch_size, record_errors=record_errors,
                      strict=args.strict, decode_workers=args.decode_workers,
                      settings={"checkpoint": os.path.abspath(args.checkpoint),
                                "data": os.path.abspath(args.data), "engine": args.engine,
                                "max_model_len": args.max_model_len, "dtype": args.dtype})
    engine.close()
    print(format_table(report))
    print(f"report: {Path(args.out) / 'report.json'}")
    if report["n_answered"] == 0:
        print(f"error: no question of {args.data} could be asked: {len(records)} records read, "
              f"{len(record_errors)} bad rows, {report['errors']['count'] - len(record_errors)} records whose "
              f"video or subtitles could not be read (see {Path(args.out) / 'report.json'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    errors.run_main(main)
