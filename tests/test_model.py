"""VideoLM: chunked encoding, response log-probs, checkpoint round trip."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import model as M
import vila


def random_frames(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_tokens_per_frame_follow_the_2x2_blocks(tiny_model):
    cfg = tiny_model.config
    assert cfg.tokens_per_frame == (cfg.image_size // cfg.patch_size // 2) ** 2 == 4
    video = tiny_model.encode_video(random_frames(3))
    assert video.shape == (3 * 4, tiny_model.llm.config.hidden_size)


@torch.no_grad()
def test_encode_video_in_chunks_equals_one_pass(tiny_model):
    frames = random_frames(7)
    one_pass = tiny_model.encode_video(frames, chunk_size=7)
    chunked = tiny_model.encode_video(frames, chunk_size=3)
    torch.testing.assert_close(chunked, one_pass, rtol=0, atol=1e-5)


def test_wrong_frame_size_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="expects 32x32"):
        tiny_model.encode_video(random_frames(2, size=48))


@torch.no_grad()
def test_vila_prompt_puts_a_separator_after_every_frame_inside_the_chat_turn(tiny_model):
    video = tiny_model.encode_video(random_frames(3))                  # [12, D]
    prompt = tiny_model.prompt("", video, "Question: red?").embeds
    chat_before, chat_after = vila.VilaFamily.chat_text(tiny_model.tokenizer, "", "Question: red?")
    assert chat_before.endswith("<|im_start|>user\n")                  # the video opens the user's turn
    assert chat_after == "Question: red?<|im_end|>\n<|im_start|>assistant\n"
    nb, na = len(tiny_model.encode_text(chat_before)), len(tiny_model.encode_text(chat_after))
    sep = tiny_model.embed_ids(tiny_model.encode_text("\n"))[0]
    assert prompt.shape[0] == nb + 3 * (4 + 1) + na
    torch.testing.assert_close(prompt[nb:nb + 4], video[:4])
    torch.testing.assert_close(prompt[nb + 4], sep)                    # after frame 1
    torch.testing.assert_close(prompt[nb + 9], sep)                    # after frame 2
    torch.testing.assert_close(prompt[nb + 14], sep)                   # after frame 3
    torch.testing.assert_close(prompt[-na:], tiny_model.embed_ids(tiny_model.encode_text(chat_after)))


@torch.no_grad()
def test_response_logprobs_equal_a_full_log_softmax(tiny_model):
    video = tiny_model.encode_video(random_frames(2))
    prompt = tiny_model.prompt("Watch the video.\n", video, "\nResponse: ")
    responses = [[5, 9, 11, 3], [7, 8]]
    shorter = M.Prompt(prompt.embeds[:-2], prompt.positions[:-2])
    batch = tiny_model.build_sequence_batch([prompt, shorter], responses)
    fast = tiny_model.token_logprobs(batch, temperature=0.7, block_rows=3)

    # the slow way: logits over every position, log-softmax, pick the next token
    logits = tiny_model.llm(inputs_embeds=batch.inputs_embeds, position_ids=batch.position_ids).logits
    slow = torch.log_softmax(logits.float() / 0.7, -1)
    L = len(prompt)
    for j, tok in enumerate(responses[0]):
        assert fast[0, L - 1 + j].item() == pytest.approx(slow[0, L - 1 + j, tok].item(), abs=1e-5)
    for j, tok in enumerate(responses[1]):
        assert fast[1, L - 3 + j].item() == pytest.approx(slow[1, L - 3 + j, tok].item(), abs=1e-5)
    assert batch.loss_mask.sum().item() == 6
    assert (fast[~batch.loss_mask] == 0).all()


@torch.no_grad()
def test_padding_does_not_change_a_sequence(tiny_model):
    video = tiny_model.encode_video(random_frames(2))
    prompt = tiny_model.prompt("Watch the video.\n", video, "\nResponse: ")
    alone = tiny_model.token_logprobs(tiny_model.build_sequence_batch([prompt], [[4, 5]]))
    padded = tiny_model.token_logprobs(tiny_model.build_sequence_batch([prompt, prompt], [[4, 5], [4, 5, 6, 7, 8]]))
    S = alone.shape[1]
    torch.testing.assert_close(padded[0, :S], alone[0], rtol=0, atol=1e-5)


@torch.no_grad()
def test_save_load_round_trip_gives_identical_logprobs(tiny_model, tmp_path):
    frames = random_frames(2)
    def logprobs(m):
        prompt = m.prompt("Watch the video.\n", m.encode_video(frames), "\nResponse: ")
        return m.token_logprobs(m.build_sequence_batch([prompt], [[4, 5, 6]]))
    tiny_model.save(tmp_path / "ck")
    loaded = M.VideoLM.load(tmp_path / "ck").eval()
    torch.testing.assert_close(logprobs(loaded), logprobs(tiny_model), rtol=0, atol=0)
    assert loaded.tokenizer.encode("<think>") == tiny_model.tokenizer.encode("<think>")


def test_llm_folder_loads_alone_with_auto_model(tiny_checkpoint, tiny_model):
    llm = AutoModelForCausalLM.from_pretrained(tiny_checkpoint / "llm")
    ids = torch.tensor([[1, 5, 9]])
    torch.testing.assert_close(llm(ids).logits, tiny_model.llm(ids).logits)
    assert llm.config.eos_token_id == tiny_model.tokenizer.eos_token_id


def test_think_answer_tags_are_single_tokens(tiny_tokenizer):
    for tag in M.SPECIAL_TEXT_TOKENS:
        assert len(tiny_tokenizer.encode(tag, add_special_tokens=False)) == 1


def test_interrupted_save_leaves_no_checkpoint(tiny_model, tmp_path):
    target = tmp_path / "checkpoint-5"
    with pytest.raises(RuntimeError):
        with M.atomic_directory(target) as tmp:
            tiny_model.write(tmp)
            raise RuntimeError("killed mid-save")
    assert not target.exists() and not list(tmp_path.iterdir())
    assert not M.is_complete_checkpoint(target)


def test_save_over_an_existing_checkpoint_replaces_it(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "final")
    with torch.no_grad():
        tiny_model.mm_projector.layers[4].bias.fill_(0.5)
    tiny_model.save(tmp_path / "final")
    assert M.VideoLM.load(tmp_path / "final").mm_projector.layers[4].bias[0].item() == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def tie(model: M.VideoLM) -> M.VideoLM:
    """The same model with its LM head tied to the input embedding, as Qwen2-0.5B/1.5B ship."""
    model.llm.get_output_embeddings().weight = model.llm.get_input_embeddings().weight
    model.llm.config.tie_word_embeddings = True
    return model


def test_untie_embeddings_keeps_the_function_and_separates_the_weights(tiny_model, tmp_path):
    tied = tie(tiny_model)
    ids = torch.tensor([[3, 7, 11, 5]])
    with torch.no_grad():
        before = tied.llm(input_ids=ids).logits
        M.untie_embeddings(tied.llm)
        after = tied.llm(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    head, embed = tied.llm.get_output_embeddings().weight, tied.llm.get_input_embeddings().weight
    assert head is not embed and head.data_ptr() != embed.data_ptr()
    tied.save(tmp_path / "untied")
    loaded = M.VideoLM.load(tmp_path / "untied")
    assert loaded.llm.get_output_embeddings().weight is not loaded.llm.get_input_embeddings().weight


def test_sharding_a_tied_llm_is_refused_with_the_way_out(tiny_model):
    import mrsp
    import train
    with pytest.raises(ValueError, match="--untie-embeddings"):
        train.shard_model(tie(tiny_model), mrsp.ParallelState(world_size=2, dp_size=2))
