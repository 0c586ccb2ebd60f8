"""VideoLM: a video vision-language model in the VILA release layout (LongVILA, LongVILA-R1, NVILA).

    frames [T, H, W, 3] uint8
      -> vision tower (SigLIP)     hidden layer `mm_vision_select_layer` (-2: before the last layer and
                                   the post-layernorm), every patch kept          [T, P, C]
      -> mm_projector              k x k patch blocks (zero-padded grid), then an MLP  [T, tokens_per_frame, D]
      -> video encoder             basic: "\n" after every frame; TSP: groups of frames mean-pooled first
      -> spliced into the chat prompt where the video placeholder is, then the causal LM (Qwen2)

| release model  | projector                | tower           | patch grid | tokens per frame (+ "\n") |
|----------------|--------------------------|-----------------|------------|---------------------------|
| LongVILA-R1-7B | `mlp_downsample_2x2_fix` | SigLIP 448 px   | 32 x 32    | 256 (257)                 |
| LongVILA-7B    | `mlp_downsample`         | SigLIP 384 px   | 27 x 27    | 196 (197)                 |
| NVILA-Lite     | `mlp_downsample_3x3_fix` | SigLIP 448 px   | 32 x 32    | 121 (122)                 |

Everything downstream (MR-SP, rollout, SFT, RL, eval) goes through a few calls: `encode_video`,
`prompt_embeds`, `build_sequence_batch` (one sequence per row) or `build_packed_batch` (a GRPO group
per row, its prompt once: `shared_prefix_attention`), and `token_logprobs`.

A checkpoint is a folder in the release layout, read as it is (no conversion) and written back the same way:

    config.json     model_type "vila" (or a training-style "LlavaLlamaModel" file): select layer and feature,
                    image_aspect_ratio, num_video_frames, fps, video_encoder, llm_cfg / vision_tower_cfg /
                    mm_projector_cfg dumps, model_dtype, chat_template (null: the tokenizer's)
    llm/            a plain Hugging Face Qwen2ForCausalLM + tokenizer (ChatML template): vLLM loads it as is
    vision_tower/   SiglipVisionModel (keys vision_model.*) + preprocessor_config.json
    mm_projector/   config.json (mm_projector_type) + model.safetensors (keys layers.N.*)

Everything that is particular to one model family (how frames become features, how the video goes into
the prompt, the layout on disk) lives in one class, `VilaFamily`; a second family (e.g. Qwen2.5-VL) is a
second such class chosen by `family_of`.

Run:
    python model.py init --out runs/init --preset tiny --data data/synth/train.jsonl
    python model.py init --out runs/init --llm PATH/Qwen2-7B-Instruct --vision-tower PATH/siglip-so400m-patch14-384
    python model.py info PATH/LongVILA-R1-7B
"""
import argparse
import contextlib
import functools
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import errors

log = logging.getLogger("model")

IGNORE = -100  # target id of positions that carry no loss (prompt, video, padding)

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
SPECIAL_TEXT_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
VIDEO_TOKEN = "<vila/video>"  # where the prompt text holds the video
MEDIA_TOKENS = ["[BOS]", "[PAD]", "<vila/sentinel>", "<image>", VIDEO_TOKEN]  # VILA appends these to the vocabulary
# ChatML as Qwen2's tokenizers write it: a default system turn when the conversation has none.
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATML_TEXT = "system\nYou are a helpful assistant.\nuser\nassistant\n"  # its words, for a tokenizer corpus

# Patch-block side k of each projector type; "row"/"column" is the order of the blocks' tokens.
PROJECTOR_DOWNSAMPLE = {"mlp_downsample": 2, "mlp_downsample_2x2_fix": 2, "mlp_downsample_3x3_fix": 3}
BLOCK_ORDERS = ("row", "column")


class CheckpointError(errors.UserError, ValueError):
    """A folder that is not a checkpoint we can read faithfully; the message names the file and the value."""


@dataclass
class VideoLMConfig:
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


def default_attn_implementation(dtype=torch.bfloat16) -> str:
    """flash_attention_2 for bf16/fp16 weights on a GPU with flash-attn installed, sdpa otherwise.
    fp32 weights (trained under --bf16 autocast) get sdpa: a rollout or eval pass outside autocast
    would hand flash-attn fp32 tensors, which it refuses; SDPA picks a flash kernel itself where it can."""
    from transformers.utils import is_flash_attn_2_available
    if dtype in (torch.bfloat16, torch.float16) and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


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


# ---- the batches the log-prob passes consume ----

