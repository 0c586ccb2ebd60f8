"""Image and text questions beside videos, for both families: the log-probs through our path (image
embeddings from encode_video of the picture as one frame, the family's prompt, build_sequence_batch /
build_packed_batch, token_logprobs) equal the family's own forward in transformers, per sequence, shared
prefix, and under sequence parallelism (sp = 2, gloo).

VILA: the release's image rows are the picture's projector tokens then "\\n" (its BasicImageEncoder), in the
ChatML turn where <image> stood; the reference is the plain Qwen2 of llm/ on embeddings built here from the
release's formulas (test_release.reference_video_embeds). Qwen2.5-VL: the reference is
Qwen2_5_VLForConditionalGeneration on <|image_pad|> ids with its own image processor's pixels, and its own
M-RoPE positions (for an image, transformers and vLLM agree: one temporal patch at time 0).
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2VLImageProcessorPil

import model as M
import mrsp
import synth
from checkpoint import CheckpointError
from dist import allreduce_gradients, run_ranks
from test_qwen_vl import hf_model, hub_folder  # noqa: F401  (module fixtures: a Qwen2.5-VL written by transformers)
from test_release import reference_video_embeds, write_release_checkpoint

QUESTION = "Question: How many scenes are red?"
CHATML_USER = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
CHATML_END = "<|im_end|>\n<|im_start|>assistant\n"
RESPONSES = [[7, 8, 9], [11, 12]]


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A 50 x 40 RGB PNG of noise: not square, so the resize to the tower's size does real work."""
    path = tmp_path_factory.mktemp("image") / "pic.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


def resized(path, size: int) -> np.ndarray:
    """The picture as the releases resize it: PIL's bicubic resize of the whole image -> [size, size, 3]."""
    return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC))


def our_prompt(model, media: str, picture) -> M.Prompt:
    with torch.no_grad():
        embeds = model.encode_video(model.image_frames(picture)) if media == "image" else None
    return model.prompt("", embeds, QUESTION, media=media)


