#include "architectures/weight_storage.h"

#include "formats/nf4.h"

#include <ATen/ATen.h>

#include <stdexcept>

namespace tessera {

std::size_t store_weights(SiteModel& model, const std::string& format, bool double_quant) {
  if (format == "none") return 0;
  if (format != "nf4") throw std::invalid_argument("quantize = \"" + format + "\": not a storage format (none, nf4)");
  std::size_t n = 0;
  for (auto* site : model.linear_sites()) {
    const std::string& name = site->name();
    if (name.rfind("layers.", 0) != 0 && name.find(".layers.") == std::string::npos) continue;  // heads stay dense
    auto& w = ParameterSiteImpl::of(site->weight());
    if (w.stored() != nullptr || w.hf_name().find('[') != std::string::npos) continue;  // done, or a view of a fused weight
    w.store(nf4_storage(w.base_value(), 64, double_quant));
    ++n;
  }
  return n;
}

std::int64_t stored_bytes(const SiteModel& model) {
  std::int64_t n = 0;
  for (auto* p : const_cast<SiteModel&>(model).parameter_sites()) n += ParameterSiteImpl::of(*p).stored_bytes();
  return n;
}

}  // namespace tessera
