// What the tests of AdapterHub's bottleneck adapters share (the `bottleneck` and `compacter`
// plugins): AdapterHub's saved folders from tests/fixtures/make_adapters.py read through the
// importer, and the reverse check — a folder we save loads in `adapters` and gives our outputs.
#pragma once

#include "support.h"

#include "architectures/decoder.h"
#include "architectures/t5.h"
#include "formats/safetensors.h"
#include "runtime/adapterhub_import.h"

#include <nlohmann/json.hpp>

#include <cstdlib>
#include <fstream>

namespace tessera::test {

inline std::string adapters_fixture(const std::string& name) { return fixture("adapters/" + name); }
inline NamedTensors& adapters_reference() { return cached_tensors(adapters_fixture("reference.safetensors")); }

// The AdapterHub folder as a method instance of `plugin` named as AdapterHub named it ("a"),
// so that our state's keys must equal the file's keys exactly; `extra`: keys of ours on top.
inline std::unique_ptr<MethodInstance> attach_adapterhub(const std::string& name, ModelView& model, const std::string& plugin,
                                                         const std::map<std::string, ParamValue>& extra = {}) {
  const auto dir = adapters_fixture(name);
  MethodConfig mc = method_from_adapterhub_dir(dir, registry(), "a");
  CATCH_CHECK(mc.plugin == plugin);
  if (!extra.empty()) {
    for (const auto& [k, v] : extra) mc.params[k] = v;
    mc.checked = apply_schema(registry().find(plugin)->params, mc.params);
  }
  auto inst = registry().create(plugin, "a");
  inst->attach(model, mc.targets, mc.checked);
  auto file = read_tensors(dir + "/adapter.safetensors");
  auto ours = inst->call("state", [](Method& m) { return m.state(); });
  CATCH_CHECK(ours.size() == file.size());
  for (const auto& [k, t] : file) CATCH_CHECK((ours.count(k) && ours[k].sizes() == t.sizes()));
  inst->call("load_state", [&](Method& m) { m.load_state(file); });
  return inst;
}

// `plugin` as an instance named "mine" on `model`, for the reverse check: the tensors of
// AdapterHub's `fixture` folder loaded under that other name or, without a fixture, `params`
// on `targets` with random tensors (0.2 · N(0, 1), drawn from `seed`).
inline std::unique_ptr<MethodInstance> attach_fixture_or_random(const std::string& plugin, ModelView& model, const std::string& fixture,
                                                                const std::vector<std::string>& targets, const std::map<std::string, ParamValue>& params,
                                                                std::uint64_t seed) {
  auto inst = registry().create(plugin, "mine");
  if (!fixture.empty()) {
    MethodConfig mc = method_from_adapterhub_dir(adapters_fixture(fixture), registry(), "mine");
    inst->attach(model, mc.targets, mc.checked);
    inst->call("load_state", [&](Method& m) { m.load_state(read_tensors(adapters_fixture(fixture) + "/adapter.safetensors")); });
    return inst;
  }
  inst->attach(model, targets, apply_schema(registry().find(plugin)->params, params));
  at::manual_seed(seed);
  NamedTensors random;
  for (const auto& [k, t] : inst->call("state", [](Method& m) { return m.state(); })) random[k] = at::randn_like(t) * 0.2;
  inst->call("load_state", [&](Method& m) { m.load_state(random); });
  return inst;
}

// A model for the reverse check: "minilm", "t5:<folder>" or a causal-LM folder.
inline std::unique_ptr<SiteModel> load_for_adapterhub(const std::string& which) {
  if (which == "minilm") return load_minilm();
  std::unique_ptr<SiteModel> model;
  if (which.rfind("t5:", 0) == 0) model = T5Model::load(which.substr(3), options());
  else model = DecoderModel::load(which, options());
  perturb_if_asked(*model);
  return model;
}

// `inst`, attached to `model` (loaded by load_for_adapterhub(which)), saved in AdapterHub's
// layout into a folder named after `tag`; tests/fixtures/adapters_forward.py loads it with
// `load_adapter` and computes the reference inputs' outputs, which must be ours.
inline void check_loads_in_adapterhub(MethodInstance& inst, SiteModel& model, const std::string& which, const std::string& tag) {
  const bool bert = which == "minilm", t5 = which.rfind("t5:", 0) == 0;
  const auto dir = temp_dir("adapterhub-" + tag);
  save_safetensors((dir / "adapter.safetensors").string(), inst.call("state", [](Method& m) { return m.state(); }), {{"format", "pt"}});
  const auto cfg = inst.call("cfg", [](Method& m) { return m.adapter_config_json(); });
  CATCH_CHECK(nlohmann::json::parse(cfg)["tessera"]["adapterhub_exact"] == true);
  std::ofstream(dir / "adapter_config.json") << cfg;
  const std::string reference = bert ? fixture("reference.safetensors") : t5 ? fixture("seq2seq/reference.safetensors") : fixture("decoders/reference.safetensors");
  const auto out = (dir / "out.safetensors").string();
  const std::string cmd = std::string(TESSERA_ADAPTERS_PYTHON) + " " + TESSERA_SOURCE_DIR + "/tests/fixtures/adapters_forward.py " + dir.string() + " " + which +
                          " " + reference + " " + out + " > " + (dir / "log").string() + " 2>&1";
  const int rc = std::system(cmd.c_str());
  if (rc != 0) {
    std::ifstream log(dir / "log");
    CATCH_INFO(std::string(std::istreambuf_iterator<char>(log), {}));
    CATCH_REQUIRE(rc == 0);
  }
  auto theirs = read_tensors(out);
  auto inputs = read_tensors(reference);
  at::NoGradGuard no_grad;
  const auto &ids = inputs["input_ids"], &mask = inputs["attention_mask"];
  Tensor ours, ours_mask = mask;
  if (bert) {
    ours = static_cast<BertModel&>(model).forward(ids, mask).hidden;
  } else if (t5) {
    auto& m = static_cast<T5Model&>(model);
    ours = m.logits(m.decode(inputs["t5.decoder_input_ids"], m.encode(ids, mask)));
    ours_mask = Tensor();
  } else {
    auto& d = static_cast<DecoderModel&>(model);
    ours = d.logits(d.forward(ids, mask));
  }
  TESSERA_CHECK_PARITY(parity("AdapterHub on our folder", ours, theirs["out"], theirs["out.f64"], ours_mask));
}

}  // namespace tessera::test
