// Site kinds: layer (taps) and output (SDK 2.1). Each targeted layer's output is read by a
// tap (empty targets: every layer); the backbone's final hidden states become
// h + Σ_l w_l · h_l, with one trainable weight per layer starting at zero — the shape of a
// side network that reads the layers and writes the output (LST), reduced to a mixture.
// Taps see the states detached: gradients reach w, not the base. An example of the SDK,
// not the shipped ladder side-tuning.
#include <tessera/plugin.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <memory>
#include <vector>

namespace {

class LayerMix final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override { return {}; }

  void attach(tessera::AttachContext& ctx) override {
    auto* out = ctx.model.output_site();
    if (out == nullptr) throw std::runtime_error("this model has no output site");
    const auto layers = ctx.model.match_layers(ctx.targets.empty() ? std::vector<std::string>{"*layers.*"} : ctx.targets);
    if (layers.empty()) throw std::runtime_error("no layer site matches the targets");
    w_ = at::zeros({static_cast<std::int64_t>(layers.size())}, ctx.model.info().param_options).set_requires_grad(true);
    seen_ = std::make_shared<std::vector<tessera::Tensor>>(layers.size());
    for (std::size_t i = 0; i < layers.size(); ++i)
      layers[i]->add_tap(ctx.owner, [seen = seen_, i](const tessera::Tensor& h) { (*seen)[i] = h; });  // (B, T, H)
    out->add_transform(ctx.owner, [seen = seen_, w = w_](const tessera::Tensor& h) {  // (B, T, H) -> (B, T, H)
      tessera::Tensor mix = h;
      for (std::size_t i = 0; i < seen->size(); ++i)
        if ((*seen)[i].defined() && (*seen)[i].sizes() == h.sizes()) mix = mix + w[static_cast<std::int64_t>(i)].to(h.scalar_type()) * (*seen)[i];
      return mix;
    });
  }

  tessera::NamedTensors trainable() override { return {{"example_layer_mix.weight", w_}}; }
  tessera::NamedTensors state() override { return {{"example_layer_mix.weight", w_}}; }
  void load_state(const tessera::NamedTensors& t) override {
    at::NoGradGuard no_grad;
    w_.copy_(t.at("example_layer_mix.weight"));
  }
  std::string adapter_config_json() const override { return R"({"peft_type": "EXAMPLE_LAYER_MIX"})"; }

 private:
  tessera::Tensor w_;  // (layers)
  std::shared_ptr<std::vector<tessera::Tensor>> seen_;  // the taps' last states, one per layer
};

}  // namespace

TESSERA_PLUGIN(LayerMix, "example-layer-mix", "0.1.0", "additive", "example: the final states plus a learned mixture of the layers' (layer taps, output site)",
               "none (an SDK example, docs/writing-a-plugin.md)")
