"""Every test sees 8 simulated CPU devices, so a plain `pytest` exercises real meshes."""
import atexit
import os
import shutil
import tempfile

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
