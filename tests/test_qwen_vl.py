"""The Qwen2.5-VL family against transformers' own Qwen2_5_VLForConditionalGeneration: a checkpoint written
by transformers in the Hub layout loads; video embeddings, M-RoPE positions (written out by hand here),
log-probs and gradients through our cached-embeddings path equal the library's own forward, per sequence,
packed and sequence-parallel; save -> load -> transformers round trip; the torch engine and the vLLM
request; bad checkpoints."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import model as M
import mrsp
import qwen_vl
import rollout
import synth
from conftest import CORPUS
from dist import allreduce_gradients, run_ranks

MEAN = [0.48145466, 0.4578275, 0.40821073]  # Qwen2.5-VL's preprocessor_config.json
STD = [0.26862954, 0.26130258, 0.27577711]
FRAME = 112  # 8 x 8 patches of 14 px, 4 x 4 merged tokens per frame pair, two 56-px windows per side


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    """A Qwen2.5-VL written by transformers itself (save_pretrained: Hub names visual.*, model.*, lm_head.*),
    with a tokenizer trained here and this project's frame_size in config.json."""
    tokenizer = M.train_tokenizer(CORPUS, vocab_size=400, family="qwen2_5_vl")
    ids = {f"{k}_token_id": tokenizer.convert_tokens_to_ids(t) for k, t in
           (("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("vision_start", "<|vision_start|>"),
            ("vision_end", "<|vision_end|>"))}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                           fullatt_block_indexes=[1], window_size=56, tokens_per_second=2),
        tie_word_embeddings=False, **ids)
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(config)
    folder = tmp_path_factory.mktemp("qwen") / "hub"
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "frame_size": FRAME}, indent=2))
    return folder


@pytest.fixture(scope="module")
def hf_model(hub_folder):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(hub_folder, attn_implementation="sdpa").eval()


@pytest.fixture
def ours(hub_folder):
    return M.VideoLM.load(hub_folder, attn_implementation="sdpa").eval()


def frames(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, FRAME, FRAME, 3), dtype=np.uint8)


