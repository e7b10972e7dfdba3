// A starting point for a Tessera method: a learned per-feature output scale on every
// targeted linear site, y = (W x + b) ∘ l with l initialised to ones (the (IA)3 form).
// Rename the id, write your method's math in attach(), keep the rest.
#include <tessera/plugin.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

namespace {

class MyMethod final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    return {{{"init", tessera::ParamType::Float, 1.0, "initial value of every scale", 0.0, std::nullopt, {}}}};
  }

  void attach(tessera::AttachContext& ctx) override {
    const auto dtype = ctx.model.info().options.dtype().toScalarType();  // the compute dtype (bf16 or f32)
    for (auto* site : ctx.model.match_linear(ctx.targets)) {
      auto scale = at::full({site->out_features()}, ctx.params.number("init"), ctx.model.info().param_options).set_requires_grad(true);
      site->add_output_scale(ctx.owner, [scale, dtype] { return scale.to(dtype); });
      scales_[site->hf_path() + ".scale"] = scale;
    }
    if (scales_.empty()) throw std::runtime_error("no linear site matches the targets");
  }
  // No detach(): the host removes every intervention the instance installed.

  tessera::NamedTensors trainable() override { return scales_; }
  tessera::NamedTensors state() override { return scales_; }
  void load_state(const tessera::NamedTensors& t) override {
    at::NoGradGuard no_grad;
    for (auto& [k, v] : scales_) v.copy_(t.at(k));
  }
  std::string adapter_config_json() const override { return R"({"peft_type": "MY_METHOD"})"; }

 private:
  tessera::NamedTensors scales_;
};

}  // namespace

TESSERA_PLUGIN(MyMethod, "my-method", "0.1.0", "additive", "learned output scales (template)", "your paper here")
