// LoKr: Kronecker-product update (Yeh et al. 2023, "Navigating Text-To-Image Customization:
// From LyCORIS Fine-Tuning to Model Evaluation", arXiv:2309.14859; LyCORIS's LoKr, as PEFT has
// it), with KronA (Edalati et al. 2022, arXiv:2212.10650) as its case of two full factors. The
// math and every key: README.md beside this.
//
//   out = a·b, in = c·d                (a, b) = split(out), (c, d) = split(in), PEFT's split
//   ΔW  = s · W1 ⊗ W2                  W1: (a, c); W2: (b, d); s = alpha / r
//   W1  = W1a W1b when decompose_both and 2r < max(a, c)     W1a: (a, r), W1b: (r, c)
//   W2  = W2a W2b when 2r < max(b, d)                        W2a: (b, r), W2b: (r, d)
//   y   = (W + ΔW) x + b
//
// A Kronecker product keeps the rank of W1 times that of W2 from a·c + b·d numbers, so a
// small pair reaches a full-rank update. As LoHa's, the update is formed as a weight
// (out, in), as PEFT forms it, and joins W for the site's one product. Training-time options
// as PEFT's: rank dropout (rows of ΔW dropped, optionally rescaled by the kept share) and
// module dropout (the whole update skipped for a step).
#include <tessera/plugin.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <utility>

