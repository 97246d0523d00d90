"""The tiny reference cases of ../shared/reference: original checkpoints, networks, scores, SDEs.

Each case holds a full (32x32) and a subspace (16x16) checkpoint in the published format and the
outputs the original code computed from them (see the reference README). Tolerance, per time
index: max|ours - expected| <= 1e-5 * max|expected|, with a 1e-6 absolute floor for SDE vectors.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from reference_cases import CASES, case_config, expected

import sde_lib
from models import utils as mutils
from models.checkpoints import load_model_weights, restore_checkpoint, save_checkpoint
from models.ema import ExponentialMovingAverage

RELATIVE_TOL = 1e-5
SDE_FLOOR = 1e-6
FULL, SUB = "full", "subspace"


@functools.cache
def raw_checkpoint(case_dir: Path, which: str) -> dict:
    return torch.load(case_dir / f"checkpoint_{which}.pth", weights_only=True)


def build(case_dir: Path, which: str):
    size = 32 if which == FULL else 16
    return mutils.create_model(case_config(case_dir, size))


@functools.cache
def ema_model(case_dir: Path, which: str):
    """The case network with its EMA weights, loaded by `load_model_weights` (eval mode)."""
    model = build(case_dir, which)
    return load_model_weights(model, case_dir / f"checkpoint_{which}.pth", device="cpu")


def assert_close_per_t(ours: torch.Tensor, exp: torch.Tensor, what: str,
                       floor: float = 0.0) -> None:
    """max|ours[i] - exp[i]| <= max(1e-5 max|exp[i]|, floor) for every time index i."""
    assert ours.shape == exp.shape, f"{what}: shape {list(ours.shape)} != {list(exp.shape)}"
    for i in range(exp.shape[0]):
        ref = exp[i].double()
        tol = max(RELATIVE_TOL * ref.abs().max().item(), floor)
        err = (ours[i].double() - ref).abs().max().item()
        assert err <= tol, f"{what}[{i}]: max error {err:.3g} exceeds tolerance {tol:.3g}"


@pytest.fixture(params=CASES)
def case_dir(request, reference_dir) -> Path:
    return reference_dir / request.param



def test_sde_functions_match_reference(case_dir):
    e = expected(case_dir)
    sde, _ = sde_lib.get_sde(case_config(case_dir, 32))
    x = e["x"]
    ours: dict[str, list[torch.Tensor]] = {}
    for vec_t in e["vec_t"]:
        mean, std = sde.marginal_prob(x, vec_t)
        drift, diffusion = sde.sde(x, vec_t)
        f, G = sde.discretize(x, vec_t)
        labels = sde.time_to_label(vec_t, continuous=True)
        for key, value in (("sde_marginal_mean", mean), ("sde_marginal_std", std),
                           ("sde_drift", drift), ("sde_diffusion", diffusion),
                           ("sde_discretize_f", f), ("sde_discretize_G", G), ("labels", labels)):
            ours.setdefault(key, []).append(value)
    for key, values in ours.items():
        assert_close_per_t(torch.stack(values), e[key], key, floor=SDE_FLOOR)
    assert_close_per_t(sde.prior_logp(x)[None], e["sde_prior_logp"][None], "sde_prior_logp",
                       floor=SDE_FLOOR)


@pytest.mark.parametrize("which", [FULL, SUB])
def test_loader_takes_ema_for_trainable_and_checkpoint_for_fixed_entries(case_dir, which):
    ck = raw_checkpoint(case_dir, which)
    model = ema_model(case_dir, which)
    assert not model.training
    shadow = iter(ck["ema"]["shadow_params"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for name, value in model.state_dict().items():
        source = next(shadow) if name in trainable else ck["model"]["module." + name]
        assert value.dtype == source.dtype, name
        assert torch.equal(value, source), name
    assert next(shadow, None) is None, "not every EMA tensor was used"
    assert model.state_dict()["sigmas"].dtype == torch.float64
    if ck["model"].get("module.all_modules.0.W") is not None:  # the Fourier embedding
        assert "all_modules.0.W" not in trainable


def test_raw_network_outputs_match_reference(case_dir):
    e = expected(case_dir)
    with torch.no_grad():
        for which, x, key in ((FULL, e["x"], "raw_full"), (SUB, e["x_sub"], "raw_sub")):
            model = ema_model(case_dir, which)
            ours = torch.stack([model(x, labels) for labels in e["labels"]])
            assert_close_per_t(ours, e[key], key)


def test_score_functions_match_reference(case_dir):
    e = expected(case_dir)
    sde, _ = sde_lib.get_sde(case_config(case_dir, 32))
    with torch.no_grad():
        for which, x, key in ((FULL, e["x"], "score_full"), (SUB, e["x_sub"], "score_sub")):
            score_fn = mutils.get_score_fn(sde, ema_model(case_dir, which), train=False,
                                           continuous=True)
            ours = torch.stack([score_fn(x, vec_t) for vec_t in e["vec_t"]])
            assert_close_per_t(ours, e[key], key)


def test_probability_flow_drift_matches_reference(case_dir):
    e = expected(case_dir)
    sde, _ = sde_lib.get_sde(case_config(case_dir, 32))
    score_fn = mutils.get_score_fn(sde, ema_model(case_dir, FULL), train=False, continuous=True)
    reverse = sde.reverse(score_fn, probability_flow=True)
    with torch.no_grad():
        ours = torch.stack([reverse.sde(e["x"], vec_t)[0] for vec_t in e["vec_t"]])
    assert_close_per_t(ours, e["reverse_pf_drift"], "reverse_pf_drift", floor=SDE_FLOOR)


def _index_of(e: dict, t: float) -> int:
    return [round(v, 6) for v in e["t_values"].tolist()].index(t)


def test_raw_weights_give_the_debugging_output_not_the_ema_one(case_dir):
    e = expected(case_dir)
    model = load_model_weights(build(case_dir, FULL), case_dir / "checkpoint_full.pth",
                               use_ema=False)
    i = _index_of(e, 0.3)
    with torch.no_grad():
        out = model(e["x"], e["labels"][i])
    assert_close_per_t(out[None], e["raw_full_model_weights_t0.3"][None], "non-EMA output")
    gap = (out - e["raw_full"][i]).abs().max().item()
    assert gap > 100 * RELATIVE_TOL * e["raw_full"][i].abs().max().item()


def _training_state(case_dir: Path, which: str, seed: int) -> dict:
    """A fresh training state for the case network (random init, Adam as in the config)."""
    torch.manual_seed(seed)
    config = case_config(case_dir, 32 if which == FULL else 16)
    model = mutils.create_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr,
                                 betas=(config.optim.beta1, 0.999), eps=config.optim.eps,
                                 weight_decay=config.optim.weight_decay)
    ema = ExponentialMovingAverage(model.parameters(), decay=config.model.ema_rate)
    return {"optimizer": optimizer, "model": model, "ema": ema, "step": 0}


def test_restore_checkpoint_fills_a_training_state(case_dir):
    ck = raw_checkpoint(case_dir, FULL)
    state = _training_state(case_dir, FULL, seed=0)
    restore_checkpoint(case_dir / "checkpoint_full.pth", state, device="cpu")
    assert state["step"] == ck["step"] == 1234
    assert state["ema"].decay == ck["ema"]["decay"]
    assert state["ema"].num_updates == ck["ema"]["num_updates"]
    assert state["optimizer"].state_dict()["param_groups"][0]["params"] == \
        ck["optimizer"]["param_groups"][0]["params"]
    e = expected(case_dir)
    i = _index_of(e, 0.3)
    model = state["model"].eval()
    with torch.no_grad():
        raw = model(e["x"], e["labels"][i])
        assert_close_per_t(raw[None], e["raw_full_model_weights_t0.3"][None], "non-EMA output")
        state["ema"].copy_to(model.parameters())
        assert torch.equal(model(e["x"], e["labels"][i]),
                           ema_model(case_dir, FULL)(e["x"], e["labels"][i]))


def _assert_same_format(ours: dict, ref: dict) -> None:
    """Same entries, key order, dtypes, shapes and values as a reference checkpoint."""
    assert list(ours) == list(ref)
    assert list(ours["model"]) == list(ref["model"])
    assert all(k.startswith("module.") for k in ours["model"])
    for k, v in ref["model"].items():
        assert ours["model"][k].dtype == v.dtype, k
        assert torch.equal(ours["model"][k], v), k
    assert list(ours["model"]._metadata) == list(ref["model"]._metadata)
    assert list(ours["ema"]) == ["decay", "num_updates", "shadow_params"] == list(ref["ema"])
    assert ours["ema"]["decay"] == ref["ema"]["decay"]
    assert ours["ema"]["num_updates"] == ref["ema"]["num_updates"]
    assert isinstance(ours["ema"]["shadow_params"], list)
    assert len(ours["ema"]["shadow_params"]) == len(ref["ema"]["shadow_params"])
    for a, b in zip(ours["ema"]["shadow_params"], ref["ema"]["shadow_params"]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert ours["optimizer"] == ref["optimizer"]
    assert ours["step"] == ref["step"] and isinstance(ours["step"], int)


@pytest.mark.parametrize("which", [FULL, SUB])
def test_resaved_checkpoint_has_the_reference_format_and_outputs(case_dir, which,
                                                                  tmp_path):
    source = case_dir / f"checkpoint_{which}.pth"
    state = restore_checkpoint(source, _training_state(case_dir, which, seed=1), "cpu")
    resaved = tmp_path / "checkpoint.pth"
    save_checkpoint(resaved, state)
    _assert_same_format(torch.load(resaved, weights_only=True), raw_checkpoint(case_dir, which))

    e = expected(case_dir)
    x = e["x"] if which == FULL else e["x_sub"]
    reloaded = load_model_weights(build(case_dir, which), resaved)
    with torch.no_grad():
        for labels in e["labels"][::3]:  # the first and the last time
            assert torch.equal(reloaded(x, labels), ema_model(case_dir, which)(x, labels))
