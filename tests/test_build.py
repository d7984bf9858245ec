"""The extension builds, imports, and says what it contains."""

import shutil

import stema_kernels


def test_build_info_reports_cpu_cuda_and_openmp():
    info = stema_kernels.build_info()
    assert info["cpu"] is True
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"], "a CUDA build names its architectures"
        assert info["cuda_version"]
    else:
        assert info["cuda_archs"] == []


def test_cuda_kernels_are_built_whenever_nvcc_is_present():
    # CI has nvcc and builds with the default STEMA_CUDA=AUTO, so every submission compiles and
    # links the CUDA kernels. A deliberate STEMA_CUDA=OFF build is exempt; ON must have them.
    info = stema_kernels.build_info()
    assert info["cuda_requested"] in ("AUTO", "ON", "OFF")
    if info["cuda_requested"] == "ON" or (info["cuda_requested"] == "AUTO" and shutil.which("nvcc") is not None):
        assert info["cuda"], "nvcc is on PATH but _C was built without CUDA kernels"
        assert {"80", "90"} <= set(info["cuda_archs"])
