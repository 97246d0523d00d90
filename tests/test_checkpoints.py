"""EMA arithmetic, checkpoint save/restore, inference loading and their error messages."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn

from models import utils as mutils
from models.checkpoints import (
    CheckpointError,
    CorruptCheckpointError,
    StateDictMismatchError,
    load_model_weights,
    restore_checkpoint,
    save_checkpoint,
)
from models.ema import ExponentialMovingAverage


class Tiny(nn.Module):
    """Two trainable tensors, a frozen parameter (like the Fourier `W`) and a float64 buffer."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.fixed = nn.Parameter(torch.ones(3), requires_grad=False)
        self.register_buffer("table", torch.arange(3, dtype=torch.float64))


def _fill(module: Tiny, weight: float, bias: float) -> None:
    with torch.no_grad():
        module.linear.weight.fill_(weight)
        module.linear.bias.fill_(bias)


# ---------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------


def test_ema_tracks_only_trainable_parameters_in_order():
    module = Tiny()
    ema = ExponentialMovingAverage(module.parameters(), decay=0.9)
    assert [s.shape for s in ema.shadow_params] == [torch.Size([2, 2]), torch.Size([2])]
    assert torch.equal(ema.shadow_params[0], module.linear.weight)
    assert ema.shadow_params[0] is not module.linear.weight


def test_ema_update_with_update_count_warmup():
    module = Tiny()
    _fill(module, 1.0, 2.0)
    ema = ExponentialMovingAverage(module.parameters(), decay=0.999)
    _fill(module, 3.0, 2.0)
    ema.update(module.parameters())  # decay min(0.999, 2/11)
    assert ema.num_updates == 1
    first = 2 / 11 * 1.0 + 9 / 11 * 3.0
    assert torch.allclose(ema.shadow_params[0], torch.full((2, 2), first))
    assert torch.allclose(ema.shadow_params[1], torch.full((2,), 2.0))
    _fill(module, 0.0, 2.0)
    ema.update(module.parameters())  # decay min(0.999, 3/12)
    assert ema.num_updates == 2
    assert torch.allclose(ema.shadow_params[0], torch.full((2, 2), 0.25 * first))


def test_ema_update_matches_the_per_tensor_formula_bit_for_bit():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ema = ExponentialMovingAverage(params, decay=0.999)
    expected = [p.detach().clone() for p in params]
    for _ in range(3):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ema.update(params)
        decay = min(0.999, (1 + ema.num_updates) / (10 + ema.num_updates))
        expected = [e - (1.0 - decay) * (e - p.detach()) for e, p in zip(expected, params)]
    assert all(torch.equal(s, e) for s, e in zip(ema.shadow_params, expected))


def test_ema_of_a_model_without_trainable_parameters_only_counts_updates():
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    ema = ExponentialMovingAverage(frozen.parameters(), decay=0.9)
    ema.update(frozen.parameters())
    assert ema.num_updates == 1 and ema.shadow_params == []


def test_ema_update_with_fixed_decay():
    module = Tiny()
    _fill(module, 1.0, 0.0)
    ema = ExponentialMovingAverage(module.parameters(), decay=0.9, use_num_updates=False)
    _fill(module, 3.0, 10.0)
    ema.update(module.parameters())
    ema.update(module.parameters())
    assert ema.num_updates is None
    # s1 = 0.9 * 1 + 0.1 * 3 = 1.2, s2 = 0.9 * 1.2 + 0.1 * 3 = 1.38
    assert torch.allclose(ema.shadow_params[0], torch.full((2, 2), 1.38))
    assert torch.allclose(ema.shadow_params[1], torch.full((2,), 1.9))


def test_ema_copy_to_store_and_restore():
    module = Tiny()
    _fill(module, 1.0, 1.0)
    ema = ExponentialMovingAverage(module.parameters(), decay=0.5, use_num_updates=False)
    _fill(module, 5.0, 7.0)
    ema.update(module.parameters())
    ema.store(module.parameters())
    ema.copy_to(module.parameters())
    assert torch.equal(module.linear.weight, torch.full((2, 2), 3.0))
    assert torch.equal(module.linear.bias, torch.full((2,), 4.0))
    assert torch.equal(module.fixed, torch.ones(3))
    ema.restore(module.parameters())
    assert torch.equal(module.linear.weight, torch.full((2, 2), 5.0))
    assert torch.equal(module.linear.bias, torch.full((2,), 7.0))


