"""What each rank holds at 7B scale, checked on a tiny model with real gloo ranks (tests/dist.py):
FSDP2 frees each decoder layer after its forward, gradient checkpointing really saves activations, the
reference model is a sharded LLM alone, checkpoints write the optimizer state in per-rank shards, and
the weight sync streams one tensor at a time."""
import torch
from torch.distributed.tensor import DTensor

import model as M
import mrsp
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
    prompts = [torch.randn(n, D, generator=generator) for n in (9, 6)]
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
