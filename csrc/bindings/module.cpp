// The extension module stema_kernels._C: build facts plus every kernel's registered bindings.
#include <pybind11/pybind11.h>

#include <string>

#include "registry.h"

#if defined(STEMA_WITH_OPENMP)
#include <omp.h>
#endif

#ifndef STEMA_VERSION
#define STEMA_VERSION "dev"
#endif
#ifndef STEMA_CUDA_MODE
#define STEMA_CUDA_MODE "AUTO"
#endif
#ifndef STEMA_COMPILER
#define STEMA_COMPILER "unknown"
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = STEMA_VERSION;
  info["compiler"] = STEMA_COMPILER;
  info["cpu"] = true;
  info["cuda_requested"] = STEMA_CUDA_MODE;  // what STEMA_CUDA asked for: AUTO, ON or OFF
#if defined(STEMA_WITH_OPENMP)
  info["openmp"] = true;
  info["openmp_version"] = static_cast<int>(_OPENMP);
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["openmp_version"] = py::none();
  info["openmp_max_threads"] = 1;
#endif
#if defined(STEMA_WITH_CUDA)
  info["cuda"] = true;
  info["cuda_version"] = STEMA_CUDA_VERSION;
  py::list archs;
  std::string all = STEMA_CUDA_ARCHS;
  size_t start = 0;
  while (start <= all.size()) {
    size_t end = all.find(',', start);
    if (end == std::string::npos) end = all.size();
    if (end > start) archs.append(all.substr(start, end - start));
    start = end + 1;
  }
  info["cuda_archs"] = archs;
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = py::list();
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "STEMA's compiled kernels (torch-free). Use the wrappers in stema_kernels, not _C directly.";
  m.def("build_info", &build_info, "What this build of _C contains: cpu, cuda, archs, OpenMP.");
#if defined(STEMA_WITH_CUDA)
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  for (auto registrar : stema::bindings::registrars()) registrar(m);
}