def test_ema_average_parameters_swaps_in_and_back_even_on_error():
    module = Tiny()
    _fill(module, 1.0, 1.0)
    ema = ExponentialMovingAverage(module.parameters(), decay=0.5, use_num_updates=False)
    _fill(module, 5.0, 7.0)
    ema.update(module.parameters())  # averages 3 and 4
    with ema.average_parameters(module.parameters()):  # a generator, as model.parameters() is
        assert torch.equal(module.linear.weight, torch.full((2, 2), 3.0))
        assert torch.equal(module.linear.bias, torch.full((2,), 4.0))
        assert torch.equal(module.fixed, torch.ones(3))
    assert torch.equal(module.linear.weight, torch.full((2, 2), 5.0))
    with pytest.raises(RuntimeError, match="inside"):
        with ema.average_parameters(module.parameters()):
            module.linear.bias.data.fill_(-1.0)
            raise RuntimeError("inside")
    assert torch.equal(module.linear.weight, torch.full((2, 2), 5.0))
    assert torch.equal(module.linear.bias, torch.full((2,), 7.0))
    assert torch.equal(ema.shadow_params[1], torch.full((2,), 4.0))


def test_ema_state_dict_format_and_round_trip():
    module = Tiny()
    ema = ExponentialMovingAverage(module.parameters(), decay=0.99)
    ema.update(module.parameters())
    state = ema.state_dict()
    assert list(state) == ["decay", "num_updates", "shadow_params"]
    assert state["decay"] == 0.99 and state["num_updates"] == 1
    other = ExponentialMovingAverage(Tiny().parameters(), decay=0.5)
    other.load_state_dict(state)
    assert other.decay == 0.99 and other.num_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(other.shadow_params, ema.shadow_params))
    other.update(module.parameters())  # the loaded averages are copies, not aliases
    assert ema.num_updates == 1


def test_ema_bad_input_errors():
    module = Tiny()
    with pytest.raises(ValueError, match=r"decay must lie in \[0, 1\]; got 1.5"):
        ExponentialMovingAverage(module.parameters(), decay=1.5)
    ema = ExponentialMovingAverage(module.parameters(), decay=0.9)
    with pytest.raises(ValueError, match="tracks 2 trainable parameters but 1 were given"):
        ema.update([module.linear.weight])
    with pytest.raises(ValueError, match=r"parameter 0 has shape \[3, 2\] but its EMA copy"):
        ema.copy_to(nn.Linear(2, 3).parameters())
    short = {"decay": 0.9, "num_updates": 0, "shadow_params": ema.shadow_params[:1]}
    with pytest.raises(ValueError, match="holds 1 averaged tensors but the model has 2"):
        ema.load_state_dict(short)
    with pytest.raises(ValueError, match="lacks num_updates"):
        ema.load_state_dict({"decay": 0.9, "shadow_params": ema.shadow_params})
    with pytest.raises(ValueError, match="2 parameters were stored but 3 were given"):
        ema.store(module.linear.parameters())
        ema.restore(module.parameters())


# ---------------------------------------------------------------------------------------------
# Checkpoints of a tiny NCSN++
# ---------------------------------------------------------------------------------------------



