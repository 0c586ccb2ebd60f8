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

Scoring (`score_answer`, which rl.py's accuracy reward uses too):
    multiple_choice  `extract_choice`: the last complete <answer>...</answer> pair if there is one, else
                     the text after </think>, read as "B", "(B)", "B.", "B. red", "The answer is B",
                     "answer: b", or an option's full text. Naming several options, or none, is wrong.
    numerical        the one number in the answer (every number found must agree), correct when within
                     a relative 1e-2 or an absolute 1e-6 of the truth
    free_form        exact match after lower-casing, collapsing whitespace and dropping a final "."

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
import math
import os
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

import data
import errors
import train
from data import FrameSampling, Record, VideoError

log = logging.getLogger("eval")


# ---------------------------------------------------------------------------------------------------
# Answer extraction and scoring
# ---------------------------------------------------------------------------------------------------

# A complete <answer>...</answer> pair whose content holds no other answer tag.
_ANSWER_PAIR = re.compile(r"<answer>((?:(?!</?answer>).)*)</answer>", re.DOTALL)
_WELL_FORMED = re.compile(r"\s*<think>((?:(?!</?(?:think|answer)>).)*)</think>\s*"
                          r"<answer>((?:(?!</?(?:think|answer)>).)*)</answer>\s*", re.DOTALL)
_TAG = re.compile(r"</?(?:think|answer)>")

# Letter forms. A lowercase letter counts only where it cannot be an English word ("a", "I"): alone,
# in brackets, or ending a phrase ("answer: b").
_BARE = re.compile(r"\s*(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z]))[.:]?\s*")      # "B", "(b)", "B."
_LEADING = re.compile(r"\s*(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])[.):\n])(.*)", re.DOTALL)  # "B. red", "(B) red"
_ONE = r"(?:\([A-Z]\)|\[[A-Z]\]|[A-Z](?![A-Za-z0-9]))"
_LIST = re.compile(rf"\s*{_ONE}(?:\s*(?:,|/|&|\band\b|\bor\b)\s*{_ONE})+\s*\.?\s*")     # "A, C", "A or C"
# The letters after an answer phrase: "B", "(b)", "b" at the end, and any "or C" / ", D" that follow.
_PHRASE_LETTERS = (r"(\([A-Za-z]\)|\[[A-Za-z]\]|[A-Z](?![A-Za-z0-9])|[a-z](?=\s*$|[.,;:!?)\]]))"
                   rf"((?:\s*(?:,|/|\band\b|\bor\b)\s*{_ONE})*)")
_PHRASES = [re.compile(f"(?i:{head})" + _PHRASE_LETTERS + (f"(?i:{tail})" if tail else "")) for head, tail in (
    (r"\banswer\b(?:\s+(?:is|would be|should be|will be))?\s*[:=\-]?\s*(?:option\s+|choice\s+)?", ""),
    (r"\b(?:correct|best|right)\s+(?:option|choice)(?:\s+(?:is|would be|should be))?\s*[:=\-]?\s*", ""),
    (r"\b(?:option|choice)\s+", r"\s+is\s+(?:the\s+)?(?:correct|right|best|answer)\b"),
)]


def extract_answer(response: str) -> str | None:
    """The stripped content of the last complete <answer>...</answer> pair, or None.

    >>> extract_answer("<think>hmm</think><answer> B </answer>")
    'B'
    >>> extract_answer("<answer>A</answer> wait, <answer>C")   # an unclosed tag does not count
    'A'
    """
    pairs = _ANSWER_PAIR.findall(response)
    return pairs[-1].strip() if pairs else None


def is_well_formed(response: str) -> bool:
    """The whole response is <think>...</think><answer>...</answer> (whitespace around is fine), no
    tag nested inside another, and the answer is not empty. This is the format the rewards ask for."""
    m = _WELL_FORMED.fullmatch(response)
    return bool(m) and bool(m.group(2).strip())


def _final_text(response: str) -> tuple[str, bool]:
    """What the response gives as its answer: (text, from_tag). The last complete answer tag's content;
    without one, the text after the last </think> (the reasoning may mention every option)."""
    tagged = extract_answer(response)
    if tagged is not None:
        return tagged, True
    return response.rsplit("</think>", 1)[-1], False


def _normalise_text(text: str) -> str:
    """Lower case, single spaces, no final full stop: "  The  Red ball. " -> "the red ball"."""
    return " ".join(text.lower().split()).removesuffix(".").strip()


def _phrase_letters(text: str) -> set[str]:
    """Letters named after answer phrases: "The answer is B" -> {"B"}; "answer: a or C" -> {"A", "C"}."""
    letters = set()
    for pattern in _PHRASES:
        for m in pattern.finditer(text):
            letters |= set(re.findall(r"(?<![A-Za-z])[A-Za-z](?![A-Za-z])", f"{m.group(1)} {m.group(2)}"))
    return {c.upper() for c in letters}


def _read_choice(text: str, options: list[str]) -> tuple[set[str], str]:
    """The option letters (upper case) a short answer text names, and which form named them."""
    text = _TAG.sub(" ", text)
    if m := _BARE.fullmatch(text):
        return {next(g for g in m.groups() if g).upper()}, "bare_letter"
    if _LIST.fullmatch(text):
        return set(re.findall(r"(?<![A-Za-z])[A-Z](?![A-Za-z])", text)), "multiple"
    wanted = _normalise_text(text)
    by_text = {data.option_letter(i) for i, o in enumerate(options) if wanted and _normalise_text(o) == wanted}
    if by_text:
        return by_text, "option_text"
    if m := _LEADING.match(text):  # "B. red": the text after the letter must not name another option
        letter, rest = next(g for g in m.groups()[:3] if g), _normalise_text(m.group(4))
        named = {data.option_letter(i) for i, o in enumerate(options) if rest and _normalise_text(o) == rest}
        return {letter} | named | _phrase_letters(text), "bare_letter"
    return _phrase_letters(text), "phrase"


def extract_choice(response: str, num_options: int, options: list[str] | None = None
                   ) -> tuple[str | None, str]:
    """The option letter a response chose, and how it was found: (letter or None, how).

    how is "tag" (read inside the last complete <answer> pair), "bare_letter" ("B", "(B)", "B.",
    "B. red"), "phrase" ("The answer is B", "answer: b", "Option C is correct"), "option_text" (the
    full text of one option, needs `options`), "multiple" (several different letters: wrong) or
    "none" (no letter, or one past the last option: wrong).

    >>> extract_choice("<think>...</think><answer>C</answer>", 4)
    ('C', 'tag')
    >>> extract_choice("The answer is (b).", 4)
    ('B', 'phrase')
    >>> extract_choice("A or C", 4)
    (None, 'multiple')
    """
    text, from_tag = _final_text(response)
    letters, how = _read_choice(text, list(options or [])[:num_options])
    if len(letters) > 1:
        return None, "multiple"
    if not letters or ord(min(letters)) - ord("A") >= num_options:
        return None, "none"
    return letters.pop(), "tag" if from_tag else how


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_number(text: str) -> float | None:
    """The number a text states: every number in it must have the same value ("3", "about 3.0
    scenes", "1,000"); none, or two different ones ("3 or 4"), gives None."""
    values = {float(m.replace(",", "")) for m in _NUMBER.findall(text)}
    values = {v for v in values if math.isfinite(v)}
    return values.pop() if len(values) == 1 else None


def numbers_match(prediction: float, truth: float) -> bool:
    """Within a relative 1e-2 of the truth, or an absolute 1e-6 (so a truth of 0 needs ~0)."""
    return abs(prediction - truth) <= max(1e-2 * abs(truth), 1e-6)


def _grade(record: Record, response: str) -> tuple[bool, str | None, str]:
    """(correct, prediction, how) for one response; see score_answer."""
    if record.problem_type == "multiple_choice":
        letter, how = extract_choice(response, len(record.options), record.options)
        return letter == record.answer, letter, how
    text, from_tag = _final_text(response)
    if record.problem_type == "numerical":
        value = parse_number(text)
        prediction = None if value is None else f"{value:g}"
        correct = value is not None and numbers_match(value, float(record.answer))
    else:
        prediction = _normalise_text(text) or None
        correct = prediction == _normalise_text(record.answer)
    how = "none" if prediction is None else "tag" if from_tag else "untagged"
    return correct, prediction, how


def score_answer(record: Record, response: str) -> tuple[bool, str | None]:
    """Is the response's answer right? (correct, prediction): prediction is the option letter, the
    number (as text) or the normalised free-form answer, None when none could be read.

    >>> score_answer(record, "<think>Scene 1 is red.</think><answer>A</answer>")   # record.answer == "A"
    (True, 'A')
    """
    correct, prediction, _ = _grade(record, response)
    return correct, prediction


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
    label, each value -> {accuracy, correct, n}; format_compliance (fraction of answered questions with
    a well-formed <think>...</think><answer>...</answer>); extraction (answered questions by `how`);
    truncated (responses cut at the length limit); errors {count, items: [{problem_id or line, reason}]};
    decoders (answered videos by the reader that decoded them: {"decord": 950, "pyav": 50}); settings. Predictions of problem_ids not in `records` are ignored.
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
        train.check_settings(path, settings, ignore=_RESUMABLE, holds="predictions",
                             remedy="use another output folder or delete it")
    path.write_text(json.dumps(settings, indent=2) + "\n")


class PromptTooLong(ValueError):
    """A question whose prompt (video included) leaves the engine no room for a response."""


def _prompt(model, record: Record, sampling: FrameSampling, subtitles: bool, cache: dict):
    """Prompt embeddings [L, D] for one record. `cache` keeps the last video's embeddings: VideoMME
    asks three questions about each video, one after another."""
    if record.video not in cache:
        cache.clear()
        frames, timestamps = data.load_frames(record.video, model.config.image_size, sampling)
        with torch.no_grad():
            cache[record.video] = (model.encode_video(frames), timestamps)   # [T * tpf, D]
    video_embeds, timestamps = cache[record.video]
    subs = data.subtitle_text(record, timestamps) if subtitles else None
    before, after = model.user_turn(record, subs)
    with torch.no_grad():
        return model.prompt_embeds(before, video_embeds, after)                # [L, D]


def _prediction_row(record: Record, response: str | None, finish_reason: str | None = None,
                    error: str | None = None) -> dict:
    correct, prediction, how = _grade(record, response) if error is None else (False, None, "error")
    return {"problem_id": record.problem_id, "problem_type": record.problem_type, "answer": record.answer,
            "prediction": prediction, "correct": correct, "how": how,
            "format_ok": error is None and is_well_formed(response), "labels": record.labels,
            "finish_reason": finish_reason, "error": error, "response": response,
            "decoder": None if error else data.decoder_of(record.video)}


def _answer_batch(model, engine, batch: list[Record], sampling, subtitles, cache, strict,
                  generate_kw) -> list[dict]:
    """Prediction rows for a batch of records: one generate call for every record whose inputs load."""
    rows, prompts, asked = [], [], []
    max_len = getattr(engine, "max_model_len", None)
    for record in batch:
        try:
            prompt = _prompt(model, record, sampling, subtitles, cache)                # [L, D]
            if max_len is not None and len(prompt) >= max_len:
                raise PromptTooLong(f"the prompt has {len(prompt)} positions, the engine's max_model_len is "
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
             settings: dict | None = None) -> dict:
    """Answer every record with `engine`, score, write OUT/predictions.jsonl and OUT/report.json,
    and return the report.

    `record_errors` are the malformed lines from data.load_records_report (counted as wrong).
    `settings` adds entries to the report's settings (e.g. the checkpoint). With `resume`, questions
    already in predictions.jsonl are not asked again, so a call after training must use a fresh
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
    cache = {}
    with open(pred_path, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc="eval") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            for row in _answer_batch(model, engine, batch, sampling, subtitles, cache, strict,
                                     generate_kw):
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
    data.add_sampling_args(p, num_frames=None)  # None: the checkpoint's own setting
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
                   help="longest prompt + response in positions; a longer prompt is reported as an error")
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
    engine = rollout.make_engine(args.engine, model, Path(args.checkpoint) / "llm",
                                 max_model_len=args.max_model_len, dtype=args.dtype)
    report = evaluate(model, engine, records, sampling, args.out, subtitles=args.subtitles,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      seed=args.seed, batch_size=args.batch_size, record_errors=record_errors,
                      strict=args.strict,
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
