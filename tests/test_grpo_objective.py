"""The GRPO objective, computed twice: its pieces (advantages, k3 KL, aggregation, clipped policy loss, TIS)
against hand values; rl.update_policy, the function the loop calls, against the same update written out
here from the formulas, per token and per flag; and the passes it runs (micro-batches balanced by
positions, their weights). No rl.py run: the fixed rollouts are built here."""
import itertools
import math

import pytest
import torch

import data
import model as M
import mrsp
import rl
import rollout
import train
import video


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
    old = torch.zeros(1, 5)
    # ratios e^x: 1.5 (above 1 + 0.3), 0.5 (below 1 - 0.2), 1.1 (inside), 5.0 (dual clip territory), 1.5 with A < 0
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 5.0, 1.5]]))
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0, -2.0]])
    per_token, clipped = rl.policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.3, dual_clip=3.0)
    expected = [
        -1.0 * 1.3,               # A>0, r=1.5: max(-1.5, -1.3) = -1.3 (clipped at 1 + clip_high)
        max(0.5, 0.8),            # A<0, r=0.5: max(0.5, 0.8) = 0.8 (clipped at 1 - clip_low); below dual bound 3
        -2.0 * 1.1,               # inside the clip range
        min(max(5.0, 1.3), 3.0),  # A<0, r=5: max gives 5.0, the dual clip bounds it at -A * 3 = 3
        2.0 * 1.5,                # A<0, r=1.5 above 1 + clip_high: max(3.0, 2.6) = 3.0, unclipped, under 6
    ]
    torch.testing.assert_close(per_token, torch.tensor([expected]))
    assert clipped.tolist() == [[True, True, False, False, False]]  # where the ratio clip changed the loss


def test_tis_weights_and_the_loss_they_weight_by_hand():
    """pi_old / pi_engine = 2, 1, 0.5, 3 capped at C = 1.5: weights 1.5, 1, 0.5, 1.5; two of four capped.
    On-policy (r = 1) each token's loss is -A w, its gradient -A w / 4 under token-mean."""
    from types import SimpleNamespace
    old = torch.log(torch.tensor([[0.5, 0.5, 0.2, 0.9]]))
    engine = torch.log(torch.tensor([[0.25, 0.5, 0.4, 0.3]]))
    torch.testing.assert_close(rl.tis_weights(old, engine, cap=1.5), torch.tensor([[1.5, 1.0, 0.5, 1.5]]))
    logp = old.clone().requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 2.0, 0.5]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    args = SimpleNamespace(clip_low=0.2, clip_high=0.3, dual_clip=3.0, loss_agg="token-mean", kl_coef=0.0, tis_cap=1.5)
    loss, metrics = rl.grpo_loss(logp, old, None, engine, adv, mask, args)
    assert loss.item() == pytest.approx((-1.5 + 1.0 - 1.0 - 0.75) / 4)
    assert metrics["tis_weight_mean"].item() == pytest.approx((1.5 + 1 + 0.5 + 1.5) / 4)
    assert metrics["tis_capped_share"].item() == pytest.approx(2 / 4)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.375, 0.25, -0.25, -0.1875]]))
    _, off = rl.grpo_loss(logp, old, None, engine, adv, mask, SimpleNamespace(**{**vars(args), "tis_cap": 0.0}))
    assert off["loss"].item() == pytest.approx((-1 + 1 - 2 - 0.5) / 4) and "tis_weight_mean" not in off


def test_policy_gradient_pushes_up_positive_advantages():
    logp = torch.zeros(1, 2, requires_grad=True)
    per_token, _ = rl.policy_loss(logp, logp.detach(), torch.tensor([[1.0, -1.0]]))
    per_token.sum().backward()
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
    pg, _ = rl.policy_loss(logp, old, adv)
    kl = rl.kl_k3(logp, ref)
    loss = rl.aggregate(pg + 0.01 * kl, mask, "token-mean")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all(), (loss, logp.grad)
    assert rl.kl_k3(logp, ref).max() <= 10


# ---- the passes: micro-batches of similar lengths, their weights ----

def episodes_of(response_lens: list[list[int]]) -> list[list[rl.Episode]]:
    """Groups of episodes whose responses have these lengths (token ids count their group and place)."""
    record = data.Record("p", "v.mp4", "Which?", ["a", "b"], "multiple_choice", "", "A")
    return [[rl.Episode(record, rollout.Sample([n * 100 + j] * R, [0.0] * R, "stop", ""), 0.0, 0.0, 0.0)
             for j, R in enumerate(lens)] for n, lens in enumerate(response_lens)]


