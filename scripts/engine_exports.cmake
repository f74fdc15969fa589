# Included by scripts/engine_build.py at the end of every project() call of llama.cpp's build
# (CMAKE_PROJECT_INCLUDE): once the whole tree is configured, it limits what llama.cpp's GPU and
# RPC backend libraries export to their C interface (ggml_*, gguf_*).
#
# Why (issue 20): on Linux a C++ shared library exports every template instance it holds, the
# C++ standard library's among them. nvcc-built libggml-cuda can hold its own copies of libstdc++
# templates (std::ostream::_M_insert<long> was one on a CUDA 13 machine), and the dynamic linker
# may then bind libllama's calls to those copies instead of libstdc++: every model load crashed in
# llama_model::print_info. A backend's interface is C; nothing else needs to be visible, so with
# this version script no C++ runtime symbol can be interposed from there, whatever the toolchain or
# the order in which a program loads its libraries. huatuo_local/native.py guards the same thing
# from the other side (libstdc++ first in the global scope), for engines built without this file.
get_property(_huatuo_exports_scheduled GLOBAL PROPERTY HUATUO_EXPORTS_SCHEDULED)
if(NOT _huatuo_exports_scheduled AND CMAKE_SYSTEM_NAME STREQUAL "Linux" AND CMAKE_VERSION VERSION_LESS 3.19)
  # cmake_language(DEFER) is 3.19's; an older CMake still builds the engine, with the exports as they are.
  set_property(GLOBAL PROPERTY HUATUO_EXPORTS_SCHEDULED TRUE)
  message(WARNING "huatuo-local: CMake ${CMAKE_VERSION} < 3.19: backend exports not limited "
                  "(huatuo_local/native.py's guard still applies)")
elseif(NOT _huatuo_exports_scheduled AND CMAKE_SYSTEM_NAME STREQUAL "Linux")
  set_property(GLOBAL PROPERTY HUATUO_EXPORTS_SCHEDULED TRUE)
  set_property(GLOBAL PROPERTY HUATUO_EXPORTS_MAP "${CMAKE_CURRENT_LIST_DIR}/ggml_backend_exports.map")

  function(huatuo_limit_backend_exports)
    get_property(map GLOBAL PROPERTY HUATUO_EXPORTS_MAP)
    set(limited "")
    foreach(target IN ITEMS ggml-cuda ggml-hip ggml-musa ggml-rpc)
      if(TARGET ${target})
        target_link_options(${target} PRIVATE "LINKER:--version-script=${map}")
        set_property(TARGET ${target} APPEND PROPERTY LINK_DEPENDS "${map}")
        list(APPEND limited ${target})
      endif()
    endforeach()
    message(STATUS "huatuo-local: exports limited to the C interface in: ${limited}")
  endfunction()

  # Deferred to the end of the top-level directory, when every backend target exists.
  cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL huatuo_limit_backend_exports)
endif()
