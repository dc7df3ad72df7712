"""Named activations of one forward pass, for coordinate checks (tests/test_parametrization.py, docs/mup.md).

    with probe.capture() as found:
        logits = model(batch)
    found  # {"decoder/0/attn": [B, L, D], "decoder/0/mlp": ..., "decoder/out": ..., "logits": ...}

Off (the default), `record` returns its input and the model traces exactly as without it. Under `capture`, a
stack runs its layers in a Python loop instead of lax.scan, so each sublayer's output is a value of the
caller's own trace (a scan body's values cannot leave it).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

_found: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("probe_found", default=None)
_scope: contextvars.ContextVar[str] = contextvars.ContextVar("probe_scope", default="")


def active() -> bool:
    return _found.get() is not None


@contextlib.contextmanager
def capture() -> Iterator[dict]:
    """Record every `record`ed activation of the forward passes run inside, by name."""
    found: dict = {}
    token = _found.set(found)
    try:
        yield found
    finally:
        _found.reset(token)


@contextlib.contextmanager
def scope(name: str) -> Iterator[None]:
    """Prefix the names recorded inside with `name/` (a stack and a layer number)."""
    token = _scope.set(f"{_scope.get()}{name}/")
    try:
        yield
    finally:
        _scope.reset(token)


def record(name: str, x):
    """x, recorded under the current scope's `name` while capturing."""
    found = _found.get()
    if found is not None:
        found[_scope.get() + name] = x
    return x
