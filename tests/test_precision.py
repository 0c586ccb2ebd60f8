"""The 7B path's precision and FSDP layout, proven on the CPU: one precision policy (FSDP2 mixed precision
under torchrun, autocast in one process), a reference that computes exactly as the policy does, fp32
log-probs, one FSDP root for the decoder, and the GPU-only variants that used to crash (flash-attn behind
the shared prefix, an unbounded torch-engine batch, a trainable tower over long videos, bench step's SP
size on an 8-GPU node)."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import model as M
import mrsp
import rollout
import train
from dist import run_ranks
from test_train_memory import saved_for_backward_bytes

ROOT = Path(__file__).resolve().parents[1]


def packed_inputs(hidden: int, seed: int = 0):
    """One GRPO group: a prompt of 11 random embeddings and 3 responses of 5, 3 and 7 tokens."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [M.Prompt(torch.randn(11, hidden, generator=generator), torch.arange(11))]
    groups = [[torch.randint(3, 300, (n,), generator=generator).tolist() for n in (5, 3, 7)]]
    return prompts, groups


# ---- under FSDP with --bf16: policy and reference compute identically, in bf16, log-probs in fp32 ----

def precision_job(checkpoint: str) -> dict:
    import rl
    ps = mrsp.init_distributed(sp_size=2)
    sent = []  # dtypes of what Ulysses' all-to-all sends
    all_to_all = mrsp.all_to_all
    mrsp.all_to_all = lambda x, *args, **kwargs: (sent.append(x.dtype), all_to_all(x, *args, **kwargs))[1]
    policy = rl.load_policy(checkpoint, ps, bf16=True, shared_prefix=True)
    reference = rl.load_reference(checkpoint, policy, ps, bf16=True, shared_prefix=True)
    gathered = []  # the dtype of a decoder layer's weights while it computes
    policy.llm.get_decoder().layers[0].mlp.register_forward_pre_hook(
        lambda module, args: gathered.append(module.up_proj.weight.dtype))
    prompts, groups = packed_inputs(policy.config.llm_hidden)

    def logprobs(model):
        return train.sequence_logprobs(model, model.build_packed_batch(prompts, groups, ps.sp_rank, ps.sp_size), ps)

    with torch.no_grad():
        ref = logprobs(reference)
    train.reshard(reference)
    lp = logprobs(policy)
    lp.sum().backward()
    return {"policy": lp.detach(), "reference": ref, "sent": set(sent), "gathered": set(gathered),
            "grads": {p.grad.dtype for p in policy.parameters() if p.grad is not None},
            "structure": train.fsdp_structure(policy), "reference_structure": train.fsdp_structure(reference),
            "layers": len(policy.llm.get_decoder().layers)}


def test_fsdp_bf16_policy_and_reference_agree_exactly_at_step_0_and_compute_in_bf16(tiny_checkpoint):
    """Before: the policy was fp32 weights under autocast (fp32 residual stream, RoPE and Ulysses q/k/v) and
    the reference bf16 weights, so their log-probs differed at step 0 and the KL pulled toward rounding
    noise; every decoder layer was an FSDP root of its own."""
    for rank in run_ranks(precision_job, 2, str(tiny_checkpoint), timeout=180):
        assert torch.equal(rank["policy"], rank["reference"])  # per token: the k3 KL is exactly 0
        assert (rank["policy"] != 0).sum() > 0                    # this rank scored tokens
        assert rank["sent"] == {torch.bfloat16}                   # q, k, v and the output through all-to-all
        assert rank["gathered"] == {torch.bfloat16}               # FSDP gathers bf16 copies of fp32 weights
        assert rank["grads"] == {torch.float32}                   # reduced and kept in fp32 for AdamW
        layers = [f"llm.model.layers.{i}" for i in range(rank["layers"])]
        for structure in (rank["structure"], rank["reference_structure"]):
            units = {row["unit"]: row for row in structure}
            assert set(units) == {"llm.model", "llm.model.embed_tokens", "llm.lm_head", *layers}
            assert {u for u, row in units.items() if row["root"]} == {"llm.model", "llm.lm_head"}
            assert {u for u, row in units.items() if row["reshard_after_forward"]} == set(layers)
            assert {u: row["compute_dtype"] for u, row in units.items() if row["compute_dtype"] != "bfloat16"} \
                == {"llm.lm_head": "float32"}


