// A test plugin with known math: one intervention of the kind its `kind` parameter
// names, scaled by `value`, on every site its targets match. The tests compose several
// instances and compare with the closed-form result of the documented site order.
//
// Built twice: against the SDK of the tree (id "probe") and against the frozen copy of
// the SDK 2.0 headers under tests/sdk/abi-2.0 (id "probe-2.0"), which every later host
// must load and run, and a third time against this tree's headers declaring 2.0
// (TESSERA_TARGET_ABI_MINOR=0, id "probe-target-2.0"). Kinds added by a later minor go
// under `#if TESSERA_TARGET_ABI_MINOR >= n`.
#include <tessera/extensions.h>
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
          "score_hook", "prompt", "tap", "router", "throw", "throw_forward", "nan_loss"
#if TESSERA_TARGET_ABI_MINOR >= 1
          , "output", "embed_tap", "weight_transform", "token_wise_sequential", "token_wise_parallel", "life", "forward_again", "tokenize", "context", "input_prefix", "router_prefix"
#endif
#if TESSERA_TARGET_ABI_MINOR >= 2
          , "nf4_storage"
#endif
#if TESSERA_TARGET_ABI_MINOR >= 3
          , "residual"
#endif
#if TESSERA_TARGET_ABI_MINOR >= 7
          , "embed_transform"
