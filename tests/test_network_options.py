"""How networks run: channels-last memory format, reduced precision around the network only,
torch.compile, gradient accumulation, fp16 loss scaling; all on tiny shapes on the CPU."""
from __future__ import annotations

import copy
import functools
import json

import numpy as np
import pytest
import torch
from reference_cases import CASES, case_config, expected

import demo_settings
import evaluation
import likelihood
import losses
import sampling
import sde_lib
from models import utils as mutils
from models.checkpoints import load_model_weights
from models.ema import ExponentialMovingAverage

RELATIVE_TOL = 1e-5


def _max_relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@functools.cache
def demo_network(size: int, memory_format: str = "auto",
                 precision: str = "fp32") -> tuple[torch.nn.Module, object]:
    """The committed demo EMA network at `size` (sub-VP DDPM++, nf 16) and its config, built for
    sampling in `precision` (an "auto" memory format is measured in that precision)."""
    path = demo_settings.checkpoint_path(size, "builtin")
    if not path.is_file():
        pytest.skip(f"no committed demo checkpoint at {path}")
    settings = demo_settings.DemoSettings.for_mode("quick", "builtin")
    config = demo_settings.demo_config(size, settings, device=torch.device("cpu"))
    config.model.memory_format = memory_format
    config.sampling.precision = precision
    return load_model_weights(mutils.create_model(config), path, device="cpu"), config


# ----------------------------------------------------------------------------------------------
# Memory format


@pytest.mark.parametrize("case", CASES)
def test_channels_last_equals_contiguous_on_the_reference_cases(reference_dir, case):
    case_dir = reference_dir / case
    e = expected(case_dir)
    sde, _ = sde_lib.get_sde(case_config(case_dir, 32))
    for size, x, key in ((32, e["x"], "score_full"), (16, e["x_sub"], "score_sub")):
        which = "full" if size == 32 else "subspace"
        scores = {}
        for memory_format in ("contiguous", "channels_last"):
            config = case_config(case_dir, size)
            config.model.memory_format = memory_format
            model = load_model_weights(mutils.create_model(config),
                                       case_dir / f"checkpoint_{which}.pth", device="cpu")
            assert mutils.model_memory_format(model) == mutils.resolve_memory_format(
                memory_format, "cpu")
            score_fn = mutils.get_score_fn(sde, model, train=False, continuous=True)
            with torch.no_grad():
                scores[memory_format] = torch.stack([score_fn(x, t) for t in e["vec_t"]])
        fast = scores["channels_last"]
        assert fast.is_contiguous(), "outputs must come back in the default layout"
        for i in range(len(e["vec_t"])):
            assert _max_relative(fast[i], scores["contiguous"][i]) <= RELATIVE_TOL, (key, i)
            assert _max_relative(fast[i], e[key][i]) <= RELATIVE_TOL, (key, i)


def test_auto_memory_format_is_measured_on_cpu_and_a_rule_elsewhere():
    cl, contiguous = torch.channels_last, torch.contiguous_format
    assert mutils.resolve_memory_format("auto", "cpu") is None  # measured by create_model
    assert mutils.resolve_memory_format("auto", "cpu", precision="bf16") is None
    assert mutils.resolve_memory_format("auto", "cuda") == contiguous
    assert mutils.resolve_memory_format("auto", "cuda", precision="fp16") == cl
    assert mutils.resolve_memory_format("auto", "meta") == contiguous
    assert mutils.resolve_memory_format("contiguous", "cpu") == contiguous
    assert mutils.resolve_memory_format("channels_last", "cuda") == cl
    with pytest.raises(ValueError) as info:
        mutils.resolve_memory_format("nhwc", "cpu")
    assert str(info.value) == ("Unknown memory format 'nhwc': set config.model.memory_format to "
                               "one of auto, contiguous, channels_last.")