def pixel_values_videos(video: np.ndarray) -> torch.Tensor:
    """Qwen2-VL's video processor, written out: pad to whole pairs with the last frame, x / 255, normalise,
    then patches ordered (pair, block row, block column, row in block, column in block), each patch's
    values (channel, frame of the pair, y, x)."""
    x = torch.as_tensor(video).float()
    if len(x) % 2:
        x = torch.cat([x, x[-1:]])
    x = ((x / 255 - torch.tensor(MEAN)) / torch.tensor(STD)).permute(0, 3, 1, 2)          # [T, 3, H, W]
    T, C, H, W = x.shape
    gt, gh, gw = T // 2, H // 14, W // 14
    p = x.reshape(1, gt, 2, C, gh // 2, 2, 14, gw // 2, 2, 14).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return p.reshape(gt * gh * gw, C * 2 * 14 * 14), torch.tensor([[gt, gh, gw]])


def hand_positions(text_before: int, pairs: int, grid: int, text_after: int, t_step: float) -> torch.Tensor:
    """M-RoPE positions by the rule: text on all three axes alike; video token (t, h, w) at
    (Lb + floor(t * t_step), Lb + h, Lb + w); the text after at 1 + the largest video position."""
    rows = [[i, i, i] for i in range(text_before)]
    for t in range(pairs):
        for h in range(grid):
            for w in range(grid):
                rows.append([text_before + int(t * t_step), text_before + h, text_before + w])
    start = max(max(r) for r in rows) + 1
    rows += [[start + i] * 3 for i in range(text_after)]
    return torch.tensor(rows).T                                                           # [3, L]


def test_mrope_positions_of_a_small_case_written_by_hand():
    # 2 text tokens, 2 pairs of 2 x 2 tokens, 1 text token; 1.5 s per pair x 2 tokens per second = 3
    got = qwen_vl.mrope_positions(2, 2, 2, 1, seconds=1.5, tokens_per_second=2)
    assert got.tolist() == [[0, 1, 2, 2, 2, 2, 5, 5, 5, 5, 6],
                            [0, 1, 2, 2, 3, 3, 2, 2, 3, 3, 6],
                            [0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 6]]
    # time steps that are not whole: floor(t * 0.7) = 0, 0, 1, 2; the text after starts past the rows
    # (h, w reach Lb + 1), not past the time axis
    assert qwen_vl.mrope_positions(0, 4, 2, 1, seconds=0.35, tokens_per_second=2)[0].tolist() == \
        [0] * 8 + [1] * 4 + [2] * 4 + [3]
    assert qwen_vl.seconds_per_pair([0.5, 1.5, 2.5, 3.5], 2) == 2.0


def test_hub_folder_loads_and_encodes_frames_as_transformers_does(ours, hf_model):
    assert ours.family.name == "qwen2_5_vl" and ours.config.tokens_per_step == 16
    assert isinstance(ours.mm_projector, torch.nn.Identity) and ours.llm.model.visual is None
    video = frames(5)                                                   # odd: the last pair repeats frame 5
    pixels, grid = pixel_values_videos(video)
    with torch.no_grad():
        expected = torch.cat(hf_model.model.get_video_features(pixels, grid).pooler_output)   # [3 * 16, D]
        got = ours.encode_video(video, chunk_size=2)                    # pair by pair
    assert got.shape == (3 * 16, 128)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def sequence_inputs(model, video, response, seconds_per_frame=0.5):
    """(our Prompt, transformers' input ids for prompt + response, hand positions [3, 1, L + R])."""
    timestamps = np.arange(len(video)) * seconds_per_frame
    with torch.no_grad():
        video_embeds = model.encode_video(video)
    prompt = model.prompt("", video_embeds, "Question: How many scenes are red?", timestamps)  # text with grad
    ids = rollout.video_requests([prompt])[0]["prompt_token_ids"] + response
    before, after = model.family.chat_text(model.tokenizer, "", "Question: How many scenes are red?")
    Lb, La = len(model.encode_text(before)), len(model.encode_text(after))
    pairs = -(-len(video) // 2)
    t_step = float(np.float32(2 * seconds_per_frame)) * 2                 # tokens_per_second 2
    positions = hand_positions(Lb, pairs, 4, La + len(response), t_step)[:, None]   # [3, 1, L + R]
    return prompt, torch.tensor([ids]), positions


def hf_logprobs(hf_model, video, ids, positions, response_len):
    pixels, grid = pixel_values_videos(video)
    logits = hf_model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid,
                      position_ids=positions).logits.float()                              # [1, L + R, V]
    L = ids.shape[1] - response_len
    targets = ids[0, L:]
    return torch.log_softmax(logits[0, L - 1:-1], -1).gather(1, targets[:, None]).squeeze(1)   # [R]


def test_positions_and_logprobs_equal_transformers_forward(ours, hf_model):
    video, response = frames(7), [7, 8, 9, 10]
    prompt, ids, positions = sequence_inputs(ours, video, response)
    assert torch.equal(prompt.positions, positions[:, 0, :len(prompt)])
    with torch.no_grad():
        expected = hf_logprobs(hf_model, video, ids, positions, len(response))
        batch = ours.build_sequence_batch([prompt], [response])
        assert torch.equal(batch.position_ids, positions)                # responses continue on all axes
        got = ours.token_logprobs(batch)[0, len(prompt) - 1:len(prompt) - 1 + len(response)]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_packed_groups_equal_transformers_per_response_with_gradients(ours, hf_model, hub_folder):
    """Shared-prefix rows [prompt][r1][r2] give each response the log-probs and gradients of its own
    [prompt; r] sequence through transformers; the responses continue from the prompt's next position."""
    video, group = frames(4, seed=1), [[7, 8, 9], [11, 12]]
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hub_folder, attn_implementation="sdpa").eval()
    expected, loss = [], 0
    for r in group:
        _, ids, positions = sequence_inputs(ours, video, r)
        lp = hf_logprobs(hf, video, ids, positions, len(r))
        expected.append(lp.detach())
        loss = loss + (lp * torch.arange(1.0, len(r) + 1)).sum()      # a weight per position
    loss.backward()
    M.enable_shared_prefix(ours)
    ours.freeze_vision()
    prompt, _, _ = sequence_inputs(ours, video, group[0])
    batch = ours.build_packed_batch([prompt], [group])
    N = prompt.next_position
    assert batch.position_ids[0, 0, len(prompt):].tolist() == [N, N + 1, N + 2, N, N + 1]
    got = ours.token_logprobs(batch)                                                    # [2, 3]
    for i, r in enumerate(group):
        torch.testing.assert_close(got[i, :len(r)], expected[i], rtol=1e-5, atol=1e-5)
    (got * torch.arange(1.0, 4)).mul(batch.response_mask).sum().backward()
    for name in ("model.language_model.layers.0.self_attn.q_proj.weight", "lm_head.weight",
                 "model.language_model.embed_tokens.weight"):
        torch.testing.assert_close(dict(ours.llm.named_parameters())[name].grad,
                                   dict(hf.named_parameters())[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_forward_without_three_axis_positions_is_refused(ours):
    with torch.no_grad():
        prompt, _, _ = sequence_inputs(ours, frames(2), [5])
    batch = ours.build_sequence_batch([prompt], [[5, 6]])
    batch.position_ids = batch.position_ids[0]                         # one axis: Qwen would expand it silently
    with pytest.raises(ValueError, match="takes positions of 3 dims"):
        ours.token_logprobs(batch)


def sp_job(folder: str) -> dict:
    ps = mrsp.init_distributed(sp_size=int(os.environ["WORLD_SIZE"]))
    model = M.VideoLM.load(folder, attn_implementation="sdpa").eval()
    model.freeze_vision()
    out = {"stage1": mrsp.stage1_encode(model, frames(7), ps.sp_group),   # 4 pairs, the last one half
           "stage1_1": mrsp.stage1_encode(model, frames(1), ps.sp_group)}  # 1 half pair: rank 1 has none
    video = model.encode_video(frames(5, seed=2))
    prompt = lambda: model.prompt("", video, "Question: How many scenes are red?", np.arange(5) * 0.5)
    mrsp.enable_ulysses(model, ps.sp_group)
    for name, build in (("sequence", lambda: model.build_sequence_batch([prompt(), prompt()], [[7, 8, 9], [11]],
                                                                        ps.sp_rank, ps.sp_size)),   # as rl.py builds
                        ("packed", lambda: model.build_packed_batch([prompt()], [[[7, 8, 9], [11]]],
                                                                    ps.sp_rank, ps.sp_size))):
        model.zero_grad(set_to_none=True)
        logprobs = mrsp.sp_token_logprobs(model, build(), ps.sp_group)
        weights = torch.rand(logprobs.shape, generator=torch.Generator().manual_seed(0))  # per position
        (weights * logprobs).sum().backward()
        allreduce_gradients(model, ps)
        out[name] = (logprobs.detach(), {n: p.grad.clone() for n, p in model.llm.named_parameters()})
    return out


def test_sequence_parallel_equals_one_process(hub_folder):
    """sp = 2 over gloo: stage 1 split on pair boundaries = the whole video; Ulysses with the M-RoPE
    positions sliced along the sequence = one process, log-probs and gradients, both layouts."""
    ranks = run_ranks(sp_job, 2, str(hub_folder), timeout=300)
    model = M.VideoLM.load(hub_folder, attn_implementation="sdpa").eval()
    model.freeze_vision()
    with torch.no_grad():
        for rank in ranks:
            torch.testing.assert_close(rank["stage1"], model.encode_video(frames(7)), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(rank["stage1_1"], model.encode_video(frames(1)), rtol=1e-5, atol=1e-5)
        video = model.encode_video(frames(5, seed=2))
    prompt = lambda: model.prompt("", video, "Question: How many scenes are red?", np.arange(5) * 0.5)
    M.enable_shared_prefix(model)
    for name, build in (("sequence", lambda: model.build_sequence_batch([prompt(), prompt()], [[7, 8, 9], [11]])),
                        ("packed", lambda: model.build_packed_batch([prompt()], [[[7, 8, 9], [11]]]))):
        model.zero_grad(set_to_none=True)
        logprobs = model.token_logprobs(build())
        weights = torch.rand(logprobs.shape, generator=torch.Generator().manual_seed(0))
        (weights * logprobs).sum().backward()
        for rank in ranks:
            got, grads = rank[name]
            torch.testing.assert_close(got, logprobs.detach(), rtol=1e-5, atol=1e-5)
            for n, p in model.llm.named_parameters():
                torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=f"{name} {n}")


def test_torch_engine_decodes_with_the_positions_the_trainer_scores(ours):
    """Prefill + KV-cache decode with M-RoPE positions: the engine's log-prob of every sampled token is the
    trainer's (left padding of a shorter prompt included)."""
    with torch.no_grad():
        prompts = [sequence_inputs(ours, frames(n, seed=n), [5])[0] for n in (3, 6)]
    engine = rollout.TorchEngine(ours, max_model_len=512)
    groups = engine.generate(prompts, n=2, max_new_tokens=6, temperature=1.0, seed=0)
    episodes = [(p, s) for p, g in zip(prompts, groups) for s in g]
    with torch.no_grad():
        batch = ours.build_sequence_batch([p for p, _ in episodes], [s.token_ids for _, s in episodes])
        scored = ours.token_logprobs(batch)
    for row, (_, sample) in enumerate(episodes):
        torch.testing.assert_close(scored[row][batch.loss_mask[row]], torch.tensor(sample.logprobs),
                                   rtol=1e-4, atol=1e-5)


def test_the_vllm_request_gives_vllm_the_same_positions(ours):
    """vLLM cannot take Qwen prompts as embeddings (it would give them one-axis positions): the request is
    token ids with one <|video_pad|> per row and the video embeddings, grid (in patches) and seconds per
    pair. The positions vLLM derives from that request by its rule equal the prompt's."""
    video = frames(6)
    with torch.no_grad():
        prompt = ours.prompt("", ours.encode_video(video), "Question?", np.arange(6) * 0.4)
    request, = rollout.video_requests([prompt])
    ids, mm = request["prompt_token_ids"], request["multi_modal_data"]["video"]
    pad = ours.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    offset = ids.index(pad)
    (t, h, w), = mm["video_grid_thw"].tolist()  # (videos, 3), as vLLM's Qwen2-VL video inputs declare it
    assert (t, h, w) == (3, 8, 8) and ids.count(pad) == t * (h // 2) * (w // 2) == len(mm["video_embeds"])
    torch.testing.assert_close(mm["video_embeds"], prompt.embeds[offset:offset + 48])
    assert mm["second_per_grid_ts"].dtype == torch.float32 and mm["second_per_grid_ts"].item() == pytest.approx(0.8)
    # vLLM's rule, from the request alone: t_factor = seconds (float32) x tokens_per_second
    t_factor = mm["second_per_grid_ts"].item() * 2
    expected = hand_positions(offset, t, h // 2, len(ids) - offset - 48, t_factor)
    assert torch.equal(prompt.positions, expected)
    assert len(ids) == len(prompt)


def test_save_load_round_trip_and_transformers_reads_what_we_write(ours, hub_folder, tmp_path):
    ours.save(tmp_path / "out")
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(written) == set(load_file(str(hub_folder / "model.safetensors")))         # the Hub's names
    assert json.loads((tmp_path / "out" / "config.json").read_text())["frame_size"] == FRAME
    again = M.VideoLM.load(tmp_path / "out").eval()
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    video, response = frames(3), [7, 8]
    prompt, ids, positions = sequence_inputs(again, video, response)
    with torch.no_grad():
        got = again.token_logprobs(again.build_sequence_batch([prompt], [response]))
        torch.testing.assert_close(got[0, len(prompt) - 1:len(prompt) + 1],
                                   hf_logprobs(hf, video, ids, positions, len(response)), rtol=1e-5, atol=1e-5)
        for name, tensor in ours.llm.state_dict().items():
            assert torch.equal(again.llm.state_dict()[name], tensor), name


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        target = cfg
        *path, last = key.split("__")
        for part in path:
            target = target[part]
        if value is None:
            target.pop(last)
        else:
            target[last] = value
    (folder / "config.json").write_text(json.dumps(cfg))


def shrink_a_weight(folder):
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"][:100]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


BAD = {
    "no vision_config": (lambda f: edit_config(f, vision_config=None),
                         r"config.json: no vision_config"),
    "mrope_section": (lambda f: edit_config(f, text_config__rope_parameters__mrope_section=[4, 6, 4]),
                      r"config.json: rope mrope_section \[4, 6, 4\] must be three sizes adding up to head_dim / 2 = 16"),
    "model_type": (lambda f: edit_config(f, model_type="qwen3_vl", architectures=["Qwen3VLForConditionalGeneration"]),
                   r"config.json: model_type 'qwen3_vl'.* is not a family this project reads"),
    "shape": (shrink_a_weight, r"model.layers.0.mlp.up_proj.weight in .* has shape \[100, 128\], config.json makes "
                               r"it \[256, 128\]|mlp.up_proj.weight.*shape"),
    "frame_size": (lambda f: edit_config(f, frame_size=100), r"config.json: frame_size 100 is not a positive multiple"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoints_are_clear_errors(hub_folder, tmp_path, case):
    folder = tmp_path / "bad"
    shutil.copytree(hub_folder, folder)
    damage, message = BAD[case]
    damage(folder)
    with pytest.raises(M.CheckpointError, match=message):
        M.VideoLM.load(folder)


def test_the_embedding_cache_holds_qwen_entries(ours, hub_folder):
    ours.freeze_vision()
    cache = mrsp.VideoEmbeddingCache(ours)
    video, path = frames(3), str(hub_folder / "config.json")  # any file stands in for the video
    get = lambda: cache.get(path, "n3", frames_fn=lambda: video, encode_fn=lambda f: mrsp.stage1_encode(ours, f, None))
    first, again = get(), get()
    assert first.shape == (2 * 16, 128) and cache.vision_runs == 1 and torch.equal(first, again)


def test_sft_rl_eval_on_the_tiny_preset(tmp_path):
    """The main job's stages on a tiny Qwen2.5-VL made by `model.py init --family qwen2_5_vl` (in this
    process: each script's main, as its command line runs it)."""
    import eval as evaluation
    import rl
    import sft
    data_dir = tmp_path / "data"
    synth.main(["--out", str(data_dir), "--n", "6", "--seed", "1", "--max-scenes", "3", "--test-frac", "0.34"])
    M.main(["init", "--family", "qwen2_5_vl", "--out", str(tmp_path / "init"), "--data", str(data_dir / "train.jsonl")])
    init = M.VideoLM.load(tmp_path / "init")
    assert init.family.name == "qwen2_5_vl" and init.config.image_size == 56
    sft.main(["--init", str(tmp_path / "init"), "--data", str(data_dir / "train.jsonl"), "--out", str(tmp_path / "sft"),
              "--steps", "3", "--batch-size", "2", "--num-frames", "4", "--save-every", "0"])
    rl.main(["--init", str(tmp_path / "sft" / "final"), "--data", str(data_dir / "train.jsonl"), "--out",
             str(tmp_path / "rl"), "--steps", "2", "--batch-size", "2", "--group-size", "2", "--num-frames", "4",
             "--max-new-tokens", "8", "--engine", "torch", "--save-every", "0", "--kl-coef", "0.01"])
    rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["kl"] == 0.0   # the reference computes as the policy
    evaluation.main(["--checkpoint", str(tmp_path / "rl" / "final"), "--data", str(data_dir / "test.jsonl"),
                     "--out", str(tmp_path / "eval"), "--num-frames", "4", "--engine", "torch", "--max-new-tokens", "8"])
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["n"] == len((data_dir / "test.jsonl").read_text().splitlines()) and report["n_answered"] == report["n"]


def vllm_runs_qwen() -> bool:
    try:
        rollout.check_vllm_video_support()
        rollout.import_vllm()
        return True
    except ImportError:
        return False


@pytest.mark.skipif(vllm_runs_qwen(), reason="this machine can run vLLM's Qwen2.5-VL: the refusal does not apply")
def test_the_vllm_engine_refuses_qwen_without_torchvision(hub_folder, ours):
    with pytest.raises(ImportError, match="needs torchvision.*--engine torch"):
        rollout.make_engine("vllm", ours, ours.family.llm_folder(hub_folder))


@pytest.mark.skipif(not vllm_runs_qwen(), reason="vLLM's Qwen2.5-VL needs torchvision (a GPU machine): "
                                                  "see BENCHMARKS.md, GPU checks")
def test_vllm_engine_logprobs_equal_the_trainers_before_and_after_a_sync(hub_folder, ours):
    """The GPU check: vLLM fed token ids + cached video embeddings samples tokens whose log-probs the trainer
    (M-RoPE positions computed here) reproduces; after a weight sync (encoder cache reset) too."""
    engine = rollout.make_engine("vllm", ours, ours.family.llm_folder(hub_folder), max_model_len=1024, seed=0)
    with torch.no_grad():
        prompts = [sequence_inputs(ours, frames(n, seed=n), [5])[0] for n in (3, 6)]

    def gap():
        groups = engine.generate(prompts, n=2, max_new_tokens=8, temperature=1.0, seed=1)
        episodes = [(p, s) for p, g in zip(prompts, groups) for s in g]
        with torch.no_grad():
            batch = ours.build_sequence_batch([p for p, _ in episodes], [s.token_ids for _, s in episodes])
            scored = ours.token_logprobs(batch)[batch.loss_mask]
        return (scored - torch.tensor([lp for _, s in episodes for lp in s.logprobs])).abs().max().item()

    assert gap() < 1e-4
    with torch.no_grad():
        for p in ours.llm.parameters():
            p.mul_(1.01)
    engine.sync_weights(ours.llm.state_dict().items())
    assert gap() < 1e-4


def test_a_hub_config_with_top_level_text_keys_loads_the_same(hub_folder, ours, tmp_path):
    """The Hub's Qwen2.5-VL-7B-Instruct config.json has the LLM's keys at the top level and
    rope_scaling {"type": "mrope", "mrope_section": ...} (transformers 4.x wrote it so)."""
    folder = tmp_path / "hub4"
    shutil.copytree(hub_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    cfg.update(text, rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    (folder / "config.json").write_text(json.dumps(cfg))
    flat = M.VideoLM.load(folder).eval()
    with torch.no_grad():
        prompt, _, _ = sequence_inputs(flat, frames(3), [5])
        got = flat.token_logprobs(flat.build_sequence_batch([prompt], [[5, 6]]))
        expected = ours.token_logprobs(ours.build_sequence_batch([sequence_inputs(ours, frames(3), [5])[0]], [[5, 6]]))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def fsdp_job(folder: str) -> dict:
    import rl
    import train
    ps = mrsp.init_distributed(sp_size=2)
    policy = rl.load_policy(folder, ps, bf16=True, shared_prefix=True)
    reference = rl.load_reference(folder, policy, ps, bf16=True, shared_prefix=True)
    generator = torch.Generator().manual_seed(0)
    video = torch.randn(2 * 16, 128, generator=generator)                  # two pairs of 4 x 4 rows
    prompt = policy.prompt("", video, "Question?", np.arange(4) * 0.5)
    groups = [[torch.randint(3, 300, (n,), generator=generator).tolist() for n in (5, 3)]]
    logprobs = lambda model: train.sequence_logprobs(
        model, model.build_packed_batch([prompt], groups, ps.sp_rank, ps.sp_size), ps)
    with torch.no_grad():
        ref = logprobs(reference)
    train.reshard(reference)
    lp = logprobs(policy)
    lp.sum().backward()
    return {"policy": lp.detach(), "reference": ref, "structure": train.fsdp_structure(policy),
            "grads": {p.grad.dtype for p in policy.parameters() if p.grad is not None}}


def test_fsdp_bf16_shards_the_text_model_and_the_reference_computes_as_the_policy(hub_folder):
    """Under torchrun with --bf16 (2 gloo ranks, sp = 2, packed): the text model is the FSDP root over its
    layers, the LM head a root in fp32, and the reference's log-probs equal the policy's exactly (KL 0)."""
    for rank in run_ranks(fsdp_job, 2, str(hub_folder), timeout=300):
        assert torch.equal(rank["policy"], rank["reference"]) and (rank["policy"] != 0).any()
        assert rank["grads"] == {torch.float32}
        units = {row["unit"]: row for row in rank["structure"]}
        decoder = "llm.model.language_model"
        assert set(units) == {decoder, f"{decoder}.embed_tokens", "llm.lm_head",
                              f"{decoder}.layers.0", f"{decoder}.layers.1"}
        assert {u for u, row in units.items() if row["root"]} == {decoder, "llm.lm_head"}
        assert units["llm.lm_head"]["compute_dtype"] == "float32"
