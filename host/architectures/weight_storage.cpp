#include "architectures/weight_storage.h"

#include "formats/checkpoint.h"
#include "formats/gguf_llama.h"
#include "formats/nf4.h"
#include "formats/safetensors.h"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <cstddef>
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

std::size_t store_weights(SiteModel& model, const std::string& quantize, bool double_quant, const std::map<std::string, std::string>& requested,
                          const std::string& source) {
  if (quantize != "none" && quantize != "nf4" && quantize != "gguf") throw std::invalid_argument("quantize = \"" + quantize + "\": not a storage format (none, nf4, gguf)");
  std::shared_ptr<const GgufFile> gguf;  // "gguf": the blocks of the file the model came from, by Hugging Face name
  std::map<std::string, std::string> gguf_names;
  if (quantize == "gguf") {
    if (!is_gguf_file(source)) throw std::invalid_argument("quantize = \"gguf\" keeps a GGUF file's own blocks, and " + source + " is no GGUF file");
    gguf = GgufFile::open(source);
    gguf_names = gguf_names_by_hf(*gguf);
  }
  const std::vector<View> views = fused_views(model);  // before their wholes lose their dense tensors
  std::size_t n = 0, released = 0;
  for (auto* site : model.linear_sites()) {
    const std::string& name = site->name();
    const auto asked = requested.find(name);
    const bool in_layers = name.rfind("layers.", 0) == 0 || name.find(".layers.") != std::string::npos;  // heads stay dense
    const bool kept = matches_any(model.keep_dense(), name, site->hf_path());  // T5's wo, as transformers
    const std::string format = asked != requested.end() ? asked->second : in_layers && !kept ? quantize : "none";
    if (format == "none") continue;
    if (format != "nf4" && !(format == "gguf" && gguf)) throw std::invalid_argument("linear site " + name + ": a method asked for storage \"" + format + "\", which is not one (nf4)");
    auto& w = ParameterSiteImpl::of(site->weight());
    if (w.hf_name().find('[') != std::string::npos) {  // a view: it follows its whole, below
      if (asked != requested.end())
        throw std::invalid_argument("linear site " + name + " is a row block of a fused weight (" + w.hf_name() + "): ask for the fused site's storage");
      continue;
    }
    if (w.stored() != nullptr) continue;
    const Tensor dense = w.dense_base();
    if (format == "gguf") {
      const auto it = gguf_names.find(w.hf_name());
      if (it == gguf_names.end()) throw std::invalid_argument(source + " has no tensor for linear site " + name + " (" + w.hf_name() + ")");
      w.store(gguf_storage(gguf, it->second, dense.options()));
    } else {
      w.store(nf4_storage(dense, 64, double_quant));
    }
    released += release_mapped_pages(dense);  // the checkpoint's pages of it: read once, never again
    ++n;
  }
  // The views of a stored whole read their rows from it: the fused product and the split
  // ones see the same weights, and the whole's dense tensor is freed.
  for (const auto& v : views)
    if (v.whole->stored() != nullptr && v.view->stored() == nullptr) {
      const auto rows = v.view->sizes()[0];
      v.view->store(std::make_unique<RowBlock>(*v.whole, v.start, rows));
    }
  if (n > 0 && gguf) spdlog::info("{} linear weights kept as the GGUF file's own blocks", n);
  else if (n > 0)
    spdlog::info("{} linear weights kept as NF4{}; {} MiB of the checkpoint's mapped pages released", n, double_quant ? " (double quantization)" : "",
                 released >> 20);
  return n;
}

}  // namespace tessera