namespace {

using tessera::Tensor;

// PEFT's (LyCORIS's) split of a dimension into two factors. A positive factor that divides the
// dimension is taken as it stands, (factor, dim / factor), in that order; otherwise the divisors
// are walked upward from 1 while the first stays below its cofactor and does not pass the
// factor (-1: no bound, which ends at the pair nearest √dim), the smaller returned first.
std::pair<std::int64_t, std::int64_t> split(std::int64_t dim, std::int64_t factor) {
  if (factor > 0 && dim % factor == 0) return {factor, dim / factor};
  const std::int64_t bound = factor == -1 ? dim : factor;
  std::int64_t m = 1, n = dim;
  while (m < n) {
    std::int64_t next = m + 1;
    while (dim % next != 0) ++next;
    if (next > bound) break;
    m = next, n = dim / next;
  }
  return {std::min(m, n), std::max(m, n)};
}

struct Kron {
  tessera::LinearSite* site;
  Tensor w1, w1a, w1b;  // w1 (a, c), or w1a (a, r) and w1b (r, c)
  Tensor w2, w2a, w2b;  // w2 (b, d), or w2a (b, r) and w2b (r, d)
  double scaling;
  Tensor left() const { return w1.defined() ? w1 : at::matmul(w1a, w1b); }    // (a, c)
  Tensor right() const { return w2.defined() ? w2 : at::matmul(w2a, w2b); }   // (b, d)
  Tensor delta() const { return at::kron(left(), right()) * scaling; }         // (a·b, c·d) = (out, in)
  at::TensorOptions options() const { return (w1.defined() ? w1 : w1a).options(); }
  Tensor folded;  // while merged
};

class LoKr final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    return {{
        {"r", ParamType::Int, std::int64_t{8}, "rank of a factor kept as a low-rank pair (W2 when 2r < max of its sides; W1 too under decompose_both); s = alpha / r", 1, 65536, {}},
        {"alpha", ParamType::Float, 8.0, "scale numerator: s = alpha / r", 0, std::nullopt, {}},
        {"decompose_both", ParamType::Bool, false, "W1 too becomes a rank-r pair when 2r < max of its sides (else W1 is always full)", {}, {}, {}},
        {"decompose_factor", ParamType::Int, std::int64_t{-1}, "out and in split as factor · (dim / factor); -1: the divisor pair nearest √dim. Must divide every targeted dimension", -1, std::nullopt, {}},
        {"rank_dropout", ParamType::Float, 0.0, "training: each output row of ΔW dropped with this probability", 0, 0.999, {}},
        {"rank_dropout_scale", ParamType::Bool, false, "training: the rows rank dropout keeps divided by the kept share", {}, {}, {}},
        {"module_dropout", ParamType::Float, 0.0, "training: the whole update skipped for a forward with this probability", 0, 1.0, {}},
        {"init_weights", ParamType::String, std::string("true"),
         "\"true\": W1 (or W1a) zero, the rest Kaiming-uniform (the update starts at 0); \"lycoris\": W2 (or W2b) zero instead; "
         "\"false\": all random (a nonzero start, for tests)",
         {}, {}, {"true", "false", "lycoris"}},
        {"rank_pattern", ParamType::NumberTable, tessera::NumberTable{}, "PEFT's per-target ranks: not supported, refused when given", {}, {}, {}},
        {"alpha_pattern", ParamType::NumberTable, tessera::NumberTable{}, "PEFT's per-target alphas: not supported, refused when given", {}, {}, {}},
    }};
  }

  void validate(const tessera::Params& p) const override {
    for (const char* k : {"rank_pattern", "alpha_pattern"})
      if (!p.get<tessera::NumberTable>(k).empty()) throw tessera::ParamError(k, std::string("LoKr here takes one r and one alpha: ") + k + " is not supported");
    // PEFT splits every dimension as 1 · dim under 0: an update of one scalar times a full W2.
    if (p.integer("decompose_factor") == 0) throw tessera::ParamError("decompose_factor", "decompose_factor must be -1 or a positive divisor of the targeted dimensions, not 0");
  }

  void attach(tessera::AttachContext& ctx) override {
    validate(ctx.params);  // also for an adapter imported from PEFT's files, which skip validate()
    owner_ = &ctx.owner;
    compute_ = ctx.model.info().options.dtype().toScalarType();
    model_ = &ctx.model;
    params_ = ctx.params;
    const auto sites = ctx.model.match_linear(ctx.targets);
    if (sites.empty()) throw std::runtime_error("no linear site of this " + ctx.model.info().architecture + " model matches the targets");
    const auto r = ctx.params.integer("r");
    const auto factor = ctx.params.integer("decompose_factor");
    const bool decompose_both = ctx.params.flag("decompose_both");
    const std::string& init = ctx.params.text("init_weights");
    const double scaling = ctx.params.number("alpha") / static_cast<double>(r);
    // Every site's split first, so a factor that fits one dimension but not another is refused
    // before any tensor exists.
    auto split_checked = [&](const tessera::LinearSite* s, std::int64_t dim, const char* side) {
      if (factor > 0 && dim % factor != 0) {
        // PEFT would fall back to another divisor pair without a word; a quiet change of the
        // shapes asked for is refused here, and the pair PEFT would take is named.
        const auto [m, n] = split(dim, factor);
        throw tessera::ParamError("decompose_factor", "decompose_factor = " + std::to_string(factor) + " does not divide " + side + " = " +
                                                          std::to_string(dim) + " of " + s->name() + " (" + s->hf_path() + "); PEFT would split it as " +
                                                          std::to_string(m) + " x " + std::to_string(n) + " instead. Give a divisor of every targeted dimension, or -1");
      }
      return split(dim, factor);
    };
    std::vector<std::array<std::int64_t, 4>> shapes;  // (a, b, c, d) per site: out = a·b, in = c·d
    for (auto* s : sites) {
      const auto [a, b] = split_checked(s, s->out_features(), "out_features");
      const auto [c, d] = split_checked(s, s->in_features(), "in_features");
      shapes.push_back({a, b, c, d});
    }
    const auto& opts = ctx.model.info().param_options;
    at::NoGradGuard no_grad;
    // nn.init.kaiming_uniform_(a = √5) as PEFT calls it: U(−1/√fan_in, 1/√fan_in), fan_in = size(1).
    auto kaiming = [&](std::int64_t rows, std::int64_t cols) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(cols));
      return at::empty({rows, cols}, opts).uniform_(-bound, bound);
    };
    // init "true" zeroes W1 (or W1a), "lycoris" W2 (or W2b): either way ΔW starts at 0 while
    // the other factor, random, gives the zeroed one its gradient.
    auto make = [&](std::int64_t rows, std::int64_t cols, bool zero) { return zero ? at::zeros({rows, cols}, opts) : kaiming(rows, cols); };
    for (std::size_t i = 0; i < sites.size(); ++i) {
      const auto [a, b, c, d] = shapes[i];
      Kron k{sites[i], {}, {}, {}, {}, {}, {}, scaling, {}};
      if (!decompose_both || 2 * r >= std::max(a, c)) k.w1 = make(a, c, init == "true");
      else k.w1a = make(a, r, init == "true"), k.w1b = kaiming(r, c);
      if (2 * r >= std::max(b, d)) k.w2 = make(b, d, init == "lycoris");
      else k.w2a = kaiming(b, r), k.w2b = make(r, d, init == "lycoris");
      krons_.push_back(k);
      for (const auto& [name, t] : parts(krons_.back())) t->set_requires_grad(true);
    }
    install();
  }

  bool mergeable() const override { return true; }
  void merge() override {
    if (merged_) return;
    at::NoGradGuard no_grad;
    for (auto& k : krons_) {
      k.site->remove(*owner_);
      k.folded = k.delta().to(k.site->weight().base().scalar_type());
      k.site->weight().fold(k.folded);
    }
    merged_ = true;
  }
  void unmerge() override {
    if (!merged_) return;
    at::NoGradGuard no_grad;
    for (auto& k : krons_) k.site->weight().fold(-k.folded), k.folded = Tensor();
    merged_ = false;
    install();
  }

  tessera::NamedTensors trainable() override {
    tessera::NamedTensors out;
    for (auto& k : krons_)
      for (const auto& [name, t] : parts(k)) out[k.site->name() + "." + name] = *t;
    return out;
  }

  // PEFT's keys: base_model.model.<module path>.lokr_w1 or lokr_w1_{a,b}, and lokr_w2 or
  // lokr_w2_{a,b} (no ".weight"); which of them a site has follows from its shapes and r.
  tessera::NamedTensors state() override {
    tessera::NamedTensors out;
    for (auto& k : krons_)
      for (const auto& [name, t] : parts(k)) out[key(k, name)] = *t;
    return out;
  }

  void load_state(const tessera::NamedTensors& tensors) override {
    if (merged_) throw std::runtime_error("load_state() while merged: unmerge first");
    std::size_t expected = 0;
    for (auto& k : krons_) expected += parts(k).size();
    if (tensors.size() != expected)
      throw std::runtime_error("adapter holds " + std::to_string(tensors.size()) + " tensors, this LoKr has " + std::to_string(expected));
    for (int pass = 0; pass < 2; ++pass)  // every tensor checked before any is copied
      for (auto& k : krons_)
        for (const auto& [name, t] : parts(k)) {
          const auto it = tensors.find(key(k, name));
          if (it == tensors.end()) throw std::runtime_error("adapter lacks tensor '" + key(k, name) + "' (another r, decompose_both or decompose_factor?)");
          if (it->second.sizes() != t->sizes())
            throw std::runtime_error("tensor '" + key(k, name) + "' has shape " + c10::str(it->second.sizes()) + ", expected " + c10::str(t->sizes()));
          if (pass == 1) {
            at::NoGradGuard no_grad;
            t->copy_(it->second);
          }
        }
  }

  std::string adapter_config_json() const override {
    nlohmann::json targets = nlohmann::json::array();
    for (const auto& k : krons_) targets.push_back(k.site->hf_path());
    const std::string& init = params_.text("init_weights");
    return nlohmann::json{{"peft_type", "LOKR"},
                          {"r", params_.integer("r")},
                          {"alpha", params_.number("alpha")},
                          {"rank_dropout", params_.number("rank_dropout")},
                          {"module_dropout", params_.number("module_dropout")},
                          {"rank_dropout_scale", params_.flag("rank_dropout_scale")},
                          {"decompose_both", params_.flag("decompose_both")},
                          {"decompose_factor", params_.integer("decompose_factor")},
                          {"init_weights", init == "lycoris" ? nlohmann::json("lycoris") : nlohmann::json(init == "true")},
                          {"use_effective_conv2d", false},
                          {"target_modules", targets},
                          {"rank_pattern", nlohmann::json::object()},
                          {"alpha_pattern", nlohmann::json::object()},
                          {"task_type", nullptr},
                          {"inference_mode", true}}
        .dump(2);
  }

 private:
  static std::vector<std::pair<const char*, Tensor*>> parts(Kron& k) {
    std::vector<std::pair<const char*, Tensor*>> out;
    if (k.w1.defined()) out.emplace_back("lokr_w1", &k.w1);
    else out.emplace_back("lokr_w1_a", &k.w1a), out.emplace_back("lokr_w1_b", &k.w1b);
    if (k.w2.defined()) out.emplace_back("lokr_w2", &k.w2);
    else out.emplace_back("lokr_w2_a", &k.w2a), out.emplace_back("lokr_w2_b", &k.w2b);
    return out;
  }
  static std::string key(const Kron& k, const char* name) { return "base_model.model." + k.site->hf_path() + "." + name; }

  // ΔW of this forward, f32 (out, in), or undefined when module dropout skips the update.
  Tensor step_delta(const Kron& k) const {
    const bool training = model_->training();
    const double rank_dropout = params_.number("rank_dropout"), module_dropout = params_.number("module_dropout");
    if (training && module_dropout > 0 && at::rand({1}).item<double>() <= module_dropout) return {};  // PEFT: kept when rand > p
    Tensor d = k.delta();
    if (training && rank_dropout > 0) {  // PEFT's rank dropout: rows kept when rand > p, divided by the kept share only on request
      Tensor keep = at::rand({d.size(0)}, d.options()).gt(rank_dropout).to(d.scalar_type());
      if (params_.flag("rank_dropout_scale")) keep = keep / keep.mean();
      d = d * keep.unsqueeze(1);
    }
    return d;
  }

  // On a float32 model ΔW joins W for the site's one product. On a half-precision model an
  // update much smaller than W would vanish in W + ΔW's rounding: there it is PEFT's second
  // product, x ΔWᵀ in float32.
  void install() {
    for (auto& k : krons_) {
      const Kron* kp = &k;  // krons_ does not grow after attach
      if (compute_ == at::kFloat) {
        k.site->add_weight_delta(*owner_, [this, kp] {
          const Tensor d = step_delta(*kp);
          return d.defined() ? d : at::zeros({kp->site->out_features(), kp->site->in_features()}, kp->options());
        });
      } else {
        k.site->add_branch(*owner_, [this, kp](const Tensor& x) {
          const Tensor d = step_delta(*kp);
          return d.defined() ? at::linear(x.to(at::kFloat), d).to(x.scalar_type()) : at::zeros_like(x.narrow(-1, 0, 1)).expand(with_out(x, kp));
        });
      }
    }
  }
  static std::vector<std::int64_t> with_out(const Tensor& x, const Kron* k) {
    auto shape = x.sizes().vec();
    shape.back() = k->site->out_features();
    return shape;
  }

  const tessera::Owner* owner_ = nullptr;
  tessera::ModelView* model_ = nullptr;
  tessera::Params params_;
  std::vector<Kron> krons_;
  c10::ScalarType compute_ = at::kFloat;
  bool merged_ = false;
};

}  // namespace

TESSERA_PLUGIN(LoKr, "lokr", "1.0.0", "reparameterized", "Kronecker-product update s·W1 ⊗ W2 of linear weights, either factor full or low-rank (LoKr; KronA when both are full)",
               "Yeh et al. 2023, Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation, arXiv:2309.14859; "
               "Edalati et al. 2022, KronA: Parameter Efficient Tuning with Kronecker Adapter, arXiv:2212.10650")
