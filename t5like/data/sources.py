"""Document sources: which documents exist, which split and host each belongs to, and loading them.

Everything is loaded through HF `datasets` and comes out as a `datasets.Dataset` with one column,
"text" (local sources), or a streaming `datasets.IterableDataset` (source="hub").

Local sources (stdlib, files) hold out a validation split by document: a document is held out when a
hash of its key (path relative to the corpus root, plus the row index for json/csv/parquet) falls below
`validation_fraction`. The hash does not depend on the machine, the file order or the host count.
Each host then takes every process_count-th document of its split, so shares are disjoint and cover it.
Keys are locations, not contents: exact duplicates stored twice may land in different splits (dedupe
upstream if that matters; the stdlib has a few identical files).
"""
from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import json
import os
import sysconfig
from typing import Iterator

import datasets
from datasets.distributed import split_dataset_by_node
import numpy as np

from t5like.data.config import DataConfig

_BUILDERS = {"text": "text", "json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv"}
_CHECK_BYTES = 1 << 20


# ----------------------------------------------------------------------------- finding files

def stdlib_files(max_files: int = 0) -> list[str]:
    """The standard library's non-empty UTF-8 .py files, sorted (site-packages excluded); first max_files."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__")]
        files += [os.path.join(d, n) for n in names if n.endswith(".py")]
    out = []
    for path in sorted(files):
        # A handful of test files are deliberately empty or in latin-1/koi8-r: skip them here.
        if os.path.getsize(path) and _first_non_utf8_byte(path) is None:
            out.append(path)
            if len(out) == max_files:
                break
    return out


def resolve_paths(paths: tuple[str, ...], max_files: int = 0) -> list[str]:
    """Expand files, directories (recursively) and globs into a sorted, de-duplicated file list."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = [os.path.join(d, n) for d, _, names in os.walk(p) for n in names if not n.startswith(".")]
        elif any(c in p for c in "*?["):
            found = [f for f in glob.glob(p, recursive=True) if os.path.isfile(f)]
        else:
            found = [p] if os.path.isfile(p) else []
        if not found:
            raise FileNotFoundError(f"data.paths entry {p!r} matched no files (cwd {os.getcwd()}); "
                                    "fix the path or glob, e.g. data.paths=('corpus/*.txt',)")
        files += found
    files = sorted(set(os.path.abspath(f) for f in files))
    return files[:max_files] if max_files else files


def _first_non_utf8_byte(path: str) -> int | None:
    """Byte offset of the first invalid UTF-8 sequence in a file, or None (reads in 1 MiB chunks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHECK_BYTES)
            pending = len(decoder.getstate()[0])  # bytes of a split character held from the last chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                return offset - pending + e.start
            if not chunk:
                return None
            offset += len(chunk)


def check_file(path: str, fmt: str) -> None:
    """ValueError for an empty file or (text formats) bytes that are not UTF-8, naming file and offset."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty; remove it from data.paths or give it some text")
    if fmt != "parquet" and (bad := _first_non_utf8_byte(path)) is not None:
        raise ValueError(f"{path} is not UTF-8: invalid byte at offset {bad}; convert it, e.g. "
                         f"`iconv -f latin1 -t utf-8 {path} > fixed`, or drop it from data.paths")


# ----------------------------------------------------------------------------- splits and shares

def _hash_unit(key: str) -> float:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") / 2.0 ** 64


def split_indices(keys: list[str], split: str, validation_fraction: float) -> np.ndarray:
    """Indices (ascending) of the documents in `split`, decided by a hash of each document's key.

    With a positive fraction both splits get at least one document (when there are two), so small
    corpora still have something to evaluate on.
    """
    if split == "all":  # a named eval set read whole (data.eval_sets)
        if not keys:
            raise ValueError("the eval set has no documents; check its paths")
        return np.arange(len(keys))
    u = np.array([_hash_unit(k) for k in keys])
    held_out = u < validation_fraction
    if validation_fraction > 0 and len(keys) >= 2:
        if not held_out.any():
            held_out[np.argmin(u)] = True
        if held_out.all():
            held_out[np.argmax(u)] = False
    chosen = np.flatnonzero(held_out if split == "validation" else ~held_out)
    if not len(chosen):
        if not keys:
            why = "there are no documents; check data.paths"
        elif split == "validation" and validation_fraction == 0:
            why = "data.validation_fraction=0 holds nothing out; set it > 0, e.g. 0.02"
        elif len(keys) < 2:
            # the split is by whole documents (files for format=text, rows otherwise): one cannot be shared
            why = (f"with data.validation_fraction={validation_fraction} whole documents are held out, and a "
                   f"single document cannot be split into train and validation; add documents (at least 2; "
                   f"for format=text each file is one document), e.g. split the file in two")
        else:
            why = (f"data.validation_fraction={validation_fraction} leaves no document for it; "
                   "add documents or lower data.validation_fraction")
        raise ValueError(f"the {split} split of {len(keys)} document{'' if len(keys) == 1 else 's'} is empty: {why}")
    return chosen


