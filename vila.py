"""The VILA family (LongVILA, LongVILA-R1, NVILA): its checkpoint layout, its projector, how its frames
become prompt rows. model.VideoLM calls this file through the family interface (see model.py).

    frames [T, H, W, 3] uint8
      -> vision tower (SigLIP)     hidden layer `mm_vision_select_layer` (-2: before the last layer and
                                   the post-layernorm), every patch kept          [T, P, C]
      -> mm_projector              k x k patch blocks (zero-padded grid), then an MLP  [T, tokens_per_frame, D]
      -> video encoder             basic: "\n" after every frame; TSP: groups of frames mean-pooled first
         (an image is one frame through the image encoder: its tokens, then "\n", never pooled)
      -> spliced into the chat prompt where the video placeholder is, then the causal LM (Qwen2), whose
         positions are plain 0..L-1 over text and video alike

| release model  | projector                | tower           | patch grid | tokens per frame (+ "\n") |
|----------------|--------------------------|-----------------|------------|---------------------------|
| LongVILA-R1-7B | `mlp_downsample_2x2_fix` | SigLIP 448 px   | 32 x 32    | 256 (257)                 |
| LongVILA-7B    | `mlp_downsample`         | SigLIP 384 px   | 27 x 27    | 196 (197)                 |
| NVILA-Lite     | `mlp_downsample_3x3_fix` | SigLIP 448 px   | 32 x 32    | 121 (122)                 |

A checkpoint is a folder in the release layout, read as it is (no conversion) and written back the same way:

    config.json     model_type "vila" (or a training-style "LlavaLlamaModel" file): select layer and feature,
                    image_aspect_ratio, num_video_frames, fps, video_encoder, llm_cfg / vision_tower_cfg /
                    mm_projector_cfg dumps, model_dtype, chat_template (null: the tokenizer's)
    llm/            a plain Hugging Face Qwen2ForCausalLM + tokenizer (ChatML template): vLLM loads it as is
    vision_tower/   SiglipVisionModel (keys vision_model.*) + preprocessor_config.json
    mm_projector/   config.json (mm_projector_type) + model.safetensors (keys layers.N.*)
"""
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from checkpoint import (CheckpointError, check_weights, from_pretrained, read_json, shard_numel,
                        write_tokenizer)

log = logging.getLogger("vila")

# Tiny models for a CPU. head_dim stays 32: vLLM's CPU attention rejects 16.
PRESETS = {
    "tiny": dict(
        image_size=32, patch_size=8,  # 4x4 patches -> 2x2 blocks -> 4 tokens per frame
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
        llm=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
        vocab_size=1024,
    ),
    "small": dict(
        image_size=64, patch_size=8,  # 8x8 patches -> 16 tokens per frame
        vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
        llm=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2),
        vocab_size=2048,
    ),
}
VIDEO_TOKEN = "<vila/video>"  # where the prompt text holds the video
IMAGE_TOKEN = "<image>"       # and an image
MEDIA_TOKENS = ["[BOS]", "[PAD]", "<vila/sentinel>", IMAGE_TOKEN, VIDEO_TOKEN]  # VILA appends these to the vocabulary
PLACEHOLDERS = {"video": VIDEO_TOKEN, "image": IMAGE_TOKEN, "text": ""}  # a prompt's media -> its token
# ChatML as Qwen2's tokenizers write it: a default system turn when the conversation has none.
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

PROJECTOR_DOWNSAMPLE = {"mlp_downsample": 2, "mlp_downsample_2x2_fix": 2, "mlp_downsample_3x3_fix": 3}
BLOCK_ORDERS = ("row", "column")