def pass_args(*flags):
    return rl.parse_args(["--init", "i", "--data", "d.jsonl", "--out", "o", *flags])


def padded_positions(micro, prompt_of, shared_prefix):
    """A pass's positions as its batch is built: each row padded to the longest. A row is [prompt; response]
    per sequence, [prompt][response 1]...[response G] per group with the shared prefix."""
    rows = {}
    for e in micro:
        n = e.sample.token_ids[0] // 100
        key = n if shared_prefix else id(e)
        rows[key] = rows.get(key, prompt_of[n]) + len(e.sample.token_ids)
    return len(rows) * max(rows.values())


def fewest_passes(rows: list[int], max_rows: int, bound: int) -> tuple[int, int]:
    """By brute force over every split of the rows: the fewest passes of at most max_rows rows, each within
    `bound` padded positions unless it holds one row (0: no bound); and, with that many, the least total."""
    n = len(rows)
    for k in range(1, n + 1):
        totals = []
        for assign in itertools.product(range(k), repeat=n):
            passes = [[rows[i] for i in range(n) if assign[i] == p] for p in range(k)]
            if all(p and len(p) <= max_rows and (not bound or len(p) == 1 or len(p) * max(p) <= bound) for p in passes):
                totals.append(sum(len(p) * max(p) for p in passes))
        if totals:
            return k, min(totals)


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_rows_of_similar_length_share_a_pass(shared_prefix):
    """Video prompts (2,000 positions) and text questions (30) alternating, G = 2, responses of 10 tokens,
    passes of at most 4 sequences. In order every pass would pad texts to a video's length; grouped by
    length the passes are the fewest and hold the fewest padded positions any split of them can."""
    prompt_lens = [2000, 30, 2000, 30, 2000, 30]
    groups = episodes_of([[10, 10]] * 6)
    flags = ["--group-size", "2", "--micro-batch-size", "4"] + ([] if shared_prefix else ["--no-shared-prefix"])
    (mini,), largest = rl.plan_passes(groups, prompt_lens, pass_args(*flags), mrsp.ParallelState())
    assert sorted(id(e) for m in mini for e in m) == sorted(id(e) for g in groups for e in g)
    rows = ([P + 2 * 10 for P in prompt_lens] if shared_prefix            # a packed group
            else [P + 10 for P in prompt_lens for _ in range(2)])           # a sequence
    loads = [padded_positions(m, prompt_lens, shared_prefix) for m in mini]
    assert (len(mini), sum(loads)) == fewest_passes(rows, 2 if shared_prefix else 4, 0), loads
    assert largest == max(loads)
    in_order = [rows[i:i + (2 if shared_prefix else 4)] for i in range(0, len(rows), 2 if shared_prefix else 4)]
    assert sum(loads) < sum(len(p) * max(p) for p in in_order)
    for m in mini:                                                    # packed groups stay whole, in order
        ids = [e.sample.token_ids[0] for e in m]
        assert not shared_prefix or all(ids[i + 1] == ids[i] + 1 for i in range(0, len(ids), 2))


def test_micro_batch_tokens_takes_the_fewest_passes_that_keep_under_it():
    """Groups of 1,000, 1,000, 1,000 and 100 prompt positions (+ 2 x 5 response tokens each): the fewest
    passes whose padded positions stay under the bound (brute force), a group that alone exceeds it alone."""
    prompt_lens, groups = [1000, 1000, 1000, 100], episodes_of([[5, 5]] * 4)
    rows = [P + 10 for P in prompt_lens]
    counts = []
    for bound in (2100, 1500, 500, 0):
        flags = ["--group-size", "2", "--micro-batch-size", "8", "--micro-batch-tokens", str(bound)]
        (mini,), largest = rl.plan_passes(groups, prompt_lens, pass_args(*flags), mrsp.ParallelState())
        loads = [padded_positions(m, prompt_lens, True) for m in mini]
        assert len(mini) == fewest_passes(rows, 8, bound)[0], (bound, loads)
        assert all(load <= bound or len(m) == 2 for m, load in zip(mini, loads)) or not bound, (bound, loads)
        assert largest == max(loads)
        counts.append(len(mini))
    assert counts == [2, 4, 4, 1]  # 2,100: [1,010 + 1,010], [1,010 + 110], 2 x 1,010 padded each


