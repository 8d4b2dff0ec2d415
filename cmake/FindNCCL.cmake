# FindNCCL.cmake: finds NCCL headers and library (CUDA toolkit, NCCL_ROOT, or the nvidia-nccl Python
# package's folder). Defines NCCL_FOUND, NCCL_VERSION and the imported target loom::nccl.
if(TARGET loom::nccl)
  set(NCCL_FOUND TRUE)
  return()
endif()
set(_loom_nccl_hints $ENV{NCCL_ROOT} ${NCCL_ROOT} ${CUDAToolkit_LIBRARY_ROOT} /usr/local/cuda)
find_path(NCCL_INCLUDE_DIR nccl.h HINTS ${_loom_nccl_hints} ${CUDAToolkit_INCLUDE_DIRS}
          PATH_SUFFIXES include)
find_library(NCCL_LIBRARY NAMES nccl libnccl.so.2 HINTS ${_loom_nccl_hints} ${CUDAToolkit_LIBRARY_DIR}
             PATH_SUFFIXES lib lib64)
if(NCCL_INCLUDE_DIR AND EXISTS "${NCCL_INCLUDE_DIR}/nccl.h")
  file(STRINGS "${NCCL_INCLUDE_DIR}/nccl.h" _loom_nccl_major REGEX "#define NCCL_MAJOR ")
  file(STRINGS "${NCCL_INCLUDE_DIR}/nccl.h" _loom_nccl_minor REGEX "#define NCCL_MINOR ")
  string(REGEX MATCH "[0-9]+" _loom_nccl_major "${_loom_nccl_major}")
  string(REGEX MATCH "[0-9]+" _loom_nccl_minor "${_loom_nccl_minor}")
  set(NCCL_VERSION "${_loom_nccl_major}.${_loom_nccl_minor}")
endif()
include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(NCCL REQUIRED_VARS NCCL_INCLUDE_DIR NCCL_LIBRARY VERSION_VAR NCCL_VERSION)
if(NCCL_FOUND)
  add_library(loom::nccl UNKNOWN IMPORTED)
  set_target_properties(loom::nccl PROPERTIES IMPORTED_LOCATION "${NCCL_LIBRARY}"
                        INTERFACE_INCLUDE_DIRECTORIES "${NCCL_INCLUDE_DIR}")
endif()
