#include "tasks/seq2seq.h"

#include "tasks/bleu.h"
#include "tasks/head_loss.h"

#include <ATen/ATen.h>

namespace tessera {

Seq2Seq::Seq2Seq(const Config& config, Backbone& backbone, const Tokenizer& tokenizer) : LanguageModelTask(config, backbone, tokenizer, Labels::None) {
  const auto max_length = static_cast<std::size_t>(config.data.max_length);
  tokenize_with([&](const Example& e, Split s) {
    targets_[s == Split::Train ? 0 : 1].push_back(tokenizer.encode(e.target, max_length));
    return tokenizer.encode(e.text, max_length);
  });
}

// Teacher forcing: the decoder reads the target shifted right by one.
void Seq2Seq::label(Batch& b, Split split, const std::vector<std::size_t>& rows) const {
  const auto& targets = targets_[split == Split::Train ? 0 : 1];
  std::size_t U = 0;
  for (auto i : rows) U = std::max(U, targets[i].size());
  const auto B = static_cast<std::int64_t>(rows.size());
  b.decoder_ids = at::full({B, static_cast<std::int64_t>(U)}, pad_id_, at::kLong);
  b.lm_labels = at::full({B, static_cast<std::int64_t>(U)}, -100, at::kLong);
  auto dec = b.decoder_ids.accessor<std::int64_t, 2>();
  auto lab = b.lm_labels.accessor<std::int64_t, 2>();
  for (std::int64_t r = 0; r < B; ++r) {
    const auto& t = targets[rows[static_cast<std::size_t>(r)]];
    dec[r][0] = backbone_.special_ids().decoder_start;
    for (std::size_t u = 0; u < t.size(); ++u) {
      lab[r][static_cast<std::int64_t>(u)] = t[u];
      if (u + 1 < U) dec[r][static_cast<std::int64_t>(u + 1)] = t[u];
    }
  }
}

// Decoder position t predicts label t.
std::pair<Tensor, Tensor> Seq2Seq::head_rows(const Batch& b) const {
  return labelled_rows(backbone_.lm_states(b.ids, b.mask, b.decoder_ids), b.lm_labels);
}

std::vector<std::string> Seq2Seq::generate_text(Split split, const std::vector<std::size_t>& order, std::size_t begin, std::size_t end) {
  std::vector<std::vector<std::int64_t>> sources;
  Batch tagged;  // the examples' tags, for methods that route by them
  for (std::size_t i = begin; i < end; ++i) {
    sources.push_back(token_ids(split)[order[i]]);
    const auto& tags = examples(split)[order[i]].sample_tags;
    for (std::size_t k = 0; k < tags.size(); ++k) tagged.tags[config_.data.tag_columns[k]].push_back(tags[k]);
  }
  enter(tagged);
  GenerateOptions o;
  o.max_new_tokens = config_.data.max_length;
  std::vector<std::string> out;
  for (const auto& ids : backbone_.generate(sources, o)) out.push_back(tokenizer_.decode(ids));
  return out;
}

void Seq2Seq::accumulate(const Batch& b, Split split, const std::vector<std::size_t>& rows, EvalResult& sums) {
  auto texts = generate_text(split, rows, 0, rows.size());
  hypotheses_.insert(hypotheses_.end(), texts.begin(), texts.end());
  LanguageModelTask::accumulate(b, split, rows, sums);
}

void Seq2Seq::finish(EvalResult& r, Split split) const {
  LanguageModelTask::finish(r, split);
  std::vector<std::string> references;
  for (const auto& e : examples(split)) references.push_back(e.target);
  r.bleu = corpus_bleu(hypotheses_, references).score;
}

std::vector<Metric> Seq2Seq::metrics(const EvalResult& r) const {
  std::vector<Metric> m = LanguageModelTask::metrics(r);
  m.insert(m.begin(), Metric{"bleu", "test BLEU", r.bleu});
  return m;
}

}  // namespace tessera
