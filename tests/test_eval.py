"""Tests for eval.py: converters, the report and resume (answer grading: test_grading.py).

The report tests run the real evaluate() on real mp4 files and the tiny VideoLM, with a scripted engine
(a plain object with generate()) that answers with chosen texts, so the expected accuracy is known
exactly. The last test runs the command line end to end with the torch engine.
"""
import json

import numpy as np
import pytest

import data
import eval as evaluation
from data import FrameSampling, Record, load_records, load_records_report, write_mp4
from eval import build_report, read_predictions, split_options
from rollout import Sample

OPTIONS = ["red", "blue", "green", "cyan"]


# ---- converters ----

def test_convert_videomme_flat_and_nested(tmp_path):
    for name in ("videos/fFjv93ACGo8.mp4", "videos/zzz.mp4", "subtitles/fFjv93ACGo8.srt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    flat = {"video_id": "001", "videoID": "fFjv93ACGo8", "question_id": "001-1", "duration": "short",
            "domain": "Knowledge", "sub_category": "Humanity & History", "task_type": "Counting Problem",
            "question": "How many red cars?", "options": ["A. 1", "B. 2", "C. 3", "D. 4"], "answer": "C"}
    nested = {"video_id": "002", "videoID": "zzz", "duration": "long", "domain": "Sports",
              "sub_category": "Football", "questions": [
                  {"question_id": "002-1", "task_type": "Action Reasoning", "question": "Who scores?",
                   "options": ["A. The keeper", "B. The striker", "C. Nobody", "D. The referee"], "answer": "B"}]}
    (tmp_path / "videomme.json").write_text(json.dumps([flat, nested]))
    out = tmp_path / "converted" / "videomme.jsonl"
    assert evaluation.main(["convert-videomme", "--annotations", str(tmp_path / "videomme.json"),
                            "--videos", str(tmp_path / "videos"), "--subtitles", str(tmp_path / "subtitles"),
                            "--out", str(out)]) == 0
    first, second = load_records(out)  # paths are relative to the record file's folder
    assert (first.problem_id, first.options, first.answer) == ("001-1", ["1", "2", "3", "4"], "C")
    assert first.video == str(tmp_path / "videos" / "fFjv93ACGo8.mp4")
    assert first.subtitles == str(tmp_path / "subtitles" / "fFjv93ACGo8.srt")  # made absolute on load
    assert first.labels == {"duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
                            "task_type": "Counting Problem"}
    assert (second.problem_id, second.answer, second.subtitles) == ("002-1", "B", None)
    assert second.options[1] == "The striker" and second.labels["duration"] == "long"


