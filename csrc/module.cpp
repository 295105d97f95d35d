// The Python module fastbn._C: loading it registers the ops (ops.cpp, cpu/, cuda/); the module
// itself only reports how it was built and lets tests pick a SIMD path and a planes path.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include "cpu/kernels.h"

namespace py = pybind11;

namespace {

#define FASTBN_STR_(x) #x
#define FASTBN_STR(x) FASTBN_STR_(x)

py::dict build_info() {
  py::dict info;
  info["torch_version"] = FASTBN_STR(TORCH_VERSION_MAJOR) "." FASTBN_STR(TORCH_VERSION_MINOR) "." FASTBN_STR(
      TORCH_VERSION_PATCH);
#ifdef FASTBN_WITH_CUDA
  info["cuda_compiled"] = true;
#else
  info["cuda_compiled"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_version"] = _OPENMP;
#else
  info["openmp"] = false;
  info["openmp_version"] = 0;
#endif
  info["simd"] = fastbn::cpu::active_kernels().simd;
  info["cpu_channel_group_bytes"] = fastbn::cpu::channel_group_bytes();
  info["cpu_min_group_plane_bytes"] = fastbn::cpu::min_group_plane_bytes();
  info["cpu_streaming_store_bytes"] = fastbn::cpu::streaming_store_bytes();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastbn compiled extension: build information (the ops are registered under torch.ops.fastbn)";
  m.def("build_info", &build_info, "How this extension was built and which SIMD path is in use.");
  m.def(
      "set_simd", [](const std::string& name) { return fastbn::cpu::set_simd(name.c_str()); },
      "Use the kernels compiled for `name` (avx512, avx2, baseline); False if this CPU lacks it.");
  m.def("set_channel_group_bytes", &fastbn::cpu::set_channel_group_bytes,
        "Cache bytes the CPU planes training passes may fill with a group of channels (0: two passes "
        "over memory instead); returns the previous value.");
  m.def("set_streaming_store_bytes", &fastbn::cpu::set_streaming_store_bytes,
        "Outputs of at least this many bytes are written with non-temporal stores by the CPU plain "
        "BatchNorm passes (negative: never); returns the previous value.");
  m.def(
      "streams_output",
      [](uintptr_t address, int64_t total) {
        return fastbn::cpu::streams_output(reinterpret_cast<const void*>(address), total);
      },
      "Whether an output of `total` bytes at `address` may be streamed by the AVX2/AVX-512 kernels (16-bit "
      "outputs also need planes or rows of whole 64-byte lines).");
}
