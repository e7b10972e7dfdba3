// Site kind: sublayer (token-wise, SDK 2.1). h ↦ h + up(relu(down(h))) after each targeted
// sublayer (empty targets: every MLP), up zero-initialised so training starts from the
// base model. An example of the SDK, not the shipped bottleneck adapters.
#include <tessera/plugin.h>
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <cmath>

namespace {
class TokenAdapter final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    return {{{"r", tessera::ParamType::Int, std::int64_t{16}, "bottleneck width", 1.0, std::nullopt, {}}}};
  }

  void attach(tessera::AttachContext& ctx) override {
    std::vector<std::string> targets = ctx.targets;
    if (targets.empty()) targets = {"mlp"};
    const auto r = ctx.params.integer("r");
    const auto& opt = ctx.model.info().param_options;
    for (auto* site : ctx.model.match_sublayers(targets)) {
      const auto H = site->hidden_size();
      auto down = at::empty({r, H}, opt).uniform_(-1.0 / std::sqrt(double(H)), 1.0 / std::sqrt(double(H))).set_requires_grad(true);
      auto up = at::zeros({H, r}, opt).set_requires_grad(true);
      site->add_token_wise_sequential(ctx.owner, [down, up](const tessera::Tensor& h) {
        auto d = down.to(h.scalar_type());
        auto u = up.to(h.scalar_type());
        return h + at::linear(at::relu(at::linear(h, d)), u);
      });
      const auto key = "base_model.model." + site->hf_path() + ".example_adapter.";
      tensors_[key + "down.weight"] = down;
      tensors_[key + "up.weight"] = up;
    }
    if (tensors_.empty()) throw std::runtime_error("no sublayer site matches the targets");
  }

  tessera::NamedTensors trainable() override { return tensors_; }
  tessera::NamedTensors state() override { return tensors_; }
  void load_state(const tessera::NamedTensors& t) override {
    at::NoGradGuard no_grad;
    for (auto& [k, v] : tensors_) v.copy_(t.at(k));
  }
  std::string adapter_config_json() const override { return R"({"peft_type": "EXAMPLE_TOKEN_ADAPTER"})"; }

 private:
  tessera::NamedTensors tensors_;
};
}  // namespace

TESSERA_PLUGIN(TokenAdapter, "example-token-adapter", "0.1.0", "additive", "example: a per-token bottleneck after sublayers (sublayer site)", "none (an SDK example, docs/writing-a-plugin.md)")
