"""In-loop evaluation, as a plugin of the trainer's seam (t5like/plugins.py): at every eval, the named
held-out sets (data.eval_sets, and each data.mixture source with eval=true) and the lm-eval tasks
(eval.tasks) add their rows to the eval row.

  eval/<set>/loss, eval/<set>/bpb     nats per target token and bits per UTF-8 byte on each named set
                                      (bpb where the objective defines it: t5like/data/objectives.py)
  eval/<set>/loss_stderr, .../bpb_stderr  their standard errors over the set's sequences (losses.ratio_stderr)
  lm_eval/<task>/<metric>             lm-eval's task metrics (e.g. lm_eval/hellaswag/acc_norm), at the evals
                                      whose step is a multiple of eval.every (0: every eval) and at the last

The rows go into the eval row of metrics.jsonl and TensorBoard, and their last values into summary.json as
final_<row>. They are written with the step's eval row, so a resumed run keeps them exactly once: the
metrics file is cut back to the checkpoint's step, and the evals after it run again.
Names, sources and tasks are checked before any data or compile work (check_start).
"""
from __future__ import annotations

import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5like.config import Config
from t5like.losses import bits_per_byte, loss_for, ratio_stderr
from t5like.plugins import Plugin
from t5like.sharding import DEFAULT_RULES, Sharder, batch_sharding, make_mesh, replicated


def _where(cfg: Config, i: int) -> str:
    """The config key of the i-th named eval set: data.eval_sets[i], or the mixture source it comes from."""
    n = len(cfg.data.eval_sets)
    return f"data.eval_sets[{i}]" if i < n else f"data.mixture (eval set {i - n + 1} of its sources)"


class Evaluation(Plugin):
    """Named eval sets and lm-eval tasks at each of the trainer's evals."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.sets, self.tasks = cfg.data.named_eval_sets(), cfg.eval.tasks  # mixture sources' included
        self.graphdef = None
        self.iterators: dict = {}
        self.last: dict = {}
        self.sharder = None    # the run's mesh, made at the first eval
        self.eval_step = None

    def check_start(self, resuming: bool) -> None:
        from t5like.data import sources
        for i, s in enumerate(self.sets):
            if s.source == "files":
                try:
                    sources.resolve_paths(s.paths, s.max_files)
                except (ValueError, FileNotFoundError) as e:
                    raise ValueError(f"{_where(self.cfg, i)} (name={s.name!r}): {e}") from None
        if self.tasks:
            from t5like.eval.tasks import load_tasks
            self.manager, _ = load_tasks(self.tasks, self.cfg.eval.include_path)

    def adapt(self, model):
        # The model as training builds it (t5like.capabilities lists this plugin after the ones that add modules).
        self.graphdef = nnx.graphdef(model)
        return model

    def check_data(self, train_iter) -> None:
        """Tokenise the named sets now, so their data errors come before anything compiles."""
        if not self.sets:
            return
        from t5like.data import get_tokenizer, make_iterator
        cfg = self.cfg
        tokenizer = get_tokenizer(cfg.data, cfg.workdir, cfg.model.vocab_size)
        per_host = cfg.train.batch_size // jax.process_count()
        for i, s in enumerate(self.sets):
            try:
                self.iterators[s.name] = make_iterator(s.data_config(cfg.data), tokenizer, s.iterator_split(),
                                                       batch_size=per_host, seed=cfg.seed,
                                                       num_batches=s.max_batches or cfg.train.eval_steps)
            except (ValueError, FileNotFoundError) as e:
                raise ValueError(f"{_where(self.cfg, i)} (name={s.name!r}): {e}") from None

    def on_eval(self, step: int, params) -> dict:
        rows = {}
        if self.sets:
            rows.update(self._eval_sets(params))
        every = self.cfg.eval.every
        if self.tasks and (not every or step % every == 0 or step == self.cfg.train.steps):
            rows.update(self._eval_tasks(step, params))
        self.last.update(rows)
        return rows

    def summary(self, abstract_params) -> dict:
        return {f"final_{k}": v for k, v in self.last.items()}

    # ---------------------------------------------------------------------------------------------

    def _setup(self) -> None:
        if self.sharder is not None:
            return
        self.sharder = Sharder(make_mesh(self.cfg.mesh), self.cfg.mesh.rules or DEFAULT_RULES)
        if self.graphdef is None:  # a caller that never built the model through the plugins
            from t5like.models import abstract_model
            self.graphdef, _ = abstract_model(self.cfg.model, self.sharder)
        graphdef, loss = self.graphdef, loss_for(self.cfg.data.objective, self.cfg)
        # The trainer's eval step: the loss's sums (t5like/losses.py), byte_sum included.
        self.eval_step = jax.jit(lambda p, b: loss(nnx.merge(graphdef, p), b)[1],
                                 out_shardings=replicated(self.sharder.mesh))

    def _eval_sets(self, params) -> dict:
        self._setup()
        rows = {}
        hosts = jax.process_count()
        for name, it in self.iterators.items():
            it.reset()
            totals, shardings = None, None
            for local in it:
                if shardings is None:
                    shardings = batch_sharding(self.sharder, {k: np.zeros((v.shape[0] * hosts, *v.shape[1:]), v.dtype)
                                                              for k, v in local.items()})
                batch = {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}
                out = self.eval_step(params, batch)
                totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
            totals = jax.tree.map(float, totals)
            loss = totals["loss_sum"] / max(totals["weight"], 1.0)
            rows[f"eval/{name}/loss"] = loss
            rows[f"eval/{name}/loss_stderr"] = ratio_stderr(totals, "weight")  # over the set's sequences
            if "byte_sum" in totals:
                rows[f"eval/{name}/bpb"] = bits_per_byte(totals["loss_sum"], totals["byte_sum"])
                stderr = ratio_stderr(totals, "byte")
                rows[f"eval/{name}/bpb_stderr"] = None if stderr is None else stderr / math.log(2)
            if not math.isfinite(loss):
                print(f"warning: eval set {name!r} gave loss={loss}", file=sys.stderr)
        return rows

    def _eval_tasks(self, step: int, params) -> dict:
        from t5like.data import get_tokenizer
        from t5like.eval.lm import T5likeLM
        from t5like.eval.tasks import metric_rows, run_tasks
        cfg = self.cfg
        started = time.perf_counter()
        tokenizer = get_tokenizer(cfg.data, cfg.workdir, cfg.model.vocab_size)
        self._setup()
        lm = T5likeLM(self.graphdef, params, tokenizer, batch_size=cfg.eval.batch_size)
        results = run_tasks(lm, self.tasks, self.manager, limit=cfg.eval.limit, num_fewshot=cfg.eval.num_fewshot,
                            seed=cfg.seed)
        rows = {f"lm_eval/{k}": v for k, v in metric_rows(results).items()}
        rows["lm_eval/time_s"] = time.perf_counter() - started
        return rows