def response_logprobs(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """log softmax of the logits [L + R, V] at the R positions that predict `ids` -> [R]."""
    R = len(ids)
    return torch.log_softmax(logits[-R - 1:-1].float(), -1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)


def ours_per_response(model, prompt: M.Prompt, packed: bool) -> list[torch.Tensor]:
    """Our log-probs of RESPONSES after `prompt`: one padded batch of [prompt; r] rows, or one packed row."""
    if packed:
        M.enable_shared_prefix(model)
        got = model.token_logprobs(model.build_packed_batch([prompt], [RESPONSES]))              # [2, R_max]
        return [got[i, :len(r)] for i, r in enumerate(RESPONSES)]
    got = model.token_logprobs(model.build_sequence_batch([prompt] * 2, RESPONSES))             # [2, S]
    L = len(prompt)
    return [got[i, L - 1:L - 1 + len(r)] for i, r in enumerate(RESPONSES)]


# ---- VILA ----

@pytest.fixture(scope="module")
def vila_folder(tmp_path_factory, tiny_tokenizer):
    return write_release_checkpoint(tmp_path_factory.mktemp("vila") / "LongVILA-R1-tiny", tiny_tokenizer)


def vila_reference(folder, media: str, picture, response: list[int]) -> torch.Tensor:
    """The release's prompt built by hand, through llm/ alone: ChatML text, and for an image its projector
    tokens (the release's formulas) then the embedding of "\\n", where <image> stood."""
    llm = AutoModelForCausalLM.from_pretrained(folder / "llm", attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(folder / "llm")
    embed = lambda text: llm.get_input_embeddings()(torch.tensor(tok(text, add_special_tokens=False).input_ids))
    pieces = [embed(CHATML_USER)]
    if media == "image":
        image = reference_video_embeds(folder, resized(picture, 32)[None], 2, "row")           # [16, D]
        pieces += [image, embed("\n")]
    pieces += [embed(QUESTION + CHATML_END), llm.get_input_embeddings()(torch.tensor(response))]
    with torch.no_grad():
        logits = llm(inputs_embeds=torch.cat(pieces)[None]).logits[0]                           # [L + R, V]
    return response_logprobs(logits, response)


@pytest.mark.parametrize("packed", [False, True], ids=["per-sequence", "shared-prefix"])
@pytest.mark.parametrize("media", ["image", "text"])
def test_vila_image_and_text_logprobs_equal_the_release_prompt_through_its_llm(vila_folder, picture, media, packed):
    model = M.VideoLM.load(vila_folder).eval()
    prompt = our_prompt(model, media, picture)
    assert len(prompt) == model.family.prompt_length(model, "", QUESTION, 1, media=media)
    with torch.no_grad():
        got = ours_per_response(model, prompt, packed)
    for r, lp in zip(RESPONSES, got):
        torch.testing.assert_close(lp, vila_reference(vila_folder, media, picture, r), rtol=1e-5, atol=1e-5)


def test_vila_image_encoder_end_tokens_are_read_and_written_back(tmp_path, tiny_tokenizer, picture):
    """config.json's image_encoder decides the text after an image ("\\n" when it says nothing); a save
    writes it back for the release's code to read; start_tokens are refused."""
    import json
    encoder = {"_target_": "llava.model.encoders.BasicImageEncoder", "end_tokens": "Question:"}
    folder = write_release_checkpoint(tmp_path / "ckpt", tiny_tokenizer, image_encoder=json.dumps(encoder))
    model = M.VideoLM.load(folder).eval()
    prompt = our_prompt(model, "image", picture)
    Lb = len(model.encode_text(CHATML_USER))
    end = model.embed_ids(model.encode_text("Question:"))                                        # [s, D]
    torch.testing.assert_close(prompt.embeds[Lb + 16:Lb + 16 + len(end)], end, rtol=0, atol=0)
    assert len(prompt) == Lb + 16 + len(end) + len(model.encode_text(QUESTION + CHATML_END))
    model.save(tmp_path / "ours")
    assert json.loads(json.loads((tmp_path / "ours" / "config.json").read_text())["image_encoder"]) == encoder
    assert M.VideoLM.load(tmp_path / "ours").config.image_separator == "Question:"
    bad = write_release_checkpoint(tmp_path / "bad", tiny_tokenizer,
                                   image_encoder=json.dumps({**encoder, "start_tokens": "<image>"}))
    with pytest.raises(CheckpointError, match="image_encoder .* is not supported"):
        M.VideoLM.load(bad)


def test_vila_refuses_images_under_dynamic_tiling(tmp_path, tiny_tokenizer, picture):
    folder = write_release_checkpoint(tmp_path / "ckpt", tiny_tokenizer, image_aspect_ratio="dynamic")
    model = M.VideoLM.load(folder)   # its videos are read as ever
    with pytest.raises(CheckpointError, match="image_aspect_ratio .dynamic.: images are read only as .resize."):
        model.image_frames(picture)


# ---- Qwen2.5-VL ----

def qwen_reference(hf, model, media: str, picture, response: list[int]) -> torch.Tensor:
    """transformers' own forward: input ids with one <|image_pad|> per merged token, pixels from its own image
    processor (the picture resized to the frame size first, as we read it), its own M-RoPE positions."""
    tok = model.tokenizer
    size = model.config.image_size
    kwargs, image = {}, ""
    if media == "image":
        processor = Qwen2VLImageProcessorPil(do_resize=False, patch_size=14, temporal_patch_size=2, merge_size=2)
        kwargs = dict(processor(images=[resized(picture, size)], return_tensors="pt"))
        image = "<|vision_start|>" + "<|image_pad|>" * (size // 28) ** 2 + "<|vision_end|>"
    ids = torch.tensor([tok(CHATML_USER + image + QUESTION + CHATML_END, add_special_tokens=False).input_ids
                        + response])                                                            # [1, L + R]
    # what its processor hands the model beside the ids: which tokens are an image's (1), so that
    # transformers computes the image's M-RoPE positions itself (without them it would count 0..L-1)
    kwargs["mm_token_type_ids"] = (ids == tok.convert_tokens_to_ids("<|image_pad|>")).int()
    with torch.no_grad():
        logits = hf(input_ids=ids, **kwargs).logits[0]                                          # [L + R, V]
    return response_logprobs(logits, response)


@pytest.mark.parametrize("packed", [False, True], ids=["per-sequence", "shared-prefix"])
@pytest.mark.parametrize("media", ["image", "text"])
def test_qwen_image_and_text_logprobs_equal_transformers_forward(hub_folder, hf_model, picture, media, packed):
    model = M.VideoLM.load(hub_folder, attn_implementation="sdpa").eval()
    prompt = our_prompt(model, media, picture)
    assert len(prompt) == model.family.prompt_length(model, "", QUESTION, 1, media=media)
    with torch.no_grad():
        got = ours_per_response(model, prompt, packed)
    for r, lp in zip(RESPONSES, got):
        torch.testing.assert_close(lp, qwen_reference(hf_model, model, media, picture, r), rtol=1e-5, atol=1e-5)


def test_qwen_image_and_text_positions_written_out(hub_folder, picture):
    """The tiny model's row and column rotary frequencies are too slow (rope_theta 1e6, head_dim 32) for the
    log-probs above to see a position off on those axes, so the positions are checked here, written out:
    the text before on all axes; the 4 x 4 image tokens at (Lb, Lb + h, Lb + w); the text after from Lb + 4.
    A text prompt: 0..L-1 on every axis. The vLLM request carries the image's embeddings with grid (1, 8, 8)
    in patches, and a text prompt its ids alone."""
    model = M.VideoLM.load(hub_folder, attn_implementation="sdpa").eval()
    text = our_prompt(model, "text", picture)
    assert text.positions.tolist() == [list(range(len(text)))] * 3
    ids = model.tokenizer(CHATML_USER + QUESTION + CHATML_END, add_special_tokens=False).input_ids
    assert text.engine_input() == {"prompt_token_ids": ids}
    prompt = our_prompt(model, "image", picture)
    Lb = len(model.encode_text(CHATML_USER + "<|vision_start|>"))
    La = len(prompt) - Lb - 16
    rows = [[i] * 3 for i in range(Lb)] + [[Lb, Lb + h, Lb + w] for h in range(4) for w in range(4)] + \
        [[Lb + 4 + i] * 3 for i in range(La)]
    assert prompt.positions.tolist() == torch.tensor(rows).T.tolist()
    request = prompt.engine_input()
    assert request["multi_modal_data"]["image"]["image_grid_thw"].tolist() == [[1, 8, 8]]  # (images, 3)
    pad = model.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert request["prompt_token_ids"].count(pad) == 16


# ---- sequence parallel ----

def weights(shape) -> torch.Tensor:
    """A loss weight per position, by its index alone: the same whatever padding sp adds to the rows."""
    rows, cols = torch.arange(shape[0])[:, None], torch.arange(shape[1])[None, :]
    return (1.0 + rows) * (1.0 + cols % 7) / 16                                                  # [B, S], <= 1


def sp_job(folders: list[str], picture: str) -> dict:
    """Per family, kind and layout: log-probs and LLM gradients under Ulysses with the SP group's ranks."""
    ps = mrsp.init_distributed(sp_size=int(os.environ["WORLD_SIZE"]))
    out = {}
    for folder in folders:
        model = M.VideoLM.load(folder, attn_implementation="sdpa").eval()
        model.freeze_vision()
        out[folder, "stage1"] = mrsp.stage1_encode(model, model.image_frames(picture), ps.sp_group)  # one step
        mrsp.enable_ulysses(model, ps.sp_group)
        for media in ("image", "text"):
            prompt = lambda: our_prompt(model, media, picture)  # anew for each pass: its text embeddings take grad
            for name, build in (("sequence", lambda: model.build_sequence_batch([prompt()] * 2, RESPONSES,
                                                                                ps.sp_rank, ps.sp_size)),
                                ("packed", lambda: model.build_packed_batch([prompt()], [RESPONSES], ps.sp_rank,
                                                                            ps.sp_size))):
                model.zero_grad(set_to_none=True)
                logprobs = mrsp.sp_token_logprobs(model, build(), ps.sp_group)
                (weights(logprobs.shape) * logprobs).sum().backward()
                allreduce_gradients(model, ps)
                out[folder, media, name] = (logprobs.detach(),
                                            {n: p.grad.clone() for n, p in model.llm.named_parameters()})
    return out


def test_sequence_parallel_image_and_text_equal_one_process(vila_folder, hub_folder, picture):
    """sp = 2, both families in one pair of processes: stage 1 of a one-step image (one rank encodes
    nothing) = encode_video; Ulysses over the short text prompt and the image prompt = one process (checked
    against transformers above), log-probs and gradients, both layouts."""
    folders = [str(vila_folder), str(hub_folder)]
    ranks = run_ranks(sp_job, 2, folders, str(picture), timeout=300)
    for folder in folders:
        model = M.VideoLM.load(folder, attn_implementation="sdpa").eval()
        model.freeze_vision()
        M.enable_shared_prefix(model)
        with torch.no_grad():
            image = model.encode_video(model.image_frames(picture))
        for rank in ranks:
            torch.testing.assert_close(rank[folder, "stage1"], image, rtol=1e-5, atol=1e-5)
        for media in ("image", "text"):
            prompt = lambda: our_prompt(model, media, picture)
            for name, build in (("sequence", lambda: model.build_sequence_batch([prompt()] * 2, RESPONSES)),
                                ("packed", lambda: model.build_packed_batch([prompt()], [RESPONSES]))):
                model.zero_grad(set_to_none=True)
                logprobs = model.token_logprobs(build())
                (weights(logprobs.shape) * logprobs).sum().backward()
                for rank in ranks:
                    got, grads = rank[folder, media, name]
                    S = logprobs.shape[1]   # sp pads the rows to a multiple of 2: nothing is scored there
                    assert not got[:, S:].any()
                    torch.testing.assert_close(got[:, :S], logprobs.detach(), rtol=1e-5, atol=1e-5)
                    for n, p in model.llm.named_parameters():
                        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6,
                                                   msg=f"{model.family.name} {media} {name} {n}")


# ---- one loop for all kinds ----

def test_mixed_sft_rl_eval_with_bad_images_skipped(tmp_path, capsys, caplog):
    """The mixed task (synth.py --images --texts) through SFT, GRPO and eval on a tiny VILA, as the
    command lines run them: a CMYK and a missing image are named and skipped; in RL's step (all 9 good
    records once) the vision tower runs once per video and per image and never for a text question; eval
    reports accuracy per kind."""
    import json
    import eval as evaluation
    import rl
    import sft
    root = tmp_path / "data"
    synth.main(["--out", str(root), "--n", "4", "--images", "4", "--texts", "4", "--seed", "1",
               "--max-scenes", "3", "--test-frac", "0.25", "--answers", "open"])
    Image.new("CMYK", (16, 16)).save(root / "images" / "cmyk.jpg")
    bad = [{"problem_id": f"bad-{name}", "images": f"images/{name}", "problem": "What colour is the picture?",
            "problem_type": "general", "answer": "red"} for name in ("cmyk.jpg", "gone.png")]
    train, test = root / "train.jsonl", root / "test.jsonl"
    with open(train, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in bad)
    M.main(["init", "--out", str(tmp_path / "init"), "--data", str(train), "--question-prompt", "plain"])
    frames = ["--num-frames", "2"]
    sft.main(["--init", str(tmp_path / "init"), "--data", str(train), "--out", str(tmp_path / "sft"), "--steps", "2",
              "--batch-size", "3", "--save-every", "0", *frames])
    assert f"skipped: {root / 'images' / 'cmyk.jpg'}: pixel mode CMYK is not read" in caplog.text
    assert f"skipped: {root / 'images' / 'gone.png'}: image file not found" in caplog.text
    err = capsys.readouterr().err
    assert "9 records with a readable video or image (or none); skipped 1 whose file is missing, 1 whose file " \
           "cannot be read" in err
    rl.main(["--init", str(tmp_path / "sft" / "final"), "--data", str(train), "--out", str(tmp_path / "rl"),
             "--steps", "1", "--batch-size", "9", "--group-size", "2", "--max-new-tokens", "6", "--engine", "torch",
             "--micro-batch-size", "6", "--save-every", "0", *frames])
    row = json.loads((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["vision_runs"] == 6 and row["skipped_records"] == 0     # 3 videos + 3 images, each once
    assert evaluation.main(["--checkpoint", str(tmp_path / "rl" / "final"), "--data", str(test), "--out",
                            str(tmp_path / "eval"), "--max-new-tokens", "6", "--engine", "torch", *frames]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert {kind: b["n"] for kind, b in report["by_data_type"].items()} == {"video": 1, "image": 1, "text": 1}
    assert report["errors"]["count"] == 0


def sft_job(argv: list[str]) -> None:
    import sft
    sft.main(argv)


def test_sharded_vision_training_refuses_mixed_kinds(tiny_checkpoint, tmp_path):
    """Two processes training the vision tower (FSDP shards it): a rank whose micro-batch held only text
    questions would skip the tower's all-gathers the other makes (without the check: SIGABRT), so a run
    on mixed kinds is refused up front."""
    synth.main(["--out", str(tmp_path / "data"), "--n", "2", "--texts", "2", "--test-frac", "0"])
    argv = ["--init", str(tiny_checkpoint), "--data", str(tmp_path / "data" / "train.jsonl"), "--out",
            str(tmp_path / "sft"), "--steps", "1", "--batch-size", "1", "--no-freeze-vision", "--num-frames", "2"]
    with pytest.raises(Exception, match="mixes text and video questions: with the vision tower training over 2"):
        run_ranks(sft_job, 2, argv, timeout=120)
