// Refused plugins are named with their reason and the host carries on.
#include "support.h"

#include <tessera/fingerprint.h>

using namespace tessera;

namespace {
std::string reason_for(const PluginRegistry& r, const std::string& file_part) {
  for (const auto& x : r.refused())
    if (x.path.find(file_part) != std::string::npos) return x.reason;
  return "not refused";
}
}  // namespace

CATCH_TEST_CASE("bad plugins are refused with their reasons while good ones still load", "[runtime][plugins]") {
  PluginRegistry reg;
  reg.scan({TESSERA_TEST_PLUGIN_DIR, TESSERA_BAD_PLUGIN_DIR, "/nonexistent/dir"});
  CATCH_CHECK(reg.find("probe") != nullptr);
  CATCH_CHECK_THAT(reason_for(reg, "bad_abi"), Catch::Contains("SDK ABI 99.0 is not compatible with the host's 1.0"));
  CATCH_CHECK_THAT(reason_for(reg, "bad_torch"), Catch::Contains("built against libtorch 0.0.1, the host uses " TESSERA_TORCH_VERSION));
  CATCH_CHECK_THAT(reason_for(reg, "throwing"), Catch::Contains("plugin 'throwing': cannot create its method: constructor says no"));
  CATCH_CHECK_THAT(reason_for(reg, "no_entry"), Catch::Contains("no entry symbol 'tessera_plugin_entry'"));
  CATCH_CHECK_THAT(reason_for(reg, "probe-copy"), Catch::Contains("duplicate id 'probe'"));
  CATCH_CHECK(reg.refused().size() == 5);
  CATCH_CHECK(reg.plugins().size() == 1);
}

CATCH_TEST_CASE("an exception inside a plugin becomes an error naming plugin and instance", "[runtime][plugins][minilm]") {
  auto model = test::load_minilm();
  auto probe = test::registry().create("probe", "p1");
  const auto* info = test::registry().find("probe");
  AttachContext ctx{"p1", {"attn.q"}, apply_schema(info->params, {{"kind", std::string("throw")}}), *model};
  CATCH_CHECK_THROWS_WITH(probe->call("attach", [&](Method& m) { m.attach(ctx); }),
                          "plugin 'probe' (instance 'p1'): attach: probe refuses to attach");
  CATCH_CHECK_THROWS_WITH(test::registry().create("nope", "x"), Catch::Contains("no plugin with id 'nope'"));
}

CATCH_TEST_CASE("search path: beside the binary, then --plugin-dir, then TESSERA_PLUGIN_PATH", "[runtime][plugins]") {
  ::setenv("TESSERA_PLUGIN_PATH", "/env/a:/env/b", 1);
  auto dirs = PluginRegistry::search_path("/proc/self/exe", {"/cli/dir"});
  ::unsetenv("TESSERA_PLUGIN_PATH");
  CATCH_REQUIRE(dirs.size() == 4);
  CATCH_CHECK(dirs[0].size() > 8);
  CATCH_CHECK(dirs[0].substr(dirs[0].size() - 8) == "/plugins");
  CATCH_CHECK(dirs[1] == "/cli/dir");
  CATCH_CHECK(dirs[2] == "/env/a");
  CATCH_CHECK(dirs[3] == "/env/b");
}

CATCH_TEST_CASE("a plugin file or directory that others can write to is refused, unless allowed", "[runtime][plugins]") {
  namespace fs = std::filesystem;
  const auto dir = test::temp_dir("insecure-plugins");
  const auto file = dir / "tessera-plugin-probe.so";
  fs::copy_file(fs::path(TESSERA_TEST_PLUGIN_DIR) / "tessera-plugin-probe.so", file);
  fs::permissions(dir, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec | fs::perms::others_read | fs::perms::others_exec);
  fs::permissions(file, fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read | fs::perms::others_read);
  auto scan = [&](bool allow) {
    auto reg = std::make_unique<PluginRegistry>();
    reg->allow_insecure(allow);
    reg->scan({dir.string()});
    return reg;
  };
  CATCH_CHECK(scan(false)->find("probe") != nullptr);  // 0644 in a 0755 directory: trusted

  fs::permissions(file, fs::perms::group_write, fs::perm_options::add);
  auto reg = scan(false);
  CATCH_CHECK(reg->find("probe") == nullptr);
  CATCH_CHECK_THAT(reason_for(*reg, "probe"), Catch::Contains("the file " + file.string() + " is writable by its group (mode 664)") &&
                                                  Catch::Contains("--allow-insecure-plugins"));
  CATCH_CHECK(scan(true)->find("probe") != nullptr);

  fs::permissions(file, fs::perms::group_write, fs::perm_options::remove);
  fs::permissions(dir, fs::perms::others_write, fs::perm_options::add);
  CATCH_CHECK_THAT(reason_for(*scan(false), "probe"), Catch::Contains("its directory " + dir.string() + " is writable by every user (mode 757)"));
  fs::permissions(dir, fs::perms::others_write, fs::perm_options::remove);
}