def host_share(indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This host's documents: every process_count-th one, so hosts are disjoint and cover the split."""
    share = indices[process_index::process_count]
    if not len(share):
        raise ValueError(f"host {process_index} of {process_count} gets none of the {len(indices)} documents; "
                         "use more documents (data.max_files, data.paths) or fewer hosts")
    return share


def _relative_keys(files: list[str]) -> list[str]:
    # Relative to the corpus root, so the split is the same wherever the corpus is mounted.
    root = os.path.dirname(files[0]) if len(files) == 1 else os.path.commonpath(files)
    return [os.path.relpath(f, root) for f in files]


# ----------------------------------------------------------------------------- loading

def load_documents(cfg: DataConfig, split: str, process_index: int = 0, process_count: int = 1) -> datasets.Dataset:
    """This host's share of `split` ("train"/"validation", or "all" documents) of a local source, as a Dataset with column "text".

    Files are checked (exist, non-empty, UTF-8) before anything is loaded.
    """
    if cfg.source not in ("stdlib", "files"):
        raise ValueError(f"load_documents reads local sources, not data.source={cfg.source!r}")
    if cfg.source == "stdlib":
        files, fmt = stdlib_files(cfg.max_files), "text"
        if not files:
            raise ValueError(f"no standard library .py files found under {sysconfig.get_paths()['stdlib']}; "
                             "use data.source='files'")
    else:
        files, fmt = resolve_paths(cfg.paths, cfg.max_files), cfg.format
    cache_dir = cfg.cache_dir or None

    if fmt == "text":  # one file = one document: split and shard by file, read only this host's files
        keep = host_share(split_indices(_relative_keys(files), split, cfg.validation_fraction),
                          process_index, process_count)
        files = [files[i] for i in keep]
        for f in files:
            check_file(f, fmt)
        ds = _load(cfg, "text", files, cache_dir, sample_by="document")
    else:  # many documents per file: load all (Arrow, memory-mapped), keep this host's rows
        for f in files:
            check_file(f, fmt)
        ds = _load(cfg, _BUILDERS[fmt], files, cache_dir)
        if cfg.text_field not in ds.column_names:
            raise ValueError(f"data.text_field={cfg.text_field!r} is not a column of {files[0]}...; "
                             f"columns are {ds.column_names}")
        feature = ds.features[cfg.text_field]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise ValueError(f"data.text_field={cfg.text_field!r} holds {feature}, not text; pick a string column "
                             f"from {ds.column_names}")
        keys = [str(i) for i in range(len(ds))]
        keep = host_share(split_indices(keys, split, cfg.validation_fraction), process_index, process_count)
        ds = ds.select_columns([cfg.text_field]).select(keep)
        if cfg.text_field != "text":
            ds = ds.rename_column(cfg.text_field, "text")
    # Empty documents (and nulls) carry nothing to learn; drop them, but not silently all of them.
    ds = ds.filter(lambda batch: [bool(t) for t in batch["text"]], batched=True)
    if len(ds) == 0:
        raise ValueError(f"no text in the {split} split of {len(files)} file(s) (e.g. {files[0]}): every document "
                         f"is empty; check data.paths and data.text_field={cfg.text_field!r}")
    return ds


def _json_kind(item) -> str:
    return {str: "a JSON string", list: "a JSON array", bool: "a JSON boolean", type(None): "JSON null"}.get(
        type(item), "a JSON number")


def _bad_json_line(path: str, text_field: str) -> str | None:
    """Why a JSON-lines file cannot be read, naming its first bad line (1-based, as an editor shows it);
    None when every non-blank line is a JSON object."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                return f"{path}: line {n} is not valid JSON ({e.msg} at column {e.colno}): {line.strip()[:80]!r}"
            if not isinstance(item, dict):
                return (f"{path}: line {n} is {_json_kind(item)}, not an object such as "
                        f'{{"{text_field}": "..."}}')
    return None


def _whole_file_json(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
        return True
    except ValueError:
        return False


@contextlib.contextmanager
def _no_progress_bars():
    """datasets' progress bars off, then back as they were. Its load of local files shows a "Downloading data"
    bar (its data-files step, which only checks the paths): misleading for files already on this machine."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _load(cfg: DataConfig, builder: str, files: list[str], cache_dir: str | None, **kwargs) -> datasets.Dataset:
    try:
        with _no_progress_bars():  # local files only: nothing is downloaded
            return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir, **kwargs)
    except Exception as e:  # the builders' own errors do not say which config field to change
        if builder == "json":  # say which line of which file; only on failure, so good files are read once
            for f in files:
                if cfg.format == "json" and _whole_file_json(f):
                    continue  # a JSON array/object file, not lines
                why = _bad_json_line(f, cfg.text_field)
                if why:
                    raise ValueError(f"{why}; fix or delete that line (data.format={cfg.format!r} reads one JSON "
                                     f"object per line)") from e
        raise ValueError(f"could not load {len(files)} file(s) such as {files[0]} as data.format={cfg.format!r}: "
                         f"{type(e).__name__}: {e}") from e


