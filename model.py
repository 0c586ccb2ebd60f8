"""VideoLM: a video vision-language model in the LongVILA layout.

    frames [T, H, W, 3] uint8
      -> vision tower (SigLIP)           patch features [T, P, C]
      -> mm_projector (mlp_downsample)   video embeddings [T, P/4, D]   (2x2 patch merge, then an MLP)
      -> spliced between the prompt's text embeddings, a newline after every frame
      -> causal LM (Qwen2 by default)    per-token log-probs of the response

Everything downstream (MR-SP, rollout, SFT, RL, eval) goes through four calls:
`encode_video`, `prompt_embeds`, `build_sequence_batch` and `token_logprobs`.

A checkpoint folder (shared/DESIGN.md) holds `config.json`, `llm/` (a plain Hugging Face causal LM plus its
tokenizer, loadable alone by AutoModelForCausalLM and by vLLM), `vision_tower/` and `mm_projector/`.

Run:
    python model.py init --out runs/init --preset tiny --data data/synth/train.jsonl
    python model.py init --out runs/init --llm PATH/Qwen2-7B --vision-tower PATH/siglip-so400m
    python model.py info runs/init
"""
import argparse
import contextlib
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


# ---- the batch the log-prob passes consume ----

@dataclass
class SequenceBatch:
    """Right-padded full sequences (prompt + response). Right padding needs no attention mask under a
    causal LM: a real token never attends to the padding after it."""
    inputs_embeds: torch.Tensor  # [B, S, D]
    targets: torch.Tensor        # [B, S] the token predicted at each position; IGNORE where no loss
    position_ids: torch.Tensor   # [B, S]

    @property
    def loss_mask(self) -> torch.Tensor:  # [B, S] bool
        return self.targets != IGNORE


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

    def build_sequence_batch(self, prompt_embeds: list[torch.Tensor],
                             response_ids: list[list[int]]) -> SequenceBatch:
        """Prompt embeddings [L_i, D] and response token ids [R_i] -> one right-padded SequenceBatch.

        Position L_i - 1 + j predicts response token j, so targets[i, L_i-1 : L_i-1+R_i] = response.
        Example: prompt of 3 positions, response [7, 8] -> inputs p0 p1 p2 e7 e8, targets _ _ 7 8 _.
        """
        rows, targets = [], []
        for prompt, resp in zip(prompt_embeds, response_ids):
            resp = torch.as_tensor(resp, dtype=torch.long, device=self.device)
            if len(resp) == 0:
                raise ValueError("empty response: nothing to score")
            rows.append(torch.cat([prompt, self.embed_ids(resp).to(prompt.dtype)]))  # [L + R, D]
            tgt = torch.full((len(prompt) + len(resp),), IGNORE, dtype=torch.long, device=self.device)
            tgt[len(prompt) - 1:len(prompt) - 1 + len(resp)] = resp
            targets.append(tgt)
        S = max(len(r) for r in rows)
        inputs = torch.stack([F.pad(r, (0, 0, 0, S - len(r))) for r in rows])    # [B, S, D]
        targets = torch.stack([F.pad(t, (0, S - len(t)), value=IGNORE) for t in targets])  # [B, S]
        positions = torch.arange(S, device=self.device).expand(len(rows), S)    # [B, S]
        return SequenceBatch(inputs, targets, positions)

    # ---- log-probs ----

    def token_logprobs(self, batch: SequenceBatch, temperature: float = 1.0,
                       chunk_rows: int = 4096, num_chunks: int | None = None) -> torch.Tensor:
        """Log-prob of every target token under the LLM: [B, S], zero where targets == IGNORE.

        Logits are computed only at scored positions and `chunk_rows` at a time: a long video is
        hundreds of thousands of positions and a full [S, vocab] logit tensor would not fit.
        `batch` may be a sequence-parallel shard (mrsp.py): positions then come from `position_ids`.
        `num_chunks` fixes how many times the LM head runs (some chunks may be empty): under FSDP every
        rank must make the same calls, however many positions its shard scores.
        """
        hidden = self.llm.get_decoder()(inputs_embeds=batch.inputs_embeds, position_ids=batch.position_ids,
                                        use_cache=False).last_hidden_state       # [B, S, D]
        mask = batch.loss_mask                                                    # [B, S]
        h = hidden[mask]                                                          # [N, D]
        tgt = batch.targets[mask]                                                 # [N]
        lm_head = self.llm.get_output_embeddings()
        num_chunks = num_chunks or max(1, math.ceil(len(h) / chunk_rows))
        pieces = []
        for rows in torch.tensor_split(torch.arange(len(h), device=h.device), num_chunks):
            logits = lm_head(h[rows]).float() / temperature                      # [n, V]
            logp = torch.log_softmax(logits, dim=-1)
            pieces.append(logp.gather(1, tgt[rows, None]).squeeze(1))              # [n]
        out = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)  # [B, S]
        # Even with nothing to score (a sequence-parallel shard that is all video) the result goes through
        # the LM head and the decoder: every rank's graph has the same shape, so backward runs the same
        # collectives (Ulysses all-to-alls, FSDP reduce-scatters) in the same order everywhere.
        return out.masked_scatter(mask, torch.cat(pieces))

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
