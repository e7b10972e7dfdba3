// The sites inside a block — parameters, linear maps, sublayers, attention — and their
// execution order (see tessera/sites.h); the stream's sites are in sites_stream.cpp.
#include "site_rules.h"

#include <ATen/core/grad_mode.h>

namespace tessera {
using namespace site_rules;

// ---- ParameterSite ---------------------------------------------------------------------

ParameterSiteImpl::ParameterSiteImpl(std::string name, std::string hf_name, Tensor base)
    : SiteCore(std::move(name), std::move(hf_name)), base_(std::move(base)) {
  if (base_.defined()) shape_ = base_.sizes().vec();
}

const std::string& ParameterSite::name() const { return ParameterSiteImpl::of(*this).name_; }
const std::string& ParameterSite::hf_name() const { return ParameterSiteImpl::of(*this).hf_path_; }
const Tensor& ParameterSite::base() const {
  const auto& s = ParameterSiteImpl::of(*this);
  if (!s.stored_) return s.base_;
  if (!s.dense_copy_.defined()) s.dense_copy_ = s.stored_->dense();
  return s.dense_copy_;
}
const char* ParameterSite::storage() const {
  const auto& s = ParameterSiteImpl::of(*this);
  return s.stored_ ? s.stored_->format() : "dense";
}

const char* RowBlock::format() const { return whole_.stored() ? whole_.stored()->format() : "dense"; }
Tensor RowBlock::dense() const { return whole_.base_value().narrow(0, start_, rows_); }
std::int64_t RowBlock::column_step() const { return whole_.stored() ? whole_.stored()->column_step() : 0; }
void RowBlock::dequantize_row(std::int64_t r, std::int64_t c0, std::int64_t c1, float* out) const {
  whole_.stored()->dequantize_row(start_ + r, c0, c1, out);
}

void ParameterSiteImpl::store(std::unique_ptr<StoredTensor> stored) {
  stored_ = std::move(stored);
  base_ = Tensor();
  dense_copy_ = Tensor();
}

void ParameterSiteImpl::unstore(Tensor dense) {
  base_ = std::move(dense).detach().set_requires_grad(false);
  stored_.reset();
  dense_copy_ = Tensor();
}

std::int64_t ParameterSiteImpl::numel() const {
  std::int64_t n = 1;
  for (auto d : shape_) n *= d;
  return n;
}

std::int64_t ParameterSiteImpl::stored_bytes() const {
  if (stored_) return stored_->stored_bytes();
  return base_.defined() ? static_cast<std::int64_t>(base_.numel() * base_.element_size()) : 0;
}
bool ParameterSite::has_deltas() const {
  const auto& s = ParameterSiteImpl::of(*this);
  return any_on(s.deltas_) || any_on(s.sparse_);
}

Tensor ParameterSite::value() const {
  const auto& s = ParameterSiteImpl::of(*this);
  Tensor v = s.stored_ ? (s.dense_copy_.defined() ? s.dense_copy_ : s.stored_->dense()) : s.base_;
  for (const auto& d : s.deltas_)
    if (d.on()) v = v + times(per_tensor(d, s), s.call(d));
  if (any_on(s.sparse_)) {
    // One scatter-add into a copy: the gradient reaches the k values only (index_add's
    // backward gathers the output's gradient at the indices).
    Tensor flat = v.reshape({-1});
    for (const auto& d : s.sparse_) {
      if (!d.on()) continue;
      const Tensor vals = s.call(d);
      if (vals.dim() != 1 || vals.size(0) != d.fn.indices.size(0))
        throw std::runtime_error("parameter site '" + s.site_name() + "': a sparse delta returned " + c10::str(vals.sizes()) + " values for " +
                                 std::to_string(d.fn.indices.size(0)) + " indices");
      flat = flat.index_add(0, d.fn.indices, times(per_tensor(d, s), vals).to(flat.scalar_type()));
    }
    v = flat.view(v.sizes());
  }
  return v;
}

void ParameterSite::add_sparse_delta(const Owner& owner, Tensor indices, TensorThunk values) {
  auto& s = ParameterSiteImpl::of(*this);
  const auto n = s.numel();
  if (!indices.defined() || indices.dim() != 1 || indices.scalar_type() != at::kLong)
    throw std::invalid_argument("parameter site '" + s.site_name() + "': sparse delta indices must be a 1-D int64 tensor");
  if (indices.numel() > 0) {
    const auto lo = indices.min().item<std::int64_t>(), hi = indices.max().item<std::int64_t>();
    if (lo < 0 || hi >= n)
      throw std::invalid_argument("parameter site '" + s.site_name() + "': a sparse delta index " + std::to_string(lo < 0 ? lo : hi) +
                                  " falls outside its " + std::to_string(n) + " entries");
    if (std::get<0>(at::_unique2(indices, false)).numel() != indices.numel())
      throw std::invalid_argument("parameter site '" + s.site_name() + "': sparse delta indices repeat");
  }
  const auto device = s.stored_ ? s.stored_->dense().device() : s.base_.device();
  s.add(s.sparse_, owner, ParameterSiteImpl::Sparse{indices.to(device), std::move(values)});
}

void ParameterSite::add_delta(const Owner& owner, TensorThunk delta) {
  auto& s = ParameterSiteImpl::of(*this);
  s.add(s.deltas_, owner, std::move(delta));
}

void ParameterSite::fold(const Tensor& d) {
  at::NoGradGuard no_grad;
  auto& s = ParameterSiteImpl::of(*this);
  if (const auto* block = dynamic_cast<const RowBlock*>(s.stored_.get())) {
    // A row block of a stored fused weight: the fold goes into the whole, which turns
    // dense, and the block views its rows again (as the fused product and the block must agree).
    auto& whole = const_cast<ParameterSiteImpl&>(block->whole());
    Tensor full = at::zeros(whole.sizes(), d.options());
    full.narrow(0, block->start(), d.size(0)).copy_(d);
    const std::int64_t start = block->start();
    whole.fold(full);
    s.base_ = whole.dense_base().narrow(0, start, d.size(0));
    s.stored_.reset();
    s.dense_copy_ = Tensor();
    return;
  }
  if (s.stored_) {  // merging into a quantized base makes it dense: its dequantized value
                    // plus the update, not rounded to 4 bits again (unmerge then restores it)
    Tensor dense = s.stored_->dense();
    s.base_ = dense + d.to(dense.scalar_type());
    s.stored_.reset();
    s.dense_copy_ = Tensor();
    return;
  }
  Tensor& base = s.base_;
  base.add_(d.to(base.scalar_type()));
}

void ParameterSite::remove(const Owner& owner) { ParameterSiteImpl::of(*this).remove_owner(OwnerImpl::of(owner)); }
void ParameterSiteImpl::drop(const OwnerImpl& owner) {
  erase_owner(deltas_, owner);
  erase_owner(sparse_, owner);
}
std::vector<std::string> ParameterSiteImpl::kinds(const OwnerImpl& o) const {
  return present({{owns(deltas_, o), "a parameter delta"}, {owns(sparse_, o), "a sparse parameter delta"}});
}

// ---- LinearSite ------------------------------------------------------------------------

LinearSiteImpl::LinearSiteImpl(std::string name, std::string hf_path, ParameterSite* weight, ParameterSite* bias)
    : SiteCore(std::move(name), std::move(hf_path)), input_group_(name_), weight_(weight), bias_(bias) {
  // The shape, not base(): a weight loaded as stored blocks is not dequantized here.
  if (weight_ == nullptr || ParameterSiteImpl::of(*weight_).sizes().size() != 2) throw std::invalid_argument("linear site " + name_ + " needs a 2-D weight");
}

const std::string& LinearSite::name() const { return LinearSiteImpl::of(*this).name_; }
const std::string& LinearSite::hf_path() const { return LinearSiteImpl::of(*this).hf_path_; }
const std::string& LinearSite::input_group() const { return LinearSiteImpl::of(*this).input_group_; }
std::int64_t LinearSite::in_features() const { return ParameterSiteImpl::of(*LinearSiteImpl::of(*this).weight_).sizes()[1]; }
std::int64_t LinearSite::out_features() const { return ParameterSiteImpl::of(*LinearSiteImpl::of(*this).weight_).sizes()[0]; }
ParameterSite& LinearSite::weight() { return *LinearSiteImpl::of(*this).weight_; }
ParameterSite* LinearSite::bias() { return LinearSiteImpl::of(*this).bias_; }

void LinearSite::add_weight_delta(const Owner& o, TensorThunk d) { auto& s = LinearSiteImpl::of(*this); s.add(s.weight_deltas_, o, std::move(d)); }
void LinearSite::add_input_scale(const Owner& o, TensorThunk v) { auto& s = LinearSiteImpl::of(*this); s.add(s.input_scales_, o, std::move(v)); }
void LinearSite::add_output_scale(const Owner& o, TensorThunk v) { auto& s = LinearSiteImpl::of(*this); s.add(s.output_scales_, o, std::move(v)); }
void LinearSite::add_branch(const Owner& o, TensorMap b) { auto& s = LinearSiteImpl::of(*this); s.add(s.branches_, o, std::move(b)); }
void LinearSite::add_row_scaled_branch(const Owner& o, RowScaledBranch b) { auto& s = LinearSiteImpl::of(*this); s.add(s.row_branches_, o, std::move(b)); }
Tensor LinearSite::row_weights(const Owner& o, const Tensor& x) const { return row_weight(OwnerImpl::of(o), LinearSiteImpl::of(*this), x); }
void LinearSite::add_weight_transform(const Owner& o, TensorMap t) { auto& s = LinearSiteImpl::of(*this); s.add(s.weight_transforms_, o, std::move(t)); }
void LinearSite::remove(const Owner& owner) { LinearSiteImpl::of(*this).remove_owner(OwnerImpl::of(owner)); }

bool LinearSite::has_interventions() const {
  const auto& s = LinearSiteImpl::of(*this);
  return any_on(s.weight_deltas_) || any_on(s.input_scales_) || any_on(s.output_scales_) || any_on(s.branches_) ||
         any_on(s.row_branches_) || any_on(s.weight_transforms_);
}

void LinearSiteImpl::drop(const OwnerImpl& owner) {
  erase_owner(weight_deltas_, owner);
  erase_owner(input_scales_, owner);
  erase_owner(output_scales_, owner);
  erase_owner(branches_, owner);
  erase_owner(row_branches_, owner);
  erase_owner(weight_transforms_, owner);
}
std::vector<std::string> LinearSiteImpl::kinds(const OwnerImpl& o) const {
  return present({{owns(weight_deltas_, o), "a weight delta"}, {owns(input_scales_, o), "an input scale"}, {owns(output_scales_, o), "an output scale"},
                  {owns(branches_, o) || owns(row_branches_, o), "a branch"}, {owns(weight_transforms_, o), "a weight transform"}});
}

Tensor LinearSiteImpl::forward(const Tensor& x) const { return forward(x, Activation::none); }

Tensor LinearSiteImpl::forward(const Tensor& x, Activation act, const Tensor& times_) const {  // x: (..., in)
  // A weight delta weighed per token or per sample (a gated or routed group) cannot go
  // into W: it runs as a branch, (x ∘ s_in) ΔWᵀ, where W would have multiplied it.
  const auto factored = [](const auto& e) { return !e.owner->factors().empty(); };
  bool delta_branches = false, plain_deltas = false;
  for (const auto& d : weight_deltas_)
    if (d.on()) (factored(d) ? delta_branches : plain_deltas) = true;
  Tensor xin = x;
  for (const auto& s : input_scales_)
    if (s.on()) xin = xin * toward(per_token(s, *this, x), call(s));  // (in) broadcast
  const auto rest = [&](Tensor y) {  // y: (..., out)
    for (const auto& d : weight_deltas_)
      if (d.on() && factored(d)) y = plus(y, per_token(d, *this, x), at::matmul(xin, call(d).to(xin.scalar_type()).t()));
    for (const auto& s : output_scales_)
      if (s.on()) y = y * toward(per_token(s, *this, x), call(s));  // (out) broadcast
    for (const auto& br : branches_)
      if (br.on()) y = plus(y, per_token(br, *this, x), call(br, x));
    for (const auto& br : row_branches_)
      if (br.on()) {
        const Tensor rows = row_weight(*br.owner, *this, x);  // a per-row weight goes inside the branch, α with it
        y = rows.defined() ? y + call(br, x, rows) : plus(y, Weight{br.alpha()}, call(br, x, Tensor()));
      }
    return y;
  };
  if (delta_branches && any_on(weight_transforms_))  // T(W + ΔW) cannot split into a branch
    throw std::runtime_error("linear site '" + name_ + "': a weight delta weighed per sample (a gated or routed group) cannot pass through a weight transform (DoRA's) here");
  const auto& stored = ParameterSiteImpl::of(*weight_);
  const Tensor b = bias_ ? bias_->value() : Tensor();
  if (stored.stored() != nullptr && !stored.has_dense_copy() && at::GradMode::is_enabled() && !weight_->has_deltas() && !plain_deltas &&
      !any_on(weight_transforms_))  // training through a stored weight: dequantized in forward and in backward, never kept
    return activate(act, rest(recomputed_linear(xin, *stored.stored(), b)), times_);
  Tensor w = weight_->value();  // (out, in)
  for (const auto& d : weight_deltas_)
    if (d.on() && !factored(d)) w = w + times(Weight{d.alpha()}, call(d));
  w = chain(
      weight_transforms_, w,
      [&](const auto& t, const Tensor& base) {
        refuse_factors(t, *this, "a weight transform");
        return call(t, base);  // (out, in)
      },
      [](const auto& t, const Tensor&) { return Weight{t.alpha()}; });
  if (!any_on(output_scales_) && !any_on(branches_) && !any_on(row_branches_) && !delta_branches) return dense_linear(xin, w, b, act, times_);  // (..., out)
  return activate(act, rest(dense_linear(xin, w, b)), times_);
}

// ---- SublayerSite ----------------------------------------------------------------------

SublayerSiteImpl::SublayerSiteImpl(std::string name, std::string hf_path, std::int64_t hidden_size)
    : SiteCore(std::move(name), std::move(hf_path)), hidden_size_(hidden_size) {}

const std::string& SublayerSite::name() const { return static_cast<const SublayerSiteImpl&>(*this).name_; }
const std::string& SublayerSite::hf_path() const { return static_cast<const SublayerSiteImpl&>(*this).hf_path_; }
std::int64_t SublayerSite::hidden_size() const { return static_cast<const SublayerSiteImpl&>(*this).hidden_size_; }

namespace {
ResidualModule ignoring_residual(TensorMap m) {
  if (!m) return {};
  return [m = std::move(m)](const Tensor& h, const Tensor&, const TensorMap&) { return m(h); };
}
}  // namespace

void SublayerSite::add_sequential(const Owner& o, TensorMap m) { auto& s = static_cast<SublayerSiteImpl&>(*this); s.add(s.sequential_, o, ignoring_residual(std::move(m))); }
void SublayerSite::add_parallel(const Owner& o, TensorMap m) { auto& s = static_cast<SublayerSiteImpl&>(*this); s.add(s.parallel_, o, std::move(m)); }
void SublayerSite::add_gate(const Owner& o, TensorMap g) { auto& s = static_cast<SublayerSiteImpl&>(*this); s.add(s.gates_, o, std::move(g)); }
void SublayerSite::add_token_wise_sequential(const Owner& o, TensorMap m) {
  auto& s = static_cast<SublayerSiteImpl&>(*this);
  s.add(s.sequential_, o, ignoring_residual(std::move(m)), true);
}
void SublayerSite::add_token_wise_residual(const Owner& o, ResidualModule m) {
  auto& s = static_cast<SublayerSiteImpl&>(*this);
  s.add(s.sequential_, o, std::move(m), true);
}
void SublayerSite::add_token_wise_parallel(const Owner& o, TensorMap m) {
  auto& s = static_cast<SublayerSiteImpl&>(*this);
  s.add(s.parallel_, o, std::move(m), true);
}
void SublayerSite::remove(const Owner& owner) { static_cast<SublayerSiteImpl&>(*this).remove_owner(OwnerImpl::of(owner)); }

bool SublayerSiteImpl::token_wise() const {
  auto all = [](const auto& list) { return std::all_of(list.begin(), list.end(), [](const auto& e) { return !e.on() || e.token_wise; }); };
  return all(sequential_) && all(parallel_) && !any_on(gates_);
}

bool SublayerSite::empty() const {
  const auto& s = static_cast<const SublayerSiteImpl&>(*this);
  return !any_on(s.sequential_) && !any_on(s.parallel_) && !any_on(s.gates_);
}

void SublayerSiteImpl::drop(const OwnerImpl& owner) {
  erase_owner(sequential_, owner);
  erase_owner(parallel_, owner);
  erase_owner(gates_, owner);
}
std::vector<std::string> SublayerSiteImpl::kinds(const OwnerImpl& o) const {
  return present({{owns(sequential_, o), "a sequential module"}, {owns(parallel_, o), "a parallel module"}, {owns(gates_, o), "a sublayer gate"}});
}

const TensorMap& SublayerSiteImpl::identity() {
  static const TensorMap id = [](const Tensor& t) { return t; };
  return id;
}

Tensor SublayerSiteImpl::apply(const Tensor& x, Tensor h, const Tensor& residual, const TensorMap& norm) const {
  h = chain(
      sequential_, h, [&](const auto& s, const Tensor& in) { return call(s, in, residual, norm); },
      [&](const auto& s, const Tensor& in) { return per_token(s, *this, in); });  // a module's change, weighed by what it read
  for (const auto& p : parallel_)
    if (p.on()) h = plus(h, per_token(p, *this, x), call(p, x));
  for (const auto& g : gates_)
    if (g.on()) h = h * toward(per_token(g, *this, x), call(g, x));
  return h;
}

// ---- AttentionSite ---------------------------------------------------------------------

AttentionSiteImpl::AttentionSiteImpl(std::string name, std::string hf_path, std::int64_t num_heads, std::int64_t head_dim, std::int64_t query_heads)
    : SiteCore(std::move(name), std::move(hf_path)), num_heads_(num_heads), head_dim_(head_dim), query_heads_(query_heads > 0 ? query_heads : num_heads) {}

const std::string& AttentionSite::name() const { return static_cast<const AttentionSiteImpl&>(*this).name_; }
const std::string& AttentionSite::hf_path() const { return static_cast<const AttentionSiteImpl&>(*this).hf_path_; }
std::int64_t AttentionSite::num_heads() const { return static_cast<const AttentionSiteImpl&>(*this).num_heads_; }
std::int64_t AttentionSite::head_dim() const { return static_cast<const AttentionSiteImpl&>(*this).head_dim_; }
std::int64_t AttentionSite::num_query_heads() const { return static_cast<const AttentionSiteImpl&>(*this).query_heads_; }

void AttentionSite::add_input_prefix(const Owner& o, std::int64_t length, KVFromInput p) {
  auto& s = static_cast<AttentionSiteImpl&>(*this);
  if (length < 1) throw std::invalid_argument("site '" + s.name_ + "': an input prefix needs a length of at least 1, not " + std::to_string(length));
  s.add(s.input_prefixes_, o, InputPrefix{length, std::move(p)});
}

void AttentionSite::add_prefix(const Owner& o, KVPrefix p) { auto& s = static_cast<AttentionSiteImpl&>(*this); s.add(s.prefixes_, o, std::move(p)); }
void AttentionSite::add_positionless_prefix(const Owner& o, KVPrefix p) {
  auto& s = static_cast<AttentionSiteImpl&>(*this);
  s.add(s.prefixes_, o, std::move(p));
  s.prefixes_.back().positionless = true;
}
void AttentionSite::add_score_hook(const Owner& o, TensorMap h) { auto& s = static_cast<AttentionSiteImpl&>(*this); s.add(s.score_hooks_, o, std::move(h)); }
void AttentionSite::remove(const Owner& owner) { static_cast<AttentionSiteImpl&>(*this).remove_owner(OwnerImpl::of(owner)); }
bool AttentionSite::has_prefix() const {
  const auto& s = static_cast<const AttentionSiteImpl&>(*this);
  return any_on(s.prefixes_) || any_on(s.input_prefixes_);
}
bool AttentionSite::has_score_hooks() const { return any_on(static_cast<const AttentionSiteImpl&>(*this).score_hooks_); }

void AttentionSiteImpl::drop(const OwnerImpl& owner) {
  erase_owner(prefixes_, owner);
  erase_owner(input_prefixes_, owner);
  erase_owner(score_hooks_, owner);
}
std::vector<std::string> AttentionSiteImpl::kinds(const OwnerImpl& o) const {
  return present({{owns(prefixes_, o), "a prefix"}, {owns(input_prefixes_, o), "an input prefix"}, {owns(score_hooks_, o), "a score hook"}});
}

std::int64_t AttentionSiteImpl::input_prefix_length() const {
  std::int64_t n = 0;
  for (const auto& p : input_prefixes_)
    if (p.on()) n += p.fn.length;
  return n;
}

std::pair<Tensor, Tensor> AttentionSiteImpl::input_prefix(const Tensor& x) const {  // x: (B, T, H)
  std::vector<Tensor> ks, vs;
  for (const auto& p : input_prefixes_) {
    if (!p.on()) continue;
    auto [k, v] = call(p, x);  // (B, heads, P_i, head_dim)
    const std::vector<std::int64_t> want{x.size(0), num_heads_, p.fn.length, head_dim_};
    if (k.sizes() != want || v.sizes() != want)
      throw InterventionError(p.owner->where(name_) + "an input prefix returned K " + c10::str(k.sizes()) + " and V " + c10::str(v.sizes()) +
                              ", not " + c10::str(at::IntArrayRef(want)));
    const auto [fk, fv] = kv_factors(p, *this, x, x.size(0));  // weighed per sample by the owner's groups
    ks.push_back(fk.defined() ? k * fk : k);
    vs.push_back(fv.defined() ? v * fv : v);
  }
  if (ks.empty()) return {};
  return {at::cat(ks, 2), at::cat(vs, 2)};
}

namespace {
// The enabled prefixes in key order: the positionless ones first, then those that count as
// earlier tokens (nearest the tokens, where a relative bias puts the past), each in install order.
template <class Visit>
void in_key_order(const Entries<KVPrefix>& prefixes, const Visit& visit) {
  for (const bool positionless : {true, false})
    for (const auto& p : prefixes)
      if (p.on() && p.positionless == positionless) visit(p);
}
}  // namespace

std::pair<Tensor, Tensor> AttentionSiteImpl::prefix(std::int64_t batch) const {
  std::vector<Tensor> ks, vs;
  prefix_lengths_.clear();
  in_key_order(prefixes_, [&](const auto& p) {
    auto [k, v] = call(p, batch);  // (B, heads, P_i, head_dim)
    prefix_lengths_.push_back(k.size(2));
    ks.push_back(k);
    vs.push_back(v);
  });
  if (ks.empty()) return {};
  return {at::cat(ks, 2), at::cat(vs, 2)};
}

std::int64_t AttentionSiteImpl::positioned_prefix_length() const {
  std::int64_t n = 0;
  std::size_t i = 0;
  in_key_order(prefixes_, [&](const auto& p) {
    const std::int64_t len = i < prefix_lengths_.size() ? prefix_lengths_[i] : 0;
    ++i;
    if (!p.positionless) n += len;
  });
  return n;
}

std::pair<Tensor, Tensor> AttentionSiteImpl::weigh_prefix(const std::pair<Tensor, Tensor>& kv, const Tensor& x) const {
  if (!kv.first.defined() || std::none_of(prefixes_.begin(), prefixes_.end(), [](const auto& p) { return p.on() && !p.owner->factors().empty(); }))
    return kv;
  const std::int64_t batch = kv.first.size(0);
  std::vector<Tensor> ks, vs;
  std::int64_t start = 0;
  std::size_t i = 0;
  in_key_order(prefixes_, [&](const auto& p) {
    if (i >= prefix_lengths_.size()) throw std::logic_error("site '" + name_ + "': prefixes were switched between prefix() and weigh_prefix()");
    const std::int64_t len = prefix_lengths_[i++];
    Tensor k = kv.first.narrow(2, start, len), v = kv.second.narrow(2, start, len);
    start += len;
    const auto [fk, fv] = kv_factors(p, *this, x, batch);
    ks.push_back(fk.defined() ? k * fk : k);
    vs.push_back(fv.defined() ? v * fv : v);
  });
  return {at::cat(ks, 2), at::cat(vs, 2)};
}

Tensor AttentionSiteImpl::hook_scores(Tensor scores) const {  // (B, heads, T, S)
  return chain(
      score_hooks_, scores,
      [&](const auto& h, const Tensor& in) {
        refuse_factors(h, *this, "a score hook");
        return call(h, in);
      },
      [](const auto& h, const Tensor&) { return Weight{h.alpha()}; });
}

}  // namespace tessera
