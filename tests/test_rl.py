"""GRPO: the loss pieces against hand-computed values, rewards on hostile outputs, and real short runs
(learning on an easy task, kill + resume, sequence parallel vs one process)."""
import json
import math
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
import rl
import rollout
import train

ROOT = Path(__file__).resolve().parents[1]


# ---- advantages, KL, aggregation, policy loss ----

def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    adv = rl.group_advantages(rewards)
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5]]) / (std + 1e-6)
    torch.testing.assert_close(adv[:1], expected)
    assert (adv[1] == 0).all()  # a group of equal rewards carries no signal
    torch.testing.assert_close(rl.group_advantages(rewards, scale_by_std=False)[0],
                               torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_kl_k3_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -1.5])
    d = ref - logp  # [0, 1, -1]
    expected = torch.exp(d) - d - 1  # [0, e - 2, 1/e]
    torch.testing.assert_close(rl.kl_k3(logp, ref), expected)
    assert rl.kl_k3(logp, ref)[0] == 0 and (rl.kl_k3(logp, ref) >= 0).all()


def test_each_loss_aggregation_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert rl.aggregate(per_token, mask, "token-mean").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert rl.aggregate(per_token, mask, "seq-mean-token-mean").item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert rl.aggregate(per_token, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    with pytest.raises(ValueError, match="loss-agg"):
        rl.aggregate(per_token, mask, "sum")


def test_policy_loss_clips_low_high_and_dual_by_hand():
    old = torch.zeros(1, 4)
    # ratios e^x: 1.5 (above 1 + 0.3), 0.5 (below 1 - 0.2), 1.1 (inside), 5.0 (dual clip territory)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 5.0]]))
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, clip_frac = rl.policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.3, dual_clip=3.0)
    per_token = [
        -1.0 * 1.3,             # A>0, r=1.5: max(-1.5, -1.3) = -1.3 (clipped at 1 + clip_high)
        max(0.5, 0.8),          # A<0, r=0.5: max(0.5, 0.8) = 0.8 (clipped at 1 - clip_low); below dual bound 3
        -2.0 * 1.1,             # inside the clip range
        min(max(5.0, 1.3), 3.0),  # A<0, r=5: max gives 5.0, the dual clip bounds it at -A * 3 = 3
    ]
    assert loss.item() == pytest.approx(sum(per_token) / 4, abs=1e-6)
    assert clip_frac.item() == pytest.approx(2 / 4)  # tokens 1 and 2 were clipped by the ratio clip


def test_policy_gradient_pushes_up_positive_advantages():
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, _ = rl.policy_loss(logp, logp.detach(), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2, dtype=torch.bool))
    loss.backward()
    assert logp.grad[0, 0] < 0 < logp.grad[0, 1]  # descent raises the good token, lowers the bad one