@dataclass
class SequenceBatch:
    """Right-padded full sequences (prompt + response), one per row. Right padding needs no attention
    mask under a causal LM: a real token never attends to the padding after it.
    Built for sequence parallelism (sp_size > 1), `inputs_embeds` holds only SP rank `sp_rank`'s
    contiguous slice [B, S/sp, D]; targets and position_ids always cover the whole rows."""
    inputs_embeds: torch.Tensor  # [B, S, D], or [B, S/sp, D]
    targets: torch.Tensor        # [B, S] the token predicted at each position; IGNORE where no loss
    position_ids: torch.Tensor   # [B, S]
    sp_rank: int = 0
    sp_size: int = 1

    @property
    def loss_mask(self) -> torch.Tensor:  # [B, S] bool
        return self.targets != IGNORE

    @property
    def num_scored(self) -> int:
        return int(self.loss_mask.sum())

    def scored_rows(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states that predict a target [N, D], the targets [N]) from hidden [B, S, D]."""
        return hidden[self.loss_mask], self.targets[self.loss_mask]

    def place(self, logprobs: torch.Tensor) -> torch.Tensor:
        """Scored log-probs [N] -> [B, S], zero where nothing is scored."""
        out = torch.zeros(self.targets.shape, dtype=logprobs.dtype, device=logprobs.device)
        return out.masked_scatter(self.loss_mask, logprobs)


@dataclass
class GroupLayout:
    """Where a group's pieces sit in its packed row [prompt P][response 1]...[response G][padding].

    Response i starts at `offsets[i]`; its position ids continue from P, as in its own sequence, so
    rotary embeddings see the same positions as in the per-sequence layout.
    Example: P = 4, responses of 2 and 1 tokens -> offsets [4, 6], length 7, positions 0 1 2 3 | 4 5 | 4.
    """
    prompt_len: int
    response_lens: list[int]

    @property
    def offsets(self) -> list[int]:
        return [self.prompt_len + sum(self.response_lens[:i]) for i in range(len(self.response_lens))]

    @property
    def length(self) -> int:
        return self.prompt_len + sum(self.response_lens)

    def position_ids(self, padded_len: int, device=None) -> torch.Tensor:
        """[padded_len]: 0..P-1, then P..P+R_i-1 for each response, then padding positions continuing."""
        P = self.prompt_len
        pieces = [torch.arange(P, device=device)] + [torch.arange(P, P + R, device=device) for R in self.response_lens]
        pad = padded_len - self.length
        pieces.append(torch.arange(P + self.response_lens[-1], P + self.response_lens[-1] + pad, device=device))
        return torch.cat(pieces)


@dataclass
class PackedBatch:
    """Groups packed for the shared-prefix passes: one row per group, [prompt][response 1]...[response G],
    right-padded to a common length S_pad (a multiple of sp), or one sequence-parallel rank's contiguous
    slice of that (n = S_pad / sp positions per row). The prompt runs once per group: P + G*R positions
    instead of G*(P + R). `shared_prefix_attention` keeps each response from seeing the others.

    Log-probs come out per response, [E, R_max] (E responses over all groups, in order), with
    `response_mask` marking real tokens. Response i's token 0 is predicted by the prompt's last position
    (shared by all G responses), token j > 0 by its own position j - 1.
    """
    inputs_embeds: torch.Tensor   # [B, n, D] this rank's slice of the packed rows
    position_ids: torch.Tensor    # [B, n]
    layouts: list[GroupLayout]    # per row, in full-row coordinates (attention sees whole rows)
    score_from: torch.Tensor      # [N] flat index into [B * n]: the local position that predicts a token
    score_targets: torch.Tensor   # [N] the token it predicts
    score_into: torch.Tensor      # [N] flat index into [E * R_max]: where its log-prob goes
    response_mask: torch.Tensor   # [E, R_max] bool, the same on every rank

    @property
    def num_scored(self) -> int:
        return len(self.score_from)

    def scored_rows(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return hidden.flatten(0, 1)[self.score_from], self.score_targets       # [B, n, D] -> [N, D]

    def place(self, logprobs: torch.Tensor) -> torch.Tensor:
        """Scored log-probs [N] -> [E, R_max]; zero where not scored here (another SP rank's, or padding)."""
        out = torch.zeros(self.response_mask.numel(), dtype=logprobs.dtype, device=logprobs.device)
        return out.index_put((self.score_into,), logprobs).view(self.response_mask.shape)


def shared_prefix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            layouts: list[GroupLayout], scaling: float) -> torch.Tensor:
    """Attention over packed rows [prompt P][response 1]...[response G][padding], exactly as each
    response's own sequence [prompt; response i] would see it. query [B, Hq, S, D], key/value
    [B, Hkv, S, D] (Hq a multiple of Hkv, GQA) -> [B, S, Hq, D], the layout transformers expects back.

        prompt queries      attend causally within the prompt (SDPA is_causal: a square, so its
                            top-left alignment is right)
        response i queries  attend to [all P prompt keys ; response i's keys up to themselves]: keys
                            [P + R_i], causal aligned bottom-right, never another response's keys
        padding queries     output 0 (nothing scores them, and no real query attends to them)

    Memory stays bounded at any length: no [S, S] mask is built. Responses go one at a time, each with
    a [R_i, P + R_i] boolean mask (SDPA's is_causal aligns top-left, wrong when queries are the last R_i
    of P + R_i keys); where SDPA has no fused kernel for a mask it builds [Hq, R_i, P + R_i] scores, a
    response's share. On a GPU with flash-attn installed and bf16/fp16 inputs, flash-attn's causal flag
    is aligned bottom-right and needs no mask at all.
    """
    B, Hq, S, D = query.shape
    rows = []
    for b, layout in enumerate(layouts):
        q, k, v = query[b:b + 1], key[b:b + 1], value[b:b + 1]                 # [1, H, S, D]
        P = layout.prompt_len
        pieces = [_attend(q[:, :, :P], k[:, :, :P], v[:, :, :P], scaling, prompt_len=0)]   # [1, Hq, P, D]
        for start, R in zip(layout.offsets, layout.response_lens):
            own = slice(start, start + R)
            keys = torch.cat([k[:, :, :P], k[:, :, own]], dim=2)               # [1, Hkv, P + R, D]
            values = torch.cat([v[:, :, :P], v[:, :, own]], dim=2)             # [1, Hkv, P + R, D]
            pieces.append(_attend(q[:, :, own], keys, values, scaling, prompt_len=P))  # [1, Hq, R, D]
        pieces.append(q.new_zeros(1, Hq, S - layout.length, D))                # padding
        rows.append(torch.cat(pieces, dim=2))                                  # [1, Hq, S, D]
    return torch.cat(rows).transpose(1, 2)                                     # [B, Hq, S, D] -> [B, S, Hq, D]


def _attend(q, k, v, scaling: float, prompt_len: int) -> torch.Tensor:
    """q [1, Hq, R, D] against k/v [1, Hkv, prompt_len + R, D]: every query sees all `prompt_len`
    leading keys and the trailing keys causally (bottom-right aligned) -> [1, Hq, R, D]."""
    R, L = q.shape[2], k.shape[2]
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and _flash_attn_func() is not None:
        out = _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                 softmax_scale=scaling, causal=True)           # [1, R, Hq, D]
        return out.transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    if prompt_len == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
    mask = torch.ones(R, L, dtype=torch.bool, device=q.device)                 # [R, P + R]
    mask[:, prompt_len:] = torch.ones(R, R, dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)


@functools.cache
def _flash_attn_func():
    """flash-attn's `flash_attn_func`, or None. Only a flash-attn that transformers itself accepts
    (>= 2.3.3): before 2.1 its causal mask was aligned top-left when the query is shorter than the keys,
    which would let each response see the wrong keys in `_attend`."""
    from transformers.utils import is_flash_attn_2_available
    if not is_flash_attn_2_available():
        return None
    from flash_attn import flash_attn_func
    return flash_attn_func


class InnerAttentionView:
    """An attention module as an inner attention function must see it when our own attention function
    (shared prefix, Ulysses) wraps transformers' sdpa or flash-attn: a config naming the inner
    implementation (flash-attn reads which kernel to run from `module.config`) and any attribute
    overridden (`num_key_value_groups` on one Ulysses rank); everything else is the module's."""

    def __init__(self, module, config, **overrides):
        self._module, self.config = module, config
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._module, name)