def test_auto_memory_format_is_measured_once_per_machine_and_configuration(monkeypatch,
                                                                             tmp_path):
    monkeypatch.setenv(mutils.MEMORY_FORMAT_CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(mutils, "_MEASURED_FORMATS", {})
    config = demo_settings.demo_config(8, demo_settings.DemoSettings.for_mode("smoke", "builtin"),
                                       device=torch.device("cpu"))
    config.model.nf = 8
    calls = []
    measure = mutils.measure_memory_format

    def counting(*args, **kwargs):
        calls.append(args[1:])
        return measure(*args, **kwargs)

    monkeypatch.setattr(mutils, "measure_memory_format", counting)
    # Building draws initial weights from the global generator; the probe draws nothing more.
    config.model.memory_format = "contiguous"
    torch.manual_seed(0)
    mutils.create_model(config)
    rng_state = torch.get_rng_state()
    config.model.memory_format = "auto"
    torch.manual_seed(0)
    first = mutils.create_model(config)
    assert torch.equal(torch.get_rng_state(), rng_state), "the probe must not draw from it"
    assert first.training, "the model comes back in its own mode"
    config.model.num_scales = 7  # N sizes the noise-level table only: not measured again
    second = mutils.create_model(config)
    assert calls == [(8, 3, "fp32")]
    assert mutils.model_memory_format(first) == mutils.model_memory_format(second)
    config.sampling.precision = "bf16"  # another precision is measured again
    mutils.create_model(config)
    assert calls == [(8, 3, "fp32"), (8, 3, "bf16")]
    # Another process (an empty memory) reads both answers from the file instead of measuring.
    cache = mutils.memory_format_cache_path()
    assert cache.parent == tmp_path
    entries = json.loads(cache.read_text())
    assert len(entries) == 2 and set(entries.values()) <= {"contiguous", "channels_last"}
    monkeypatch.setattr(mutils, "_MEASURED_FORMATS", {})
    mutils.create_model(config)
    assert len(calls) == 2
    # The file's answer is the one used (here the opposite of what was measured).
    key = next(k for k in entries if "/bf16/" in k)
    flipped = "contiguous" if entries[key] == "channels_last" else "channels_last"
    cache.write_text(json.dumps({**entries, key: flipped}))
    monkeypatch.setattr(mutils, "_MEASURED_FORMATS", {})
    expected = torch.channels_last if flipped == "channels_last" else torch.contiguous_format
    assert mutils.model_memory_format(mutils.create_model(config)) == expected
    # An unreadable file is measured over.
    cache.write_text("not json")
    monkeypatch.setattr(mutils, "_MEASURED_FORMATS", {})
    mutils.create_model(config)
    assert len(calls) == 3
    config.sampling.precision = "fp32"
    # The measurement itself: medians of both formats, and the faster one past the margin.
    chosen, medians = measure(first, 8, 3, repeats=2)
    assert set(medians) == {"contiguous", "channels_last"}
    assert all(value > 0 for value in medians.values())
    faster = medians["channels_last"] < mutils.CHANNELS_LAST_MARGIN * medians["contiguous"]
    assert chosen == (torch.channels_last if faster else torch.contiguous_format)
    assert mutils.model_memory_format(first) == torch.contiguous_format


# ----------------------------------------------------------------------------------------------
# Reduced precision


def test_reduced_precision_runs_the_network_only_and_returns_float32():
    model, _ = demo_network(8)
    fn = mutils.get_model_fn(model, train=False)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([5.0, 200.0, 500.0, 900.0])
    with torch.no_grad():
        ref = fn(x, labels)
        for precision, bound in (("bf16", 3e-2), ("fp16", 1e-1)):
            with mutils.network_options(precision=precision) as options:
                assert options.precision == precision
                low = fn(x, labels)
            assert low.dtype == torch.float32
            error = _max_relative(low, ref)
            assert 0 < error < bound, (precision, error)
        # Nested blocks inherit what they do not set; leaving a block restores fp32.
        with mutils.network_options(precision="bf16"):
            with mutils.network_options(compile=False):
                assert mutils.current_network_options().precision == "bf16"
        assert mutils.current_network_options() == mutils.NetworkOptions()
        assert torch.equal(fn(x, labels), ref)


def test_unknown_precision_is_one_sentence():
    with pytest.raises(ValueError) as info:
        with mutils.network_options(precision="fp8"):
            pass
    assert str(info.value) == ("Unknown precision 'fp8': set config.training.precision or "
                               "config.sampling.precision to one of auto, fp32, bf16, fp16.")
    with pytest.raises(ValueError, match="Unknown precision 'half'"):
        losses.get_step_fn(sde_lib.subVPSDE(), train=False, precision="half")


def test_bits_per_dim_stay_fp32_inside_a_reduced_precision_block():
    model, config = demo_network(8)
    sde, _ = sde_lib.get_sde(config)
    data = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    scaler = lambda x: 2 * x - 1  # noqa: E731  (the sub-VP demo data are centred)
    inverse_scaler = lambda x: (x + 1) / 2  # noqa: E731

    def bpd(precision: str | None = None, outer: str | None = None) -> torch.Tensor:
        kwargs = {} if precision is None else {"precision": precision}
        fn = likelihood.get_likelihood_fn(sde, inverse_scaler, rtol=1e-2, atol=1e-2, **kwargs)
        with mutils.network_options(precision=outer):
            return fn(model, scaler(data), generator=torch.Generator().manual_seed(2))[0]

    fp32 = bpd()
    assert torch.equal(bpd(outer="bf16"), fp32)
    asked = bpd(precision="bf16")
    assert not torch.equal(asked, fp32) and torch.allclose(asked, fp32, rtol=2e-2)


def test_sampling_precision_from_the_config_reaches_the_network_only():
    model, config = demo_network(8)
    sde, eps = sde_lib.get_sde(config)
    config.sampling.method = "ode"
    # At 1e-2 the adaptive step sequences of the two precisions can differ, which alone moves
    # a sample by more than bf16 does (0.17 of the maximum on the committed 8x8 model).
    config.sampling.update(rtol=1e-3, atol=1e-3)
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x, labels):
            seen.append((mutils.current_network_options().precision, x.dtype))
            return model(x, labels)

    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    results = {}
    for precision in ("fp32", "bf16"):
        config.sampling.precision = precision
        fn = sampling.get_sampling_fn(config, sde, (2, 3, 8, 8), lambda x: x, eps,
                                      progress=False)
        seen.clear()
        results[precision], nfe = fn(Probe(), z=z)
        assert nfe == len(seen) and {s for s in seen} == {(precision, torch.float32)}
    assert results["bf16"].dtype == torch.float32
    assert 0 < _max_relative(results["bf16"], results["fp32"]) < 0.1
    config.sampling.precision = "float8"
    with pytest.raises(ValueError, match="Unknown precision 'float8'"):
        sampling.get_sampling_fn(config, sde, (2, 3, 8, 8), lambda x: x, eps)


