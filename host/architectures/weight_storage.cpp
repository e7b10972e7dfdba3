#include "architectures/weight_storage.h"

#include "formats/checkpoint.h"
#include "formats/gguf_llama.h"
#include "formats/int8.h"
#include "formats/nf4.h"
#include "formats/safetensors.h"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstddef>
#include <set>
#include <stdexcept>
#include <vector>

namespace tessera {

namespace {

// A linear weight that is a row block of another (GPT-2's q, k, v of c_attn), found by its
// Hugging Face name ("…c_attn.weight[q]") and its offset into the whole.
struct View {
  ParameterSiteImpl* view;
  const ParameterSiteImpl* whole;
  std::int64_t start;
};

std::vector<View> fused_views(SiteModel& model) {
  std::map<std::string, const ParameterSiteImpl*> by_hf;
  for (auto* p : model.parameter_sites()) by_hf[p->hf_name()] = &ParameterSiteImpl::of(*p);
  std::vector<View> views;
  for (auto* site : model.linear_sites()) {
    auto& w = ParameterSiteImpl::of(site->weight());
    const auto bracket = w.hf_name().find('[');
    if (bracket == std::string::npos) continue;
    const auto it = by_hf.find(w.hf_name().substr(0, bracket));
    if (it == by_hf.end() || !w.dense_base().defined() || !it->second->dense_base().defined()) continue;
    const Tensor& whole = it->second->dense_base();
    const auto offset = (static_cast<const char*>(w.dense_base().data_ptr()) - static_cast<const char*>(whole.data_ptr())) /
                        static_cast<std::ptrdiff_t>(whole.element_size());
    views.push_back({&w, it->second, offset / whole.stride(0)});
  }
  return views;
}

}  // namespace

namespace {

bool is_format(const std::string& f) { return f == "none" || f == "nf4" || f == "fp4" || f == "int8" || f == "gguf"; }

// What [model] quantize_targets asks of a site: the one format of the patterns it matches;
// "" when none does. Two patterns asking differently of one site are refused.
std::string override_of(const std::vector<std::pair<std::string, std::string>>& overrides, const LinearSite& site, std::set<std::string>& used) {
  std::string format, by;
  for (const auto& [pattern, f] : overrides) {
    if (!matches_any({pattern}, site.name(), site.hf_path())) continue;
    used.insert(pattern);
    if (!format.empty() && f != format)
      throw std::invalid_argument("quantize_targets: linear site " + site.name() + " matches '" + by + "' (" + format + ") and '" + pattern + "' (" + f + ")");
    format = f, by = pattern;
  }
  return format;
}

// A weight the loader kept as the GGUF file's blocks (Checkpoint::take_blocks), not made dense
// yet: the plan decides what it becomes, one weight at a time.
bool as_loaded_blocks(const ParameterSiteImpl& w) { return w.stored() != nullptr && std::string(w.stored()->format()) == "gguf"; }

std::unique_ptr<StoredTensor> stored_as(const std::string& format, const Tensor& dense, bool double_quant) {
  if (format == "int8") return int8_storage(dense);
  return nf4_storage(dense, 64, double_quant, format);  // nf4, fp4
}

}  // namespace

namespace {

struct Planned {
  ParameterSiteImpl* weight;
  std::string format, gguf_name;
};

// Every linear weight's format, decided — and any refusal made — before a weight changes.
std::vector<Planned> plan(SiteModel& model, const std::string& quantize, const std::map<std::string, std::string>& requested,
                          const std::vector<std::pair<std::string, std::string>>& overrides, const std::map<std::string, std::string>* gguf_names,
                          const std::string& source) {
  std::vector<Planned> out;
  std::set<std::string> used;                  // quantize_targets patterns that matched
  std::set<const ParameterSiteImpl*> planned;  // a weight two sites share is stored once
  for (auto* site : model.linear_sites()) {
    const std::string& name = site->name();
    const auto asked = requested.find(name);
    const bool in_layers = name.rfind("layers.", 0) == 0 || name.find(".layers.") != std::string::npos;  // heads stay dense
    const bool kept = matches_any(model.keep_dense(), name, site->hf_path());  // T5's wo, as transformers
    const std::string over = in_layers ? override_of(overrides, *site, used) : "";  // the config's, for this site
    const std::string format = asked != requested.end() ? asked->second : !over.empty() ? over : in_layers && !kept ? quantize : "none";
    auto& w = ParameterSiteImpl::of(site->weight());
    if (format == "none" && !as_loaded_blocks(w)) continue;
    if (!is_format(format) || (format == "gguf" && gguf_names == nullptr))
      throw std::invalid_argument("linear site " + name + ": a method asked for storage \"" + format + "\", which is not one (nf4, fp4, int8)");
    if (w.hf_name().find('[') != std::string::npos) {  // a view: it follows its whole
      if (asked != requested.end())
        throw std::invalid_argument("linear site " + name + " is a row block of a fused weight (" + w.hf_name() + "): ask for the fused site's storage");
      continue;
    }
    if ((w.stored() != nullptr && !as_loaded_blocks(w)) || !planned.insert(&w).second) continue;
    std::string gguf_name;
    if (format == "gguf") {
      const auto it = gguf_names->find(w.hf_name());
      if (it == gguf_names->end()) throw std::invalid_argument(source + " has no tensor for linear site " + name + " (" + w.hf_name() + ")");
      gguf_name = it->second;
    }
    out.push_back({&w, format, gguf_name});
  }
  for (const auto& o : overrides)
    if (!used.count(o.first)) throw std::invalid_argument("quantize_targets: '" + o.first + "' matches no linear site of the model's layers");
  return out;
}

}  // namespace

std::size_t store_weights(SiteModel& model, const std::string& quantize, bool double_quant, const std::map<std::string, std::string>& requested,
                          const std::string& source, const std::vector<std::pair<std::string, std::string>>& overrides) {
  if (!is_format(quantize)) throw std::invalid_argument("quantize = \"" + quantize + "\": not a storage format (none, nf4, fp4, int8, gguf)");
  std::shared_ptr<const GgufFile> gguf;  // "gguf": the blocks of the file the model came from, by Hugging Face name
  std::map<std::string, std::string> gguf_names;
  const bool gguf_asked = quantize == "gguf" || std::any_of(overrides.begin(), overrides.end(), [](const auto& o) { return o.second == "gguf"; });
  if (gguf_asked) {
    if (!is_gguf_file(source)) throw std::invalid_argument("quantize = \"gguf\" keeps a GGUF file's own blocks, and " + source + " is no GGUF file");
    gguf = GgufFile::open(source);
    gguf_names = gguf_names_by_hf(*gguf);
  }
  const std::vector<Planned> planned = plan(model, quantize, requested, overrides, gguf ? &gguf_names : nullptr, source);
  const std::vector<View> views = fused_views(model);  // before their wholes lose their dense tensors
  std::size_t released = 0;
  std::map<std::string, std::size_t> counts;  // format -> weights
  for (const auto& p : planned) {
    ++counts[p.format];
    if (as_loaded_blocks(*p.weight)) {  // streamed: the file's blocks, dequantized here if at all
      if (p.format == "gguf") continue;
      const Tensor dense = p.weight->stored()->dense();
      released += release_file_pages(*p.weight->stored());  // read once into `dense`, never again
      if (p.format == "none") p.weight->unstore(dense);
      else p.weight->store(stored_as(p.format, dense, double_quant));
      continue;
    }
    const Tensor dense = p.weight->dense_base();
    p.weight->store(p.format == "gguf" ? gguf_storage(gguf, p.gguf_name, dense.options()) : stored_as(p.format, dense, double_quant));
    released += release_mapped_pages(dense);  // the checkpoint's pages of it: read once, never again
  }
  counts.erase("none");
  std::size_t n = 0;
  for (const auto& [_, k] : counts) n += k;
  // The views of a stored whole read their rows from it: the fused product and the split
  // ones see the same weights, and the whole's dense tensor is freed.
  for (const auto& v : views)
    if (v.whole->stored() != nullptr && v.view->stored() == nullptr) {
      const auto rows = v.view->sizes()[0];
      v.view->store(std::make_unique<RowBlock>(*v.whole, v.start, rows));
    }
  std::string kinds;
  for (const auto& [f, k] : counts) kinds += (kinds.empty() ? "" : ", ") + std::to_string(k) + " as " + (f == "gguf" ? "the GGUF file's own blocks" : f);
  if (n > 0)
    spdlog::info("linear weights kept quantized: {}{}; {} MiB of the checkpoint's mapped pages released", kinds,
                 double_quant && (counts.count("nf4") || counts.count("fp4")) ? " (4-bit scales double-quantized)" : "", released >> 20);
  return n;
}

}  // namespace tessera
