"""Every test sees 8 simulated CPU devices, so a plain `pytest` exercises real meshes."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# The GCS test server (tests/gcs.py); importing it here makes the `gcs_server` fixture available to every test.
from gcs import gcs_server  # noqa: E402,F401  (tests/ is on sys.path under pytest)
