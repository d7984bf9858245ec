# stema_link_openmp(target): OpenMP for the CPU kernels when available; the kernels also build
# and run correctly without it (single-threaded), and build_info() reports which.
function(stema_link_openmp target)
  if(NOT STEMA_OPENMP)
    return()
  endif()
  find_package(OpenMP COMPONENTS CXX)
  if(OpenMP_CXX_FOUND)
    target_link_libraries(${target} PRIVATE OpenMP::OpenMP_CXX)
    target_compile_definitions(${target} PRIVATE STEMA_WITH_OPENMP=1)
  else()
    message(STATUS "stema: OpenMP not found, CPU kernels run single-threaded")
  endif()
endfunction()
