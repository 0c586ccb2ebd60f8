"""MR-SP against the single-process model: real process groups (gloo, 2 and 3 ranks) on a tiny VideoLM.

Each distributed job (`sp_job`) runs every check on one set of ranks, so processes start once per size.
"""
import json
import os

import numpy as np
import pytest
import torch

import data
import model as M
import mrsp
import synth
import train
from video import FrameSampling, load_frames
from dist import allreduce_gradients, run_ranks

# ---- the example every check uses ----


def example_frames(n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def example_batch(model: M.VideoLM) -> M.SequenceBatch:
    """Two sequences of different lengths (97 and 80 positions: neither sp=2 nor sp=3 divides 97) after a
    7-frame video prompt each."""
    with torch.no_grad():
        video_embeds = model.encode_video(example_frames(7))
    before = "Watch the video.\n"
    prompts = [model.prompt(before, video_embeds, "Question: How many scenes are red?"),
               model.prompt(before, video_embeds, "\nWhich colour comes first?")]
    responses = [model.encode_text("<think>Scene 1 is red. Scene 2 is blue.</think><answer>A</answer>"),
                 model.encode_text("<answer>B</answer>")]
    return model.build_sequence_batch(prompts, responses)


def example_loss(logprobs: torch.Tensor, batch: M.SequenceBatch) -> torch.Tensor:
    """A policy-gradient-shaped loss: per-sequence advantages times log-probs, token mean, each position
    weighted by its own random weight, so that the gradient differs at every position: a backward that
    hands a rank another rank's slice of it gives other gradients (a weight shared by a whole row would not)."""
    advantages = torch.tensor([1.0, -0.5])[:, None]                                 # [B, 1]
    weights = torch.rand(logprobs.shape, generator=torch.Generator().manual_seed(0))  # [B, S]
    return -(advantages * weights * logprobs).sum() / batch.loss_mask.sum()


def with_heads(model: M.VideoLM, num_heads: int, num_kv_heads: int) -> M.VideoLM:
    """The model itself if it has these head counts, else the same VideoLM with a fresh LLM that has
    them (head_dim 32, hidden size unchanged)."""
    from transformers import AutoModelForCausalLM
    config = model.llm.config.to_dict()
    if (config["num_attention_heads"], config["num_key_value_heads"]) == (num_heads, num_kv_heads):
        return model
    config.update(num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=32)
    torch.manual_seed(1)
    llm_config = type(model.llm.config).from_dict(config)
    llm = AutoModelForCausalLM.from_config(llm_config, attn_implementation="sdpa")
    return M.VideoLM(model.config, model.vision_tower, model.mm_projector, llm, model.tokenizer).eval()


# (query heads, KV heads) per SP size. SP_HEADS split without copies: the tiny preset itself for sp=2;
# sp=3 cannot split its 4 query heads, so a 6-head variant. GQA_HEADS must replicate KV heads: sp=2 > 1 KV
# head; sp=3 with 2 KV heads needs lcm(2, 3) = 6, and one rank's two query heads use different KV heads.
SP_HEADS = {2: (4, 2), 3: (6, 3)}
GQA_HEADS = {2: (4, 1), 3: (6, 2)}


def logprobs_and_grads(model: M.VideoLM, ps: mrsp.ParallelState | None):
    """Per-token log-probs and every LLM gradient of `example_loss`: plain model when ps is None,
    else MR-SP stage 2 (Ulysses, shard, gather, SP gradient sum)."""
    model.freeze_vision()
    model.zero_grad(set_to_none=True)
    batch = example_batch(model)
    if ps is None:
        logprobs = model.token_logprobs(batch)
    else:
        mrsp.enable_ulysses(model, ps.sp_group)
        logprobs = mrsp.sp_token_logprobs(model, batch, ps.sp_group)
    example_loss(logprobs, batch).backward()
    if ps is not None:
        allreduce_gradients(model, ps)
    grads = {name: p.grad.clone() for name, p in model.llm.named_parameters()}
    return logprobs.detach(), grads


def sp_job(checkpoint: str, cache_dir: str, clip: str) -> dict:
    """Runs on every rank: all SP checks over one group of WORLD_SIZE ranks."""
    sp_size = int(os.environ["WORLD_SIZE"])
    ps = mrsp.init_distributed(sp_size=sp_size)
    model = M.VideoLM.load(checkpoint, attn_implementation="sdpa").eval()
    model.freeze_vision()
    out = {"sp_rank": ps.sp_rank, "sp_size": ps.sp_size, "dp_size": ps.dp_size,
           "stage1_7": mrsp.stage1_encode(model, example_frames(7), ps.sp_group),
           "stage1_1": mrsp.stage1_encode(model, example_frames(1), ps.sp_group)}
    # the training path on a real mp4: each rank decodes only the frames it encodes
    prompts = train.VideoPrompts(model, FrameSampling(num_frames=7), ps,
                                 mrsp.VideoEmbeddingCache(model, None, sp_group=ps.sp_group))
    with torch.no_grad():
        out["clip_embeds"] = prompts.media_embeds(data.Record("clip", clip, "Q?", [], "free_form", "", "x"))
    out["clip_frames_read"] = prompts.reader.frames_read

    video = os.path.join(checkpoint, "config.json")  # any file stands in for a video
    runs = []
    for _ in range(2):  # a miss (SP rank 0 writes the file), then a fresh cache that finds it on disk
        cache = mrsp.VideoEmbeddingCache(model, cache_dir, sp_group=ps.sp_group)
        embeds = cache.get(video, f"n7-sp{sp_size}", frames_fn=lambda: example_frames(7),
                           encode_fn=lambda frames: mrsp.stage1_encode(model, frames, ps.sp_group))
        runs.append((embeds, cache.vision_runs))
        torch.distributed.barrier(ps.sp_group)
    out["cache_runs"] = runs
    try:
        mrsp.enable_ulysses(model, ps.sp_group)
        out["heads_error"] = None
    except ValueError as e:
        out["heads_error"] = str(e)
    out["logprobs"], out["grads"] = logprobs_and_grads(with_heads(model, *SP_HEADS[sp_size]), ps)
    out["gqa_logprobs"], out["gqa_grads"] = logprobs_and_grads(with_heads(model, *GQA_HEADS[sp_size]), ps)
    return out


def mesh_job() -> dict:
    """4 ranks as dp=2 x sp=2: which ranks share groups, and the SP-sum / DP-mean of gradients."""
    ps = mrsp.init_distributed(sp_size=2)
    layer = torch.nn.Linear(1, 1, bias=False)
    layer.weight.grad = torch.full_like(layer.weight, float(ps.rank + 1))
    allreduce_gradients(layer, ps)
    ranks = torch.distributed.get_process_group_ranks
    return {"dp": (ps.dp_rank, ps.dp_size), "sp": (ps.sp_rank, ps.sp_size),
            "sp_ranks": ranks(ps.sp_group), "dp_ranks": ranks(ps.dp_group), "grad": layer.weight.grad.item()}


# ---- distributed runs, once per size ----

@pytest.fixture(scope="module")
def sp_runs(tiny_checkpoint, clip, tmp_path_factory):
    runs = {}

    def run(sp_size: int) -> list[dict]:
        if sp_size not in runs:
            cache_dir = tmp_path_factory.mktemp("cache")
            runs[sp_size] = run_ranks(sp_job, sp_size, str(tiny_checkpoint), str(cache_dir), str(clip))
        return runs[sp_size]
    return run


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 7-frame mp4 of random frames: each frame encodes to different rows."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    synth.write_mp4(path, example_frames(7), fps=7.0)
    return path


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, clip):
    """sp=1: the plain model, no MR-SP code at all."""
    model = M.VideoLM.load(tiny_checkpoint, attn_implementation="sdpa").eval()
    frames, _ = load_frames(clip, model.config.image_size, FrameSampling(num_frames=7))
    ref = {"batch": example_batch(model),
           "stage1_7": model.encode_video(example_frames(7)).detach(),
           "stage1_1": model.encode_video(example_frames(1)).detach(),
           "clip": model.encode_video(frames).detach()}
    for sp_size in (2, 3):
        ref[f"sp{sp_size}"] = logprobs_and_grads(with_heads(model, *SP_HEADS[sp_size]), None)
        ref[f"gqa{sp_size}"] = logprobs_and_grads(with_heads(model, *GQA_HEADS[sp_size]), None)
    return ref


