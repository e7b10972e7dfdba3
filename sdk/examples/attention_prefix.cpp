// Site kind: attention. P trainable key and value vectors in front of every targeted
// attention's keys and values (AttentionSite::add_prefix; empty targets: every layer's
// self-attention), the mask extended by the host. Laid out per key/value head, as
// num_heads() counts them. An example of the SDK, not the shipped prefix tuning.
#include <tessera/plugin.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

namespace {

class AttentionPrefix final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    return {{{"length", tessera::ParamType::Int, std::int64_t{4}, "prefix length P", 1.0, 512.0, {}}}};
  }

  void attach(tessera::AttachContext& ctx) override {
    const auto P = ctx.params.integer("length");
    const auto targets = ctx.targets.empty() ? std::vector<std::string>{"re:(.*\\.)?layers\\.\\d+\\.attn"} : ctx.targets;
    for (auto* site : ctx.model.match_attention(targets)) {
      // (heads, P, head_dim) masters in f32; small values, so training starts near the base.
      auto k = (at::randn({site->num_heads(), P, site->head_dim()}, ctx.model.info().param_options) * 0.02).set_requires_grad(true);
      auto v = (at::randn({site->num_heads(), P, site->head_dim()}, ctx.model.info().param_options) * 0.02).set_requires_grad(true);
      const auto dtype = ctx.model.info().options.dtype();
      site->add_prefix(ctx.owner, [k, v, dtype](std::int64_t batch) {  // -> (B, heads, P, head_dim) each
        return std::make_pair(k.to(dtype).unsqueeze(0).expand({batch, -1, -1, -1}), v.to(dtype).unsqueeze(0).expand({batch, -1, -1, -1}));
      });
      tensors_["base_model.model." + site->hf_path() + ".example_prefix.key"] = k;
      tensors_["base_model.model." + site->hf_path() + ".example_prefix.value"] = v;
    }
    if (tensors_.empty()) throw std::runtime_error("no attention site matches the targets");
  }

  tessera::NamedTensors trainable() override { return tensors_; }
  tessera::NamedTensors state() override { return tensors_; }
  void load_state(const tessera::NamedTensors& t) override {
    at::NoGradGuard no_grad;
    for (auto& [key, v] : tensors_) v.copy_(t.at(key));
  }
  std::string adapter_config_json() const override { return R"({"peft_type": "EXAMPLE_ATTENTION_PREFIX"})"; }

 private:
  tessera::NamedTensors tensors_;
};

}  // namespace

TESSERA_PLUGIN(AttentionPrefix, "example-attention-prefix", "0.1.0", "additive", "example: trainable keys and values before each attention's (attention site)",
               "none (an SDK example, docs/writing-a-plugin.md)")
