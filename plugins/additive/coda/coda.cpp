// CoDA — Conditional Adapters (Lei et al. 2023, "Conditional Adapters: Parameter-efficient
// Transfer Learning with Fast Inference", arXiv:2304.04947): every routed layer gets a
// parallel adapter on all tokens, and a learned router sends only k of each sequence's
// tokens through the frozen layer — gathered, so the layer's cost falls with k. The math
// and every key: README.md beside this.
//
//   s = X w                                     router scores (B, T), padding at −∞
//   λ = SoftTopK_ε(s, k)                        λ ∈ [0, 1], Σ_t λ_t = k per sequence
//   m = λ ∘ TopK(λ, k)                          the k selected tokens keep their λ
//   Y = X + A(X) + m ∘ (F(X̃) − X̃)               X̃: the selected tokens, F: the frozen layer
//   A(X) = W_up act(W_down X + b_down) + b_up    the adapter, every token
#include <tessera/plugin.h>
#include <tessera/state.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <limits>

namespace {

using tessera::Tensor;

struct Options {
  double k, eps, eps_init, eps_decay;
  std::int64_t iterations;
};

// The soft top-k of each row of s (B, T) over its real tokens (valid), by coordinate descent on
// the entropy-regularised problem  max_λ sᵀλ + ε H(λ)  s.t.  Σ λ = k_row, 0 ≤ λ ≤ 1, with
// ε annealed from eps_init by eps_decay down to eps:
//   a ← ε ln k − ε logsumexp((s + b) / ε),   b ← min(−s − a, 0),   λ = exp((s + b + a) / ε).
Tensor soft_top_k(const Tensor& s, const Tensor& valid, const Tensor& k_row, const Options& o) {
  const double inf = std::numeric_limits<double>::infinity();
  const Tensor masked = s.masked_fill(valid.logical_not(), -inf);  // padding: λ = 0
  const Tensor log_k = k_row.log().unsqueeze(1);                   // (B, 1)
  Tensor a = at::zeros_like(log_k), b = at::zeros_like(masked);
  double eps = o.eps_init, step = o.eps_init;
  for (std::int64_t t = 0; t < o.iterations; ++t, step *= o.eps_decay) {
    eps = std::max(step, o.eps);  // eps_init · decay^t, not below epsilon
    a = eps * log_k - eps * at::logsumexp((masked + b) / eps, 1, /*keepdim=*/true);
    b = at::clamp_max(-masked - a, 0.0).masked_fill(valid.logical_not(), 0.0);
  }
  return at::exp((masked + b + a) / eps);  // (B, T), at the last iteration's ε
}

Tensor activate(const std::string& name, const Tensor& x) {
  if (name == "relu") return at::relu(x);
  if (name == "gelu") return at::gelu(x);
  return at::silu(x);  // "swish"
}

struct Layer {
  tessera::LayerSite* site;
  Tensor w;                   // router (H)
  Tensor down_w, down_b;      // (r, H), (r)
  Tensor up_w, up_b;          // (H, r), (H)
};

class Coda final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    return {{
        {"k", ParamType::Float, 0.25, "the share of each sequence's real tokens the frozen layer runs on, in (0, 1]: k = ceil(share · n)", 1e-9, 1.0, {}},
        {"epsilon", ParamType::Float, 0.03, "the soft top-k's entropy weight ε (smaller: closer to a hard top-k)", 1e-6, std::nullopt, {}},
        {"epsilon_init", ParamType::Float, 4.0, "ε at the first coordinate-descent iteration, annealed toward epsilon", 1e-6, std::nullopt, {}},
        {"epsilon_decay", ParamType::Float, 0.7, "ε's factor per iteration", 1e-6, 1.0, {}},
        {"iterations", ParamType::Int, std::int64_t{20}, "coordinate-descent iterations of the soft top-k", 1, 1000, {}},
        {"bottleneck_size", ParamType::Int, std::int64_t{64}, "the adapter's r", 1, std::nullopt, {}},
        {"non_linearity", ParamType::String, std::string("relu"), "the adapter's activation", std::nullopt, std::nullopt, {"relu", "gelu", "swish"}},
        {"router_init_std", ParamType::Float, 0.02, "the router's w ~ N(0, router_init_std)", 0.0, 1.0, {}},
    }};
  }

  void attach(tessera::AttachContext& ctx) override {
    const auto& info = ctx.model.info();
    arch_ = info.architecture;
    if (arch_ != "bert" && arch_ != "roberta" && arch_ != "t5")
      throw std::runtime_error("CoDA routes encoder layers (bert, roberta, t5's encoder), not a " + arch_ + " model's");
    model_ = &ctx.model;
    const auto& p = ctx.params;
    opt_ = {p.number("k"), p.number("epsilon"), p.number("epsilon_init"), p.number("epsilon_decay"), p.integer("iterations")};
    r_ = p.integer("bottleneck_size");
    if (r_ > info.hidden_size)
      throw tessera::ParamError("bottleneck_size", "bottleneck_size " + std::to_string(r_) + " is larger than the hidden size " + std::to_string(info.hidden_size));
    act_ = p.text("non_linearity");
    const std::vector<std::string> targets = ctx.targets.empty() ? std::vector<std::string>{arch_ == "t5" ? "encoder.layers.*" : "layers.*"} : ctx.targets;
    const auto& opts = info.param_options;
    const auto H = info.hidden_size;
    at::NoGradGuard no_grad;
    for (auto* site : ctx.model.match_layers(targets)) {
      if (arch_ == "t5" && site->name().rfind("encoder.", 0) != 0)
        throw std::runtime_error("CoDA routes T5's encoder only: " + site->name() + " is a decoder layer");
      const double bound = 1.0 / std::sqrt(static_cast<double>(H));  // the down projection: nn.Linear's default draw
      layers_.push_back({site, at::empty({H}, opts).normal_(0.0, p.number("router_init_std")), at::empty({r_, H}, opts).uniform_(-bound, bound),
                         at::zeros({r_}, opts), at::zeros({H, r_}, opts), at::zeros({H}, opts)});  // up = 0: the adapter starts silent
    }
    if (layers_.empty()) throw std::runtime_error("no layer site of this " + arch_ + " model matches the targets");
    for (auto& [k, t] : state()) t.set_requires_grad(true);
    for (const auto& l : layers_) install(ctx.owner, l);
  }

  tessera::NamedTensors trainable() override { return state(); }

  // Tessera's layout: <layer hf path>.coda.{router, adapter_down.weight, …}.
  tessera::NamedTensors state() override {
    tessera::NamedTensors out;
    for (const auto& l : layers_) {
      const std::string k = l.site->hf_path() + ".coda.";
      out[k + "router.weight"] = l.w;
      out[k + "adapter_down.weight"] = l.down_w;
      out[k + "adapter_down.bias"] = l.down_b;
      out[k + "adapter_up.weight"] = l.up_w;
      out[k + "adapter_up.bias"] = l.up_b;
    }
    return out;
  }

  void load_state(const tessera::NamedTensors& tensors) override {
    tessera::load_exact(state(), tensors, "this CoDA (" + std::to_string(layers_.size()) + " routed layers)", "bottleneck " + std::to_string(r_));
  }

  std::string adapter_config_json() const override {
    std::vector<std::string> routed;
    for (const auto& l : layers_) routed.push_back(l.site->name());
    return nlohmann::json{{"tessera",
                           {{"method", "coda"}, {"architecture", arch_}, {"k", opt_.k}, {"epsilon", opt_.eps}, {"epsilon_init", opt_.eps_init},
                            {"epsilon_decay", opt_.eps_decay}, {"iterations", opt_.iterations}, {"bottleneck_size", r_}, {"non_linearity", act_},
                            {"routed_layers", routed}}}}
        .dump(2);
  }

 private:
  void install(const tessera::Owner& owner, const Layer& l) {
    const Tensor w = l.w, dw = l.down_w, db = l.down_b, uw = l.up_w, ub = l.up_b;
    const Options o = opt_;
    tessera::ModelView* model = model_;
    // The router's weights m (B, T): λ at each row's k selected real tokens, 0 elsewhere. At
    // k = 1 every real token is selected with λ = 1: the layer runs unrouted, with no router.
    if (o.k < 1.0) l.site->add_router(owner, [=](const Tensor& h) {
      const Tensor mask = model->attention_mask();                                            // (B, P + T)
      const Tensor real = mask.narrow(1, mask.size(1) - h.size(1), h.size(1)).to(at::kBool);  // (B, T)
      const Tensor n = real.sum(1);
      // A row without a real token solves for its first slot instead (its λ is dropped below):
      // all-padding scores would give ∞ − ∞ in the descent, and NaN gradients.
      const Tensor first = at::arange(h.size(1), n.options()).eq(0).unsqueeze(0);
      const Tensor valid = real.logical_or(n.eq(0).unsqueeze(1).logical_and(first));
      // k · n rounded in double, a hair under, so that 0.07 · 100 is 7, not 8.
      const Tensor k_row = at::clamp_min(at::ceil(n.to(at::kDouble) * o.k - 1e-9), 1.0).to(at::kFloat);  // (B)
      const auto work = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;  // the iterations need f32's range at least
      const Tensor s = at::matmul(h.to(work), w.to(work));                         // (B, T)
      const Tensor lambda = soft_top_k(s, valid, k_row.to(work), o);
      const auto k_max = k_row.max().item<std::int64_t>();
      const Tensor top = std::get<1>(at::topk(lambda.detach(), k_max, 1));  // (B, k_max)
      const Tensor rank = at::arange(k_max, top.options()).unsqueeze(0);
      const Tensor chosen = at::zeros_like(valid).scatter(1, top, rank < k_row.to(at::kLong).unsqueeze(1)).logical_and(real);
      // A chosen token keeps a λ the compute dtype can hold: 0 would drop it from the layer.
      const double tiny = h.scalar_type() == at::kHalf ? 6.2e-5 : h.scalar_type() == at::kDouble ? 1e-300 : 1.2e-38;
      return at::where(chosen, at::clamp_min(lambda, tiny), at::zeros_like(lambda)).to(h.scalar_type());
    });
    const std::string act = act_;
    l.site->add_parallel(owner, [=](const Tensor& h) {  // A(X), (B, T, H), every token
      const auto dt = h.scalar_type();
      return at::linear(activate(act, at::linear(h, dw.to(dt), db.to(dt))), uw.to(dt), ub.to(dt));
    });
  }

  tessera::ModelView* model_ = nullptr;
  std::string arch_, act_;
  Options opt_{};
  std::int64_t r_ = 64;
  std::vector<Layer> layers_;
};

}  // namespace

TESSERA_PLUGIN(Coda, "coda", "1.0.0", "additive",
               "Conditional adapters: a parallel adapter on every token, a learned soft top-k router sending k tokens through each frozen layer",
               "Lei et al. 2023, Conditional Adapters: Parameter-efficient Transfer Learning with Fast Inference, arXiv:2304.04947")
