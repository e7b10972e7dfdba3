// A test plugin with known math: one intervention of the kind its `kind` parameter
// names, scaled by `value`, on every site its targets match. The tests compose several
// instances and compare with the closed-form result of the documented site order.
//
// Built twice: against the SDK of the tree (id "probe") and against the frozen copy of
// the SDK 2.0 headers under tests/sdk/abi-2.0 (id "probe-2.0"), which every later host
// must load and run. Kinds added by a later minor go under `#if TESSERA_SDK_ABI_MINOR >= n`.
#include <tessera/plugin.h>

#include <ATen/ATen.h>

#include <limits>
#include <stdexcept>

namespace {

using tessera::Tensor;

class Probe final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    return {{
        {"kind", ParamType::String, std::string("branch"), "which intervention to install", std::nullopt, std::nullopt,
         {"weight_delta", "input_scale", "output_scale", "branch", "param_delta", "sequential", "parallel", "gate", "prefix",
          "score_hook", "prompt", "tap", "router", "throw", "throw_forward", "nan_loss"}},
        {"value", ParamType::Float, 1.0, "the constant of the intervention", std::nullopt, std::nullopt, {}},
        {"length", ParamType::Int, std::int64_t{2}, "prompt or prefix length; nan_loss: the 0-based step from which the loss is nan", 1, 64, {}},
    }};
  }

  void attach(tessera::AttachContext& ctx) override {
    const tessera::Owner& owner = ctx.owner;
    kind_ = ctx.params.text("kind");
    ext_.kind = kind_.c_str();
    const std::string& kind = kind_;
    const double v = ctx.params.number("value");
    const std::int64_t len = ctx.params.integer("length");
    auto& model = ctx.model;
    if (kind == "throw") throw std::runtime_error("probe refuses to attach");
    if (kind == "nan_loss") nan_from_ = len;  // extra_loss() turns the loss nan from that step on
    if (kind == "throw_forward")  // a branch that fails in the forward pass
      for (auto* s : model.match_linear(ctx.targets))
        s->add_branch(owner, [](const Tensor&) -> Tensor { throw std::runtime_error("probe fails in forward"); });
    if (kind == "weight_delta" || kind == "input_scale" || kind == "output_scale" || kind == "branch") {
      for (auto* s : model.match_linear(ctx.targets)) {
        const auto out = s->out_features(), in = s->in_features();
        const auto opts = s->weight().base().options();
        if (kind == "weight_delta") s->add_weight_delta(owner, [=] { return at::full({out, in}, v, opts); });
        if (kind == "input_scale") s->add_input_scale(owner, [=] { return at::full({in}, v, opts); });
        if (kind == "output_scale") s->add_output_scale(owner, [=] { return at::full({out}, v, opts); });
        if (kind == "branch") s->add_branch(owner, [=](const Tensor& x) { return x.narrow(-1, 0, std::min(in, out)) * v; });
      }
    } else if (kind == "param_delta") {
      for (auto* p : model.match_parameters(ctx.targets)) {
        const auto opts = p->base().options();
        const auto shape = p->base().sizes().vec();
        p->add_delta(owner, [=] { return at::full(shape, v, opts); });
      }
    } else if (kind == "sequential" || kind == "parallel" || kind == "gate") {
      for (auto* s : model.match_sublayers(ctx.targets)) {
        if (kind == "sequential") s->add_sequential(owner, [=](const Tensor& h) { return h * v; });
        if (kind == "parallel") s->add_parallel(owner, [=](const Tensor& x) { return x * v; });
        if (kind == "gate") s->add_gate(owner, [=](const Tensor& x) { return at::full({1}, v, x.options()); });
      }
    } else if (kind == "prefix" || kind == "score_hook") {
      for (auto* s : model.match_attention(ctx.targets)) {
        const auto heads = s->num_heads(), dim = s->head_dim();
        const auto opts = model.info().options;
        if (kind == "prefix")
          s->add_prefix(owner, [=](std::int64_t batch) {
            return std::make_pair(at::zeros({batch, heads, len, dim}, opts), at::full({batch, heads, len, dim}, v, opts));
          });
        else  // adds `value` to the scores of the first `length` keys
          s->add_score_hook(owner, [=](const Tensor& scores) {
            Tensor add = at::zeros({scores.size(-1)}, scores.options());
            add.narrow(0, 0, len).fill_(v);
            return scores + add;
          });
      }
    } else if (kind == "prompt") {
      auto* e = model.embedding_site();
      const auto H = e->hidden_size();
      const auto opts = model.info().options;
      e->add_prompt(owner, [=](std::int64_t batch) { return at::full({batch, len, H}, v, opts); });
    } else if (kind == "tap" || kind == "router") {
      for (auto* l : model.match_layers(ctx.targets)) {
        if (kind == "tap") l->add_tap(owner, [this](const Tensor& h) { tapped_ = h; });
        else l->add_router(owner, [=](const Tensor& h) { return at::full({h.size(0), h.size(1)}, v, h.options()); });
      }
    }
  }

  // No detach(): the host removes what the instance installed.

  void on_step(const tessera::StepInfo& info) override { step_ = info.step; }
  Tensor extra_loss() override {
    if (nan_from_ < 0 || step_ < nan_from_) return {};
    return at::full({}, std::numeric_limits<double>::quiet_NaN());
  }

  tessera::NamedTensors trainable() override { return {}; }
  // The last tapped hidden state, so a test can read what the tap saw.
  tessera::NamedTensors state() override { return tapped_.defined() ? tessera::NamedTensors{{"tapped", tapped_}} : tessera::NamedTensors{}; }
  void load_state(const tessera::NamedTensors&) override {}
  std::string adapter_config_json() const override { return "{\"peft_type\": \"PROBE\"}"; }

  // A method-side extension with known content, for the host's extension query.
  const void* extension(const char* id) const override {
    return std::string(id) == "tessera.test.probe" ? &ext_ : nullptr;
  }

 private:
  struct ProbeExtension {  // "tessera.test.probe", version 1
    tessera_extension_header header{sizeof(ProbeExtension), 1};
    const char* kind = "";
  };
  std::string kind_;
  ProbeExtension ext_;
  std::int64_t nan_from_ = -1, step_ = 0;
  Tensor tapped_;
};

}  // namespace

#ifndef PROBE_ID
#define PROBE_ID "probe"
#endif
TESSERA_PLUGIN(Probe, PROBE_ID, "0.1.0", "additive", "test plugin: one intervention of known math", "none (test)")
