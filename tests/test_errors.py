"""Errors a user can act on: a damaged checkpoint names the file, its size and the size it should have;
each script prints one `error:` line for bad input, no traceback; a sharded checkpoint loads, trains and
is saved back in its shards."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import model as M
import synth

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sharded_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with its LLM saved in 4 shards + model.safetensors.index.json, as the 7B releases
    are (there: ~4 GB shards; here: 1 MB)."""
    from transformers import AutoModelForCausalLM
    path = tmp_path_factory.mktemp("sharded") / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    llm = AutoModelForCausalLM.from_pretrained(path / "llm")
    (path / "llm" / "model.safetensors").unlink()
    llm.save_pretrained(path / "llm", max_shard_size="1MB")
    return path


def damaged_copy(checkpoint: Path, tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    shutil.copytree(checkpoint, path)
    return path


def cut(file: Path, size: int) -> int:
    """Truncate `file` to `size` bytes, as a download that stopped; returns the full size."""
    full = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(size)
    return full


def header_bytes(file: Path) -> int:
    """8 + the header's length: safetensors' first 8 bytes, a little-endian u64."""
    return 8 + int.from_bytes(file.read_bytes()[:8], "little")


# ---- weight files ----

@pytest.mark.parametrize("part", ["llm/model.safetensors", "vision_tower/model.safetensors",
                                  "mm_projector/model.safetensors"])
def test_a_weight_file_cut_in_half_is_named_with_its_size(tiny_checkpoint, tmp_path, part):
    path = damaged_copy(tiny_checkpoint, tmp_path)
    file = path / part
    full = cut(file, file.stat().st_size // 2)
    with pytest.raises(M.CheckpointError) as e:
        M.VideoLM.load(path)
    assert str(e.value) == (f"{file}: {full // 2:,} bytes, its header says {full:,} (cut short): "
                            "re-download this file")


def test_a_file_cut_inside_its_header_is_named(tiny_checkpoint, tmp_path):
    path = damaged_copy(tiny_checkpoint, tmp_path)
    file = path / "mm_projector" / "model.safetensors"
    need = header_bytes(file)
    cut(file, 100)
    with pytest.raises(M.CheckpointError, match=rf"^{file}: 100 bytes, its header says {need:,} bytes of header "
                                                r"alone \(cut short\): re-download this file$"):
        M.VideoLM.load(path)
    cut(file, 3)
    with pytest.raises(M.CheckpointError, match=rf"^{file}: 3 bytes, its header says 8 bytes of header length"):
        M.VideoLM.load(path)


def test_a_header_that_is_not_json_is_named(tiny_checkpoint, tmp_path):
    path = damaged_copy(tiny_checkpoint, tmp_path)
    file = path / "vision_tower" / "model.safetensors"
    raw = bytearray(file.read_bytes())
    raw[8:12] = b"\x00\xff\x00\xff"  # the header's opening '{"...' overwritten
    file.write_bytes(bytes(raw))
    with pytest.raises(M.CheckpointError, match=rf"^{file}: its [\d,]+-byte header is not valid JSON .*re-download"):
        M.VideoLM.load(path)


def test_a_missing_shard_is_named(sharded_checkpoint, tmp_path):
    path = damaged_copy(sharded_checkpoint, tmp_path)
    weight_map = json.loads((path / "llm" / "model.safetensors.index.json").read_text())["weight_map"]
    shard = path / "llm" / "model-00003-of-00004.safetensors"
    shard.unlink()
    listed = sum(f == shard.name for f in weight_map.values())
    with pytest.raises(M.CheckpointError) as e:
        M.VideoLM.load(path)
    assert str(e.value) == (f"{shard} is missing: model.safetensors.index.json lists it with {listed} tensors; "
                            "re-download this file")


def test_a_cut_shard_is_named_for_the_model_and_for_the_vllm_engine(sharded_checkpoint, tmp_path):
    import rollout
    path = damaged_copy(sharded_checkpoint, tmp_path)
    shard = path / "llm" / "model-00002-of-00004.safetensors"
    full = cut(shard, 9 * shard.stat().st_size // 10)  # 9 of 10 GB
    expected = f"{shard}: {9 * full // 10:,} bytes, its header says {full:,} (cut short): re-download this file"
    with pytest.raises(M.CheckpointError) as e:
        M.VideoLM.load(path)
    assert str(e.value) == expected
    with pytest.raises(M.CheckpointError) as e:  # the engine's own copy of the LLM, before vLLM reads it
        rollout.VLLMEngine(path / "llm")
    assert str(e.value) == expected


def test_a_tensor_of_another_dtype_is_named(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file
    path = damaged_copy(tiny_checkpoint, tmp_path)
    file = path / "llm" / "model.safetensors"
    weights = load_file(str(file))
    weights["model.norm.weight"] = weights["model.norm.weight"].bfloat16()
    save_file(weights, str(file), metadata={"format": "pt"})
    assert json.loads((path / "llm" / "config.json").read_text())["dtype"] == "float32"
    with pytest.raises(M.CheckpointError, match=rf"^{file}: tensor 'model.norm.weight' is BF16, "
                                                rf"{path / 'llm' / 'config.json'} says F32"):
        M.VideoLM.load(path)


def test_an_empty_config_is_named(tiny_checkpoint, tmp_path):
    path = damaged_copy(tiny_checkpoint, tmp_path)
    for part in ("config.json", "llm/config.json"):
        shutil.copy(tiny_checkpoint / part, path / part)
        (path / part).write_text("")
        with pytest.raises(M.CheckpointError, match=rf"^{path / part} is empty \(0 bytes\): re-download this file$"):
            M.VideoLM.load(path)
        shutil.copy(tiny_checkpoint / part, path / part)


def test_a_cut_tokenizer_file_is_named(tiny_checkpoint, tmp_path):
    path = damaged_copy(tiny_checkpoint, tmp_path)
    file = path / "llm" / "tokenizer.json"
    cut(file, file.stat().st_size // 2)
    with pytest.raises(M.CheckpointError, match=rf"^{file} is not valid JSON \(.*\): re-download this file$"):
        M.VideoLM.load(path)


def more_tokens(llm: Path):
    """The tokenizer of another model's vocabulary: two tokens more."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(llm)
    tokenizer.add_tokens(["<extra_0>", "<extra_1>"])
    tokenizer.save_pretrained(llm)


def more_rows(llm: Path):
    """The weights of another model's vocabulary: three embedding rows more."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(llm)
    model.resize_token_embeddings(model.config.vocab_size + 3)
    model.save_pretrained(llm)


@pytest.mark.parametrize("change", [more_tokens, more_rows])
def test_tokens_without_an_embedding_row_are_named_and_padding_rows_load(tiny_checkpoint, tmp_path, change):
    from transformers import AutoTokenizer
    path = damaged_copy(tiny_checkpoint, tmp_path)
    change(path / "llm")
    with safe_open(str(path / "llm" / "model.safetensors"), framework="pt") as f:
        rows = f.get_slice("model.embed_tokens.weight").get_shape()[0]
    n = len(AutoTokenizer.from_pretrained(path / "llm"))
    assert abs(n - rows) in (2, 3)
    if rows > n:  # padding rows, as Qwen2's 152,064 rows for 151,665 tokens: never looked up
        assert M.VideoLM.load(path).llm.get_input_embeddings().num_embeddings == rows
        return
    with pytest.raises(M.CheckpointError, match=rf"^{path / 'llm'}: the tokenizer has {n:,} tokens, the LLM's "
                                                rf"input embedding {rows:,} rows"):
        M.VideoLM.load(path)


# ---- sharded checkpoints end to end ----

def shard_map(llm: Path) -> dict:
    return json.loads((llm / "model.safetensors.index.json").read_text())["weight_map"]


def test_a_sharded_checkpoint_trains_and_is_saved_in_its_shards(sharded_checkpoint, tmp_path):
    import sft
    synth.main(["--out", str(tmp_path / "data"), "--n", "4", "--max-scenes", "3", "--test-frac", "0.01"])
    sft.main(["--init", str(sharded_checkpoint), "--data", str(tmp_path / "data" / "train.jsonl"),
              "--out", str(tmp_path / "sft"), "--steps", "2", "--batch-size", "2", "--num-frames", "4",
              "--lr", "1e-3", "--save-every", "0"])
    saved, released = tmp_path / "sft" / "final" / "llm", sharded_checkpoint / "llm"
    assert not (saved / "model.safetensors").exists()
    assert shard_map(saved) == shard_map(released)  # the same tensors in the same 4 files
    assert len(set(shard_map(saved).values())) == 4
    changed = []
    for name, file in shard_map(saved).items():     # in the same dtype and shape, trained
        with safe_open(str(saved / file), framework="pt") as a, safe_open(str(released / file), framework="pt") as b:
            assert a.get_slice(name).get_shape() == b.get_slice(name).get_shape()
            assert a.get_slice(name).get_dtype() == b.get_slice(name).get_dtype()
            changed.append(not a.get_tensor(name).equal(b.get_tensor(name)))
    assert all(changed)
    M.VideoLM.load(tmp_path / "sft" / "final")


# ---- one line per expected error ----

def run_script(*args, torchrun: bool = False) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"] if torchrun else \
        [sys.executable]
    return subprocess.run([*launcher, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


# Runs each command line as `python SCRIPT ARGS...` runs it (the script as __main__, its sys.argv), one
# after another in one interpreter, so that torch, transformers and vLLM are imported once and not once per
# command. Each run's exit code and stderr go to a JSON file; an exception that escapes a script is printed
# with its traceback, as the interpreter prints one.
ONE_INTERPRETER = """
import contextlib, io, json, runpy, sys, traceback
commands, out, results = json.loads(sys.argv[1]), sys.argv[2], []
for argv in commands:
    sys.argv, stderr, code = list(argv), io.StringIO(), 0
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"returncode": code, "stderr": stderr.getvalue()})
with open(out, "w") as f:
    json.dump(results, f)
"""


def run_scripts(commands: dict, folder: Path) -> dict:
    """{name: command line} -> {name: {"returncode", "stderr"}}, all run in one subprocess."""
    out = folder / "results.json"
    subprocess.run([sys.executable, "-c", ONE_INTERPRETER, json.dumps([list(map(str, c)) for c in commands.values()]),
                    str(out)],
                   cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    return dict(zip(commands, json.loads(out.read_text())))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def cut_projector(tiny_checkpoint, tmp_path_factory) -> tuple[Path, str]:
    """A checkpoint whose projector download stopped halfway, and the one line a script must print."""
    path = damaged_copy(tiny_checkpoint, tmp_path_factory.mktemp("cut"))
    file = path / "mm_projector" / "model.safetensors"
    full = cut(file, file.stat().st_size // 2)
    return path, f"error: {file}: {full // 2:,} bytes, its header says {full:,} (cut short): re-download this file"


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("records") / "train.jsonl"
    synth.write_mp4(path.parent / "v.mp4", np.zeros((4, 32, 32, 3), dtype=np.uint8), fps=2.0)  # a readable video
    path.write_text(json.dumps({"problem_id": 1, "videos": "v.mp4", "problem": "Which colour?",
                                "options": ["red", "blue"], "problem_type": "multiple_choice",
                                "reasoning": "It is red.", "answer": "A"}) + "\n")
    return path


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict:
    """A record file with no usable row (one lacks fields, one is not JSON) and a file that is no video."""
    folder = tmp_path_factory.mktemp("bad")
    (folder / "bad.jsonl").write_text('{"problem_id": 1}\nnot json\n')
    (folder / "clip.mp4").write_bytes(b"not a video")
    return {"records": folder / "bad.jsonl", "video": folder / "clip.mp4", "folder": folder}


@pytest.fixture(scope="module")
def script_runs(tiny_checkpoint, cut_projector, records, bad_inputs, tmp_path_factory) -> dict:
    """Every script given bad input, run as a user runs it: {name: {"returncode", "stderr"}}."""
    path, _ = cut_projector
    out = tmp_path_factory.mktemp("outs")
    bad, video = bad_inputs["records"], bad_inputs["video"]
    return run_scripts({
        "model": ["model.py", "info", path],
        "sft": ["sft.py", "--init", path, "--data", records, "--out", out / "sft"],
        "rl": ["rl.py", "--init", path, "--data", records, "--out", out / "rl", "--batch-size", "1"],
        "eval": ["eval.py", "--checkpoint", path, "--data", records, "--out", out / "eval"],
        "bench": ["bench.py", "engines", "--checkpoint", path],
        "model --debug": ["model.py", "info", path, "--debug"],
        "frames": ["data.py", "frames", video],
        "sft bad records": ["sft.py", "--init", tiny_checkpoint, "--data", bad, "--out", out / "sft-bad"],
        "synth size": ["synth.py", "--out", out / "synth", "--size", "63"],
    }, out)


@pytest.mark.parametrize("script", ["model", "sft", "rl", "eval", "bench"])
def test_a_damaged_checkpoint_is_one_error_line(script, cut_projector, script_runs):
    run = script_runs[script]
    assert (run["returncode"], error_lines(run["stderr"])) == (1, [cut_projector[1]]), run["stderr"][-3000:]
    assert "Traceback" not in run["stderr"]


def test_a_bad_record_an_unreadable_video_and_misfit_flags_are_one_error_line(script_runs, bad_inputs):
    bad = bad_inputs["records"]
    # sft.py names each bad row as it skips it ("skipped: FILE line N, ..."), then stops with one error line
    for name, named in (("frames", f"{bad_inputs['video']}"), ("sft bad records", f"{bad}: 0 usable records"),
                        ("synth size", "--size must be even")):
        run = script_runs[name]
        assert run["returncode"] == 1 and len(error_lines(run["stderr"])) == 1, run["stderr"][-3000:]
        assert named in error_lines(run["stderr"])[0] and "Traceback" not in run["stderr"]
    assert f"skipped: {bad} line 1" in script_runs["sft bad records"]["stderr"]


def test_debug_shows_the_traceback(script_runs):
    run = script_runs["model --debug"]
    assert run["returncode"] == 1 and "Traceback" in run["stderr"] and "CheckpointError" in run["stderr"]
    assert error_lines(run["stderr"]) == []


PARTIAL_LINE_JOB = """
import os, sys
from datetime import timedelta
sys.path.insert(0, {root!r})
import errors
import torch.distributed as dist

def main():  # rank 1 is halfway through a progress bar when rank 0 reports its error
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=60))
    if os.environ["RANK"] == "1":
        sys.stderr.write("\\rLoading weights:  50%|#####     | 1/2")
        sys.stderr.flush()
        store.set("bar drawn", "1")
        store.wait(["error-printed-0"])
    else:
        store.wait(["bar drawn"])
    raise errors.UserError("a.safetensors: 10 bytes, its header says 20 (cut short): re-download this file")

errors.run_main(main)
"""


def test_under_torchrun_the_error_starts_its_own_line_beside_another_ranks_progress_bar(tmp_path):
    """CI saw no error line at all: a rank was drawing transformers' "Loading weights" bar ("\\r..." with no
    newline yet) when the other printed, so the error went on the end of the bar's line."""
    job = tmp_path / "job.py"
    job.write_text(PARTIAL_LINE_JOB.format(root=str(ROOT)))
    run = run_script(job, torchrun=True)
    assert run.returncode != 0
    assert error_lines(run.stderr) == ["error: a.safetensors: 10 bytes, its header says 20 (cut short): re-download "
                                       "this file"], run.stderr[-3000:]


def test_under_torchrun_the_error_is_printed_once(cut_projector, records, tmp_path):
    path, line = cut_projector
    run = run_script("sft.py", "--init", path, "--data", records, "--out", tmp_path / "out", torchrun=True)
    assert run.returncode != 0
    assert error_lines(run.stderr) == [line], run.stderr[-3000:]
    assert f"traceback : {line}" in run.stderr  # torchrun's failure summary names the cause too


# A script whose Ctrl-C lands inside an object's __del__ (as when decord closes a video): Python prints the
# KeyboardInterrupt as "Exception ignored" and drops it; the script then fails, as a torchrun rank does at
# its next collective once its peers have ended.
CTRL_C_IN_A_FINALIZER = """
import os, signal, errors
class Video:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100_000):  # the handler runs here, inside __del__
            pass
def main():
    Video()
    raise RuntimeError("Connection closed by peer")
errors.run_main(main)
"""


def test_ctrl_c_that_python_drops_still_ends_the_run_as_interrupted():
    done = subprocess.run([sys.executable, "-c", CTRL_C_IN_A_FINALIZER], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "Exception ignored in" in done.stderr and "KeyboardInterrupt" in done.stderr  # the drop happened
    assert done.returncode == -signal.SIGINT, done.stderr  # and the run still ended by SIGINT, not with 1
