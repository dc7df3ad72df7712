"""An experiment run whose training batches come late: `python tests/slow_data_run.py SECONDS LOG key=value ...`
runs experiments.gpt2_small with a sleep of SECONDS in every next() of the training iterator, and appends a
line to LOG per batch with the seconds that next() took (the test's own measure of the data wait). For the
goodput test (tests/test_observability.py)."""
import sys
import time

from t5like import train


class SlowBatches:
    """The trainer's iterator, each batch SECONDS late; state/restore/reset pass through."""

    def __init__(self, it, seconds: float, log: str):
        self.it, self.seconds, self.log = it, seconds, log

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        time.sleep(self.seconds)
        batch = next(self.it)
        with open(self.log, "a") as f:
            f.write(f"{time.perf_counter() - t}\n")
        return batch

    def __getattr__(self, name):
        return getattr(self.it, name)


def main() -> None:
    seconds, log, argv = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
    make = train.make_iterator

    def slow(cfg, tokenizer, split, **kw):
        it = make(cfg, tokenizer, split, **kw)
        return SlowBatches(it, seconds, log) if split == "train" and seconds > 0 else it

    train.make_iterator = slow
    module = __import__("experiments.gpt2_small", fromlist=["config"])
    train.main(module.config, argv)


if __name__ == "__main__":
    main()
