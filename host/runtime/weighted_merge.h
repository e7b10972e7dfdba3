// Weighted combination of LoRA adapters into one, as PEFT's LoraModel.add_weighted_adapter
// makes it, on adapter folders alone (PEFT's layout: adapter_config.json and
// adapter_model.safetensors): `tessera merge`. Adapters of other mergeable methods join the
// svd kinds through their updates ΔW, which the caller computes (WeightedMerge::deltas).
//
//   linear / ties / dare_linear / dare_ties / magnitude_prune: the A's and the B's combined
//     apart, adapter i weighted √|wᵢsᵢ|·sign(wᵢsᵢ) in A and √|wᵢsᵢ| in B (sᵢ its scale); all
//     of one rank, which the result keeps
//   cat: A = [w₁s₁A₁; w₂s₂A₂; …], B = [B₁ B₂ …]: rank Σ rᵢ, exactly Σ wᵢ sᵢ Bᵢ Aᵢ
//   svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd: the deltas
//     ΔWᵢ = sᵢ Bᵢ Aᵢ combined, then cut to rank svd_rank by SVD (B = U S, A = Vᴴ), the entries
//     optionally clamped to the svd_clamp quantile of their magnitudes
//
// TIES (Yadav et al. 2023): each tensor keeps its `density` share of largest magnitudes, a
// sign per entry by majority (summed values, or counts), the agreeing entries averaged. DARE
// (Yu et al. 2024): each tensor keeps entries at random with probability `density`, rescaled
// by 1/density; the draws come from torch's CPU generator seeded with `seed`, in PEFT's order
// — the model's modules in order, per module the A's then the B's (or the deltas), adapter by
// adapter. PEFT draws from torch's global generator, after the new adapter's own random init
// has drawn from it too: with its generator seeded where the combination's draws begin (as
// the test does), and `module_order` the model's, the masks are PEFT's.
// The result has scale 1 (lora_alpha = r).
#pragma once

#include <ATen/core/Tensor.h>
#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace tessera {

struct WeightedMerge {
  std::vector<std::string> adapters;  // PEFT LoRA folders
  std::vector<double> weights;        // one per adapter
  std::string combination = "svd";
  std::optional<double> density;      // ties, dare_*, magnitude_prune*: required
  std::string majority_sign = "total";  // or "frequency"
  std::optional<std::int64_t> svd_rank;  // default: the largest input rank
  std::optional<double> svd_clamp;       // a quantile in (0, 1]
  std::uint64_t seed = 0;                // dare_*
  std::vector<std::string> module_order;  // HF module paths in the model's order (dare_* needs it)
  // Adapters that are no plain LoRA (LoHa, LoKr, VeRA, AdaLoRA, DoRA …): folder -> HF module
  // path -> ΔW (out, in), as their plugins compute them (runtime/adapter_deltas.h). They combine
  // through the svd kinds only, at an svd_rank that must be given.
  std::map<std::string, std::map<std::string, at::Tensor>> deltas;
};

struct MergedAdapter {
  std::map<std::string, at::Tensor> tensors;  // PEFT's keys
  std::string config_json;                    // adapter_config.json
  std::int64_t rank = 0;
  std::string combination;  // as applied ("linear" for a single adapter, as PEFT)
};

// Throws std::runtime_error naming the folder and key or option that is wrong.
MergedAdapter weighted_merge(const WeightedMerge& how);

// An adapter_config.json whose update is a pair of LoRA factors (peft_type LORA, no DoRA):
// such folders combine from their files alone; others need WeightedMerge::deltas.
bool plain_lora_config(const nlohmann::json& config);

}  // namespace tessera
