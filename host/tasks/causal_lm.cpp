#include "tasks/causal_lm.h"

#include "tasks/head_loss.h"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

namespace tessera {

CausalLm::CausalLm(const Config& config, Backbone& backbone, const Tokenizer& tokenizer) : LanguageModelTask(config, backbone, tokenizer, Labels::None) {
  tokenize_with([&](const Example& e, Split s) { return encode(e, s); });
  refuse_empty_splits();
}

// [BOS] prompt text EOS; the template's special tokens come with the first part.
std::vector<std::int64_t> CausalLm::encode(const Example& e, Split split) {
  const auto max_length = static_cast<std::size_t>(config_.data.max_length);
  std::vector<std::int64_t> p = e.prompt.empty() ? std::vector<std::int64_t>{} : tokenizer_.encode(e.prompt);
  std::vector<std::int64_t> t = tokenizer_.encode(e.text, 0, e.prompt.empty());
  const auto& eos = backbone_.special_ids().eos;
  if (!eos.empty()) t.push_back(eos[0]);
  p.insert(p.end(), t.begin(), t.end());
  prompt_[split == Split::Train ? 0 : 1].push_back(static_cast<std::int64_t>(std::min(p.size() - t.size(), max_length)));
  if (p.size() > max_length) p.resize(max_length);
  return p;
}

// Truncation cuts from the end, so a long prompt can leave an example nothing to predict:
// say how many, and refuse a split where none is left (it trained on 0 tokens and
// reported a perplexity of 1).
void CausalLm::refuse_empty_splits() const {
  for (const Split s : {Split::Train, Split::Test}) {
    const auto& ids = token_ids(s);
    const auto& prompt = prompt_lengths(s);
    std::size_t empty = 0;
    for (std::size_t i = 0; i < ids.size(); ++i) empty += static_cast<std::size_t>(prompt[i]) >= ids[i].size();
    const std::string what = std::to_string(empty) + " of " + std::to_string(ids.size()) + " " + (s == Split::Train ? "training" : "test") +
                             " examples keep no '" + config_.data.text_column + "' token after their prompt at max_length = " +
                             std::to_string(config_.data.max_length);
    if (empty == ids.size()) throw std::runtime_error(config_.data.path + ": " + what + ": raise max_length or shorten the prompts");
    if (empty > 0) spdlog::warn("{}: {}; they add nothing to the loss", config_.data.path, what);
  }
}

void CausalLm::label(Batch& b, Split split, const std::vector<std::size_t>& rows) const {
  b.lm_labels = at::full(b.ids.sizes(), -100, at::kLong);
  auto a = b.lm_labels.accessor<std::int64_t, 2>();
  for (std::size_t r = 0; r < rows.size(); ++r) {
    const auto& ids = token_ids(split)[rows[r]];
    for (auto t = prompt_lengths(split)[rows[r]]; t < static_cast<std::int64_t>(ids.size()); ++t)
      a[static_cast<std::int64_t>(r)][t] = ids[static_cast<std::size_t>(t)];
  }
}

// Text position t (prompt tokens a method prepended are dropped) predicts label t + 1.
std::int64_t CausalLm::loss_units(const Batch& b) const {
  return b.lm_labels.narrow(1, 1, b.lm_labels.size(1) - 1).ne(-100).sum().item<std::int64_t>();
}

std::pair<Tensor, Tensor> CausalLm::head_rows(const Batch& b) const {
  const auto T = b.ids.size(1);
  Tensor h = backbone_.lm_states(b.ids, b.mask, Tensor());  // (B, T, H)
  return labelled_rows(h.narrow(1, 0, T - 1), b.lm_labels.narrow(1, 1, T - 1));
}

}  // namespace tessera