def inner_attention_setup(model_config, wrapped: str) -> tuple[str, object]:
    """(inner implementation, a copy of the LLM config naming it) for an attention function that wraps
    the model's current one. Only sdpa and flash-attn: both take `is_causal` and a causal mask aligned
    bottom-right, which the wrappers rely on."""
    import copy
    inner = model_config._attn_implementation
    if inner != "sdpa" and not inner.startswith("flash_attention"):
        raise ValueError(f"{wrapped} wraps sdpa or flash_attention_*; this model uses {inner!r}: "
                         "load it with attn_implementation='sdpa'")
    inner_config = copy.copy(model_config)
    inner_config._attn_implementation = inner
    return inner, inner_config


# The names registered with transformers for the shared prefix around each attention it wraps. No "flash"
# in them: transformers would take such a name for a flash kernel and try to load one by it.
SHARED_PREFIX = {"sdpa": "shared_prefix", "flash_attention_2": "shared_prefix_fa2",
                 "flash_attention_3": "shared_prefix_fa3"}


def _shared_prefix_attention_fn(module, query, key, value, attention_mask, group_layouts=None, **kwargs):
    """The "shared_prefix*" entry of transformers' AttentionInterface: `shared_prefix_attention`
    for a forward that carries `group_layouts` (a PackedBatch); the wrapped attention (sdpa or flash-attn)
    with transformers' own mask for every other forward (generation, SFT, the per-sequence passes)."""
    if group_layouts is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        inner_config = module.shared_prefix_inner_config
        return ALL_ATTENTION_FUNCTIONS[inner_config._attn_implementation](
            InnerAttentionView(module, inner_config), query, key, value, attention_mask, **kwargs)
    return shared_prefix_attention(query, key, value, group_layouts, module.scaling), None


