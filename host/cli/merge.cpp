// `tessera merge OUT ADAPTER... --weights w1,w2,... --combination TYPE`: several LoRA adapters
// (PEFT folders, or a run's adapter/<instance> folders) combined into one, as PEFT's
// add_weighted_adapter combines them (runtime/weighted_merge.h). Adapters of other mergeable
// methods (LoHa, LoKr, VeRA, AdaLoRA, DoRA …) join an svd combination through the updates their
// plugins compute on the model (--model; runtime/adapter_deltas.h). The result is a PEFT LoRA
// folder: `tessera generate --peft OUT`, or PeftModel.from_pretrained, applies it.
#include "cli/commands.h"

#include "architectures/backbone.h"
#include "formats/safetensors.h"
#include "formats/json_file.h"
#include "runtime/adapter_deltas.h"
#include "runtime/weighted_merge.h"

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <filesystem>
#include <memory>

namespace tessera {
namespace fs = std::filesystem;
namespace {

struct Args {
  std::string out, model, combination = "svd", majority_sign = "total";
  std::vector<std::string> adapters;
  std::vector<double> weights;
  std::optional<double> density, svd_clamp;
  std::optional<std::int64_t> svd_rank;
  std::uint64_t seed = 0;
  bool overwrite = false;
};

// A folder whose update is a pair of LoRA factors, which combine from the files alone.
bool plain_lora(const std::string& dir) {
  const fs::path cfg = fs::path(dir) / "adapter_config.json";
  return !fs::exists(cfg) || plain_lora_config(read_json_file(cfg.string()));  // a missing config: weighted_merge names it
}

int run(const Args& a, const PluginRegistry& registry) {
  WeightedMerge how;
  how.adapters = a.adapters;
  how.weights = a.weights;
  how.combination = a.combination;
  how.density = a.density;
  how.majority_sign = a.majority_sign;
  how.svd_rank = a.svd_rank;
  how.svd_clamp = a.svd_clamp;
  how.seed = a.seed;
  std::vector<std::string> others;  // adapters of other methods: their plugins compute their updates on the model
  for (const auto& d : a.adapters)
    if (!plain_lora(d)) others.push_back(d);
  if (!others.empty() && a.model.empty())
    throw std::runtime_error(others[0] + " is no plain LoRA adapter: its plugin computes its update on the base model; give the model (--model)");
  if (!a.model.empty()) {  // the order of its linear layers: PEFT's walk over the model's modules
    // Only its names are read unless an update is computed on it: then float32, as PEFT loads adapters.
    auto model = load_backbone(a.model, at::TensorOptions().dtype(others.empty() ? at::kBFloat16 : at::kFloat));
    for (auto* s : model->sites().linear_sites()) how.module_order.push_back(s->hf_path());
    for (const auto& d : others) how.deltas[d] = linear_weight_deltas(d, model->sites(), registry);
  }
  const fs::path out(a.out);
  if (fs::exists(out) && !fs::is_directory(out)) throw std::runtime_error(a.out + " exists and is not a directory");
  if (fs::exists(out) && !fs::is_empty(out) && !a.overwrite) throw std::runtime_error(a.out + " is not empty: pass --overwrite to replace it");
  const MergedAdapter merged = weighted_merge(how);  // everything read and checked before anything is written
  fs::create_directories(out);
  save_safetensors((out / "adapter_model.safetensors").string(), merged.tensors);
  write_file_atomic((out / "adapter_config.json").string(), merged.config_json + "\n");
  spdlog::info("{} adapter(s) combined ({}) into a LoRA of rank {} on {} modules: {}", a.adapters.size(), merged.combination, merged.rank,
               merged.tensors.size() / 2, a.out);
  return 0;
}

}  // namespace

Command merge_command() {
  auto a = std::make_shared<Args>();
  return {"merge", "combine adapters into one LoRA (linear, cat, svd, TIES, DARE: PEFT's add_weighted_adapter; other methods' updates by svd)",
          [a](CLI::App& c) {
            c.add_option("out", a->out, "folder to write the combined adapter to")->required();
            c.add_option("adapters", a->adapters, "PEFT adapter folders (a run's adapter/<instance>): LoRA, or any mergeable method's with --model and an svd combination")->required()->check(CLI::ExistingDirectory);
            c.add_option("--weights", a->weights, "one weight per adapter")->required()->delimiter(',');
            c.add_option("--combination", a->combination,
                         "svd (default), linear, cat, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd");
            c.add_option("--density", a->density, "share of entries kept by ties, dare_* and magnitude_prune*")->check(CLI::Range(0.0, 1.0));
            c.add_option("--majority-sign", a->majority_sign, "TIES's sign election: total (default) or frequency");
            c.add_option("--svd-rank", a->svd_rank, "rank of an svd combination (default: the largest input rank)")->check(CLI::PositiveNumber);
            c.add_option("--svd-clamp", a->svd_clamp, "clamp the svd factors to this quantile of their entries");
            c.add_option("--seed", a->seed, "seed of DARE's random masks (default 0)");
            c.add_option("--model", a->model, "the base model (HF folder): its module order, which DARE's masks follow; where other methods' updates are computed")->check(CLI::ExistingDirectory);
            c.add_flag("--overwrite", a->overwrite, "replace a non-empty OUT");
          },
          [a](const PluginRegistry& registry) { return run(*a, registry); }};
}

}  // namespace tessera
