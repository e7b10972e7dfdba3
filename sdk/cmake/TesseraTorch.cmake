# The `tessera_torch` target: libtorch from the torch wheel, found through
# TESSERA_TORCH_PREFIX (torch.utils.cmake_prefix_path, exported by scripts/bootstrap) or
# TORCH_ROOT. We deliberately do not call find_package(Torch): for a CUDA wheel it wants
# the CUDA toolkit at configure time, while we link only libtorch_cpu and libc10. A CUDA
# wheel's libtorch_cuda (and cuBLAS, cuDNN … behind it) is not linked: loading it costs
# every process ~230 MB of resident memory, GPU or not. The host loads it at run time when
# a run asks for a CUDA device (host/runtime/device.h), so the same binaries and plugins
# run on a GPU machine.
if(NOT TARGET tessera_torch)
  set(_hints)
  if(DEFINED ENV{TESSERA_TORCH_PREFIX})
    list(APPEND _hints "$ENV{TESSERA_TORCH_PREFIX}/../..")
  endif()
  if(TORCH_ROOT)
    list(APPEND _hints "${TORCH_ROOT}")
  endif()
  find_path(TESSERA_TORCH_INCLUDE_DIR ATen/ATen.h HINTS ${_hints} PATH_SUFFIXES include NO_DEFAULT_PATH)
  if(NOT TESSERA_TORCH_INCLUDE_DIR)
    message(FATAL_ERROR "libtorch not found: run scripts/bootstrap and source ~/.cache/tessera/env.sh, or pass -DTORCH_ROOT=<site-packages>/torch")
  endif()
  get_filename_component(_root "${TESSERA_TORCH_INCLUDE_DIR}/.." ABSOLUTE)
  foreach(_lib torch_cpu c10)
    find_library(TESSERA_LIB_${_lib} ${_lib} PATHS ${_root}/lib NO_DEFAULT_PATH REQUIRED)
  endforeach()
  # libtorch's include directory carries a private fmt (v12) that would shadow the
  # system fmt spdlog is built against; expose every entry but that one.
  set(_inc ${CMAKE_BINARY_DIR}/tessera-torch-include)
  if(NOT EXISTS ${_inc}/ATen)
    file(MAKE_DIRECTORY ${_inc})
    file(GLOB _entries RELATIVE ${_root}/include ${_root}/include/*)
    foreach(_e ${_entries})
      if(NOT _e STREQUAL "fmt")
        file(CREATE_LINK ${_root}/include/${_e} ${_inc}/${_e} SYMBOLIC)
      endif()
    endforeach()
  endif()
  add_library(tessera_torch INTERFACE IMPORTED GLOBAL)
  target_include_directories(tessera_torch SYSTEM INTERFACE ${_inc} ${_root}/include/torch/csrc/api/include)
  # The wheel's libtorch exports its own copies of some libstdc++ functions
  # (std::filesystem among them) that crash when they interpose the system's: naming
  # libstdc++ first puts it ahead in the global symbol lookup order.
  target_link_libraries(tessera_torch INTERFACE
    "-Wl,--no-as-needed" stdc++ "-Wl,--as-needed" ${TESSERA_LIB_torch_cpu} ${TESSERA_LIB_c10})
  target_link_options(tessera_torch INTERFACE "-Wl,-rpath,${_root}/lib")
  target_compile_definitions(tessera_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=1)
  set(TESSERA_TORCH_ROOT ${_root} CACHE INTERNAL "libtorch root")
endif()
