"""Bad input to every entry script: exit status 1, exactly one line `error: ...` on stderr that
names the flag or file, no traceback, nothing written under the output folder, no tracked file
changed. The cases run in forked children of one process (tests/entry_cases.py)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/builtin/subvp_ddpmpp_small.py"
NOT_CKPT = "notes.txt is not a PyTorch checkpoint"
CKPT = {size: f"assets/checkpoints/builtin/subvp_ddpmpp_small_{size}.pth" for size in (32, 16, 8)}


def _tracked_state() -> dict[str, str]:
    """Digest of each tracked file's content (what `git status` would show as modified)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.split(b"\0")
    state = {}
    for name in filter(None, listed):
        path = ROOT / name.decode()
        state[name.decode()] = (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file()
                                else "<missing>")
    return state


def _changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def _cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(target, args, expected): the error line is `expected` when that starts with "error: ",
    else it contains `expected`."""
    out = str(tmp / "out")
    missing = str(tmp / "missing.pth")
    text = tmp / "notes.txt"  # a text file where a checkpoint belongs
    text.write_text("not a checkpoint\n")
    blocker = tmp / "a_file"
    blocker.write_text("x")
    inside_file = str(blocker / "samples")
    # A training workdir whose resume checkpoint is a text file (torch's loader: KeyError 101).
    textrun = tmp / "textrun"
    (textrun / "checkpoints-meta").mkdir(parents=True)
    (textrun / "checkpoints-meta" / "checkpoint.pth").write_text("epoch 1, loss 0.5\n")
    sample = ["--config", CONFIG, "--ckpt_full", CKPT[32], "--ckpt_subspace", CKPT[16],
              "--subspace", "16", "--time", "0.5", "--eval_folder", out, "--save_name", "s",
              "--number_samples", "2", "--batch", "2", "--progress=false"]
    main = ["--config", CONFIG, "--workdir", out, "--progress=false"]
    subspace = [*main, "--mode", "eval_subspace", "--subspace", "16", "--time", "0.5",
                "--ckpt_full", CKPT[32], "--ckpt_subspace", CKPT[16]]
    inpaint = ["--config", CONFIG, "--checkpoint_full", CKPT[32], "--checkpoint_subspace",
               CKPT[16], "--subspace", "16", "--image_path", f"{out}/grid.png",
               "--progress=false"]
    rmsd = ["--config", CONFIG, "--noprogress"]
    divergence = ["--config", CONFIG, "--checkpoint", CKPT[32], "--subspace", "16",
                  "--out", f"{out}/d.json", "--noprogress"]
    stats = ["--config", CONFIG, "--features", "proxy", "--out", f"{out}/s.npz", "--noprogress"]
    demo = ["--workdir", out, "--no_progress"]
    nan_ckpt = _changed_weights(tmp / "nan.pth", lambda w: w.view(-1)[:1].fill_(float("nan")))
    train = [*main, "--mode", "train"]
    typo = ["--config.sampling.shedule", "edm"]
    suggestion = "did you mean --config.sampling.schedule?"
    return [
        # subspace_sample.py
        ("subspace_sample.py", [*sample, "--langevin_snr", "-1"], "--langevin_snr"),
        ("subspace_sample.py", [*sample, "--langevin_snr", "0"], "--langevin_snr"),
        ("subspace_sample.py", [*sample, "--langevin_steps", "-1"], "--langevin_steps"),
        ("subspace_sample.py", [*sample, "--batch", "0"], "--batch"),
        ("subspace_sample.py", [*sample, "--batch", "abc"], "--batch"),
        ("subspace_sample.py", [*sample, "--number_samples", "0"], "--number_samples"),
        ("subspace_sample.py", [*sample, "--eps", "0"], "--eps"),
        ("subspace_sample.py", [*sample, "--eps", "1.5"], "--eps"),
        ("subspace_sample.py", [*sample, "--seed", "-1"], "--seed"),
        ("subspace_sample.py", [*sample, "--time", "1.5"], "--time"),
        ("subspace_sample.py", [*sample, "--time", "abc"], "--time"),
        ("subspace_sample.py", [*sample, "--subspace", "12"], "--subspace 12"),
        ("subspace_sample.py", [*sample, "--subspace", "64"], "valid sizes are 16, 8, 4, 2, 1"),
        ("subspace_sample.py", [*sample, "--subspace", "16,8", "--time", "0.5,0.6"],
         "error: Got 2 subspace sizes [16, 8] but 1 --ckpt_subspace files: give one per size, "
         "same order."),
        ("subspace_sample.py", [*sample, "--ckpt_full", str(text)], NOT_CKPT),
        ("subspace_sample.py", [*sample, "--ckpt_full", "missing.pth"], "--ckpt_full"),
        ("subspace_sample.py", [*sample, "--ckpt_subspace", CKPT[8]], CKPT[8]),
        ("subspace_sample.py", [*sample, "--eval_folder", inside_file], "--eval_folder"),
        ("subspace_sample.py", [*sample, "--eval_folder", "/proc/samples"], "--eval_folder"),
        ("subspace_sample.py", [*sample, "--save_name", "a/b"], "--save_name"),
        ("subspace_sample.py", [*sample, "--dataset", "nosuchdata"], "python -m analysis.rmsd"),
        ("subspace_sample.py", [*sample, "--config.sampling.precision", "fp8"],
         "error: Unknown precision 'fp8': set config.training.precision or "
         "config.sampling.precision to one of auto, fp32, bf16, fp16."),
        ("subspace_sample.py", [*sample, "--config", "nowhere.py"], "--config nowhere.py"),
        ("subspace_sample.py", [*sample, "--bogus", "1"], "bogus"),
        ("subspace_sample.py", sample[:-6], "--save_name"),
        ("subspace_sample.py", [a for a in sample if a not in ("--save_name", "s")],
         "Give the required flag --save_name"),
        # main.py
        ("main.py", [*main, "--mode", "bogus"], "--mode"),
        ("main.py", main, "--mode"),
        ("main.py", [*main, "--mode", "eval"],
         f"Checkpoint {out}/checkpoints/checkpoint_1.pth does not exist"),
        ("main.py", [*main, "--mode", "train", "--dist_timeout_minutes", "0"],
         "--dist_timeout_minutes"),
        ("main.py", ["--config", CONFIG, "--workdir", inside_file, "--mode", "train"],
         "--workdir"),
        ("main.py", ["--config", CONFIG, "--workdir", "/proc/run", "--mode", "train"],
         "--workdir"),
        ("main.py", [*main, "--mode", "train", "--config", "nowhere.py"], "--config"),
        ("main.py", ["--config", CONFIG, "--workdir", str(textrun), "--mode", "train"],
         "checkpoint.pth is not a PyTorch checkpoint"),
        ("main.py", [*main, "--mode", "eval_subspace", "--subspace", "4"],
         "needs --time, --ckpt_full, --ckpt_subspace"),
        ("main.py", [*subspace, "--subspace", "12"], "--subspace 12"),
        ("main.py", [*subspace, "--time", "-0.1"], "--time"),
        ("main.py", [*subspace, "--ckpt_full", str(text)], NOT_CKPT),
        ("main.py", [*subspace, "--ckpt_subspace", "nowhere.pth"], "--ckpt_subspace"),
        # subspace_inpainting.py
        ("subspace_inpainting.py", [*inpaint, "--batch_size", "100000"], "--batch_size"),
        ("subspace_inpainting.py", [*inpaint, "--batch_size", "0"], "--batch_size"),
        ("subspace_inpainting.py", [*inpaint, "--time", "2"], "--time"),
        ("subspace_inpainting.py", [*inpaint, "--subspace", "12"], "--subspace 12"),
        ("subspace_inpainting.py", [*inpaint, "--image_path", "/proc/x/grid.png"],
         "--image_path"),
        ("subspace_inpainting.py", [*inpaint, "--checkpoint_full", str(text)], NOT_CKPT),
        ("subspace_inpainting.py", [*inpaint, "--mask", "circle"], "--mask"),
        # analysis command lines
        ("analysis.rmsd", [*rmsd, "--max_images", "0"], "--max_images"),
        ("analysis.rmsd", [*rmsd, "--methods", "wavelet"],
         "error: --methods 'wavelet' must list some of downsample, pca, patch_pca."),
        ("analysis.rmsd", [*rmsd, "--out", "/proc/x/t.json"], "--out"),
        ("analysis.rmsd", [*rmsd, "--update_stats", "--stats_file", "/proc/x/s.json"],
         "--stats_file"),
        # A subspace-size config yields D^k coordinates, not images in [0, 1].
        ("analysis.rmsd", [*rmsd, "--config.data.image_size", "16"],
         "set --config.data.image_size 32"),
        ("analysis.divergence", [*divergence, "--num_images", "0"], "--num_images"),
        ("analysis.divergence", [*divergence, "--t_min", "1"], "--t_min"),
        ("analysis.divergence", [*divergence, "--subspace", "12"], "--subspace 12"),
        ("analysis.divergence", [*divergence, "--checkpoint", str(text)], NOT_CKPT),
        ("analysis.divergence", [*divergence, "--out", "/proc/x/d.json"], "--out"),
        ("analysis.divergence", [*divergence, "--checkpoint", missing],
         f"--checkpoint: no checkpoint file at {missing}"),
        ("analysis.divergence", [*divergence, "--dataset", "nowhere"],
         "No RMSD statistic for dataset 'nowhere'"),
        # analysis.cutoffs
        ("analysis.cutoffs", [str(tmp / "missing.json"), "--thresholds", "1e-3"],
         "python -m analysis.divergence"),
        ("analysis.cutoffs", [str(tmp / "missing.json"), "--thresholds", "1e-3,abc"],
         "error: --thresholds: Thresholds '1e-3,abc' are not comma-separated numbers, e.g. "
         "1e-4,3e-3."),
        ("analysis.bands", ["--config", CONFIG, "--checkpoint", CKPT[32], "--times", "0"],
         "--times"),
        ("analysis.bands", ["--config", CONFIG, "--checkpoint", str(text)], NOT_CKPT),
        ("analysis.bands", ["--config", CONFIG, "--checkpoint", CKPT[32], "--out",
                            "/proc/x/b.json"], "--out"),
        # compute_dataset_stats.py
        ("compute_dataset_stats.py", [*stats, "--max_images", "1"], "--max_images"),
        ("compute_dataset_stats.py", [*stats, "--out", "/proc/x/s.npz"], "--out"),
        ("compute_dataset_stats.py", [*stats, "--features", "bogus"], "--features"),
        ("compute_dataset_stats.py", [*stats, "--float16"],
         "--float16 applies to Inception features only"),
        # demo.py
        ("demo.py", [*demo, "--threads", "0"], "--threads"),
        ("demo.py", [*demo, "--mode", "quick", "--export_assets"], "--export_assets"),
        ("demo.py", [*demo, "--mode", "bogus"], "--mode"),
        ("demo.py", [*demo, "--dataset", "cifar"], "--dataset"),
        ("demo.py", [*demo, "--mode", "smoke", "--reuse_committed"], "--reuse_committed"),
        ("demo.py", ["--workdir", "/proc/demo", "--no_progress"], "--workdir"),
        # A misspelt config override, in every entry script that takes --config (with and
        # without --config on the command line: a default config applies overrides earlier).
        ("main.py", [*train, *typo], suggestion),
        ("subspace_sample.py", [*sample, *typo], suggestion),
        ("subspace_sample.py", [a for a in sample if a not in ("--config", CONFIG)] + typo,
         suggestion),
        ("subspace_inpainting.py", [*inpaint, *typo], suggestion),
        ("subspace_inpainting.py", [a for a in inpaint if a not in ("--config", CONFIG)] + typo,
         suggestion),
        ("analysis.rmsd", [*rmsd, *typo], suggestion),
        ("analysis.divergence", [*divergence, *typo], suggestion),
        ("analysis.bands", ["--config", CONFIG, "--checkpoint", CKPT[32], *typo], suggestion),
        ("compute_dataset_stats.py", [*stats, *typo], suggestion),
        ("main.py", [*train, "--config", "nowhere.py", "--config.sampling.schedule", "x"],
         "--config nowhere.py: no such config file"),
        ("main.py", [*train, "--config.sampling.schedule.x", "1"],
         "config.sampling.schedule is a NoneType value"),
        # Zero frequencies and a negative step count: refused before any folder is made.
        *[("main.py", [*train, f"--config.training.{field}", "0"], f"config.training.{field}")
          for field in ("snapshot_freq", "log_freq", "snapshot_freq_for_preemption",
                        "eval_freq")],
        ("main.py", [*train, "--config.training.n_iters", "-3"], "config.training.n_iters"),
        ("main.py", [*main, "--mode", "eval", "--config.eval.batch_size", "0"],
         "config.eval.batch_size"),
        ("main.py", [*main, "--mode", "eval", "--config.eval.begin_ckpt", "3",
                     "--config.eval.end_ckpt", "2"], "config.eval.begin_ckpt 3"),
        ("main.py", [*subspace, "--config.eval.enable_sampling", "--config.eval.batch_size",
                     "0"], "config.eval.batch_size"),
        ("main.py", [*main, "--mode", "eval", "--config.eval.enable_sampling",
                     "--config.sampling.method", "heun", "--config.sampling.schedule", "bogus"],
         "config.sampling.schedule 'bogus'"),
        ("main.py", [*main, "--mode", "eval", "--config.eval.enable_sampling",
                     "--config.sampling.steps", "5"], "config.sampling.steps 5"),
        ("main.py", [*subspace, "--config.eval.enable_sampling", "--config.eval.num_samples",
                     "1000000000000"], "would need"),
        # Settings a sampler would silently ignore or clip, caught before the settings file.
        ("subspace_sample.py", [*sample, "--sampler", "heun", "--config.sampling.churn", "-1"],
         "config.sampling.churn"),
        ("subspace_sample.py", [*sample, "--sampler", "ddim", "--config.sampling.eta", "-1"],
         "config.sampling.eta"),
        ("subspace_sample.py", [*sample, "--sampler", "pc", "--steps", "5"],
         "--config.model.num_scales 5"),
        ("subspace_sample.py", [*sample, "--sampler", "ode", "--steps", "5"], "--steps 5"),
        ("subspace_sample.py", [*sample, "--sampler", "heun", "--config.sampling.schedule",
                                "bogus"], "config.sampling.schedule 'bogus'"),
        ("subspace_sample.py", [*sample, "--config.sampling.predictor", "bogus"],
         "config.sampling.predictor"),
        # Absurd sample counts: one sentence with the disk space they would need.
        ("subspace_sample.py", [*sample, "--number_samples", "1000000000000", "--batch", "4"],
         "would need 6.1 PB on disk"),
        # A checkpoint with a NaN weight: refused before any sampling, naming the file.
        ("subspace_sample.py", [*sample, "--ckpt_full", str(nan_ckpt)],
         f"{nan_ckpt} holds NaN or infinite weights"),
        ("main.py", [*subspace, "--ckpt_full", str(nan_ckpt)],
         f"{nan_ckpt} holds NaN or infinite weights"),
    ]


def _changed_weights(path: Path, change, last: bool = False, source: str = CKPT[32]) -> Path:
    """A copy of the checkpoint `source` whose first (or `last`: the output layer's) weight
    tensor `change` edits in place."""
    import torch

    weights = torch.load(ROOT / source, weights_only=True)
    names = [k for k, v in weights.items() if v.is_floating_point() and v.dim() > 1]
    change(weights[names[-1] if last else names[0]])
    torch.save(weights, path)
    return path


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() \
        else []


def test_bad_input_to_every_entry_script(tmp_path):
    cases = _cases(tmp_path)
    before = _tracked_state()
    untracked_before = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT,
                                      capture_output=True, text=True).stdout
    driver = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "entry_cases.py")], cwd=ROOT,
        input=json.dumps([{"target": t, "args": a} for t, a, _ in cases]),
        capture_output=True, text=True, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert driver.returncode == 0, driver.stderr[-3000:]
    results = json.loads(driver.stdout)
    failures = []
    for (target, args, expected), result in zip(cases, results):
        lines = result["stderr"].strip().splitlines()
        exact = expected.startswith("error: ")
        ok = (result["status"] == 1 and len(lines) == 1 and lines[0].startswith("error: ")
              and (lines[0] == expected if exact else expected in lines[0])
              and "Traceback" not in result["stderr"])
        if not ok:
            failures.append(f"{target} {' '.join(args[-4:])}: status {result['status']}, "
                            f"expected '{expected}', stderr {result['stderr'][-600:]!r}")
    assert not failures, "\n".join(failures)
    assert _files_under(tmp_path / "out") == []
    assert _files_under(tmp_path / "textrun") == ["checkpoints-meta",
                                                  "checkpoints-meta/checkpoint.pth"]
    assert not _changed(before, _tracked_state())
    assert subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                          text=True).stdout == untracked_before


def _run_driver(cases: list[tuple[str, list[str]]]) -> list[dict]:
    driver = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "entry_cases.py")], cwd=ROOT,
        input=json.dumps([{"target": t, "args": a} for t, a in cases]),
        capture_output=True, text=True, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert driver.returncode == 0, driver.stderr[-3000:]
    return json.loads(driver.stdout)


def _one_error_line(result: dict, started: bool = False) -> str:
    """The single `error:` line of a case that failed as it should (status 1, no traceback).
    A run that `started` may have logged progress before it; the error line ends stderr."""
    lines = result["stderr"].strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert result["status"] == 1 and len(errors) == 1 and lines[-1] == errors[0], result
    assert started or len(lines) == 1, result
    assert "Traceback" not in result["stderr"] and "Exception ignored" not in result["stderr"]
    return errors[0]


def test_misspelt_field_of_every_config_section_is_one_line_with_the_suggestion(tmp_path):
    from ml_collections import ConfigDict

    from configs.builtin.subvp_ddpmpp_small import get_config

    config = get_config()
    # The first field of every section (data, model, training, sampling, eval, optim, ...)
    # and a top-level field, each with its last letter doubled.
    fields = [f"{name}.{next(iter(value.keys()))}" for name, value in config.items()
              if isinstance(value, ConfigDict)] + ["seed"]
    sections = {f.split(".")[0] for f in fields}
    assert {"data", "model", "training", "sampling", "eval", "optim", "seed"} <= sections
    args = ["--config", CONFIG, "--workdir", str(tmp_path / "out"), "--mode", "train"]
    cases = [("main.py", [*args, f"--config.{field}{field[-1]}", "1"]) for field in fields]
    for field, result in zip(fields, _run_driver(cases)):
        line = _one_error_line(result)
        assert f"did you mean --config.{field}?" in line, line
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_refused_and_non_finite_samples_stop_the_run(tmp_path):
    out = tmp_path / "out"
    nan_ckpt = _changed_weights(tmp_path / "nan.pth",
                                lambda w: w.view(-1)[:1].fill_(float("inf")))
    # Finite weights whose output overflows: the samples come out NaN / infinite.
    huge_ckpt = _changed_weights(tmp_path / "huge.pth", lambda w: w.mul_(1e38), last=True)
    args = ["--config", CONFIG, "--ckpt_subspace", CKPT[16], "--subspace", "16", "--time",
            "0.5", "--eval_folder", str(out), "--number_samples", "4", "--batch", "2",
            "--sampler", "ddim", "--steps", "2", "--progress=false"]
    nan, huge = _run_driver([
        ("subspace_sample.py", [*args, "--ckpt_full", str(nan_ckpt), "--save_name", "a"]),
        ("subspace_sample.py", [*args, "--ckpt_full", str(huge_ckpt), "--save_name", "b"])])
    line = _one_error_line(nan)
    assert f"{nan_ckpt} holds NaN or infinite weights" in line
    line = _one_error_line(huge, started=True)
    assert "Sampling round 0 came out with NaN or infinite values" in line
    assert str(huge_ckpt) in line and "nothing of this round was saved or scored" in line
    # The NaN weights were refused before any sampling: not even a settings record for "a".
    # The non-finite round was not saved as if it were fine: no round file, no sample file.
    assert _files_under(out) == ["b.settings.json"]


@pytest.mark.parametrize("exc, expected", [
    (OSError(28, "No space left on device", "/data/ckpt.pth"),
     "The disk is full (/data/ckpt.pth)"),
    (PermissionError(13, "Permission denied", "/data/x"), "Permission denied (/data/x)"),
    (FileNotFoundError(2, "No such file or directory", "/proc/s"),
     "No such file or directory (/proc/s)."),
    (FileNotFoundError("No checkpoint file at x.pth: check the path."),
     "No checkpoint file at x.pth: check the path."),
    (KeyError(101), "A required entry 101 is missing"),
    (KeyError("No RMSD statistic for dataset 'x'."), "No RMSD statistic for dataset 'x'."),
    (ValueError("two\nlines"), "two lines"),
])
def test_error_sentence_for_every_exception_type(exc, expected, capsys):
    import cli

    def body():
        raise exc

    with pytest.raises(SystemExit) as exit_:
        cli.run_entry_point(body)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {expected}")
