"""Atomic writes and image grids of files.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import files


def test_atomic_save_leaves_no_file_when_writing_fails(tmp_path):
    path = tmp_path / "out.pth"
    unpicklable = {"weights": torch.ones(3), "hook": lambda x: x}
    with pytest.raises(Exception, match="lambda"):
        files.atomic_torch_save(unpicklable, path)
    assert list(tmp_path.iterdir()) == []
    files.atomic_torch_save({"weights": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception, match="lambda"):
        files.atomic_torch_save(unpicklable, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.pth"]


def _blocks() -> torch.Tensor:
    """Three 2x3 images, each a constant colour."""
    colours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.2, 0.4, 1.0]])
    return colours[:, :, None, None].expand(3, 3, 2, 3).clone()


def test_image_grid_layout():
    grid = files.make_image_grid(_blocks(), nrow=2, padding=1)
    # 2 columns x 2 rows of 2x3 images with 1 pixel of padding around each.
    assert grid.shape == (2 * 3 + 1, 2 * 4 + 1, 3) and grid.dtype == np.uint8
    expected = np.zeros((7, 9, 3), dtype=np.uint8)
    expected[1:3, 1:4] = [255, 0, 0]
    expected[1:3, 5:8] = [0, 128, 0]  # 0.5 * 255 rounds to 128
    expected[4:6, 1:4] = [51, 102, 255]
    np.testing.assert_array_equal(grid, expected)  # the fourth slot stays black


def test_image_grid_rows_padding_clamping_and_gray():
    images = torch.tensor([-0.5, 0.25, 1.7, 1.0]).reshape(4, 1, 1, 1)
    grid = files.make_image_grid(images, nrow=10, padding=0)  # nrow larger than the batch
    np.testing.assert_array_equal(grid[0, :, 0], [0, 64, 255, 255])
    assert grid.shape == (1, 4, 3)
    assert (grid == grid[..., :1]).all()  # gray: equal channels
    column = files.make_image_grid(images, nrow=1, padding=0)
    np.testing.assert_array_equal(column[:, 0, 0], [0, 64, 255, 255])
    assert files.make_image_grid(images, nrow=None, padding=0).shape == (2, 2, 3)


def test_image_grid_rejects_bad_input():
    with pytest.raises(ValueError, match=r"NCHW batch with 1 or 3 channels; got shape \[3, 4, 4\]"):
        files.make_image_grid(torch.zeros(3, 4, 4), nrow=1)
    with pytest.raises(ValueError, match="float images"):
        files.make_image_grid(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), nrow=1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        files.make_image_grid(torch.full((1, 3, 2, 2), float("nan")), nrow=1)
    with pytest.raises(ValueError, match="nrow must be a positive integer"):
        files.make_image_grid(torch.zeros(1, 3, 2, 2), nrow=0)


def test_png_round_trip(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(5, 3, 4, 6)
    path = tmp_path / "samples" / "sample.png"
    files.save_image_grid(images, path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        loaded = np.asarray(image)
    # int(sqrt(5)) = 2 images per row, 3 rows.
    assert loaded.shape == (3 * 6 + 2, 2 * 8 + 2, 3)
    np.testing.assert_array_equal(loaded, files.make_image_grid(images, nrow=2))
    np.testing.assert_array_equal(loaded[2:6, 2:8], (images[0] * 255 + 0.5).to(torch.uint8)
                                  .permute(1, 2, 0).numpy())
    assert [p.name for p in path.parent.iterdir()] == ["sample.png"]
    with pytest.raises(ValueError, match="Cannot tell the image format"):
        files.save_image_grid(images, tmp_path / "sample.grid")
