"""Reading and writing Hugging Face model directories: config.json and safetensors, no torch.

`Tensors` reads a directory's weights on demand (one file or shards listed by
model.safetensors.index.json) and keeps account: `take` refuses a missing tensor or a shape
mismatch, and `check_all_used` refuses tensors nothing took, so an import never silently drops weights.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import os
import struct
from typing import Iterable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--hf {directory!r} has no config.json: pass a Hugging Face model directory "
                                "(the folder save_pretrained writes: config.json + *.safetensors).")
    return read_json(path)


def _bf16_tensor(path: str, name: str) -> np.ndarray:
    """numpy has no bfloat16, so safetensors.numpy cannot return one: read its bytes from the header's offsets."""
    import ml_dtypes
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(header_len))[name]
        start, end = info["data_offsets"]
        f.seek(8 + header_len + start)
        raw = f.read(end - start)
    return np.frombuffer(raw, dtype=ml_dtypes.bfloat16).reshape(info["shape"])


class Tensors:
    """The weights of a Hugging Face directory, by name, read lazily."""

    def __init__(self, directory: str):
        index = os.path.join(directory, INDEX)
        if os.path.isfile(index):
            weight_map = read_json(index)["weight_map"]
            self.files = {name: os.path.join(directory, f) for name, f in weight_map.items()}
            for f in set(self.files.values()):
                if not os.path.isfile(f):
                    raise FileNotFoundError(f"{INDEX} in {directory!r} lists {os.path.basename(f)}, which is missing.")
        else:
            paths = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
            if not paths:
                other = [p for p in os.listdir(directory) if p.endswith((".bin", ".pt", ".h5", ".msgpack"))]
                hint = (f" It has {other}: convert them to safetensors first (transformers: "
                        "model.save_pretrained(dir, safe_serialization=True)).") if other else ""
                raise FileNotFoundError(f"{directory!r} has no *.safetensors weights.{hint}")
            self.files = {}
            for p in paths:
                with safe_open(p, framework="np") as f:
                    for name in f.keys():
                        self.files[name] = p
        self.used: set[str] = set()

    @property
    def names(self) -> set[str]:
        return set(self.files)

    def has(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self.files[name], framework="np") as f:
            return tuple(f.get_slice(name).get_shape())

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor `name` as float32, checked against the `shape` the config implies."""
        if name not in self.files:
            raise ValueError(f"missing tensor {name!r}: the config implies it, but the checkpoint does not have it; "
                             "the directory's weights and config.json do not belong together.")
        with safe_open(self.files[name], framework="np") as f:
            sl = f.get_slice(name)
            got, dtype = tuple(sl.get_shape()), sl.get_dtype()
            if got != tuple(shape):
                raise ValueError(f"shape mismatch for tensor {name!r}: the checkpoint has {got}, the config implies "
                                 f"{tuple(shape)}; the weights and config.json do not belong together.")
            value = _bf16_tensor(self.files[name], name) if dtype == "BF16" else f.get_tensor(name)
        self.used.add(name)
        return np.asarray(value, np.float32) if value.dtype != np.float32 else value

    def skip(self, patterns: Iterable[str]) -> list[str]:
        """Mark tensors matching the glob `patterns` (buffers, heads the architecture does not use) as read."""
        skipped = [n for n in self.files if n not in self.used and any(fnmatch.fnmatch(n, p) for p in patterns)]
        self.used.update(skipped)
        return skipped

    def check_all_used(self, architecture: str) -> None:
        extra = sorted(self.names - self.used)
        if extra:
            shown = ", ".join(extra[:8]) + (f", ... ({len(extra)} in all)" if len(extra) > 8 else "")
            raise ValueError(f"extra tensors in the checkpoint that {architecture} as configured has no place for: "
                             f"{shown}. t5like refuses rather than drop weights; check config.json (e.g. a bias or "
                             "an untied head it does not declare).")


def write_safetensors(directory: str, tensors: dict[str, np.ndarray], max_shard_bytes: int = 5 << 30) -> list[str]:
    """Write `tensors` as model.safetensors, or as shards plus model.safetensors.index.json when larger."""
    os.makedirs(directory, exist_ok=True)
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = np.ascontiguousarray(tensors[name])
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, SINGLE), metadata={"format": "pt"})
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, os.path.join(directory, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
