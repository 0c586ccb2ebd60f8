"""The Qwen2.5-VL family (Qwen2.5-VL-3B/7B/32B/72B-Instruct and models fine-tuned from them): its
checkpoint layout, how its frames become video embeddings, and its M-RoPE positions. model.VideoLM calls
this file through the family interface (see model.py).

    frames [T, H, W, 3] uint8, H = W = frame_size (a multiple of 28; 448 unless config.json says otherwise)
      -> pairs of frames (temporal patch 2; an odd count completed with the last frame, as Qwen's
         processor does), x / 255 normalised with the checkpoint's mean and std (CLIP's)
      -> 14 x 14 x 2 patches, grouped 2 x 2 for the merger      [pairs * (H/14) * (W/14), 3 * 2 * 14 * 14]
      -> the vision tower: window attention (112-px windows), full attention in `fullatt_block_indexes`
         (within one pair: pairs never see each other), then the 2 x 2 merger
      -> (H/28) * (W/28) rows per pair, in (pair, row, column) order: 256 at 448 px   [pairs * tps, D]
      -> spliced into the ChatML prompt as <|vision_start|><|video_pad|> x rows <|vision_end|>

M-RoPE positions, as vLLM computes them (and so as the model was trained): text tokens have the same
position on all three axes; the video token of pair t, row h, column w sits at

    (Lb + floor(t * s), Lb + h, Lb + w),   s = tokens_per_second x seconds per pair

where Lb is the number of text tokens before the video, and the text after the video starts one past the
largest video position on any axis. An image is one temporal patch (the picture twice, as Qwen's image
processor makes it) between <|vision_start|><|image_pad|>...<|vision_end|>: its tokens sit at
(Lb, Lb + h, Lb + w), no seconds. A text prompt's positions are 0..L-1 on all three axes. transformers'
`get_rope_index` has changed between versions (in 5.19 the text after a video starts elsewhere), so the
positions are computed here, never taken from it.

A checkpoint is the Hugging Face folder as `Qwen2_5_VLForConditionalGeneration.save_pretrained` and the Hub
write it: config.json (model_type qwen2_5_vl, vision_config, text_config or top-level text keys with
rope_scaling / rope_parameters mrope_section), safetensors with `visual.*`, `model.*`, `lm_head.*`, the
tokenizer with its chat template, preprocessor_config.json. Two keys of this project may sit in config.json:
`frame_size` and `question_prompt`. vLLM and transformers load a folder written here unchanged.
"""
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from checkpoint import CheckpointError, from_pretrained, read_json, shard_numel, write_tokenizer

VIDEO_PAD, VISION_START, VISION_END = "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
PLACEHOLDERS = {"video": VIDEO_PAD, "image": IMAGE_PAD}  # a prompt's media -> its pad token (text: none)
# Qwen2.5-VL's vision tokens, as its tokenizer holds them (single special tokens)
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", IMAGE_PAD, VIDEO_PAD]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # Qwen2.5-VL's preprocessor_config.json image_mean
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]  # and image_std
DEFAULT_FRAME_SIZE = 448  # 16 x 16 merged tokens per frame pair, as LongVILA-R1's 448-px SigLIP frames
# processor files a checkpoint may carry beside its weights; written back as they were read
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json")

# ChatML with Qwen2.5-VL's vision placeholders: content is a string, or a list of {"type": "text", "text"}
# and {"type": "video"} / {"type": "image"} parts, rendered as the Hub's template renders them.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Tiny models for a CPU. The LLM's head_dim is 32 (vLLM's CPU attention rejects 16), so mrope_section
# sums to 16; the 56-px frames make 2 x 2 merged tokens per frame pair.
PRESETS = {
    "tiny": dict(
        frame_size=56,
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1]),
        llm=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
        mrope_section=[4, 6, 6],
        vocab_size=1024,
    ),
    "small": dict(
        frame_size=112,  # 4 x 4 merged tokens per pair; two 56-px windows per side
        vision=dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, fullatt_block_indexes=[1, 3],
                    window_size=56),
        llm=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2),
        mrope_section=[4, 6, 6],
        vocab_size=2048,
    ),
}


