"""The paper's checkpoints in their release layout (LongVILA-R1-7B, LongVILA-7B, NVILA).

Nothing can be downloaded here, so each test writes a tiny replica file by file as the release lays one out
(config.json of model_type "vila" or the training-style LlavaLlamaModel, llm/, vision_tower/ with
vision_model.* keys and no pooling head, mm_projector/ with layers.N.* keys) and runs the real loader on it.
The video embeddings are checked against the release's formulas written out here, one patch at a time.
"""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

import data
import model as M
import synth
import vila

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=1)
LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=1)  # head_dim 32, as vLLM's CPU attention needs
PATCH = 4
BASIC = '{"_target_": "llava.model.encoders.BasicVideoEncoder"}'


def projector_shapes(projector: str, C: int, D: int) -> dict:
    """The release's mm_projector weights: one nn.Sequential `layers` (index 0 is the DownSample, no weights)."""
    if projector == "mlp_downsample_3x3_fix":
        layers = {1: ("norm", 9 * C), 2: ("linear", 9 * C, 3 * C), 4: ("norm", 3 * C), 5: ("linear", 3 * C, D),
                  7: ("linear", D, D)}
    else:
        layers = {1: ("norm", 4 * C), 2: ("linear", 4 * C, D), 4: ("linear", D, D)}
    shapes = {}
    for i, (kind, *dims) in layers.items():
        shapes[f"layers.{i}.weight"] = (dims[0],) if kind == "norm" else (dims[1], dims[0])
        shapes[f"layers.{i}.bias"] = (dims[0] if kind == "norm" else dims[1],)
    return shapes


def write_release_checkpoint(folder, tokenizer, *, projector="mlp_downsample_2x2_fix", grid=8,
                             training_style=False, seed=0, **config):
    """A tiny checkpoint written as the VILA release writes one (not by VideoLM.write); `config` overrides
    keys of the top-level config.json."""
    torch.manual_seed(seed)
    llm_config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=False, max_position_embeddings=4096,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **LLM)
    Qwen2ForCausalLM(llm_config).save_pretrained(folder / "llm")
    tokenizer.save_pretrained(folder / "llm")

    vision_cfg = dict(architectures=["SiglipVisionModel"], model_type="siglip_vision_model",
                      image_size=grid * PATCH, patch_size=PATCH, **VISION)  # no vision_use_head key
    tower = SiglipVisionModel(SiglipVisionConfig(**vision_cfg, vision_use_head=False))
    (folder / "vision_tower").mkdir()
    (folder / "vision_tower" / "config.json").write_text(json.dumps(vision_cfg))
    save_file({f"vision_model.{k}": v.contiguous() for k, v in tower.state_dict().items()},
              str(folder / "vision_tower" / "model.safetensors"), metadata={"format": "pt"})
    (folder / "vision_tower" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "SiglipImageProcessor", "size": {"height": grid * PATCH, "width": grid * PATCH},
         "resample": 3, "rescale_factor": 1 / 255, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))

    shapes = projector_shapes(projector, VISION["hidden_size"], LLM["hidden_size"])
    weights = {k: torch.randn(s) / math.sqrt(s[1]) if len(s) == 2 else  # linear: outputs of size ~1
               (1.0 if "weight" in k else 0.0) + 0.3 * torch.randn(s) for k, s in shapes.items()}
    projector_cfg = {"architectures": ["MultimodalProjector"], "model_type": "v2l_projector",
                     "mm_projector_type": projector}
    (folder / "mm_projector").mkdir()
    (folder / "mm_projector" / "config.json").write_text(json.dumps(projector_cfg))
    save_file(weights, str(folder / "mm_projector" / "model.safetensors"), metadata={"format": "pt"})

    top = {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama"} if training_style else \
        {"architectures": ["VILAForCausalLM"], "model_type": "vila",
         "auto_map": {"AutoModel": "modeling_vila.VILAForCausalLM"}}
    top.update(hidden_size=LLM["hidden_size"], mm_hidden_size=VISION["hidden_size"], mm_vision_select_layer=-2,
               mm_vision_select_feature="cls_patch", image_aspect_ratio="resize", num_video_frames=8, fps=0.0,
               video_encoder=BASIC, llm_cfg=llm_config.to_dict(), vision_tower_cfg=vision_cfg,
               mm_projector_cfg=projector_cfg, model_dtype="torch.float32", chat_template=None)
    top.update(config)
    (folder / "config.json").write_text(json.dumps(top))
    (folder / "modeling_vila.py").write_text("# the release's own model code (trust_remote_code)\n")
    return folder


