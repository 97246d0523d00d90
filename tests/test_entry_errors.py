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


def _tracked_state() -> str:
    """Digest of the tracked files' contents (what `git status` would show as modified)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.split(b"\0")
    digest = hashlib.sha256()
    for name in filter(None, listed):
        path = ROOT / name.decode()
        digest.update(name + (path.read_bytes() if path.is_file() else b"<missing>"))
    return digest.hexdigest()


def _cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(target, args, text the error line must contain)."""
    out = str(tmp / "out")
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
         "--ckpt_subspace"),
        ("subspace_sample.py", [*sample, "--ckpt_full", str(text)], NOT_CKPT),
        ("subspace_sample.py", [*sample, "--ckpt_full", "missing.pth"], "--ckpt_full"),
        ("subspace_sample.py", [*sample, "--ckpt_subspace", CKPT[8]], CKPT[8]),
        ("subspace_sample.py", [*sample, "--eval_folder", inside_file], "--eval_folder"),
        ("subspace_sample.py", [*sample, "--eval_folder", "/proc/samples"], "--eval_folder"),
        ("subspace_sample.py", [*sample, "--save_name", "a/b"], "--save_name"),
        ("subspace_sample.py", [*sample, "--dataset", "mnist"], "analysis.rmsd"),
        ("subspace_sample.py", [*sample, "--config", "nowhere.py"], "--config nowhere.py"),
        ("subspace_sample.py", [*sample, "--bogus", "1"], "bogus"),
        ("subspace_sample.py", sample[:-6], "--save_name"),
        ("subspace_sample.py", [a for a in sample if a not in ("--save_name", "s")],
         "Give the required flag --save_name"),
        # main.py
        ("main.py", [*main, "--mode", "bogus"], "--mode"),
        ("main.py", main, "--mode"),
        ("main.py", [*main, "--mode", "eval"], "checkpoint_1.pth"),
        ("main.py", [*main, "--mode", "train", "--dist_timeout_minutes", "0"],
         "--dist_timeout_minutes"),
        ("main.py", ["--config", CONFIG, "--workdir", inside_file, "--mode", "train"],
         "--workdir"),
        ("main.py", ["--config", CONFIG, "--workdir", "/proc/run", "--mode", "train"],
         "--workdir"),
        ("main.py", [*main, "--mode", "train", "--config", "nowhere.py"], "--config"),
        ("main.py", ["--config", CONFIG, "--workdir", str(textrun), "--mode", "train"],
         "checkpoint.pth is not a PyTorch checkpoint"),
        ("main.py", [*main, "--mode", "eval_subspace", "--subspace", "4"], "--time"),
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
        ("analysis.rmsd", [*rmsd, "--methods", "wavelet"], "--methods"),
        ("analysis.rmsd", [*rmsd, "--out", "/proc/x/t.json"], "--out"),
        ("analysis.rmsd", [*rmsd, "--update_stats", "--stats_file", "/proc/x/s.json"],
         "--stats_file"),
        ("analysis.rmsd", [*rmsd, "--config.data.image_size", "16"], "--config.data.image_size"),
        ("analysis.divergence", [*divergence, "--num_images", "0"], "--num_images"),
        ("analysis.divergence", [*divergence, "--t_min", "1"], "--t_min"),
        ("analysis.divergence", [*divergence, "--subspace", "12"], "--subspace 12"),
        ("analysis.divergence", [*divergence, "--checkpoint", str(text)], NOT_CKPT),
        ("analysis.divergence", [*divergence, "--out", "/proc/x/d.json"], "--out"),
        ("analysis.bands", ["--config", CONFIG, "--checkpoint", CKPT[32], "--times", "0"],
         "--times"),
        ("analysis.bands", ["--config", CONFIG, "--checkpoint", str(text)], NOT_CKPT),
        ("analysis.bands", ["--config", CONFIG, "--checkpoint", CKPT[32], "--out",
                            "/proc/x/b.json"], "--out"),
        # compute_dataset_stats.py
        ("compute_dataset_stats.py", [*stats, "--max_images", "1"], "--max_images"),
        ("compute_dataset_stats.py", [*stats, "--out", "/proc/x/s.npz"], "--out"),
        ("compute_dataset_stats.py", [*stats, "--features", "bogus"], "--features"),
        # demo.py
        ("demo.py", [*demo, "--threads", "0"], "--threads"),
        ("demo.py", [*demo, "--mode", "quick", "--export_assets"], "--export_assets"),
        ("demo.py", [*demo, "--mode", "bogus"], "--mode"),
        ("demo.py", ["--workdir", "/proc/demo", "--no_progress"], "--workdir"),
    ]


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
        ok = (result["status"] == 1 and len(lines) == 1 and lines[0].startswith("error: ")
              and expected in lines[0] and "Traceback" not in result["stderr"])
        if not ok:
            failures.append(f"{target} {' '.join(args[-4:])}: status {result['status']}, "
                            f"expected '{expected}', stderr {result['stderr'][-600:]!r}")
    assert not failures, "\n".join(failures)
    assert _files_under(tmp_path / "out") == []
    assert _files_under(tmp_path / "textrun") == ["checkpoints-meta",
                                                  "checkpoints-meta/checkpoint.pth"]
    assert _tracked_state() == before
    assert subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                          text=True).stdout == untracked_before


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
