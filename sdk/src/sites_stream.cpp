// The sites that see the whole hidden stream — the embedding (the first layer's input), each
// layer, the backbone's output — and their execution order (see tessera/sites.h).
#include "site_rules.h"

namespace tessera {
using namespace site_rules;

// ---- EmbeddingSite ---------------------------------------------------------------------

EmbeddingSiteImpl::EmbeddingSiteImpl(std::string name, std::string hf_path, std::int64_t hidden_size)
    : SiteCore(std::move(name), std::move(hf_path)), hidden_size_(hidden_size) {}

const std::string& EmbeddingSite::name() const { return static_cast<const EmbeddingSiteImpl&>(*this).name_; }
const std::string& EmbeddingSite::hf_path() const { return static_cast<const EmbeddingSiteImpl&>(*this).hf_path_; }
std::int64_t EmbeddingSite::hidden_size() const { return static_cast<const EmbeddingSiteImpl&>(*this).hidden_size_; }
void EmbeddingSite::add_prompt(const Owner& o, PerBatch p) { auto& s = static_cast<EmbeddingSiteImpl&>(*this); s.add(s.prompts_, o, std::move(p)); }
void EmbeddingSite::remove(const Owner& owner) { static_cast<EmbeddingSiteImpl&>(*this).remove_owner(OwnerImpl::of(owner)); }
bool EmbeddingSite::has_prompts() const { return any_on(static_cast<const EmbeddingSiteImpl&>(*this).prompts_); }
void EmbeddingSite::add_tap(const Owner& o, HiddenTap t) { auto& s = static_cast<EmbeddingSiteImpl&>(*this); s.add(s.taps_, o, std::move(t)); }
void EmbeddingSite::add_transform(const Owner& o, TensorMap t) { auto& s = static_cast<EmbeddingSiteImpl&>(*this); s.add(s.transforms_, o, std::move(t)); }

void EmbeddingSiteImpl::drop(const OwnerImpl& owner) {
  erase_owner(prompts_, owner);
  erase_owner(taps_, owner);
  erase_owner(transforms_, owner);
}
std::vector<std::string> EmbeddingSiteImpl::kinds(const OwnerImpl& o) const {
  return present({{owns(prompts_, o), "a prompt"}, {owns(taps_, o), "a tap"}, {owns(transforms_, o), "an embedding transform"}});
}

Tensor EmbeddingSiteImpl::enter(const Tensor& x0) const {  // (B, S, H)
  const Tensor x = chain(
      transforms_, x0, [&](const auto& f, const Tensor& in) { return call(f, in); },
      [&](const auto& f, const Tensor& in) { return per_token(f, *this, in); });
  show(taps_, *this, x);
  return x;
}

Tensor EmbeddingSiteImpl::prepend(const Tensor& embedded, std::int64_t* prompt_length) const {  // (B, T, H)
  std::vector<Tensor> parts;
  std::int64_t p = 0;
  for (const auto& pr : prompts_) {
    if (!pr.on()) continue;
    refuse_factors(pr, *this, "a prompt");
    Tensor t = call(pr, embedded.size(0));  // (B, P_i, H)
    p += t.size(1);
    parts.push_back(t);
  }
  if (prompt_length) *prompt_length = p;
  if (parts.empty()) return embedded;
  parts.push_back(embedded);
  return at::cat(parts, 1);  // (B, P + T, H)
}

// ---- LayerSite -------------------------------------------------------------------------

LayerSiteImpl::LayerSiteImpl(std::string name, std::string hf_path, std::int64_t index)
    : SiteCore(std::move(name), std::move(hf_path)), index_(index) {}

const std::string& LayerSite::name() const { return static_cast<const LayerSiteImpl&>(*this).name_; }
const std::string& LayerSite::hf_path() const { return static_cast<const LayerSiteImpl&>(*this).hf_path_; }
std::int64_t LayerSite::index() const { return static_cast<const LayerSiteImpl&>(*this).index_; }
void LayerSite::add_tap(const Owner& o, HiddenTap t) { auto& s = static_cast<LayerSiteImpl&>(*this); s.add(s.taps_, o, std::move(t)); }
void LayerSite::add_router(const Owner& o, TensorMap r) { auto& s = static_cast<LayerSiteImpl&>(*this); s.add(s.routers_, o, std::move(r)); }
void LayerSite::add_parallel(const Owner& o, TensorMap m) { auto& s = static_cast<LayerSiteImpl&>(*this); s.add(s.parallel_, o, std::move(m)); }
void LayerSite::add_input_tap(const Owner& o, HiddenTap t) { auto& s = static_cast<LayerSiteImpl&>(*this); s.add(s.input_taps_, o, std::move(t)); }
void LayerSite::remove(const Owner& owner) { static_cast<LayerSiteImpl&>(*this).remove_owner(OwnerImpl::of(owner)); }

bool LayerSite::empty() const {
  const auto& s = static_cast<const LayerSiteImpl&>(*this);
  return !any_on(s.taps_) && !any_on(s.routers_) && !any_on(s.parallel_) && !any_on(s.input_taps_);
}

void LayerSiteImpl::drop(const OwnerImpl& owner) {
  erase_owner(taps_, owner);
  erase_owner(routers_, owner);
  erase_owner(parallel_, owner);
  erase_owner(input_taps_, owner);
}
std::vector<std::string> LayerSiteImpl::kinds(const OwnerImpl& o) const {
  return present({{owns(taps_, o), "a tap"}, {owns(routers_, o), "a token router"}, {owns(parallel_, o), "a layer-parallel module"},
                  {owns(input_taps_, o), "an input tap"}});
}

Tensor LayerSiteImpl::run(const Tensor& h, const LayerFn& layer) const {  // h: (B, T, H)
  show(input_taps_, *this, h);
  Tensor keep;
  for (const auto& r : routers_) {
    if (!r.on()) continue;
    refuse_factors(r, *this, "a token router");
    Tensor k = call(r, h);  // (B, T)
    keep = keep.defined() ? keep * k : k;
  }
  Tensor out;
  if (!keep.defined()) {
    out = layer(h, Tensor());
  } else {
    // No host sync on whether anything is kept: a layer that keeps nothing returns h here
    // (w = 0; an encoder that gathers skips its work itself).
    const Tensor w = keep.to(h.scalar_type()).unsqueeze(-1);  // (B, T, 1)
    out = w * layer(h, keep.ne(0)) + (1 - w) * h;
  }
  for (const auto& p : parallel_)
    if (p.on()) out = plus(out, per_token(p, *this, h), call(p, h));
  show(taps_, *this, out);
  return out;
}

// ---- OutputSite ------------------------------------------------------------------------

OutputSiteImpl::OutputSiteImpl(std::string name, std::string hf_path, std::int64_t hidden_size)
    : SiteCore(std::move(name), std::move(hf_path)), hidden_size_(hidden_size) {}

const std::string& OutputSite::name() const { return static_cast<const OutputSiteImpl&>(*this).name_; }
const std::string& OutputSite::hf_path() const { return static_cast<const OutputSiteImpl&>(*this).hf_path_; }
std::int64_t OutputSite::hidden_size() const { return static_cast<const OutputSiteImpl&>(*this).hidden_size_; }
void OutputSite::add_transform(const Owner& o, TensorMap f) { auto& s = static_cast<OutputSiteImpl&>(*this); s.add(s.transforms_, o, std::move(f)); }
void OutputSite::remove(const Owner& owner) { static_cast<OutputSiteImpl&>(*this).remove_owner(OwnerImpl::of(owner)); }
void OutputSite::add_token_wise_transform(const Owner& o, TensorMap f) {
  auto& s = static_cast<OutputSiteImpl&>(*this);
  s.add(s.transforms_, o, std::move(f), /*token_wise=*/true);
}
bool OutputSite::empty() const { return !any_on(static_cast<const OutputSiteImpl&>(*this).transforms_); }
bool OutputSiteImpl::reads_sequence() const {
  return std::any_of(transforms_.begin(), transforms_.end(), [](const auto& e) { return e.on() && !e.token_wise; });
}
void OutputSiteImpl::drop(const OwnerImpl& owner) { erase_owner(transforms_, owner); }
std::vector<std::string> OutputSiteImpl::kinds(const OwnerImpl& o) const {
  return present({{owns(transforms_, o), "an output transform"}});
}

Tensor OutputSiteImpl::apply(Tensor h) const {  // (B, T, H)
  return chain(
      transforms_, h, [&](const auto& f, const Tensor& in) { return call(f, in); },
      [&](const auto& f, const Tensor& in) { return per_token(f, *this, in); });
}

}  // namespace tessera
