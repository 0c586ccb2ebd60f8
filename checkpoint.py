"""Checkpoint folders on disk, for every model family: weights checked from their headers before a byte
is used, config files read with errors that name the file, and folders written all or nothing.

    check_weights(folder)      {tensor name: file}, every safetensors file checked against its header
    read_tensor(folder, name)  one tensor, in its stored dtype (the reference model's fp32 LM head)
    atomic_directory(path)     a temporary folder renamed into place only when the block finishes
    from_pretrained(cls, dir)  transformers' from_pretrained, refusing missing or mis-shaped weights

A CheckpointError always names the file and the value it could not accept.
"""
import contextlib
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

import errors


class CheckpointError(errors.UserError, ValueError):
    """A folder that is not a checkpoint we can read faithfully; the message names the file and the value."""



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
        raise CheckpointError(f"{path} not found{hint}: a checkpoint folder holds config.json (and, in the "
                              "VILA layout, llm/, vision_tower/ and mm_projector/)")
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
      loaders (`from_pretrained`, the families' own), which know the model the config describes.

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



def read_tensor(folder, name: str) -> torch.Tensor:
    """The tensor `name` of the safetensors weights in `folder` (one file or shards, checked by
    `check_weights`), in its stored dtype. Example: read_tensor(path / "llm", "lm_head.weight") -> [V, D]."""
    where = check_weights(folder)
    if name not in where:
        raise CheckpointError(f"{folder}: no weight named {name!r} in its *.safetensors files")
    with safe_open(str(where[name]), framework="pt") as f:
        return f.get_tensor(name)


def from_pretrained(auto_class, folder: Path, **kwargs):
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



def write_tokenizer(tokenizer, folder: Path) -> None:
    """save_pretrained, plus the chat template in tokenizer_config.json, where transformers 4.x (the
    release's code) looks for it."""
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    path.write_text(json.dumps(config, indent=2))
