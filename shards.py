"""
shards.py — HF checkpoint directories read and written one tensor at a time, straight from and to their
safetensors shards.

Implements the last rule of SPEC section 7 for the report's merging (Cohere, "Command A: An Enterprise-Ready
Large Language Model", arXiv 2504.00698, post-training, "Merging"): merge one tensor at a time, so memory stays
bounded by a few tensors, not models. Command A's experts are 111B parameters (222 GB each in bf16), and
merge.py averages six of them; this file is the disk side of that, in the layout of SPEC section 1.4.

  - Checkpoint reads config.json and every shard's header up front (each tensor's byte range checked against
    its shape and the file size, so a truncated or foreign file is refused before anything is computed), then
    any tensor, or a block of its rows, only when asked for.
  - write_checkpoint writes each shard's header first, from shapes known in advance, then each tensor's bytes
    as soon as they are computed; the directory is built under a temp name beside its target and renamed into
    place only when complete, so a failure leaves no half-written output.

The safetensors format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the tensors' raw little-endian bytes (github.com/huggingface/safetensors).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct

import torch
from tqdm import tqdm

from model import ModelConfig, atomic_write_json, plan_shards, shard_paths

ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
DTYPE_ST = {v: k for k, v in ST_DTYPE.items()}
# files a checkpoint directory carries besides the weights that a model derived from it needs too
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
             "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as one: missing, malformed, truncated or foreign files."""


# ----------------------------------------------------------------------------------------------------------
# Reading: headers up front, tensors on demand


