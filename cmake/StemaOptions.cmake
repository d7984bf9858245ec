# User-facing build switches. Each can also come from the environment, so that
# `STEMA_CUDA=OFF pip install .` works without scikit-build-core's -C flags.

set(_stema_cuda_default AUTO)
if(DEFINED ENV{STEMA_CUDA})
  set(_stema_cuda_default "$ENV{STEMA_CUDA}")
endif()
set(STEMA_CUDA "${_stema_cuda_default}" CACHE STRING "Build the CUDA kernels: AUTO (when nvcc is found), ON, OFF")
set_property(CACHE STEMA_CUDA PROPERTY STRINGS AUTO ON OFF)
string(TOUPPER "${STEMA_CUDA}" STEMA_CUDA)
if(NOT STEMA_CUDA MATCHES "^(AUTO|ON|OFF|1|0|TRUE|FALSE|YES|NO)$")
  message(FATAL_ERROR "STEMA_CUDA must be AUTO, ON or OFF (got '${STEMA_CUDA}')")
endif()

set(_stema_archs_default "80;90")
if(DEFINED ENV{STEMA_CUDA_ARCHS})
  set(_stema_archs_default "$ENV{STEMA_CUDA_ARCHS}")
endif()
set(STEMA_CUDA_ARCHS "${_stema_archs_default}" CACHE STRING "CUDA architectures (CMAKE_CUDA_ARCHITECTURES syntax)")

option(STEMA_OPENMP "Use OpenMP in the CPU kernels when the compiler supports it" ON)
