"""The shared-prefix passes: a GRPO group packed into one row [prompt][response 1]...[response G], the
prompt run once, must give each response exactly the log-probs and gradients of its own sequence
[prompt; response]: in one process and sequence-parallel (real gloo groups of 2 and 3 ranks)."""
import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

import model as M
import mrsp
import train
from dist import allreduce_gradients, run_ranks
from test_mrsp import SP_HEADS, example_frames, with_heads

# Responses of different lengths, one of a single token, per group size G.
GROUPS = {1: [[5, 6, 7, 8]],
          2: [[9], [10, 11, 12, 13, 14, 15]],
          5: [[16, 17, 18], [19], [20, 21, 22, 23, 24, 25, 26], [27, 28], [29, 30, 31, 32]]}


def example_groups(model: M.VideoLM, G: int):
    """Two prompts (a 5-frame and a 3-frame video) with G responses each."""
    with torch.no_grad():
        videos = [model.encode_video(example_frames(n)) for n in (5, 3)]
    prompts = [model.prompt("Watch the video.\n", v, "\nWhich colour comes first?") for v in videos]
    responses = [GROUPS[G], [list(reversed(r)) for r in GROUPS[G]]]
    return prompts, responses


def example_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Advantage-weighted log-probs, one advantage per response, token mean (rows = responses in order),
    each response token weighted by a random weight of its own (the same token gets the same weight in
    both layouts: the mask lists every response's tokens in order), so that the gradient differs at every
    position and a backward returning another rank's slice of it fails."""
    advantages = torch.linspace(-1, 1, len(logprobs))[:, None]                    # [E, 1]
    weights = torch.zeros(logprobs.shape)                                         # [E, S] or [E, R_max]
    weights[mask] = torch.rand(int(mask.sum()), generator=torch.Generator().manual_seed(0))
    return -(advantages * weights * logprobs * mask).sum() / mask.sum() + (logprobs * mask).pow(2).sum() / 100


def per_sequence(model, prompts, responses):
    """Log-probs of the response tokens [N] and LLM gradients, every response its own sequence."""
    model.zero_grad(set_to_none=True)
    batch = model.build_sequence_batch([p for p, g in zip(prompts, responses) for _ in g],
                                       [r for g in responses for r in g])
    logprobs = model.token_logprobs(batch)
    example_loss(logprobs, batch.loss_mask).backward()
    return logprobs[batch.loss_mask].detach(), {n: p.grad.clone() for n, p in model.llm.named_parameters()}


def packed(model, prompts, responses, ps: mrsp.ParallelState):
    model.zero_grad(set_to_none=True)
    batch = model.build_packed_batch(prompts, responses, sp_rank=ps.sp_rank, sp_size=ps.sp_size)
    logprobs = train.sequence_logprobs(model, batch, ps, block_rows=4)
    example_loss(logprobs, batch.response_mask).backward()
    allreduce_gradients(model, ps)
    return logprobs[batch.response_mask].detach(), {n: p.grad.clone() for n, p in model.llm.named_parameters()}


def assert_same(got, expected):
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("G", [1, 2, 5])
def test_packed_group_equals_per_sequence_in_one_process(tiny_model, G):
    tiny_model.freeze_vision()
    expected = per_sequence(tiny_model, *example_groups(tiny_model, G))
    M.enable_shared_prefix(tiny_model)
    assert_same(packed(tiny_model, *example_groups(tiny_model, G), mrsp.ParallelState()), expected)


def test_packed_rows_hold_the_prompt_once_with_positions_continuing_from_it(tiny_model):
    prompt = M.Prompt(torch.randn(3, tiny_model.config.llm_hidden), torch.arange(3))
    batch = tiny_model.build_packed_batch([prompt], [[[7, 8], [9]]])
    assert batch.inputs_embeds.shape[1] == 3 + 2 + 1                           # P + G*R, not G*(P + R)
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3]]
    assert batch.response_mask.tolist() == [[True, True], [True, False]]
    # p2 (index 2) predicts the first token of both responses; e7 (index 3) predicts 8
    assert sorted(zip(batch.score_from.tolist(), batch.score_targets.tolist())) == [(2, 7), (2, 9), (3, 8)]
    with pytest.raises(ValueError, match="group 0: an empty response"):
        tiny_model.build_packed_batch([prompt], [[[7], []]])


