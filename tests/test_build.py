"""Build information and the import-time torch version check."""
import os
import subprocess
import sys

import torch

import fastbn


def test_build_info():
    info = fastbn.build_info()
    for key in ("version", "torch_version", "cuda_compiled", "cuda_version", "cuda_archs", "openmp", "simd"):
        assert key in info, key
    assert info["version"] == fastbn.__version__
    assert torch.__version__.startswith(info["torch_version"])
    assert info["openmp"] is True
    assert info["simd"] in ("avx512", "avx2", "baseline")
    assert isinstance(info["cuda_compiled"], bool)
    if not info["cuda_compiled"]:
        assert info["cuda_version"] is None and info["cuda_archs"] is None


def test_simd_can_be_forced_by_environment():
    code = "import fastbn; print(fastbn.build_info()['simd'])"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FASTBN_SIMD": "baseline"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "baseline"


def test_unusable_forced_simd_warns():
    code = "import fastbn; print(fastbn.build_info()['simd'])"
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], env={**os.environ, "FASTBN_SIMD": "avx3"},
                         capture_output=True, text=True, check=True)
    assert "FASTBN_SIMD='avx3' names no kernel set this CPU can run" in out.stderr
    assert out.stdout.strip() in ("avx512", "avx2", "baseline")


def test_import_with_another_torch_version_fails_clearly():
    code = ("import torch; torch.__version__ = '1.0.0+other'\n"
            "try:\n    import fastbn\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    built = fastbn._build_config.TORCH_VERSION
    assert f"fastbn was built against torch {built} but torch 1.0.0+other is installed" in out
