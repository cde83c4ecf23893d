"""benchmarks/mutations.py stays runnable: every mutation's target is in the code exactly once
and its guarding test files exist (the full check, ~2 min: ``python benchmarks/mutations.py``)."""

import importlib.util
from pathlib import Path


def test_every_mutation_target_is_in_the_code_once():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mutations.py"
    spec = importlib.util.spec_from_file_location("mutations", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert len(mod.MUTATIONS) >= 12
    assert mod.main(["--check"]) == 0
