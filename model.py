"""VideoLM: a video vision-language model, whatever its family, as every stage uses it.

    frames [T, H, W, 3] uint8
      -> the family's vision encoder, frames_per_step frames at a time -> video embeddings
         [T / frames_per_step * tokens_per_step, D]: what MR-SP stage 1 shards and the cache keeps
      -> a Prompt: the chat text around the video, embedded by the current LLM, and its positions
      -> the causal LM, over right-padded sequences (`build_sequence_batch`) or a GRPO group per row with
         its prompt once (`build_packed_batch`, `shared_prefix_attention`) -> `token_logprobs`

Two families, one file each, behind one small interface (below):

| family       | file       | checkpoints                           | positions                        |
|--------------|------------|---------------------------------------|----------------------------------|
| `vila`       | vila.py    | LongVILA-R1-7B, LongVILA-7B, NVILA    | 0..L-1                           |
| `qwen2_5_vl` | qwen_vl.py | Qwen2.5-VL-3B/7B/32B/72B-Instruct     | M-RoPE: 3 axes (time, row, col)  |

A family (vila.VilaFamily, qwen_vl.QwenVLFamily) provides:

    name, position_axes (1 or 3), needs_timestamps, special_tokens, chat_template, presets
    encode_frames(model, frames)            uint8 [t, H, W, 3] -> [ceil(t / frames_per_step) * tokens_per_step, D]
    prompt(model, before, media_embeds, after, timestamps, media) -> (embeds [L, D], positions [L] or [3, L],
                                            engine input); media "video", "image" (one frame) or "text" (None)
    chat_text(tokenizer, before, after, media)  the chat template's text on either side of the media
    prompt_length(model, before, after, num_frames, media) -> L without building it
    image_setting(model)                    how an image becomes a frame (the cache key), or CheckpointError
    load(...), write(...), is_complete(path), llm_folder(path), engine_weight_name(name), build(...),
    describe(model)

Positions are the LLM's, not token indices: [B, S] for one axis, [3, B, S] for M-RoPE; a response's
tokens continue from its prompt's `next_position` on every axis.

Run:
    python model.py init --out runs/init --preset tiny --data data/synth/train.jsonl
    python model.py init --family qwen2_5_vl --out runs/init --preset tiny --data data/synth/train.jsonl
    python model.py init --out runs/init --llm PATH/Qwen2-7B-Instruct --vision-tower PATH/siglip-so400m-patch14-384
    python model.py info PATH/LongVILA-R1-7B
"""
import argparse
import functools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import errors
import qwen_vl
import vila
from checkpoint import CheckpointError, atomic_directory, read_json

log = logging.getLogger("model")

FAMILIES = {f.name: f for f in (vila.VilaFamily, qwen_vl.QwenVLFamily)}

IGNORE = -100  # target id of positions that carry no loss (prompt, video, padding)
MEDIA = ("video", "image", "text")  # what a prompt holds: data.Record.data_type

SPECIAL_TEXT_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
CHATML_TEXT = "system\nYou are a helpful assistant.\nuser\nassistant\n"  # its words, for a tokenizer corpus


def default_attn_implementation(dtype=torch.bfloat16) -> str:
    """flash_attention_2 for bf16/fp16 weights on a GPU with flash-attn installed, sdpa otherwise.
    fp32 weights (trained under --bf16 autocast) get sdpa: a rollout or eval pass outside autocast
    would hand flash-attn fp32 tensors, which it refuses; SDPA picks a flash kernel itself where it can."""
    from transformers.utils import is_flash_attn_2_available
    if dtype in (torch.bfloat16, torch.float16) and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


# ---- prompts, and the batches the log-prob passes consume ----

