#include "tasks/token_classification.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace tessera {

TokenClassification::TokenClassification(const Config& config, Backbone& backbone, const Tokenizer& tokenizer)
    : ClassificationTask(config, backbone, tokenizer, Labels::PerWord) {
  // What the template puts around a text: "a" with and without special tokens.
  const auto with = tokenizer.encode("a"), without = tokenizer.encode("a", 0, false);
  const auto at = std::search(with.begin(), with.end(), without.begin(), without.end());
  before_.assign(with.begin(), at), after_.assign(at + static_cast<long>(without.size()), with.end());
  tokenize_with([&](const Example& e, Split s) { return encode(e, s); });
}

// The template's specials around the words' pieces, each word's tag on its first piece,
// truncated like the text.
std::vector<std::int64_t> TokenClassification::encode(const Example& e, Split split) {
  const auto max_length = static_cast<std::size_t>(config_.data.max_length);
  std::vector<std::int64_t> t = before_, tag(before_.size(), -100);
  for (std::size_t w = 0; w < e.words.size(); ++w) {
    const auto pieces = tokenizer_.encode(w == 0 ? e.words[w] : " " + e.words[w], 0, false);
    for (std::size_t k = 0; k < pieces.size(); ++k) t.push_back(pieces[k]), tag.push_back(k == 0 ? e.tags[w] : -100);
  }
  const std::size_t body = max_length > after_.size() ? max_length - after_.size() : 0;
  if (t.size() > body) t.resize(body), tag.resize(body);
  t.insert(t.end(), after_.begin(), after_.end()), tag.insert(tag.end(), after_.size(), -100);
  tags_[split == Split::Train ? 0 : 1].push_back(std::move(tag));
  return t;
}

void TokenClassification::label(Batch& b, Split split, const std::vector<std::size_t>& rows) const {
  b.lm_labels = at::full(b.ids.sizes(), -100, at::kLong);
  auto a = b.lm_labels.accessor<std::int64_t, 2>();
  for (std::size_t r = 0; r < rows.size(); ++r) {
    const auto& tags = tags_[split == Split::Train ? 0 : 1][rows[r]];
    for (std::size_t t = 0; t < tags.size(); ++t) a[static_cast<std::int64_t>(r)][static_cast<std::int64_t>(t)] = tags[t];
  }
}

std::int64_t TokenClassification::loss_units(const Batch& b) const { return b.lm_labels.ne(-100).sum().item<std::int64_t>(); }

TaskOutput TokenClassification::forward(const Batch& b) {
  enter(b);
  Encoded e = backbone_.encode(b.ids, b.mask);
  Tensor logits = classify(e.hidden.narrow(1, e.prompt_length, b.ids.size(1)));  // (B, T, L)
  Tensor loss = at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}), b.lm_labels.reshape({-1}), {}, at::Reduction::Mean, -100);
  return {loss, logits};
}

void TokenClassification::accumulate(const Batch& b, Split, const std::vector<std::size_t>&, EvalResult& sums) {
  Tensor logits = forward(b).logits, next = b.lm_labels;  // (B, T, L), (B, T)
  Tensor keep = next.ne(-100);
  sums.loss += at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}), next.reshape({-1}), {}, at::Reduction::Sum, -100).item<double>();
  sums.tokens += keep.sum().item<std::int64_t>();
  sums.accuracy += static_cast<double>(logits.argmax(-1).eq(next).logical_and(keep).sum().item<std::int64_t>());
}

void TokenClassification::finish(EvalResult& r, Split) const {
  const auto n = static_cast<double>(std::max<std::int64_t>(r.tokens, 1));
  r.accuracy /= n, r.loss /= n;
}

std::vector<Metric> TokenClassification::metrics(const EvalResult& r) const {
  return {{"accuracy", "test accuracy (per word)", r.accuracy}, {"loss", "test loss (per word)", r.loss},
          {"tokens", "test words", static_cast<double>(r.tokens), true}};
}

}  // namespace tessera
