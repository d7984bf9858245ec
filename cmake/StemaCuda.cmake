# Decides STEMA_WITH_CUDA and, when on, enables the CUDA language and defines stema_link_cuda().
include(CheckLanguage)

set(STEMA_WITH_CUDA OFF)
if(STEMA_CUDA MATCHES "^(ON|1|TRUE|YES)$")
  set(STEMA_WITH_CUDA ON)
elseif(STEMA_CUDA STREQUAL "AUTO")
  if(NOT CMAKE_CUDA_COMPILER)
    find_program(_stema_nvcc nvcc HINTS "$ENV{CUDA_HOME}/bin" /usr/local/cuda/bin)
    if(_stema_nvcc)
      set(CMAKE_CUDA_COMPILER "${_stema_nvcc}")
    endif()
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(STEMA_WITH_CUDA ON)
  else()
    message(STATUS "stema: nvcc not found, building the CPU kernels only")
  endif()
endif()

if(STEMA_WITH_CUDA)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES "${STEMA_CUDA_ARCHS}")
  endif()
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "stema: CUDA kernels ON (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, archs ${CMAKE_CUDA_ARCHITECTURES})")
endif()

function(stema_link_cuda target)
  string(REPLACE ";" "," _stema_archs_csv "${CMAKE_CUDA_ARCHITECTURES}")
  target_compile_definitions(${target} PRIVATE
    STEMA_WITH_CUDA=1
    STEMA_CUDA_ARCHS="${_stema_archs_csv}"
    STEMA_CUDA_VERSION="${CMAKE_CUDA_COMPILER_VERSION}")
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3 -lineinfo>)
  # Static runtime: the wheel carries no libcudart dependency and runs beside any torch build.
  target_link_libraries(${target} PRIVATE CUDA::cudart_static)
  set_target_properties(${target} PROPERTIES CUDA_RUNTIME_LIBRARY Static)
endfunction()