@dataclass
class VilaConfig:
    """How frames become LLM input rows: read from the checkpoint's three config files.

    Everything here decides the video embeddings, so the video-embedding cache keys on all of it.
    """
    image_size: int       # frames are resized to image_size x image_size
    patch_size: int
    vision_hidden: int    # C, the tower's width (mm_hidden_size)
    llm_hidden: int       # D, the LLM's width (hidden_size)
    projector: str = "mlp_downsample_2x2_fix"  # mm_projector_type
    block_order: str = "row"   # token order of the k x k blocks; "column" = mlp_downsample before 2024-12
    select_layer: int = -2     # SigLIP hidden_states index (mm_vision_select_layer)
    temporal_pool: int = 1     # frames mean-pooled per step: 1 = basic video encoder, > 1 = TSP
    frame_separator: str = "\n"  # text whose embedding follows every frame (every pooled step)
    image_separator: str = "\n"  # text whose embedding follows an image (the image encoder's end_tokens)
    family: str = "vila"

    @property
    def grid(self) -> int:
        """Patches per side: 448 / 14 = 32, 384 / 14 = 27."""
        return self.image_size // self.patch_size

    @property
    def downsample(self) -> int:
        return PROJECTOR_DOWNSAMPLE[self.projector]

    @property
    def tokens_per_frame(self) -> int:
        """ceil(grid / k)^2: 256 at 32x32 with 2x2, 196 at 27x27 (zero-padded to 28x28), 121 with 3x3."""
        return math.ceil(self.grid / self.downsample) ** 2

    # what every family's config says (model.VideoLM and mrsp.py read these): the tower encodes frames
    # in steps of `frames_per_step`, each `tokens_per_step` rows of `llm_hidden` values
    frames_per_step = 1

    @property
    def tokens_per_step(self) -> int:
        return self.tokens_per_frame


# ---- projector ----

class DownSample(nn.Module):
    """Each k x k block of a frame's square patch grid -> one token of k*k*C channels.

    A grid side that k does not divide gets zero rows at the bottom and zero columns on the right. A token's
    channels are its block's patches in row-major order: for k = 2, patches (r, c), (r, c+1), (r+1, c),
    (r+1, c+1). The tokens follow the blocks row by row ("row") or column by column ("column").
    Example: 27x27 patches, k = 2 -> padded to 28x28 -> 14 x 14 = 196 tokens of 4C channels.
    """

    def __init__(self, k: int, block_order: str):
        super().__init__()
        self.k, self.block_order = k, block_order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, P, C = x.shape
        g, k = math.isqrt(P), self.k
        if g * g != P:
            raise ValueError(f"{P} patch features per frame do not form a square grid")
        n = math.ceil(g / k)                                                   # blocks per side
        x = F.pad(x.view(T, g, g, C), (0, 0, 0, n * k - g, 0, n * k - g))     # [T, g, g, C] -> [T, nk, nk, C]
        x = x.view(T, n, k, n, k, C)                    # [T, block row, row in block, block col, col in block, C]
        if self.block_order == "row":
            x = x.permute(0, 1, 3, 2, 4, 5)             # [T, block row, block col, k, k, C]
        else:
            x = x.permute(0, 3, 1, 2, 4, 5)             # [T, block col, block row, k, k, C]
        return x.reshape(T, n * n, k * k * C)           # [T, n*n, k*k*C]


class MultimodalProjector(nn.Module):
    """The release's mm_projector: one nn.Sequential `layers`, so its weights are named layers.N.*.

    2x2 types (mlp_downsample, mlp_downsample_2x2_fix):
        [DownSample(2), LayerNorm(4C), Linear(4C, D), GELU, Linear(D, D)]        -> layers.1, 2, 4
    mlp_downsample_3x3_fix:
        [DownSample(3), LayerNorm(9C), Linear(9C, 3C), GELU, LayerNorm(3C), Linear(3C, D), GELU, Linear(D, D)]
                                                                                 -> layers.1, 2, 4, 5, 7
    GELU is the exact one, 0.5 x (1 + erf(x / sqrt 2)). Patch features [T, P, C] -> [T, tokens_per_frame, D].
    """

    def __init__(self, projector_type: str, vision_hidden: int, llm_hidden: int, block_order: str = "row"):
        super().__init__()
        C, D = vision_hidden, llm_hidden
        if PROJECTOR_DOWNSAMPLE[projector_type] == 2:
            layers = [DownSample(2, block_order), nn.LayerNorm(4 * C), nn.Linear(4 * C, D), nn.GELU(), nn.Linear(D, D)]
        else:
            layers = [DownSample(3, block_order), nn.LayerNorm(9 * C), nn.Linear(9 * C, 3 * C), nn.GELU(),
                      nn.LayerNorm(3 * C), nn.Linear(3 * C, D), nn.GELU(), nn.Linear(D, D)]
        self.layers = nn.Sequential(*layers)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        return self.layers(patch_features)                                     # [T, P, C] -> [T, tpf, D]