def test_torchrun_bf16_rl_step_has_zero_kl_at_step_1(easy_task, tmp_path):
    """rl.py end to end as an 8-GPU run takes it (FSDP2 mixed precision over gloo, Ulysses, the torch
    engine's own bf16 LLM on SP rank 0): the first update's KL to the reference is exactly 0."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "rl.py", "--init", str(easy_task["init"]), "--data", str(easy_task["data"]),
                           "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--group-size", "2",
                           "--max-new-tokens", "8", "--num-frames", "8", "--engine", "torch", "--sp-size", "2",
                           "--bf16", "--save-every", "0"],
                          cwd=ROOT, check=True, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "Traceback" not in done.stderr, done.stderr  # a run that ended well ends quietly
    row, = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["kl"] == 0.0


def test_one_process_bf16_rl_step_has_zero_kl_at_step_1(easy_task, tmp_path):
    """In one process the policy is fp32 under autocast; before, its reference was bf16 weights (KL != 0)."""
    import rl
    rl.main(["--init", str(easy_task["init"]), "--data", str(easy_task["data"]), "--out", str(tmp_path / "run"),
             "--steps", "1", "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "8", "--num-frames", "8",
             "--engine", "torch", "--bf16", "--save-every", "0"])
    row, = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["kl"] == 0.0


def test_scored_logprobs_under_bf16_autocast_equal_an_fp32_computation(tiny_model):
    """Before: the LM head ran under autocast and its logits were rounded to bf16 (0.05 nats at 25)."""
    tiny_model.llm.lm_head.weight.data *= 40  # logits of tens, as a trained 7B's are
    prompts, groups = packed_inputs(tiny_model.config.llm_hidden)
    batch = tiny_model.build_sequence_batch(prompts * 3, groups[0])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = tiny_model.token_logprobs(batch)                                             # [B, S]
        hidden = tiny_model.llm.get_decoder()(inputs_embeds=batch.inputs_embeds,
                                              position_ids=batch.position_ids).last_hidden_state
    logits = hidden.double() @ tiny_model.llm.lm_head.weight.double().T                   # [B, S, V]
    mask = batch.loss_mask
    expected = logits.log_softmax(-1).gather(2, batch.targets.clamp(min=0)[..., None]).squeeze(2)
    assert logits[mask].abs().max() > 20
    torch.testing.assert_close(got[mask].double(), expected[mask], atol=1e-5, rtol=0)


# ---- flash-attn: behind the shared prefix, and only a version whose causal mask is bottom-right ----

def test_shared_prefix_wraps_flash_attention_when_the_model_uses_it(tiny_model, monkeypatch):
    """Before: rl.py --sp-size 1 --bf16 on a GPU with flash-attn refused to start ("shared-prefix attention
    wraps sdpa; this model uses 'flash_attention_2'"). flash-attn is pretended here by sdpa under its name."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    seen = []

    def pretend_flash(module, query, key, value, attention_mask, **kwargs):
        seen.append(module.config._attn_implementation)  # flash-attn picks its kernel by this name
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", pretend_flash)
    prompts, groups = packed_inputs(tiny_model.config.llm_hidden)
    with torch.no_grad():
        plain = tiny_model.token_logprobs(tiny_model.build_sequence_batch(prompts * 3, groups[0]))
    tiny_model.llm.config._attn_implementation = "flash_attention_2"
    M.enable_shared_prefix(tiny_model)
    assert tiny_model.llm.config._attn_implementation == "shared_prefix_fa2"
    with torch.no_grad():
        sequences = tiny_model.token_logprobs(tiny_model.build_sequence_batch(prompts * 3, groups[0]))
        packed = tiny_model.token_logprobs(tiny_model.build_packed_batch(prompts, groups))
    assert seen and set(seen) == {"flash_attention_2"}     # the per-sequence pass ran the wrapped attention
    torch.testing.assert_close(sequences, plain, atol=1e-6, rtol=0)
    for i, response in enumerate(groups[0]):              # the packed pass: each response as its own sequence
        start = len(prompts[0]) - 1
        torch.testing.assert_close(packed[i, :len(response)], plain[i, start:start + len(response)],
                                   atol=1e-5, rtol=0)


def test_a_flash_attn_transformers_does_not_accept_is_not_used(monkeypatch):
    """flash-attn before 2.1 aligns the causal mask top-left for a query shorter than its keys: each
    response of a packed group would attend to the wrong keys. Only what transformers accepts is used."""
    fake = types.ModuleType("flash_attn")
    fake.flash_attn_func = lambda *args, **kwargs: None
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    import transformers.utils
    for accepted in (False, True):
        monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: accepted)
        M._flash_attn_func.cache_clear()
        assert (M._flash_attn_func() is fake.flash_attn_func) == accepted
    M._flash_attn_func.cache_clear()