@pytest.fixture
def replica(tmp_path, tiny_tokenizer):
    return write_release_checkpoint(tmp_path / "LongVILA-R1-tiny", tiny_tokenizer)


def random_frames(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---- the release's formulas, written out ----

def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))  # the exact GELU, not the tanh approximation


def layer_norm(x, w, b):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * w + b


def reference_video_embeds(folder, frames, k, block_order):
    """Frames -> [T * tokens_per_frame, D] the long way: SigLIP's hidden layer -2, zero padding, k x k blocks
    in `block_order`, channels row-major within a block, then the projector's MLP."""
    vision_cfg = json.loads((folder / "vision_tower" / "config.json").read_text())
    tower = SiglipVisionModel(SiglipVisionConfig(**vision_cfg, vision_use_head=False)).eval()
    tower.load_state_dict({k_[len("vision_model."):]: v for k_, v in
                           load_file(str(folder / "vision_tower" / "model.safetensors")).items()})
    W = load_file(str(folder / "mm_projector" / "model.safetensors"))
    px = (torch.tensor(frames).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        h = tower.embeddings(px)
        for layer in tower.encoder.layers[:-1]:  # hidden layer -2: not the last layer, no post-layernorm
            h = layer(h, None)
    g, C = vision_cfg["image_size"] // PATCH, vision_cfg["hidden_size"]
    n = math.ceil(g / k)
    blocks = [(r, c) for r in range(n) for c in range(n)]
    if block_order == "column":
        blocks = [(r, c) for c in range(n) for r in range(n)]
    rows = []
    for features in h:
        padded = torch.zeros(n * k, n * k, C)        # zero rows at the bottom, zero columns on the right
        padded[:g, :g] = features.view(g, g, C)
        for r, c in blocks:
            x = torch.cat([padded[r * k + i, c * k + j] for i in range(k) for j in range(k)])
            x = layer_norm(x, W["layers.1.weight"], W["layers.1.bias"])
            x = gelu(x @ W["layers.2.weight"].T + W["layers.2.bias"])
            if k == 3:
                x = layer_norm(x, W["layers.4.weight"], W["layers.4.bias"])
                x = gelu(x @ W["layers.5.weight"].T + W["layers.5.bias"])
                x = x @ W["layers.7.weight"].T + W["layers.7.bias"]
            else:
                x = x @ W["layers.4.weight"].T + W["layers.4.bias"]
            rows.append(x)
    return torch.stack(rows)


# (projector, block order asked for at load or None for the checkpoint's own, order expected, k)
PROJECTORS = [("mlp_downsample_2x2_fix", None, "row", 2),        # LongVILA-R1-7B
              ("mlp_downsample", None, "column", 2),             # LongVILA-7B as released (2024-08)
              ("mlp_downsample", "row", "row", 2),               # the same type name in VILA since 2024-12
              ("mlp_downsample_3x3_fix", None, "row", 3)]        # NVILA-Lite


@pytest.mark.parametrize("grid", [7, 8])
@pytest.mark.parametrize("projector,asked,order,k", PROJECTORS)
@torch.no_grad()
def test_video_embeddings_follow_the_release_formulas(tmp_path, tiny_tokenizer, projector, asked, order, k, grid):
    folder = write_release_checkpoint(tmp_path / "ckpt", tiny_tokenizer, projector=projector, grid=grid)
    model = M.VideoLM.load(folder, block_order=asked).eval()
    assert (model.config.projector, model.config.block_order) == (projector, order)
    assert model.config.tokens_per_frame == math.ceil(grid / k) ** 2
    frames = random_frames(3, grid * PATCH, seed=grid)
    expected = reference_video_embeds(folder, frames, k, order)
    assert expected.shape == (3 * model.config.tokens_per_frame, LLM["hidden_size"])
    torch.testing.assert_close(model.encode_video(frames), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("image_size,projector,tokens", [(448, "mlp_downsample_2x2_fix", 256),
                                                         (384, "mlp_downsample", 196),
                                                         (448, "mlp_downsample_3x3_fix", 121)])
def test_tokens_per_frame_of_the_released_models(image_size, projector, tokens):
    config = vila.VilaConfig(image_size, 14, 1152, 3584, projector=projector)
    assert config.tokens_per_frame == tokens


@torch.no_grad()
def test_the_tsp_encoder_averages_consecutive_frames_then_adds_the_separator(tmp_path, tiny_tokenizer):
    tsp = '{"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[2, 1, 1]]}'
    model = M.VideoLM.load(write_release_checkpoint(tmp_path / "tsp", tiny_tokenizer, grid=4, video_encoder=tsp))
    assert model.config.temporal_pool == 2 and model.config.tokens_per_frame == 4
    D = LLM["hidden_size"]
    # 4 frames of 4 tokens; every value of frame f, token j is 10 f + j
    video = (10 * torch.arange(4.0)[:, None] + torch.arange(4.0)[None, :])[:, :, None].expand(4, 4, D)
    rows = vila.VilaFamily.video_rows(model, video.reshape(16, D))
    sep = model.embed_ids(model.encode_text("\n"))[0]
    assert rows.shape == (2 * (4 + 1), D)                               # 2 pooled steps of 4 tokens + "\n"
    torch.testing.assert_close(rows[0:4, 0], torch.tensor([5.0, 6, 7, 8]))       # mean of frames 0, 1
    torch.testing.assert_close(rows[5:9, 0], torch.tensor([25.0, 26, 27, 28]))   # mean of frames 2, 3
    torch.testing.assert_close(rows[4], sep)
    torch.testing.assert_close(rows[9], sep)
    with pytest.raises(ValueError, match="3 frames do not make whole groups of 2"):
        vila.VilaFamily.video_rows(model, video.reshape(16, D)[:12])


@torch.no_grad()
def test_the_prompt_is_chatml_with_the_video_first_and_the_thinking_prompt(replica):
    model = M.VideoLM.load(replica)
    record = data.Record("q", "v.mp4", "What colour is the first scene?", ["red", "green"], "multiple_choice", "", "A")
    before, after = vila.VilaFamily.chat_text(model.tokenizer, *data.build_prompt(record))
    assert before == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    assert after.startswith("You are a helpful assistant. The user asks a question, and then you solves it.")
    assert after.endswith(" Question: What colour is the first scene?\nA. red\nB. green<|im_end|>\n"
                          "<|im_start|>assistant\n")
    video = model.encode_video(random_frames(2, 32))
    text_before, text_after = data.build_prompt(record)
    prompt = model.prompt(text_before, video, text_after).embeds
    nb = len(model.encode_text(before))
    assert len(prompt) == nb + 2 * (16 + 1) + len(model.encode_text(after))
    torch.testing.assert_close(prompt[nb:nb + 16], video[:16])


def test_the_cache_key_follows_what_changes_the_embeddings(tmp_path, tiny_tokenizer):
    """Same weights, another block order, hidden layer or video encoder: another video-embedding cache key."""
    import dataclasses
    import mrsp
    folder = write_release_checkpoint(tmp_path / "ckpt", tiny_tokenizer, projector="mlp_downsample", grid=7)
    model = M.VideoLM.load(folder)
    key = mrsp.vision_fingerprint(model)
    assert mrsp.vision_fingerprint(M.VideoLM.load(folder)) == key
    assert mrsp.vision_fingerprint(M.VideoLM.load(folder, block_order="row")) != key
    config = model.config
    for change in (dict(select_layer=-1), dict(temporal_pool=2), dict(projector="mlp_downsample_2x2_fix")):
        model.config = dataclasses.replace(config, **change)
        assert mrsp.vision_fingerprint(model) != key, change


# ---- save and load ----

def safetensors_keys(path):
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


@torch.no_grad()
@pytest.mark.parametrize("training_style", [False, True])
def test_save_writes_the_release_layout_back_and_loads_to_identical_logprobs(tmp_path, tiny_tokenizer,
                                                                             training_style):
    release = write_release_checkpoint(tmp_path / "release", tiny_tokenizer, projector="mlp_downsample", grid=7,
                                       training_style=training_style)
    model = M.VideoLM.load(release).eval()
    model.save(tmp_path / "ours")
    ours = tmp_path / "ours"
    for part in ("vision_tower/model.safetensors", "mm_projector/model.safetensors"):
        assert safetensors_keys(ours / part) == safetensors_keys(release / part)   # vision_model.*, layers.N.*
    written, original = (json.loads((f / "config.json").read_text()) for f in (ours, release))
    for key in ("architectures", "model_type", "auto_map", "hidden_size", "mm_hidden_size", "mm_vision_select_layer",
                "mm_vision_select_feature", "image_aspect_ratio", "num_video_frames", "fps", "model_dtype"):
        assert written.get(key) == original.get(key), key
    assert json.loads(written["video_encoder"]) == json.loads(BASIC)
    assert written["mm_projector_cfg"]["mm_projector_type"] == "mlp_downsample"
    # the column order this checkpoint was read with is now written down, so no reader has to guess
    assert json.loads((ours / "mm_projector" / "config.json").read_text())["block_order"] == "column"
    assert (ours / "modeling_vila.py").exists()
    assert json.loads((ours / "llm" / "tokenizer_config.json").read_text())["chat_template"]

    frames = random_frames(2, 28)
    def logprobs(m):
        prompt = m.prompt("", m.encode_video(frames), "Question: red?")
        return m.token_logprobs(m.build_sequence_batch([prompt], [m.encode_text("<think>red</think>")]))
    reloaded = M.VideoLM.load(ours).eval()
    assert reloaded.config == model.config
    torch.testing.assert_close(logprobs(reloaded), logprobs(model), rtol=0, atol=0)


def test_llm_folder_runs_in_vllm_and_greedy_equals_the_trainers_argmax(replica):
    pytest.importorskip("vllm")
    import rollout
    model = M.VideoLM.load(replica).eval()
    with torch.no_grad():
        prompt = model.prompt("", model.encode_video(random_frames(3, 32)), "Question: How many scenes?")
    engine = rollout.VLLMEngine(replica / "llm", max_model_len=256, seed=0)
    got = engine.generate([prompt], n=1, max_new_tokens=8, temperature=0)[0][0].token_ids
    expected = rollout.TorchEngine(model, max_model_len=256).generate([prompt], n=1, max_new_tokens=8,
                                                                        temperature=0)[0][0].token_ids
    assert got == expected


def test_init_from_a_pretrained_llm_and_an_odd_grid_tower(tmp_path, tiny_tokenizer):
    """`model.py init --llm --vision-tower` with SigLIP's 27x27-style odd grid (here 7x7) works end to end."""
    release = write_release_checkpoint(tmp_path / "parts", tiny_tokenizer, grid=7)
    out = tmp_path / "init"
    M.main(["init", "--out", str(out), "--llm", str(release / "llm"), "--vision-tower", str(release / "vision_tower"),
            "--projector", "mlp_downsample", "--block-order", "row"])
    model = M.VideoLM.load(out)
    assert (model.config.projector, model.config.block_order, model.config.tokens_per_frame) == \
        ("mlp_downsample", "row", 16)
    assert model.encode_video(random_frames(2, 28)).shape == (32, LLM["hidden_size"])
    assert model.llm.config.vocab_size == len(model.tokenizer)


# ---- bad input: each a clear error naming the file and the value ----

def edit_json(path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


BAD = {
    "not a checkpoint": (lambda f: shutil.rmtree(f) or f.mkdir(), r"config.json not found"),
    "missing subfolder": (lambda f: shutil.rmtree(f / "mm_projector"), r"mm_projector/config.json not found"),
    "unknown projector": (lambda f: edit_json(f / "mm_projector" / "config.json", mm_projector_type="mlp_4x4"),
                          r"mm_projector/config.json: mm_projector_type 'mlp_4x4' is not supported"),
    "projector weights of another type": (
        lambda f: edit_json(f / "mm_projector" / "config.json", mm_projector_type="mlp_downsample_3x3_fix"),
        r"mm_projector/model.safetensors: .*layers.1.weight has shape \[128\], needs \[288\]"),
    "llm weights disagree with its config": (lambda f: edit_json(f / "llm" / "config.json", intermediate_size=96),
                                             r"llm: the weights disagree with .*llm/config.json: .*mlp.*shape"),
    "widths disagree": (lambda f: edit_json(f / "config.json", mm_hidden_size=1152),
                        r"config.json: mm_hidden_size 1152 disagrees with vision_tower/config.json \(32\)"),
    "grid not whole": (lambda f: edit_json(f / "vision_tower" / "config.json", image_size=30),
                       r"vision_tower/config.json: image_size 30 with patch_size 4 does not give a square grid"),
    "grid not square": (lambda f: edit_json(f / "vision_tower" / "config.json", image_size=[32, 28]),
                        r"image_size \[32, 28\] with patch_size 4 does not give a square grid"),
    "select feature": (lambda f: edit_json(f / "config.json", mm_vision_select_feature="patch"),
                       r"config.json: mm_vision_select_feature 'patch' is not supported"),
    "select layer": (lambda f: edit_json(f / "config.json", mm_vision_select_layer=-9),
                     r"config.json: mm_vision_select_layer -9 is not a hidden layer"),
    "video encoder": (lambda f: edit_json(f / "config.json", video_encoder='{"_target_": "x.TSPVideoEncoder", '
                                                                          '"pool_sizes": [[8, 2, 2]]}'),
                      r"config.json: video_encoder .*TSPVideoEncoder.* is not supported"),
    "aspect ratio": (lambda f: edit_json(f / "config.json", image_aspect_ratio="pad"),
                     r"config.json: image_aspect_ratio 'pad' is not supported"),
    "not vila": (lambda f: edit_json(f / "config.json", model_type="llava_qwen", architectures=["X"]),
                 r"config.json: model_type 'llava_qwen'.* is not a family this project reads: VILA .*Qwen2.5-VL"),
    "our old layout": (lambda f: (f / "config.json").write_text(json.dumps(
        {"image_size": 32, "patch_size": 8, "vision_hidden": 64, "llm_hidden": 128, "projector": "mlp_downsample"})),
        r"config.json is in the layout this project wrote before.*model.py init"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints_are_clear_errors(replica, case):
    damage, message = BAD[case]
    damage(replica)
    with pytest.raises(M.CheckpointError, match=message):
        M.VideoLM.load(replica)


# ---- the pipeline on a release-layout replica ----

def test_sft_rl_and_eval_start_from_a_release_checkpoint(tmp_path, tiny_tokenizer):
    """LongVILA-7B's shape in miniature (mlp_downsample, odd grid): CoT-SFT, then GRPO, then eval."""
    import eval as evaluation
    import rl
    import sft
    synth.main(["--out", str(tmp_path / "data"), "--n", "6", "--seed", "1", "--max-scenes", "3",
               "--test-frac", "0.34"])
    train, test = tmp_path / "data" / "train.jsonl", tmp_path / "data" / "test.jsonl"
    start = write_release_checkpoint(tmp_path / "LongVILA-tiny", tiny_tokenizer, projector="mlp_downsample", grid=7,
                                     num_video_frames=4)
    frames = ["--num-frames", "4"]
    sft.main(["--init", str(start), "--data", str(train), "--out", str(tmp_path / "sft"), "--steps", "2",
              "--batch-size", "2", "--save-every", "0", *frames])
    rl.main(["--init", str(tmp_path / "sft" / "final"), "--data", str(train), "--out", str(tmp_path / "rl"),
             "--steps", "1", "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "8", "--engine", "torch",
             "--save-every", "0", *frames])
    assert evaluation.main(["--checkpoint", str(tmp_path / "rl" / "final"), "--data", str(test), "--out",
                            str(tmp_path / "eval"), "--max-new-tokens", "8", "--engine", "torch"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["n"] == len(data.load_records(test)) and report["errors"]["count"] == 0
    assert report["settings"]["num_frames"] == 4  # the checkpoint's num_video_frames, kept through SFT and RL
    final = M.VideoLM.load(tmp_path / "rl" / "final")
    assert (final.config.projector, final.config.block_order, final.config.tokens_per_frame) == \
        ("mlp_downsample", "column", 16)
    assert (tmp_path / "rl" / "final" / "modeling_vila.py").exists()