def test_convert_longvideo_reason(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "sports_1.mp4").write_text("x")
    rows = [
        {"problem_id": 1, "data_type": "video", "videos": ["sports_1.mp4"], "problem_type": "multiple choice",
         "problem": "Why does the team change its formation?\nOptions:\nA. Injury\nB) To defend a lead\n"
                    "(C) The weather\nD. A red card\n", "reasoning": "They lead 2-0 late on.",
         "answer": "<answer>B</answer>", "reasoning_type": "Goal"},
        {"problem_id": 2, "data_type": "video", "videos": "sports_1.mp4", "problem_type": "multiple choice",
         "problem": "What happens first?\nA. A goal\nB. A foul", "reasoning": "", "answer": "<answer>A</answer>",
         "type": "temporal"},
    ]
    (tmp_path / "lvr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "lvr_eval.jsonl"
    evaluation.main(["convert-longvideo-reason", "--annotations", str(tmp_path / "lvr.jsonl"),
                     "--videos", str(tmp_path / "videos"), "--out", str(out)])
    first, second = load_records(out)
    assert first.problem == "Why does the team change its formation?"
    assert first.options == ["Injury", "To defend a lead", "The weather", "A red card"]
    assert (first.problem_id, first.answer, first.reasoning) == ("1", "B", "They lead 2-0 late on.")
    assert first.labels == {"category": "goal"} and second.labels == {"category": "temporal"}
    assert second.options == ["A goal", "A foul"]
    assert split_options("No options here") == ("No options here", [])
    with pytest.raises(ValueError, match="row 0 .*option"):
        evaluation.convert_longvideo_reason([{**rows[0], "problem": "Why?"}], "videos")


# ---- evaluate(): report, errors, resume ----

class ScriptedEngine:
    """Answers the prompts it is given, in order, with chosen texts: the report logic is under test,
    not generation. `fail_after` raises once that many prompts would have been answered (an interrupt)."""

    def __init__(self, texts, fail_after=None):
        self.texts, self.fail_after, self.asked = list(texts), fail_after, 0

    def generate(self, prompts, n, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        assert n == 1 and temperature == 0.0 and all(p.dim() == 2 for p in prompts)
        if self.fail_after is not None and self.asked + len(prompts) > self.fail_after:
            raise KeyboardInterrupt("interrupted")
        texts = self.texts[self.asked:self.asked + len(prompts)]
        self.asked += len(prompts)
        return [[Sample(token_ids=[1], logprobs=[0.0], finish_reason="eos", text=t)] for t in texts]


# (record line, the scripted response); q5's video cannot be decoded, line 6 is malformed
EVAL_SET = [
    (dict(problem_id="q1", answer="A", duration="short", category="first"),
     "<think>red first</think><answer>A</answer>"),
    (dict(problem_id="q2", answer="B", duration="short", category="after"), "The answer is C"),
    (dict(problem_id="q3", answer="C", duration="long", category="count"), "C"),
    (dict(problem_id="q4", problem_type="numerical", options=[], answer="3", duration="long", category="count"),
     "<think>three</think><answer>3.0</answer>"),
    (dict(problem_id="q5", videos="videos/broken.mp4", answer="A", duration="long", category="first"), None),
    (dict(problem_id="bad", answer="E", duration="long", category="first"), None),
    (dict(problem_id="q6", answer="D", duration="long", category="after"), "A or D"),
]
RESPONSES = [text for _, text in EVAL_SET if text is not None]


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    """A record file over real mp4s: (records, record_errors, data_root)."""
    root = tmp_path_factory.mktemp("evalset")
    (root / "videos").mkdir()
    frames = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    frames[4:] = data.PALETTE["red"]
    write_mp4(root / "videos" / "clip.mp4", frames, fps=4.0)
    (root / "videos" / "broken.mp4").write_bytes(b"\x00not a video" * 100)
    lines = []
    for fields, _ in EVAL_SET:
        line = {"videos": "videos/clip.mp4", "problem": "What colour is the first scene?", "options": OPTIONS,
                "problem_type": "multiple_choice", "reasoning": ""}
        lines.append(json.dumps({**line, **fields}) + "\n")
    (root / "test.jsonl").write_text("".join(lines))
    records, errors = load_records_report(root / "test.jsonl")
    assert [e.line for e in errors] == [6]
    return records, errors, root


def run_eval(model, engine, eval_data, out, **kw):
    records, errors, root = eval_data
    return evaluation.evaluate(model, engine, records, FrameSampling(num_frames=4), out, batch_size=2,
                               record_errors=errors, **kw)


def test_report_has_the_expected_accuracy_and_breakdowns(tiny_model, eval_data, tmp_path):
    engine = ScriptedEngine(RESPONSES)
    report = run_eval(tiny_model, engine, eval_data, tmp_path)
    # 7 questions: q1, q3 and q4 right; q2 and q6 wrong; q5 (video) and line 6 (record) errors count as wrong
    assert (report["n"], report["correct"], report["accuracy"]) == (7, 3, pytest.approx(3 / 7))
    assert (report["n_answered"], report["accuracy_answered"]) == (5, pytest.approx(3 / 5))
    assert report["by_duration"] == {"long": {"accuracy": 0.5, "correct": 2, "n": 4},
                                     "short": {"accuracy": 0.5, "correct": 1, "n": 2}}
    assert report["by_category"] == {"after": {"accuracy": 0.0, "correct": 0, "n": 2},
                                     "count": {"accuracy": 1.0, "correct": 2, "n": 2},
                                     "first": {"accuracy": 0.5, "correct": 1, "n": 2}}
    assert report["format_compliance"] == pytest.approx(2 / 5)
    assert report["extraction"] == {"bare_letter": 1, "multiple": 1, "phrase": 1, "tag": 2}
    assert report["errors"]["count"] == 2
    reasons = report["errors"]["items"]
    assert reasons[0]["problem_id"] == "q5" and "broken.mp4" in reasons[0]["reason"]
    assert reasons[1]["line"] == 6 and "answer" in reasons[1]["reason"]
    assert report["settings"]["num_frames"] == 4 and report["settings"]["temperature"] == 0.0
    assert json.loads((tmp_path / "report.json").read_text()) == report
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["problem_id"] for r in rows) == ["q1", "q2", "q3", "q4", "q5", "q6"]
    q2 = next(r for r in rows if r["problem_id"] == "q2")
    assert (q2["prediction"], q2["answer"], q2["correct"], q2["how"], q2["response"]) == \
        ("C", "B", False, "phrase", "The answer is C")
    assert engine.asked == 5
    print(evaluation.format_table(report))


def test_strict_makes_errors_fatal(tiny_model, eval_data, tmp_path):
    records, errors, root = eval_data
    with pytest.raises(data.RecordError):
        run_eval(tiny_model, ScriptedEngine(RESPONSES), eval_data, tmp_path, strict=True)
    with pytest.raises(data.VideoError, match="broken.mp4"):
        evaluation.evaluate(tiny_model, ScriptedEngine(RESPONSES), records, FrameSampling(num_frames=4), tmp_path,
                            batch_size=2, strict=True)


def test_resume_after_an_interrupt_equals_an_uninterrupted_run(tiny_model, eval_data, tmp_path):
    full = run_eval(tiny_model, ScriptedEngine(RESPONSES), eval_data, tmp_path / "full")

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):  # killed during the second batch
        run_eval(tiny_model, ScriptedEngine(RESPONSES, fail_after=3), eval_data, out)
    assert len(read_predictions(out / "predictions.jsonl")) == 2
    with open(out / "predictions.jsonl", "a") as f:  # and again while writing a line
        f.write('{"problem_id": "q3", "predic')

    engine = ScriptedEngine(RESPONSES[2:])  # only what is left
    resumed = run_eval(tiny_model, engine, eval_data, out)
    assert engine.asked == 3  # q3, q4, q6: q1 and q2 were not asked again
    assert resumed == full
    ids = [json.loads(line)["problem_id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(ids) == ["q1", "q2", "q3", "q4", "q5", "q6"]

    engine = ScriptedEngine([])  # finished: nothing to ask, same report
    assert run_eval(tiny_model, engine, eval_data, out) == full and engine.asked == 0
    with pytest.raises(ValueError, match="other settings.*num_frames"):
        evaluation.evaluate(tiny_model, ScriptedEngine([]), eval_data[0], FrameSampling(num_frames=2), out)


def test_a_prompt_longer_than_the_engine_allows_is_an_error(tiny_model, eval_data, tmp_path):
    engine = ScriptedEngine(RESPONSES)
    engine.max_model_len = 10  # far shorter than 4 frames plus the question
    report = run_eval(tiny_model, engine, eval_data, tmp_path)
    assert engine.asked == 0 and report["errors"]["count"] == 7 and report["accuracy"] == 0.0
    assert "PromptTooLong" in report["errors"]["items"][0]["reason"]


def test_build_report_ignores_predictions_of_other_records():
    recs = [Record(problem_id="q", video="v.mp4", problem="?", options=list(OPTIONS), problem_type="multiple_choice",
                   reasoning="", answer="B", labels={"duration": "short"})]
    row = {"problem_id": "q", "correct": True, "how": "tag", "format_ok": True, "labels": {"duration": "short"},
           "error": None}
    report = build_report(recs, {"q": row, "other": {**row, "problem_id": "other"}})
    assert (report["n"], report["accuracy"], report["by_duration"]["short"]["n"]) == (1, 1.0, 1)


# ---- the command line, end to end ----

def test_cli_runs_the_tiny_model_end_to_end(tiny_checkpoint, eval_data, tmp_path, capsys):
    _, _, root = eval_data
    out = tmp_path / "report"
    assert evaluation.main(["--checkpoint", str(tiny_checkpoint), "--data", str(root / "test.jsonl"),
                            "--out", str(out), "--num-frames", "4", "--max-new-tokens", "8",
                            "--batch-size", "3", "--engine", "torch"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == len(EVAL_SET) and report["errors"]["count"] == 2
    assert 0.0 <= report["accuracy"] <= 1.0 and set(report["by_duration"]) == {"short", "long"}
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(isinstance(r["response"], str) for r in rows if r["error"] is None)
    assert "accuracy" in capsys.readouterr().out


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_code:
        evaluation.main(["--help"])
    assert exit_code.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--num-frames", "--fps", "--max-frames", "--subtitles", "--max-new-tokens", "--temperature",
                 "--batch-size", "--engine", "--strict", "--max-model-len"):
        assert flag in text
    assert "(default: torch)" in text and "(default: 0.0)" in text
