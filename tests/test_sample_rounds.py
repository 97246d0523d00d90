"""The one resumable round sampler (`sample_rounds.RoundSampler`): which rounds it draws, with
which seed and size, what it writes, and what it refuses; a stand-in draw function makes the
samples from the torch generator, so each round's content follows from its seed alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sample_settings
from errors import ReportableError
from sample_rounds import Round, RoundSampler, check_space, round_size, round_sizes

SETTINGS = {"command": "test", "seed": 7, "batch": 2}


def seed_of_round(r: int) -> int:
    return 7 + r


def expected_round(r: int, size: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed_of_round(r))
    return torch.randint(0, 256, (size, 2, 2, 3), generator=generator, dtype=torch.uint8).numpy()


def run(folder, total, calls, settings=SETTINGS, output=None):
    def draw(r: int, size: int) -> Round:
        calls.append((r, size, torch.initial_seed()))
        return Round(torch.randint(0, 256, (size, 2, 2, 3), dtype=torch.uint8).numpy(), info=r)

    return RoundSampler(folder, total, 2, seed_of_round, settings, output=output,
                        image_shape=(2, 2, 3)).run(draw)


def test_round_sizes_cut_the_last_round():
    assert round_sizes(5, 2) == [2, 2, 1]
    assert round_sizes(4, 2) == [2, 2]
    assert round_sizes(1, 8) == [1]


def test_rounds_are_seeded_written_resumed_and_extended(tmp_path):
    folder, output = tmp_path / "run", tmp_path / "run.npy"
    calls = []
    result = run(folder, 5, calls, output=output)
    assert calls == [(0, 2, 7), (1, 2, 8), (2, 1, 9)]
    assert result.drawn == [(0, 0), (1, 1), (2, 2)]
    expected = np.concatenate([expected_round(r, n) for r, n in enumerate([2, 2, 1])])
    np.testing.assert_array_equal(result.samples, expected)
    np.testing.assert_array_equal(np.load(output), expected)
    assert sorted(p.name for p in folder.iterdir()) == [
        "samples_0.npz", "samples_1.npz", "samples_2.npz"]
    with np.load(folder / "samples_1.npz") as archive:
        np.testing.assert_array_equal(archive["samples"], expected_round(1, 2))
    assert (tmp_path / "run.settings.json").is_file()

    # A lost round is drawn again, alone, with its own seed; a temporary left by a killed write
    # of a round is removed, other files are not.
    (folder / "samples_1.npz").unlink()
    (folder / ".samples_1.npz.abc.tmp").write_bytes(b"killed")
    (folder / ".notes.txt.abc.tmp").write_bytes(b"someone else's")
    calls = []
    result = run(folder, 5, calls, output=output)
    assert calls == [(1, 2, 8)] and result.drawn == [(1, 1)]
    np.testing.assert_array_equal(result.samples, expected)
    assert sorted(p.name for p in folder.glob(".*.tmp")) == [".notes.txt.abc.tmp"]

    # More samples: the cut last round is drawn again in full, then one more round.
    calls = []
    result = run(folder, 7, calls, output=output)
    assert calls == [(2, 2, 9), (3, 1, 10)]
    np.testing.assert_array_equal(result.samples[:4], expected[:4])
    np.testing.assert_array_equal(result.samples[4:6], expected_round(2, 2))
    assert len(np.load(output)) == 7

    # Fewer samples draw nothing.
    calls = []
    assert len(run(folder, 3, calls, output=output).samples) == 3 and calls == []


def test_other_settings_are_refused_before_any_round(tmp_path):
    calls = []
    run(tmp_path / "run", 2, calls)
    calls = []
    with pytest.raises(sample_settings.SettingsMismatchError, match="seed was 7, now 8"):
        run(tmp_path / "run", 4, calls, settings={**SETTINGS, "seed": 8})
    assert calls == [] and not (tmp_path / "run" / "samples_1.npz").exists()


def test_single_file_of_an_earlier_version_is_split_into_rounds(tmp_path):
    # subspace_sample.py used to keep one growing SAVE_NAME.npy; its whole rounds are reused.
    earlier = np.concatenate([expected_round(0, 2), expected_round(1, 1)])
    np.save(tmp_path / "run.npy", earlier)
    sample_settings.record_settings(tmp_path / "run.npy", SETTINGS)
    calls = []
    result = run(tmp_path / "run", 4, calls, output=tmp_path / "run.npy")
    assert calls == [(1, 2, 8)]
    np.testing.assert_array_equal(result.samples[:2], earlier[:2])
    np.testing.assert_array_equal(result.samples[2:], expected_round(1, 2))

    np.save(tmp_path / "bad.npy", np.zeros((3, 4, 4, 3), np.uint8))
    sample_settings.record_settings(tmp_path / "bad.npy", SETTINGS)
    with pytest.raises(ValueError, match=r"bad.npy holds samples of shape \(3, 4, 4, 3\) "
                                         r"\(uint8\), not uint8 \[N, 2, 2, 3\]"):
        run(tmp_path / "bad", 4, [], output=tmp_path / "bad.npy")


class _Stop(Exception):
    pass


def test_work_lists_do_not_grow_with_the_requested_count(tmp_path):
    # 10^15 samples in rounds of 1: nothing may be built per round up front (a list of every
    # round's size alone would need petabytes), so round 0 starts at once.
    calls = []

    def draw(r: int, size: int) -> Round:
        calls.append((r, size))
        if r == 2:
            raise _Stop
        return Round(np.zeros((size, 2, 2, 3), np.uint8))

    sampler = RoundSampler(tmp_path / "run", 10**15, 1, seed_of_round, SETTINGS)
    with pytest.raises(_Stop):
        sampler.run(draw)
    assert calls == [(0, 1), (1, 1), (2, 1)]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["samples_0.npz",
                                                                     "samples_1.npz"]
    assert round_size(10**15, 7, 10**15 // 7) == 10**15 % 7


def test_a_count_that_cannot_fit_on_disk_is_refused_with_the_space_it_needs(tmp_path):
    with pytest.raises(ReportableError) as error:
        RoundSampler(tmp_path / "run", 10**12, 4, seed_of_round, SETTINGS,
                     output=tmp_path / "run.npy", image_shape=(32, 32, 3),
                     count_name="--number_samples")
    message = str(error.value)
    assert message.startswith("--number_samples 1000000000000 (samples of 32x32x3 uint8) would "
                              "need 6.1 PB on disk (the round files and the final .npy), more "
                              "than the ")
    assert f"free in {tmp_path}: ask for fewer samples or free space." in message
    assert list(tmp_path.iterdir()) == []
    # A count that fits passes (and needs only the round files without an output).
    check_space(tmp_path / "run", 10, (32, 32, 3))


def test_a_refused_resume_shows_each_differing_value_in_full(tmp_path):
    recorded = {"ckpt_full": {"path": "a/full.pth", "sha256": "0" * 64},
                "sampler": {"method": "heun", "steps": 18, "churn": 0.0}, "seed": 7}
    sample_settings.record_settings(tmp_path / "run.npy", recorded)
    now = {"ckpt_full": {"path": "a/full.pth", "sha256": "1" * 64},
           "sampler": {"method": "heun", "steps": 18, "churn": 4.5}}
    message = sample_settings.settings_problem(tmp_path / "run", now, exists=True)
    assert (f'ckpt_full.sha256 was "{"0" * 64}", now "{"1" * 64}"; sampler.churn was 0.0, now '
            '4.5; seed was 7, now absent') in message
