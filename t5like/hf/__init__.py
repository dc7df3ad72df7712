"""Hugging Face checkpoints in and out: GPT-2, BERT, T5 (v1.0 and v1.1), Llama and Mistral.

    cfg, model = load_pretrained("path/to/hf_dir", shard=Sharder(mesh))   # config.json + *.safetensors
    save_pretrained(model, "path/to/out")                                  # transformers.AutoModel*.from_pretrained loads it

Reading needs no torch: safetensors reads to numpy, each tensor is mapped to t5like's layout, and each
parameter is placed straight into its shards on the mesh (jax.device_put with its NamedSharding), so no
device ever holds a full replica. Anything t5like cannot reproduce exactly is refused with a ValueError.
Command line: `python -m t5like.hf import|export` (see __main__.py).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
import numpy as np
from flax import nnx

from t5like.config import Config, ModelConfig
from t5like.hf import bert, gpt2, llama, mistral, t5
from t5like.hf.io import Tensors, read_hf_config, write_json, write_safetensors
from t5like.models import abstract_model
from t5like.sharding import Sharder, state_shardings

MAPPINGS = {m.ARCHITECTURE: m for m in (gpt2, bert, t5, llama, mistral)}
# Other names of the same weights: the pre-training BERT (its pooler and NSP head are skipped, as
# BertForMaskedLM does), and T5's name before transformers 2.x.
ALIASES = {"BertForPreTraining": bert, "T5WithLMHeadModel": t5}
SUPPORTED = tuple(MAPPINGS)
OBJECTIVES = {"decoder": "lm", "encoder": "mlm", "encoder_decoder": "span_corruption"}

__all__ = ["load_pretrained", "save_pretrained", "read_pretrained_config", "SUPPORTED"]


def mapping_for(hf: dict):
    archs = hf.get("architectures") or []
    for name in archs:
        if name in MAPPINGS or name in ALIASES:
            return MAPPINGS.get(name) or ALIASES[name]
    raise ValueError(f"unsupported architecture {archs or hf.get('model_type')!r} (config.json 'architectures'); "
                     f"t5like imports {list(SUPPORTED)}.")


def read_pretrained_config(path: str, *, param_dtype: str = "float32", dtype: str = "float32"):
    """(ModelConfig, mapping module, Tensors) for a Hugging Face directory; refuses what t5like cannot represent."""
    hf = read_hf_config(path)
    mapping = mapping_for(hf)
    tensors = Tensors(path)
    cfg = mapping.to_model_config(hf, t5.untied_head(tensors)) if mapping is t5 else mapping.to_model_config(hf)
    return dataclasses.replace(cfg, param_dtype=param_dtype, dtype=dtype).validate(), mapping, tensors


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + str(k)] = v
    return out


def place(cfg: ModelConfig, params: dict, shard: Sharder = Sharder()):
    """A model whose parameters are `params` (numpy, t5like layout), each put directly into its shards."""
    graphdef, state = abstract_model(cfg, shard)
    want = {k: v.shape for k, v in _flat(state.to_pure_dict()).items()}
    got = {k: np.shape(v) for k, v in _flat(params).items()}
    if want.keys() != got.keys():  # a mapping bug, never user input: say exactly what differs
        raise ValueError(f"parameter tree mismatch: missing {sorted(want.keys() - got.keys())}, "
                         f"unexpected {sorted(got.keys() - want.keys())}")
    for k in want:
        if tuple(want[k]) != tuple(got[k]):
            raise ValueError(f"shape mismatch for t5like parameter {k}: mapped {got[k]}, model needs {want[k]}")
    if shard.mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, state.to_pure_dict())
    else:
        shardings = state_shardings(state, shard).to_pure_dict()
    dtypes = jax.tree.map(lambda a: a.dtype, state.to_pure_dict())
    values = jax.tree.map(lambda x, s, d: jax.device_put(np.asarray(x, d), s), params, shardings, dtypes)
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


def load_pretrained(path: str, *, shard: Sharder = Sharder(), param_dtype: str = "float32",
                    dtype: str = "float32") -> tuple[Config, nnx.Module]:
    """(Config, model) from a local Hugging Face directory: config.json + model.safetensors, or shards listed
    by model.safetensors.index.json. The Config's data section points at the directory's tokenizer, if any."""
    from t5like.data.config import DataConfig
    from t5like.data.hf_tokenizer import has_tokenizer, num_sentinels_of

    model_cfg, mapping, tensors = read_pretrained_config(path, param_dtype=param_dtype, dtype=dtype)
    params = mapping.from_hf(model_cfg, tensors)
    tensors.check_all_used(mapping.ARCHITECTURE)
    model = place(model_cfg, params, shard)
    tokenizer = os.path.abspath(path) if has_tokenizer(path) else ""
    data = DataConfig(objective=OBJECTIVES[model_cfg.family], seq_len=min(128, model_cfg.max_len),
                      tokenizer_path=tokenizer,
                      num_sentinels=num_sentinels_of(path) if tokenizer else DataConfig.num_sentinels)
    return Config(model=model_cfg, data=data).validate(), model


def _exporter(cfg: ModelConfig, architecture: Optional[str]):
    if cfg.parametrization != "sp":
        raise ValueError(f"model.parametrization={cfg.parametrization!r}: this model's forward pass has µP's "
                         "multipliers (1/head_dim attention, a 1/width tied head, 1/depth residual branches), which no "
                         "Hugging Face architecture has, so its weights would compute another function there. "
                         "Export sp models only (docs/mup.md).")
    if architecture is not None:
        if architecture not in MAPPINGS:
            raise ValueError(f"architecture={architecture!r} is not one t5like exports; choose from {list(SUPPORTED)}.")
        candidates = [MAPPINGS[architecture]]
    else:
        candidates = list(MAPPINGS.values())
    reasons = {}
    for m in candidates:
        bad = m.check_exportable(cfg)
        if not bad:
            return m
        reasons[m.ARCHITECTURE] = bad
    raise ValueError("this model matches no Hugging Face architecture t5like exports: "
                     + "; ".join(f"{a}: {', '.join(r)}" for a, r in reasons.items()))


def save_pretrained(model: nnx.Module, out_dir: str, *, special_ids: Optional[dict] = None,
                    architecture: Optional[str] = None) -> str:
    """Write `model` as a Hugging Face directory (config.json + float32 safetensors). Returns the architecture.

    special_ids: config.json's bos/eos/pad/decoder_start token ids (e.g. those of the imported checkpoint).
    """
    cfg: ModelConfig = model.cfg
    mapping = _exporter(cfg, architecture)
    _, abstract = abstract_model(cfg)
    state = nnx.state(model, nnx.Param).to_pure_dict()
    extra = sorted(_flat(state).keys() - _flat(abstract.to_pure_dict()).keys())
    if extra:
        raise ValueError(f"the model has parameters a plain {mapping.ARCHITECTURE} has no place for: {extra[:6]}; "
                         "merge adapters into the base weights first (LoRA: merge), or export the base model.")
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), state)
    tensors = mapping.to_hf(cfg, params)
    hf_cfg = mapping.to_hf_config(cfg)
    hf_cfg.update({k: v for k, v in (special_ids or {}).items() if v is not None})
    hf_cfg["dtype"] = hf_cfg["torch_dtype"] = "float32"
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(out_dir, tensors)
    write_json(os.path.join(out_dir, "config.json"), hf_cfg)
    return mapping.ARCHITECTURE
