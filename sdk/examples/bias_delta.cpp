// Site kind: parameter. A trainable, zero-initialised delta on every targeted bias
// (ParameterSite::add_delta); empty targets: every bias. An example of the SDK, not the
// shipped BitFit method.
#include <tessera/plugin.h>
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

namespace {
class BiasDelta final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override { return {}; }

  void attach(tessera::AttachContext& ctx) override {
    std::vector<std::string> targets = ctx.targets;
    if (targets.empty()) targets = {"re:.*\\.bias"};
    for (auto* site : ctx.model.match_parameters(targets)) {
      const auto& n = site->name();
      if (n.size() < 5 || n.compare(n.size() - 5, 5, ".bias") != 0) continue;
      auto delta = at::zeros(site->base().sizes(), ctx.model.info().param_options).set_requires_grad(true);
      site->add_delta(ctx.owner, [delta, site] { return delta.to(site->base().scalar_type()); });
      deltas_["base_model.model." + site->hf_name()] = delta;
    }
    if (deltas_.empty()) throw std::runtime_error("no bias parameter matches the targets");
  }

  tessera::NamedTensors trainable() override { return deltas_; }
  tessera::NamedTensors state() override { return deltas_; }
  void load_state(const tessera::NamedTensors& t) override {
    at::NoGradGuard no_grad;
    for (auto& [k, v] : deltas_) v.copy_(t.at(k));
  }
  std::string adapter_config_json() const override { return R"({"peft_type": "EXAMPLE_BIAS_DELTA"})"; }

 private:
  tessera::NamedTensors deltas_;
};
}  // namespace

TESSERA_PLUGIN(BiasDelta, "example-bias-delta", "0.1.0", "partial", "example: trainable deltas on biases (parameter site)", "none (an SDK example, docs/writing-a-plugin.md)")
