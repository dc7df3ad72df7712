"""A trained run's model for inference: generation, Hugging Face export, task metrics.

    cfg, model, tokenizer = load_for_inference(workdir)        # on the default device
    cfg, model, tokenizer = load_for_inference(workdir, shard=Sharder(mesh))
"""
from __future__ import annotations

import jax
from flax import nnx

from t5like.capabilities import plugins_for
from t5like.checkpoint import latest_step_or_raise, load_params, read_config
from t5like.data import get_tokenizer
from t5like.models import abstract_model
from t5like.sharding import Sharder, state_shardings


def load_for_inference(workdir: str, shard: Sharder = None):
    """(config, model, tokenizer) from a run's latest checkpoint, on the default device or `shard`'s mesh.
    The model has the run's plugins' modules (e.g. LoRA adapters), as in training."""
    cfg = read_config(workdir)
    latest_step_or_raise(workdir)
    shard = shard or Sharder()
    graphdef, abstract_state = abstract_model(cfg.model, shard, adapt=plugins_for(cfg).adapt)
    if shard.mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract_state.to_pure_dict())
    else:
        shardings = state_shardings(abstract_state, shard).to_pure_dict()
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract_state.to_pure_dict(), shardings)
    params = load_params(workdir, target)  # the newest step that reads back, with a warning for newer ones
    nnx.replace_by_pure_dict(abstract_state, params)
    model = nnx.merge(graphdef, abstract_state)
    tokenizer = get_tokenizer(cfg.data, workdir, cfg.model.vocab_size)
    return cfg, model, tokenizer