def test_mini_batches_take_whole_groups_in_order():
    groups = episodes_of([[3, 4]] * 5)
    minis, _ = rl.plan_passes(groups, [50, 60, 70, 80, 90], pass_args("--group-size", "2", "--mini-batches", "2",
                                                                      "--micro-batch-size", "2"), mrsp.ParallelState())
    assert [sorted({e.sample.token_ids[0] // 100 for m in mini for e in m}) for mini in minis] == [[0, 1, 2], [3, 4]]


def plan_on_ranks(cases: list[list[list[int]]]) -> list[int]:
    """rl.plan_passes on one rank of a 2-rank data-parallel run, per case (each rank's prompt lengths): the
    number of passes this rank takes."""
    ps = mrsp.init_distributed(sp_size=1)
    args = pass_args("--group-size", "2", "--micro-batch-size", "8", "--micro-batch-tokens", "1000")
    return [len(rl.plan_passes(episodes_of([[4, 4]] * 4), lens_by_rank[ps.rank], args, ps)[0][0])
            for lens_by_rank in cases]


def test_data_parallel_ranks_agree_on_the_number_of_passes():
    """FSDP runs its collectives once per pass on every rank: a rank of text questions (one pass would do)
    takes as many as a rank of videos (four, each group 900+ positions under a bound of 1,000); two ranks
    that each need two take two."""
    from dist import run_ranks
    cases = [[[20, 30, 20, 30], [900, 950, 900, 950]], [[20, 30, 20, 30], [20, 30, 900, 30]]]
    assert run_ranks(plan_on_ranks, 2, cases) == [[4, 2], [4, 2]]


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


# ---- one update computed twice: rl.update_policy vs the formulas written out here ----

# Two groups of G = 3 responses. Texts decide the rewards (accuracy, format); token ids are what is scored.
TEXTS = ["<think>x</think><answer>A</answer>",   # right, well formed: accuracy 1, format 1
         "<think>x</think><answer>B</answer>",   # wrong, well formed: 0, 1
         "<answer>A</answer>"]                   # right, no thinking: 1, 0
ACC_FMT = [(1, 1), (0, 1), (1, 0)]


def fixed_rollouts(model, seed=0):
    """Records, their prompt embeddings [P, D] (text-only: embedded token ids) and per group the engine's
    samples: token ids and engine log-probs (random: not the trainer's). Group 2 re-uses group 1's tokens
    with the advantages' signs swapped, so that the first mini-batch's step (group 1) moves group 2's ratios
    both ways, past every clip bound."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.llm.config.vocab_size
    records = [data.Record(f"p{i}", "v.mp4", "Which?", ["red", "blue"], "multiple_choice", "", "A") for i in range(2)]
    with torch.no_grad():
        prompts = {r.problem_id: model.llm.get_input_embeddings()(torch.randint(3, vocab, (5 + 2 * i,), generator=g))
                   for i, r in enumerate(records)}
    up, down, more = (torch.randint(3, vocab, (n,), generator=g).tolist() for n in (4, 3, 5))
    token_ids = [[up, down, more], [down + up[:1], up + down, more[:3]]]
    groups = [[rollout.Sample(ids, (-torch.rand(len(ids), generator=g) * 8).tolist(), "answer", TEXTS[j])
               for j, ids in enumerate(group)] for group in token_ids]
    return records, prompts, groups


def text_prompt(embeds: torch.Tensor) -> M.Prompt:
    """Prompt embeddings [P, D] at positions 0..P-1, as the update's batches take them."""
    return M.Prompt(embeds, torch.arange(len(embeds)))


def hf_logprobs(llm, prompt, response):
    """log pi(response_t | prompt, response_<t) from the Hugging Face model itself, one sequence.   -> [R]"""
    ids = torch.tensor(response)
    x = torch.cat([prompt, llm.get_input_embeddings()(ids)])[None]                # [1, P + R, D]
    logits = llm(inputs_embeds=x).logits[0, len(prompt) - 1:-1].float()          # [R, V]: the positions predicting them
    return torch.log_softmax(logits, -1).gather(1, ids[:, None])[:, 0]


def expected_update(policy, reference, prompts, records, groups, o, lr, mini_batches):
    """The same update from the formulas: rewards, advantages, per-token loss and its aggregation, one SGD
    step (lr) per mini-batch of whole groups. Per mini-batch: {loss, dlogp: per-token dloss/dlogp [E, R_max],
    grads: the LLM's, ratio and adv: per token [E, R_max] (0 off the responses)}. Leaves `policy` as it was."""
    initial = {k: v.clone() for k, v in policy.llm.state_dict().items()}
    rewards = torch.tensor([[o["accuracy_weight"] * a + o["format_weight"] * f for a, f in ACC_FMT]] * len(groups))
    centred = rewards - rewards.mean(1, keepdim=True)                              # [N, G]
    adv = centred / (rewards.std(1, keepdim=True) + 1e-6) if o["std_norm"] else centred
    with torch.no_grad():
        old = [[hf_logprobs(policy.llm, prompts[r.problem_id], s.token_ids) for s in g] for r, g in zip(records, groups)]
        ref = [[hf_logprobs(reference.llm, prompts[r.problem_id], s.token_ids) for s in g] for r, g in zip(records, groups)]
    out = []
    for part in mrsp.split_evenly(len(groups), mini_batches):
        terms, logps, ratios, advs = [], [], [], []
        for n in part:
            for j, s in enumerate(groups[n]):
                logp = hf_logprobs(policy.llm, prompts[records[n].problem_id], s.token_ids)   # [R]
                logp.retain_grad()
                a, r = adv[n, j], torch.exp(logp - old[n][j])
                pg = torch.maximum(-a * r, -a * r.clamp(1 - o["clip_low"], 1 + o["clip_high"]))
                if a < 0:
                    pg = torch.minimum(pg, -a * o["dual_clip"])
                if o["tis_cap"]:
                    pg = pg * torch.exp(old[n][j] - torch.tensor(s.logprobs)).clamp(max=o["tis_cap"])
                d = ref[n][j] - logp
                terms.append(pg + o["kl_coef"] * (torch.exp(d) - d - 1))
                logps.append(logp)
                ratios.append(r.detach())
                advs.append(a.expand(len(logp)))
        if o["loss_agg"] == "token-mean":
            loss = torch.cat(terms).sum() / sum(len(t) for t in terms)
        elif o["loss_agg"] == "seq-mean-token-mean":
            loss = sum(t.mean() for t in terms) / len(terms)
        else:
            loss = sum(t.sum() for t in terms) / len(terms)
        policy.llm.zero_grad()
        loss.backward()
        padded = lambda rows: torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)    # [E, R_max]
        out.append(dict(loss=loss.item(), dlogp=padded([lp.grad for lp in logps]), ratio=padded(ratios),
                        adv=padded(advs), grads={n: p.grad.clone() for n, p in policy.llm.named_parameters()}))
        with torch.no_grad():
            for p in policy.llm.parameters():
                p -= lr * p.grad
    policy.llm.load_state_dict(initial)
    policy.llm.zero_grad(set_to_none=True)
    return out


def run_update_policy(policy, reference, prompts, records, groups, flags, lr, monkeypatch):
    """rl.py's own path: score_group, set_advantages, update_policy with plain SGD (so that an optimizer step
    is -lr x gradient, as in expected_update). Records per mini-batch the loss's gradient with respect to the
    log-probs rl.py scored (spied on train.sequence_logprobs) and the parameters' gradients at the step.
    Leaves `policy` as it was."""
    initial = {k: v.clone() for k, v in policy.llm.state_dict().items()}
    args = rl.parse_args(["--init", "i", "--data", "d.jsonl", "--out", "o", "--group-size", "3",
                          "--micro-batch-size", "3", "--max-grad-norm", "1e9", "--temperature", "1", *flags])
    params = [p for p in policy.llm.parameters()]
    optimizer = torch.optim.SGD(params, lr=lr)
    seen = {"dlogp": [], "grads": []}
    real = train.sequence_logprobs

    def spied(*a, **kw):
        logprobs = real(*a, **kw)
        if logprobs.requires_grad:
            logprobs.register_hook(lambda grad: seen["dlogp"].append(grad.clone()))
        return logprobs
    monkeypatch.setattr(train, "sequence_logprobs", spied)
    optimizer.register_step_pre_hook(lambda *_: seen["grads"].append(
        {n: p.grad.clone() for n, p in policy.llm.named_parameters()}))
    prompt_fn = lambda record: text_prompt(prompts[record.problem_id])
    models = rl.Models(policy, reference if args.kl_coef > 0 else None, params, optimizer, prompt_fn,
                       prompt_fn if args.kl_coef > 0 else None)
    episodes_by_group = [rl.score_group(r, g, args) for r, g in zip(records, groups)]
    rl.set_advantages(episodes_by_group, args)
    prompt_lens = [len(prompts[r.problem_id]) for r in records]
    stats = rl.update_policy(models, episodes_by_group, prompt_lens, args, mrsp.ParallelState(),
                             rl.PhaseTimer(torch.device("cpu")))
    policy.llm.load_state_dict(initial)
    return stats, seen, episodes_by_group


OBJECTIVES = {  # flags -> the options of expected_update; BASE_FLAGS's clip bounds have tokens beyond each
    "clip bounds, dual clip, KL, token-mean": ([], {}),
    "no std-norm": (["--no-std-norm"], {"std_norm": False}),
    "seq-mean-token-mean": (["--loss-agg", "seq-mean-token-mean"], {"loss_agg": "seq-mean-token-mean"}),
    "seq-mean-token-sum": (["--loss-agg", "seq-mean-token-sum"], {"loss_agg": "seq-mean-token-sum"}),
    "no KL": (["--kl-coef", "0"], {"kl_coef": 0.0}),
    "strong KL": (["--kl-coef", "0.5"], {"kl_coef": 0.5}),
    "reward weights": (["--accuracy-weight", "0.3", "--format-weight", "0.7"],
                       {"accuracy_weight": 0.3, "format_weight": 0.7}),
    "TIS": (["--tis-cap", "2"], {"tis_cap": 2.0}),
}
BASE_FLAGS = ["--mini-batches", "2", "--clip-low", "0.4", "--clip-high", "0.5", "--dual-clip", "1.8",
              "--kl-coef", "0.1"]
BASE = dict(std_norm=True, clip_low=0.4, clip_high=0.5, dual_clip=1.8, loss_agg="token-mean", kl_coef=0.1,
            tis_cap=0.0, accuracy_weight=0.9, format_weight=0.1)
SGD_LR = 0.05


@pytest.fixture(scope="module")
def update_models(tiny_tokenizer):
    """A tiny policy and a reference that differs from it (so the KL term has a gradient from the start),
    with rl.py's attention for packed groups in one process."""
    import model as M
    policy, reference = (M.build_from_preset("tiny", tiny_tokenizer, seed=seed) for seed in (0, 1))
    for model in (policy, reference):
        model.freeze_vision()
        rl.enable_attention(model, mrsp.ParallelState(), shared_prefix=True)
    return policy, reference


@pytest.mark.parametrize("name", OBJECTIVES)
def test_update_policy_equals_the_formulas(update_models, monkeypatch, name):
    """Two mini-batches: the first at the rollout's weights (ratios 1), the second at the weights one SGD step
    later, off-policy, so tokens fall inside the clip range, beyond 1 - clip_low, beyond 1 + clip_high and
    beyond the dual clip. Per token: dloss/dlogp; per mini-batch: the loss and the gradient of the LLM."""
    flags, options = OBJECTIVES[name]
    policy, reference = update_models
    records, prompts, groups = fixed_rollouts(policy)
    o = {**BASE, **options}
    stats, seen, episodes = run_update_policy(policy, reference, prompts, records, groups, BASE_FLAGS + flags, SGD_LR,
                                              monkeypatch)
    expected = expected_update(policy, reference, prompts, records, groups, o, SGD_LR, mini_batches=2)

    second = expected[1]
    mask = second["ratio"] != 0
    a, r = second["adv"][mask], second["ratio"][mask]
    regions = {"inside": ((r > 1 - o["clip_low"]) & (r < 1 + o["clip_high"])).sum(),
               "A > 0 beyond 1 + clip_high": ((a > 0) & (r > 1 + o["clip_high"])).sum(),
               "A < 0 beyond 1 - clip_low": ((a < 0) & (r < 1 - o["clip_low"])).sum(),
               "A < 0 beyond the dual clip": ((a < 0) & (r > o["dual_clip"])).sum()}
    if not flags:  # the base case covers every branch of the clip (the others move the ratios elsewhere)
        assert all(n > 0 for n in regions.values()), regions

    expected_adv = torch.cat([expected[0]["adv"][:, 0], second["adv"][:, 0]])              # per response
    assert [e.advantage for g in episodes for e in g] == pytest.approx(expected_adv.tolist(), abs=1e-6)
    assert stats["loss"] == pytest.approx((expected[0]["loss"] + second["loss"]) / 2, rel=1e-4, abs=1e-6)
    assert len(seen["dlogp"]) == len(seen["grads"]) == 2
    for got, want in zip(seen["dlogp"], expected):
        torch.testing.assert_close(got, want["dlogp"], rtol=1e-4, atol=1e-6)      # per token
    for got, want in zip(seen["grads"], expected):
        for key in ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                    "model.embed_tokens.weight"):
            torch.testing.assert_close(got[key], want["grads"][key], rtol=1e-3, atol=1e-6, msg=key)


def test_one_update_raises_the_rewarded_responses_and_lowers_the_others(tiny_checkpoint):
    """The learning signal, deterministic: rl.py's models (rl.load_models: its AdamW, its reference) and one
    rl.update_policy on one fixed group. Rewards 1.0, 0.1, 0.9 give advantages +, -, +: after the update each
    response's log-probability (the Hugging Face model's own, summed over its tokens) moved that way."""
    import dataclasses
    args = rl.parse_args(["--init", str(tiny_checkpoint), "--data", "d.jsonl", "--out", "o", "--group-size", "3",
                          "--micro-batch-size", "3", "--lr", "1e-3"])
    models = rl.load_models(args, tiny_checkpoint, video.FrameSampling.from_args(args), mrsp.ParallelState())
    records, prompts, groups = fixed_rollouts(models.policy)
    prompt_fn = lambda record: text_prompt(prompts[record.problem_id])
    models = dataclasses.replace(models, policy_prompt=prompt_fn, reference_prompt=prompt_fn)
    episodes = [rl.score_group(records[0], groups[0], args)]
    rl.set_advantages(episodes, args)
    assert [e.reward for e in episodes[0]] == pytest.approx([1.0, 0.1, 0.9])
    sequence_logprob = lambda s: hf_logprobs(models.policy.llm, prompts["p0"], s.token_ids).sum().item()
    with torch.no_grad():
        before = [sequence_logprob(s) for s in groups[0]]
    rl.update_policy(models, episodes, [len(prompts["p0"])], args, mrsp.ParallelState(),
                     rl.PhaseTimer(torch.device("cpu")))
    with torch.no_grad():
        after = [sequence_logprob(s) for s in groups[0]]
    moved = [b - a for a, b in zip(before, after)]
    assert moved[0] > 0.01 and moved[1] < -0.01 and moved[2] > 0.01, moved


@pytest.mark.parametrize("layout", ["per sequence", "packed"])
def test_passes_out_of_order_give_the_update_of_the_formulas(update_models, monkeypatch, layout):
    """Passes grouped by length reorder the episodes; their advantages, engine log-probs (TIS on) and weights
    follow them: the loss and the gradients equal the formulas' (per mini-batch, summed over its passes).
    Per sequence, passes of at most 2: the first group's rows (9, 8, 10 positions) run as [9, 10] and [8],
    the second's (11, 14, 10) as [11, 14] and [10]. Packed, one mini-batch of both groups, a group a pass:
    the second group (21 positions) runs before the first (17)."""
    policy, reference = update_models
    records, prompts, groups = fixed_rollouts(policy)
    flags, mini_batches, rows = {"per sequence": (["--no-shared-prefix", "--micro-batch-size", "2"], 2, [2, 1, 2, 1]),
                                 "packed": (["--mini-batches", "1", "--micro-batch-size", "3"], 1, [3, 3])}[layout]
    stats, seen, _ = run_update_policy(policy, reference, prompts, records, groups,
                                       BASE_FLAGS + ["--tis-cap", "2"] + flags, SGD_LR, monkeypatch)
    expected = expected_update(policy, reference, prompts, records, groups, {**BASE, "tis_cap": 2.0}, SGD_LR,
                               mini_batches=mini_batches)
    assert stats["micro_batches"] == len(rows) and [len(d) for d in seen["dlogp"]] == rows
    if layout == "packed":  # the first pass holds the second group (its first response: 4 tokens)
        assert (seen["dlogp"][0][0] != 0).sum() == 4
    assert stats["loss"] == pytest.approx(sum(e["loss"] for e in expected) / len(expected), rel=1e-4, abs=1e-6)
    assert len(seen["grads"]) == len(expected)
    for got, want in zip(seen["grads"], expected):
        for key in ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
            torch.testing.assert_close(got[key], want["grads"][key], rtol=1e-3, atol=1e-6, msg=key)
