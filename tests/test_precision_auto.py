"""Precision "auto" and the warning for emulated reduced precision, on tiny networks.

The CPU's capabilities are read in one function (`models.utils.cpu_capabilities`); the tests
replace it to stand for a CPU with and without native bf16 / fp16, the hardware this machine may
not have. Timings are replaced only where a test needs a given outcome of the race.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch

import sampling
import sde_lib
from configs.builtin.subvp_ddpmpp_small import get_config
from models import utils as mutils

NO_NATIVE = {"avx2": True, "avx512_bf16": False, "amx_bf16": False, "avx512_fp16": False,
             "amx_fp16": False}
NATIVE_BF16 = {**NO_NATIVE, "avx512_f": True, "avx512_bf16": True}


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """Empty measurement caches (memory and files) and no warning given yet."""
    monkeypatch.setenv(mutils.MEMORY_FORMAT_CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(mutils, "_MEASURED_FORMATS", {})
    monkeypatch.setattr(mutils, "_MEASURED_PRECISIONS", {})
    monkeypatch.setattr(mutils, "_WARNED_PRECISIONS", set())
    return tmp_path


def cpu_with(monkeypatch, capabilities: dict) -> None:
    monkeypatch.setattr(mutils, "cpu_capabilities", lambda: capabilities)


def tiny_config(precision: str = "fp32", memory_format: str = "contiguous"):
    """The built-in DDPM++ at 8 px with 8 base channels, on the CPU."""
    config = get_config()
    config.data.image_size = 8
    config.model.nf = 8
    config.model.memory_format = memory_format
    config.sampling.precision = precision
    config.device = torch.device("cpu")
    return config


def autocast_probe(model: torch.nn.Module) -> list:
    """Record, at each forward call, the autocast dtype in force on the CPU (None: none)."""
    seen = []

    def hook(module, inputs):
        enabled = torch.is_autocast_enabled("cpu")
        seen.append(torch.get_autocast_dtype("cpu") if enabled else None)

    model.register_forward_pre_hook(hook)
    return seen


def sample(config, model, steps: int = 2) -> torch.Tensor:
    """A DDIM sample of one 8 px image with `steps` network calls."""
    config = config.copy_and_resolve_references()
    config.sampling.update(method="ddim", steps=steps, noise_removal=False)
    sde = sde_lib.subVPSDE()
    fn = sampling.get_sampling_fn(config, sde, (1, 3, 8, 8), lambda x: x, 1e-3, progress=False)
    x, _ = fn(model, z=torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    return x


def fake_timings(monkeypatch, seconds: dict[str, float]) -> list:
    """Replace the forward timing by `seconds` per precision (1 s when absent); returns the
    list of variant sets timed."""
    calls = []

    def timed(model, image_size, num_channels, variants, batch=1, repeats=3):
        calls.append(dict(variants))
        return {name: seconds.get(precision, 1.0) for name, (precision, _) in variants.items()}

    monkeypatch.setattr(mutils, "time_forward_variants", timed)
    return calls


# ----------------------------------------------------------------------------------------------
# What the CPU computes natively


def test_native_precisions_follow_the_cpu_capabilities(monkeypatch):
    real = mutils.cpu_capabilities()
    native = mutils.native_precisions("cpu")
    assert "fp32" in native
    # This machine's own answer agrees with what torch reports of its instructions.
    assert ("bf16" in native) == any(real.get(f) for f in ("avx512_bf16", "amx_bf16", "bf16",
                                                           "sve_bf16"))
    cpu_with(monkeypatch, NO_NATIVE)
    assert mutils.native_precisions("cpu") == {"fp32"}
    cpu_with(monkeypatch, NATIVE_BF16)
    assert mutils.native_precisions(torch.device("cpu")) == {"fp32", "bf16"}
    cpu_with(monkeypatch, {**NO_NATIVE, "amx_bf16": True, "amx_fp16": True})
    assert mutils.native_precisions("cpu") == {"fp32", "bf16", "fp16"}
    cpu_with(monkeypatch, {"architecture": "arm64", "bf16": True})
    assert mutils.native_precisions("cpu") == {"fp32", "bf16"}
    cpu_with(monkeypatch, {})  # a torch that cannot tell: nothing but fp32
    assert mutils.native_precisions("cpu") == {"fp32"}


# ----------------------------------------------------------------------------------------------
# "auto"


def test_auto_never_picks_a_precision_the_cpu_emulates(monkeypatch, fresh, caplog):
    cpu_with(monkeypatch, NO_NATIVE)
    # Even a race bf16 would win is not run: an emulated precision is never a candidate.
    calls = fake_timings(monkeypatch, {"bf16": 0.1, "fp16": 0.1})
    config = tiny_config("auto")
    config.training.precision = "auto"
    with caplog.at_level(logging.WARNING, logger="models.utils"):
        model = mutils.create_model(config)
    assert model.auto_precision == "fp32"
    assert mutils.network_precision(model, "auto") == "fp32"
    assert calls == [] and not mutils.precision_cache_path().exists()
    assert caplog.records == [], "auto is not an explicit reduced precision: no warning"
    seen = autocast_probe(model)
    with torch.no_grad():
        auto = sample(config, model)
    assert seen == [None, None], "the network ran without autocast"
    config.sampling.precision = "fp32"
    assert torch.equal(auto, sample(config, model)), "auto is fp32 here, bit for bit"


def test_auto_picks_a_native_reduced_precision_only_when_measured_faster(monkeypatch, fresh):
    cpu_with(monkeypatch, NATIVE_BF16)
    # Not faster by the margin: fp32 stays.
    calls = fake_timings(monkeypatch, {"fp32": 1.0, "bf16": 0.9})
    config = tiny_config("auto")
    assert mutils.create_model(config).auto_precision == "fp32"
    assert [set(c) for c in calls] == [{"fp32", "bf16"}]
    # Faster (another configuration, so measured anew): bf16, in the layout measured for bf16.
    calls = fake_timings(monkeypatch, {"fp32": 1.0, "bf16": 0.5})
    config.model.nf = 16
    config.model.memory_format = "auto"
    model = mutils.create_model(config)
    assert model.auto_precision == "bf16"
    timed = [set(c) for c in calls]
    assert timed == [{"contiguous", "channels_last"}] * 2 + [{"fp32", "bf16"}]
    entries = json.loads(mutils.precision_cache_path().read_text())
    assert sorted(entries.values()) == ["bf16", "fp32"]
    # The sampler's "auto" runs this network under bf16 autocast; its output stays float32.
    seen = autocast_probe(model)
    with torch.no_grad():
        x = sample(config, model)
    assert seen == [torch.bfloat16] * 2 and x.dtype == torch.float32
    # Measured once per machine and configuration: another process reads the file.
    monkeypatch.setattr(mutils, "_MEASURED_PRECISIONS", {})
    monkeypatch.setattr(mutils, "_MEASURED_FORMATS", {})
    assert mutils.create_model(config).auto_precision == "bf16"
    assert len(calls) == 3
    # A module composed of such networks follows them; disagreeing parts run in fp32.
    assert mutils.network_precision(torch.nn.Sequential(model), "auto") == "bf16"
    other = mutils.create_model(tiny_config("fp32"))
    assert mutils.network_precision(torch.nn.Sequential(model, other), "auto") == "fp32"
    assert mutils.network_precision(torch.nn.Conv2d(1, 1, 1), "auto") == "fp32"
    assert mutils.network_precision(model, "fp16") == "fp16"


def test_precision_measurement_times_every_candidate(fresh):
    model = mutils.create_model(tiny_config())
    layouts = {"fp32": torch.contiguous_format, "bf16": torch.channels_last}
    chosen, medians = mutils.measure_precision(model, 8, 3, layouts, batch=1, repeats=1)
    assert set(medians) == {"fp32", "bf16"} and all(v > 0 for v in medians.values())
    faster = medians["bf16"] < mutils.REDUCED_PRECISION_MARGIN * medians["fp32"]
    assert chosen == ("bf16" if faster else "fp32")
    assert mutils.model_memory_format(model) == torch.contiguous_format
    with pytest.raises(ValueError, match="needs fp32"):
        mutils.measure_precision(model, 8, 3, {"bf16": torch.channels_last})


# ----------------------------------------------------------------------------------------------
# Explicit reduced precision


@pytest.mark.parametrize("native", [False, True])
def test_explicit_emulated_precision_warns_once_before_the_work(monkeypatch, fresh, native):
    cpu_with(monkeypatch, NATIVE_BF16 if native else NO_NATIVE)
    events = []

    class Recorder(logging.Handler):
        def emit(self, record):
            events.append(("warning", record.getMessage()))

    handler = Recorder(level=logging.WARNING)
    logging.getLogger("models.utils").addHandler(handler)
    try:
        config = tiny_config("bf16")
        model = mutils.create_model(config)
        model.register_forward_pre_hook(lambda module, inputs: events.append(("call", None)))
        with torch.no_grad():
            x = sample(config, model)
            sample(config, mutils.create_model(config))
    finally:
        logging.getLogger("models.utils").removeHandler(handler)
    warnings = [message for kind, message in events if kind == "warning"]
    assert torch.isfinite(x).all()
    if native:
        assert warnings == []
        return
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert events[0][0] == "warning", "the warning comes before the first network call"
    assert warnings[0].startswith("config.sampling.precision = bf16, but this CPU (")
    assert "has no native bf16" in warnings[0] and mutils.EMULATED_SLOWDOWN in warnings[0]
    # Another reduced precision is another warning, also once.
    logging.getLogger("models.utils").addHandler(handler)
    try:
        for _ in range(2):
            assert mutils.check_precision_setting("fp16", "cpu", "training.precision") == "fp16"
    finally:
        logging.getLogger("models.utils").removeHandler(handler)
    fp16 = [message for kind, message in events if kind == "warning"][1:]
    assert len(fp16) == 1 and fp16[0].startswith("config.training.precision = fp16, but")


def test_fp32_and_auto_never_warn(monkeypatch, fresh, caplog):
    cpu_with(monkeypatch, NO_NATIVE)
    with caplog.at_level(logging.WARNING, logger="models.utils"):
        for setting in ("fp32", "auto"):
            assert mutils.check_precision_setting(setting, "cpu") == setting
        assert mutils.check_precision_setting("bf16") == "bf16"  # no device: checked only
    assert caplog.records == []


def test_unknown_precision_setting_is_one_sentence():
    config = tiny_config("fp8")
    with pytest.raises(ValueError) as info:
        mutils.create_model(config)
    assert str(info.value) == ("Unknown precision 'fp8': set config.training.precision or "
                               "config.sampling.precision to one of auto, fp32, bf16, fp16.")
    with pytest.raises(ValueError, match="Unknown precision 'half'"):
        with mutils.network_options(precision="half"):
            pass


@pytest.mark.parametrize("native", [False, True])
def test_training_with_auto_runs_in_the_measured_precision(monkeypatch, fresh, tmp_path, native):
    import run_lib

    cpu_with(monkeypatch, NATIVE_BF16 if native else NO_NATIVE)
    fake_timings(monkeypatch, {"fp32": 1.0, "bf16": 0.5})
    seen = []
    create = mutils.create_model

    def probed(config, *args, **kwargs):
        model = create(config, *args, **kwargs)
        seen.append(autocast_probe(model))
        return model

    monkeypatch.setattr(mutils, "create_model", probed)
    config = tiny_config()
    config.model.num_scales = 4
    config.training.update(precision="auto", batch_size=4, n_iters=1, snapshot_sampling=False)
    config.eval.batch_size = 4
    run_lib.train(config, tmp_path / "work", progress=False)
    calls = [dtype for model_calls in seen for dtype in model_calls]
    assert calls, "the training step called the network"
    assert set(calls) == ({torch.bfloat16} if native else {None})


def test_machine_kind_names_the_kernels_amx_and_the_bf16_path(monkeypatch):
    """Timings are reported with the machine kind: the CPU's name, the instruction set torch's
    kernels use, AMX when present, and whether bf16 runs natively or emulated."""
    name = mutils.processor_name()
    assert name and mutils.machine_kind().startswith(f"{name} (")
    assert torch.backends.cpu.get_cpu_capability() in mutils.machine_kind()
    cpu_with(monkeypatch, NO_NATIVE)
    assert mutils.machine_kind().endswith(", bf16 emulated)")
    assert "AMX" not in mutils.machine_kind()
    cpu_with(monkeypatch, {**NATIVE_BF16, "amx_tile": True, "amx_bf16": True})
    assert mutils.machine_kind().endswith(", AMX, native bf16)")
