# Test helpers.
#
# loom_add_test(NAME <name> TARGET <exe> [ARGS ...] [LABELS ...])
#   A single-process test, run with no launcher.
# loom_add_mpi_test(NAME <name> TARGET <exe> NP <n> [ARGS ...] [LABELS ...] [TIMEOUT s])
#   Runs <exe> under `mpirun -np <n> --oversubscribe` (plus --allow-run-as-root as root), with one
#   compute thread per rank so that more ranks than cores do not thrash.

find_package(GTest REQUIRED)
include(GoogleTest)

set(LOOM_MPIEXEC_EXTRA_FLAGS "--oversubscribe")
execute_process(COMMAND id -u OUTPUT_VARIABLE _loom_uid OUTPUT_STRIP_TRAILING_WHITESPACE)
if(_loom_uid STREQUAL "0")
  list(APPEND LOOM_MPIEXEC_EXTRA_FLAGS "--allow-run-as-root")
endif()

function(loom_add_test)
  cmake_parse_arguments(T "" "NAME;TARGET;TIMEOUT" "ARGS;LABELS" ${ARGN})
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 300)
  endif()
  add_test(NAME ${T_NAME} COMMAND $<TARGET_FILE:${T_TARGET}> ${T_ARGS})
  set_tests_properties(${T_NAME} PROPERTIES TIMEOUT ${T_TIMEOUT} LABELS "${T_LABELS}"
    ENVIRONMENT "OMP_NUM_THREADS=1;LOOM_LOG_DIR=${CMAKE_BINARY_DIR}/test-logs/${T_NAME}")
endfunction()

function(loom_add_mpi_test)
  cmake_parse_arguments(T "" "NAME;TARGET;NP;TIMEOUT" "ARGS;LABELS" ${ARGN})
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 600)
  endif()
  if(NOT LOOM_WITH_MPI)
    return()  # a build without MPI (the `cuda` preset) runs the single-process tests only
  endif()
  if(NOT MPIEXEC_EXECUTABLE)
    message(FATAL_ERROR "loom_add_mpi_test(${T_NAME}): no mpirun found")
  endif()
  add_test(NAME ${T_NAME}
    COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${T_NP} ${LOOM_MPIEXEC_EXTRA_FLAGS}
            -x OMP_NUM_THREADS=1 -x LOOM_LOG_DIR=${CMAKE_BINARY_DIR}/test-logs/${T_NAME}
            $<TARGET_FILE:${T_TARGET}> ${T_ARGS})
  set_tests_properties(${T_NAME} PROPERTIES TIMEOUT ${T_TIMEOUT} LABELS "mpi;${T_LABELS}"
    PROCESSORS ${T_NP})
endfunction()