def assert_grads_close(grads: dict, expected: dict):
    assert grads.keys() == expected.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("sp_size", [2, 3])
def test_logprobs_and_gradients_match_one_process(sp_runs, reference, sp_size):
    batch = reference["batch"]
    assert batch.targets.shape[1] % sp_size, "the example must need padding"
    # rank 0's shard is all prompt: nothing to score, yet its backward must join the all-to-alls
    assert not mrsp.shard_sequence(batch, 0, sp_size).loss_mask.any()
    ranks = sp_runs(sp_size)
    assert [r["sp_rank"] for r in ranks] == list(range(sp_size))
    expected, expected_grads = reference[f"sp{sp_size}"]
    for r in ranks:  # every rank holds the full-length log-probs and, after the SP sum, the full gradient
        assert r["logprobs"].shape == expected.shape
        assert (r["logprobs"] - expected).abs().max() < 1e-5
        # gather_sequence's backward keeps the local slice: a reduce-scatter sum would give sp x these
        assert_grads_close(r["grads"], expected_grads)


def test_sp3_cannot_split_four_heads(sp_runs):
    assert all(r["heads_error"] == "sp_size 3 does not divide 4 query heads" for r in sp_runs(3))
    assert all(r["heads_error"] is None for r in sp_runs(2))


