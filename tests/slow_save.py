"""``python tests/slow_save.py ARGS`` = ``python -m reptok_cli ARGS`` where rank 0's checkpoint
write takes 1 s more and the times of "saved" (the write complete) and "exit<rank>" (the process
leaving) are appended to ``$REPTOK_TEST_MARKS``. Launched by torchrun in tests/test_cluster.py."""

import atexit
import os
import runpy
import sys
import time

from reptok.train import loop

MARKS = os.environ["REPTOK_TEST_MARKS"]
_save = loop.save_checkpoint


def _mark(what: str) -> None:
    with open(MARKS, "a") as f:
        f.write(f"{what} {time.time():.6f}\n")


def slow_save(*args, **kwargs):
    time.sleep(1.0)
    _save(*args, **kwargs)
    _mark("saved")


loop.save_checkpoint = slow_save
atexit.register(lambda: _mark(f"exit{os.environ.get('RANK', '0')}"))
sys.argv = ["reptok", *sys.argv[1:]]
runpy.run_module("reptok_cli", run_name="__main__")
