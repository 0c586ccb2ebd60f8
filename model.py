"""VideoLM: a video vision-language model in the LongVILA layout.

    frames [T, H, W, 3] uint8
      -> vision tower (SigLIP)           patch features [T, P, C]
      -> mm_projector (mlp_downsample)   video embeddings [T, P/4, D]   (2x2 patch merge, then an MLP)
      -> spliced between the prompt's text embeddings, a newline after every frame
      -> causal LM (Qwen2 by default)    per-token log-probs of the response

Everything downstream (MR-SP, rollout, SFT, RL, eval) goes through a few calls: `encode_video`,
`prompt_embeds`, `build_sequence_batch` (one sequence per row) or `build_packed_batch` (a GRPO group
per row, its prompt once: `shared_prefix_attention`), and `token_logprobs`.

A checkpoint folder (shared/DESIGN.md) holds `config.json`, `llm/` (a plain Hugging Face causal LM plus its
tokenizer, loadable alone by AutoModelForCausalLM and by vLLM), `vision_tower/` and `mm_projector/`.

Run:
    python model.py init --out runs/init --preset tiny --data data/synth/train.jsonl
    python model.py init --out runs/init --llm PATH/Qwen2-7B --vision-tower PATH/siglip-so400m
    python model.py info runs/init
"""
import argparse
import contextlib
import functools
import json
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
from safetensors.torch import load_file, save_file

IGNORE = -100  # target id of positions that carry no loss (prompt, video, padding)

