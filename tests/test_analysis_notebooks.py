"""The analysis notebooks execute headlessly on the built-in data and write their outputs."""
import json
import math
from pathlib import Path

import nbclient
import nbformat
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _execute(name, tmp_path, monkeypatch, **env):
    monkeypatch.setenv("SUBSPACE_OUT", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    notebook = nbformat.read(ROOT / "analysis" / name, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "analysis")}})
    client.execute()
    return notebook


def test_subspace_notebook(tmp_path, monkeypatch):
    notebook = _execute("subspace.ipynb", tmp_path, monkeypatch, SUBSPACE_MAX_IMAGES=120)
    table = json.loads((tmp_path / "rmsd_builtin_32.json").read_text())
    assert table["num_images"] == 120 and set(table["rmsd"]) == {"downsample", "pca", "patch_pca"}
    assert table["rmsd"]["pca"]["16"] is None  # 768 components from 120 images
    assert 0 < table["rmsd"]["pca"]["4"] < table["rmsd"]["downsample"]["4"]
    assert (tmp_path / "rmsd_builtin_32.png").read_bytes()[:4] == b"\x89PNG"
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                      for o in c.outputs)
    assert "distance to the mean" in outputs and "8 ->  16" in outputs


@pytest.fixture
def ve_checkpoint(tmp_path_factory):
    import run_lib
    from configs.builtin import ve_ncsnpp_small
    from models.checkpoints import save_checkpoint

    config = ve_ncsnpp_small.get_config()
    torch.manual_seed(0)
    state = run_lib.create_train_state(config, torch.device("cpu"))
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_1.pth"
    save_checkpoint(path, state)
    return path


def test_divergence_notebook(tmp_path, monkeypatch, ve_checkpoint):
    _execute("divergence.ipynb", tmp_path, monkeypatch, SUBSPACE_CHECKPOINT=ve_checkpoint,
             SUBSPACE_CONFIG="configs.builtin.ve_ncsnpp_small", SUBSPACE_NUM_IMAGES=8,
             SUBSPACE_NUM_TIMES=3)
    data = json.loads((tmp_path / "divergence_builtin_32.json").read_text())
    assert set(data) == {"16", "8"}
    assert data["8"]["t"] == [0.0] * 8 + [0.5] * 8 + [1.0] * 8
    assert all(math.isfinite(v) for v in data["16"]["err_norm"])
    cut = json.loads((tmp_path / "cutoffs_builtin_32.json").read_text())
    assert set(cut["cutoffs"]) == {"16", "8"}
    assert (tmp_path / "divergence_builtin_32.png").is_file()


def test_divergence_notebook_defaults_use_the_committed_checkpoint(tmp_path, monkeypatch):
    """As a user runs it: the committed demo model (sub-VP), whose D_F is NaN only at t = 0."""
    _execute("divergence.ipynb", tmp_path, monkeypatch, SUBSPACE_NUM_IMAGES=8,
             SUBSPACE_NUM_TIMES=3)
    data = json.loads((tmp_path / "divergence_builtin_32.json").read_text())
    for size in ("16", "8"):
        err = data[size]["err_norm"]
        assert all(math.isnan(v) for v in err[:8]) and all(math.isfinite(v) for v in err[8:])
        # At t >= 0.5 the trained model's orthogonal score is the Gaussian one to within its
        # error floor (about 1.3e-3 in the demo run, whose cutoffs are near t = 0.3).
        assert max(err[8:]) < 1e-2
