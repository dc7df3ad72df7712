"""Direct preference optimisation (Rafailov et al. 2023) as a plugin of the trainer's seam (t5like/plugins.py).

data.objective=dpo reads prompt/chosen/rejected pairs (t5like.data.instruct); the loss is t5like.losses.dpo_loss.
This plugin provides the frozen reference model that loss compares against, the starting point of the run:
  finetune.method=lora|prefix  the same weights with the adapters off (t5like.models.without_adapters): no
                               second copy, no extra memory. For LoRA that is exactly the starting point (B
                               starts at zero); for prefix tuning it is the base without prefixes, as TRL's
                               PEFT path (disable_adapter) has it, so the loss starts near, not at, ln 2.
  finetune.method=full         a frozen copy of the starting parameters, kept in the model as the module
                               `reference` (created sharded like the policy, checkpointed, never trained: no
                               gradient, no optimizer state). Memory: one more copy of the parameters, e.g.
                               params + reference + Adam's two moments = 4x the parameters instead of 3x.
                               TRL and MaxText keep a frozen copy too; precomputed log-probabilities (TRL's
                               precompute_ref_log_probs) would save that memory at one pass over the data.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5like.config import Config
from t5like.models import MODEL_CLASSES
from t5like.plugins import Plugin

REFERENCE_MODULE = "reference"  # the frozen copy's place in the model tree (finetune.method=full)


class PreferenceTuning(Plugin):
    """data.objective=dpo: the reference model (see the module docstring) and DPO's refusals."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.copy = cfg.finetune.method == "full"
        if self.copy:
            self.trainable = lambda path: str(path[0]) != REFERENCE_MODULE

    def check_start(self, resuming: bool) -> None:
        for key in ("z_loss", "label_smoothing"):
            if getattr(self.cfg.optim, key):
                raise ValueError(f"optim.{key}={getattr(self.cfg.optim, key)} does not apply to data.objective='dpo' "
                                 "(its loss is TRL's sigmoid DPO loss over answer log-probabilities, which has no "
                                 f"{key.replace('_', ' ')}); set optim.{key}=0.")
        if self.cfg.model.dropout:
            # TRL warns and MaxText sets dropout off: the policy's and the reference's log-probabilities must
            # be comparable, and at the start equal.
            raise ValueError(f"model.dropout={self.cfg.model.dropout} with data.objective='dpo' makes the policy's "
                             "log-probabilities noisy against the reference's; set model.dropout=0.")

    def adapt(self, model):
        if self.copy:
            setattr(model, REFERENCE_MODULE, nnx.data(MODEL_CLASSES[self.cfg.model.family](
                self.cfg.model, rngs=nnx.Rngs(self.cfg.seed))))
        return model

    def init_params(self, params: dict) -> dict:
        """The reference is the starting point: a copy of the params as they start (after checkpoint.init_from)."""
        if not self.copy:
            return params
        policy = {k: v for k, v in params.items() if k != REFERENCE_MODULE}
        return {**policy, REFERENCE_MODULE: jax.tree.map(jnp.copy, policy)}

    def summary(self, abstract_params) -> dict:
        ref = abstract_params.get(REFERENCE_MODULE) if self.copy else None
        nbytes = 0 if ref is None else sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                                           for x in jax.tree.leaves(ref))
        return {"dpo_reference": "frozen copy" if self.copy else "adapters off", "dpo_reference_bytes": nbytes,
                "dpo_beta": self.cfg.finetune.dpo_beta}