#endif
         }},
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
            seen_["score_shape"] = at::tensor(scores.sizes().vec(), at::kLong);
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
#if TESSERA_TARGET_ABI_MINOR >= 1
    } else if (kind == "token_wise_sequential" || kind == "token_wise_parallel") {  // h ↦ h · value, + x · value
      for (auto* s : model.match_sublayers(ctx.targets)) {
        if (kind == "token_wise_sequential") s->add_token_wise_sequential(owner, [=](const Tensor& h) { return h * v; });
        else s->add_token_wise_parallel(owner, [=](const Tensor& x) { return x * v; });
      }
#if TESSERA_TARGET_ABI_MINOR >= 3
    } else if (kind == "residual") {  // h ↦ h + value · r: in BERT, where r is what the block read, a parallel x · value
      for (auto* s : model.match_sublayers(ctx.targets))
        s->add_token_wise_residual(owner, [=](const Tensor& h, const Tensor& r, const tessera::TensorMap&) { return h + r * v; });
#endif
    } else if (kind == "life") {  // a branch x·(late + grown): late made in prepare(), grown at step 1
      params_ = ctx.model.info().param_options;
      training_ = tessera::host_extension<tessera_host_training_v1>(ctx.model, TESSERA_EXT_HOST_TRAINING, 1);
      instance_ = ctx.instance;
      for (auto* s : model.match_linear(ctx.targets)) {
        const auto n = std::min(s->in_features(), s->out_features());
        s->add_branch(owner, [this, n](const Tensor& x) {
          Tensor w = at::zeros({1}, x.options());
          for (const char* k : {"late", "grown"})
            if (trainable_.count(k)) w = w + trainable_.at(k).to(x.scalar_type());
          return x.narrow(-1, 0, n) * w;
        });
      }
    } else if (kind == "router_prefix") {  // every matched layer keeps the first `length` tokens of each row
      for (auto* l : model.match_layers(ctx.targets))
        l->add_router(owner, [=](const Tensor& h) {
          return (at::arange(h.size(1), h.options().dtype(at::kLong)) < len).to(h.scalar_type()).expand({h.size(0), h.size(1)});
        });
    } else if (kind == "input_prefix") {  // as "prefix", computed from the attention's input (whose shape it keeps)
      for (auto* s : model.match_attention(ctx.targets)) {
        const auto heads = s->num_heads(), dim = s->head_dim();
        s->add_input_prefix(owner, len, [=](const Tensor& x) {
          seen_["input_shape"] = at::tensor(x.sizes().vec(), at::kLong);
          const auto batch = x.size(0);
          return std::make_pair(at::zeros({batch, heads, len, dim}, x.options()), at::full({batch, heads, len, dim}, v, x.options()));
        });
      }
    } else if (kind == "context") {  // a branch adding nothing that keeps the forward context it reads
      tessera::ModelView* m = &ctx.model;
      for (auto* s : model.match_linear(ctx.targets)) {
        const auto n = std::min(s->in_features(), s->out_features());
        s->add_branch(owner, [this, m, n](const Tensor& x) {
          seen_["mask"] = m->attention_mask();
          if (m->token_samples().defined()) seen_["samples"] = m->token_samples();
          std::vector<std::int64_t> is_b;  // the "task" tag of each sample: 1 for "b"
          for (const auto& t : m->sample_tags("task")) is_b.push_back(t == "b");
          seen_["task_is_b"] = at::tensor(is_b, at::kLong);
          return x.narrow(-1, 0, n) * 0;
        });
      }
    } else if (kind == "forward_again") {
      training_ = tessera::host_extension<tessera_host_training_v1>(ctx.model, TESSERA_EXT_HOST_TRAINING, 1);
      if (training_ == nullptr) throw std::runtime_error("no tessera.host.training");
#if TESSERA_TARGET_ABI_MINOR >= 6
      step_ext_ = tessera::host_extension<tessera_host_training_v2>(ctx.model, TESSERA_EXT_HOST_TRAINING, 2);
#endif
    } else if (kind == "tokenize") {  // the ids of a fixed text, kept as state "ids"
      const auto* tok = tessera::host_extension<tessera_host_tokenizer_v1>(ctx.model, TESSERA_EXT_HOST_TOKENIZER, 1);
      if (tok == nullptr) throw std::runtime_error("no tessera.host.tokenizer");
      const auto ids = tok->encode(tok->host, "a great movie");
      seen_["ids"] = at::tensor(ids, at::kLong);
    } else if (kind == "weight_transform") {  // W ↦ W · value, after every weight delta
      for (auto* s : model.match_linear(ctx.targets)) s->add_weight_transform(owner, [=](const Tensor& w) { return w * v; });
    } else if (kind == "output") {  // h ↦ h · value on the backbone's final hidden states
      model.output_site()->add_transform(owner, [=](const Tensor& h) { return h * v; });
    } else if (kind == "embed_tap") {  // keeps what the first layer receives, as state "tapped"
      model.embedding_site()->add_tap(owner, [this](const Tensor& x0) { seen_["tapped"] = x0; });
#endif
#if TESSERA_TARGET_ABI_MINOR >= 7
    } else if (kind == "embed_transform") {  // the first layer's input x0 ↦ x0 · value
      model.embedding_site()->add_transform(owner, [=](const Tensor& x0) { return x0 * v; });
#endif
#if TESSERA_TARGET_ABI_MINOR >= 2
    } else if (kind == "nf4_storage") {  // asked for NF4 storage of its targets' weights (tessera.method.storage)
      std::int64_t nf4 = 0;
      for (auto* l : model.match_linear(ctx.targets)) nf4 += std::string(l->weight().storage()) == "nf4";
      seen_["nf4_sites"] = at::full({1}, nf4, at::kLong);
#endif
    } else if (kind == "tap" || kind == "router") {
      for (auto* l : model.match_layers(ctx.targets)) {
        if (kind == "tap") l->add_tap(owner, [this](const Tensor& h) { seen_["tapped"] = h; });
        else l->add_router(owner, [=](const Tensor& h) { return at::full({h.size(0), h.size(1)}, v, h.options()); });
      }
    }
  }

  // No detach(): the host removes what the instance installed.

  void prepare(const tessera::Calibration&) override {
    if (kind_ == "life") trainable_["late"] = at::zeros({1}, params_).set_requires_grad(true);
  }
  void on_step(const tessera::StepInfo& info) override {
    step_ = info.step;
#if TESSERA_TARGET_ABI_MINOR >= 1
    if (kind_ == "life" && info.step == 1 && training_ != nullptr) {
      trainable_["grown"] = at::zeros({1}, params_).set_requires_grad(true);
      training_->trainable_changed(training_->host, instance_.c_str());
    }
#endif
  }
  Tensor extra_loss() override {
#if TESSERA_TARGET_ABI_MINOR >= 1
    if (kind_ == "forward_again") {  // the pass again; its loss and logits kept, no extra term
      Tensor loss, logits;
      training_->forward_again(training_->host, &loss, &logits);
      seen_["again_loss"] = loss.detach();
      if (logits.defined()) seen_["again_logits"] = logits.detach();
#if TESSERA_TARGET_ABI_MINOR >= 6
      if (step_ext_ != nullptr) {  // the step's own pass (version 2): kept with whether it has its graph
        step_ext_->step_output(step_ext_->host, &loss, &logits);
        seen_["step_loss"] = loss.detach();
        seen_["step_logits"] = logits.detach();
        seen_["step_has_graph"] = at::full({}, loss.requires_grad() && logits.requires_grad() ? 1.0 : 0.0);
      }
#endif
      return {};
    }
#endif
    if (nan_from_ < 0 || step_ < nan_from_) return {};
    return at::full({}, std::numeric_limits<double>::quiet_NaN());
  }

  tessera::NamedTensors trainable() override { return trainable_; }
  // The last tapped hidden state, so a test can read what the tap saw.
  // What the probe saw (a tap's tensor, tokenized ids, a second pass), and its trainable
  // tensors, so that a test can read them.
  tessera::NamedTensors state() override {
    tessera::NamedTensors out = seen_;
    out.insert(trainable_.begin(), trainable_.end());
    return out;
  }
  void load_state(const tessera::NamedTensors&) override {}
  std::string adapter_config_json() const override { return "{\"peft_type\": \"PROBE\"}"; }

  // A method-side extension with known content, for the host's extension query.
  const void* extension(const char* id) const override {
#if TESSERA_TARGET_ABI_MINOR >= 2
    if (std::string(id) == TESSERA_EXT_METHOD_STORAGE) return &storage_;
#endif
#if TESSERA_TARGET_ABI_MINOR >= 5
    if (std::string(id) == TESSERA_EXT_METHOD_AFTER_STEP) return &after_step_;
#endif
    return std::string(id) == "tessera.test.probe" ? &ext_ : nullptr;
  }

 private:
