import json

import pytest
import torch

from specmoe import MoEGeometry
from specmoe.predictors import OraclePredictor, PreGatePredictor, RandomPredictor, load_predictor

GEO = MoEGeometry(num_layers=3, num_experts=8, top_k=2, hidden_size=16)


def bound(pred):
    pred.bind(GEO, routers=[None] * GEO.num_layers)
    return pred


@pytest.mark.parametrize("make", [
    lambda: PreGatePredictor(lookahead=2, wrap=True),
    lambda: RandomPredictor(seed=5, lookahead=3),
    lambda: OraclePredictor([torch.randint(0, 8, (4, 3, 2)), torch.randint(0, 8, (1, 3, 2))], lookahead=2),
])
def test_round_trip(tmp_path, make):
    pred = bound(make())
    pred.save(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["config.json", "model.safetensors"]
    back = load_predictor(tmp_path / "p", geometry=GEO)
    assert type(back) is type(pred) and back.config() == pred.config() and back.geometry == GEO
    for name, t in pred.state_tensors().items():
        assert torch.equal(back.state_tensors()[name], t)


def test_random_is_seeded_and_oracle_replays():
    h = torch.zeros(4, 16)
    a, b = bound(RandomPredictor(seed=1)), bound(RandomPredictor(seed=1))
    assert torch.equal(a.predict(0, h, None)[1], b.predict(0, h, None)[1])
    routing = torch.tensor([[[0, 1], [2, 3], [4, 5]]] * 4)  # [T=4, L=3, k=2]
    o = bound(OraclePredictor([routing, routing], lookahead=2))
    out = o.predict(1, h, None)  # targets 2 (this pass) and 3 (next pass, layer 0)
    assert out[2][0].nonzero().flatten().tolist() == [4, 5]
    assert out[3][0].nonzero().flatten().tolist() == [0, 1]


def test_geometry_mismatch_on_load(tmp_path):
    bound(RandomPredictor()).save(tmp_path)
    with pytest.raises(ValueError, match="num_experts: .*has 8, model has 60"):
        load_predictor(tmp_path, geometry=MoEGeometry(3, 60, 2, 16))


def test_corrupt_files_name_the_file(tmp_path):
    bound(OraclePredictor([torch.zeros(2, 3, 2, dtype=torch.long)])).save(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        load_predictor(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json.*not valid JSON"):
        load_predictor(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"specmoe_predictor": "crystal_ball", "config": {}}))
    with pytest.raises(ValueError, match="unknown predictor type 'crystal_ball'"):
        load_predictor(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_predictor(tmp_path / "missing")


def test_lookahead_validated():
    with pytest.raises(ValueError, match="lookahead"):
        PreGatePredictor(lookahead=0)


def test_atomic_writes_leave_no_temp_files_and_usual_permissions(tmp_path):
    import os

    from specmoe.io import write_json

    write_json(tmp_path / "a.json", {"x": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o666 & ~umask  # as open() would make it


def test_one_factory_by_name(tmp_path):
    from specmoe.predictors import make_predictor

    assert make_predictor("none") is None
    pregate = make_predictor("pregate", lookahead=2)
    assert isinstance(pregate, PreGatePredictor) and pregate.config() == {"lookahead": 2, "wrap": False}
    assert make_predictor("pregate", wrap=True).wrap
    assert make_predictor("random", seed=4).config() == {"seed": 4, "lookahead": 1}
    routing = [torch.randint(0, 8, (2, 3, 2))]
    assert torch.equal(make_predictor("oracle", routing=routing).routing[0], routing[0])
    bound(RandomPredictor(seed=9)).save(tmp_path / "saved")
    assert make_predictor(tmp_path / "saved", geometry=GEO).config()["seed"] == 9
    with pytest.raises(ValueError, match="routing="):
        make_predictor("oracle")
    with pytest.raises(ValueError, match="unknown predictor 'pregat'.*none, pregate"):
        make_predictor("pregat")
    with pytest.raises(ValueError, match="predictor at"):
        make_predictor(tmp_path / "saved", geometry=MoEGeometry(2, 8, 2, 16))