def test_ode_sampler_defaults_to_the_torch_solver():
    import inspect

    for fn in (sampling.ode_sample_window, sampling.get_ode_sampler):
        assert inspect.signature(fn).parameters["solver"].default == "torch"


def _bootstrap_fid_std(features: np.ndarray, stats: dict, draws: int, seed: int) -> float:
    """Standard deviation of the proxy FID over bootstrap resamples of the images' features."""
    rng = np.random.default_rng(seed)
    root = evaluation.symmetric_matrix_sqrt(np.asarray(stats["sigma"], np.float64))
    values = []
    for _ in range(draws):
        sample = features[rng.integers(0, len(features), len(features))]
        values.append(evaluation.frechet_distance(sample.mean(0), np.cov(sample, rowvar=False),
                                                  stats["mu"], stats["sigma"], root2=root))
    return float(np.std(values))


def test_bf16_sampling_keeps_the_proxy_fid_of_fp32_on_the_demo_checkpoints():
    # Laid out as a bf16 run lays it out: "auto" measured in bf16, which this AVX2 CPU without
    # native bf16 emulates 4x faster channels-last than contiguous (a measurement in fp32 may
    # pick either). fp32 gives the same numbers in both layouts (to 1e-5, tested above).
    model, config = demo_network(32, precision="bf16")
    stats = evaluation.load_dataset_stats(config, "proxy")
    # 16 images and 25 Euler-Maruyama steps (the network is continuous-time, so N is free).
    sde = sde_lib.subVPSDE(config.model.beta_min, config.model.beta_max, N=25)
    eps = 1e-3
    score_fn = mutils.get_score_fn(sde, model, train=False, continuous=True)
    images = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        x = sde.prior_sampling((16, 3, 32, 32))
        with mutils.network_options(precision=precision):
            x, _, _ = sampling.pc_sample_window(score_fn, sde, x, sde.T, eps, sde.N,
                                                predictor="euler_maruyama", corrector="none",
                                                snr=0.0, n_steps_each=1, denoise=True,
                                                progress=False, eps=eps)
        assert x.dtype == torch.float32
        images[precision] = evaluation.to_uint8_nhwc((x.clamp(-1, 1) + 1) / 2)
    assert not np.array_equal(images["bf16"], images["fp32"])
    fids = {p: evaluation.proxy_fid(images[p], stats) for p in images}
    spread = _bootstrap_fid_std(evaluation.proxy_features(images["fp32"]), stats, 100, 0)
    # A generous bound for 16 images: two bootstrap standard deviations of the fp32 FID.
    assert abs(fids["bf16"] - fids["fp32"]) <= 2 * spread, (fids, spread)


# ----------------------------------------------------------------------------------------------
# Training step: gradient accumulation, fp16 loss scaling, compilation


def _train_state(seed: int = 0, size: int = 8) -> tuple[dict, object]:
    import importlib

    config = importlib.import_module("configs.builtin.subvp_ddpmpp_small").get_config()
    config.data.image_size = size
    config.model.dropout = 0.0  # dropout masks come from the global generator
    config.device = torch.device("cpu")
    torch.manual_seed(seed)
    model = mutils.create_model(config)
    state = dict(model=model, ema=ExponentialMovingAverage(model.parameters(), decay=0.9),
                 optimizer=losses.get_optimizer(config, model.parameters()), step=1)
    return state, config


def _generators(step: int, batch: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 * step + i) for i in range(batch)]