# Tiny models for a CPU. head_dim stays 32: vLLM's CPU attention rejects 16.
PRESETS = {
    "tiny": dict(
        image_size=32, patch_size=8,  # 4x4 patches -> 2x2 merge -> 4 tokens per frame
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


@dataclass
class VideoLMConfig:
    """The settings that are not inside the Hugging Face configs of llm/ and vision_tower/."""
    image_size: int
    patch_size: int
    vision_hidden: int
    llm_hidden: int
    projector: str = "mlp_downsample"
    frame_separator: str = "\n"  # text whose embedding follows every frame's tokens (LongVILA)

    @property
    def tokens_per_frame(self) -> int:
        return (self.image_size // self.patch_size // 2) ** 2


def default_attn_implementation(dtype=torch.bfloat16) -> str:
    """flash_attention_2 for bf16/fp16 weights on a GPU with flash-attn installed, sdpa otherwise.
    fp32 weights (trained under --bf16 autocast) get sdpa: a rollout or eval pass outside autocast
    would hand flash-attn fp32 tensors, which it refuses; SDPA picks a flash kernel itself where it can."""
    from transformers.utils import is_flash_attn_2_available
    if dtype in (torch.bfloat16, torch.float16) and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


# ---- projector ----

class MlpDownsampleProjector(nn.Module):
    """LongVILA's "mlp_downsample": concatenate each 2x2 block of neighbouring patch features, then an MLP.

    Example: 16 frames of 32x32 pixels with 8x8 patches give features [16, 16, C]; the merge makes
    [16, 4, 4C] and the MLP maps them to [16, 4, D]: four LLM tokens per frame.
    """

    def __init__(self, vision_hidden: int, llm_hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * vision_hidden)
        self.fc1 = nn.Linear(4 * vision_hidden, llm_hidden)
        self.fc2 = nn.Linear(llm_hidden, llm_hidden)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        T, P, C = patch_features.shape
        g = math.isqrt(P)
        if g * g != P or g % 2:
            raise ValueError(f"mlp_downsample needs an even square patch grid, got {P} patches per frame")
        x = patch_features.view(T, g // 2, 2, g // 2, 2, C)           # [T, g/2, 2, g/2, 2, C]
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(T, (g // 2) ** 2, 4 * C)  # [T, P/4, 4C]
        return self.fc2(F.gelu(self.fc1(self.norm(x))))                # [T, P/4, D]


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
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


SHARED_PREFIX = "shared_prefix"  # the attention implementation name registered with transformers


def _shared_prefix_or_sdpa(module, query, key, value, attention_mask, group_layouts=None, **kwargs):
    """The "shared_prefix" entry of transformers' AttentionInterface: `shared_prefix_attention` for a
    forward that carries `group_layouts` (a PackedBatch), plain sdpa with transformers' own mask for
    every other forward (generation, SFT, the per-sequence passes)."""
    if group_layouts is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return shared_prefix_attention(query, key, value, group_layouts, module.scaling), None


def enable_shared_prefix(model: "VideoLM") -> None:
    """Let `model.llm` run PackedBatch forwards in one process (sp = 1; under sequence parallelism
    mrsp.enable_ulysses does it). Every other forward is unchanged sdpa."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    current = model.llm.config._attn_implementation
    if current == SHARED_PREFIX:
        return
    if current != "sdpa":
        raise ValueError(f"shared-prefix attention wraps sdpa; this model uses {current!r}: "
                         "load it with attn_implementation='sdpa'")
    AttentionInterface.register(SHARED_PREFIX, _shared_prefix_or_sdpa)
    AttentionMaskInterface.register(SHARED_PREFIX, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.llm.set_attn_implementation(SHARED_PREFIX)


class VideoLM(nn.Module):
    def __init__(self, config: VideoLMConfig, vision_tower: nn.Module, mm_projector: nn.Module,
                 llm: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector
        self.llm = llm
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def freeze_vision(self):
        """LongVILA-R1 keeps the vision tower and projector frozen in RL; then video embeddings can be cached."""
        for p in list(self.vision_tower.parameters()) + list(self.mm_projector.parameters()):
            p.requires_grad_(False)

    # ---- video ----

    def pixel_values(self, frames) -> torch.Tensor:
        """uint8 frames [T, H, W, 3] (numpy or torch) -> SigLIP input [T, 3, H, W] in [-1, 1]."""
        frames = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames)
        T, H, W, _ = frames.shape
        if H != self.config.image_size or W != self.config.image_size:
            raise ValueError(f"frames are {H}x{W}, the vision tower expects "
                             f"{self.config.image_size}x{self.config.image_size}")
        dtype = next(self.vision_tower.parameters()).dtype
        x = frames.to(self.device).permute(0, 3, 1, 2).to(dtype)    # [T, 3, H, W]
        return x / 127.5 - 1.0

    def encode_video(self, frames, chunk_size: int = 32) -> torch.Tensor:
        """Frames [T, H, W, 3] -> video embeddings [T * tokens_per_frame, D].

        Frames go through the tower `chunk_size` at a time, so thousands of frames fit in bounded
        memory; the result is the same as one pass (each frame is encoded independently).
        """
        chunks = []
        for start in range(0, len(frames), chunk_size):
            px = self.pixel_values(frames[start:start + chunk_size])             # [t, 3, H, W]
            feats = self.vision_tower(pixel_values=px).last_hidden_state          # [t, P, C]
            chunks.append(self.mm_projector(feats))                               # [t, P/4, D]
        return torch.cat(chunks).flatten(0, 1)                                    # [T * P/4, D]

    # ---- text and splicing ----

    def embed_ids(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.llm.get_input_embeddings()(ids)                               # [L] -> [L, D]

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_embeds(self, text_before: str, video_embeds: torch.Tensor, text_after: str) -> torch.Tensor:
        """Text before the video, the video with a separator after each frame, text after -> [L, D].

        The separator embedding is looked up now, from the current LLM, so cached video embeddings
        (which hold projector outputs only) stay valid while the LLM trains.
        """
        tpf = self.config.tokens_per_frame
        video = video_embeds.view(-1, tpf, video_embeds.shape[-1])                # [T, tpf, D]
        sep = self.embed_ids(self.encode_text(self.config.frame_separator))       # [s, D]
        sep = sep.to(video.dtype).unsqueeze(0).expand(video.shape[0], -1, -1)     # [T, s, D]
        video = torch.cat([video, sep], dim=1).flatten(0, 1)                      # [T * (tpf + s), D]
        before = self.embed_ids(self.encode_text(text_before))                    # [Lb, D]
        after = self.embed_ids(self.encode_text(text_after))                      # [La, D]
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
            logits = lm_head(h).float() / temperature                             # [n, V]
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
        """Write the checkpoint parts into `folder` (not atomic: wrap in `atomic_directory`).

        `state_dict` overrides this module's own weights, e.g. the full weights an FSDP run gathered.
        """
        folder = Path(folder)
        sd = state_dict if state_dict is not None else self.state_dict()
        part = lambda prefix: {k[len(prefix):]: v.detach().cpu().contiguous()
                               for k, v in sd.items() if k.startswith(prefix)}
        self.llm.save_pretrained(folder / "llm", state_dict=part("llm."))
        self.tokenizer.save_pretrained(folder / "llm")
        self.vision_tower.save_pretrained(folder / "vision_tower", state_dict=part("vision_tower."))
        (folder / "mm_projector").mkdir(parents=True, exist_ok=True)
        save_file(part("mm_projector."), str(folder / "mm_projector" / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(asdict(self.config), indent=2))  # last: marks complete

    def save(self, out_dir, state_dict: dict | None = None):
        with atomic_directory(out_dir) as tmp:
            self.write(tmp, state_dict)

    @classmethod
    def load(cls, path, dtype=torch.float32, device="cpu", attn_implementation: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel
        path = Path(path)
        if not is_complete_checkpoint(path):
            raise FileNotFoundError(f"{path} is not a complete VideoLM checkpoint "
                                    "(needs config.json, llm/, vision_tower/, mm_projector/)")
        attn = attn_implementation or default_attn_implementation(dtype)
        config = VideoLMConfig(**json.loads((path / "config.json").read_text()))
        llm = AutoModelForCausalLM.from_pretrained(path / "llm", dtype=dtype, attn_implementation=attn)
        vision = SiglipVisionModel.from_pretrained(path / "vision_tower", dtype=dtype,
                                                   attn_implementation="sdpa" if attn != "eager" else "eager")
        projector = MlpDownsampleProjector(config.vision_hidden, config.llm_hidden)
        projector.load_state_dict(load_file(str(path / "mm_projector" / "model.safetensors")))
        tokenizer = AutoTokenizer.from_pretrained(path / "llm")
        return cls(config, vision, projector.to(dtype), llm, tokenizer).to(device)


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


# ---- building a fresh model ----

def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts` (nothing can be downloaded here).

    Byte-level means any string, however hostile, still encodes; the think/answer tags are single tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.add_tokens(SPECIAL_TEXT_TOKENS)
    return fast


def tokenizer_corpus(record_files) -> list[str]:
    """Every text the model will read or write for these records: prompts and target responses."""
    import data
    texts = []
    for f in record_files:
        for r in data.load_records(f):
            try:
                subtitles = data.subtitle_text(r)  # every cue of an .srt file
            except data.VideoError:               # a missing .srt: training skips the record too
                subtitles = None
            before, after = data.build_prompt(r, subtitles=subtitles)
            texts += [before, after, data.format_response(r.reasoning, r.answer)]
    return texts


def build_from_preset(preset: str, tokenizer, seed: int = 0, attn_implementation: str = "sdpa") -> VideoLM:
    """A randomly initialised VideoLM of the preset's sizes, with `tokenizer`'s vocabulary."""
    from transformers import AutoModelForCausalLM, Qwen2Config, SiglipVisionConfig, SiglipVisionModel
    p = PRESETS[preset]
    torch.manual_seed(seed)
    vision = SiglipVisionModel(SiglipVisionConfig(image_size=p["image_size"], patch_size=p["patch_size"],
                                                  vision_use_head=False, **p["vision"]))
    vocab = 64 * math.ceil(len(tokenizer) / 64)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    llm_config = Qwen2Config(vocab_size=vocab, max_position_embeddings=32768, tie_word_embeddings=False,
                             bos_token_id=eos, eos_token_id=eos, pad_token_id=pad, **p["llm"])
    llm = AutoModelForCausalLM.from_config(llm_config, attn_implementation=attn_implementation)
    llm.generation_config.bos_token_id, llm.generation_config.eos_token_id = eos, eos
    llm.generation_config.pad_token_id = pad
    config = VideoLMConfig(p["image_size"], p["patch_size"], p["vision"]["hidden_size"], p["llm"]["hidden_size"])
    projector = MlpDownsampleProjector(config.vision_hidden, config.llm_hidden)
    return VideoLM(config, vision, projector, llm, tokenizer)


def build_from_pretrained(llm_path, vision_path, seed: int = 0, dtype=torch.bfloat16) -> VideoLM:
    """Assemble a VideoLM from a pretrained causal LM and SigLIP (the LongVILA recipe); the projector is new."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel
    torch.manual_seed(seed)
    llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype)
    vision = SiglipVisionModel.from_pretrained(vision_path, dtype=dtype)
    vc = vision.config
    config = VideoLMConfig(vc.image_size, vc.patch_size, vc.hidden_size, llm.config.hidden_size)
    projector = MlpDownsampleProjector(config.vision_hidden, config.llm_hidden).to(dtype)
    return VideoLM(config, vision, projector, llm, AutoTokenizer.from_pretrained(llm_path))


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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    init = sub.add_parser("init", formatter_class=fmt, help="create a fresh checkpoint")
    init.add_argument("--out", required=True, help="checkpoint folder to create")
    init.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                      help="sizes of a randomly initialised model (ignored with --llm/--vision-tower)")
    init.add_argument("--data", nargs="+", default=[],
                      help="record files (.jsonl) whose text trains the preset's tokenizer")
    init.add_argument("--vocab-size", type=int, default=None, help="tokenizer size (default: the preset's)")
    init.add_argument("--llm", default=None, help="a pretrained Hugging Face causal LM folder instead of a preset")
    init.add_argument("--vision-tower", default=None, help="a pretrained SigLIP folder (with --llm)")
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
        if args.llm:
            model = build_from_pretrained(args.llm, args.vision_tower, seed=args.seed)
        else:
            if not args.data:
                ap.error("a preset model trains its tokenizer on your records: pass --data FILE.jsonl")
            vocab = args.vocab_size or PRESETS[args.preset]["vocab_size"]
            model = build_from_preset(args.preset, train_tokenizer(tokenizer_corpus(args.data), vocab), args.seed)
        if args.untie_embeddings:
            untie_embeddings(model.llm)
        model.save(args.out)
        print(f"wrote {args.out}")
        args.path = args.out
    model = VideoLM.load(args.path)
    print(f"{args.path}: vision tower {count_parameters(model.vision_tower):,} params, projector "
          f"{count_parameters(model.mm_projector):,}, llm {count_parameters(model.llm):,} "
          f"({model.llm.config.model_type}); image {model.config.image_size}px, "
          f"{model.config.tokens_per_frame} tokens per frame (+ separator), vocab {len(model.tokenizer)}")


if __name__ == "__main__":
    main()
