// Refused plugins are named with their reason and the host carries on.
#include "support.h"

#include <tessera/extensions.h>
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
  const std::string host = std::to_string(TESSERA_SDK_ABI_MAJOR) + "." + std::to_string(TESSERA_SDK_ABI_MINOR);
  CATCH_CHECK_THAT(reason_for(reg, "bad_abi"), Catch::Contains("plugin 'bad-abi': built for SDK ABI 99.0, the host has " + host));
  const std::string newer = std::to_string(TESSERA_SDK_ABI_MAJOR) + "." + std::to_string(TESSERA_SDK_ABI_MINOR + 1);
  CATCH_CHECK_THAT(reason_for(reg, "newer_minor"), Catch::Contains("built for SDK ABI " + newer + ", newer than the host's " + host));
  CATCH_CHECK_THAT(reason_for(reg, "unknown_family"), Catch::Contains("unknown family 'magic'"));
  CATCH_CHECK_THAT(reason_for(reg, "small_descriptor"), Catch::Contains("descriptor is 8 bytes, smaller than SDK 2.0's"));
  CATCH_CHECK_THAT(reason_for(reg, "bad_torch"), Catch::Contains("built against libtorch 0.0.1, the host uses " TESSERA_TORCH_VERSION));
  CATCH_CHECK_THAT(reason_for(reg, "throwing"), Catch::Contains("plugin 'throwing': cannot create its method: constructor says no"));
  CATCH_CHECK_THAT(reason_for(reg, "no_entry"), Catch::Contains("no entry symbol 'tessera_plugin_entry'"));
  CATCH_CHECK_THAT(reason_for(reg, "probe-copy"), Catch::Contains("duplicate id 'probe'"));
  CATCH_CHECK(reg.refused().size() == 8);
  CATCH_CHECK(reg.plugins().size() == 10);  // probe, probe-2.0 … probe-2.7 (the frozen headers), probe-target-2.0 (declares 2.0)
  CATCH_REQUIRE(reg.find("probe-2.2") != nullptr);
  CATCH_CHECK(reg.find("probe-2.2")->abi_minor == 2);
  CATCH_REQUIRE(reg.find("probe-2.3") != nullptr);
  CATCH_CHECK(reg.find("probe-2.3")->abi_minor == 3);
  CATCH_REQUIRE(reg.find("probe-2.4") != nullptr);
  CATCH_CHECK(reg.find("probe-2.4")->abi_minor == 4);
  CATCH_REQUIRE(reg.find("probe-2.5") != nullptr);
  CATCH_CHECK(reg.find("probe-2.5")->abi_minor == 5);
  CATCH_REQUIRE(reg.find("probe-2.6") != nullptr);
  CATCH_CHECK(reg.find("probe-2.6")->abi_minor == 6);
  CATCH_REQUIRE(reg.find("probe-2.7") != nullptr);
  CATCH_CHECK(reg.find("probe-2.7")->abi_minor == 7);
  CATCH_REQUIRE(reg.find("probe-2.1") != nullptr);
  CATCH_CHECK(reg.find("probe-2.1")->abi_minor == 1);
  CATCH_REQUIRE(reg.find("probe-target-2.0") != nullptr);
  CATCH_CHECK(reg.find("probe-target-2.0")->abi_minor == 0);
  CATCH_REQUIRE(reg.find("probe-2.0") != nullptr);
  CATCH_CHECK(reg.find("probe-2.0")->abi_minor == 0);  // recorded: the host calls nothing 2.0 lacks
  CATCH_CHECK(reg.find("probe")->abi_minor == TESSERA_SDK_ABI_MINOR);
}

CATCH_TEST_CASE("extensions: tables fetched by id in both directions, checked by version", "[runtime][plugins][minilm]") {
  struct ProbeExtension {  // what the probe offers as "tessera.test.probe" version 1
    tessera_extension_header header;
    const char* kind;
  };
  auto model = test::load_minilm();
  for (const char* id : {"probe", "probe-2.0", "probe-2.1", "probe-2.2", "probe-2.3", "probe-2.4", "probe-2.5", "probe-2.6", "probe-2.7"}) {
    auto p = test::registry().create(id, "ext");
    p->attach(*model, {"attn.q"}, apply_schema(test::registry().find(id)->params, {{"kind", std::string("output_scale")}}));
    const auto* ext = p->extension<ProbeExtension>("tessera.test.probe", 1);
    CATCH_REQUIRE(ext != nullptr);
    CATCH_CHECK(std::string(ext->kind) == "output_scale");
    CATCH_CHECK(p->extension<ProbeExtension>("tessera.test.probe", 2) == nullptr);  // a version it does not have
    CATCH_CHECK(p->extension<ProbeExtension>("tessera.test.none", 1) == nullptr);
  }
  // The host's side: the run's log, version 1; an unknown id is null.
  const auto* log = host_extension<tessera_host_log_v1>(*model, TESSERA_EXT_HOST_LOG, 1);
  CATCH_REQUIRE(log != nullptr);
  log->write(TESSERA_LOG_DEBUG, "test", "a message through the host's log");
  CATCH_CHECK(host_extension<tessera_host_log_v1>(*model, TESSERA_EXT_HOST_LOG, 2) == nullptr);
  CATCH_CHECK(model->extension("tessera.host.none") == nullptr);
}

CATCH_TEST_CASE("an intervention that throws in forward is named by plugin, instance and site, and the host goes on", "[runtime][plugins][minilm]") {
  auto model = test::load_minilm();
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  at::NoGradGuard no_grad;
  const Tensor base = model->forward(ref["input_ids"], ref["attention_mask"]).hidden;
  for (const char* id : {"probe", "probe-2.0", "probe-2.1", "probe-2.2", "probe-2.3", "probe-2.4", "probe-2.5", "probe-2.6", "probe-2.7"}) {
    auto bad = test::registry().create(id, "faulty");
    bad->attach(*model, {"layers.2.attn.q"}, apply_schema(test::registry().find(id)->params, {{"kind", std::string("throw_forward")}}));
    CATCH_CHECK_THROWS_WITH(model->forward(ref["input_ids"], ref["attention_mask"]),
                            "plugin '" + std::string(id) + "' (instance 'faulty') at site 'layers.2.attn.q': probe fails in forward");
    bad->owner().set_enabled(false);  // switched off by the host: as if absent
    CATCH_CHECK(test::max_abs_diff(model->forward(ref["input_ids"], ref["attention_mask"]).hidden, base) == 0);
    bad->owner().set_enabled(true);
    bad.reset();  // the instance goes: whatever it installed goes with it
    CATCH_CHECK(test::max_abs_diff(model->forward(ref["input_ids"], ref["attention_mask"]).hidden, base) == 0);
  }
}

CATCH_TEST_CASE("an exception inside a plugin becomes an error naming plugin and instance", "[runtime][plugins][minilm]") {
  auto model = test::load_minilm();
  auto probe = test::registry().create("probe", "p1");
  const auto* info = test::registry().find("probe");
  CATCH_CHECK_THROWS_WITH(probe->attach(*model, {"attn.q"}, apply_schema(info->params, {{"kind", std::string("throw")}})),
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