@dataclass
class Prompt:
    """A chat prompt with its video spliced in: what rollout, every training pass and eval consume.

    `positions` are the LLM's: [L] = 0..L-1 for a one-axis family (VILA), [3, L] M-RoPE (time, row, column)
    for Qwen2.5-VL, where a video's tokens share positions and the text after it starts past the largest.
    A response continues from `next_position` on every axis. `engine_input()` makes the vLLM request of a
    family whose positions vLLM cannot derive from embeddings (Qwen2.5-VL: token ids + video embeddings);
    None sends the embeddings as they are.
    """
    embeds: torch.Tensor           # [L, D]
    positions: torch.Tensor        # [L] or [3, L], long
    engine_input: Callable[[], dict] | None = None

    def __len__(self) -> int:
        return len(self.embeds)

    @property
    def next_position(self) -> int:
        """The position of the first response token: one past the largest prompt position."""
        return int(self.positions.max()) + 1


def continue_positions(positions: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """`count` text positions from `start`, shaped like `positions` ([L] or [3, L]) along its last axis:
    the same value on every axis, as text takes in M-RoPE. Example: [3, L] prompt, start 9, count 2 ->
    [[9, 10], [9, 10], [9, 10]]."""
    steps = torch.arange(start, start + count, device=positions.device)                 # [count]
    return steps.expand(*positions.shape[:-1], count)                                   # [..., count]


@dataclass
class SequenceBatch:
    """Right-padded full sequences (prompt + response), one per row. Right padding needs no attention
    mask under a causal LM: a real token never attends to the padding after it.
    Built for sequence parallelism (sp_size > 1), `inputs_embeds` holds only SP rank `sp_rank`'s
    contiguous slice [B, S/sp, D]; targets and position_ids always cover the whole rows."""
    inputs_embeds: torch.Tensor  # [B, S, D], or [B, S/sp, D]
    targets: torch.Tensor        # [B, S] the token predicted at each position; IGNORE where no loss
    position_ids: torch.Tensor   # [B, S], or [3, B, S] for M-RoPE: indexed [..., b, s] everywhere
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

    Response i starts at `offsets[i]`; its positions continue from the prompt's `next_position` N, as in
    its own sequence, so rotary embeddings see the same positions as in the per-sequence layout.
    Example: P = 4 (N = 4), responses of 2 and 1 tokens -> offsets [4, 6], length 7, positions
    0 1 2 3 | 4 5 | 4. With M-RoPE N is past the video's largest position, not P.
    """
    prompt_len: int
    response_lens: list[int]

    @property
    def offsets(self) -> list[int]:
        return [self.prompt_len + sum(self.response_lens[:i]) for i in range(len(self.response_lens))]

    @property
    def length(self) -> int:
        return self.prompt_len + sum(self.response_lens)

    def position_ids(self, prompt_positions: torch.Tensor, padded_len: int) -> torch.Tensor:
        """[..., padded_len]: the prompt's positions ([P] or [3, P]), then N..N+R_i-1 for each response on
        every axis, then padding positions continuing after the last response."""
        N = int(prompt_positions.max()) + 1
        more = lambda start, count: continue_positions(prompt_positions, start, count)
        pieces = [prompt_positions] + [more(N, R) for R in self.response_lens]
        pieces.append(more(N + self.response_lens[-1], padded_len - self.length))
        return torch.cat(pieces, dim=-1)


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
    position_ids: torch.Tensor    # [B, n], or [3, B, n] for M-RoPE
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
    if model.llm_config._attn_implementation in SHARED_PREFIX.values():
        return
    inner, inner_config = inner_attention_setup(model.llm_config, "shared-prefix attention")
    if inner not in SHARED_PREFIX:
        raise ValueError(f"shared-prefix attention does not wrap {inner!r}; use sdpa or flash_attention_2/3")
    name = SHARED_PREFIX[inner]
    AttentionInterface.register(name, _shared_prefix_attention_fn)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    for layer in model.llm.get_decoder().layers:
        layer.self_attn.shared_prefix_inner_config = inner_config
    model.llm.get_decoder().set_attn_implementation(name)  # the LLM's layers only, never a vision tower


class VideoLM(nn.Module):
    """A vision encoder (`vision_tower`, `mm_projector`: nn.Identity where the family's tower ends in its
    own merger) and a causal LM (`llm`), with the family that knows how they meet (`family`)."""

    def __init__(self, config, vision_tower: nn.Module, mm_projector: nn.Module,
                 llm: nn.Module, tokenizer, release_config: dict | None = None, source=None):
        super().__init__()
        self.config = config  # the family's config dataclass: image_size, frames/tokens_per_step, llm_hidden, family
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
    def llm_config(self):
        """The language model's own config (Qwen2.5-VL's `text_config`; VILA's llm/config.json)."""
        return self.llm.config.get_text_config()

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

    def encode_video(self, frames, chunk_size: int = 32) -> torch.Tensor:
        """Frames [T, H, W, 3] -> video embeddings [steps * tokens_per_step, D], steps = ceil(T / frames_per_step)
        (VILA: a step is a frame; Qwen2.5-VL: a pair of frames, an odd count completed with the last frame).

        The rows of a step depend only on its frames, so they can be split over ranks on step boundaries
        (MR-SP stage 1) and cached; how they enter the prompt ("\\n" rows, TSP pooling, M-RoPE positions)
        is the prompt's business. Frames go through the tower `chunk_size` at a time (rounded to whole
        steps), so thousands of frames fit in bounded memory; the result is the same as one pass.
        """
        step = self.config.frames_per_step
        chunk_size = max(step, chunk_size // step * step)
        encode = lambda chunk: self.family.encode_frames(self, chunk)             # [t, H, W, 3] -> [t/fps * tps, D]
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_tower.parameters())
        chunks = []
        for start in range(0, len(frames), chunk_size):
            chunk = torch.as_tensor(frames[start:start + chunk_size])
            # A trainable tower keeps no activations: SigLIP-so400m at 448 px would save ~1.3 GB per frame
            # (350 GB at 256 frames). Each chunk keeps its frames; backward runs its forward again.
            chunks.append(torch.utils.checkpoint.checkpoint(encode, chunk, use_reentrant=False) if trains
                          else encode(chunk))
        return torch.cat(chunks)                                                  # [steps * tps, D]

    def image_frames(self, path):
        """An image record's picture as the one frame `encode_video` takes: uint8 [1, S, S, 3], S the tower's
        size. Its embeddings are [tokens_per_step, D] (Qwen2.5-VL's pair: the picture twice, as its image
        processor makes one). A setting the family cannot read an image under is a CheckpointError
        (`family.image_setting`)."""
        import video
        self.family.image_setting(self)
        return video.load_image(path, self.config.image_size)

    # ---- text and splicing ----

    def embed_ids(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.llm.get_input_embeddings()(ids)                               # [L] -> [L, D]

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, text_before: str, media_embeds: torch.Tensor | None, text_after: str, timestamps=None,
               media: str = "video") -> Prompt:
        """The chat prompt with its video (or image, or nothing) in it: rollout, every training pass and eval
        use this.

        `text_before` + media + `text_after` is the user's turn (data.build_prompt writes it); the family
        wraps it in the chat template, turns the media embeddings into rows and gives every row its
        positions (a Qwen2.5-VL video's need the sampled frames' `timestamps`, in seconds). `media` is the
        record's data_type: "video" (encode_video of its frames), "image" (encode_video of the picture as one
        frame), "text" (no embeddings: the LLM alone). Text embeddings are looked up now, from the current
        LLM, so cached media embeddings stay valid while the LLM trains.
        """
        if media not in MEDIA:
            raise ValueError(f"media {media!r} is not one of {', '.join(MEDIA)}")
        if (media_embeds is None) != (media == "text"):
            raise ValueError(f"a {media} prompt takes {'no' if media == 'text' else 'its'} media embeddings")
        if media == "video" and self.family.needs_timestamps and timestamps is None:
            raise ValueError(f"{self.family.name} prompts need the sampled frames' timestamps (M-RoPE time axis)")
        embeds, positions, engine_input = self.family.prompt(self, text_before, media_embeds, text_after, timestamps,
                                                             media=media)
        return Prompt(embeds, positions, engine_input)

    def position_arg(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions as the LLM takes them, checked: [B, S] for one axis, [3, B, S] for M-RoPE. Qwen2.5-VL's
        LLM would expand [B, S] to three equal axes without a word, wrong for every video token."""
        want = 2 if self.family.position_axes == 1 else 3
        if positions.dim() != want:
            raise ValueError(f"{self.family.name} takes positions of {want} dims, got {tuple(positions.shape)}")
        return positions

    def build_sequence_batch(self, prompts: list[Prompt], response_ids: list[list[int]],
                             sp_rank: int = 0, sp_size: int = 1) -> SequenceBatch:
        """Prompts [L_i positions] and response token ids [R_i] -> one right-padded SequenceBatch.

        Position L_i - 1 + j predicts response token j, so targets[i, L_i-1 : L_i-1+R_i] = response; the
        response's positions continue from the prompt's next position, and the padding's after them.
        Example: prompt of 3 positions, response [7, 8] -> inputs p0 p1 p2 e7 e8, targets _ _ 7 8 _.
        With sp_size > 1 the rows are padded to a multiple of sp_size and only SP rank `sp_rank`'s slice
        of the embeddings is built, from the pieces: no rank holds the full [B, S, D].
        """
        for i, resp in enumerate(response_ids):
            if len(resp) == 0:
                raise ValueError(f"sequence {i}: empty response, nothing to score")
        lengths = [len(p) + len(r) for p, r in zip(prompts, response_ids)]
        n = -(-max(lengths) // sp_size)                                        # positions per rank: ceil(S / sp)
        S, start, stop = n * sp_size, sp_rank * n, (sp_rank + 1) * n
        rows, positions = [], []
        targets = torch.full((len(lengths), S), IGNORE, dtype=torch.long, device=self.device)  # [B, S]
        for i, (prompt, resp) in enumerate(zip(prompts, response_ids)):
            L, embeds = len(prompt), prompt.embeds
            resp = torch.as_tensor(resp, dtype=torch.long, device=self.device)
            row = torch.cat([embeds[min(start, L):min(stop, L)],                        # the window's prompt part
                             self.embed_ids(resp[max(start - L, 0):max(stop - L, 0)]).to(embeds.dtype)])  # [<= n, D]
            rows.append(F.pad(row, (0, 0, 0, n - len(row))))                            # [n, D]
            targets[i, L - 1:L - 1 + len(resp)] = resp
            prompt_pos = prompt.positions.to(self.device)
            positions.append(torch.cat([prompt_pos, continue_positions(prompt_pos, prompt.next_position, S - L)], -1))
        return SequenceBatch(torch.stack(rows), targets, torch.stack(positions, dim=-2),   # [B, S/sp, D], [B, S],
                             sp_rank, sp_size)                                              # [..., B, S]

    def build_packed_batch(self, prompts: list[Prompt], response_ids: list[list[list[int]]],
                           sp_rank: int = 0, sp_size: int = 1) -> PackedBatch:
        """Prompts [P_b positions] and each group's response ids -> SP rank `sp_rank`'s slice of the
        packed rows [prompt][response 1]...[response G] (the whole rows when sp_size = 1).

        Rows are right-padded to S_pad, the longest row rounded up to a multiple of sp_size; this rank
        builds only its n = S_pad / sp_size positions of each row from the pieces, so no rank ever holds
        the full [B, S_pad, D]. Example: prompt of 3 positions, responses [7, 8] and [9] -> one row
        p0 p1 p2 e7 e8 e9 at positions 0 1 2 3 4 3; p2 predicts 7 and 9, e7 predicts 8.
        """
        layouts = []
        for b, (prompt, group) in enumerate(zip(prompts, response_ids)):
            if not group or any(len(r) == 0 for r in group):
                raise ValueError(f"group {b}: an empty response (or no response): nothing to score")
            layouts.append(GroupLayout(len(prompt), [len(r) for r in group]))
        n = -(-max(layout.length for layout in layouts) // sp_size)            # positions per rank: ceil(S / sp)
        start, stop = sp_rank * n, (sp_rank + 1) * n
        rows, positions = [], []
        for prompt, group, layout in zip(prompts, response_ids, layouts):
            P, embeds = layout.prompt_len, prompt.embeds
            tokens = torch.as_tensor([t for r in group for t in r], dtype=torch.long, device=self.device)  # [sum R]
            mine = [embeds[min(start, P):min(stop, P)],                        # the prompt's part of the window
                    self.embed_ids(tokens[max(start - P, 0):max(stop - P, 0)]).to(embeds.dtype)]  # the responses'
            row = torch.cat(mine)                                              # [<= n, D]
            rows.append(F.pad(row, (0, 0, 0, n - len(row))))                   # [n, D]
            full = layout.position_ids(prompt.positions.to(self.device), n * sp_size)       # [..., S_pad]
            positions.append(full[..., start:stop])                                          # [..., n]
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
        return PackedBatch(torch.stack(rows), torch.stack(positions, dim=-2), layouts,     # [B, n, D], [..., B, n]
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
                          attention_mask={t: None for t in set(self.llm_config.layer_types)})
        hidden = self.llm.get_decoder()(inputs_embeds=batch.inputs_embeds, position_ids=self.position_arg(batch.position_ids),
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
    """A folder that holds a whole checkpoint of a family we read (its config.json is written last)."""
    path = Path(path)
    try:
        return family_of(family_name(read_json(path / "config.json"), path)).is_complete(path)
    except CheckpointError:
        return False


# ---- model families ----

OUR_OLD_KEYS = {"image_size", "patch_size", "vision_hidden", "llm_hidden"}


def family_name(config: dict, path: Path) -> str:
    """Which family a top-level config.json belongs to: "vila" or "qwen2_5_vl"."""
    where = path / "config.json"
    if OUR_OLD_KEYS <= set(config):
        raise CheckpointError(
            f"{where} is in the layout this project wrote before it read the release format; it is no longer "
            "read. Re-create the checkpoint: `python model.py init --out DIR --preset tiny --data FILE.jsonl` "
            "(or --llm/--vision-tower) and train again")
    architectures = set(config.get("architectures") or [])
    if config.get("model_type") in ("vila", "llava_llama") or {"VILAForCausalLM", "LlavaLlamaModel"} & architectures:
        return "vila"
    if config.get("model_type") == "qwen2_5_vl" or "Qwen2_5_VLForConditionalGeneration" in architectures:
        return "qwen2_5_vl"
    raise CheckpointError(f"{where}: model_type {config.get('model_type')!r}, architectures "
                          f"{config.get('architectures')!r} is not a family this project reads: VILA "
                          "(model_type 'vila', architectures VILAForCausalLM or LlavaLlamaModel) or Qwen2.5-VL "
                          "(model_type 'qwen2_5_vl')")


def family_of(name: str) -> type:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]


# ---- building a fresh model ----

def train_tokenizer(texts, vocab_size: int, family: str = "vila"):
    """A byte-level BPE tokenizer trained on `texts` (nothing can be downloaded here), built like the
    releases' Qwen2 tokenizers: Qwen2's pre-tokenization, ChatML (<|im_start|>, <|im_end|> = eos,
    <|endoftext|> = pad), the family's chat template and special tokens (VILA's media tokens; Qwen2.5-VL's
    <|vision_start|>, <|video_pad|>, ...). Byte-level means any string, however hostile, still encodes;
    the think/answer tags are single tokens.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
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
    qwen.add_tokens(family_of(family).special_tokens, special_tokens=True)
    qwen.chat_template = family_of(family).chat_template
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


def build_from_preset(preset: str, tokenizer, seed: int = 0, attn_implementation: str = "sdpa",
                      family: str = "vila") -> VideoLM:
    """A randomly initialised VideoLM of the family's preset sizes, with `tokenizer`'s vocabulary."""
    return family_of(family).build(VideoLM, preset, tokenizer, seed, attn_implementation)


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
    init.add_argument("--family", choices=sorted(FAMILIES), default="vila",
                      help="vila: SigLIP -> projector -> Qwen2 in the VILA release layout (LongVILA-R1); "
                           "qwen2_5_vl: a Qwen2.5-VL in the Hugging Face layout (--preset only)")
    init.add_argument("--preset", choices=sorted({p for f in FAMILIES.values() for p in f.presets}), default="tiny",
                      help="sizes of a randomly initialised model, one of its --family's (ignored with "
                           "--llm/--vision-tower)")
    init.add_argument("--data", nargs="+", default=[],
                      help="record files (.jsonl) whose text trains the preset's tokenizer")
    init.add_argument("--vocab-size", type=int, default=None, help="tokenizer size (default: the preset's)")
    init.add_argument("--llm", default=None, help="a pretrained Hugging Face causal LM folder instead of a preset")
    init.add_argument("--vision-tower", default=None, help="a pretrained SigLIP folder (with --llm)")
    init.add_argument("--projector", choices=sorted(vila.PROJECTOR_DOWNSAMPLE), default="mlp_downsample_2x2_fix",
                      help="mm_projector_type of the new projector (with --llm)")
    init.add_argument("--block-order", choices=vila.BLOCK_ORDERS, default="row",
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
        if args.llm and args.family != "vila":
            ap.error("--llm/--vision-tower assemble a VILA model; a Qwen2.5-VL checkpoint is used as it is")
        if args.block_order == "column" and args.projector != "mlp_downsample":
            ap.error("--block-order column goes with --projector mlp_downsample")
        import data
        question_prompt = data.QUESTION_PROMPTS[args.question_prompt]
        if args.llm:
            model = vila.build_from_pretrained(VideoLM, args.llm, args.vision_tower, seed=args.seed,
                                               projector=args.projector, block_order=args.block_order,
                                               temporal_pool=args.temporal_pool)
        else:
            if not args.data:
                ap.error("a preset model trains its tokenizer on your records: pass --data FILE.jsonl")
            family = family_of(args.family)
            if args.preset not in family.presets:
                ap.error(f"--preset {args.preset}: the {args.family} family has {', '.join(sorted(family.presets))}")
            vocab = args.vocab_size or family.presets[args.preset]["vocab_size"]
            tokenizer = train_tokenizer(tokenizer_corpus(args.data, question_prompt), vocab, args.family)
            model = build_from_preset(args.preset, tokenizer, args.seed, family=args.family)
        if args.untie_embeddings:
            untie_embeddings(model.llm)
        if args.question_prompt != "thinking":  # a release checkpoint has no such key: the thinking prompt
            model.release_config["question_prompt"] = question_prompt
        model.save(args.out)
        print(f"wrote {args.out}")
        args.path = args.out
    model = VideoLM.load(args.path)
    print(f"{args.path}: {model.family.describe(model)}; vocab {len(model.tokenizer)}; question prompt "
          f"{_prompt_name(model.question_prompt)}")


def _prompt_name(question_prompt: str | None) -> str:
    import data
    names = {text: name for name, text in data.QUESTION_PROMPTS.items()}
    return "thinking" if question_prompt is None else names.get(question_prompt, repr(question_prompt))


if __name__ == "__main__":
    errors.run_main(main)