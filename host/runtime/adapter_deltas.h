// The update an adapter folder (PEFT's layout) makes to each linear weight of a model, as its
// own plugin computes it: attached, its tensors loaded, merged, every weight's change read off,
// then unmerged and detached (the model as it was, to rounding). `tessera merge` combines the
// updates of any mergeable method this way — LoHa, LoKr, VeRA, AdaLoRA, DoRA, (IA)³ … — by
// SVD into one LoRA, where PEFT's add_weighted_adapter takes LoRA alone.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>

namespace tessera {

class PluginRegistry;
class SiteModel;

// HF module path -> ΔW (out, in), float32, for every linear layer the adapter changes. Throws
// naming the folder: no plugin for its peft_type, a plugin that does not merge, or a merge that
// changes a tensor no LoRA can hold (a bias, a norm, an embedding), named.
std::map<std::string, at::Tensor> linear_weight_deltas(const std::string& peft_dir, SiteModel& model, const PluginRegistry& registry);

}  // namespace tessera