class VilaFamily:
    """Everything particular to LongVILA / LongVILA-R1 / NVILA, behind the family interface model.py
    describes. Positions are plain: 0..L-1 over text and video alike (`position_axes` 1)."""

    name = "vila"
    position_axes = 1
    needs_timestamps = False  # positions do not depend on when the frames were taken
    special_tokens = MEDIA_TOKENS  # VILA appends its media tokens to the LLM's tokenizer
    chat_template = CHATML_TEMPLATE
    presets = PRESETS

    # ---- frames -> features -> rows ----

    @staticmethod
    def encode_frames(model, frames) -> torch.Tensor:
        """uint8 frames [t, H, W, 3] -> projector outputs [t * tokens_per_frame, D]."""
        features = VilaFamily.frame_features(model, VilaFamily.pixel_values(model, frames))   # [t, P, C]
        return model.mm_projector(features).flatten(0, 1)                                    # [t * tpf, D]

    @staticmethod
    def pixel_values(model, frames) -> torch.Tensor:
        """uint8 frames [t, H, W, 3] (numpy or torch) -> SigLIP input [t, 3, H, W]: x / 255, mean = std = 0.5."""
        frames = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames)
        T, H, W, _ = frames.shape
        size = model.config.image_size
        if H != size or W != size:
            raise ValueError(f"frames are {H}x{W}, the vision tower expects {size}x{size}")
        dtype = next(model.vision_tower.parameters()).dtype
        x = frames.to(model.device).permute(0, 3, 1, 2).to(dtype)    # [t, 3, H, W]
        return x / 127.5 - 1.0

    @staticmethod
    def prompt(model, text_before: str, media_embeds: torch.Tensor | None, text_after: str, timestamps=None,
               media: str = "video"):
        """The chat prompt around the media -> (embeddings [L, D], positions [L] = 0..L-1, None: vLLM
        takes the embeddings as they are). A video's rows are `video_rows`, an image's `image_rows`; a
        text prompt (media "text", no embeddings) is the chat text alone."""
        before, after = VilaFamily.chat_text(model.tokenizer, text_before, text_after, media)
        rows = {"video": VilaFamily.video_rows, "image": VilaFamily.image_rows}
        before = model.embed_ids(model.encode_text(before))                       # [Lb, D]
        after = model.embed_ids(model.encode_text(after))                         # [La, D]
        middle = rows[media](model, media_embeds).to(before.dtype) if media != "text" else before[:0]  # [V, D]
        embeds = torch.cat([before, middle, after])                               # [L, D]
        return embeds, torch.arange(len(embeds), device=embeds.device), None

    @staticmethod
    def prompt_length(model, text_before: str, text_after: str, num_frames: int, media: str = "video") -> int:
        """Positions of the prompt `prompt` would build for `num_frames` frames, without building it:
        text + frames / temporal_pool x (tokens_per_frame + separator); an image's tokens_per_frame +
        its separator; text alone."""
        cfg = model.config
        before, after = VilaFamily.chat_text(model.tokenizer, text_before, text_after, media)
        if media == "video":
            per_step = cfg.tokens_per_frame + len(model.encode_text(cfg.frame_separator))
            rows = num_frames // cfg.temporal_pool * per_step
        else:
            rows = (cfg.tokens_per_frame + len(model.encode_text(cfg.image_separator))) * (media == "image")
        return len(model.encode_text(before)) + len(model.encode_text(after)) + rows

    @staticmethod
    def image_rows(model, image_embeds: torch.Tensor) -> torch.Tensor:
        """One image's embeddings [tpf, D] -> its rows in the prompt: the tokens, then the embedding of
        `image_separator` ("\\n"), as the release's image encoder (BasicImageEncoder) lays an image out: a
        one-frame video's rows under the basic video encoder, never pooled by TSP -> [tpf + s, D]."""
        cfg = model.config
        if len(image_embeds) != cfg.tokens_per_frame:
            raise ValueError(f"an image is {cfg.tokens_per_frame} rows, got {len(image_embeds)}")
        sep = model.embed_ids(model.encode_text(cfg.image_separator)).to(image_embeds.dtype)   # [s, D]
        return torch.cat([image_embeds, sep])                                     # [tpf + s, D]

    @staticmethod
    def image_setting(model) -> str:
        """How an image becomes frames, for the embedding cache's key: "image-resize-448" (the picture
        resized whole to the tower's size, config.json image_aspect_ratio "resize"). The release's "dynamic"
        tiling (up to 12 448-px tiles and a thumbnail per image) is not implemented: refused here."""
        aspect = model.release_config.get("image_aspect_ratio", "resize")
        if aspect != "resize":
            where = model.source / "config.json" if model.source is not None else "config.json"
            raise CheckpointError(f"{where}: image_aspect_ratio {aspect!r}: images are read only as 'resize' (the "
                                  "picture resized whole to the tower's size); this checkpoint's dynamic tiling of "
                                  "images is not implemented. Set \"image_aspect_ratio\": \"resize\" in its "
                                  "config.json to train or evaluate on image records (its videos read the same)")
        return f"image-resize-{model.config.image_size}"

    @staticmethod
    def frame_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
        """SigLIP hidden_states[select_layer], every token kept ("cls_patch"; SigLIP has no CLS token).

        hidden_states[i] is the output of the first i encoder layers (0: the patch embeddings), so -2 is the
        second-to-last layer's output, before the last layer and the post-layernorm. The tower runs only
        that far: its layers after it and its post-layernorm are set aside for the call, so the features
        are the forward's own output. (FSDP gathers the tower's weights around its forward and starts its
        backward from the forward's output; features taken from inside the forward would get no gradient.)
        """
        tower = model.vision_tower
        n = model.config.select_layer % (len(tower.encoder.layers) + 1)          # layers before the features
        layers, norm = tower.encoder.layers, tower.post_layernorm
        tower.encoder.layers, tower.post_layernorm = layers[:n], nn.Identity()
        try:
            return tower(pixel_values=pixel_values).last_hidden_state            # [t, P, C]
        finally:
            tower.encoder.layers, tower.post_layernorm = layers, norm

    @staticmethod
    def video_rows(model, video_embeds: torch.Tensor) -> torch.Tensor:
        """Video embeddings [T * tpf, D] -> the video's rows in the prompt.

        Basic encoder: [frame 1 tokens, "\\n", frame 2 tokens, "\\n", ...] -> [T * (tpf + 1), D].
        TSP encoder (temporal_pool p): frames t*p .. t*p+p-1 are averaged token by token first, then the
        "\\n" follows each pooled step -> [T/p * (tpf + 1), D]. The separator is the embedding of
        `frame_separator` (one token for "\\n").
        """
        cfg = model.config
        video = video_embeds.view(-1, cfg.tokens_per_frame, video_embeds.shape[-1])  # [T, tpf, D]
        T, p = len(video), cfg.temporal_pool
        if T % p:
            raise ValueError(f"{T} frames do not make whole groups of {p} for the TSP video encoder: "
                             f"sample a multiple of {p} frames")
        video = video.view(T // p, p, *video.shape[1:]).mean(dim=1)              # [T/p, tpf, D]
        sep = model.embed_ids(model.encode_text(cfg.frame_separator))             # [s, D]
        sep = sep.to(video.dtype).unsqueeze(0).expand(len(video), -1, -1)        # [T/p, s, D]
        return torch.cat([video, sep], dim=1).flatten(0, 1)                       # [T/p * (tpf + s), D]

    @staticmethod
    def chat_text(tokenizer, text_before: str, text_after: str, media: str = "video") -> tuple[str, str]:
        """The chat-template text on either side of the media.

        The user's turn is text_before + <vila/video> (an image: <image>; text: nothing) + text_after,
        stripped as VILA strips it; the tokenizer's template renders it with the assistant's turn opened.
        With Qwen2's ChatML and text_before = "":
            "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n"  | video |
            "You are a helpful ... Question: ...<|im_end|>\\n<|im_start|>assistant\\n"
        A text prompt is all `before`, `after` empty.
        """
        for token in (VIDEO_TOKEN, IMAGE_TOKEN):
            if token in text_before + text_after:
                raise ValueError(f"the prompt text contains the media placeholder {token!r}")
        placeholder = PLACEHOLDERS[media]
        user = (text_before + placeholder + text_after).strip()
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
        if not placeholder:
            return text, ""
        before, after = text.split(placeholder)
        return before, after

    # ---- on disk ----

    @staticmethod
    def is_complete(path: Path) -> bool:
        return all((path / p).exists() for p in
                   ("config.json", "llm/config.json", "vision_tower/config.json", "mm_projector/model.safetensors"))

    @staticmethod
    def llm_folder(path: Path) -> Path:
        """The LLM's weights in the Hugging Face layout (lm_head.weight among them), what vLLM loads: llm/."""
        return path / "llm"

    @staticmethod
    def engine_weight_name(name: str) -> str:
        """`model.llm`'s parameter names are llm/'s tensor names already."""
        return name

    @staticmethod
    def build(model_class: type, preset: str, tokenizer, seed: int = 0, attn_implementation: str = "sdpa"):
        return build_from_preset(model_class, preset, tokenizer, seed, attn_implementation)

    @staticmethod
    def describe(model) -> str:
        """One line for `model.py info`."""
        c = model.config
        count = lambda module: sum(p.numel() for p in module.parameters())
        encoder = "basic" if c.temporal_pool == 1 else f"TSP (pool {c.temporal_pool} frames)"
        return (f"VILA: vision tower {count(model.vision_tower):,} params ({c.grid}x{c.grid} patches of "
                f"{c.image_size}px, hidden layer {c.select_layer}), projector {c.projector} ({c.block_order}-major "
                f"blocks) {count(model.mm_projector):,}, llm {count(model.llm):,} ({model.llm.config.model_type}); "
                f"{c.tokens_per_frame} tokens per frame + separator, {encoder} video encoder; frames as released: "
                f"num_video_frames {model.release_config.get('num_video_frames')}, "
                f"fps {model.release_config.get('fps')}")

    @staticmethod
    def read_config(path: Path, config: dict, block_order: str | None = None) -> VilaConfig:
        """config.json, vision_tower/config.json and mm_projector/config.json -> VilaConfig, checked."""
        where = path / "config.json"
        projector_cfg = read_json(path / "mm_projector" / "config.json")
        vision_cfg = read_json(path / "vision_tower" / "config.json")
        llm_cfg = read_json(path / "llm" / "config.json")

        projector = projector_cfg.get("mm_projector_type")
        if projector not in PROJECTOR_DOWNSAMPLE:
            raise CheckpointError(f"{path / 'mm_projector' / 'config.json'}: mm_projector_type {projector!r} is not "
                                  f"supported (supported: {', '.join(PROJECTOR_DOWNSAMPLE)})")
        order = block_order or projector_cfg.get("block_order") or \
            ("column" if projector == "mlp_downsample" else "row")
        if order not in BLOCK_ORDERS or (projector != "mlp_downsample" and order != "row"):
            raise CheckpointError(f"{path / 'mm_projector' / 'config.json'}: block order {order!r} for "
                                  f"{projector} (mlp_downsample takes 'row' or 'column', the _fix types 'row')")
        if projector == "mlp_downsample" and not (block_order or projector_cfg.get("block_order")):
            log.warning("%s: mlp_downsample with no block order given: reading its blocks column by column, as "
                        "the VILA code released with LongVILA (2024-08) did. A model trained with VILA code from "
                        "2024-12 on is row by row: set \"block_order\": \"row\" in mm_projector/config.json",
                        path)

        if vision_cfg.get("model_type") not in ("siglip_vision_model", "siglip"):
            raise CheckpointError(f"{path / 'vision_tower' / 'config.json'}: model_type "
                                  f"{vision_cfg.get('model_type')!r}; only SigLIP towers are supported")
        vision_cfg = vision_cfg.get("vision_config", vision_cfg)
        image_size, patch_size = vision_cfg.get("image_size"), vision_cfg.get("patch_size")
        if not isinstance(image_size, int) or not isinstance(patch_size, int) or image_size % patch_size:
            raise CheckpointError(f"{path / 'vision_tower' / 'config.json'}: image_size {image_size!r} with "
                                  f"patch_size {patch_size!r} does not give a square grid of whole patches")
        layers = vision_cfg.get("num_hidden_layers", 12)

        feature = config.get("mm_vision_select_feature")
        if feature != "cls_patch":
            raise CheckpointError(f"{where}: mm_vision_select_feature {feature!r} is not supported (only "
                                  "'cls_patch': every SigLIP token)")
        layer = config.get("mm_vision_select_layer")
        if not isinstance(layer, int) or not -(layers + 1) <= layer <= layers:
            raise CheckpointError(f"{where}: mm_vision_select_layer {layer!r} is not a hidden layer of the "
                                  f"{layers}-layer tower (-{layers + 1} .. {layers})")
        aspect = config.get("image_aspect_ratio")
        if aspect not in ("resize", "dynamic"):  # video frames: "dynamic" tiles images only, frames are resized
            raise CheckpointError(f"{where}: image_aspect_ratio {aspect!r} is not supported for video frames "
                                  "('resize' or 'dynamic': each frame resized whole to the tower's image size)")
        _check_preprocessor(path / "vision_tower" / "preprocessor_config.json", image_size)
        pool, separator = _video_encoder(config.get("video_encoder"), where)
        image_separator = _image_encoder(config.get("image_encoder"), where)

        for key, value, part in (("hidden_size", llm_cfg.get("hidden_size"), "llm/config.json"),
                                 ("mm_hidden_size", vision_cfg.get("hidden_size"), "vision_tower/config.json")):
            if config.get(key) is not None and config[key] != value:
                raise CheckpointError(f"{where}: {key} {config[key]} disagrees with {part} ({value})")
        return VilaConfig(image_size, patch_size, vision_cfg["hidden_size"], llm_cfg["hidden_size"],
                             projector=projector, block_order=order, select_layer=layer, temporal_pool=pool,
                             frame_separator=separator, image_separator=image_separator)

    @staticmethod
    def load(model_class: type, path: Path, config: dict, dtype, device, attn_implementation: str,
             block_order: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipVisionConfig, SiglipVisionModel
        vlm_config = VilaFamily.read_config(path, config, block_order)
        llm = from_pretrained(AutoModelForCausalLM, path / "llm", dtype=dtype,
                              attn_implementation=attn_implementation)
        vision_config = SiglipVisionConfig.from_pretrained(path / "vision_tower")
        # the pooling head is never used; a tower saved without it loads without one
        vision_config.vision_use_head = any(".head." in f".{k}" for k in check_weights(path / "vision_tower"))
        vision = from_pretrained(SiglipVisionModel, path / "vision_tower", config=vision_config, dtype=dtype,
                                 attn_implementation="eager" if attn_implementation == "eager" else "sdpa")
        projector = MultimodalProjector(vlm_config.projector, vlm_config.vision_hidden, vlm_config.llm_hidden,
                                        vlm_config.block_order)
        _load_projector(projector, path / "mm_projector" / "model.safetensors")
        for file in sorted((path / "llm").glob("tokenizer*.json")):  # a cut-short one is named, not a parse error
            read_json(file)
        tokenizer = AutoTokenizer.from_pretrained(path / "llm")
        rows = llm.get_input_embeddings().num_embeddings
        # Every token needs a row. Rows past the tokenizer are padding (Qwen2 pads 151,665 tokens to 152,064
        # rows; VILA resizes to the tokenizer after appending its media tokens): they are never looked up.
        if len(tokenizer) > rows:
            raise CheckpointError(f"{path / 'llm'}: the tokenizer has {len(tokenizer):,} tokens, the LLM's input "
                                  f"embedding {rows:,} rows, so some tokens have no embedding: the tokenizer files "
                                  "and the weights are of different models; re-download the folder")
        if not tokenizer.chat_template:
            raise CheckpointError(f"{path / 'llm'}: the tokenizer has no chat template (tokenizer_config.json "
                                  f"chat_template); config.json chat_template is {config.get('chat_template')!r}")
        return model_class(vlm_config, vision, projector.to(dtype), llm, tokenizer, release_config=config,
                           source=path).to(device)

    @staticmethod
    def write(model, folder: Path, state_dict: dict):
        part = lambda prefix: {k[len(prefix):]: v.detach().cpu().contiguous()
                               for k, v in state_dict.items() if k.startswith(prefix)}
        llm_weights = part("llm.")
        dtype = next(iter(llm_weights.values())).dtype  # (save_pretrained empties the dict)
        # a sharded release is written back in its shards; "50GB" (Hugging Face's default) is one file
        shard = shard_numel(model.source / "llm") if model.source is not None else None
        model.llm.save_pretrained(folder / "llm", state_dict=llm_weights,
                                  max_shard_size=shard * dtype.itemsize if shard else "50GB")
        write_tokenizer(model.tokenizer, folder / "llm")

        tower = folder / "vision_tower"
        tower.mkdir(parents=True, exist_ok=True)
        model.vision_tower.config.architectures = ["SiglipVisionModel"]
        model.vision_tower.config.save_pretrained(tower)
        save_file({f"vision_model.{k}": v for k, v in part("vision_tower.").items()},
                  str(tower / "model.safetensors"), metadata={"format": "pt"})
        size = model.config.image_size
        (tower / "preprocessor_config.json").write_text(json.dumps(dict(
            image_processor_type="SiglipImageProcessor", do_resize=True, size=dict(height=size, width=size),
            resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
            image_mean=[0.5] * 3, image_std=[0.5] * 3), indent=2))

        (folder / "mm_projector").mkdir(parents=True, exist_ok=True)
        projector_cfg = VilaFamily.projector_config(model.config)
        (folder / "mm_projector" / "config.json").write_text(json.dumps(projector_cfg, indent=2))
        save_file(part("mm_projector."), str(folder / "mm_projector" / "model.safetensors"), metadata={"format": "pt"})

        if model.source is not None:  # the release's own code (trust_remote_code) travels with its weights
            for file in model.source.glob("*.py"):
                shutil.copy2(file, folder / file.name)
        config = VilaFamily.release_config(model, projector_cfg, dtype)
        (folder / "config.json").write_text(json.dumps(config, indent=2))  # last: marks complete

    @staticmethod
    def projector_config(cfg: VilaConfig) -> dict:
        out = dict(architectures=["MultimodalProjector"], model_type="v2l_projector", mm_projector_type=cfg.projector)
        if cfg.projector == "mlp_downsample":  # the type name alone does not say (see read_config)
            out["block_order"] = cfg.block_order
        return out

    @staticmethod
    def release_config(model, projector_cfg: dict, dtype: torch.dtype) -> dict:
        """The top-level config.json: the loaded one with every key that describes the model rewritten."""
        cfg = model.config
        out = dict(model.release_config)
        for key, value in dict(architectures=["VILAForCausalLM"], model_type="vila", image_aspect_ratio="resize",
                               num_video_frames=16, fps=0.0, chat_template=None).items():
            out.setdefault(key, value)  # a model built here: the release's defaults
        encoder = {"_target_": "llava.model.encoders.BasicVideoEncoder"} if cfg.temporal_pool == 1 else \
            {"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[cfg.temporal_pool, 1, 1]]}
        if cfg.frame_separator != "\n":
            encoder["end_tokens"] = cfg.frame_separator
        image_encoder = {"_target_": "llava.model.encoders.BasicImageEncoder"}
        if cfg.image_separator != "\n":
            image_encoder["end_tokens"] = cfg.image_separator
        out.update(hidden_size=cfg.llm_hidden, mm_hidden_size=cfg.vision_hidden,
                   mm_vision_select_layer=cfg.select_layer, mm_vision_select_feature="cls_patch",
                   mm_projector_type=cfg.projector, video_encoder=json.dumps(encoder),
                   image_encoder=json.dumps(image_encoder),
                   llm_cfg=model.llm.config.to_dict(), vision_tower_cfg=model.vision_tower.config.to_dict(),
                   mm_projector_cfg=projector_cfg, model_dtype=str(dtype))
        return out


def _video_encoder(value, where: Path) -> tuple[int, str]:
    """config.json's video_encoder (a dict, or that dict as a JSON string, or absent) ->
    (temporal pool, frame separator). Basic: (1, "\\n"); TSP with pool_sizes [[p, 1, 1]]: (p, "\\n")."""
    if value is None:
        return 1, "\n"
    try:
        encoder = json.loads(value) if isinstance(value, str) else dict(value)
    except (json.JSONDecodeError, TypeError, ValueError):
        raise CheckpointError(f"{where}: video_encoder {value!r} is not a JSON object") from None
    target = str(encoder.get("_target_", ""))
    if encoder.get("start_tokens") is not None or encoder.get("sep_tokens") is not None:
        raise CheckpointError(f"{where}: video_encoder {value!r}: start_tokens / sep_tokens are not supported")
    separator = encoder.get("end_tokens", "\n")
    if target.endswith("BasicVideoEncoder"):
        return 1, separator
    pools = encoder.get("pool_sizes")
    if target.endswith("TSPVideoEncoder") and isinstance(pools, list) and len(pools) == 1 \
            and len(pools[0]) == 3 and list(pools[0][1:]) == [1, 1] and int(pools[0][0]) >= 1:
        return int(pools[0][0]), separator
    raise CheckpointError(f"{where}: video_encoder {value!r} is not supported (BasicVideoEncoder, or "
                          "TSPVideoEncoder with one temporal pool size [[p, 1, 1]])")


def _image_encoder(value, where: Path) -> str:
    """config.json's image_encoder (a dict, or that dict as a JSON string, or absent) -> the text after an
    image: BasicImageEncoder's end_tokens, "\n" unless it says otherwise."""
    if value is None:
        return "\n"
    try:
        encoder = json.loads(value) if isinstance(value, str) else dict(value)
    except (json.JSONDecodeError, TypeError, ValueError):
        raise CheckpointError(f"{where}: image_encoder {value!r} is not a JSON object") from None
    if not str(encoder.get("_target_", "")).endswith("BasicImageEncoder") or encoder.get("start_tokens") is not None:
        raise CheckpointError(f"{where}: image_encoder {value!r} is not supported (BasicImageEncoder, no start_tokens)")
    return encoder.get("end_tokens", "\n")


def _check_preprocessor(path: Path, image_size: int) -> None:
    """Frames are scaled x / 255 and normalised with mean = std = 0.5 (to [-1, 1]) at the tower's size."""
    if not path.is_file():
        return
    p = json.loads(path.read_text())
    size = p.get("size", {})
    checks = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    for key, want in checks.items():
        if key in p and not np.allclose(p[key], want):
            raise CheckpointError(f"{path}: {key} {p[key]} is not supported (frames are normalised with {want})")
    if "rescale_factor" in p and not math.isclose(p["rescale_factor"], 1 / 255):
        raise CheckpointError(f"{path}: rescale_factor {p['rescale_factor']} is not supported (1/255)")
    if isinstance(size, dict) and {size.get("height", image_size), size.get("width", image_size)} != {image_size}:
        raise CheckpointError(f"{path}: size {size} disagrees with the tower's image_size {image_size}")



def _load_projector(projector: MultimodalProjector, file: Path) -> None:
    check_weights(file)
    weights = load_file(str(file))
    own = projector.state_dict()
    problems = [f"{k} is missing" for k in sorted(set(own) - set(weights))]
    problems += [f"{k} is not a weight of this projector" for k in sorted(set(weights) - set(own))]
    problems += [f"{k} has shape {list(weights[k].shape)}, needs {list(v.shape)}" for k, v in own.items()
                 if k in weights and weights[k].shape != v.shape]
    if problems:
        raise CheckpointError(f"{file}: " + "; ".join(problems[:5]) + " (shapes follow mm_projector_type, "
                              "mm_hidden_size and hidden_size)")
    projector.load_state_dict(weights)


def build_from_preset(model_class: type, preset: str, tokenizer, seed: int = 0, attn_implementation: str = "sdpa"):
    """A randomly initialised VideoLM of the preset's sizes, with `tokenizer`'s vocabulary: SigLIP (hidden
    layer -2) -> mlp_downsample_2x2_fix -> Qwen2, LongVILA-R1's architecture in miniature."""
    from transformers import AutoModelForCausalLM, Qwen2Config, SiglipVisionConfig, SiglipVisionModel
    p = PRESETS[preset]
    torch.manual_seed(seed)
    vision = SiglipVisionModel(SiglipVisionConfig(image_size=p["image_size"], patch_size=p["patch_size"],
                                                  vision_use_head=False, **p["vision"]))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    llm_config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=32768, tie_word_embeddings=False,
                             bos_token_id=None, eos_token_id=eos, pad_token_id=pad, **p["llm"])
    llm = AutoModelForCausalLM.from_config(llm_config, attn_implementation=attn_implementation)
    llm.generation_config.bos_token_id, llm.generation_config.eos_token_id = None, eos
    llm.generation_config.pad_token_id = pad
    config = VilaConfig(p["image_size"], p["patch_size"], p["vision"]["hidden_size"], p["llm"]["hidden_size"])
    projector = MultimodalProjector(config.projector, config.vision_hidden, config.llm_hidden, config.block_order)
    return model_class(config, vision, projector, llm, tokenizer)


def build_from_pretrained(model_class: type, llm_path, vision_path, seed: int = 0, dtype=torch.bfloat16,
                          projector: str = "mlp_downsample_2x2_fix", block_order: str = "row",
                          temporal_pool: int = 1):
    """Assemble a VideoLM from a pretrained causal LM and SigLIP (the LongVILA recipe); the projector is new.

    As VILA does, the media tokens are appended to the tokenizer and the LLM's vocabulary is resized to it.
    A tokenizer without a chat template gets ChatML.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel
    torch.manual_seed(seed)
    llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(llm_path)
    tokenizer.add_tokens([t for t in MEDIA_TOKENS if t not in tokenizer.get_vocab()], special_tokens=True)
    tokenizer.chat_template = tokenizer.chat_template or CHATML_TEMPLATE
    llm.resize_token_embeddings(len(tokenizer))
    vision = SiglipVisionModel.from_pretrained(vision_path, dtype=dtype)
    vc = vision.config
    if vc.image_size % vc.patch_size:
        raise CheckpointError(f"{vision_path}: image_size {vc.image_size} is not a whole number of "
                              f"{vc.patch_size}-pixel patches")
    config = VilaConfig(vc.image_size, vc.patch_size, vc.hidden_size, llm.config.hidden_size,
                        projector=projector, block_order=block_order, temporal_pool=temporal_pool)
    mm_projector = MultimodalProjector(projector, config.vision_hidden, config.llm_hidden, block_order).to(dtype)
    return model_class(config, vision, mm_projector, llm, tokenizer)
