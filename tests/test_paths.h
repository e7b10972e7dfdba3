// Where the test binary finds its fixtures, plugins, Pythons and source tree: fixed at configure
// time in one generated file (test_paths.cpp.in), not passed to every test source as -D. On the
// command line of each source they would make every one a ccache miss in a checkout at another
// path (a CI clone), and the test binary's sources are most of the build.
#pragma once

namespace tessera::test::paths {
extern const char* const fixture_dir;
extern const char* const plugin_dir;
extern const char* const test_plugin_dir;
extern const char* const bad_plugin_dir;
extern const char* const example_plugin_dir;
extern const char* const venv_python;
extern const char* const adapters_python;
extern const char* const source_dir;
}  // namespace tessera::test::paths

#define TESSERA_FIXTURE_DIR ::tessera::test::paths::fixture_dir
#define TESSERA_PLUGIN_DIR ::tessera::test::paths::plugin_dir
#define TESSERA_TEST_PLUGIN_DIR ::tessera::test::paths::test_plugin_dir
#define TESSERA_BAD_PLUGIN_DIR ::tessera::test::paths::bad_plugin_dir
#define TESSERA_EXAMPLE_PLUGIN_DIR ::tessera::test::paths::example_plugin_dir
#define TESSERA_VENV_PYTHON ::tessera::test::paths::venv_python
#define TESSERA_ADAPTERS_PYTHON ::tessera::test::paths::adapters_python
#define TESSERA_SOURCE_DIR ::tessera::test::paths::source_dir
