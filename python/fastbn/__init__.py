"""fastbn: fast, fused BatchNorm for PyTorch.

    import fastbn
    model = fastbn.convert(model)            # every torch BatchNorm -> fastbn's
    inference_model = fastbn.fold(model)     # BatchNorm folded into the Conv/Linear before it
    y = fastbn.functional.batch_norm(x, running_mean, running_var, training=True)
"""
import os
import warnings

import torch

from ._version import __version__


def _check_build():
    try:
        from . import _build_config
    except ImportError:
        raise ImportError("fastbn's compiled extension is missing (importing fastbn from its source tree?); "
                          "install it with `pip install --no-build-isolation .`") from None
    if _build_config.TORCH_VERSION != torch.__version__:
        raise ImportError(f"fastbn was built against torch {_build_config.TORCH_VERSION} but torch {torch.__version__} "
                          "is installed; rebuild it: `pip install --no-build-isolation --force-reinstall --no-deps .`")
    return _build_config


_build_config = _check_build()

from . import functional  # noqa: E402
from ._ops import _C  # noqa: E402
from .fold import FoldReport, fold  # noqa: E402
from .fuse import fuse  # noqa: E402
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d,  # noqa: E402
                      BatchNormAct3d, SyncBatchNorm, convert)

if os.environ.get("FASTBN_SIMD") and os.environ["FASTBN_SIMD"] != _C.build_info()["simd"]:
    warnings.warn(f"FASTBN_SIMD={os.environ['FASTBN_SIMD']!r} names no kernel set this CPU can run (avx512, avx2, "
                  f"baseline); using {_C.build_info()['simd']}", RuntimeWarning, stacklevel=2)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
           "SyncBatchNorm", "convert", "fuse", "fold", "FoldReport", "functional", "build_info", "__version__"]


def build_info():
    """How this fastbn was built and what it runs on: versions, CUDA, OpenMP and the SIMD path in use."""
    info = {"version": __version__}
    info.update(_C.build_info())
    info["torch_version_runtime"] = torch.__version__
    info["cuda_version"] = _build_config.CUDA_VERSION
    info["cuda_archs"] = _build_config.CUDA_ARCHS
    info["num_threads"] = torch.get_num_threads()
    return info
