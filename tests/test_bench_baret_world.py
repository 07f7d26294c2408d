"""The BARET convergence benchmark's passes-to-a-common-MSE (bench/bench_baret_world.py), on made-up curves."""

import importlib.util
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_baret_world.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_baret_world", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_passes_interpolate_log_mse_between_the_caps_either_side_of_the_target(bench):
    runs = [(1e-1, 40), (1e-2, 60), (1e-4, 120)]  # (final MSE, UNet passes) at three caps
    assert bench.passes_to_reach(runs, 1e-1) == 40  # the first cap reaches it
    assert bench.passes_to_reach(runs, 1e-2) == 60  # a cap lands on it
    assert bench.passes_to_reach(runs, 1e-3) == pytest.approx(90)  # halfway in log MSE between 60 and 120
    assert bench.passes_to_reach(runs, 1e-5) == 120  # never reached: the largest cap's passes, a lower bound


def test_the_common_mse_is_the_larger_median_at_the_last_cap_and_each_method_is_timed_to_it(bench):
    curves = {"fast": {1: [(1e-2, 40)] * 3, 5: [(1e-4, 120)] * 3},
              "slow": {1: [(1e-1, 40)] * 3, 5: [(1e-3, 120)] * 3}}
    common, needed = bench.passes_to_common(curves, ["fast", "slow"], last_cap=5)
    assert common == 1e-3
    assert needed["slow"] == 120 and needed["fast"] == pytest.approx(40 + 80 * math.log(10) / math.log(100))