#if TESSERA_TARGET_ABI_MINOR >= 2
  // kind = "nf4_storage": NF4 for the weights of the linear sites its targets match.
  static const char* storage_for(void*, const tessera::Params& params, const std::vector<std::string>& targets, const char* site, const char* hf) {
    if (params.text("kind") != "nf4_storage") return nullptr;
    return tessera::matches_any(targets, site, hf) ? "nf4" : nullptr;
  }
  tessera_method_storage_v1 storage_{{sizeof(tessera_method_storage_v1), 1}, nullptr, &storage_for};
#endif
#if TESSERA_TARGET_ABI_MINOR >= 5
  // kind = "life": each call's step, and "late" as the call sees it (updated, its gradient held).
  static void after_step(void* self, const tessera::StepInfo* info) {
    auto& p = *static_cast<Probe*>(self);
    if (p.kind_ != "life") return;
    const Tensor& late = p.trainable_.at("late");
    const Tensor row = at::stack({at::full({}, static_cast<double>(info->step), at::kDouble), late.detach().to(at::kCPU, at::kDouble).reshape({}),
                                  at::full({}, late.grad().defined() ? 1.0 : 0.0, at::kDouble)});
    auto& seen = p.seen_["after_steps"];
    seen = seen.defined() ? at::cat({seen, row.unsqueeze(0)}) : row.unsqueeze(0);
  }
  tessera_method_after_step_v1 after_step_{{sizeof(tessera_method_after_step_v1), 1}, this, &after_step};
#endif
  struct ProbeExtension {  // "tessera.test.probe", version 1
    tessera_extension_header header{sizeof(ProbeExtension), 1};
    const char* kind = "";
  };
  std::string kind_;
  ProbeExtension ext_;
  std::int64_t nan_from_ = -1, step_ = 0;
  tessera::NamedTensors seen_, trainable_;
  std::string instance_;
  c10::TensorOptions params_;
#if TESSERA_TARGET_ABI_MINOR >= 1
  const tessera_host_training_v1* training_ = nullptr;
#if TESSERA_TARGET_ABI_MINOR >= 6
  const tessera_host_training_v2* step_ext_ = nullptr;
#endif
#endif
};

}  // namespace

#ifndef PROBE_ID
#define PROBE_ID "probe"
#endif
TESSERA_PLUGIN(Probe, PROBE_ID, "0.1.0", "additive", "test plugin: one intervention of known math", "none (test)")
