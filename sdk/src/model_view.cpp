// The model view's handle functions, and target matching over both names of a site (canonical and Hugging Face).
#include <tessera/internal/sites_impl.h>

#include <regex>

namespace tessera {
namespace {

std::string glob_to_regex(const std::string& glob) {
  std::string re;
  for (char c : glob) {
    switch (c) {
      case '*': re += ".*"; break;
      case '?': re += '.'; break;
      case '[': case ']': re += c; break;
      case '.': case '(': case ')': case '+': case '^': case '$': case '|': case '{': case '}': case '\\':
        re += '\\'; re += c; break;
      default: re += c;
    }
  }
  return re;
}

template <class Site>
std::vector<Site*> pick(const std::vector<Site*>& sites, const std::vector<std::string>& targets) {
  std::vector<Site*> out;
  for (Site* s : sites)
    if (matches_any(targets, s->name(), s->hf_path())) out.push_back(s);
  return out;
}

// The handles of the sites an architecture owns.
template <class Handle, class Impl>
std::vector<Handle*> handles(const std::vector<std::unique_ptr<Impl>>& owned) {
  std::vector<Handle*> out;
  out.reserve(owned.size());
  for (const auto& p : owned) out.push_back(p.get());
  return out;
}

}  // namespace

bool matches(const std::string& target, const std::string& name) {
  if (target.rfind("re:", 0) == 0) return std::regex_match(name, std::regex(target.substr(3)));
  if (target.find_first_of("*?[") != std::string::npos) return std::regex_match(name, std::regex(glob_to_regex(target)));
  if (name == target) return true;
  return name.size() > target.size() && name.compare(name.size() - target.size(), target.size(), target) == 0 &&
         name[name.size() - target.size() - 1] == '.';
}

bool matches_any(const std::vector<std::string>& targets, const std::string& canonical, const std::string& hf_path) {
  for (const auto& t : targets)
    if (matches(t, canonical) || (!hf_path.empty() && matches(t, hf_path))) return true;
  return false;
}

ModelViewImpl::ModelViewImpl() = default;
ModelViewImpl::~ModelViewImpl() = default;

const ModelInfo& ModelView::info() const { return ModelViewImpl::of(*this).info_; }
bool ModelView::training() const { return ModelViewImpl::of(*this).training_; }
std::vector<LinearSite*> ModelView::linear_sites() { return handles<LinearSite>(ModelViewImpl::of(*this).linears_); }
std::vector<SublayerSite*> ModelView::sublayer_sites() { return handles<SublayerSite>(ModelViewImpl::of(*this).sublayers_); }
std::vector<AttentionSite*> ModelView::attention_sites() { return handles<AttentionSite>(ModelViewImpl::of(*this).attentions_); }
std::vector<LayerSite*> ModelView::layer_sites() { return handles<LayerSite>(ModelViewImpl::of(*this).layer_sites_); }
EmbeddingSite* ModelView::embedding_site() { return ModelViewImpl::of(*this).embed_site_.get(); }
std::vector<ParameterSite*> ModelView::parameter_sites() { return handles<ParameterSite>(ModelViewImpl::of(*this).params_); }
OutputSite* ModelView::output_site() { return ModelViewImpl::of(*this).output_site_.get(); }

Tensor ModelView::attention_mask() const { return ModelViewImpl::of(*this).mask_; }
Tensor ModelView::token_samples() const {
  const auto& m = ModelViewImpl::of(*this);
  return m.rows_.defined() ? m.rows_.div(m.seq_, "floor") : Tensor();  // flat position in (B, S) -> row
}

std::vector<std::string> ModelView::sample_tags(const std::string& column) const {
  const auto& tags = ModelViewImpl::of(*this).tags_;
  auto it = tags.find(column);
  return it == tags.end() ? std::vector<std::string>{} : it->second;
}

const void* ModelView::extension(const char* id) const {
  if (id == nullptr) return nullptr;
  const auto& ext = ModelViewImpl::of(*this).extensions_;
  auto it = ext.find(id);
  return it == ext.end() ? nullptr : it->second;
}

std::vector<LinearSite*> ModelView::match_linear(const std::vector<std::string>& targets) {
  return pick(linear_sites(), targets);
}

std::vector<SublayerSite*> ModelView::match_sublayers(const std::vector<std::string>& targets) {
  return pick(sublayer_sites(), targets);
}

std::vector<AttentionSite*> ModelView::match_attention(const std::vector<std::string>& targets) {
  return pick(attention_sites(), targets);
}

std::vector<LayerSite*> ModelView::match_layers(const std::vector<std::string>& targets) {
  return pick(layer_sites(), targets);
}

std::vector<ParameterSite*> ModelView::match_parameters(const std::vector<std::string>& targets) {
  std::vector<ParameterSite*> out;
  for (ParameterSite* p : parameter_sites())
    if (matches_any(targets, p->name(), p->hf_name())) out.push_back(p);
  return out;
}

}  // namespace tessera
