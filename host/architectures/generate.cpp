#include "architectures/generate.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <functional>
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
    drop.narrow(-1, 0, 1).fill_(false);  // the most likely token always stays (top_p = 0 is greedy)
    logits = logits.scatter(-1, order, sorted.masked_fill(drop, off));
  }
  return at::multinomial(at::softmax(logits, -1), 1, false, gen).squeeze(1);
}

// ids, mask (B, T) on the CPU, padded on the `left` or right.
std::pair<Tensor, Tensor> pad(const std::vector<std::vector<std::int64_t>>& rows, std::int64_t pad_id, bool left) {
  std::size_t longest = 0;
  for (const auto& r : rows) {
    if (r.empty()) throw std::runtime_error("generate: an empty prompt (add the BOS token)");
    longest = std::max(longest, r.size());
  }
  const auto B = static_cast<std::int64_t>(rows.size()), T = static_cast<std::int64_t>(longest);
  Tensor ids = at::full({B, T}, pad_id, at::kLong), mask = at::zeros({B, T}, at::kLong);
  for (std::int64_t b = 0; b < B; ++b) {
    const auto& r = rows[static_cast<std::size_t>(b)];
    const auto n = static_cast<std::int64_t>(r.size()), start = left ? T - n : 0;
    ids[b].narrow(0, start, n).copy_(at::tensor(at::ArrayRef<std::int64_t>(r), at::kLong));
    mask[b].narrow(0, start, n).fill_(1);
  }
  return {ids, mask};
}

// The decoding loop shared by both kinds of model. step(ids, mask) runs the model on the
// new tokens (B, T) through its cache and returns the next-token logits (B, V).
std::vector<std::vector<std::int64_t>> run(const std::function<Tensor(const Tensor&, const Tensor&)>& step, Tensor ids, Tensor mask,
                                           const c10::Device& device, const GenerateOptions& o) {
  const auto B = ids.size(0);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  std::vector<std::vector<std::int64_t>> out(static_cast<std::size_t>(B));
  std::vector<bool> done(static_cast<std::size_t>(B), false);
  ids = ids.to(device), mask = mask.to(device);
  for (std::int64_t n = 0; n < o.max_new_tokens; ++n) {
    Tensor next = choose(step(ids, mask).to(at::kFloat).cpu(), o, gen);  // (B)
    bool all_done = true;
    for (std::int64_t b = 0; b < B; ++b) {
      const auto row = static_cast<std::size_t>(b);
      if (done[row]) {
        next[b] = o.pad_token_id;
        continue;
      }
      const std::int64_t t = next[b].item<std::int64_t>();
      out[row].push_back(t);
      if (std::find(o.eos_token_ids.begin(), o.eos_token_ids.end(), t) != o.eos_token_ids.end()) done[row] = true;
      all_done = all_done && done[row];
    }
    if (all_done) break;
    ids = next.view({B, 1}).to(device);
    mask = at::ones({B, 1}, at::TensorOptions().dtype(at::kLong).device(device));
  }
  return out;
}

}  // namespace

std::vector<std::vector<std::int64_t>> generate(const DecoderModel& model, const std::vector<std::vector<std::int64_t>>& prompts,
                                                const GenerateOptions& o) {
  at::NoGradGuard no_grad;
  auto [ids, mask] = pad(prompts, o.pad_token_id, /*left=*/true);
  // A learned position table (GPT-2) ends: say so before generating rather than at the
  // token that runs past it.
  if (const auto limit = model.max_tokens(); limit > 0 && ids.size(1) + o.max_new_tokens > limit)
    throw std::runtime_error("generate: a prompt of " + std::to_string(ids.size(1)) + " tokens and " + std::to_string(o.max_new_tokens) +
                             " new ones exceed the model's " + std::to_string(limit) + " positions (at most " +
                             std::to_string(std::max<std::int64_t>(0, limit - ids.size(1))) + " new tokens)");
  KVCache cache;
  Tensor seen_ids, seen_mask;  // (B, S): the whole sequence so far, when each step recomputes it
  const bool whole = model.output_reads_sequence();
  auto step = [&](const Tensor& new_ids, const Tensor& new_mask) {
    if (whole) {
      seen_ids = seen_ids.defined() ? at::cat({seen_ids, new_ids}, 1) : new_ids;
      seen_mask = seen_mask.defined() ? at::cat({seen_mask, new_mask}, 1) : new_mask;
    }
    Tensor hidden = whole ? model.forward(seen_ids, seen_mask) : model.forward(new_ids, new_mask, &cache);  // (B, T, H)
    return model.logits(hidden.select(1, hidden.size(1) - 1));
  };
  return run(step, ids, mask, model.info().options.device(), o);
}

std::vector<std::vector<std::int64_t>> generate(const T5Model& model, const std::vector<std::vector<std::int64_t>>& sources,
                                                const GenerateOptions& o) {
  at::NoGradGuard no_grad;
  const auto device = model.info().options.device();
  auto [src, src_mask] = pad(sources, model.config().pad_token_id, /*left=*/false);
  const Encoded encoded = model.encode(src.to(device), src_mask.to(device));
  Seq2SeqCache cache;
  Tensor seen;  // (B, U): the whole target so far, when each step recomputes it (an output transform)
  const bool whole = model.output_reads_sequence();
  auto step = [&](const Tensor& new_ids, const Tensor&) {
    if (whole) seen = seen.defined() ? at::cat({seen, new_ids}, 1) : new_ids;
    Tensor hidden = whole ? model.decode(seen, encoded) : model.decode(new_ids, encoded, &cache);  // (B, T, d)
    return model.logits(hidden.select(1, hidden.size(1) - 1));
  };
  const auto B = static_cast<std::int64_t>(sources.size());
  Tensor start = at::full({B, 1}, model.config().decoder_start_token_id, at::kLong);
  return run(step, start, at::ones_like(start), device, o);
}

}  // namespace tessera
