"""Paths that may be local or on Cloud Storage (`gs://bucket/...`), through etils.epath.

Everything the project reads or writes by name goes through here (checkpoints go through orbax, which
uses tensorstore for `gs://`). Two facts shape the helpers:
  - a local file is replaced atomically by writing a temporary and renaming it;
  - a Cloud Storage object is replaced atomically by one upload (a rename there is copy + delete).
"""
from __future__ import annotations

import os
import uuid
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]


def path(p: PathLike) -> epath.Path:
    return epath.Path(p)


def _check_gcs_support(p: PathLike) -> None:
    try:
        import gcsfs  # noqa: F401  (epath's backend for gs:// without TensorFlow)
    except ImportError:
        raise ValueError(f"{str(p)!r} is a Cloud Storage path, but gcsfs is not installed; "
                         "pip install 't5like[gcp]' (or '.[gcp]' in a checkout).") from None


def is_remote(p: PathLike) -> bool:
    return str(p).startswith("gs://")


def join(*parts: PathLike) -> str:
    return os.fspath(epath.Path(parts[0]).joinpath(*map(str, parts[1:])))


def exists(p: PathLike) -> bool:
    return epath.Path(p).exists()


def read_text(p: PathLike) -> str:
    return epath.Path(p).read_text()


def read_bytes(p: PathLike) -> bytes:
    return epath.Path(p).read_bytes()


def write_atomic(p: PathLike, data: Union[str, bytes]) -> None:
    """Replace `p` in one step: readers see the old content or the new, never a mix."""
    target = epath.Path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(p):
        target.write_bytes(data.encode() if isinstance(data, str) else data)
        return
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    (tmp.write_text if isinstance(data, str) else tmp.write_bytes)(data)
    os.replace(tmp, target)


def makedirs(p: PathLike) -> None:
    epath.Path(p).mkdir(parents=True, exist_ok=True)


def check_workdir(workdir: str, field: str = "workdir") -> None:
    """A clear error for a workdir that cannot hold a run, before any work starts."""
    if is_remote(workdir):
        _check_gcs_support(workdir)
        bucket = str(workdir)[len("gs://"):].split("/", 1)[0]
        if not bucket:
            raise ValueError(f"{field}={workdir!r} names no bucket; use gs://BUCKET/PATH.")
        try:
            found = epath.Path(f"gs://{bucket}").exists()
        except Exception as e:  # credentials, network: say which
            raise ValueError(f"{field}={workdir!r}: cannot reach bucket {bucket!r} ({type(e).__name__}: {e}). "
                             "Check `gcloud auth application-default login` and the bucket name.") from None
        if not found:
            raise ValueError(f"{field}={workdir!r}: bucket gs://{bucket} does not exist (or this account cannot see "
                             f"it). Create it (gcloud storage buckets create gs://{bucket}) or fix the name.")
        return
    p = epath.Path(workdir)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{field}={workdir!r} is a file, not a directory; pass a directory (new or a run's).")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{field}={workdir!r}: {str(probe)!r} is a file, so the directory cannot be created; "
                         "choose another path.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{field}={workdir!r}: {str(probe)!r} is not writable by this user; choose a writable "
                         "directory or fix its permissions.")


def move_tree(src: PathLike, dst: PathLike) -> None:
    """Move the directory `src` to `dst` (which must not exist), creating `dst`'s parents. Locally one rename.
    Cloud Storage has no directories (a rename is a copy of every object, then a delete, and an empty "folder"
    does not exist to rename into): there every object is copied, then the originals are deleted, so an
    interrupted move leaves the data in `src`, or in both places, never in neither."""
    source, target = epath.Path(src), epath.Path(dst)
    if not is_remote(src):
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
        return
    # walk() yields folders without their gs:// scheme: each file is named by its part below `src`.
    root = os.fspath(source).rstrip("/")
    below = [os.fspath(d / name).split(root[len("gs://"):] + "/", 1)[1]
             for d, _, names in source.walk() for name in names]
    for name in below:
        epath.Path(f"{root}/{name}").copy(target / name)
    for name in below:
        epath.Path(f"{root}/{name}").unlink()


# orbax finalises a checkpoint step locally by renaming its temporary directory to the step number, and on
# Cloud Storage by writing this marker into the step directory last.
GCS_COMMIT_MARKER = "commit_success.txt"


def step_saved(checkpoints: PathLike, step: int) -> bool:
    """Whether orbax has finalised `step` in the checkpoint directory `checkpoints` (cheap: no JAX, no orbax;
    the sweep runner asks it while a cooldown fork waits for its parent)."""
    step_dir = epath.Path(checkpoints) / str(step)
    if is_remote(checkpoints):
        return (step_dir / GCS_COMMIT_MARKER).exists()
    return step_dir.is_dir()


def copy_step(src_checkpoints: PathLike, dst_checkpoints: PathLike, step: int) -> None:
    """Copy finalised checkpoint `step` from one checkpoint directory to another, so that it appears there
    finalised only once whole: locally copied to a temporary directory and renamed; on Cloud Storage the
    commit marker is copied last."""
    src, dst = epath.Path(src_checkpoints) / str(step), epath.Path(dst_checkpoints) / str(step)
    if is_remote(src_checkpoints) != is_remote(dst_checkpoints):  # orbax finalises the two differently
        raise ValueError(f"cannot copy checkpoint step {step} from {src_checkpoints} to {dst_checkpoints}: one is on "
                         "Cloud Storage and the other local; keep both runs in one place (a sweep's --workdir).")
    if not is_remote(dst_checkpoints):
        import shutil
        tmp = epath.Path(dst_checkpoints) / f".{step}.copy-{uuid.uuid4().hex}.tmp"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(os.fspath(src), os.fspath(tmp))
        os.rename(tmp, dst)
        return
    root = os.fspath(src).rstrip("/")
    names = []
    for d, _, files in src.walk():
        for name in files:
            full = os.fspath(d / name)
            names.append(full.split(root.split("://", 1)[-1] + "/", 1)[1])
    names.sort(key=lambda n: n == GCS_COMMIT_MARKER)  # the marker last: the step counts only once whole
    for name in names:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        epath.Path(f"{root}/{name}").copy(dst / name)
