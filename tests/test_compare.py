"""benchmarks/compare.py: its curve arithmetic, and the quick mode CI runs (every method trains and improves)."""

import importlib.util
import json
from pathlib import Path

import pytest

from tdm.methods.base import method_names

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare", ROOT / "benchmarks" / "compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)

CURVE = [{"iteration": 0, "wall_s": 0.0, "K=4": 1.0}, {"iteration": 100, "wall_s": 10.0, "K=4": 0.5},
         {"iteration": 200, "wall_s": 30.0, "K=4": 0.25}]


def test_curve_interpolation_and_reaching():
    assert compare._at(CURVE, "wall_s", 20.0, "K=4") == pytest.approx(0.375)
    assert compare._at(CURVE, "wall_s", 99.0, "K=4") == 0.25  # beyond the end: its last value
    assert compare._first_reaching(CURVE, "K=4", 0.75) == pytest.approx(50.0)
    assert compare._first_reaching(CURVE, "K=4", 0.25) == pytest.approx(200.0)
    assert compare._first_reaching(CURVE, "K=4", 0.1) is None


def test_quick_mode_every_method_improves(tmp_path, one_thread):
    results = compare.main(["--quick", "--out", str(tmp_path), "--figures", str(tmp_path)])
    res = results["toy-gmm"]
    assert set(res["runs"]) == {f"{m} K=4" for m in method_names()}
    for label, r in res["runs"].items():
        start, final = r["start"]["K=4"]["mean"], r["final"]["K=4"]["mean"]
        assert final < start, (label, start, final)
    assert res["teacher"]["ddim"]["steps=4"]["nfe"] == 4
    written = json.loads((tmp_path / "compare-toy-gmm-quick.json").read_text())
    assert written["runs"].keys() == res["runs"].keys()


def test_iteration_costs_are_interleaved_per_job(tmp_path, one_thread):
    """Seconds per iteration, round-robin in one process: DMD2 with its paper's 5 fake updates per student update
    (at most 28 network calls at K=4) costs clearly more than with 1 (at most 8)."""
    tiny = ["net.pretrain_steps=20", "train.batch_size=64", "method=dmd2"]
    costs = compare.iteration_costs("toy-gmm", {"one": [*tiny, "dmd2.fake_updates=1"],
                                                "five": [*tiny, "dmd2.fake_updates=5"]}, tmp_path, None,
                                    rounds=3, iterations=3)
    assert set(costs) == {"one", "five"} and costs["one"] > 0
    assert costs["five"] > 1.5 * costs["one"], costs
