# Compiler set-up shared by every Loom target: ccache, warnings, sanitizers.

find_program(LOOM_CCACHE ccache)
if(LOOM_CCACHE)
  set(CMAKE_CXX_COMPILER_LAUNCHER "${LOOM_CCACHE}")
  set(CMAKE_CUDA_COMPILER_LAUNCHER "${LOOM_CCACHE}")
  message(STATUS "Loom: using ccache (${LOOM_CCACHE})")
endif()

# Warnings for Loom's own code only (third-party headers are included as SYSTEM).
add_library(loom_warnings INTERFACE)
target_compile_options(loom_warnings INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers -Wnon-virtual-dtor>)

if(LOOM_SANITIZE)
  string(REPLACE "," ";" _loom_san_list "${LOOM_SANITIZE}")
  foreach(_san IN LISTS _loom_san_list)
    if(NOT _san MATCHES "^(address|undefined|leak|thread)$")
      message(FATAL_ERROR "LOOM_SANITIZE: unknown sanitizer '${_san}' (use address, undefined, leak, thread)")
    endif()
  endforeach()
  add_compile_options($<$<COMPILE_LANGUAGE:CXX>:-fsanitize=${LOOM_SANITIZE}>
                      $<$<COMPILE_LANGUAGE:CXX>:-fno-omit-frame-pointer>)
  add_link_options(-fsanitize=${LOOM_SANITIZE})
  message(STATUS "Loom: sanitizers ${LOOM_SANITIZE}")
endif()
