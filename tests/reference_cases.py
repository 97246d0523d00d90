"""Reading the reference cases of `../shared/reference/case_*` (configs and expected outputs)."""
import functools
import json
from pathlib import Path

import torch

CASES = ["case_ve_ncsnpp", "case_subvp_ddpmpp"]


def _tuples(value):
    """JSON lists back to the tuples the original config files use."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def case_config(case_dir: Path, image_size: int | None = None):
    """The case's config.json as an ml_collections.ConfigDict (optionally at `image_size`) on the
    CPU."""
    import ml_collections

    config = ml_collections.ConfigDict(_tuples(json.loads((case_dir / "config.json").read_text())))
    if image_size is not None:
        config.data.image_size = image_size
    config.device = "cpu"
    return config


@functools.cache
def expected(case_dir: Path) -> dict:
    """The case's expected.pt."""
    return torch.load(case_dir / "expected.pt", weights_only=True)


@functools.cache
def case_networks(case_dir: Path):
    """The case's config, meta.json, and its full and subspace networks (EMA weights, eval)."""
    from models import utils as mutils
    from models.checkpoints import load_model_weights
    from models.subspace_model import subspace_configs

    config = case_config(case_dir)
    meta = json.loads((case_dir / "meta.json").read_text())
    (sub_config,) = subspace_configs(config, [meta["subspace_image_size"]])
    full = load_model_weights(mutils.create_model(config), case_dir / "checkpoint_full.pth")
    sub = load_model_weights(mutils.create_model(sub_config),
                             case_dir / "checkpoint_subspace.pth")
    return config, meta, full, sub
