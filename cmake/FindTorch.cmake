# FindTorch.cmake: finds LibTorch and defines the imported target loom::torch.
#
# 1. A Torch CMake package (e.g. the one inside a Python torch install: pass
#    -DCMAKE_PREFIX_PATH=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')).
# 2. Otherwise headers and libraries installed in the system, as Debian's libtorch-dev does
#    (it ships no CMake package).
#
# Sets Torch_FOUND, Torch_VERSION, TORCH_HAS_CUDA and the target loom::torch.

if(TARGET loom::torch)
  set(Torch_FOUND TRUE)
  return()
endif()

set(TORCH_HAS_CUDA OFF)

# --- 1. A Torch CMake package (CONFIG mode only, so this module does not call itself).
find_package(Torch CONFIG QUIET)
if(Torch_FOUND OR TORCH_FOUND)
  add_library(loom::torch INTERFACE IMPORTED)
  target_link_libraries(loom::torch INTERFACE ${TORCH_LIBRARIES})
  target_include_directories(loom::torch SYSTEM INTERFACE ${TORCH_INCLUDE_DIRS})
  if(TORCH_CXX_FLAGS)
    separate_arguments(_loom_torch_flags UNIX_COMMAND "${TORCH_CXX_FLAGS}")
    target_compile_options(loom::torch INTERFACE $<$<COMPILE_LANGUAGE:CXX>:${_loom_torch_flags}>)
  endif()
  if(TARGET c10_cuda OR TORCH_CUDA_LIBRARIES)
    set(TORCH_HAS_CUDA ON)
  endif()
  set(Torch_FOUND TRUE)
  if(NOT Torch_VERSION AND TORCH_VERSION)
    set(Torch_VERSION ${TORCH_VERSION})
  endif()
  return()
endif()

# --- 2. System headers and libraries (Debian).
find_path(TORCH_ATEN_INCLUDE_DIR ATen/ATen.h PATH_SUFFIXES include)
find_path(TORCH_API_INCLUDE_DIR torch/torch.h
          PATH_SUFFIXES include/torch/csrc/api/include torch/csrc/api/include)
find_library(TORCH_LIBRARY torch)
find_library(TORCH_CPU_LIBRARY torch_cpu)
find_library(C10_LIBRARY c10)
find_library(TORCH_CUDA_LIBRARY torch_cuda)
find_library(C10_CUDA_LIBRARY c10_cuda)

if(TORCH_API_INCLUDE_DIR AND EXISTS "${TORCH_API_INCLUDE_DIR}/torch/version.h")
  set(Torch_VERSION "")
  foreach(_part MAJOR MINOR PATCH)
    file(STRINGS "${TORCH_API_INCLUDE_DIR}/torch/version.h" _loom_tv REGEX "#define TORCH_VERSION_${_part} ")
    string(REGEX MATCH "[0-9]+$" _loom_tv "${_loom_tv}")
    list(APPEND Torch_VERSION ${_loom_tv})
  endforeach()
  list(JOIN Torch_VERSION "." Torch_VERSION)
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(Torch
  REQUIRED_VARS TORCH_ATEN_INCLUDE_DIR TORCH_LIBRARY TORCH_CPU_LIBRARY C10_LIBRARY
  VERSION_VAR Torch_VERSION)

if(Torch_FOUND)
  add_library(loom::torch INTERFACE IMPORTED)
  set(_loom_torch_inc "${TORCH_ATEN_INCLUDE_DIR}")
  if(TORCH_API_INCLUDE_DIR)
    list(APPEND _loom_torch_inc "${TORCH_API_INCLUDE_DIR}")
  endif()
  target_include_directories(loom::torch SYSTEM INTERFACE ${_loom_torch_inc})
  set(_loom_torch_libs ${TORCH_LIBRARY} ${TORCH_CPU_LIBRARY} ${C10_LIBRARY})
  if(TORCH_CUDA_LIBRARY AND C10_CUDA_LIBRARY)
    list(APPEND _loom_torch_libs ${TORCH_CUDA_LIBRARY} ${C10_CUDA_LIBRARY})
    set(TORCH_HAS_CUDA ON)
  endif()
  target_link_libraries(loom::torch INTERFACE ${_loom_torch_libs})
endif()
