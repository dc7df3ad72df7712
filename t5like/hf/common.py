"""Helpers shared by the architecture mappings: config refusals and per-layer stacking."""
from __future__ import annotations

from typing import Callable

import numpy as np

# HF activation names -> t5like's (t5like "gelu" is the tanh approximation, HF's "gelu_new").
ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact", "relu": "relu"}
ACTIVATIONS_BACK = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}


def refuse(arch: str, key: str, value, fix: str) -> ValueError:
    return ValueError(f"{arch}: config.json has {key}={value!r}, which t5like cannot represent; {fix}")


def require(hf: dict, arch: str, key: str, allowed: tuple, default=None) -> None:
    """Refuse a config option whose value t5like's model cannot reproduce."""
    value = hf.get(key, default)
    if value not in allowed:
        raise refuse(arch, key, value, f"supported: {list(allowed)}.")


def activation(hf: dict, arch: str, key: str, default: str) -> str:
    name = hf.get(key, default)
    if name not in ACTIVATIONS:
        raise refuse(arch, key, name, f"supported activations: {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def stack(num_layers: int, one: Callable[[int], np.ndarray]) -> np.ndarray:
    """[layers, ...]: t5like stacks each parameter over layers (scanned blocks)."""
    return np.stack([one(i) for i in range(num_layers)])


def unstack(value: np.ndarray, name: str) -> dict[str, np.ndarray]:
    """The reverse: {name.format(i): value[i]}."""
    return {name.format(i): np.ascontiguousarray(value[i]) for i in range(value.shape[0])}


def linear_in(w_OI: np.ndarray) -> np.ndarray:
    """torch.nn.Linear stores [out, in]; t5like kernels are [in, out]."""
    return np.ascontiguousarray(w_OI.T)


def special_ids(hf: dict) -> dict:
    out = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        value = hf.get(key)
        if isinstance(value, list):  # Llama 3 instruct lists several EOS ids; the first is the primary one
            value = value[0] if value else None
        out[key] = value
    return out
