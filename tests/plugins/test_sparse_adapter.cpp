// SparseAdapter against a plain PyTorch rendering of its pruning at initialisation
// (tests/fixtures/make_sparse_adapter.py: SNIP, GraSP and magnitude scores by torch autograd,
// one global threshold) on the real MiniLM with AdapterHub's Pfeiffer adapter; and its files
// against AdapterHub, which loads them as a dense adapter whose pruned weights are 0.
#include "adapterhub_parity.h"

#include "runtime/method_stack.h"

#include <cmath>

using namespace tessera;

namespace {

NamedTensors& sparse_reference() { return test::cached_tensors(test::fixture("sparse_adapter/reference.safetensors")); }

bool is_weight(const std::string& key) { return key.size() > 7 && key.compare(key.size() - 7, 7, ".weight") == 0; }

// The fixture's AdapterHub adapter (seq_bn as saved, before pruning: every mask 1).
NamedTensors unpruned_file() {
  auto file = test::read_tensors(test::fixture("sparse_adapter/seq_bn/adapter.safetensors"));
  for (const auto& [k, t] : NamedTensors(file))
    if (is_weight(k)) file[k + "_mask"] = at::ones(t.sizes(), at::kByte);
  return file;
}

std::unique_ptr<MethodInstance> attach_sparse(ModelView& model, const std::string& name, const std::map<std::string, ParamValue>& params) {
  auto inst = test::registry().create("sparse_adapter", name);
  inst->attach(model, {}, apply_schema(test::registry().find("sparse_adapter")->params, params));
  return inst;
}

// The fixture's calibration: two batches (rows 0–1, 2–3), each's loss Σ hidden ⊙ direction
// over its real tokens.
Calibration calibration(BertModel& model) {
  auto& base = test::cached_tensors(test::fixture("reference.safetensors"));
  return {2, [&model, &base](std::int64_t b) {
            const Tensor ids = base["input_ids"].slice(0, 2 * b, 2 * b + 2), mask = base["attention_mask"].slice(0, 2 * b, 2 * b + 2);
            const Tensor dir = base["grad.direction"].slice(0, 2 * b, 2 * b + 2);
            return (model.forward(ids, mask).hidden * dir * mask.unsqueeze(-1).to(dir.dtype())).sum();
          }};
}

}  // namespace

CATCH_TEST_CASE("SparseAdapter's SNIP, GraSP and magnitude masks are the PyTorch rendering's, and the pruned adapter gives its outputs", "[plugins][sparse_adapter][minilm][parity]") {
  auto& ref = sparse_reference();
  auto& base = test::cached_tensors(test::fixture("reference.safetensors"));
  const auto &ids = base["input_ids"], &mask = base["attention_mask"];
  for (const std::string pruner : {"snip", "grasp", "magnitude"}) {
    CATCH_INFO("pruner " << pruner);
    auto model = test::load_minilm();
    model->train(false);  // as the trainer's prepare(): no dropout
    auto inst = attach_sparse(*model, "a", {{"pruner", pruner}, {"sparsity", 0.4}});
    inst->call("load_state", [&](Method& m) { m.load_state(unpruned_file()); });
    inst->call("prepare", [&](Method& m) { m.prepare(calibration(*model)); });
    const auto ours = inst->call("state", [](Method& m) { return m.state(); });
    // The masks agree wherever the reference's score is clear of the threshold: an entry whose
    // score lies within 1e-4 of the scores' scale from it may fall either side in another
    // summation order (GraSP's double backward most).
    const double threshold = 0.5 * (ref[pruner + ".last_pruned"].item<double>() + ref[pruner + ".first_kept"].item<double>());
    double scale = 0;
    for (const auto& [k, t] : ref)
      if (k.rfind(pruner + ".score.", 0) == 0) scale = std::max(scale, t.abs().max().item<double>());
    std::int64_t near = 0, far = 0, kept = 0, total = 0;
    for (const auto& [k, t] : ref) {
      if (k.rfind(pruner + ".score.", 0) != 0) continue;
      const std::string key = k.substr(pruner.size() + 7);
      const Tensor differs = ours.at(key + "_mask").ne(ref.at(pruner + "." + key + "_mask"));
      const Tensor close = (t - threshold).abs().le(1e-4 * scale);
      near += (differs & close).sum().item<std::int64_t>();
      far += (differs & close.logical_not()).sum().item<std::int64_t>();
      kept += ours.at(key + "_mask").sum().item<std::int64_t>();
      total += t.numel();
    }
    CATCH_INFO(near << " masks differ next to the threshold");
    CATCH_CHECK(total == 6 * 2 * 24 * 384);
    CATCH_CHECK(far == 0);
    CATCH_CHECK(near <= 8);
    CATCH_CHECK(kept == total - static_cast<std::int64_t>(std::ceil(0.4 * static_cast<double>(total))));
    // The forward with the reference's masks over the unpruned weights: its outputs.
    NamedTensors with_ref_masks = unpruned_file();
    for (auto& [k, t] : with_ref_masks)
      if (k.size() > 5 && k.compare(k.size() - 5, 5, "_mask") == 0) t = ref.at(pruner + "." + k);
    inst->call("load_state", [&](Method& m) { m.load_state(with_ref_masks); });
    at::NoGradGuard no_grad;
    TESSERA_CHECK_PARITY(test::parity(model->forward(ids, mask).hidden, ref, pruner + ".hidden", mask));
  }
}

