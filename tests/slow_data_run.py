"""An experiment run whose training batches come late, and that may kill itself:
`python tests/slow_data_run.py SECONDS LOG KILL_AT key=value ...` runs experiments.gpt2_small with a sleep of
SECONDS in every next() of the training iterator, and appends a line to LOG per batch with the seconds that
next() took (the test's own measure of the data wait). With KILL_AT > 0, the KILL_AT-th next() SIGKILLs the
process, once a checkpoint is committed: a kill at a known step. For tests/test_observability.py."""
import os
import signal
import sys
import time

from t5like import train


class SlowBatches:
    """The trainer's iterator, each batch SECONDS late; state/restore/reset pass through."""

    def __init__(self, it, seconds: float, log: str, kill_at: int, workdir: str):
        self.it, self.seconds, self.kill_at, self.workdir = it, seconds, kill_at, workdir
        self.calls = 0
        # One write per batch, on a descriptor opened once: the log's own cost falls inside the trainer's data
        # phase but outside this measure, so it is kept to one system call.
        self.log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def __iter__(self):
        return self

    def __next__(self):
        self.calls += 1
        if self.calls == self.kill_at:
            # Wait for the async save to commit (Orbax renames its step's temporary folder to the step number).
            # Not t5like.checkpoint.latest_step: a second checkpoint manager in this process cleans up the
            # temporary folder of the save under way.
            folder, deadline = os.path.join(self.workdir, "checkpoints"), time.monotonic() + 300
            while not any(n.isdigit() for n in os.listdir(folder)) and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        t = time.perf_counter()
        time.sleep(self.seconds)
        batch = next(self.it)
        os.write(self.log_fd, f"{time.perf_counter() - t}\n".encode())
        return batch

    def __getattr__(self, name):
        return getattr(self.it, name)


def main() -> None:
    seconds, log, kill_at, argv = float(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    workdir = [a.split("=", 1)[1] for a in argv if a.startswith("workdir=")][-1]
    make = train.make_iterator

    def slow(cfg, tokenizer, split, **kw):
        it = make(cfg, tokenizer, split, **kw)
        return SlowBatches(it, seconds, log, kill_at, workdir) if split == "train" else it

    train.make_iterator = slow
    module = __import__("experiments.gpt2_small", fromlist=["config"])
    train.main(module.config, argv)


if __name__ == "__main__":
    main()
