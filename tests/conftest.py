"""Every test sees 8 simulated CPU devices, so a plain `pytest` exercises real meshes."""
import atexit
import os
import shutil
import tempfile

import pytest

from xla import FAST_COMPILE_ENV, xla_flags  # tests/ is on sys.path under pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault(FAST_COMPILE_ENV, "1")  # tests/xla.py; JAX reads it when imported, after this
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the session, shared with every subprocess a test starts: the many runs of the
# same tiny configs (resume, multi-host, launcher tests) compile each program once. Fresh per session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="t5like-test-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")


# The GCS test server (tests/gcs.py); importing it here makes the `gcs_server` fixture available to every test.
from gcs import gcs_server  # noqa: E402,F401  (tests/ is on sys.path under pytest)

from background import Background  # noqa: E402


# The suite runs on two pytest-xdist workers, a test file at a time (pytest.ini: `-n 2 --dist loadfile`). Files
# are handed out in collection order, so the longest go first and the two workers end together; the rest keep
# pytest's order. The order is by each file's CPU time in a one-process run of 2026-12-02 (docs/benchmarks.md).
LONGEST_FIRST = [
    "test_train.py", "test_finetune.py", "test_multihost.py", "test_observability.py",  # with background runs
    "test_parametrization.py", "test_resume.py", "test_generate.py", "test_scaling_fit.py", "test_hardening.py",
    "test_posttrain.py", "test_quantization.py", "test_sharding.py", "test_tpu_pod.py", "test_sweep_ray.py",
    "test_forks.py", "test_eval.py", "test_hf.py", "test_tpu_launch.py", "test_sweep.py", "test_models.py",
    "test_context.py", "test_tpu_compile.py",
]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def tok_path(tmp_path_factory) -> str:
    """The small SentencePiece model (stdlib source, 2048 pieces) that most runs here share, trained once."""
    from t5like.data import DataConfig, get_tokenizer
    root = tmp_path_factory.mktemp("tok")
    get_tokenizer(DataConfig(source="stdlib", max_files=40, tokenizer_train_chars=200_000), str(root), 2048)
    return str(root / "tokenizer" / "spm.model")


@pytest.fixture(scope="session")
def background(tmp_path_factory):
    """The session's background runs (tests/background.py)."""
    runs = Background(tmp_path_factory.mktemp("background"))
    try:
        yield runs
    finally:
        runs.close()


@pytest.fixture(scope="module", autouse=True)
def xla_optimization(request):
    """A module with `XLA_DEFAULT_OPTIMIZATION = True` compiles at XLA's default optimization (tests/xla.py)."""
    if not getattr(request.module, "XLA_DEFAULT_OPTIMIZATION", False):
        yield
        return
    import jax
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module", autouse=True)
def module_background_runs(request, background):
    """A module with background runs starts those its selected tests need before its first test: they then
    use the core its in-process tests leave idle (tests/background.py)."""
    module = request.module
    if hasattr(module, "background_runs"):
        selected = {item.name: set(item.fixturenames) for item in request.session.items
                    if getattr(item, "module", None) is module}
        module.background_runs(background, selected)