# ---- the torch engine at 7B: bounded batches ----

def test_torch_engine_prefills_and_decodes_in_bounded_chunks(tiny_model):
    """Before: all prompts were prefilled as one batch (8 x 66k positions at 7B) and decoded together."""
    engine = rollout.TorchEngine(tiny_model, max_model_len=256)
    assert engine.chunks([10, 10, 10], n=2, max_new_tokens=5) == [range(0, 3)]
    engine.max_batch_tokens = 60                       # 2 x (10 + 5) = 30 positions per prompt
    assert engine.chunks([10, 10, 10], n=2, max_new_tokens=5) == [range(0, 2), range(2, 3)]
    assert engine.chunks([40, 10], n=2, max_new_tokens=5) == [range(0, 1), range(1, 2)]  # alone past the budget

    generator = torch.Generator().manual_seed(1)
    prompts = [M.Prompt(torch.randn(L, tiny_model.config.llm_hidden, generator=generator), torch.arange(L))
               for L in (9, 14, 6, 11)]
    kw = dict(n=1, max_new_tokens=6, temperature=0.0)   # greedy: the same tokens in any batching
    engine.max_batch_tokens = 10**9
    whole = engine.generate(prompts, **kw)
    rows = []
    hook = tiny_model.llm.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["inputs_embeds"].shape[:2]), with_kwargs=True)
    engine.max_batch_tokens = 2 * (14 + 6)              # room for two prompts' samples
    chunked = engine.generate(prompts, **kw)
    hook.remove()
    assert max(r for r, _ in rows) == 2                 # never more than two prompts' rows at once
    assert [r for r, L in rows if L > 1] == [2, 2]      # two prefills of two prompts each
    for a, b in zip(whole, chunked):
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)


# ---- SFT with a trainable vision tower over long videos ----

def test_trainable_vision_tower_keeps_only_its_pixels_for_backward(tiny_model):
    """Before: every frame's SigLIP activations were kept for backward (~1.3 GB a frame at 448 px)."""
    import sft
    assert sft.parse_args(["--init", "i", "--data", "d", "--out", "o"]).freeze_vision  # the default: frozen
    tiny_model.train()
    size = tiny_model.config.image_size

    def saved_bytes(num_frames: int) -> int:
        frames = torch.randint(0, 256, (num_frames, size, size, 3), dtype=torch.uint8)
        return saved_for_backward_bytes(tiny_model, lambda: tiny_model.encode_video(frames, chunk_size=8))

    pixels_per_frame = 3 * size * size * 4                       # the fp32 input each chunk keeps
    growth = (saved_bytes(64) - saved_bytes(16)) / 48            # bytes kept per extra frame
    assert growth <= 1.01 * pixels_per_frame, (growth, pixels_per_frame)


# ---- small checks ----

def test_bench_step_sp_size_divides_the_presets_heads_on_an_8_gpu_node():
    """Before: bench.py step took the GPU count (8), which the tiny preset's 4 heads refuse."""
    import bench
    assert [bench.default_step_sp_size(heads, 8) for heads in (4, 8, 28, 6)] == [4, 8, 7, 6]
    assert bench.default_step_sp_size(4, 2) == 2 and bench.default_step_sp_size(4, 1) == 1


def test_max_model_len_past_the_llms_positions_is_refused_at_start_up(tiny_checkpoint):
    """vLLM refuses a max_model_len above max_position_embeddings; rl.py says so before loading an engine."""
    import data
    import rl
    import video
    model = M.VideoLM.load(tiny_checkpoint)
    records = [data.Record("q1", "never-opened.mp4", "Which colour comes first?", [], "free_form", "", "red")]
    limit = model.llm.config.max_position_embeddings
    args = rl.parse_args(["--init", "i", "--data", "d.jsonl", "--out", "o", "--num-frames", "8",
                          "--max-model-len", str(limit + 1)])
    sampling = video.FrameSampling.from_args(args)  # a frame count: no file is opened to count positions
    with pytest.raises(ValueError, match=f"max_position_embeddings {limit}"):
        rl.engine_max_model_len(model, records, sampling, args)
    args.max_model_len = None
    assert rl.engine_max_model_len(model, records, sampling, args) <= limit
    args.max_new_tokens = limit  # the prompt alone leaves no room for this many
    with pytest.raises(ValueError, match=f"past the LLM's max_position_embeddings {limit}"):
        rl.engine_max_model_len(model, records, sampling, args)
