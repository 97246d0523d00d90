"""Shared fixtures: the repository root on sys.path, the reference data beside the clone."""
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REFERENCE = Path(os.environ.get("SUBSPACE_REFERENCE", ROOT.parent / "shared" / "reference"))

# The tests run thousands of operations on tiny tensors, where intra-op threads only add
# hand-off stalls (up to 25x slower on a loaded 2-core machine): one thread for the whole suite.
torch.set_num_threads(1)

# Memory formats measured by "auto" go to a folder of this session (inherited by the entry
# scripts the tests start), not to the user's cache.
os.environ["SUBSPACE_DIFFUSION_CACHE"] = tempfile.mkdtemp(prefix="subspace-diffusion-cache-")


@pytest.fixture
def reference_dir() -> Path:
    """The reference data of `../shared/reference`; skips the test when it is absent."""
    if not REFERENCE.is_dir():
        pytest.skip(f"reference data not found at {REFERENCE} (set SUBSPACE_REFERENCE)")
    return REFERENCE
