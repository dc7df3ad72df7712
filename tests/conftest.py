"""Every test sees 8 simulated CPU devices, so a plain `pytest` exercises real meshes."""
import atexit
import os
import shutil
import tempfile

import pytest

from xla import xla_flags  # tests/ is on sys.path under pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
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


def pytest_collection_modifyitems(session, config, items):
    """Modules with background runs (tests/background.py) go last, in their usual order: the runs they start
    before the first test then have the most of the session to use the core the other tests leave idle."""
    items.sort(key=lambda item: hasattr(getattr(item, "module", None), "background_runs"))


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory):
    """Starts the selected tests' background runs before the first test (tests/background.py)."""
    runs = Background(tmp_path_factory.mktemp("background"))
    selected: dict = {}
    for item in request.session.items:
        if hasattr(getattr(item, "module", None), "background_runs"):
            selected.setdefault(item.module, {})[item.name] = set(item.fixturenames)
    try:
        for module, names in selected.items():
            module.background_runs(runs, names)
        yield runs
    finally:
        runs.close()
