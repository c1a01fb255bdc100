"""README's result tables are generated, never typed: each block equals the markdown a benchmark wrote."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_result_blocks_match_generated_markdown():
    proc = subprocess.run([sys.executable, "benchmarks/update_readme.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_has_exactly_the_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    assert "specmoe demo" in commands[0] and "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_every_readme_python_snippet_runs_as_pasted(tmp_path, monkeypatch):
    """The snippets run in order in one namespace (as in one session) on a tiny model; the only names given are
    the ones the README says are the user's: `path` (a model directory) and `input_ids`."""
    import torch
    from conftest import build_tiny, make_inputs

    from specmoe import find_moe_layers
    from specmoe.predictors import InterLayerPredictor, save_predictor
    from specmoe.reference import load_reference_model

    model = build_tiny("qwen2_moe")
    model.save_pretrained(tmp_path / "model")
    monkeypatch.chdir(tmp_path)  # "predictors/interlayer" is relative to where the user is
    geometry = find_moe_layers(load_reference_model()).geometry
    save_predictor(InterLayerPredictor(geometry, dim=16, layers=1, heads=2, ff=16),
                   tmp_path / "predictors" / "interlayer")
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 3
    namespace = {"path": str(tmp_path / "model"), "input_ids": make_inputs(model)["input_ids"]}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)  # noqa: S102
        except Exception as err:
            raise AssertionError(f"README python block {i} fails as pasted: {err!r}\n{block}") from err
    assert isinstance(namespace["out"], torch.Tensor)
