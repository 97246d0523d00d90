"""Lazy, cached build of the optional CUDA kernels, with a clean fall-back to PyTorch.

Nothing here runs at import time. `CUDA_OPS.load()` compiles `ops.cpp` and the `.cu` files of this
folder with `torch.utils.cpp_extension.load` (ninja) the first time a CUDA tensor reaches an op,
and remembers the result: the compiled module, or the failure. A failed build emits one
`RuntimeWarning` and every later call uses the PyTorch implementation without retrying.
"""
from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

FORCE_NATIVE_ENV = "SUBSPACE_FORCE_NATIVE_OPS"
_OP_DIR = Path(__file__).resolve().parent


def native_ops_forced() -> bool:
    """True when the environment asks for the pure-PyTorch ops (`SUBSPACE_FORCE_NATIVE_OPS=1`)."""
    return os.environ.get(FORCE_NATIVE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class LazyExtension:
    """A C++/CUDA extension compiled on the first `load()` and cached (module or failure)."""

    def __init__(self, name: str, sources: Sequence[str | os.PathLike],
                 build_directory: str | os.PathLike | None = None,
                 extra_cuda_cflags: Sequence[str] = ()):
        self.name = name
        self.sources = [str(s) for s in sources]
        self.build_directory = None if build_directory is None else str(build_directory)
        self.extra_cuda_cflags = list(extra_cuda_cflags)
        self.attempted = False
        self.error: BaseException | None = None
        self._module: ModuleType | None = None
        self._lock = threading.Lock()

    @property
    def failed(self) -> bool:
        """True once a build was tried and did not produce a module."""
        return self.attempted and self._module is None

    def load(self) -> ModuleType | None:
        """The compiled module, building it on the first call; None if forced off or failed."""
        if native_ops_forced():
            return None
        with self._lock:
            if not self.attempted:
                self.attempted = True
                try:
                    from torch.utils.cpp_extension import load

                    kwargs = {}
                    if self.build_directory is not None:
                        os.makedirs(self.build_directory, exist_ok=True)
                        kwargs["build_directory"] = self.build_directory
                    self._module = load(name=self.name, sources=self.sources,
                                        extra_cuda_cflags=self.extra_cuda_cflags,
                                        verbose=False, **kwargs)
                except Exception as exc:  # any build/import failure means: use PyTorch
                    self.error = exc
                    self._module = None
                    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    warnings.warn(
                        f"Could not build the compiled '{self.name}' ops ({first_line}); using "
                        f"the pure-PyTorch implementation instead (set {FORCE_NATIVE_ENV}=1 to "
                        "skip the build).", RuntimeWarning, stacklevel=3)
            return self._module


CUDA_OPS = LazyExtension(
    "subspace_diffusion_ops",
    [_OP_DIR / "ops.cpp", _OP_DIR / "upfirdn2d_kernel.cu", _OP_DIR / "fused_bias_act_kernel.cu"],
)


def cuda_ops_for(tensor: torch.Tensor) -> ModuleType | None:
    """The compiled ops when `tensor` lives on a GPU and they are available, else None.

    CPU (and any non-CUDA) tensors return None without ever starting a build.
    """
    if tensor.device.type != "cuda":
        return None
    return CUDA_OPS.load()