def _read_header(fpath: str) -> tuple[dict, int]:
    """The safetensors header (8-byte little-endian length, then JSON) and where the data starts, each
    tensor's byte range checked against its shape and the file size, so a truncated or foreign file is
    refused before anything is computed. Reads no tensor data."""
    try:
        size = os.path.getsize(fpath)
        with open(fpath, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 2 <= n <= min(size - 8, 100 * 2**20):
                raise CheckpointError(f"{fpath} is not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{fpath}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{fpath}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    for name, info in header.items():
        try:
            dt = DTYPE_ST.get(info["dtype"])
            (b, e), shape = info["data_offsets"], [int(x) for x in info["shape"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{fpath}: malformed header entry for tensor {name}") from None
        if dt is None:
            raise CheckpointError(f"{fpath}: tensor {name} has dtype {info['dtype']}; only floating-point tensors "
                                  f"(F32/BF16/F16/F64) can be merged")
        if e - b != math.prod(shape) * dt.itemsize or b < 0:
            raise CheckpointError(f"{fpath}: tensor {name}'s byte range does not match its shape {shape}")
        if 8 + n + e > size:
            raise CheckpointError(f"{fpath} is truncated: tensor {name} ends at byte {8 + n + e}, "
                                  f"the file has {size}")
    return header, 8 + n


class Checkpoint:
    """An HF checkpoint directory read lazily: config.json and the safetensors headers up front, each tensor
    (or row block of one) only when asked for, read straight from its byte range in the shard. Plain reads,
    not safetensors' mmap: a mapped shard keeps every page it touched resident until it is closed, and this
    way an fp32 input is read once into the buffer the merge computes in."""

    def __init__(self, path: str):
        self.path = str(path)
        cfg_file = os.path.join(self.path, "config.json")
        if not os.path.isfile(cfg_file):
            raise CheckpointError(f"{self.path} is not a checkpoint directory (no config.json)")
        try:
            with open(cfg_file) as f:
                self.config = json.load(f)
            self.model_config = ModelConfig.from_hf_dict(self.config)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{cfg_file}: not a usable Cohere2 config ({e!r})") from None
        try:
            files = shard_paths(self.path)
        except (ValueError, FileNotFoundError) as e:
            raise CheckpointError(str(e)) from None
        self.meta, self.where = {}, {}  # name -> (dtype, shape); name -> (shard path, first data byte)
        for fpath in files:
            header, data_start = _read_header(fpath)
            for name, info in header.items():
                if name in self.where:
                    raise CheckpointError(f"{fpath}: tensor {name} appears in more than one shard")
                self.where[name] = (fpath, data_start + info["data_offsets"][0])
                self.meta[name] = (DTYPE_ST[info["dtype"]], tuple(int(x) for x in info["shape"]))

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor (or rows [r0, r1) of it) as a new tensor of its stored dtype, ours to overwrite."""
        dt, shape = self.meta[name]
        fpath, offset = self.where[name]
        r0, r1 = rows if rows is not None else (0, shape[0] if shape else 1)
        row_bytes = math.prod(shape[1:]) * dt.itemsize
        t = torch.empty((r1 - r0, *shape[1:]) if shape else (), dtype=dt)
        buf = t.reshape(-1).view(torch.uint8).numpy()  # the tensor's own memory, as bytes (little-endian)
        with open(fpath, "rb") as f:
            f.seek(offset + r0 * row_bytes)
            if f.readinto(buf) != buf.nbytes:
                raise CheckpointError(f"{fpath}: short read of tensor {name} (file changed during the merge?)")
        return t


# ----------------------------------------------------------------------------------------------------------
# Writing: shards streamed tensor by tensor, the directory renamed into place when complete


def _write_safetensors(f, names, meta, produce, metadata, on_bytes):
    """safetensors, written as a stream: the header (from shapes known in advance), then each tensor's bytes as
    soon as it is computed. Only one output tensor exists at a time."""
    header, off = {}, 0
    for k in names:
        dt, shape = meta[k]
        n = math.prod(shape) * dt.itemsize
        header[k] = {"dtype": ST_DTYPE[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    f.write(struct.pack("<Q", len(raw)) + raw)
    for k in names:
        dt, shape = meta[k]
        written = 0
        for block in produce(k):  # row blocks in order: row-major bytes concatenate into the whole tensor
            block = block.to(dt).contiguous()
            f.write(block.reshape(-1).view(torch.uint8).numpy().data)  # safetensors and the host: little-endian
            written += block.numel()
            on_bytes(block.numel() * block.element_size())
            del block
        if written != math.prod(shape):
            raise RuntimeError(f"produce gave {written} entries for {k}, expected {math.prod(shape)}")


def write_checkpoint(out: str, meta: dict, produce, config: dict, max_shard_bytes: int, files_from: str | None = None,
                     extra_json: dict | None = None, metadata: dict | None = None, desc: str = "write",
                     progress: bool = True) -> dict:
    """Write the checkpoint directory `out`: tensors named in meta {name: (dtype, shape)}, in that order, whose
    bytes produce(name) yields as row blocks; the shard index when there is more than one shard; config.json
    (torch_dtype set when every tensor has one dtype); the tokenizer and generation files of `files_from`; and
    each {file name: JSON object} of extra_json. Returns {"out", "shards", "bytes"}."""
    nbytes = {k: math.prod(s) * d.itemsize for k, (d, s) in meta.items()}
    shards, fnames = plan_shards(nbytes, max_shard_bytes)
    out = os.path.abspath(out)
    parent, leaf = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{leaf}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        bar = tqdm(total=sum(nbytes.values()), unit="B", unit_scale=True, desc=desc, disable=not progress)
        for fname, shard in zip(fnames, shards):
            with open(os.path.join(tmp, fname), "wb") as f:
                _write_safetensors(f, shard, meta, produce, {"format": "pt", **(metadata or {})}, bar.update)
                f.flush()
                os.fsync(f.fileno())
        bar.close()
        if len(shards) > 1:
            atomic_write_json(os.path.join(tmp, "model.safetensors.index.json"), {
                "metadata": {"total_size": sum(nbytes.values())},
                "weight_map": {k: fn for fn, s in zip(fnames, shards) for k in s}})
        dts = {d for d, _ in meta.values()}
        hf = {**config, "torch_dtype": str(dts.pop()).replace("torch.", "") if len(dts) == 1 else
              config.get("torch_dtype")}
        atomic_write_json(os.path.join(tmp, "config.json"), hf)
        for fname in AUX_FILES if files_from else ():
            if os.path.isfile(os.path.join(files_from, fname)):
                shutil.copyfile(os.path.join(files_from, fname), os.path.join(tmp, fname))
        for fname, obj in (extra_json or {}).items():
            atomic_write_json(os.path.join(tmp, fname), obj)
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": out, "shards": len(shards), "bytes": sum(nbytes.values())}


def _swap_into_place(tmp, out):
    """Rename the finished directory onto `out`; an old `out` (the caller allowed replacing it) is moved aside
    first and deleted only after the new one is in place."""
    old = None
    if os.path.exists(out):
        old = out + f".old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    try:
        fd = os.open(os.path.dirname(out), os.O_RDONLY)
        os.fsync(fd)  # make the rename itself durable
        os.close(fd)
    except OSError:
        pass
    if old:
        shutil.rmtree(old, ignore_errors=True)