@dataclass
class QwenVLConfig:
    """How frames become LLM input rows, read from config.json and preprocessor_config.json. Everything
    here decides the video embeddings, so the video-embedding cache keys on all of it."""
    image_size: int              # frames are resized to image_size x image_size (config.json frame_size)
    patch_size: int              # 14
    temporal_patch_size: int     # 2: frames per step
    merge_size: int              # 2: merged tokens are 2 x 2 patches
    llm_hidden: int              # D
    tokens_per_second: float     # M-RoPE time positions per second of video
    image_mean: tuple = tuple(CLIP_MEAN)
    image_std: tuple = tuple(CLIP_STD)
    family: str = "qwen2_5_vl"

    @property
    def frames_per_step(self) -> int:
        return self.temporal_patch_size

    @property
    def merged_grid(self) -> int:
        """Merged tokens per side of a frame: 448 / 28 = 16."""
        return self.image_size // (self.patch_size * self.merge_size)

    @property
    def tokens_per_step(self) -> int:
        return self.merged_grid ** 2


def patchify(pixels: torch.Tensor, cfg: QwenVLConfig) -> torch.Tensor:
    """Normalised frames [2k, 3, H, W] -> the vision tower's input rows [k * gh * gw, 3 * 2 * p * p], as
    Qwen2-VL's processor lays them out: rows by (pair, block row, block column, row in block, column in
    block) with 2 x 2 blocks (the merger's groups of 4 consecutive rows); each row's values by (channel,
    frame of the pair, y, x). gh = H / p, gw = W / p."""
    T, C, H, W = pixels.shape
    tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    gh, gw = H // p, W // p
    x = pixels.view(T // tp, tp, C, gh // m, m, p, gw // m, m, p)   # [k, tp, C, bh, m, p, bw, m, p]
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)                        # [k, bh, bw, m, m, C, tp, p, p]
    return x.reshape(T // tp * gh * gw, C * tp * p * p)


def seconds_per_pair(timestamps, frames_per_step: int) -> float:
    """Seconds a step (frame pair) spans: frames_per_step x the mean gap of the sampled frames' times, as
    Qwen's processor computes it from the sampling rate (2 / fps). One frame: 1.0 (no second pair, so the
    time axis never uses it). Example: frames at 0.5, 1.5, 2.5, 3.5 s -> 2.0."""
    t = np.asarray(timestamps, dtype=np.float64)
    if len(t) < 2:
        return 1.0
    return frames_per_step * float(t[-1] - t[0]) / (len(t) - 1)


def mrope_positions(text_before: int, pairs: int, grid: int, text_after: int, seconds: float,
                    tokens_per_second: float) -> torch.Tensor:
    """M-RoPE positions [3, L] of `text_before` text tokens, a video of `pairs` x grid x grid tokens and
    `text_after` text tokens (see the module docstring). s = float32(seconds) x tokens_per_second, as vLLM
    takes seconds per pair from a float32 tensor; floor(t x s) in float64, as its numpy code does.

    Example: 2 text tokens, 2 pairs of 2 x 2, 1 text token, 1.5 s per pair at 2 tokens per second (s = 3):
        t: 0 1 | 2 2 2 2 5 5 5 5 | 6
        h: 0 1 | 2 2 3 3 2 2 3 3 | 6
        w: 0 1 | 2 3 2 3 2 3 2 3 | 6
    """
    s = float(np.float32(seconds)) * tokens_per_second
    Lb = text_before
    t = torch.from_numpy(np.floor(np.arange(pairs, dtype=np.float64) * s).astype(np.int64))   # [pairs]
    rows = torch.arange(grid)
    video = torch.stack([t[:, None, None].expand(pairs, grid, grid),                          # [3, pairs, g, g]
                         rows[None, :, None].expand(pairs, grid, grid),
                         rows[None, None, :].expand(pairs, grid, grid)]).reshape(3, -1) + Lb   # [3, V]
    start = int(video.max()) + 1 if pairs else Lb
    before = torch.arange(Lb).expand(3, Lb)                                                      # [3, Lb]
    after = torch.arange(start, start + text_after).expand(3, text_after)                       # [3, La]
    return torch.cat([before, video, after], dim=1)                                             # [3, L]


class QwenVLFamily:
    """Everything particular to Qwen2.5-VL, behind the family interface model.py describes. The vision
    tower is the checkpoint's `visual` module (its merger included: `mm_projector` is nn.Identity); `llm`
    is Qwen2_5_VLForConditionalGeneration without it (its `model.visual` set to None), whose decoder
    is the text model and takes positions [3, B, S]."""

    name = "qwen2_5_vl"
    position_axes = 3
    needs_timestamps = True  # the time axis of M-RoPE counts seconds
    special_tokens = VISION_TOKENS
    chat_template = CHAT_TEMPLATE
    presets = PRESETS

    # ---- frames -> video embeddings ----

    @staticmethod
    def encode_frames(model, frames) -> torch.Tensor:
        """uint8 frames [t, H, W, 3] -> merged tokens [ceil(t / 2) * tokens_per_step, D] (an odd t completed
        with its last frame, as the processor completes a video)."""
        cfg = model.config
        frames = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames)
        T, H, W, _ = frames.shape
        if H != cfg.image_size or W != cfg.image_size:
            raise ValueError(f"frames are {H}x{W}, this Qwen2.5-VL reads {cfg.image_size}x{cfg.image_size}")
        if pad := -T % cfg.temporal_patch_size:
            frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])                 # [T + pad, H, W, 3]
        x = frames.to(model.device).permute(0, 3, 1, 2).float() / 255                          # [T', 3, H, W]
        mean = torch.tensor(cfg.image_mean, device=x.device)[:, None, None]
        std = torch.tensor(cfg.image_std, device=x.device)[:, None, None]
        tower = model.vision_tower
        rows = patchify((x - mean) / std, cfg).to(next(tower.parameters()).dtype)             # [k * gh * gw, 3*2*p*p]
        g = cfg.image_size // cfg.patch_size
        grid = torch.tensor([[len(frames) // cfg.temporal_patch_size, g, g]], device=x.device)  # one video: [1, 3]
        return tower(hidden_states=rows, grid_thw=grid).pooler_output                          # [k * tps, D]

    @staticmethod
    def chat_text(tokenizer, text_before: str, text_after: str, media: str = "video") -> tuple[str, str]:
        """The chat text on either side of the media's rows: `before` ends with <|vision_start|>, `after`
        starts with <|vision_end|>. With text_before = "":
            "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n<|vision_start|>"
            | video rows | "<|vision_end|>Question: ...<|im_end|>\\n<|im_start|>assistant\\n"
        An image's the same around <|image_pad|>; a text prompt is all `before`, `after` empty.
        """
        for pad in PLACEHOLDERS.values():
            if pad in text_before + text_after:
                raise ValueError(f"the prompt text contains the media placeholder {pad!r}")
        parts = ([{"type": "text", "text": text_before}] if text_before else []) + \
            ([{"type": media}] if media != "text" else []) + \
            ([{"type": "text", "text": text_after}] if text_after else [])
        text = tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                             add_generation_prompt=True)
        if media == "text":
            return text, ""
        pad = PLACEHOLDERS[media]
        if text.count(pad) != 1:
            raise ValueError(f"the chat template put {text.count(pad)} {pad} in a one-{media} turn")
        before, after = text.split(pad)
        return before, after

    @staticmethod
    def prompt(model, text_before: str, media_embeds: torch.Tensor | None, text_after: str, timestamps,
               media: str = "video"):
        """The chat prompt around the media -> (embeddings [L, D], M-RoPE positions [3, L], a function making
        the vLLM request: the prompt's token ids with one pad token per media row, and the media as
        embeddings with its grid (and a video's seconds per pair), so vLLM computes the same positions).
        An image is one pair's rows at time 0; a text prompt (no embeddings) is the chat text alone."""
        cfg = model.config
        before, after = QwenVLFamily.chat_text(model.tokenizer, text_before, text_after, media)
        ids_before, ids_after = model.encode_text(before), model.encode_text(after)
        embeds_before = model.embed_ids(ids_before)                                            # [Lb, D]
        if media == "text":
            ids = ids_before + ids_after
            positions = torch.arange(len(ids)).expand(3, len(ids))                             # [3, L]
            return embeds_before, positions.to(embeds_before.device), lambda: {"prompt_token_ids": ids}
        pairs, g = len(media_embeds) // cfg.tokens_per_step, cfg.merged_grid
        if media == "image" and pairs != 1:
            raise ValueError(f"an image is one temporal patch of {cfg.tokens_per_step} rows, got {len(media_embeds)}")
        # a video's time axis counts seconds; an image's single patch sits at time 0 whatever the scale
        seconds = seconds_per_pair(timestamps, cfg.temporal_patch_size) if media == "video" else 0.0
        positions = mrope_positions(len(ids_before), pairs, g, len(ids_after), seconds, cfg.tokens_per_second)
        embeds = torch.cat([embeds_before, media_embeds.to(embeds_before.dtype), model.embed_ids(ids_after)])
        pad = model.tokenizer.convert_tokens_to_ids(PLACEHOLDERS[media])

        def engine_input() -> dict:  # made only for a rollout: the training passes never copy the media to the host
            # in patches, one row per item: vLLM reads {media}_grid_thw as (number of videos or images, 3)
            grid = torch.tensor([[pairs, g * cfg.merge_size, g * cfg.merge_size]])            # [1, 3]
            data = {f"{media}_embeds": media_embeds.detach().cpu(), f"{media}_grid_thw": grid}
            if media == "video":
                data["second_per_grid_ts"] = torch.tensor([seconds], dtype=torch.float32)
            return {"prompt_token_ids": ids_before + [pad] * len(media_embeds) + ids_after,
                    "multi_modal_data": {media: data}}
        return embeds, positions.to(embeds.device), engine_input

    @staticmethod
    def prompt_length(model, text_before: str, text_after: str, num_frames: int, media: str = "video") -> int:
        """Tokens of the prompt for `num_frames` frames, without building it: text + ceil(frames / 2) x
        tokens per pair (an image: one pair; text: none). (Its positions end lower or higher than its
        length: M-RoPE positions are not token indices. The KV cache and vLLM's max_model_len count tokens.)"""
        cfg = model.config
        before, after = QwenVLFamily.chat_text(model.tokenizer, text_before, text_after, media)
        pairs = {"video": -(-num_frames // cfg.temporal_patch_size), "image": 1, "text": 0}[media]
        return len(model.encode_text(before)) + len(model.encode_text(after)) + pairs * cfg.tokens_per_step

    @staticmethod
    def image_setting(model) -> str:
        """How an image becomes frames, for the embedding cache's key: resized whole to the square the
        frames take (config.json frame_size), as this project reads video frames; Qwen's own processor
        would keep the aspect ratio (smart_resize), so a checkpoint trained on that sees a squeezed picture."""
        return f"image-resize-{model.config.image_size}"

    # ---- on disk ----

    @staticmethod
    def read_config(path: Path, config: dict) -> QwenVLConfig:
        """config.json (+ preprocessor_config.json) -> QwenVLConfig, every value checked."""
        where = path / "config.json"
        vision = config.get("vision_config")
        if not isinstance(vision, dict):
            raise CheckpointError(f"{where}: no vision_config: not a Qwen2.5-VL checkpoint (or a text-only export)")
        text = config.get("text_config") or config  # transformers 5 nests the LLM's keys; the Hub's are top-level
        hidden, heads = text.get("hidden_size"), text.get("num_attention_heads")
        if not isinstance(hidden, int) or not isinstance(heads, int) or hidden % heads:
            raise CheckpointError(f"{where}: hidden_size {hidden!r} / num_attention_heads {heads!r} is not a "
                                  "whole head size")
        head_dim = text.get("head_dim") or hidden // heads
        rope = text.get("rope_parameters") or text.get("rope_scaling") or \
            config.get("rope_parameters") or config.get("rope_scaling") or {}
        section = rope.get("mrope_section")
        if not isinstance(section, list) or len(section) != 3 or sum(section) != head_dim // 2:
            raise CheckpointError(f"{where}: rope mrope_section {section!r} must be three sizes adding up to "
                                  f"head_dim / 2 = {head_dim // 2} (e.g. [16, 24, 24] for head_dim 128)")
        if vision.get("out_hidden_size") != hidden:
            raise CheckpointError(f"{where}: vision_config.out_hidden_size {vision.get('out_hidden_size')!r} is not "
                                  f"the LLM's hidden_size {hidden}")
        patch, merge = vision.get("patch_size", 14), vision.get("spatial_merge_size", 2)
        temporal = vision.get("temporal_patch_size", 2)
        size = config.get("frame_size", DEFAULT_FRAME_SIZE)
        if not isinstance(size, int) or size <= 0 or size % (patch * merge):
            raise CheckpointError(f"{where}: frame_size {size!r} is not a positive multiple of "
                                  f"patch_size x spatial_merge_size = {patch * merge}")
        mean, std = _preprocessor(path / "preprocessor_config.json", patch, merge, temporal)
        return QwenVLConfig(size, patch, temporal, merge, hidden, vision.get("tokens_per_second", 2),
                            tuple(mean), tuple(std))

    @staticmethod
    def load(model_class: type, path: Path, config: dict, dtype, device, attn_implementation: str,
             block_order: str | None = None):
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
        if block_order is not None:
            raise ValueError("--block-order is a VILA projector setting; a Qwen2.5-VL checkpoint has none")
        cfg = QwenVLFamily.read_config(path, config)
        llm = from_pretrained(Qwen2_5_VLForConditionalGeneration, path, dtype=dtype,
                              attn_implementation=attn_implementation)
        tower = llm.model.visual
        llm.model.visual = None  # the tower is VideoLM.vision_tower; the LLM's forward never needs it
        for file in sorted(path.glob("tokenizer*.json")):  # a cut-short one is named, not a parse error
            read_json(file)
        tokenizer = AutoTokenizer.from_pretrained(path)
        _check_tokenizer(path, tokenizer, config, llm.get_input_embeddings().num_embeddings)
        return model_class(cfg, tower, nn.Identity(), llm, tokenizer, release_config=config, source=path).to(device)

    @staticmethod
    def write(model, folder: Path, state_dict: dict):
        """The Hugging Face layout, through transformers' own save_pretrained (Hub tensor names: visual.*,
        model.*, lm_head.*), with the tokenizer, preprocessor_config.json and this project's config keys."""
        llm, folder = model.llm, Path(folder)
        weights = {}
        for name, tensor in state_dict.items():
            if name.startswith("vision_tower."):
                weights["model.visual." + name[len("vision_tower."):]] = tensor.detach().cpu().contiguous()
            elif name.startswith("llm."):
                weights[name[len("llm."):]] = tensor.detach().cpu().contiguous()
        dtype = weights["lm_head.weight"].dtype
        shard = shard_numel(model.source) if model.source is not None else None
        llm.model.visual = model.vision_tower  # save_pretrained walks the whole model's structure
        try:
            llm.save_pretrained(folder, state_dict=weights, max_shard_size=shard * dtype.itemsize if shard else "50GB")
        finally:
            llm.model.visual = None
        write_tokenizer(model.tokenizer, folder)
        cfg = model.config
        (folder / "preprocessor_config.json").write_text(json.dumps(dict(
            image_processor_type="Qwen2VLImageProcessor", do_resize=True, do_rescale=True, rescale_factor=1 / 255,
            do_normalize=True, image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
            patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size, merge_size=cfg.merge_size,
            processor_class="Qwen2_5_VLProcessor"), indent=2))
        for name in PROCESSOR_FILES if model.source is not None else ():  # the release's own, as they were
            if (model.source / name).is_file():
                shutil.copy2(model.source / name, folder / name)
        written = read_json(folder / "config.json")
        ours = {k: model.release_config[k] for k in ("question_prompt",) if k in model.release_config}
        if cfg.image_size != DEFAULT_FRAME_SIZE:
            ours["frame_size"] = cfg.image_size
        (folder / "config.json").write_text(json.dumps({**written, **ours}, indent=2))

    @staticmethod
    def is_complete(path: Path) -> bool:
        return (path / "config.json").exists() and any(path.glob("*.safetensors"))

    @staticmethod
    def llm_folder(path: Path) -> Path:
        """The LLM's weights in the Hugging Face layout (lm_head.weight among them), what vLLM loads: the
        checkpoint folder itself."""
        return path

    @staticmethod
    def engine_weight_name(name: str) -> str:
        """`model.llm`'s parameter names (transformers 5: model.language_model.X, lm_head.X) -> the Hub's
        names, which vLLM's loader maps itself: model.X, lm_head.X."""
        return name.replace("model.language_model.", "model.", 1)

    @staticmethod
    def build(model_class: type, preset: str, tokenizer, seed: int = 0, attn_implementation: str = "sdpa"):
        """A randomly initialised Qwen2.5-VL of the preset's sizes, with `tokenizer`'s vocabulary."""
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        p = PRESETS[preset]
        torch.manual_seed(seed)
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        ids = {f"{k}_token_id": tokenizer.convert_tokens_to_ids(t) for k, t in
               (("image", "<|image_pad|>"), ("video", VIDEO_PAD), ("vision_start", VISION_START),
                ("vision_end", VISION_END))}
        config = Qwen2_5_VLConfig(
            text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=32768, bos_token_id=None,
                             eos_token_id=eos, pad_token_id=pad, rope_parameters=dict(
                                 rope_type="default", rope_theta=1e6, mrope_section=p["mrope_section"]),
                             **p["llm"]),
            vision_config=dict(out_hidden_size=p["llm"]["hidden_size"], tokens_per_second=2,
                               **{"window_size": 112, **p["vision"]}),
            tie_word_embeddings=False, **ids)
        llm = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
        llm.generation_config.bos_token_id, llm.generation_config.eos_token_id = None, eos
        llm.generation_config.pad_token_id = pad
        tower = llm.model.visual
        llm.model.visual = None
        cfg = QwenVLConfig(p["frame_size"], 14, 2, 2, p["llm"]["hidden_size"], 2)
        release = {"frame_size": p["frame_size"]}
        return model_class(cfg, tower, nn.Identity(), llm, tokenizer, release_config=release)

    @staticmethod
    def describe(model) -> str:
        """One line for `model.py info`."""
        c = model.config
        count = lambda module: sum(p.numel() for p in module.parameters())
        return (f"Qwen2.5-VL: vision tower {count(model.vision_tower):,} params ({c.image_size}px frames in pairs, "
                f"{c.tokens_per_step} tokens per pair, {c.tokens_per_second} M-RoPE time positions per second), "
                f"llm {count(model.llm):,}")


def _preprocessor(path: Path, patch: int, merge: int, temporal: int) -> tuple[list, list]:
    """preprocessor_config.json's mean and std, its patch sizes checked against vision_config's
    (CLIP's mean and std when the file is absent)."""
    if not path.is_file():
        return CLIP_MEAN, CLIP_STD
    p = read_json(path)
    for key, want in (("patch_size", patch), ("merge_size", merge), ("temporal_patch_size", temporal)):
        if key in p and p[key] != want:
            raise CheckpointError(f"{path}: {key} {p[key]!r} disagrees with config.json's vision_config ({want})")
    if "rescale_factor" in p and not math.isclose(p["rescale_factor"], 1 / 255):
        raise CheckpointError(f"{path}: rescale_factor {p['rescale_factor']} is not supported (1/255)")
    mean, std = p.get("image_mean", CLIP_MEAN), p.get("image_std", CLIP_STD)
    if len(mean) != 3 or len(std) != 3:
        raise CheckpointError(f"{path}: image_mean {mean!r} / image_std {std!r} need three values (RGB)")
    return mean, std


def _check_tokenizer(path: Path, tokenizer, config: dict, rows: int) -> None:
    """The tokenizer belongs to these weights: every token has an embedding row, the vision tokens are the
    ids config.json names, and there is a chat template (tokenizer_config.json, or the processor's
    chat_template.json / chat_template.jinja, which the Hub's Qwen2.5-VL folders carry)."""
    if len(tokenizer) > rows:
        raise CheckpointError(f"{path}: the tokenizer has {len(tokenizer):,} tokens, the LLM's input embedding "
                              f"{rows:,} rows: the tokenizer files and the weights are of different models")
    for key, token in (("video_token_id", VIDEO_PAD), ("image_token_id", IMAGE_PAD),
                       ("vision_start_token_id", VISION_START), ("vision_end_token_id", VISION_END)):
        if key in config and tokenizer.convert_tokens_to_ids(token) != config[key]:
            raise CheckpointError(f"{path / 'config.json'}: {key} {config[key]} but the tokenizer has {token} at "
                                  f"{tokenizer.convert_tokens_to_ids(token)}")
    if not tokenizer.chat_template:
        for name in ("chat_template.jinja", "chat_template.json"):
            file = path / name
            if file.is_file():
                text = file.read_text()
                tokenizer.chat_template = read_json(file)["chat_template"] if name.endswith(".json") else text
                break
        else:
            raise CheckpointError(f"{path}: no chat template (tokenizer_config.json chat_template, "
                                  "chat_template.jinja or chat_template.json)")