def enable_shared_prefix(model: "VideoLM") -> None:
    """Let `model.llm` run PackedBatch forwards in one process (sp = 1; under sequence parallelism
    mrsp.enable_ulysses does it). Every other forward runs the model's own attention, sdpa or flash-attn."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    if model.llm.config._attn_implementation in SHARED_PREFIX.values():
        return
    inner, inner_config = inner_attention_setup(model.llm.config, "shared-prefix attention")
    if inner not in SHARED_PREFIX:
        raise ValueError(f"shared-prefix attention does not wrap {inner!r}; use sdpa or flash_attention_2/3")
    name = SHARED_PREFIX[inner]
    AttentionInterface.register(name, _shared_prefix_attention_fn)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    for layer in model.llm.get_decoder().layers:
        layer.self_attn.shared_prefix_inner_config = inner_config
    model.llm.set_attn_implementation(name)


class VideoLM(nn.Module):
    def __init__(self, config: VideoLMConfig, vision_tower: nn.Module, mm_projector: nn.Module,
                 llm: nn.Module, tokenizer, release_config: dict | None = None, source=None):
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector
        self.llm = llm
        self.tokenizer = tokenizer
        self.release_config = release_config or {}  # config.json as loaded: keys we do not use are written back
        self.source = Path(source) if source is not None else None  # the folder it was loaded from

    @property
    def question_prompt(self) -> str | None:
        """The text around each question ("{question}" marks where), as config.json's `question_prompt`
        says; None (a release checkpoint, which has no such key) means LongVILA-R1's thinking prompt."""
        return self.release_config.get("question_prompt")

    def user_turn(self, record, subtitles: str | None = None) -> tuple[str, str]:
        """The user's turn for a record as (text before the video, text after it), in this checkpoint's
        question prompt: data.build_prompt with `template=self.question_prompt`. Training, rollout, eval
        and bench all build prompts here, so the policy, its reference and the evaluation read the same."""
        import data  # here, not at the top: model.py loads without the video readers (decord, PyAV)
        return data.build_prompt(record, subtitles=subtitles, template=self.question_prompt)

    @property
    def family(self) -> type:
        return family_of(self.config.family)

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def freeze_vision(self, dtype: torch.dtype | None = None):
        """LongVILA-R1 keeps the vision tower and projector frozen in RL; then video embeddings can be cached.
        Weights that never train need no fp32 master copy: `dtype` (the compute dtype) stores them in it,
        so frames are encoded in it (bf16 encodes ~10x faster than fp32 on a GPU)."""
        for module in (self.vision_tower, self.mm_projector):
            module.requires_grad_(False)
            if dtype is not None:
                module.to(dtype)

    # ---- video ----

    def pixel_values(self, frames) -> torch.Tensor:
        """uint8 frames [T, H, W, 3] (numpy or torch) -> SigLIP input [T, 3, H, W]: x / 255, mean = std = 0.5."""
        frames = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames)
        T, H, W, _ = frames.shape
        if H != self.config.image_size or W != self.config.image_size:
            raise ValueError(f"frames are {H}x{W}, the vision tower expects "
                             f"{self.config.image_size}x{self.config.image_size}")
        dtype = next(self.vision_tower.parameters()).dtype
        x = frames.to(self.device).permute(0, 3, 1, 2).to(dtype)    # [T, 3, H, W]
        return x / 127.5 - 1.0

    def encode_video(self, frames, chunk_size: int = 32) -> torch.Tensor:
        """Frames [T, H, W, 3] -> video embeddings [T * tokens_per_frame, D]: projector outputs, frame by frame.

        The video encoder ("\\n" rows, TSP pooling) is applied later, in `prompt_embeds`, so these rows can
        be split over ranks by frame (MR-SP stage 1) and cached. Frames go through the tower `chunk_size`
        at a time, so thousands of frames fit in bounded memory; the result is the same as one pass.
        """
        encode = lambda px: self.mm_projector(self.family.frame_features(self, px))  # [t, 3, H, W] -> [t, tpf, D]
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_tower.parameters())
        chunks = []
        for start in range(0, len(frames), chunk_size):
            px = self.pixel_values(frames[start:start + chunk_size])             # [t, 3, H, W]
            # A trainable tower keeps no activations: SigLIP-so400m at 448 px would save ~1.3 GB per frame
            # (350 GB at 256 frames). Each chunk keeps its pixels; backward runs its forward again.
            chunks.append(torch.utils.checkpoint.checkpoint(encode, px, use_reentrant=False) if trains
                          else encode(px))                                        # [t, tpf, D]
        return torch.cat(chunks).flatten(0, 1)                                    # [T * tpf, D]

    # ---- text and splicing ----

    def embed_ids(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.llm.get_input_embeddings()(ids)                               # [L] -> [L, D]

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_embeds(self, text_before: str, video_embeds: torch.Tensor, text_after: str) -> torch.Tensor:
        """The chat prompt with the video in it -> [L, D]: rollout, every training pass and eval use this.

        `text_before` + video + `text_after` is the user's turn (data.build_prompt writes it); the family
        wraps it in the chat template and turns the video embeddings [T * tokens_per_frame, D] into rows
        (VILA: a "\\n" after every frame). Text embeddings are looked up now, from the current LLM, so cached
        video embeddings (projector outputs only) stay valid while the LLM trains.
        """
        before, after = self.family.chat_text(self.tokenizer, text_before, text_after)
        video = self.family.video_rows(self, video_embeds)                        # [V, D]
        before = self.embed_ids(self.encode_text(before))                         # [Lb, D]
        after = self.embed_ids(self.encode_text(after))                           # [La, D]
        return torch.cat([before, video.to(before.dtype), after])                 # [L, D]

    def build_sequence_batch(self, prompt_embeds: list[torch.Tensor], response_ids: list[list[int]],
                             sp_rank: int = 0, sp_size: int = 1) -> SequenceBatch:
        """Prompt embeddings [L_i, D] and response token ids [R_i] -> one right-padded SequenceBatch.

        Position L_i - 1 + j predicts response token j, so targets[i, L_i-1 : L_i-1+R_i] = response.
        Example: prompt of 3 positions, response [7, 8] -> inputs p0 p1 p2 e7 e8, targets _ _ 7 8 _.
        With sp_size > 1 the rows are padded to a multiple of sp_size and only SP rank `sp_rank`'s slice
        of the embeddings is built, from the pieces: no rank holds the full [B, S, D].
        """
        for i, resp in enumerate(response_ids):
            if len(resp) == 0:
                raise ValueError(f"sequence {i}: empty response, nothing to score")
        lengths = [len(p) + len(r) for p, r in zip(prompt_embeds, response_ids)]
        n = -(-max(lengths) // sp_size)                                        # positions per rank: ceil(S / sp)
        S, start, stop = n * sp_size, sp_rank * n, (sp_rank + 1) * n
        rows, targets = [], torch.full((len(lengths), S), IGNORE, dtype=torch.long, device=self.device)  # [B, S]
        for i, (prompt, resp) in enumerate(zip(prompt_embeds, response_ids)):
            L = len(prompt)
            resp = torch.as_tensor(resp, dtype=torch.long, device=self.device)
            row = torch.cat([prompt[min(start, L):min(stop, L)],                        # the window's prompt part
                             self.embed_ids(resp[max(start - L, 0):max(stop - L, 0)]).to(prompt.dtype)])  # [<= n, D]
            rows.append(F.pad(row, (0, 0, 0, n - len(row))))                            # [n, D]
            targets[i, L - 1:L - 1 + len(resp)] = resp
        positions = torch.arange(S, device=self.device).expand(len(rows), S)           # [B, S]
        return SequenceBatch(torch.stack(rows), targets, positions, sp_rank, sp_size)  # [B, S/sp, D], [B, S], [B, S]

    def build_packed_batch(self, prompt_embeds: list[torch.Tensor], response_ids: list[list[list[int]]],
                           sp_rank: int = 0, sp_size: int = 1) -> PackedBatch:
        """Prompt embeddings [P_b, D] and each group's response ids -> SP rank `sp_rank`'s slice of the
        packed rows [prompt][response 1]...[response G] (the whole rows when sp_size = 1).

        Rows are right-padded to S_pad, the longest row rounded up to a multiple of sp_size; this rank
        builds only its n = S_pad / sp_size positions of each row from the pieces, so no rank ever holds
        the full [B, S_pad, D]. Example: prompt of 3 positions, responses [7, 8] and [9] -> one row
        p0 p1 p2 e7 e8 e9 at positions 0 1 2 3 4 3; p2 predicts 7 and 9, e7 predicts 8.
        """
        layouts = []
        for b, (prompt, group) in enumerate(zip(prompt_embeds, response_ids)):
            if not group or any(len(r) == 0 for r in group):
                raise ValueError(f"group {b}: an empty response (or no response): nothing to score")
            layouts.append(GroupLayout(len(prompt), [len(r) for r in group]))
        n = -(-max(layout.length for layout in layouts) // sp_size)            # positions per rank: ceil(S / sp)
        start, stop = sp_rank * n, (sp_rank + 1) * n
        rows, positions = [], []
        for prompt, group, layout in zip(prompt_embeds, response_ids, layouts):
            P = layout.prompt_len
            tokens = torch.as_tensor([t for r in group for t in r], dtype=torch.long, device=self.device)  # [sum R]
            mine = [prompt[min(start, P):min(stop, P)],                        # the prompt's part of the window
                    self.embed_ids(tokens[max(start - P, 0):max(stop - P, 0)]).to(prompt.dtype)]  # the responses'
            row = torch.cat(mine)                                              # [<= n, D]
            rows.append(F.pad(row, (0, 0, 0, n - len(row))))                   # [n, D]
            positions.append(layout.position_ids(n * sp_size, self.device)[start:stop])   # [S_pad] -> [n]
        score_from, score_targets, score_into = [], [], []
        R_max = max(max(layout.response_lens) for layout in layouts)
        e = 0
        for b, (group, layout) in enumerate(zip(response_ids, layouts)):
            for offset, resp in zip(layout.offsets, group):
                src = torch.tensor([layout.prompt_len - 1] + list(range(offset, offset + len(resp) - 1)))  # [R]
                keep = (src >= start) & (src < stop)
                score_from.append(b * n + src[keep] - start)
                score_targets.append(torch.as_tensor(resp)[keep])
                score_into.append(e * R_max + torch.arange(len(resp))[keep])
                e += 1
        response_mask = torch.zeros(e, R_max, dtype=torch.bool)
        for i, R in enumerate(R for layout in layouts for R in layout.response_lens):
            response_mask[i, :R] = True
        to = lambda t: torch.cat(t).to(self.device)
        return PackedBatch(torch.stack(rows), torch.stack(positions), layouts,             # [B, n, D], [B, n]
                           to(score_from), to(score_targets), to(score_into), response_mask.to(self.device))

    # ---- log-probs ----

    def token_logprobs(self, batch: SequenceBatch | PackedBatch, temperature: float = 1.0,
                       block_rows: int = 4096, num_blocks: int | None = None) -> torch.Tensor:
        """Log-prob of every target token under the LLM.

        SequenceBatch -> [B, S], zero where targets == IGNORE. PackedBatch -> [E, R_max] per response,
        zero outside `response_mask` (and, for an SP rank's slice, where another rank scores the token).
        `batch` may be a sequence-parallel shard (mrsp.py): positions then come from `position_ids`.
        The LM head runs only on scored positions (`score_rows`). `num_blocks` fixes how many times it
        runs (some blocks may be empty): under FSDP every rank must make the same calls, however many
        positions its shard scores.
        """
        kwargs = {}
        if isinstance(batch, PackedBatch):
            # The attention takes the layouts; transformers must build no mask (from packed position ids it
            # would build a dense [S, S] one).
            kwargs = dict(group_layouts=batch.layouts,
                          attention_mask={t: None for t in set(self.llm.config.layer_types)})
        hidden = self.llm.get_decoder()(inputs_embeds=batch.inputs_embeds, position_ids=batch.position_ids,
                                        use_cache=False, **kwargs).last_hidden_state   # [B, n, D]
        rows, targets = batch.scored_rows(hidden)                                 # [N, D], [N]
        num_blocks = num_blocks or max(1, math.ceil(len(rows) / block_rows))
        # Even with nothing to score (a sequence-parallel shard that is all video) the result goes through
        # the LM head and the decoder: every rank's graph has the same shape, so backward runs the same
        # collectives (Ulysses all-to-alls, FSDP reduce-scatters) in the same order everywhere.
        return batch.place(self.score_rows(rows, targets, temperature, num_blocks))

    def score_rows(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                   num_blocks: int) -> torch.Tensor:
        """log softmax(lm_head(hidden) / T)[target] for each row: [N, D], [N] -> [N], `num_blocks` row blocks.

        A long video scores thousands of response tokens against a vocabulary of ~152k: a block's fp32
        logits are [n, V] (4096 x 152k = 2.5 GB). With autograd on, each block is checkpointed: backward
        recomputes its logits instead of keeping them, so the head holds one block at a time, however
        many rows are scored (its only saved inputs are views of `hidden` and `targets`).
        """
        lm_head = self.llm.get_output_embeddings()

        def block_logprobs(h, tgt):                                               # [n, D], [n] -> [n]
            # In the head's own dtype, not autocast's: bf16 logits carry 8 bits of mantissa, an error of up
            # to ~0.06 nats at a logit of 25 that would enter every ratio and KL term. Training stores the
            # head in fp32 (the policy's master weights; FSDP gathers it in fp32, see train.shard_model;
            # the reference keeps its head in fp32), so its logits are fp32 whatever the compute dtype.
            with torch.autocast(h.device.type, enabled=False):
                logits = lm_head(h.to(lm_head.weight.dtype)).float() / temperature  # [n, V]
            return torch.log_softmax(logits, dim=-1).gather(1, tgt[:, None]).squeeze(1)

        pieces = []
        for h, tgt in zip(hidden.tensor_split(num_blocks), targets.tensor_split(num_blocks)):  # views, no copies
            if torch.is_grad_enabled():
                pieces.append(torch.utils.checkpoint.checkpoint(block_logprobs, h, tgt, use_reentrant=False))
            else:
                pieces.append(block_logprobs(h, tgt))
        return torch.cat(pieces)                                                  # [N]

    # ---- save / load ----

    def write(self, folder, state_dict: dict | None = None):
        """Write the checkpoint in the release layout into `folder` (not atomic: wrap in `atomic_directory`).

        `state_dict` overrides this module's own weights, e.g. the full weights an FSDP run gathered.
        """
        self.family.write(self, Path(folder), state_dict if state_dict is not None else self.state_dict())

    def save(self, out_dir, state_dict: dict | None = None):
        with atomic_directory(out_dir) as tmp:
            self.write(tmp, state_dict)

    @classmethod
    def load(cls, path, dtype=torch.float32, device="cpu", attn_implementation: str | None = None,
             block_order: str | None = None) -> "VideoLM":
        """A checkpoint folder in the release layout (ours or the paper's) -> VideoLM on `device`.

        `block_order` ("row" / "column") overrides the token order of a plain `mlp_downsample` projector
        (see `VilaFamily.read_config`). Anything we cannot read faithfully is a CheckpointError.
        """
        path = Path(path)
        config = read_json(path / "config.json")
        family = family_of(family_name(config, path))
        return family.load(cls, path, config, dtype=dtype, device=device,
                           attn_implementation=attn_implementation or default_attn_implementation(dtype),
                           block_order=block_order)


def is_complete_checkpoint(path) -> bool:
    path = Path(path)
    return all((path / p).exists() for p in
               ("config.json", "llm/config.json", "vision_tower/config.json", "mm_projector/model.safetensors"))


@contextlib.contextmanager
def atomic_directory(final_path):
    """Yield a temporary folder beside `final_path`; rename it into place only if the block finishes.

    A run killed mid-write leaves a `*.tmp-PID` folder that loaders ignore, never a half checkpoint.
    """
    final = Path(final_path)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # replace: move the old one aside first so a crash never leaves neither
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        hint = "" if path.parent.is_dir() else f" ({path.parent} does not exist)"
        raise CheckpointError(f"{path} not found{hint}: a checkpoint folder holds config.json, llm/, "
                              "vision_tower/ and mm_projector/")
    text = path.read_text()
    if not text.strip():
        raise CheckpointError(f"{path} is empty ({path.stat().st_size} bytes): re-download this file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): re-download this file") from None


# ---- weight files, checked before use ----

# bytes per element of each safetensors dtype
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
CONFIG_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}
REDOWNLOAD = "re-download this file"


def check_weights(path) -> dict[str, Path]:
    """A folder of safetensors weights (or one .safetensors file) -> {tensor name: the file that holds it},
    every file checked from its header before any weight is read. A CheckpointError names the file, its
    size against the size its header (or index) gives, and says to re-download it, for a file that is:

    - cut short or longer than its header says. A safetensors file is [8 bytes: header length n, a
      little-endian u64][n bytes of JSON: {tensor: {dtype, shape, data_offsets: [begin, end]}}][data], so
      its size is 8 + n + the largest end, and each tensor's end - begin = prod(shape) x bytes per element;
    - missing: a sharded folder lists its files in model.safetensors.index.json ({"weight_map": {tensor:
      file}}), and each tensor there must be in its file;
    - of another dtype: a floating-point tensor whose dtype is not the folder's config.json `dtype`
      (`torch_dtype`), e.g. an F32 shard among BF16 ones. Shapes against the config are checked by the
      loaders (`_from_pretrained`, `_load_projector`), which know the model the config describes.

    Example: a 7B LLM's shard 2 of 4 whose download stopped at 1 GB ->
        CheckpointError: llm/model-00002-of-00004.safetensors: 1,073,741,824 bytes, its header says
        3,864,726,320 (cut short): re-download this file
    """
    path = Path(path)
    if path.is_file():
        return dict.fromkeys(_safetensors_header(path), path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map {{tensor: file}}: {REDOWNLOAD}")
        files = sorted({path / f for f in weight_map.values()})
        for file in files:
            if not file.is_file():
                n = sum(path / f == file for f in weight_map.values())
                raise CheckpointError(f"{file} is missing: {index.name} lists it with {n} tensors; {REDOWNLOAD}")
    else:
        weight_map = None
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors weights")
    headers = {file: _safetensors_header(file) for file in files}
    where = {name: file for file, header in headers.items() for name in header}
    for name, file in (weight_map or {}).items():
        if where.get(name) != path / file:
            raise CheckpointError(f"{path / file}: has no tensor {name!r}, which {index.name} puts there: "
                                  f"{REDOWNLOAD}")
    _check_dtypes(path, headers)
    return where


def shard_numel(folder) -> int | None:
    """The most weight elements in one file of a sharded weight folder (its files listed in
    model.safetensors.index.json); None for a folder of one file. Saved with max_shard_size = this x bytes per
    element, the same weights split into the same files in any dtype (a bf16 release trained in fp32):
    Hugging Face fills a shard until the next tensor would not fit."""
    index = Path(folder) / "model.safetensors.index.json"
    if not index.is_file():
        return None
    files = {Path(folder) / f for f in read_json(index)["weight_map"].values()}
    return max(sum(math.prod(t["shape"]) for t in _safetensors_header(f).values()) for f in files)


def _safetensors_header(file: Path) -> dict[str, dict]:
    """One file's header {tensor: {dtype, shape, data_offsets}}, checked against the file's size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        if n is None or 8 + n > size:
            need = "8 bytes of header length" if n is None else f"{8 + n:,} bytes of header alone"
            raise CheckpointError(f"{file}: {size:,} bytes, its header says {need} (cut short): {REDOWNLOAD}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: its {n:,}-byte header is not valid JSON ({e}): {REDOWNLOAD}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: its header is not a safetensors header: {REDOWNLOAD}")
    header.pop("__metadata__", None)
    end = 0
    for name, t in header.items():
        try:
            begin, stop = t["data_offsets"]
            nbytes = math.prod(t["shape"]) * SAFETENSORS_DTYPES[t["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name!r} has no valid dtype, shape and data_offsets in the "
                                  f"header: {REDOWNLOAD}") from None
        if stop - begin != nbytes:
            raise CheckpointError(f"{file}: tensor {name!r} ({t['dtype']} {t['shape']}) takes {nbytes:,} bytes, "
                                  f"its data_offsets give {stop - begin:,}: {REDOWNLOAD}")
        end = max(end, stop)
    if size != 8 + n + end:
        how = "cut short" if size < 8 + n + end else "longer"
        raise CheckpointError(f"{file}: {size:,} bytes, its header says {8 + n + end:,} ({how}): {REDOWNLOAD}")
    return header


def _check_dtypes(folder: Path, headers: dict[Path, dict]) -> None:
    """Floating-point tensors are of the dtype the folder's config.json says (when it says one)."""
    config = folder / "config.json"
    if not config.is_file():
        return
    cfg = read_json(config)
    want = CONFIG_DTYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype")))
    if want is None or "quantization_config" in cfg:  # quantized weights mix dtypes by design
        return
    for file, header in headers.items():
        for name, t in header.items():
            if t["dtype"] in CONFIG_DTYPES.values() and t["dtype"] != want:
                raise CheckpointError(f"{file}: tensor {name!r} is {t['dtype']}, {config} says "
                                      f"{want} (a file of another release?): {REDOWNLOAD}")


# ---- model families ----

OUR_OLD_KEYS = {"image_size", "patch_size", "vision_hidden", "llm_hidden"}


def family_name(config: dict, path: Path) -> str:
    """Which family a top-level config.json belongs to (only VILA so far)."""
    where = path / "config.json"
    if OUR_OLD_KEYS <= set(config):
        raise CheckpointError(
            f"{where} is in the layout this project wrote before it read the release format; it is no longer "
            "read. Re-create the checkpoint: `python model.py init --out DIR --preset tiny --data FILE.jsonl` "
            "(or --llm/--vision-tower) and train again")
    if config.get("model_type") in ("vila", "llava_llama") or \
            {"VILAForCausalLM", "LlavaLlamaModel"} & set(config.get("architectures") or []):
        return "vila"
    raise CheckpointError(f"{where}: model_type {config.get('model_type')!r}, architectures "
                          f"{config.get('architectures')!r} is not a VILA checkpoint (model_type 'vila' / "
                          "architectures VILAForCausalLM or LlavaLlamaModel)")


def family_of(name: str) -> type:
    if name == "vila":
        return VilaFamily
    raise ValueError(f"unknown model family {name!r}")


class VilaFamily:
    """Everything particular to LongVILA / LongVILA-R1 / NVILA. A family provides:

        frame_features(model, pixel_values)  frames -> patch features the projector takes   [t, P, C]
        video_rows(model, video_embeds)      projector outputs -> the rows of the video in the prompt
        chat_text(tokenizer, before, after)  the user's turn -> chat text before / after the video
        load(...) / write(...)               the layout on disk

    Positions: VILA's LLM sees plain positions 0..L-1 over text and video alike, which is what
    `VideoLM.build_sequence_batch` builds. (Qwen2.5-VL's M-RoPE positions would be a family method.)
    """

    # ---- frames -> features -> rows ----

    @staticmethod
    def frame_features(model: VideoLM, pixel_values: torch.Tensor) -> torch.Tensor:
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
    def video_rows(model: VideoLM, video_embeds: torch.Tensor) -> torch.Tensor:
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
    def chat_text(tokenizer, text_before: str, text_after: str) -> tuple[str, str]:
        """The chat-template text on either side of the video.

        The user's turn is text_before + <vila/video> + text_after, stripped as VILA strips it; the
        tokenizer's template renders it with the assistant's turn opened. With Qwen2's ChatML and
        text_before = "":
            "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n"  | video |
            "You are a helpful ... Question: ...<|im_end|>\\n<|im_start|>assistant\\n"
        """
        if VIDEO_TOKEN in text_before + text_after:
            raise ValueError(f"the prompt text contains the video placeholder {VIDEO_TOKEN!r}")
        user = (text_before + VIDEO_TOKEN + text_after).strip()
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
        before, after = text.split(VIDEO_TOKEN)
        return before, after

    # ---- on disk ----

    @staticmethod
    def read_config(path: Path, config: dict, block_order: str | None = None) -> VideoLMConfig:
        """config.json, vision_tower/config.json and mm_projector/config.json -> VideoLMConfig, checked."""
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

        for key, value, part in (("hidden_size", llm_cfg.get("hidden_size"), "llm/config.json"),
                                 ("mm_hidden_size", vision_cfg.get("hidden_size"), "vision_tower/config.json")):
            if config.get(key) is not None and config[key] != value:
                raise CheckpointError(f"{where}: {key} {config[key]} disagrees with {part} ({value})")
        return VideoLMConfig(image_size, patch_size, vision_cfg["hidden_size"], llm_cfg["hidden_size"],
                             projector=projector, block_order=order, select_layer=layer, temporal_pool=pool,
                             frame_separator=separator)

    @staticmethod
    def load(model_class: type, path: Path, config: dict, dtype, device, attn_implementation: str,
             block_order: str | None) -> VideoLM:
        from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipVisionConfig, SiglipVisionModel
        vlm_config = VilaFamily.read_config(path, config, block_order)
        llm = _from_pretrained(AutoModelForCausalLM, path / "llm", dtype=dtype,
                               attn_implementation=attn_implementation)
        vision_config = SiglipVisionConfig.from_pretrained(path / "vision_tower")
        # the pooling head is never used; a tower saved without it loads without one
        vision_config.vision_use_head = any(".head." in f".{k}" for k in check_weights(path / "vision_tower"))
        vision = _from_pretrained(SiglipVisionModel, path / "vision_tower", config=vision_config, dtype=dtype,
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
    def write(model: VideoLM, folder: Path, state_dict: dict):
        part = lambda prefix: {k[len(prefix):]: v.detach().cpu().contiguous()
                               for k, v in state_dict.items() if k.startswith(prefix)}
        llm_weights = part("llm.")
        dtype = next(iter(llm_weights.values())).dtype  # (save_pretrained empties the dict)
        # a sharded release is written back in its shards; "50GB" (Hugging Face's default) is one file
        shard = shard_numel(model.source / "llm") if model.source is not None else None
        model.llm.save_pretrained(folder / "llm", state_dict=llm_weights,
                                  max_shard_size=shard * dtype.itemsize if shard else "50GB")
        _write_tokenizer(model.tokenizer, folder / "llm")

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
    def projector_config(cfg: VideoLMConfig) -> dict:
        out = dict(architectures=["MultimodalProjector"], model_type="v2l_projector", mm_projector_type=cfg.projector)
        if cfg.projector == "mlp_downsample":  # the type name alone does not say (see read_config)
            out["block_order"] = cfg.block_order
        return out

    @staticmethod
    def release_config(model: VideoLM, projector_cfg: dict, dtype: torch.dtype) -> dict:
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
        out.update(hidden_size=cfg.llm_hidden, mm_hidden_size=cfg.vision_hidden,
                   mm_vision_select_layer=cfg.select_layer, mm_vision_select_feature="cls_patch",
                   mm_projector_type=cfg.projector, video_encoder=json.dumps(encoder),
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


def read_tensor(folder, name: str) -> torch.Tensor:
    """The tensor `name` of the safetensors weights in `folder` (one file or shards, checked by
    `check_weights`), in its stored dtype. Example: read_tensor(path / "llm", "lm_head.weight") -> [V, D]."""
    where = check_weights(folder)
    if name not in where:
        raise CheckpointError(f"{folder}: no weight named {name!r} in its *.safetensors files")
    with safe_open(str(where[name]), framework="pt") as f:
        return f.get_tensor(name)


def _from_pretrained(auto_class, folder: Path, **kwargs):
    """`auto_class.from_pretrained(folder)` on weights checked first (`check_weights`), refusing weights that
    are missing or of another shape than the folder's config.json says (Hugging Face would initialise
    them at random)."""
    where = check_weights(folder)
    module, info = auto_class.from_pretrained(folder, output_loading_info=True, ignore_mismatched_sizes=True,
                                              **kwargs)
    problems = [f"{k} is missing" for k in sorted(info["missing_keys"])]
    problems += [f"{k} in {where[k].name if k in where else 'the weights'} has shape {list(a)}, config.json makes "
                 f"it {list(b)}" for k, a, b in sorted(info["mismatched_keys"])]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{folder}: the weights disagree with {folder / 'config.json'}: "
                              + "; ".join(problems[:5]) + more)
    return module


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


def _write_tokenizer(tokenizer, folder: Path) -> None:
    """save_pretrained, plus the chat template in tokenizer_config.json, where transformers 4.x (the
    release's code) looks for it."""
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    path.write_text(json.dumps(config, indent=2))


# ---- building a fresh model ----

def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts` (nothing can be downloaded here), built like the
    release's Qwen2 tokenizer: Qwen2's pre-tokenization, ChatML (<|im_start|>, <|im_end|> = eos,
    <|endoftext|> = pad, the ChatML chat template) and VILA's media tokens appended. Byte-level means any
    string, however hostile, still encodes; the think/answer tags are single tokens.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CHATML_TEXT] * 10 + list(texts), trainer)
    bpe = json.loads(tok.to_str())["model"]
    qwen = Qwen2Tokenizer(vocab=bpe["vocab"], merges=[tuple(m) for m in bpe["merges"]], unk_token=None,
                          eos_token="<|im_end|>", pad_token="<|endoftext|>")
    qwen.add_tokens([AddedToken(t, special=True) for t in special])
    qwen.add_tokens(SPECIAL_TEXT_TOKENS)
    qwen.add_tokens(MEDIA_TOKENS, special_tokens=True)
    qwen.chat_template = CHATML_TEMPLATE
    return qwen


def tokenizer_corpus(record_files, question_prompt: str | None = None) -> list[str]:
    """Every text the model will read or write for these records: prompts and target responses."""
    import data
    import video
    texts = []
    for f in record_files:
        for r in data.load_records(f):
            try:
                subtitles = data.subtitle_text(r)  # every cue of an .srt file
            except video.VideoError:               # a missing .srt: training skips the record too
                subtitles = None
            before, after = data.build_prompt(r, subtitles=subtitles, template=question_prompt)
            texts += [before, after, data.format_response(r.reasoning, r.answer)]
    return texts


def build_from_preset(preset: str, tokenizer, seed: int = 0, attn_implementation: str = "sdpa") -> VideoLM:
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
    config = VideoLMConfig(p["image_size"], p["patch_size"], p["vision"]["hidden_size"], p["llm"]["hidden_size"])
    projector = MultimodalProjector(config.projector, config.vision_hidden, config.llm_hidden, config.block_order)
    return VideoLM(config, vision, projector, llm, tokenizer)


def build_from_pretrained(llm_path, vision_path, seed: int = 0, dtype=torch.bfloat16,
                          projector: str = "mlp_downsample_2x2_fix", block_order: str = "row",
                          temporal_pool: int = 1) -> VideoLM:
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
    config = VideoLMConfig(vc.image_size, vc.patch_size, vc.hidden_size, llm.config.hidden_size,
                           projector=projector, block_order=block_order, temporal_pool=temporal_pool)
    mm_projector = MultimodalProjector(projector, config.vision_hidden, config.llm_hidden, block_order).to(dtype)
    return VideoLM(config, vision, mm_projector, llm, tokenizer)


def untie_embeddings(llm) -> None:
    """Give the LM head its own copy of the tied input-embedding weight (tie_word_embeddings=False).
    The model computes the same function; training then updates the two separately, as in Qwen2-7B.
    FSDP2 cannot shard one weight used by two separately sharded modules (see train.shard_model)."""
    head = llm.get_output_embeddings()
    head.weight = nn.Parameter(llm.get_input_embeddings().weight.detach().clone())
    llm.config.tie_word_embeddings = False


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    init = sub.add_parser("init", formatter_class=fmt, help="create a fresh checkpoint (release layout)")
    init.add_argument("--out", required=True, help="checkpoint folder to create")
    init.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                      help="sizes of a randomly initialised model (ignored with --llm/--vision-tower)")
    init.add_argument("--data", nargs="+", default=[],
                      help="record files (.jsonl) whose text trains the preset's tokenizer")
    init.add_argument("--vocab-size", type=int, default=None, help="tokenizer size (default: the preset's)")
    init.add_argument("--llm", default=None, help="a pretrained Hugging Face causal LM folder instead of a preset")
    init.add_argument("--vision-tower", default=None, help="a pretrained SigLIP folder (with --llm)")
    init.add_argument("--projector", choices=sorted(PROJECTOR_DOWNSAMPLE), default="mlp_downsample_2x2_fix",
                      help="mm_projector_type of the new projector (with --llm)")
    init.add_argument("--block-order", choices=BLOCK_ORDERS, default="row",
                      help="token order of the patch blocks; 'column' only with --projector mlp_downsample")
    init.add_argument("--temporal-pool", type=int, default=1,
                      help="frames averaged per step by the TSP video encoder; 1 = the basic encoder (with --llm)")
    init.add_argument("--question-prompt", choices=["thinking", "plain"], default="thinking",
                      help="text around each question, saved in config.json and used by sft/rl/eval: 'thinking' "
                           "is LongVILA-R1's thinking prompt (80 fixed tokens, then the question); 'plain' is the "
                           "question alone, which a tiny model trained from scratch learns to read much faster")
    init.add_argument("--seed", type=int, default=0, help="initialisation seed")
    init.add_argument("--untie-embeddings", action="store_true",
                      help="give a tied LM head (e.g. Qwen2-0.5B/1.5B) its own weight: needed to train sharded "
                           "over several processes")
    info = sub.add_parser("info", formatter_class=fmt, help="print a checkpoint's shapes and sizes")
    info.add_argument("path", help="checkpoint folder")
    args = ap.parse_args(argv)

    if args.cmd == "init":
        if bool(args.llm) != bool(args.vision_tower):
            ap.error("--llm and --vision-tower go together")
        if args.block_order == "column" and args.projector != "mlp_downsample":
            ap.error("--block-order column goes with --projector mlp_downsample")
        import data
        question_prompt = data.QUESTION_PROMPTS[args.question_prompt]
        if args.llm:
            model = build_from_pretrained(args.llm, args.vision_tower, seed=args.seed, projector=args.projector,
                                          block_order=args.block_order, temporal_pool=args.temporal_pool)
        else:
            if not args.data:
                ap.error("a preset model trains its tokenizer on your records: pass --data FILE.jsonl")
            vocab = args.vocab_size or PRESETS[args.preset]["vocab_size"]
            model = build_from_preset(args.preset, train_tokenizer(tokenizer_corpus(args.data, question_prompt), vocab),
                                      args.seed)
        if args.untie_embeddings:
            untie_embeddings(model.llm)
        if args.question_prompt != "thinking":  # a release checkpoint has no such key: the thinking prompt
            model.release_config["question_prompt"] = question_prompt
        model.save(args.out)
        print(f"wrote {args.out}")
        args.path = args.out
    model = VideoLM.load(args.path)
    c = model.config
    encoder = "basic" if c.temporal_pool == 1 else f"TSP (pool {c.temporal_pool} frames)"
    print(f"{args.path}: vision tower {count_parameters(model.vision_tower):,} params "
          f"({c.grid}x{c.grid} patches of {c.image_size}px, hidden layer {c.select_layer}), projector "
          f"{c.projector} ({c.block_order}-major blocks) {count_parameters(model.mm_projector):,}, llm "
          f"{count_parameters(model.llm):,} ({model.llm.config.model_type}); {c.tokens_per_frame} tokens per "
          f"frame + separator, {encoder} video encoder, vocab {len(model.tokenizer)}; frames as released: "
          f"num_video_frames {model.release_config.get('num_video_frames')}, fps {model.release_config.get('fps')}; "
          f"question prompt {_prompt_name(model.question_prompt)}")


def _prompt_name(question_prompt: str | None) -> str:
    import data
    names = {text: name for name, text in data.QUESTION_PROMPTS.items()}
    return "thinking" if question_prompt is None else names.get(question_prompt, repr(question_prompt))


if __name__ == "__main__":
    errors.run_main(main)