def test_a_group_of_one_gets_zero_advantage_not_nan():
    one = rl.group_advantages(torch.tensor([[1.0], [0.0]]))  # --group-size 1: no group to compare against
    assert torch.equal(one, torch.zeros(2, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logprob_gaps_give_a_finite_loss_and_finite_gradients(dtype):
    """Gaps of +-1000 nats between new, old and reference log-probs overflow exp unclamped (inf, and
    inf * 0 = NaN in backward). Clamped as verl does, the loss and every gradient stay finite."""
    logp = torch.tensor([[0.0, -1000.0, 0.0, -1000.0]], dtype=dtype, requires_grad=True)
    old = torch.tensor([[-1000.0, 0.0, -1000.0, 0.0]], dtype=dtype)
    ref = torch.tensor([[-1000.0, 0.0, 0.0, -1000.0]], dtype=dtype)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=dtype)
    mask = torch.ones(1, 4, dtype=torch.bool)
    pg, _ = rl.policy_loss(logp, old, adv, mask)
    kl = rl.aggregate(rl.kl_k3(logp, ref), mask, "token-mean")
    loss = pg + 0.01 * kl
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all(), (loss, logp.grad)
    assert rl.kl_k3(logp, ref).max() <= 10


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
    """`python rl.py` as a user runs it, in its own process: 12 steps at lr 1e-3 on a tiny model are
    sensitive to the last bit of every sum. Run inside the test process after the other tests, one full-suite
    run collapsed (format 0 by step 9) while the same run alone rose: what earlier tests left in the process
    changed those bits (not found which). A process of its own makes the run the one a user gets."""
    subprocess.run([sys.executable, "rl.py", "--init", str(easy_task["init"]), "--data", str(easy_task["data"]),
                    "--out", str(tmp_path), "--steps", "12", "--save-every", "0", *RL_ARGS],
                   cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    rows = rows_of(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 13))
    # step 1's reward is the SFT policy's (rewards are measured before the update); the last steps' after RL
    # At lr 1e-3 one step's 16 samples can all lose the format (reward 0) and the next step recover: a
    # fresh-clone CI run went 0.11, 0.0, 0.66, 0.84, 0.81 over steps 8-12. The median of the last 4 steps
    # passes over one such step; a run that does not learn stays near its first steps' 0.3-0.4.
    first, last = [r["reward"] for r in rows[:2]], sorted(r["reward"] for r in rows[-4:])
    assert (last[1] + last[2]) / 2 > sum(first) / 2 + 0.25, [round(r["reward"], 3) for r in rows]
    assert sum(r["vision_runs"] for r in rows) == 12  # each of the 12 training videos encoded once, then cached
    assert rows[-1]["embed_cache_misses"] == rows[-1]["embed_cache_entries"] == 12 < rows[-1]["embed_cache_hits"]
    assert rows[-1]["embed_cache_bytes"] > 0
    assert (tmp_path / "final" / "llm" / "model.safetensors").exists() and (tmp_path / "rl_curves.png").exists()
    for r in rows:  # per step: accuracy by question type (the records' category), adding up to the accuracy
        types = [k for k in r if k.startswith("accuracy_")]
        assert types and all(0 <= r[k] <= 1 for k in types)
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
    while train.latest_checkpoint(tmp_path / "killed") is None and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists()
    subprocess.run(args + ["--out", str(tmp_path / "killed"), "--resume"], check=True, **quiet)

    # timings differ, and so do vision-tower runs, the cache's counts and the videos read so far: the resumed
    # process starts with a cold embedding cache and counts from zero
    volatile = lambda r: {k: v for k, v in r.items()
                          if not k.startswith(("time_", "embed_cache_", "videos_")) and k != "vision_runs"}
    whole, resumed = rows_of(tmp_path / "whole"), rows_of(tmp_path / "killed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(whole, resumed):
        assert volatile(a).keys() == volatile(b).keys()
        for k in volatile(a):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)


def assert_same_adamw_updates(one: dict, two: dict):
    """Two runs' weights after the same AdamW steps (lr 1e-3) from equal gradients, computed two ways.
    AdamW's early steps are about lr * g / (|g| + eps) per weight: equal gradients give equal updates. Where
    a gradient is as small as eps (1e-8), fp32 rounding in its sums (another split, another thread count)
    moves that ratio by a few percent, so a handful of weights may differ by a few % of lr; a wrong
    gradient would move most of them."""
    diff = torch.cat([(one[k] - two[k]).abs().flatten() for k in one])
    assert diff.max() < 1e-4 and (diff > 1e-6).float().mean() < 1e-3, (diff.max(), (diff > 1e-6).sum())


def test_sp2_training_steps_update_weights_like_one_process(easy_task, tmp_path):
    """torchrun, 2 ranks, --sp-size 2: FSDP2 + Ulysses. Two steps, so step 2's rollouts come from the weights
    gathered tensor by tensor into SP-rank 0's engine after step 1; they must match one process's."""
    args = ["--init", str(easy_task["init"]), "--data", str(easy_task["data"]), "--steps", "2",
            "--save-every", "0", *RL_ARGS]
    rl.main(args + ["--out", str(tmp_path / "sp1")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "rl.py", *args, "--out", str(tmp_path / "sp2"), "--sp-size", "2"],
                   cwd=ROOT, check=True, env=env, capture_output=True)
    before = load_file(str(easy_task["init"] / "llm" / "model.safetensors"))
    one = load_file(str(tmp_path / "sp1" / "final" / "llm" / "model.safetensors"))
    two = load_file(str(tmp_path / "sp2" / "final" / "llm" / "model.safetensors"))
    moved = max((one[k] - before[k]).abs().max().item() for k in one)
    assert moved > 1e-5  # the steps did change the weights
    assert_same_adamw_updates(one, two)
    for a, b in zip(rows_of(tmp_path / "sp1"), rows_of(tmp_path / "sp2"), strict=True):
        assert (b["reward"], b["response_len"]) == pytest.approx((a["reward"], a["response_len"])), a["step"]
        assert b["logprob_gap_max"] < 0.011, b  # the engine decodes with the trainer's current weights


def test_rl_with_vllm_engine_keeps_engine_and_trainer_in_step(easy_task, tmp_path):
    """Two steps with the real vLLM engine: after the first update the weights are synced into the engine,
    so in step 2 its log-probs still match the trainer's (to the top-p renormalisation, -log 0.99 ~ 0.01).
    Without the sync, a step at this learning rate moves log-probs far more than that."""
    args = [a if a != "torch" else "vllm" for a in RL_ARGS]
    rl.main(["--init", str(easy_task["init"]), "--data", str(easy_task["data"]), "--out", str(tmp_path),
             "--steps", "2", "--save-every", "0", "--max-model-len", "1024", *args])
    rows = rows_of(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["grad_norm"] > 0
    for r in rows:
        assert r["logprob_gap_max"] < 0.011, r


def test_torchrun_sp2_with_the_vllm_engine(easy_task, tmp_path):
    """The default engine under torchrun with --sp-size 2. vLLM builds its process groups from the
    training group, so every rank must build an engine (rank 1's stays idle); building it on SP rank 0
    alone hung here. Two steps: step 2 samples from the weights synced after step 1."""
    args = [a if a != "torch" else "vllm" for a in RL_ARGS]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "rl.py", "--init", str(easy_task["init"]), "--data", str(easy_task["data"]),
                    "--out", str(tmp_path), "--steps", "2", "--save-every", "0", "--max-model-len", "1024",
                    "--sp-size", "2", *args],
                   cwd=ROOT, check=True, capture_output=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = rows_of(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["logprob_gap_max"] < 0.011, r


def test_two_mini_batches_make_the_ratio_clip_bite(easy_task, tmp_path):
    """With the rollout batch split into two updates, the second one scores samples of an older policy:
    ratios move away from 1 and at this learning rate some get clipped. With one update they stay at 1."""
    base = ["--init", str(easy_task["init"]), "--data", str(easy_task["data"]), "--steps", "1",
            "--save-every", "0", *RL_ARGS]
    rl.main(base + ["--out", str(tmp_path / "one"), "--mini-batches", "1", "--micro-batch-size", "8"])
    rl.main(base + ["--out", str(tmp_path / "two"), "--mini-batches", "2", "--micro-batch-size", "8"])
    assert rows_of(tmp_path / "one")[0]["clip_frac"] == 0
    assert rows_of(tmp_path / "two")[0]["clip_frac"] > 0


def test_engine_length_is_checked_or_derived_at_start_up(tiny_model):
    """The longest prompt of the first records + --max-new-tokens must fit the engine; without
    --max-model-len that sum (plus slack for later, longer text) is the engine's length."""
    records = [mc_record(), data.Record("q2", "v.mp4", "How many red scenes are there, in all?", [], "numerical", "", "2")]
    sampling = data.FrameSampling(num_frames=256)  # the paper's 7B setting; no video is opened to count them
    sep = len(tiny_model.encode_text(tiny_model.config.frame_separator))
    lengths = [frames * (tiny_model.config.tokens_per_frame + sep) + text
               for frames, text in (rl.prompt_positions(tiny_model, r, sampling) for r in records)]
    needed = max(lengths) + 64
    assert min(lengths) > 256 * 5
    args = lambda *flag: rl.parse_args(["--init", "i", "--data", "d.jsonl", "--out", "o", "--max-new-tokens", "64", *flag])
    assert rl.engine_max_model_len(tiny_model, records, sampling, args()) == needed + rl.TEXT_SLACK
    assert rl.engine_max_model_len(tiny_model, records, sampling, args("--max-model-len", str(needed))) == needed
    with pytest.raises(ValueError, match=f"needs --max-model-len of at least {needed}, got {needed - 1}"):
        rl.engine_max_model_len(tiny_model, records, sampling, args("--max-model-len", str(needed - 1)))


def test_a_prompt_too_long_for_the_engine_is_refused_before_the_first_step(easy_task, tmp_path):
    with pytest.raises(ValueError, match=r"8 frames x \(4 tokens \+ 1 separator\).*--max-model-len"):
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


# ---- the passes: shared prefix, micro-batch weights, on-policy old log-probs ----

@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batches_16_16_8_add_up_to_one_micro_batch_of_40(loss_agg):
    from types import SimpleNamespace
    torch.manual_seed(0)
    lengths = torch.randint(1, 12, (40,)).tolist()
    episodes = [SimpleNamespace(sample=SimpleNamespace(token_ids=[0] * n)) for n in lengths]
    mask = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]                 # [40, 12]
    per_token = torch.randn(40, 12, requires_grad=True)

    whole = rl.aggregate(per_token, mask, loss_agg)
    (expected,) = torch.autograd.grad(whole, per_token)
    split = sum(rl.aggregate(per_token[s], mask[s], loss_agg) * rl.micro_batch_weight(episodes[s], episodes, loss_agg)
                for s in (slice(0, 16), slice(16, 32), slice(32, 40)))
    (got,) = torch.autograd.grad(split, per_token)
    torch.testing.assert_close(split, whole)
    torch.testing.assert_close(got, expected)


def test_shared_prefix_step_updates_weights_like_per_sequence(easy_task, tmp_path):
    """One rl.py step (torch engine, fixed seed), groups packed with their prompt once vs every response its
    own sequence: the same samples, rewards and updated weights. Micro-batches of 6 sequences split the 16
    differently in the two layouts (whole groups of 4: 4/4/4/4; 6/6/4), which the token weights absorb."""
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
