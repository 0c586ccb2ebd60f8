"""GRPO runs: rewards on hostile outputs and real short runs
(learning on an easy task, kill + resume, sequence parallel vs one process)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import grading
import model as M
import rl
import rollout
import runs
import synth
import video
import vila

ROOT = Path(__file__).resolve().parents[1]


# ---- rewards on hostile outputs ----

def mc_record(answer="B"):
    return data.Record(problem_id="x", video="v.mp4", problem="Which colour?", options=["red", "blue", "green", "cyan"],
                       problem_type="multiple_choice", reasoning="", answer=answer)


@pytest.mark.parametrize("response, fmt, acc", [
    ("<think>blue scenes</think><answer>B</answer>", 1, 1),
    ("<think>x</think><answer>A</answer>", 1, 0),
    ("<think>x</think>\n<answer> B </answer>", 1, 1),
    ("<answer>B</answer>", 0, 1),                                  # no thinking: right answer, wrong format
    ("<think>x</think><answer>B</answer><answer>C</answer>", 0, 0),  # two answers: the last counts, format broken
    ("<think>x</think><answer>A, B</answer>", 1, 0),               # several options named
    ("<think><think>x</think></think><answer>B</answer>", 0, 1),   # nested tags
    ("<think>x</think><answer>B", 0, 0),                           # unclosed answer: no tagged answer, no reward
    ("", 0, 0),
    ("<think>" + "blue " * 5000 + "</think>", 0, 0),               # maximal length, never answers
    ("<think>x</think><answer></answer>", 0, 0),
])
def test_rewards_on_hostile_outputs(response, fmt, acc):
    assert rl.format_reward(response) == fmt
    assert rl.accuracy_reward(mc_record("B"), response) == acc


def test_numerical_and_free_form_accuracy():
    num = data.Record("n", "v.mp4", "How many?", [], "numerical", "", "3")
    assert rl.accuracy_reward(num, "<think>.</think><answer>3.0</answer>") == 1
    assert rl.accuracy_reward(num, "<think>.</think><answer>4</answer>") == 0
    free = data.Record("f", "v.mp4", "Colour?", [], "free_form", "", "dark blue")
    assert rl.accuracy_reward(free, "<think>.</think><answer>Dark  Blue</answer>") == 1


def test_accuracy_reward_reads_only_the_tagged_answer_while_eval_stays_lenient():
    """Paying for an untagged answer would teach the policy to drop the format; eval still reads it."""
    untagged = "<think>blue scenes</think>The answer is B"
    assert rl.accuracy_reward(mc_record("B"), untagged) == 0
    assert rl.accuracy_reward(mc_record("B"), "The answer is B") == 0
    assert grading.score_answer(mc_record("B"), untagged) == (True, "B")
    assert grading.score_answer(mc_record("B"), "The answer is B") == (True, "B")


# ---- real runs on an easy task ----

RL_ARGS = ["--num-frames", "8", "--batch-size", "4", "--group-size", "4", "--max-new-tokens", "64",
           "--engine", "torch", "--lr", "1e-3", "--kl-coef", "0.01", "--micro-batch-size", "16"]


def rows_of(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_short_rl_run_raises_reward_on_easy_task(easy_task, tmp_path):
    """`python rl.py` as a user runs it, in its own process (a run inside the test process inherits what
    earlier tests left there), 12 steps at lr 5e-4: the reward of the last 4 steps beats the first 2 (the
    SFT policy's: rewards are measured before the update) by more than 0.1.

    A signal, not a gate (test_one_update_raises_the_rewarded_responses_and_lowers_the_others is the exact
    check). Runs are not bit-identical (the easy task's SFT model differs in its last bits from run to run,
    and so does every RL sum), so the check was sized over seeds as stand-ins for that chaos, on one SFT
    model: at lr 1e-3 (before) 2 of 5 seeds collapsed (format lost from step 6 on, reward 0.0, KL 3+: a CI
    run failed so); at 5e-4 all 10 learned, last 4 minus first 2 between 0.12 and 0.62 (seed 0: 0.52).
    Advantages negated (planted): -0.31, reward 0.0 from step 4. A run that does not learn at all passes
    by noise now and then (the two means differ by ~0.07 sd)."""
    subprocess.run([sys.executable, "rl.py", "--init", str(easy_task["init"]), "--data", str(easy_task["data"]),
                    "--out", str(tmp_path), "--steps", "12", "--save-every", "0", *RL_ARGS, "--lr", "5e-4"],
                   cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    rows = rows_of(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 13))
    rewards = [r["reward"] for r in rows]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:2]) / 2 + 0.1, [round(r, 3) for r in rewards]
    assert sum(r["vision_runs"] for r in rows) == 12  # each of the 12 training videos encoded once, then cached
    assert rows[-1]["embed_cache_misses"] == rows[-1]["embed_cache_entries"] == 12 < rows[-1]["embed_cache_hits"]
    assert rows[-1]["embed_cache_bytes"] > 0
    assert (tmp_path / "final" / "llm" / "model.safetensors").exists() and (tmp_path / "rl_curves.png").exists()
    for r in rows:  # per step: accuracy by question type (the records' category), adding up to the accuracy
        types = [k for k in r if k.startswith("accuracy_")]
        assert types
        n = {t: r[f"responses/{t[len('accuracy_'):]}"] for t in types}
        assert sum(r[t] * n[t] for t in types) / sum(n.values()) == pytest.approx(r["accuracy"])
        assert r["no_signal_share"] == r["no_signal_groups"] / r["groups"] and r["groups"] == 4


def test_accuracy_by_type_and_no_signal_share_by_hand():
    rec = lambda category: data.Record(problem_id="p", video="v.mp4", problem="q", options=[], problem_type="free_form",
                                       reasoning="", answer="red", labels={"category": category})
    sample = rollout.Sample(text="", token_ids=[1], logprobs=[0.0], finish_reason="answer")
    episodes = [rl.Episode(rec(c), sample, reward=a, accuracy=a, format=1.0)
                for c, a in [("first", 1.0), ("first", 0.0), ("count", 1.0), ("count", 1.0), ("after", 0.0)]]
    counts = rl.type_counts(episodes, "category", ["after", "count", "first", "last"])
    assert counts == {"correct/after": 0, "responses/after": 1, "correct/count": 2, "responses/count": 2,
                      "correct/first": 1, "responses/first": 2, "correct/last": 0, "responses/last": 0}
    row = rl.type_accuracy({"step": 1, "no_signal_groups": 1, "groups": 4, **counts}, ["after", "count", "first", "last"])
    assert row == {"step": 1, "no_signal_groups": 1, "groups": 4, **counts, "accuracy_after": 0.0,
                   "accuracy_count": 1.0, "accuracy_first": 0.5, "no_signal_share": 0.25}  # no "last" question: no key


def test_killed_run_resumes_to_the_same_metrics(easy_task, tmp_path):
    """Each run is its own process, as a user's are: a run in this test process would inherit what earlier
    tests left in it, and one thread count for all (a different one changes float sums, so the metrics)."""
    args = [sys.executable, "rl.py", "--init", str(easy_task["init"]), "--data", str(easy_task["data"]),
            "--steps", "4", "--save-every", "2", *RL_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    quiet = dict(cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    subprocess.run(args + ["--out", str(tmp_path / "whole")], check=True, **quiet)

    # the same run, killed (SIGKILL) once its first checkpoint is complete, then resumed
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "killed")], **quiet)
    while runs.latest_checkpoint(tmp_path / "killed") is None and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists()
    # resumed reading ahead: a flag that changes no result may change on --resume
    subprocess.run(args + ["--out", str(tmp_path / "killed"), "--resume", "--decode-workers", "2"], check=True, **quiet)

    # timings differ, and so do vision-tower runs, the cache's counts and the videos read so far: the resumed
    # process starts with a cold embedding cache and counts from zero
    volatile = lambda r: {k: v for k, v in r.items()
                          if not k.startswith(("time_", "embed_cache_", "videos_")) and k not in ("vision_runs", "video_wait_s")}
    whole, resumed = rows_of(tmp_path / "whole"), rows_of(tmp_path / "killed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(whole, resumed):
        assert volatile(a).keys() == volatile(b).keys()
        for k in volatile(a):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)


def test_a_resume_with_other_settings_is_refused_naming_the_setting(easy_task, tmp_path):
    """A run with a checkpoint, resumed with more steps (RL's learning rate has no schedule: allowed), but
    another engine or SP size: refused before anything loads, the setting named, the folder untouched."""
    run = ["--init", str(easy_task["init"]), "--data", str(easy_task["data"]), "--out", str(tmp_path),
           "--save-every", "1", *RL_ARGS, "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "16"]
    rl.main(run + ["--steps", "2"])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    more = run + ["--steps", "3", "--resume"]
    with pytest.raises(ValueError, match=r"other settings \(sp_size: 1 -> 2\)"):
        rl.main(more + ["--sp-size", "2"])
    with pytest.raises(ValueError, match=r"other settings \(engine: 'torch' -> 'vllm'\)"):
        rl.main(more + ["--engine", "vllm"])
    with pytest.raises(ValueError, match=r"other settings \(group_size: 2 -> 3, lr: 0.001 -> 0.002\)"):
        rl.main(more + ["--group-size", "3", "--lr", "2e-3"])  # all named, in the order the run wrote them
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def assert_same_adamw_updates(one: dict, two: dict):
    """Two runs' weights after the same AdamW steps (lr 1e-3) from equal gradients, computed two ways.
    AdamW's early steps are about lr * g / (|g| + eps) per weight: equal gradients give equal updates. Where
    a gradient is as small as eps (1e-8), fp32 rounding in its sums (another split, another thread count)
    moves that ratio by a few percent, so a handful of weights may differ by a few % of lr; a wrong
    gradient would move most of them."""
    diff = torch.cat([(one[k] - two[k]).abs().flatten() for k in one])
    assert diff.max() < 1e-4 and (diff > 1e-6).float().mean() < 1e-3, (diff.max(), (diff > 1e-6).sum())


def test_sp2_with_the_vllm_engine_updates_weights_like_one_process(easy_task, tmp_path):
    """rl.py with the real vLLM engine (the default), two steps, in this process and under torchrun with 2
    ranks and --sp-size 2 (FSDP2 + Ulysses). Under torchrun each SP rank's engine samples half the prompts,
    each prompt with the seed of its place in the batch, so both runs sample alike; step 2 samples from the
    weights synced into the engines after step 1 (gathered tensor by tensor); both runs must give the same
    rewards and AdamW updates.

    In step, engine and trainer agree to the top-p renormalisation (-log 0.99 ~ 0.01): without the sync, a
    step at this learning rate moves log-probs far more than that; with --tis-cap 2 the importance weights
    pi_old / pi_engine are then within [0.99, 1], none capped. Under torchrun vLLM builds its process groups
    from the training group, so every rank must build an engine (built on SP rank 0 alone, it hung here), and
    the run ends with no traceback (before, every rank printed one at exit, where vLLM's engine tore down its
    process groups after the training's group was gone; train.shutdown closes the engine first)."""
    args = ["--init", str(easy_task["init"]), "--data", str(easy_task["data"]), "--steps", "2", "--save-every", "0",
            "--max-model-len", "1024", "--tis-cap", "2", *[a if a != "torch" else "vllm" for a in RL_ARGS]]
    rl.main(args + ["--out", str(tmp_path / "sp1")])
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "rl.py", *args, "--out", str(tmp_path / "sp2"), "--sp-size", "2"],
                          cwd=ROOT, check=True, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "Traceback" not in done.stderr, done.stderr  # a run that ended well ends quietly
    one_rows, two_rows = rows_of(tmp_path / "sp1"), rows_of(tmp_path / "sp2")
    assert [r["step"] for r in one_rows] == [r["step"] for r in two_rows] == [1, 2] and one_rows[0]["grad_norm"] > 0
    for r in one_rows + two_rows:
        assert r["logprob_gap_max"] < 0.011, r  # the engine decodes with the trainer's current weights
        assert 0.989 < r["tis_weight_mean"] <= 1.0 + 1e-6 and r["tis_capped_share"] == 0, r
    for a, b in zip(one_rows, two_rows, strict=True):
        assert (b["reward"], b["response_len"]) == pytest.approx((a["reward"], a["response_len"])), a["step"]
    before = load_file(str(easy_task["init"] / "llm" / "model.safetensors"))
    one = load_file(str(tmp_path / "sp1" / "final" / "llm" / "model.safetensors"))
    two = load_file(str(tmp_path / "sp2" / "final" / "llm" / "model.safetensors"))
    assert max((one[k] - before[k]).abs().max().item() for k in one) > 1e-5  # the steps did change the weights
    assert_same_adamw_updates(one, two)


def test_ctrl_c_ends_both_ranks_within_seconds_and_leaves_only_complete_checkpoints(easy_task, tmp_path):
    """Ctrl-C sends SIGINT to every process of the terminal's job at once. The two ranks are started as torchrun starts them
    (its environment), so that each one's own exit status shows; SIGINT reaches both while they step and
    checkpoint every step. Both end within seconds, by SIGINT (a shell's 130), and every checkpoint
    folder left is complete: one interrupted mid-write is never renamed into place. The run uses the torch
    engine, which under torchrun decodes with a copy of the LLM of its own on SP rank 0, synced after each
    update: signalled after step 2, the run has sampled from updated weights, and its log-probs are still the
    trainer's (a step at this learning rate moves them far more than 0.011)."""
    from dist import free_port
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2"}
    out = tmp_path / "run"
    cmd = [sys.executable, "rl.py", "--init", str(easy_task["init"]), "--data", str(easy_task["data"]),
           "--out", str(out), "--steps", "1000", "--save-every", "1", "--sp-size", "2", *RL_ARGS]
    # SIGINT as a terminal delivers it: a test run started in the background inherits it ignored
    as_in_a_terminal = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    logs = [open(tmp_path / f"rank{rank}.log", "w") for rank in (0, 1)]
    ranks = []
    for rank, log in enumerate(logs):  # one process group, as a terminal's job is: rank 0's pid is its id
        ranks.append(subprocess.Popen(cmd, cwd=ROOT, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                      stdout=log, stderr=log, preexec_fn=as_in_a_terminal,
                                      process_group=ranks[0].pid if ranks else 0))
    try:
        deadline = time.monotonic() + 240
        past_step_2 = lambda: (latest := runs.latest_checkpoint(out)) is not None and latest.name != "checkpoint-1"
        while not past_step_2() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert past_step_2(), (tmp_path / "rank0.log").read_text()[-3000:]
        # one kill for the group, as the terminal does: signalled one after the other, rank 0 could end and
        # break rank 1's collective before rank 1 had its own SIGINT (CI saw rank 1 end by the broken link)
        os.killpg(ranks[0].pid, signal.SIGINT)
        interrupted = time.monotonic()
        codes = [proc.wait(timeout=60) for proc in ranks]
        seconds = time.monotonic() - interrupted
    finally:
        for proc in ranks:
            proc.kill()  # no-op for an ended process; never leave a rank stepping after a failed test
    assert codes == [-signal.SIGINT] * 2, [(tmp_path / f"rank{r}.log").read_text()[-2000:] for r in (0, 1)]
    assert seconds < 20, seconds
    assert not list(out.glob("*.tmp-*")) and not list(out.glob("*.old-*"))
    for checkpoint in out.glob("checkpoint-*"):
        assert M.is_complete_checkpoint(checkpoint) and (checkpoint / runs.TRAINER_STATE).exists(), checkpoint
    rows = rows_of(out)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 2
    assert rows[0]["grad_norm"] > 0  # step 1 updated the weights step 2 sampled from
    for r in rows:
        assert r["logprob_gap_max"] < 0.011, r


def test_embed_cache_dir_keeps_the_embeddings_for_a_later_run(tiny_checkpoint, tmp_path):
    """--embed-cache-dir through rl.py: the first run encodes its step's 2 videos and writes one file each;
    a later run over the same records reads both back, never runs the vision tower, and samples the same."""
    synth.main(["--out", str(tmp_path / "data"), "--n", "2", "--seed", "0", "--test-frac", "0"])
    run = ["--init", str(tiny_checkpoint), "--data", str(tmp_path / "data" / "train.jsonl"), "--steps", "1",
           "--save-every", "0", *RL_ARGS, "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "8",
           "--embed-cache-dir", str(tmp_path / "embeds")]
    rl.main(run + ["--out", str(tmp_path / "first")])
    rl.main(run + ["--out", str(tmp_path / "later")])
    first, later = rows_of(tmp_path / "first")[0], rows_of(tmp_path / "later")[0]
    assert (first["vision_runs"], first["embed_cache_misses"]) == (2, 2)
    assert len(list((tmp_path / "embeds").glob("*.safetensors"))) == 2
    assert (later["vision_runs"], later["embed_cache_misses"]) == (0, 0) and later["embed_cache_hits"] >= 2
    assert (later["reward"], later["response_len"], later["loss"]) == (first["reward"], first["response_len"],
                                                                      first["loss"])


def test_engine_length_is_checked_or_derived_at_start_up(tiny_model):
    """The longest prompt of the first records + --max-new-tokens must fit the engine; without
    --max-model-len that sum (plus slack for later, longer text) is the engine's length."""
    records = [mc_record(), data.Record("q2", "v.mp4", "How many red scenes are there, in all?", [], "numerical", "", "2")]
    sampling = video.FrameSampling(num_frames=256)  # the paper's 7B setting; no video is opened to count them
    sep = len(tiny_model.encode_text(tiny_model.config.frame_separator))
    text = lambda r: sum(len(tiny_model.encode_text(t)) for t in vila.VilaFamily.chat_text(
        tiny_model.tokenizer, *tiny_model.user_turn(r)))
    lengths = [256 * (tiny_model.config.tokens_per_frame + sep) + text(r) for r in records]
    assert [rl.prompt_length(tiny_model, r, sampling) for r in records] == [(256, n) for n in lengths]
    needed = max(lengths) + 64
    assert min(lengths) > 256 * 5
    args = lambda *flag: rl.parse_args(["--init", "i", "--data", "d.jsonl", "--out", "o", "--max-new-tokens", "64", *flag])
    assert rl.engine_max_model_len(tiny_model, records, sampling, args()) == needed + rl.TEXT_SLACK
    assert rl.engine_max_model_len(tiny_model, records, sampling, args("--max-model-len", str(needed))) == needed
    with pytest.raises(ValueError, match=f"needs --max-model-len of at least {needed}, got {needed - 1}"):
        rl.engine_max_model_len(tiny_model, records, sampling, args("--max-model-len", str(needed - 1)))


def test_a_prompt_too_long_for_the_engine_is_refused_before_the_first_step(easy_task, tmp_path):
    with pytest.raises(ValueError, match=r"is \d+ tokens \(8 frames and its text\).*--max-model-len"):
        rl.main(["--init", str(easy_task["init"]), "--data", str(easy_task["data"]), "--out", str(tmp_path),
                 "--steps", "1", *RL_ARGS, "--max-model-len", "100"])
    assert not (tmp_path / "metrics.jsonl").exists()


def test_rollout_share_splits_the_groups_prompts_among_its_engines():
    def shares(num_prompts, sp_size, engines):
        return [list(rl.rollout_share(num_prompts, rl.mrsp.ParallelState(sp_rank=r, sp_size=sp_size), engines))
                for r in range(sp_size)]
    assert shares(5, 2, 2) == [[0, 1, 2], [3, 4]]
    assert shares(5, 2, 1) == [[0, 1, 2, 3, 4], []]          # the torch engine: SP rank 0 generates all
    assert shares(2, 4, 4) == [[0], [1], [], []]             # fewer prompts than engines: some idle
    assert shares(8, 1, 1) == [list(range(8))]



def test_shared_prefix_step_updates_weights_like_per_sequence(easy_task, tmp_path):
    """One rl.py step (torch engine, fixed seed), groups packed with their prompt once vs every response its
    own sequence: the same samples, rewards and updated weights. Micro-batches of at most 6 sequences split
    the 16 differently in the two layouts (whole groups of 4; 6/6/4 sequences grouped by length), which the
    token weights absorb."""
    base = ["--init", str(easy_task["init"]), "--data", str(easy_task["data"]), "--steps", "1",
            "--save-every", "0", *RL_ARGS, "--micro-batch-size", "6"]   # after RL_ARGS: the last one counts
    rl.main(base + ["--out", str(tmp_path / "packed")])
    rl.main(base + ["--out", str(tmp_path / "per-seq"), "--no-shared-prefix"])
    packed, per_seq = rows_of(tmp_path / "packed")[0], rows_of(tmp_path / "per-seq")[0]
    assert (packed["reward"], packed["response_len"]) == (per_seq["reward"], per_seq["response_len"])
    assert packed["loss"] == pytest.approx(per_seq["loss"], rel=1e-5, abs=1e-7)
    assert packed["llm_positions"] < per_seq["llm_positions"] and packed["old_logprobs_reused"] == 1
    before = load_file(str(easy_task["init"] / "llm" / "model.safetensors"))
    one = load_file(str(tmp_path / "packed" / "final" / "llm" / "model.safetensors"))
    two = load_file(str(tmp_path / "per-seq" / "final" / "llm" / "model.safetensors"))
    assert max((one[k] - before[k]).abs().max().item() for k in one) > 1e-5
    assert_same_adamw_updates(one, two)
