// SparseAdapter against a plain PyTorch rendering of its pruning at initialisation
// (tests/fixtures/make_sparse_adapter.py: SNIP, GraSP and magnitude scores by torch autograd,
// one global threshold) on the real MiniLM with AdapterHub's Pfeiffer adapter; and its files
// against AdapterHub, which loads them as a dense adapter whose pruned weights are 0.
#include "adapterhub_parity.h"

#include "runtime/method_stack.h"

#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
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

// SparseAdapter's LoRA form (`sparse_lora`) against its equations: the SNIP scores of every A and
// B entry, |θ ⊙ Σ_b ∇θ L_b|, computed here by torch autograd through plain LoRA (the `lora`
// plugin, itself equal to peft's) with the same factors and calibration batches; one global
// threshold pruning ⌈0.4 N⌉; then the pruned LoRA's outputs are plain LoRA's with the masked
// factors, and only the kept entries train.
CATCH_TEST_CASE("sparse_lora prunes LoRA's factors by SNIP with one global threshold, and runs plain LoRA of the masked factors",
                "[plugins][sparse_adapter][minilm]") {
  auto& base = test::cached_tensors(test::fixture("reference.safetensors"));
  const auto &ids = base["input_ids"], &mask = base["attention_mask"];
  auto model = test::load_minilm();
  model->train(false);  // as the trainer's prepare()
  const std::map<std::string, ParamValue> params = {{"r", std::int64_t{4}}, {"lora_alpha", 8.0}, {"sparsity", 0.4}};
  auto inst = test::registry().create("sparse_lora", "s");
  inst->attach(*model, {}, apply_schema(test::registry().find("sparse_lora")->params, params));
  at::manual_seed(21);
  NamedTensors start;  // the factors before pruning: N(0, 0.02) as the plugin's init, every mask 1
  for (const auto& [k, t] : inst->call("state", [](Method& m) { return m.state(); }))
    start[k] = t.scalar_type() == at::kByte ? at::ones_like(t) : at::randn_like(t) * 0.02;
  inst->call("load_state", [&](Method& m) { m.load_state(start); });
  inst->detach(*model);

  // The reference scores through plain LoRA, the same calibration (two batches).
  auto lora = test::registry().create("lora", "l");
  lora->attach(*model, {"attn.q", "attn.v"}, apply_schema(test::registry().find("lora")->params, {{"r", std::int64_t{4}}, {"lora_alpha", 8.0}}));
  NamedTensors factors;
  for (const auto& [k, t] : start)
    if (t.scalar_type() != at::kByte) factors[k] = t;
  lora->call("load_state", [&](Method& m) { m.load_state(factors); });
  auto live = lora->call("state", [](Method& m) { return m.state(); });
  const Calibration c = calibration(*model);
  std::vector<std::string> keys;  // every factor (the threshold is global: their order does not matter)
  for (const auto& [k, t] : live) keys.push_back(k);
  std::vector<Tensor> grads(keys.size());
  for (std::int64_t b = 0; b < c.batches; ++b) {
    std::vector<Tensor> v;
    for (const auto& k : keys) v.push_back(live.at(k));
    const auto g = torch::autograd::grad({c.loss(b)}, v);
    for (std::size_t i = 0; i < g.size(); ++i) grads[i] = grads[i].defined() ? grads[i] + g[i] : g[i];
  }
  std::vector<Tensor> scores;
  for (std::size_t i = 0; i < keys.size(); ++i) scores.push_back((live.at(keys[i]).detach() * grads[i]).abs().flatten());
  const Tensor all = at::cat(scores);
  const auto N = all.numel(), pruned = static_cast<std::int64_t>(std::ceil(0.4 * static_cast<double>(N)));
  const double threshold = std::get<0>(all.sort()).index({pruned - 1}).item<double>();  // the last pruned score
  lora->detach(*model);

  inst = test::registry().create("sparse_lora", "s");
  inst->attach(*model, {}, apply_schema(test::registry().find("sparse_lora")->params, params));
  inst->call("load_state", [&](Method& m) { m.load_state(start); });
  inst->call("prepare", [&](Method& m) { m.prepare(c); });
  NamedTensors ours;  // copies: state() hands out the live factors
  for (const auto& [k, t] : inst->call("state", [](Method& m) { return m.state(); })) ours[k] = t.clone();
  // The masks agree wherever the score is clear of the threshold (within 1e-4 of the scores'
  // scale an entry may fall either side in another summation order).
  const double scale = all.max().item<double>();
  std::int64_t kept = 0, far = 0, near = 0;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    const Tensor m = ours.at(keys[i] + "_mask").flatten().to(at::kBool), differs = m.ne(scores[i].gt(threshold));
    const Tensor close = (scores[i] - threshold).abs().le(1e-4 * scale);
    far += (differs & close.logical_not()).sum().item<std::int64_t>();
    near += (differs & close).sum().item<std::int64_t>();
    kept += m.sum().item<std::int64_t>();
  }
  CATCH_CHECK(N == 6 * 2 * 2 * 4 * 384);
  CATCH_CHECK(kept == N - pruned);
  CATCH_CHECK(far == 0);
  CATCH_CHECK(near <= 8);
  // Only the kept entries train: one SGD step moves them, the pruned stay 0.
  auto trainable = inst->call("trainable", [](Method& m) { return m.trainable(); });
  std::int64_t count = 0;
  for (const auto& [k, t] : trainable) count += t.numel();
  CATCH_CHECK(count == N - pruned);
  (model->forward(ids, mask).hidden * base["grad.direction"]).sum().backward();
  {
    at::NoGradGuard no_grad;
    for (auto& [k, t] : trainable) t.sub_(t.grad() * 0.1), t.mutable_grad().reset();
  }
  const auto stepped = inst->call("state", [](Method& m) { return m.state(); });
  for (const auto& k : keys) {
    const Tensor m = stepped.at(k + "_mask").to(at::kBool);
    CATCH_CHECK(stepped.at(k).masked_select(m.logical_not()).abs().max().item<double>() == 0);
    CATCH_CHECK_FALSE(at::equal(stepped.at(k).masked_select(m), ours.at(k).masked_select(m)));
  }
  // The pruned LoRA: plain LoRA of the masked factors.
  at::NoGradGuard no_grad;
  const Tensor pruned_out = model->forward(ids, mask).hidden;
  inst->detach(*model);
  lora = test::registry().create("lora", "l");
  lora->attach(*model, {"attn.q", "attn.v"}, apply_schema(test::registry().find("lora")->params, {{"r", std::int64_t{4}}, {"lora_alpha", 8.0}}));
  NamedTensors masked;
  for (const auto& k : keys) masked[k] = stepped.at(k);  // 0 where pruned
  lora->call("load_state", [&](Method& m) { m.load_state(masked); });
  CATCH_CHECK(test::max_abs_diff(model->forward(ids, mask).hidden, pruned_out) < 1e-5 * pruned_out.abs().max().item<double>());
  lora->detach(*model);
}

CATCH_TEST_CASE("sparse_lora refuses a scored pruner on a LoRA that starts silent, with the key's place", "[plugins][sparse_adapter]") {
  const auto dir = test::temp_dir("sparse-lora-cfg");
  const auto path = (dir / "run.toml").string();
  std::ofstream(path) << "[model]\npath = \"/m\"\n[data]\npath = \"/d.csv\"\n[[methods]]\nplugin = \"sparse_lora\"\n[methods.params]\ninit = \"lora\"\n";
  Config c = load_config(path);
  CATCH_CHECK_THROWS_WITH(check_methods(c, test::registry()), Catch::Contains("run.toml:") && Catch::Contains("cannot score a LoRA that starts silent"));
}
