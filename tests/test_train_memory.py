"""What each rank holds at 7B scale, checked on a tiny model with real gloo ranks (tests/dist.py):
FSDP2 frees each decoder layer after its forward, gradient checkpointing really saves activations, the
reference model is a sharded LLM alone, checkpoints write the optimizer state in per-rank shards, and
the weight sync streams one tensor at a time."""
import torch
from torch.distributed.tensor import DTensor

import model as M
import mrsp
import runs
import train
from dist import run_ranks


def gathered(module: torch.nn.Module) -> list[str]:
    """Names of the parameters held whole on this rank (not as an FSDP shard)."""
    return [name for name, p in module.named_parameters() if not isinstance(p, DTensor)]


def layer_names(model: M.VideoLM) -> set[str]:
    return {f"model.layers.{name}" for name, _ in model.llm.get_decoder().layers.named_parameters()}


def scored_batch(model: M.VideoLM, seed: int = 0) -> M.SequenceBatch:
    """Two short sequences (random prompt embeddings, a few response tokens each)."""
    generator = torch.Generator().manual_seed(seed)
    D = model.llm.config.hidden_size
    prompts = [M.Prompt(torch.randn(n, D, generator=generator), torch.arange(n)) for n in (9, 6)]
    responses = [torch.randint(3, 300, (n,), generator=generator).tolist() for n in (4, 7)]
    return model.build_sequence_batch(prompts, responses)


# ---- FSDP2: decoder layers reshard after forward ----

def where_the_weights_are_job(checkpoint: str) -> dict:
    ps = mrsp.init_distributed(sp_size=1)
    model = M.VideoLM.load(checkpoint).train()
    train.shard_model(model, ps)
    llm, layers = model.llm, layer_names(model)
    found = {"before": gathered(llm)}
    logprobs = train.sequence_logprobs(model, scored_batch(model), ps)
    found["after forward"] = gathered(llm)
    logprobs.sum().backward()
    found["after backward"] = gathered(llm)
    with torch.no_grad():
        train.sequence_logprobs(model, scored_batch(model, seed=1), ps)
    found["after a no-grad pass"] = gathered(llm)
    train.reshard(model)
    found["after reshard"] = gathered(llm)
    found["layers"] = sorted(layers)
    return found


def test_decoder_layers_are_sharded_after_forward_and_backward(tiny_checkpoint):
    """Before: each unit was an FSDP root, and roots keep their weights after forward, so between
    forward and backward (and after every no-grad pass) each rank held the whole LLM."""
    for found in run_ranks(where_the_weights_are_job, 2, str(tiny_checkpoint), timeout=120):
        layers = set(found["layers"])
        assert found["before"] == []
        assert not layers & set(found["after forward"]), found["after forward"]
        assert found["after backward"] == []
        assert not layers & set(found["after a no-grad pass"])
        # the embedding and LM head stay gathered through a pass that has no backward, until reshard()
        assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(found["after a no-grad pass"])
        assert found["after reshard"] == []


# ---- rl.py --grad-checkpointing ----