def test_each_rank_builds_only_its_slice_of_the_packed_rows(tiny_model):
    prompts, responses = example_groups(tiny_model, 2)
    with torch.no_grad():
        whole = tiny_model.build_packed_batch(prompts, responses)
        shards = [tiny_model.build_packed_batch(prompts, responses, sp_rank=r, sp_size=3) for r in range(3)]
    n = shards[0].inputs_embeds.shape[1]
    S = whole.inputs_embeds.shape[1]
    assert n == -(-S // 3) and all(s.inputs_embeds.shape[1] == n for s in shards)
    rows = torch.cat([s.inputs_embeds for s in shards], dim=1)                 # [B, 3n, D]
    torch.testing.assert_close(rows[:, :S], whole.inputs_embeds)
    assert sum(s.num_scored for s in shards) == whole.num_scored               # each token scored once

    # the per-sequence layout too: each rank's slice equals its shard of the whole batch
    sequences = ([p for p, g in zip(prompts, responses) for _ in g], [r for g in responses for r in g])
    with torch.no_grad():
        whole = tiny_model.build_sequence_batch(*sequences)
        for rank in range(3):
            mine = mrsp.shard_sequence(tiny_model.build_sequence_batch(*sequences, sp_rank=rank, sp_size=3), rank, 3)
            cut = mrsp.shard_sequence(whole, rank, 3)
            for got, expected in zip((mine.inputs_embeds, mine.targets, mine.position_ids),
                                     (cut.inputs_embeds, cut.targets, cut.position_ids)):
                torch.testing.assert_close(got, expected)


def test_the_lm_head_keeps_one_row_block_for_backward(tiny_model):
    """Bytes saved for backward by the LM head, beyond views of its inputs, do not grow with the rows it
    scores (a block's logits are recomputed in backward), and the gradients equal the plain computation."""
    head = tiny_model.llm.get_output_embeddings()

    def saved_bytes_and_grads(rows: int, plain: bool):
        torch.manual_seed(0)
        hidden = torch.randn(rows, tiny_model.config.llm_hidden, requires_grad=True)
        targets = torch.randint(0, head.out_features, (rows,))
        saved = []

        inputs = {hidden.untyped_storage().data_ptr(), targets.untyped_storage().data_ptr()}

        def pack(t):
            saved.append(0 if t.untyped_storage().data_ptr() in inputs else t.numel() * t.element_size())
            return t
        head.zero_grad(set_to_none=True)
        with saved_tensors_hooks(pack, lambda t: t):
            if plain:
                logprobs = torch.log_softmax(head(hidden).float(), -1).gather(1, targets[:, None]).squeeze(1)
            else:
                logprobs = tiny_model.score_rows(hidden, targets, temperature=1.0, num_blocks=rows // 8)
        logprobs.sum().backward()
        return sum(saved), (hidden.grad, head.weight.grad)

    small, _ = saved_bytes_and_grads(16, plain=False)
    large, grads = saved_bytes_and_grads(64, plain=False)
    block_logits = 8 * head.out_features * 4
    assert large <= small + 1024 and large < block_logits, (small, large)
    _, plain = saved_bytes_and_grads(64, plain=True)
    for got, expected in zip(grads, plain):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def sp_packed_job(checkpoint: str) -> dict:
    """Runs on every rank: packed log-probs and gradients, G = 1, 2, 5, over one SP group of all ranks."""
    ps = mrsp.init_distributed(sp_size=int(__import__("os").environ["WORLD_SIZE"]))
    model = with_heads(M.VideoLM.load(checkpoint, attn_implementation="sdpa").eval(), *SP_HEADS[ps.sp_size])
    model.freeze_vision()
    mrsp.enable_ulysses(model, ps.sp_group)
    return {G: packed(model, *example_groups(model, G), ps) for G in GROUPS}


@pytest.fixture(scope="module")
def sp_packed_runs(tiny_checkpoint):
    return {sp: run_ranks(sp_packed_job, sp, str(tiny_checkpoint), timeout=300) for sp in (2, 3)}


@pytest.mark.parametrize("sp_size", [2, 3])
def test_packed_groups_under_sequence_parallelism_equal_per_sequence(sp_packed_runs, tiny_checkpoint, sp_size):
    model = with_heads(M.VideoLM.load(tiny_checkpoint, attn_implementation="sdpa").eval(), *SP_HEADS[sp_size])
    model.freeze_vision()
    for G in GROUPS:
        expected = per_sequence(model, *example_groups(model, G))
        for rank_result in sp_packed_runs[sp_size]:
            assert_same(rank_result[G], expected)
