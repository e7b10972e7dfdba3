// The fixed execution order of every site kind (see tessera/sites.h).
#include <tessera/sites.h>

#include <tessera/dense_linear.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <stdexcept>

namespace tessera {
namespace {

template <class Fn>
void drop(Interventions<Fn>& list, const std::string& owner) {
  list.erase(std::remove_if(list.begin(), list.end(), [&](const auto& i) { return i.owner == owner; }), list.end());
}

}  // namespace

// ---- ParameterSite ---------------------------------------------------------------------

ParameterSite::ParameterSite(std::string name, std::string hf_name, Tensor base)
    : name_(std::move(name)), hf_name_(std::move(hf_name)), base_(std::move(base)) {}

Tensor ParameterSite::value() const {
  if (deltas_.empty()) return base_;
  Tensor v = base_;
  for (const auto& d : deltas_) v = v + d.fn();
  return v;
}

void ParameterSite::add_delta(std::string owner, TensorThunk delta) { deltas_.push_back({std::move(owner), std::move(delta)}); }

void ParameterSite::fold(const Tensor& d) {
  at::NoGradGuard no_grad;
  base_.add_(d.to(base_.scalar_type()));
}

void ParameterSite::remove(const std::string& owner) { drop(deltas_, owner); }

// ---- LinearSite ------------------------------------------------------------------------

LinearSite::LinearSite(std::string name, std::string hf_path, ParameterSite* weight, ParameterSite* bias)
    : name_(std::move(name)), hf_path_(std::move(hf_path)), weight_(weight), bias_(bias) {
  if (weight_ == nullptr || weight_->base().dim() != 2) throw std::invalid_argument("linear site " + name_ + " needs a 2-D weight");
}

std::int64_t LinearSite::in_features() const { return weight_->base().size(1); }
std::int64_t LinearSite::out_features() const { return weight_->base().size(0); }

void LinearSite::add_weight_delta(std::string owner, TensorThunk d) { weight_deltas_.push_back({std::move(owner), std::move(d)}); }
void LinearSite::add_input_scale(std::string owner, TensorThunk s) { input_scales_.push_back({std::move(owner), std::move(s)}); }
void LinearSite::add_output_scale(std::string owner, TensorThunk s) { output_scales_.push_back({std::move(owner), std::move(s)}); }
void LinearSite::add_branch(std::string owner, TensorMap b) { branches_.push_back({std::move(owner), std::move(b)}); }

void LinearSite::remove(const std::string& owner) {
  drop(weight_deltas_, owner);
  drop(input_scales_, owner);
  drop(output_scales_, owner);
  drop(branches_, owner);
}

Tensor LinearSite::forward(const Tensor& x) const { return forward(x, Activation::none); }

Tensor LinearSite::forward(const Tensor& x, Activation act, const Tensor& times) const {  // x: (..., in)
  Tensor w = weight_->value();                                                         // (out, in)
  for (const auto& d : weight_deltas_) w = w + d.fn();
  Tensor xin = x;
  for (const auto& s : input_scales_) xin = xin * s.fn();  // (in) broadcast
  const Tensor b = bias_ ? bias_->value() : Tensor();
  if (output_scales_.empty() && branches_.empty()) return dense_linear(xin, w, b, act, times);  // (..., out)
  Tensor y = dense_linear(xin, w, b);                   // (..., out)
  for (const auto& s : output_scales_) y = y * s.fn();  // (out) broadcast
  for (const auto& br : branches_) y = y + br.fn(x);
  return activate(act, y, times);
}

// ---- SublayerSite ----------------------------------------------------------------------

SublayerSite::SublayerSite(std::string name, std::string hf_path, std::int64_t hidden_size)
    : name_(std::move(name)), hf_path_(std::move(hf_path)), hidden_size_(hidden_size) {}

void SublayerSite::add_sequential(std::string owner, TensorMap m) { sequential_.push_back({std::move(owner), std::move(m)}); }
void SublayerSite::add_parallel(std::string owner, TensorMap m) { parallel_.push_back({std::move(owner), std::move(m)}); }
void SublayerSite::add_gate(std::string owner, TensorMap g) { gates_.push_back({std::move(owner), std::move(g)}); }

void SublayerSite::remove(const std::string& owner) {
  drop(sequential_, owner);
  drop(parallel_, owner);
  drop(gates_, owner);
}

Tensor SublayerSite::apply(const Tensor& x, Tensor h) const {  // x, h: (B, T, H)
  for (const auto& s : sequential_) h = s.fn(h);
  for (const auto& p : parallel_) h = h + p.fn(x);
  for (const auto& g : gates_) h = h * g.fn(x);
  return h;
}

// ---- AttentionSite ---------------------------------------------------------------------

AttentionSite::AttentionSite(std::string name, std::string hf_path, std::int64_t num_heads, std::int64_t head_dim)
    : name_(std::move(name)), hf_path_(std::move(hf_path)), num_heads_(num_heads), head_dim_(head_dim) {}

void AttentionSite::add_prefix(std::string owner, KVPrefix p) { prefixes_.push_back({std::move(owner), std::move(p)}); }
void AttentionSite::add_score_hook(std::string owner, TensorMap h) { score_hooks_.push_back({std::move(owner), std::move(h)}); }

void AttentionSite::remove(const std::string& owner) {
  drop(prefixes_, owner);
  drop(score_hooks_, owner);
}

std::pair<Tensor, Tensor> AttentionSite::prefix(std::int64_t batch) const {
  if (prefixes_.empty()) return {};
  std::vector<Tensor> ks, vs;
  for (const auto& p : prefixes_) {
    auto [k, v] = p.fn(batch);  // (B, heads, P_i, head_dim)
    ks.push_back(k);
    vs.push_back(v);
  }
  return {at::cat(ks, 2), at::cat(vs, 2)};
}

Tensor AttentionSite::hook_scores(Tensor scores) const {
  for (const auto& h : score_hooks_) scores = h.fn(scores);
  return scores;
}

// ---- EmbeddingSite ---------------------------------------------------------------------

EmbeddingSite::EmbeddingSite(std::string name, std::string hf_path, std::int64_t hidden_size)
    : name_(std::move(name)), hf_path_(std::move(hf_path)), hidden_size_(hidden_size) {}

void EmbeddingSite::add_prompt(std::string owner, PerBatch p) { prompts_.push_back({std::move(owner), std::move(p)}); }
void EmbeddingSite::remove(const std::string& owner) { drop(prompts_, owner); }

Tensor EmbeddingSite::prepend(const Tensor& embedded, std::int64_t* prompt_length) const {  // (B, T, H)
  std::vector<Tensor> parts;
  std::int64_t p = 0;
  for (const auto& pr : prompts_) {
    Tensor t = pr.fn(embedded.size(0));  // (B, P_i, H)
    p += t.size(1);
    parts.push_back(t);
  }
  if (prompt_length) *prompt_length = p;
  if (parts.empty()) return embedded;
  parts.push_back(embedded);
  return at::cat(parts, 1);  // (B, P + T, H)
}

// ---- LayerSite -------------------------------------------------------------------------

LayerSite::LayerSite(std::string name, std::string hf_path, std::int64_t index)
    : name_(std::move(name)), hf_path_(std::move(hf_path)), index_(index) {}

void LayerSite::add_tap(std::string owner, HiddenTap t) { taps_.push_back({std::move(owner), std::move(t)}); }
void LayerSite::add_router(std::string owner, TensorMap r) { routers_.push_back({std::move(owner), std::move(r)}); }

void LayerSite::remove(const std::string& owner) {
  drop(taps_, owner);
  drop(routers_, owner);
}

Tensor LayerSite::run(const Tensor& h, const std::function<Tensor(const Tensor&)>& layer) const {  // h: (B, T, H)
  Tensor out = layer(h);
  if (!routers_.empty()) {
    Tensor keep = routers_.front().fn(h);  // (B, T)
    for (std::size_t i = 1; i < routers_.size(); ++i) keep = keep * routers_[i].fn(h);
    keep = keep.to(out.scalar_type()).unsqueeze(-1);  // (B, T, 1)
    out = keep * out + (1 - keep) * h;
  }
  for (const auto& t : taps_) t.fn(out.detach());
  return out;
}

}  // namespace tessera