@pytest.mark.parametrize("sp_size", [2, 3])
def test_gqa_replicates_kv_heads_when_sp_exceeds_them(sp_runs, reference, sp_size):
    heads, kv_heads = GQA_HEADS[sp_size]
    assert mrsp.kv_head_repeats(heads, kv_heads, sp_size) > 1
    expected, expected_grads = reference[f"gqa{sp_size}"]
    for r in sp_runs(sp_size):
        assert (r["gqa_logprobs"] - expected).abs().max() < 1e-5
        assert_grads_close(r["gqa_grads"], expected_grads)


@pytest.mark.parametrize("sp_size", [2, 3])
def test_stage1_encode_matches_one_process(sp_runs, reference, sp_size):
    for r in sp_runs(sp_size):  # 7 frames: 4+3 or 3+2+2; 1 frame: the other ranks encode nothing
        torch.testing.assert_close(r["stage1_7"], reference["stage1_7"], rtol=0, atol=1e-5)
        torch.testing.assert_close(r["stage1_1"], reference["stage1_1"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("sp_size", [2, 3])
def test_each_rank_decodes_only_the_frames_it_encodes(sp_runs, reference, sp_size):
    """7 frames over sp ranks (VILA: one frame a step): the first 7 % sp ranks take 7 // sp + 1 frames, the
    others 7 // sp; the embeddings are those of the whole video decoded and encoded in one process."""
    expected = [7 // sp_size + (rank < 7 % sp_size) for rank in range(sp_size)]
    runs = sorted(sp_runs(sp_size), key=lambda r: r["sp_rank"])
    assert [r["clip_frames_read"] for r in runs] == expected
    for r in runs:
        torch.testing.assert_close(r["clip_embeds"], reference["clip"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("sp_size", [2, 3])
def test_cache_with_an_sp_group(sp_runs, reference, sp_size):
    for r in sp_runs(sp_size):  # ranks agree on the disk hit: no rank runs stage 1 alone
        (first, first_runs), (again, again_runs) = r["cache_runs"]
        assert (first_runs, again_runs) == (1, 0)
        torch.testing.assert_close(first, reference["stage1_7"], rtol=0, atol=1e-5)
        assert torch.equal(again, first)


def test_dp_by_sp_mesh_and_gradient_accounting():
    ranks = run_ranks(mesh_job, 4)
    assert [r["sp_ranks"] for r in ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]  # consecutive ranks
    assert [r["dp_ranks"] for r in ranks] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["sp"] for r in ranks] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    assert [r["dp"] for r in ranks] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    # grads 1, 2, 3, 4: SP sums 3 and 7, DP mean 5
    assert [r["grad"] for r in ranks] == [5.0] * 4


# ---- single process ----

def test_single_process_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ps = mrsp.init_distributed(sp_size=1)
    assert (ps.world_size, ps.sp_size, ps.dp_size, ps.sp_group) == (1, 1, 1, None)
    with pytest.raises(ValueError, match="world size 1 is not a multiple of sp_size 2"):
        mrsp.init_distributed(sp_size=2)


def test_stage1_encode_records_no_graph(tiny_model):
    """Stage 1 runs without autograd even where the tower could train: the embeddings are cached, and a
    graph kept with them would hold the tower's activations of every cached video."""
    assert all(p.requires_grad for p in tiny_model.vision_tower.parameters())
    assert not mrsp.stage1_encode(tiny_model, example_frames(3), None).requires_grad


def test_shard_sequence_pads_at_the_end_with_global_positions(tiny_model):
    batch = example_batch(tiny_model)
    B, S, _ = batch.inputs_embeds.shape
    shards = [mrsp.shard_sequence(batch, r, 4) for r in range(4)]
    n = -(-S // 4)
    assert all(s.inputs_embeds.shape == (B, n, batch.inputs_embeds.shape[2]) for s in shards)
    positions = torch.cat([s.position_ids for s in shards], dim=1)                   # [B, 4n]
    assert torch.equal(positions, torch.arange(4 * n).expand(B, -1))
    targets = torch.cat([s.targets for s in shards], dim=1)
    assert torch.equal(targets[:, :S], batch.targets) and (targets[:, S:] == M.IGNORE).all()
    assert (torch.cat([s.inputs_embeds for s in shards], dim=1)[:, S:] == 0).all()


def test_ulysses_on_one_rank_is_the_plain_model(tiny_model):
    batch = example_batch(tiny_model)
    expected = tiny_model.token_logprobs(batch)
    mrsp.enable_ulysses(tiny_model, None)
    assert tiny_model.llm.config._attn_implementation == "ulysses"
    torch.testing.assert_close(mrsp.sp_token_logprobs(tiny_model, batch, None), expected)


def test_head_split_rules():
    assert mrsp.kv_head_repeats(4, 2, 2) == 1
    assert mrsp.kv_head_repeats(4, 2, 4) == 2
    assert mrsp.kv_head_repeats(28, 4, 7) == 7   # Qwen2-7B's heads on 7 ranks
    with pytest.raises(ValueError, match="sp_size 3 does not divide 4 query heads"):
        mrsp.kv_head_repeats(4, 2, 3)
    assert [len(s) for s in mrsp.split_evenly(7, 3)] == [3, 2, 2] and mrsp.split_evenly(1, 2) == [range(0, 1), range(1, 1)]



def test_length_runs_are_the_fewest_padded_runs_any_split_allows():
    """mrsp.length_runs against every possible split (brute force) of random mixes of text (20-60
    positions), image (300-400) and video (2,000-9,000) rows, a run costing len x its longest: each index
    once, at most max_items a run, within max_tokens unless alone, and no split has fewer runs. Given
    `parts`, exactly that many."""
    import itertools
    import random
    rng = random.Random(0)
    cost = lambda costs, run: len(run) * max(costs[i] for i in run)
    for _ in range(300):
        n = rng.randint(1, 6)
        max_items = rng.randint(1, n)
        bound = rng.choice([0, rng.randint(100, 20000)])
        costs = [rng.choice([rng.randint(20, 60), rng.randint(300, 400), rng.randint(2000, 9000)]) for _ in range(n)]
        fits = lambda run: len(run) <= max_items and (not bound or len(run) == 1 or cost(costs, run) <= bound)
        fewest = next(k for k in range(1, n + 1) for assign in itertools.product(range(k), repeat=n)
                      if all(run and fits(run) for run in [[i for i in range(n) if assign[i] == r] for r in range(k)]))
        runs = mrsp.length_runs(costs, max_items, bound)
        assert sorted(i for run in runs for i in run) == list(range(n)) and all(run == sorted(run) for run in runs)
        assert all(fits(run) for run in runs) and len(runs) == fewest, (costs, max_items, bound, runs)
        parts = rng.randint(len(runs), n)
        assert len(mrsp.length_runs(costs, max_items, bound, parts)) == parts
    assert mrsp.length_runs([30, 900, 40, 950], 2) == [[1, 3], [0, 2]]


# ---- the video-embedding cache ----

@pytest.fixture
def video(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"not really a video; the cache only looks at its path, size and mtime")
    return path


@pytest.fixture
def frozen_model(tiny_model):
    tiny_model.freeze_vision()
    return tiny_model


def cached(cache, video, sampling="n7-max8192", frames=7):
    return cache.get(video, sampling, frames_fn=lambda: example_frames(frames),
                     encode_fn=lambda f: mrsp.stage1_encode(cache.model, f, None))


def test_cache_hit_skips_the_vision_tower(frozen_model, video, tmp_path):
    cache = mrsp.VideoEmbeddingCache(frozen_model, cache_dir=tmp_path / "cache")
    first = cached(cache, video)
    assert first.shape == (7 * frozen_model.config.tokens_per_frame, frozen_model.config.llm_hidden)
    assert torch.equal(cached(cache, video), first)
    assert (cache.vision_runs, cache.hits, cache.misses) == (1, 1, 1)

    from_disk = mrsp.VideoEmbeddingCache(frozen_model, cache_dir=tmp_path / "cache")  # a new run
    assert torch.equal(cached(from_disk, video), first)
    assert (from_disk.vision_runs, from_disk.hits) == (0, 1)


def test_cache_misses_when_the_video_or_sampling_changes(frozen_model, video):
    cache = mrsp.VideoEmbeddingCache(frozen_model)
    cached(cache, video)
    cached(cache, video, sampling="n4-max8192", frames=4)
    assert cache.vision_runs == 2
    st = video.stat()
    os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched
    cached(cache, video)
    assert cache.vision_runs == 3
    video.write_bytes(b"a different video")
    cached(cache, video)
    assert cache.vision_runs == 4 and cache.hits == 0


def entry_bytes(model, frames: int, dtype=torch.float32) -> int:
    return frames * model.config.tokens_per_frame * model.config.llm_hidden * dtype.itemsize


def test_cache_byte_bound_drops_least_recently_used(frozen_model, video):
    cache = mrsp.VideoEmbeddingCache(frozen_model, max_bytes=entry_bytes(frozen_model, 7 + 4))
    cached(cache, video)                                    # n7
    cached(cache, video, sampling="n4-max8192", frames=4)   # n4: both fit
    cached(cache, video)                                    # n7 again: n4 is now the least recently used
    cached(cache, video, sampling="n2-max8192", frames=2)   # n2 does not fit beside both: n4 goes
    assert cache.bytes == entry_bytes(frozen_model, 7 + 2)
    cached(cache, video)                                    # a hit
    cached(cache, video, sampling="n4-max8192", frames=4)   # encoded again; n2 makes room
    assert (cache.vision_runs, cache.hits) == (4, 2)
    assert [json.loads(k)[3] for k in cache.held] == ["n7-max8192", "n4-max8192"]
    assert cache.bytes == entry_bytes(frozen_model, 7 + 4) == sum(e.nbytes for e in cache.held.values())


def test_cache_stores_in_the_compute_dtype_in_host_memory(frozen_model, video, tmp_path):
    cache = mrsp.VideoEmbeddingCache(frozen_model, cache_dir=tmp_path / "cache", dtype=torch.bfloat16, storage="cpu")
    full = mrsp.stage1_encode(frozen_model, example_frames(7), None)
    embeds = cached(cache, video)
    assert embeds.dtype == torch.bfloat16 and torch.equal(embeds, full.to(torch.bfloat16))
    held, = cache.held.values()
    assert held.dtype == torch.bfloat16 and held.device.type == "cpu"
    assert cache.bytes == entry_bytes(frozen_model, 7, torch.bfloat16)
    from_disk = mrsp.VideoEmbeddingCache(frozen_model, cache_dir=tmp_path / "cache", dtype=torch.bfloat16)
    assert torch.equal(cached(from_disk, video), embeds) and from_disk.vision_runs == 0
    fp32 = mrsp.VideoEmbeddingCache(frozen_model, cache_dir=tmp_path / "cache")  # never served the bf16 file
    assert cached(fp32, video).dtype == torch.float32 and fp32.vision_runs == 1


def test_cache_metrics_report_bytes_entries_hits_misses(frozen_model, video):
    cache = mrsp.VideoEmbeddingCache(frozen_model)
    cached(cache, video)
    cached(cache, video)
    assert cache.metrics() == {"embed_cache_bytes": entry_bytes(frozen_model, 7), "embed_cache_entries": 1,
                               "embed_cache_hits": 1, "embed_cache_misses": 1}
    cache.clear()
    assert cache.metrics()["embed_cache_bytes"] == 0


def test_cache_key_uses_sampling_key_and_vision_weights(frozen_model, video):
    class Sampling:
        def key(self):
            return "n7-max8192"
    cache = mrsp.VideoEmbeddingCache(frozen_model)
    assert cache.key(video, Sampling()) == cache.key(video, "n7-max8192")
    cached(cache, video)
    with torch.no_grad():
        frozen_model.mm_projector.layers[-1].bias.add_(1.0)  # the projector changed (e.g. it trained)
    cache.clear()
    cached(cache, video)
    assert cache.vision_runs == 2


@pytest.mark.parametrize("part", ["vision_tower", "mm_projector"])
def test_a_disk_cache_written_under_other_vision_weights_is_not_read(frozen_model, video, tmp_path, part):
    """A run with another tower or projector (another checkpoint, or one SFT trained) over the same
    --embed-cache-dir: the earlier run's files are there, and must not be served."""
    old = cached(mrsp.VideoEmbeddingCache(frozen_model, cache_dir=tmp_path / "cache"), video)
    with torch.no_grad():
        next(getattr(frozen_model, part).parameters()).view(-1)[0] += 1.0   # one weight changed
        expected = mrsp.stage1_encode(frozen_model, example_frames(7), None)   # [7 * tpf, D]
    assert not torch.equal(expected, old)
    later_run = mrsp.VideoEmbeddingCache(frozen_model, cache_dir=tmp_path / "cache")
    assert torch.equal(cached(later_run, video), expected)
    assert (later_run.vision_runs, later_run.hits) == (1, 0)


def test_cache_rejects_corrupt_files(frozen_model, video, tmp_path):
    cache = mrsp.VideoEmbeddingCache(frozen_model, cache_dir=tmp_path / "cache")
    good = cached(cache, video)
    path = cache.path(cache.key(video, "n7-max8192"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    fresh = mrsp.VideoEmbeddingCache(frozen_model, cache_dir=tmp_path / "cache")
    with pytest.warns(UserWarning, match="unreadable"):
        assert torch.equal(cached(fresh, video), good)
    assert fresh.vision_runs == 1

    path.write_bytes(os.urandom(4096))  # garbage
    fresh = mrsp.VideoEmbeddingCache(frozen_model, cache_dir=tmp_path / "cache")
    with pytest.warns(UserWarning, match="unreadable"):
        assert torch.equal(cached(fresh, video), good)
    assert fresh.vision_runs == 1
    rewritten = mrsp.VideoEmbeddingCache(frozen_model, cache_dir=tmp_path / "cache")
    assert torch.equal(cached(rewritten, video), good) and rewritten.vision_runs == 0  # the recompute was saved


def test_cache_never_substitutes_another_keys_file(frozen_model, video, tmp_path):
    cache = mrsp.VideoEmbeddingCache(frozen_model, cache_dir=tmp_path / "cache")
    four = cached(cache, video, sampling="n4-max8192", frames=4)
    seven_path = cache.path(cache.key(video, "n7-max8192"))
    seven_path.write_bytes(cache.path(cache.key(video, "n4-max8192")).read_bytes())  # wrong file, valid shape
    fresh = mrsp.VideoEmbeddingCache(frozen_model, cache_dir=tmp_path / "cache")
    with pytest.warns(UserWarning, match="another video"):
        seven = cached(fresh, video)
    assert fresh.vision_runs == 1 and seven.shape[0] == 7 * frozen_model.config.tokens_per_frame
    assert not torch.equal(seven[: len(four)], four)
