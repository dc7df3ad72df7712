"""A run's (or an imported checkpoint's) latest checkpoint as an lm-eval model, on the run's mesh."""
from __future__ import annotations

from flax import nnx

from t5like.eval.lm import T5likeLM
from t5like.inference import load_for_inference
from t5like.sharding import Sharder, make_mesh


def lm_from_workdir(workdir: str, **kwargs) -> T5likeLM:
    """T5likeLM over WORKDIR's latest checkpoint, sharded on the mesh its config names (kwargs: T5likeLM's)."""
    from t5like.checkpoint import read_config
    mesh = make_mesh(read_config(workdir).mesh)
    _, model, tokenizer = load_for_inference(workdir, Sharder(mesh))
    graphdef, state = nnx.split(model)
    return T5likeLM(graphdef, state.to_pure_dict(), tokenizer, **kwargs)