def _step(state: dict, config, batch: torch.Tensor, step: int, **options) -> torch.Tensor:
    step_fn = losses.get_step_fn(sde_lib.get_sde(config)[0], train=True,
                                 optimize_fn=losses.optimization_manager(config),
                                 reduce_mean=False, continuous=True, **options)
    return step_fn(state, batch, generator=_generators(step, len(batch)))


def test_gradient_accumulation_gives_the_update_of_the_whole_batch():
    state, config = _train_state()
    batch = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    split = copy.deepcopy(state)
    for step in (1, 2):
        whole = _step(state, config, batch, step)
        parts = _step(split, config, batch, step, grad_accum=4)
        assert abs(float(parts) - float(whole.detach())) <= 1e-5 * abs(float(whole.detach()))
    assert split["step"] == state["step"] == 3
    for p, q in zip(state["model"].parameters(), split["model"].parameters()):
        assert (p - q).abs().max() <= 1e-6, "parameters differ after accumulated steps"
    for p, q in zip(state["ema"].shadow_params, split["ema"].shadow_params):
        assert (p - q).abs().max() <= 1e-6
    with pytest.raises(ValueError) as info:
        _step(split, config, batch, 3, grad_accum=3)
    assert str(info.value) == ("A batch of 8 does not split into 3 equal micro-batches: make "
                               "config.training.batch_size (per process) a multiple of "
                               "config.training.grad_accum.")
    with pytest.raises(ValueError, match="positive whole number of micro-batches, not 0"):
        _step(split, config, batch, 3, grad_accum=0)


def test_fp16_training_scales_the_loss_and_follows_the_fp32_update():
    state, config = _train_state()
    batch = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    half = copy.deepcopy(state)
    before = [p.detach().clone() for p in state["model"].parameters()]
    loss32 = _step(state, config, batch, 1)
    # The loss scale starts at 2^16: steps whose scaled gradients overflow are skipped (the
    # parameters stay) and the scale halves, until the gradients fit in fp16.
    step_fn = losses.get_step_fn(sde_lib.get_sde(config)[0], train=True,
                                 optimize_fn=losses.optimization_manager(config),
                                 reduce_mean=False, continuous=True, precision="fp16")
    skipped = 0
    while True:
        loss16 = step_fn(half, batch, generator=_generators(1, len(batch)))
        if any(not torch.equal(p, b) for p, b in zip(half["model"].parameters(), before)):
            break
        skipped += 1
        assert skipped < 24, "fp16 steps never took effect"
    assert skipped > 0, "the first fp16 step should overflow at the initial loss scale 2^16"
    loss16, loss32 = float(loss16.detach()), float(loss32.detach())
    assert np.isfinite(loss16) and abs(loss16 - loss32) < 0.05 * loss32
    d32 = torch.cat([(p - b).flatten() for p, b in zip(state["model"].parameters(), before)])
    d16 = torch.cat([(p - b).flatten() for p, b in zip(half["model"].parameters(), before)])
    assert torch.isfinite(d16).all()
    cosine = torch.dot(d32, d16) / (d32.norm() * d16.norm())
    assert cosine > 0.9, f"the fp16 update points elsewhere (cosine {cosine:.3f})"


def test_compiled_network_matches_eager_and_keeps_the_state_dict():
    model, _ = demo_network(8)
    keys = list(model.state_dict())
    fn = mutils.get_model_fn(model, train=False)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([100.0, 700.0])
    with torch.no_grad():
        eager = fn(x, labels)
        # aot_eager traces the graph as inductor does, without minutes of C++ code generation.
        with mutils.network_options(compile="aot_eager"):
            compiled = fn(x, labels)
    assert _max_relative(compiled, eager) <= RELATIVE_TOL
    assert list(model.state_dict()) == keys

    state, config = _train_state()
    batch = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(7)) * 2 - 1
    other = copy.deepcopy(state)
    _step(state, config, batch, 1)
    # The training step through dynamo's graph capture ("eager" backend: no code generation).
    _step(other, config, batch, 1, compile="eager")
    for p, q in zip(state["model"].parameters(), other["model"].parameters()):
        assert (p - q).abs().max() <= 1e-6
    assert list(other["model"].state_dict()) == list(state["model"].state_dict())


@pytest.mark.parametrize("module", ["configs.builtin.ve_ncsnpp_small",
                                    "configs.builtin.subvp_ddpmpp_small"])
def test_the_networks_trace_as_one_graph(module):
    # A graph break (NumPy in the FIR kernel lookup was one) splits the compiled network into
    # per-block graphs that recompile for every block instance and fall back to eager.
    import importlib

    config = importlib.import_module(module).get_config()
    config.data.image_size = 8
    config.device = torch.device("cpu")
    model = mutils.create_model(config).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    labels = torch.tensor([0.5, 1.0])
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x, labels)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
