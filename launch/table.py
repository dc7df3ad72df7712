"""DIR/results.csv: the sweep's append-only table, written by the driver only.

One row per finished attempt (status ok, failed or preempted); the latest row of a trial is its state. On a
local disk each row is one O_APPEND write + fsync under a lock, so a crash can cut off at most the last
line, which the next open drops. On gs:// (through etils.epath) an object cannot be appended to: each row
re-uploads the whole object, and an upload is atomic (readers see the old or the new table), so rows are
still never lost, reordered or half-written.
"""
from __future__ import annotations

import csv
import fcntl
import io
import os
import sys

from etils import epath

from t5like.storage import is_remote

COLUMNS = ("trial_id", "budget", "status", "final_eval_loss", "loss", "final_train_loss", "params",
           "non_embedding_params", "tokens", "flops", "steps", "wall_time_s", "overrides", "error", "finished_at",
           "eval_loss_stderr", "eval_bpb", "eval_bpb_stderr", "seed", "parent", "fork_step")
# eval_loss_stderr / eval_bpb_stderr: the standard error of the final eval loss (bits-per-byte) over the eval
# sequences; seed: the trial's seed; parent, fork_step: a cooldown fork's stable run and the step it forked at.
OK = "ok"
HEADER = ",".join(COLUMNS)


class ResultsTable:
    """Append-only CSV, one physical line per row (newlines in a cell become ' | ')."""

    def __init__(self, path):
        self.path = str(path)
        self._p = epath.Path(self.path)
        if not self._p.exists():
            if is_remote(self.path):
                self._p.write_text(HEADER + "\n")  # one atomic upload
            else:
                tmp = f"{self.path}.tmp{os.getpid()}"
                with open(tmp, "w") as f:
                    f.write(HEADER + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)  # the header appears whole or not at all
            return
        data = self._p.read_bytes()
        header = data.split(b"\n", 1)[0].decode().strip()
        if header != HEADER:
            raise ValueError(f"{self.path} has columns {header!r}, not this runner's {HEADER!r}; "
                             "use a new --workdir (the table is never rewritten).")
        if not data.endswith(b"\n"):
            # Only a local write cut short by a crash can leave this; the fragment is no row, so drop it.
            keep = data.rfind(b"\n") + 1
            print(f"warning: {self.path} ends with an incomplete line ({len(data) - keep} bytes); dropping it.",
                  file=sys.stderr)
            if is_remote(self.path):
                self._p.write_bytes(data[:keep])
            else:
                os.truncate(self.path, keep)

    def rows(self) -> list[dict]:
        text = self._p.read_text()
        text = text[:text.rfind("\n") + 1]  # complete lines only
        return list(csv.DictReader(io.StringIO(text)))

    def append(self, row: dict) -> None:
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", extrasaction="raise").writerow(
            {k: _cell(row.get(k)) for k in COLUMNS})
        data = buf.getvalue().encode()
        if is_remote(self.path):
            self._p.write_bytes(self._p.read_bytes() + data)  # the driver is the only writer
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock

    def ok_ids(self) -> set[str]:
        return {r["trial_id"] for r in self.rows() if r["status"] == OK}


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return " | ".join(str(v).splitlines())  # one physical line per row