def open_stream(cfg: DataConfig, split: str, process_index: int, process_count: int, *,
                shuffle: bool, seed: int) -> datasets.IterableDataset:
    """source="hub": a streaming IterableDataset of this host's share of `split`, column "text".

    `hub_name` is anything `datasets.load_dataset` takes: a Hub repo ("allenai/c4") or a packaged builder
    ("json", "parquet", "text") with `paths` as its data_files (local or remote, e.g. gs://bucket/*.parquet).
    """
    name = cfg.hub_split if split == "train" else cfg.hub_validation_split
    if not name:
        raise ValueError(f"data.hub_validation_split is empty, so there is no {split} split to read; set it")
    kwargs = {"sample_by": "document"} if cfg.hub_name == "text" else {}
    if cfg.paths:
        kwargs["data_files"] = list(cfg.paths)
    ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config or None, split=name, streaming=cfg.streaming,
                               cache_dir=cfg.cache_dir or None, **kwargs)
    if not isinstance(ds, datasets.IterableDataset):  # streaming=False: downloaded; iterate it the same way
        ds = ds.to_iterable_dataset(num_shards=max(process_count, min(len(ds), 64)))
    if ds.column_names is not None and cfg.text_field not in ds.column_names:
        raise ValueError(f"data.text_field={cfg.text_field!r} is not a column of {cfg.hub_name}:{name}; "
                         f"columns are {ds.column_names}")
    ds = ds.select_columns([cfg.text_field])
    if cfg.text_field != "text":
        ds = ds.rename_column(cfg.text_field, "text")
    # Whole shards (files) per host when they divide evenly, otherwise every process_count-th example.
    ds = split_dataset_by_node(ds, rank=process_index, world_size=process_count)
    if shuffle:
        ds = ds.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer)
    return ds


def training_texts(cfg: DataConfig) -> Iterator[str]:
    """Training-split documents for fitting the tokenizer, in a fixed pseudo-random order (for variety).
    A fine-tuning task's texts come from tasks.training_texts (t5like.data.vocabulary picks).

    The caller stops reading once it has enough characters, so only that much of a stream is fetched.
    A mixture's sources take turns, one document each, so the vocabulary sees all of them.
    """
    if cfg.mixture:
        streams = [training_texts(s.data_config(cfg)) for s in cfg.mixture]
        while streams:
            for it in list(streams):
                try:
                    yield next(it)
                except StopIteration:
                    streams.remove(it)
        return
    if cfg.source == "hub":
        for example in open_stream(cfg, "train", 0, 1, shuffle=False, seed=0):
            if example["text"]:
                yield example["text"]
        return
    ds = load_documents(cfg, "train")
    for i in np.random.default_rng(0).permutation(len(ds)):
        yield ds[int(i)]["text"]