def tiny_config(nf: int = 8, image_size: int = 8):
    """The VE CIFAR-10 NCSN++ config (Fourier `W`, FIR, float64 sigmas), shrunk to run in ms."""
    from configs.ve.cifar10_ncsnpp_continuous import get_config

    config = get_config()
    config.model.update(nf=nf, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
    config.data.image_size = image_size
    config.device = torch.device("cpu")
    return config


def tiny_state(config, seed: int) -> dict:
    torch.manual_seed(seed)
    model = mutils.create_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    ema = ExponentialMovingAverage(model.parameters(), decay=config.model.ema_rate)
    return {"optimizer": optimizer, "model": model, "ema": ema, "step": 0}


def train(state: dict, steps: int) -> None:
    """Real optimizer steps on random data, so that optimizer and EMA state are non-trivial."""
    model = state["model"].train()
    size = tiny_config().data.image_size
    for _ in range(steps):
        x = torch.rand(2, 3, size, size)
        loss = model(x, torch.full((2,), 0.5)).square().mean()
        state["optimizer"].zero_grad()
        loss.backward()
        state["optimizer"].step()
        state["ema"].update(model.parameters())
        state["step"] += 1


def _inputs(config):
    torch.manual_seed(123)
    size = config.data.image_size
    return torch.rand(2, 3, size, size), torch.tensor([0.3, 20.0])


def _output(model, config) -> torch.Tensor:
    x, sigma = _inputs(config)
    with torch.no_grad():
        return model.eval()(x, sigma)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny NCSN++ trained for one step and saved, shared by the tests: (state, path)."""
    state = tiny_state(tiny_config(), seed=0)
    train(state, 1)
    path = tmp_path_factory.mktemp("checkpoints") / "checkpoint_1.pth"
    save_checkpoint(path, state)
    return state, path


def test_save_writes_the_published_format(saved):
    state, path = saved
    ck = torch.load(path, weights_only=True)
    assert set(ck) == {"optimizer", "model", "ema", "step"}
    assert ck["step"] == 1
    model_sd = state["model"].state_dict()
    assert list(ck["model"]) == ["module." + k for k in model_sd]
    assert ck["model"]["module.sigmas"].dtype == torch.float64
    assert list(ck["ema"]) == ["decay", "num_updates", "shadow_params"]
    assert ck["ema"]["num_updates"] == 1
    trainable = [p for p in state["model"].parameters() if p.requires_grad]
    assert len(ck["ema"]["shadow_params"]) == len(trainable) == len(list(
        state["model"].parameters())) - 1  # the Fourier W is not averaged
    assert len(ck["optimizer"]["state"]) > 0


def test_save_restore_round_trip(saved):
    state, path = saved
    config = tiny_config()
    fresh = tiny_state(config, seed=1)
    assert not torch.equal(_output(fresh["model"], config), _output(state["model"], config))
    restored = restore_checkpoint(path, fresh, device="cpu")
    assert restored is fresh and fresh["step"] == 1
    for (k, a), b in zip(fresh["model"].state_dict().items(), state["model"].state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    assert fresh["ema"].num_updates == 1 and fresh["ema"].decay == state["ema"].decay
    assert all(torch.equal(a, b) for a, b in zip(fresh["ema"].shadow_params,
                                                 state["ema"].shadow_params))
    opt_a, opt_b = fresh["optimizer"].state_dict(), state["optimizer"].state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for i in opt_b["state"]:
        for name, value in opt_b["state"][i].items():
            assert torch.equal(opt_a["state"][i][name], value), (i, name)
    assert torch.equal(_output(fresh["model"], config), _output(state["model"], config))
    # Training continues identically from the restored state.
    state = copy.deepcopy(state)
    torch.manual_seed(7)
    train(state, 1)
    torch.manual_seed(7)
    train(fresh, 1)
    assert torch.equal(_output(fresh["model"], config), _output(state["model"], config))


def test_dataparallel_models_are_unwrapped(saved, tmp_path):
    state, path = saved
    wrapped = dict(state, model=nn.DataParallel(state["model"]))
    other = tmp_path / "wrapped.pth"
    save_checkpoint(other, wrapped)
    keys = list(torch.load(other, weights_only=True)["model"])
    assert keys == list(torch.load(path, weights_only=True)["model"])
    target = tiny_state(tiny_config(), seed=3)
    target["model"] = nn.DataParallel(target["model"])
    restore_checkpoint(other, target, "cpu")
    assert torch.equal(_output(target["model"].module, tiny_config()),
                       _output(state["model"], tiny_config()))


def test_inference_loader_takes_ema_weights(saved):
    state, path = saved
    config = tiny_config()
    model = load_model_weights(mutils.create_model(config), path)
    assert not model.training
    state["ema"].store(state["model"].parameters())
    state["ema"].copy_to(state["model"].parameters())
    expected = _output(state["model"], config)
    state["ema"].restore(state["model"].parameters())
    assert torch.equal(_output(model, config), expected)
    raw = load_model_weights(mutils.create_model(config), path, use_ema=False)
    assert torch.equal(_output(raw, config), _output(state["model"], config))
    assert not torch.equal(expected, _output(state["model"], config))


def test_bare_and_unprefixed_state_dicts_load(saved, tmp_path):
    state, _ = saved
    config = tiny_config()
    expected = _output(state["model"], config)
    weights = state["model"].state_dict()
    bare = tmp_path / "bare.pth"
    torch.save(weights, bare)
    prefixed = tmp_path / "prefixed.pth"
    torch.save({"module." + k: v for k, v in weights.items()}, prefixed)
    for path in (bare, prefixed):
        model = load_model_weights(mutils.create_model(config), path)
        assert torch.equal(_output(model, config), expected), path
    extra = dict(weights, stray=torch.zeros(1))
    with pytest.raises(StateDictMismatchError, match="not in the model: stray"):
        load_model_weights(mutils.create_model(config), extra)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="Unknown model name 'ncsn_pp'.*must be one of"):
        mutils.get_model("ncsn_pp")


def test_missing_checkpoint_file(tmp_path, caplog):
    state = tiny_state(tiny_config(), seed=0)
    path = tmp_path / "nowhere" / "checkpoint.pth"
    with pytest.raises(FileNotFoundError, match=f"No checkpoint file at {path}"):
        restore_checkpoint(path, state, "cpu")
    with pytest.raises(FileNotFoundError, match="No checkpoint file at"):
        load_model_weights(state["model"], path)
    before = {k: v.clone() for k, v in state["model"].state_dict().items()}
    with caplog.at_level(logging.INFO):
        assert restore_checkpoint(path, state, "cpu", missing_ok=True) is state
    assert "No checkpoint found at" in caplog.text
    assert state["step"] == 0
    assert all(torch.equal(v, before[k]) for k, v in state["model"].state_dict().items())


def test_truncated_checkpoint(saved, tmp_path):
    _, path = saved
    broken = tmp_path / "broken.pth"
    broken.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    state = tiny_state(tiny_config(), seed=0)
    with pytest.raises(CorruptCheckpointError,
                       match=f"Cannot read checkpoint {broken}: the file is truncated or corrupt"):
        restore_checkpoint(broken, state, "cpu")
    with pytest.raises(CorruptCheckpointError, match="truncated or corrupt"):
        load_model_weights(state["model"], broken)


def test_files_that_are_not_checkpoints(tmp_path):
    state = tiny_state(tiny_config(), seed=0)
    listing = tmp_path / "list.pth"
    torch.save([1, 2], listing)
    with pytest.raises(CheckpointError, match="is not a training checkpoint"):
        restore_checkpoint(listing, state, "cpu")
    with pytest.raises(CheckpointError,
                       match="is neither a training checkpoint .* nor a state dict"):
        load_model_weights(state["model"], listing)
    pickled = tmp_path / "module.pth"
    torch.save(Tiny(), pickled)
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors"):
        restore_checkpoint(pickled, state, "cpu")


def test_wrong_config_is_one_clear_error(saved):
    _, path = saved
    for config, message in (
            (tiny_config(nf=16), r"likely a wrong config or image size: the checkpoint's \S+ is "
                                 r"\[8(, .*)?\], the model's is \[16(, .*)?\]"),
            (tiny_config(image_size=16), "does not fit the model, likely a wrong")):
        state = tiny_state(config, seed=0)
        before = {k: v.clone() for k, v in state["model"].state_dict().items()}
        with pytest.raises(StateDictMismatchError, match=message) as info:
            restore_checkpoint(path, state, "cpu")
        assert str(path) in str(info.value)
        assert state["step"] == 0 and state["ema"].num_updates == 0
        assert not state["optimizer"].state_dict()["state"]
        assert all(torch.equal(v, before[k]) for k, v in state["model"].state_dict().items())
        with pytest.raises(StateDictMismatchError, match=message):
            load_model_weights(mutils.create_model(config), path)


def test_ema_of_another_model_is_rejected(saved, tmp_path):
    _, path = saved
    ck = torch.load(path, weights_only=True)
    ck["ema"]["shadow_params"] = ck["ema"]["shadow_params"][:-1]
    bad = tmp_path / "bad_ema.pth"
    torch.save(ck, bad)
    n = len(ck["ema"]["shadow_params"])
    message = f"holds {n} averaged tensors but the model has {n + 1} trainable parameters"
    state = tiny_state(tiny_config(), seed=0)
    with pytest.raises(StateDictMismatchError, match=message):
        restore_checkpoint(bad, state, "cpu")
    assert state["step"] == 0
    with pytest.raises(StateDictMismatchError, match=message):
        load_model_weights(state["model"], bad)
    assert load_model_weights(state["model"], bad, use_ema=False) is state["model"]


def test_optimizer_state_is_optional(saved, tmp_path):
    state, path = saved
    ck = torch.load(path, weights_only=True)
    ck["optimizer"]["param_groups"][0]["params"] = [0]
    odd = tmp_path / "odd_optimizer.pth"
    torch.save(ck, odd)
    config = tiny_config()
    with pytest.raises(CheckpointError, match="The optimizer state in .* does not fit the "
                                                    "optimizer"):
        restore_checkpoint(odd, tiny_state(config, seed=0), "cpu")
    sampling_state = tiny_state(config, seed=0)
    del sampling_state["optimizer"]
    restore_checkpoint(odd, sampling_state, "cpu")
    assert sampling_state["step"] == 1
    assert torch.equal(_output(sampling_state["model"], config), _output(state["model"], config))


def test_save_checkpoint_needs_a_complete_state(tmp_path):
    path = tmp_path / "ckpt.pth"
    with pytest.raises(ValueError, match="the state lacks optimizer, ema"):
        save_checkpoint(path, {"model": torch.nn.Linear(1, 1), "step": 0})
    assert not path.exists()
