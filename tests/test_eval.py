"""Tests for eval.py: the report and resume, the public sets read directly (answer grading: test_grading.py).

The report tests run the real evaluate() on real mp4 files and the tiny VideoLM, with a scripted engine
(a plain object with generate()) that answers with chosen texts, so the expected accuracy is known
exactly. The last test runs the command line end to end with the torch engine.
"""
import json

import numpy as np
import pytest
import torch

import data
import eval as evaluation
import model as M
import synth
from data import Record, load_records_report
from synth import write_mp4
from eval import build_report, read_predictions
from rollout import Sample
from video import FrameSampling, VideoError, load_frames
from test_data import videomme  # noqa: F401  (a fixture: Video-MME as the Hub lays it out)
from test_train import srt_record

OPTIONS = ["red", "blue", "green", "cyan"]




# ---- evaluate(): report, errors, resume ----

class ScriptedEngine:
    """Answers the prompts it is given, in order, with chosen texts: the report logic is under test,
    not generation. `fail_after` raises once that many prompts would have been answered (an interrupt)."""

    def __init__(self, texts, fail_after=None):
        self.texts, self.fail_after, self.asked = list(texts), fail_after, 0
        self.prompts = []  # every prompt asked (model.Prompt), in order

    def generate(self, prompts, n, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        assert n == 1 and temperature == 0.0 and all(p.embeds.dim() == 2 for p in prompts)
        if self.fail_after is not None and self.asked + len(prompts) > self.fail_after:
            raise KeyboardInterrupt("interrupted")
        texts = self.texts[self.asked:self.asked + len(prompts)]
        self.asked += len(prompts)
        self.prompts += prompts
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
    frames[4:] = synth.PALETTE["red"]
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


def run_eval(model, engine, eval_data, out, sampling=FrameSampling(num_frames=4), **kw):
    records, errors, root = eval_data
    return evaluation.evaluate(model, engine, records, sampling, out, batch_size=2, record_errors=errors, **kw)


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
    with pytest.raises(VideoError, match="broken.mp4"):
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


def test_subtitles_are_the_srt_cues_within_the_sampled_frames(tiny_model, tmp_path):
    """--subtitles with an .srt file: the prompt shows the cues that overlap the sampled frames' span (2 s to
    7 s of a 10 s video), not the whole file; without --subtitles, none."""
    record = srt_record(tmp_path)
    sampling = FrameSampling(num_frames=2)                             # frames at 2 s and 7 s
    with torch.no_grad():
        video_embeds = tiny_model.encode_video(load_frames(record.video, tiny_model.config.image_size, sampling)[0])
        before, after = data.build_prompt(record, subtitles="during")
        shown = tiny_model.prompt(before, video_embeds, after)
        hidden = tiny_model.prompt(data.build_prompt(record)[0], video_embeds, data.build_prompt(record)[1])
    for subtitles, expected in ((True, shown), (False, hidden)):
        engine = ScriptedEngine(["A"])
        evaluation.evaluate(tiny_model, engine, [record], sampling, tmp_path / str(subtitles), subtitles=subtitles)
        asked, = engine.prompts
        torch.testing.assert_close(asked.embeds, expected.embeds)


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


def test_cli_with_the_vllm_engine_at_2_fps_answers_as_the_torch_engine(tiny_checkpoint, eval_data, tmp_path):
    """--engine vllm end to end (vLLM loads llm/, prompts go in as embeddings) with --fps 2 (4 frames of the
    2 s clip, where the checkpoint's own setting would take all 8): greedy responses equal, question by
    question, those of the torch engine asked here over frames sampled at 2 fps."""
    import rollout
    _, _, root = eval_data
    assert evaluation.main(["--checkpoint", str(tiny_checkpoint), "--data", str(root / "test.jsonl"), "--fps", "2",
                            "--out", str(tmp_path / "vllm"), "--max-new-tokens", "8", "--batch-size", "3",
                            "--max-model-len", "512", "--engine", "vllm"]) == 0
    report = json.loads((tmp_path / "vllm" / "report.json").read_text())
    assert (report["settings"]["engine"], report["settings"]["fps"], report["settings"]["num_frames"]) == \
        ("vllm", 2.0, None)
    model = M.VideoLM.load(tiny_checkpoint).eval()
    engine = rollout.make_engine("torch", model, tiny_checkpoint / "llm", max_model_len=512, dtype="float32")
    run_eval(model, engine, eval_data, tmp_path / "torch", sampling=FrameSampling(fps=2.0), max_new_tokens=8)
    responses = lambda out: {r["problem_id"]: r["response"] for r in read_predictions(out / "predictions.jsonl").values()}
    assert responses(tmp_path / "vllm") == responses(tmp_path / "torch"), (responses(tmp_path / "vllm"),
                                                                          responses(tmp_path / "torch"))
    assert sum(r is not None for r in responses(tmp_path / "vllm").values()) == 5


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_code:
        evaluation.main(["--help"])
    assert exit_code.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--num-frames", "--fps", "--max-frames", "--subtitles", "--max-new-tokens", "--temperature",
                 "--batch-size", "--engine", "--strict", "--max-model-len"):
        assert flag in text
    assert "(default: torch)" in text and "(default: 0.0)" in text


# ---- the public sets, read as they are downloaded ----

def test_cli_reads_videomme_as_downloaded(tiny_checkpoint, videomme, tmp_path, capsys):
    root, rows = videomme  # videomme/test-00000-of-00001.parquet, subtitle/fFjv93ACGo8.srt
    write_mp4(root / "data" / "fFjv93ACGo8.mp4", np.zeros((8, 32, 32, 3), dtype=np.uint8), fps=4.0)
    out = tmp_path / "report"  # k0aYt2Hq9aA's video is missing: its two questions are errors
    assert evaluation.main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--subtitles",
                            "--data", str(root / "videomme" / "test-00000-of-00001.parquet"), "--num-frames", "4",
                            "--max-new-tokens", "4", "--engine", "torch"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["n"], report["n_answered"], report["errors"]["count"]) == (4, 2, 2)
    assert report["settings"]["subtitles"] is True   # the flag reached evaluate (which the test above checks)
    assert [e["problem_id"] for e in report["errors"]["items"]] == ["002-1", "002-2"]
    assert all(str(root / "data" / "k0aYt2Hq9aA.mp4") in e["reason"] for e in report["errors"]["items"])
    assert {v: b["n"] for v, b in report["by_duration"].items()} == {"short": 2, "long": 2}
    assert "test-00000-of-00001.parquet: 4 records, 0 skipped" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", json.dumps({"problem_id": 1, "videos": "gone.mp4", "problem": "Why?",
                                                       "problem_type": "general", "answer": "x"}).encode()])
def test_cli_fails_when_no_question_could_be_asked(tiny_checkpoint, tmp_path, capsys, content):
    (path := tmp_path / "lvr.jsonl").write_bytes(content)
    assert evaluation.main(["--checkpoint", str(tiny_checkpoint), "--data", str(path), "--out", str(tmp_path / "o"),
                            "--num-frames", "4", "--engine", "torch"]) == 1
    assert f"error: no question of {path} could be asked" in capsys.readouterr().err
