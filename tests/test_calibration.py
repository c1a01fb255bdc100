"""The simulator's op counts are calibration data: a committed file that benchmarks/op_counts.py writes."""

import importlib.util
from pathlib import Path

import pytest

from specmoe.io import read_json
from specmoe.sim.compute import OP_COUNTS_FILE, OpCounts, load_op_counts
from specmoe.sim.shapes import PRESETS, ModelShape

ROOT = Path(__file__).resolve().parents[1]


def test_every_preset_family_has_counts():
    for name in PRESETS:
        ops = load_op_counts(ModelShape.from_name(name).model_type)
        assert isinstance(ops, OpCounts) and ops.layer > 0 and ops.experts > 0 and ops.per_pass > 0
        assert ops.predictor >= ops.pregate_predict > 0


def test_a_missing_family_says_how_to_count_it():
    with pytest.raises(ValueError, match=r"no op counts for model family 'llama4'.*benchmarks/op_counts.py --families llama4"):
        load_op_counts("llama4")


def test_the_script_reproduces_the_committed_counts(tmp_path):
    spec = importlib.util.spec_from_file_location("op_counts", ROOT / "benchmarks" / "op_counts.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "op_counts.json"
    assert script.main(["--families", "olmoe", "--out", str(out)]) == 0
    counted = read_json(out)
    assert load_op_counts("olmoe", out) == OpCounts(**counted["families"]["olmoe"])
    committed = read_json(OP_COUNTS_FILE)
    same_versions = all(counted["environment"][k] == committed["environment"][k] for k in ("torch", "transformers"))
    if not same_versions:
        pytest.skip("other torch/transformers than the committed counts: rerun benchmarks/op_counts.py")
    fresh, old = counted["families"]["olmoe"], committed["families"]["olmoe"]
    assert {k: v for k, v in fresh.items() if k != "source"} == {k: v for k, v in old.items() if k != "source"}