def saved_for_backward_bytes(model: torch.nn.Module, forward) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while `forward()` runs (the model's
    parameters not counted). Also used by test_precision.py."""
    params = {p.data_ptr() for p in model.parameters()}
    seen = {}
    def pack(t):
        if t.data_ptr() not in params:
            seen[(t.data_ptr(), t.shape)] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def test_rl_grad_checkpointing_keeps_a_fraction_of_the_activations(tiny_checkpoint):
    """Before: rl.py loaded the policy in eval mode, where Hugging Face never checkpoints, so the flag did nothing."""
    import rl
    ps = mrsp.ParallelState()
    D = M.VideoLM.load(tiny_checkpoint).llm.config.hidden_size
    prompts = [M.Prompt(torch.randn(300, D, generator=torch.Generator().manual_seed(0)), torch.arange(300))]  # long: activations dominate
    saved = {}
    for flag in (False, True):
        policy = rl.load_policy(tiny_checkpoint, ps, grad_checkpointing=flag)
        batch = policy.build_sequence_batch(prompts, [[5, 6, 7]])
        saved[flag] = saved_for_backward_bytes(policy, lambda: policy.token_logprobs(batch))
    assert saved[True] < saved[False] / 4, saved


# ---- the reference model ----

def reference_job(checkpoint: str, sp_size: int, bf16: bool) -> dict:
    import rl
    ps = mrsp.init_distributed(sp_size=sp_size)
    policy = rl.load_policy(checkpoint, ps)
    reference = rl.load_reference(checkpoint, policy, ps, bf16)
    policy_params = {id(p) for p in policy.parameters()}
    own = [name for name, p in reference.named_parameters() if id(p) not in policy_params]
    with torch.no_grad(), train.autocast(ps, bf16):
        logprobs = train.sequence_logprobs(reference, scored_batch(reference), ps)
    train.reshard(reference)
    return {"shares_vision": reference.vision_tower is policy.vision_tower
                             and reference.mm_projector is policy.mm_projector,
            "own": own, "llm": [f"llm.{name}" for name, _ in reference.llm.named_parameters()],
            "gathered": gathered(reference.llm),
            "dtypes": {name: p.dtype for name, p in reference.llm.named_parameters() if p.dtype != torch.bfloat16},
            "requires_grad": any(p.requires_grad for p in reference.parameters()),
            "logprobs": logprobs, "mask": scored_batch(reference).loss_mask}


def test_reference_is_the_initial_llm_alone_sharded_in_the_compute_dtype(tiny_checkpoint):
    """Before: the reference was a second whole VideoLM (vision tower included) in fp32, unsharded on
    every rank. Its log-probs are those of the old, whole reference."""
    old = M.VideoLM.load(tiny_checkpoint).eval()
    with torch.no_grad():
        expected = old.token_logprobs(scored_batch(old))
    one = reference_job(str(tiny_checkpoint), 1, False)
    assert one["shares_vision"] and one["own"] == one["llm"] and not one["requires_grad"]
    assert torch.equal(one["logprobs"], expected)
    for rank in run_ranks(reference_job, 2, str(tiny_checkpoint), 2, True, timeout=120):
        assert rank["shares_vision"] and rank["own"] == rank["llm"] and not rank["requires_grad"]
        assert rank["gathered"] == [] and rank["dtypes"] == {"lm_head.weight": torch.float32}  # the rest bf16
        mask = rank["mask"]
        torch.testing.assert_close(rank["logprobs"][mask], expected[mask], atol=0.1, rtol=0)  # bf16, sp=2


# ---- checkpoints: the optimizer state in per-rank shards ----

def checkpoint_job(checkpoint: str, out: str) -> dict:
    """Train 3 steps, checkpointing after the first; then resume from it and train steps 2 and 3 again."""
    from pathlib import Path
    ps = mrsp.init_distributed(sp_size=1)

    def start(path):
        model = M.VideoLM.load(path).train()
        model.freeze_vision()
        train.shard_model(model, ps)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(model, optimizer, seed):
        loss = -train.sequence_logprobs(model, scored_batch(model, seed), ps).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    model, optimizer = start(checkpoint)
    step(model, optimizer, seed=0)
    train.save_checkpoint(out, 1, model, optimizer, ps)
    whole = [step(model, optimizer, seed) for seed in (1, 2)]
    model, optimizer = start(Path(out) / "checkpoint-1")
    assert train.load_trainer_state(Path(out) / "checkpoint-1", model, optimizer, ps)["step"] == 1
    resumed = [step(model, optimizer, seed) for seed in (1, 2)]
    shard = Path(out) / "checkpoint-1" / "optimizer" / f"rank-{ps.rank}.safetensors"
    return {"whole": whole, "resumed": resumed, "shard_bytes": shard.stat().st_size,
            "adamw_bytes": sum(2 * 4 * p.numel() for p in model.llm.parameters()),  # exp_avg, exp_avg_sq in fp32
            "files": sorted(f.name for f in (Path(out) / "checkpoint-1").iterdir())}


def test_checkpoint_optimizer_state_is_written_in_per_rank_shards_and_resumes(tiny_checkpoint, tmp_path):
    """Before: rank 0 gathered the whole AdamW state into trainer_state.pt, and every rank read all of it back."""
    ranks = run_ranks(checkpoint_job, 2, str(tiny_checkpoint), str(tmp_path), timeout=180)
    for rank in ranks:
        assert 0.45 < rank["shard_bytes"] / rank["adamw_bytes"] < 0.55, rank
        assert rank["resumed"] == rank["whole"]
    assert ranks[0]["files"] == ["config.json", "llm", "mm_projector", "optimizer", "trainer_state.json", "vision_tower"]
    assert runs.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert (tmp_path / "checkpoint-1" / "trainer_state.json").stat().st_size < 0.01 * ranks[0]["adamw_bytes"]


# ---- weight sync: streamed, one full tensor at a time, in the engine's dtype ----

def sync_job(checkpoint: str) -> dict:
    """SP rank 0 owns a torch engine with an LLM of its own in bf16 (as rl.py builds it under FSDP); the
    policy takes one update, then rl.sync_engine streams its weights into the engine."""
    import weakref
    import rl
    import rollout
    ps = mrsp.init_distributed(sp_size=2)
    policy = rl.load_policy(checkpoint, ps)
    engine = None
    if ps.sp_rank == 0:
        engine = rollout.TorchEngine(rl.with_own_llm(policy, checkpoint, torch.bfloat16, ps.device))
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    (-train.sequence_logprobs(policy, scored_batch(policy), ps).sum()).backward()
    optimizer.step()

    report = {"alive": [], "dtypes": set()}
    if engine is not None:
        def watched(named_tensors):
            report["kind"] = type(named_tensors).__name__
            earlier = []
            for item in named_tensors:
                report["alive"].append(sum(ref() is not None for ref in earlier))  # still held as this one arrives
                report["dtypes"].add(item[1].dtype)
                earlier.append(weakref.ref(item[1]))
                yield item
                del item
        sync = engine.sync_weights
        engine.sync_weights = lambda named_tensors: sync(watched(named_tensors))
    rl.sync_engine(engine, policy, ps)
    trainer = {name: t.clone() for name, t in train.llm_weights(policy, torch.bfloat16)}
    if engine is not None:
        report["equal"] = all(torch.equal(t, trainer[name]) for name, t in engine.model.llm.state_dict().items())
    return report


def test_weight_sync_streams_one_full_tensor_at_a_time_in_the_engine_dtype(tiny_checkpoint):
    """Before: every rank gathered the whole fp32 LLM into a list (in host memory) before handing it over."""
    engine_rank, other = run_ranks(sync_job, 2, str(tiny_checkpoint), timeout=120)
    assert engine_rank["kind"] == "generator" and engine_rank["dtypes"] == {torch.bfloat16}
    assert len(engine_rank["alive"]) > 10 and max(engine_rank["alive"]) == 0  # each freed before the next
    assert engine_rank["equal"]
    assert other["alive"] == []
