# tessera_add_plugin(<name> SOURCES <files...> [LIBRARIES <libs...>])
# Builds tessera-plugin-<name>.so against the SDK only: hidden visibility (the entry is
# exported explicitly), and --no-undefined so a missing symbol fails at link time, not
# at load time.
function(tessera_add_plugin name)
  cmake_parse_arguments(P "" "OUTPUT_DIRECTORY" "SOURCES;LIBRARIES" ${ARGN})
  add_library(${name} MODULE ${P_SOURCES})
  target_link_libraries(${name} PRIVATE TesseraSDK::sdk ${P_LIBRARIES})
  set_target_properties(${name} PROPERTIES
    PREFIX "" OUTPUT_NAME "tessera-plugin-${name}"
    CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON)
  if(P_OUTPUT_DIRECTORY)
    set_target_properties(${name} PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${P_OUTPUT_DIRECTORY})
  elseif(TESSERA_PLUGIN_OUTPUT_DIR)
    set_target_properties(${name} PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${TESSERA_PLUGIN_OUTPUT_DIR})
  endif()
  target_link_options(${name} PRIVATE "-Wl,--no-undefined")
endfunction()
