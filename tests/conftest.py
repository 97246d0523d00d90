"""Shared fixtures: the repository root on sys.path, the reference data beside the clone."""
import atexit
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

try:  # pytest-xdist: `make test` runs on two workers
    from xdist.scheduler import LoadScopeScheduling
except ImportError:
    LoadScopeScheduling = None

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.utils import MEMORY_FORMAT_CACHE_ENV  # noqa: E402  (after the path set-up)

REFERENCE = Path(os.environ.get("SUBSPACE_REFERENCE", ROOT.parent / "shared" / "reference"))

# The tests run thousands of operations on tiny tensors, where intra-op threads only add
# hand-off stalls (up to 25x slower on a loaded 2-core machine): one thread for the whole suite.
torch.set_num_threads(1)

# The entry scripts the tests start inherit one thread too (unless the caller set a count):
# under `pytest -n 2` the two workers already fill two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Memory formats measured by "auto" go to a folder of this session (inherited by the entry
# scripts the tests start), not to the user's cache; it is removed when the session ends. Each
# pytest-xdist worker imports this file in its own process, so each has its own folder.
_FORMAT_CACHE = tempfile.mkdtemp(prefix="subspace-diffusion-cache-")
os.environ[MEMORY_FORMAT_CACHE_ENV] = _FORMAT_CACHE
atexit.register(shutil.rmtree, _FORMAT_CACHE, ignore_errors=True)


class _ModuleFixtureScheduling(LoadScopeScheduling if LoadScopeScheduling else object):
    """pytest-xdist scheduling for `pytest -n N --dist loadgroup`: the tests of a file that
    defines a module-scoped fixture (a training run, a set of checkpoints) go to one worker, so
    the fixture is built once; every other test goes alone to whichever worker is free. Files
    with the most tests are handed out first.

    (pytest-xdist 3.8 groups by renaming `item._nodeid`, which pytest 9 no longer reads, so its
    own loadgroup puts every test alone and a module fixture is built by each worker.)"""

    def _split_scope(self, nodeid: str) -> str:
        path = nodeid.split("::", 1)[0]
        return path if _defines_module_fixture(Path(self.config.rootpath) / path) else nodeid


@functools.cache
def _defines_module_fixture(path: Path) -> bool:
    try:
        return 'scope="module"' in path.read_text()
    except OSError:
        return False


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """The scheduler of `--dist loadgroup` (`_ModuleFixtureScheduling`); xdist's own for the
    other modes."""
    if config.getvalue("dist") == "loadgroup":
        return _ModuleFixtureScheduling(config, log)
    return None


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
