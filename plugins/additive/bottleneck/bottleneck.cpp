// Bottleneck adapters: small MLPs inside each transformer block (Houlsby et al. 2019,
// "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751; Pfeiffer et al. 2021,
// "AdapterFusion", arXiv:2005.00247; He et al. 2022, "Towards a Unified View of
// Parameter-Efficient Transfer Learning", arXiv:2110.04366), placed and wired as
// AdapterHub's `adapters` package does (its presets seq_bn, double_seq_bn, par_bn,
// scaled_par_bn). The math and every key: README.md beside this.
//
//   A(z) = s · (W_up act(W_down z + b_down) + b_up)          W_down: (r, H), W_up: (H, r)
//   sequential:  z = N(h + x) (Pfeiffer) or h (Houlsby);  h' = A(z) + (h, or z)
//   parallel:    h' = h + A(x)
//
// h: the sublayer's output before its residual add; x: the residual stream it is added to;
// N: the block's own norm after that add (identity in pre-norm blocks). The block then
// computes N(x + h') as always (SDK 2.3's residual module).
#include "../adapterhub_bn.h"

#include <tessera/plugin.h>

#include <ATen/ATen.h>

#include <map>

namespace {

using tessera::Tensor;
using tessera::adapterhub_bn::Preset;

// The projections are dense layers, nn.Linear's weight (out, in) and bias (out).
class Bottleneck final : public tessera::adapterhub_bn::Wiring {
 public:
  tessera::MethodSchema describe() const override {
    std::vector<tessera::ParamSpec> keys = tessera::adapterhub_bn::bottleneck_preset_keys();
    for (auto& k : wiring_keys()) keys.push_back(std::move(k));
    for (auto& k : invertible_keys()) keys.push_back(std::move(k));
    return {keys};
  }

 protected:
  const std::map<std::string, Preset>& presets() const override { return tessera::adapterhub_bn::bottleneck_presets(); }
  const char* kind() const override { return "bottleneck adapter"; }
  bool offers_invertible() const override { return true; }

  void read_projections(const tessera::Params& p, std::int64_t) override {
    if (!p.text("init_weights").empty()) init_ = p.text("init_weights");
  }

  tessera::NamedTensors make(std::int64_t in, std::int64_t out, const std::string& position) override {
    auto p = tessera::adapterhub_bn::dense_projection(in, out, position, init_, model_->info().param_options);
    for (auto& [n, t] : p) t.set_requires_grad(true);
    return p;
  }

  tessera::adapterhub_bn::Projection project(const tessera::NamedTensors& p, const std::string&, c10::ScalarType dtype) const override {
    const Tensor w = p.at("weight"), b = p.at("bias");
    return [=](const Tensor& x) { return at::linear(x, w.to(dtype), b.to(dtype)); };
  }
};

}  // namespace

TESSERA_PLUGIN(Bottleneck, "bottleneck", "1.0.0", "additive",
               "Bottleneck adapters in AdapterHub's placements: sequential (Houlsby, Pfeiffer) and parallel (He et al.)",
               "Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2021, arXiv:2005.00247; He et al. 2022, arXiv:2110.04366")
