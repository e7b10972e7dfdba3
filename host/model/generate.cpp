#include "model/generate.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <limits>
#include <stdexcept>

namespace tessera {
namespace {

// logits (B, V) f32 -> next tokens (B), on the CPU.
Tensor choose(Tensor logits, const GenerateOptions& o, at::Generator& gen) {
  if (!o.sample) return logits.argmax(-1);
  if (o.temperature <= 0) throw std::runtime_error("temperature must be positive");
  logits = logits / o.temperature;
  const float off = -std::numeric_limits<float>::infinity();
  if (o.top_k > 0 && o.top_k < logits.size(-1)) {
    Tensor kth = std::get<0>(logits.topk(o.top_k, -1)).narrow(-1, o.top_k - 1, 1);  // (B, 1)
    logits = logits.masked_fill(logits < kth, off);
  }
  if (o.top_p < 1.0) {
    // Keep the smallest set of most likely tokens whose mass reaches top_p.
    auto [sorted, order] = logits.sort(-1, /*descending=*/true);
    Tensor probs = at::softmax(sorted, -1);
    Tensor before = at::cumsum(probs, -1) - probs;  // mass of the tokens ranked above
    Tensor drop = before >= o.top_p;
    logits = logits.scatter(-1, order, sorted.masked_fill(drop, off));
  }
  return at::multinomial(at::softmax(logits, -1), 1, false, gen).squeeze(1);
}

}  // namespace

std::vector<std::vector<std::int64_t>> generate(const DecoderModel& model, const std::vector<std::vector<std::int64_t>>& prompts,
                                                const GenerateOptions& o) {
  at::NoGradGuard no_grad;
  const auto B = static_cast<std::int64_t>(prompts.size());
  std::size_t longest = 0;
  for (const auto& p : prompts) {
    if (p.empty()) throw std::runtime_error("generate: an empty prompt (add the BOS token)");
    longest = std::max(longest, p.size());
  }
  const auto T = static_cast<std::int64_t>(longest);
  Tensor ids = at::full({B, T}, o.pad_token_id, at::kLong), mask = at::zeros({B, T}, at::kLong);
  for (std::int64_t b = 0; b < B; ++b) {
    const auto& p = prompts[static_cast<std::size_t>(b)];
    const auto start = T - static_cast<std::int64_t>(p.size());
    ids[b].narrow(0, start, static_cast<std::int64_t>(p.size())).copy_(at::tensor(at::ArrayRef<std::int64_t>(p), at::kLong));
    mask[b].narrow(0, start, static_cast<std::int64_t>(p.size())).fill_(1);
  }
  const auto device = model.info().options.device();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  KVCache cache;
  std::vector<std::vector<std::int64_t>> out(static_cast<std::size_t>(B));
  std::vector<bool> done(static_cast<std::size_t>(B), false);
  Tensor step_ids = ids.to(device), step_mask = mask.to(device);
  for (std::int64_t n = 0; n < o.max_new_tokens; ++n) {
    Tensor hidden = model.forward(step_ids, step_mask, &cache);                          // (B, T, H)
    Tensor logits = model.logits(hidden.select(1, hidden.size(1) - 1)).to(at::kFloat).cpu();  // (B, V)
    Tensor next = choose(logits, o, gen);                                                // (B)
    bool all_done = true;
    for (std::int64_t b = 0; b < B; ++b) {
      auto& row = out[static_cast<std::size_t>(b)];
      if (done[static_cast<std::size_t>(b)]) {
        next[b] = o.pad_token_id;
        continue;
      }
      const std::int64_t t = next[b].item<std::int64_t>();
      row.push_back(t);
      if (std::find(o.eos_token_ids.begin(), o.eos_token_ids.end(), t) != o.eos_token_ids.end()) done[static_cast<std::size_t>(b)] = true;
      all_done = all_done && done[static_cast<std::size_t>(b)];
    }
    if (all_done) break;
    step_ids = next.view({B, 1}).to(device);
    step_mask = at::ones({B, 1}, at::TensorOptions().dtype(at::kLong).device(device));
  }
  return out;
}

}  // namespace tessera