CATCH_TEST_CASE("a sparse adapter trains only its kept weights and loads in AdapterHub as a dense adapter with zeros", "[plugins][sparse_adapter][minilm][parity]") {
  auto model = test::load_minilm();
  auto inst = attach_sparse(*model, "mine", {{"pruner", std::string("magnitude")}, {"sparsity", 0.75}});
  inst->call("prepare", [&](Method& m) { m.prepare(Calibration{}); });  // magnitude needs no batch
  const std::int64_t weights = 6 * 2 * 24 * 384, kept = weights - weights * 3 / 4, biases = 6 * (24 + 384);
  auto trainable = inst->call("trainable", [](Method& m) { return m.trainable(); });
  std::int64_t count = 0;
  for (const auto& [k, t] : trainable) count += t.numel();
  CATCH_CHECK(count == kept + biases);
  // One step of SGD: the kept entries move, the pruned stay 0 in the saved weights.
  auto& base = test::cached_tensors(test::fixture("reference.safetensors"));
  (model->forward(base["input_ids"], base["attention_mask"]).hidden * base["grad.direction"]).sum().backward();
  {
    at::NoGradGuard no_grad;
    for (auto& [k, t] : trainable) t.sub_(t.grad() * 0.1), t.mutable_grad().reset();
  }
  const auto state = inst->call("state", [](Method& m) { return m.state(); });
  const std::string down = "encoder.layer.2.output.adapters.mine.adapter_down.0.weight";
  const Tensor m = state.at(down + "_mask").to(at::kBool);
  CATCH_CHECK(state.at(down).masked_select(m.logical_not()).abs().max().item<double>() == 0);
  CATCH_CHECK(state.at(down).masked_select(m).ne(0).all().item<bool>());
  const auto cfg = nlohmann::json::parse(inst->call("cfg", [](Method& x) { return x.adapter_config_json(); }));
  CATCH_CHECK(cfg["tessera"]["sparse_adapter"]["kept_weights"] == kept);
  test::check_loads_in_adapterhub(*inst, *model, "minilm", "sparse-adapter");
}

CATCH_TEST_CASE("sparse_adapter refuses a scored pruner on an adapter that starts silent with the key's place, and a mask that is not one", "[plugins][sparse_adapter][minilm]") {
  auto model = test::load_minilm();
  const auto dir = test::temp_dir("sparse-adapter-cfg");
  const auto path = (dir / "run.toml").string();
  std::ofstream(path) << "[model]\npath = \"/m\"\n[data]\npath = \"/d.csv\"\n[[methods]]\nplugin = \"sparse_adapter\"\n[methods.params]\n"
                         "config = \"par_bn\"\npruner = \"grasp\"\n";
  Config c = load_config(path);
  CATCH_CHECK_THROWS_WITH(check_methods(c, test::registry()), Catch::Contains("run.toml:") && Catch::Contains("cannot score an adapter that starts silent"));

  auto inst = attach_sparse(*model, "a", {});
  auto bad = unpruned_file();
  bad.at("encoder.layer.1.output.adapters.a.adapter_up.weight_mask").fill_(2);
  CATCH_CHECK_THROWS_WITH(inst->call("load_state", [&](Method& m) { m.load_state(bad); }),
                          Catch::Contains("tensor 'encoder.layer.1.output.adapters.a.adapter_up.weight_mask' is not a mask"));
  auto lacking = unpruned_file();
  lacking.erase("encoder.layer.1.output.adapters.a.adapter_up.weight_mask");
  CATCH_CHECK_THROWS_WITH(inst->call("load_state", [&](Method& m) { m.load_state(lacking); }),
                          Catch::Contains("adapter lacks tensor 'encoder.layer.1.output.adapters.a.adapter_up.weight_mask'"));
}
