"""Shared fixtures: the repository root on sys.path, the reference data beside the clone."""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.utils import MEMORY_FORMAT_CACHE_ENV  # noqa: E402  (after the path set-up)

REFERENCE = Path(os.environ.get("SUBSPACE_REFERENCE", ROOT.parent / "shared" / "reference"))

# The tests run thousands of operations on tiny tensors, where intra-op threads only add
# hand-off stalls (up to 25x slower on a loaded 2-core machine): one thread for the whole suite.
torch.set_num_threads(1)

# Memory formats measured by "auto" go to a folder of this session (inherited by the entry
# scripts the tests start), not to the user's cache; it is removed when the session ends.
_FORMAT_CACHE = tempfile.mkdtemp(prefix="subspace-diffusion-cache-")
os.environ[MEMORY_FORMAT_CACHE_ENV] = _FORMAT_CACHE
atexit.register(shutil.rmtree, _FORMAT_CACHE, ignore_errors=True)


@pytest.fixture
def reference_dir() -> Path:
    """The reference data of `../shared/reference`; skips the test when it is absent."""
    if not REFERENCE.is_dir():
        pytest.skip(f"reference data not found at {REFERENCE} (set SUBSPACE_REFERENCE)")
    return REFERENCE


@pytest.fixture(scope="session")
def torch_inception():
    """The torch Inception network (87 MB) on the CPU, loaded once per test session (per xdist
    worker); skips the test when the data package with its weights is not installed."""
    import evaluation

    try:
        return evaluation.load_torch_inception("cpu")
    except evaluation.InceptionWeightsError as error:
        pytest.skip(str(error))
