"""lm-eval tasks by name: local task YAML files (include_path) and lm-eval's own, resolved and loaded before
any model is built, so that a bad name or file fails in seconds with the file or name it is about.

    tasks = load_tasks(["my_mc", "hellaswag"], include_path="tasks/")   # lm-eval's {"tasks", "groups"}
    results = run_tasks(lm, tasks, limit=0, num_fewshot=-1)            # lm-eval's result dict

lm-eval indexes every YAML of its own ~15k tasks in 10-60 s, so a local include_path is indexed first and
lm-eval's own tasks only when a name is not found there.
"""
from __future__ import annotations

import difflib
import functools
import logging
import os
from typing import Optional, Sequence


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError("lm-eval tasks need the lm-eval package: pip install 't5like[eval]' (or pip install "
                         "'lm-eval[hf]>=0.4.13,<0.5').") from None


def check_task_files(include_path: str) -> list[str]:
    """Every *.yaml under include_path parses (lm-eval's own indexer skips a broken file silently, which then
    reads as an unknown task). Returns the files."""
    if not os.path.isdir(include_path):
        raise ValueError(f"include_path={include_path!r} is not a directory of task YAML files; pass the directory "
                         "that holds them (--include-path DIR, eval.include_path=DIR).")
    from lm_eval.tasks._yaml_loader import load_yaml
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(include_path) for f in fs if f.endswith(".yaml"))
    for path in files:
        try:
            cfg = load_yaml(path, resolve_func=False, recursive=True)
        except Exception as e:  # yaml's and lm-eval's errors alike: the file is what to fix
            raise ValueError(f"task file {path} does not parse: {str(e).strip()}") from None
        if not isinstance(cfg, dict) or not ({"task", "group", "include"} & set(cfg)):
            raise ValueError(f"task file {path} is not an lm-eval task: it needs a 'task:' (or 'group:') key.")
    return files


def task_manager(names: Sequence[str], include_path: str = ""):
    """A TaskManager that knows every name in `names`: the local include_path alone when it has them all."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager
    if not names:
        raise ValueError("no tasks given; pass --tasks NAME[,NAME...] (eval.tasks=...).")
    manager = None
    if include_path:
        check_task_files(include_path)
        manager = TaskManager(include_path=include_path, include_defaults=False)
    if manager is None or any(n not in manager.all_tasks for n in names):
        manager = _with_lm_eval_tasks(include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        hints = {n: difflib.get_close_matches(n, manager.all_tasks, n=3, cutoff=0.6) for n in unknown}
        hint = "; ".join(f"{n!r}: did you mean {', '.join(h)}?" for n, h in hints.items() if h)
        where = f" or in include_path={include_path!r}" if include_path else " (pass --include-path DIR for local YAML tasks)"
        raise ValueError(f"unknown task(s) {unknown}: not among lm-eval's tasks{where}. {hint}".strip())
    return manager


@functools.lru_cache(maxsize=4)
def _with_lm_eval_tasks(include_path: str):
    """lm-eval's own tasks (and include_path's): indexed once per process, it takes 10-60 s."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=include_path or None)


def load_tasks(names: Sequence[str], include_path: str = "") -> tuple:
    """(TaskManager, the loaded tasks): names resolved and every task's dataset read, before any model."""
    manager = task_manager(names, include_path)
    try:
        loaded = manager.load(list(names))
    except Exception as e:  # a dataset file that is missing or malformed, a bad template
        raise ValueError(f"could not load task(s) {list(names)}: {type(e).__name__}: {e}") from None
    return manager, loaded


def run_tasks(lm, names: Sequence[str], manager, *, limit: int = 0, num_fewshot: int = -1,
              bootstrap_iters: int = 0, log_samples: bool = False, seed: int = 0) -> dict:
    """lm-eval's simple_evaluate on `lm`: its result dict ({"results", "configs", "versions", ...})."""
    import lm_eval
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-request INFO lines drown the run's own
    return lm_eval.simple_evaluate(model=lm, tasks=list(names), task_manager=manager, limit=limit or None,
                                   num_fewshot=None if num_fewshot < 0 else num_fewshot,
                                   bootstrap_iters=bootstrap_iters, log_samples=log_samples,
                                   random_seed=seed, numpy_random_seed=seed, torch_random_seed=None,  # no torch import
                                   fewshot_random_seed=seed)


def metric_rows(results: dict) -> dict[str, float]:
    """{"<task>/<metric>": value} from lm-eval's results (e.g. "hellaswag/acc_norm"), numbers only, no stderr."""
    rows = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if key in ("alias", "sample_len") or "_stderr" in metric or not isinstance(value, (int, float)) \
                    or isinstance(value, bool):
                continue
            name = metric if filt in ("", "none") else f"{metric}.{filt}"
            rows[f"{task}/{name}"] = float(value)
    return rows


def results_table(results: dict) -> str:
    from lm_eval.utils import make_table
    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def write_results(results: dict, path: str) -> None:
    """lm-eval's results JSON (as its own CLI writes it)."""
    import json

    from lm_eval.utils import handle_non_serializable
    from t5like import storage
    storage.write_atomic(path, json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))


def task_names(tasks) -> Optional[list]:
    """'a,b' or a sequence -> a list of names."""
    if isinstance(tasks, str):
        return [t.strip() for t in tasks.split(",") if t.strip()]
    return list(tasks)
