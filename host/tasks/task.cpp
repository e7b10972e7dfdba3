#include "tasks/task.h"

#include "tasks/causal_lm.h"
#include "tasks/distillation.h"
#include "tasks/seq2seq.h"
#include "tasks/sequence_classification.h"
#include "tasks/token_classification.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <stdexcept>

namespace tessera {

Task::Task(const Config& config, Backbone& backbone, const Tokenizer& tokenizer, Labels labels)
    : config_(config), backbone_(backbone), tokenizer_(tokenizer) {
  // A learned position table ends somewhere: refuse a max_length past it now rather than
  // when a long enough text comes, maybe hours into training.
  const std::int64_t limit = backbone.max_tokens();
  if (limit > 0 && config.data.max_length > limit)
    throw std::runtime_error("[data] max_length = " + std::to_string(config.data.max_length) + " exceeds the " + std::to_string(limit) +
                             " positions of " + config.model.path);
  // Padding never reaches a real token's output; its id only has to be in range.
  const auto& special = backbone.special_ids();
  const std::int64_t config_pad = special.pad >= 0 ? special.pad : (special.eos.empty() ? 0 : special.eos[0]);
  pad_id_ = tokenizer.pad_id() >= 0 ? tokenizer.pad_id() : std::max<std::int64_t>(config_pad, 0);
  data_ = load_dataset(config.data, labels);
}

void Task::tokenize_with(const std::function<std::vector<std::int64_t>(const Example&, Split)>& encode) {
  for (const Split s : {Split::Train, Split::Test})
    for (const auto& e : examples(s)) ids_[s == Split::Train ? 0 : 1].push_back(encode(e, s));
}

Batch Task::batch(Split split, const std::vector<std::size_t>& order, std::size_t begin, std::size_t end) const {
  const auto& all_ids = token_ids(split);
  const std::vector<std::size_t> rows(order.begin() + static_cast<long>(begin), order.begin() + static_cast<long>(end));
  std::size_t T = config_.data.padding == "max_length" ? static_cast<std::size_t>(config_.data.max_length) : 0;
  for (auto i : rows) T = std::max(T, all_ids[i].size());
  const auto B = static_cast<std::int64_t>(rows.size());
  Batch b;
  b.ids = at::full({B, static_cast<std::int64_t>(T)}, pad_id_, at::kLong);
  b.mask = at::zeros({B, static_cast<std::int64_t>(T)}, at::kLong);
  auto ids_a = b.ids.accessor<std::int64_t, 2>();
  auto mask_a = b.mask.accessor<std::int64_t, 2>();
  for (std::int64_t r = 0; r < B; ++r) {
    const auto& ids = all_ids[rows[static_cast<std::size_t>(r)]];
    for (std::size_t t = 0; t < ids.size(); ++t) ids_a[r][static_cast<std::int64_t>(t)] = ids[t], mask_a[r][static_cast<std::int64_t>(t)] = 1;
    const auto& tags = examples(split)[rows[static_cast<std::size_t>(r)]].sample_tags;
    for (std::size_t k = 0; k < tags.size(); ++k) b.tags[config_.data.tag_columns[k]].push_back(tags[k]);
  }
  label(b, split, rows);
  const auto dev = backbone_.sites().info().options.device();
  for (Tensor* t : {&b.ids, &b.mask, &b.labels, &b.lm_labels, &b.decoder_ids})
    if (t->defined()) *t = t->to(dev);
  return b;
}

EvalResult Task::evaluate(Split split, const Share* share) {
  if (share != nullptr && (share->world <= 1 || !sums_add())) share = nullptr;
  at::NoGradGuard no_grad;
  SiteModel& model = backbone_.sites();
  const bool was_training = model.training();
  model.train(false);
  const auto n = examples(split).size();
  std::vector<std::size_t> order(n);
  for (std::size_t i = 0; i < n; ++i) order[i] = i;
  EvalResult sums;
  start(split);
  const auto bs = static_cast<std::size_t>(config_.train.eval_batch_size);
  for (std::size_t b = 0; b < n; b += bs) {
    if (share != nullptr && static_cast<std::int64_t>(b / bs) % share->world != share->rank) continue;
    const std::size_t end = std::min(n, b + bs);
    accumulate(batch(split, order, b, end), split, std::vector<std::size_t>(order.begin() + static_cast<long>(b), order.begin() + static_cast<long>(end)), sums);
  }
  model.train(was_training);
  if (share != nullptr) {
    const auto all = share->sum({sums.accuracy, sums.loss, static_cast<double>(sums.tokens)});
    sums.accuracy = all[0], sums.loss = all[1], sums.tokens = static_cast<std::int64_t>(all[2]);
  }
  sums.examples = static_cast<std::int64_t>(n);
  finish(sums, split);
  return sums;
}

std::unique_ptr<Task> make_task(const Config& config, Backbone& backbone, const Tokenizer& tokenizer) {
  const std::string& kind = config.task.kind;
  auto need = [&](BackboneKind k) {
    if (backbone.kind() != k)
      throw std::runtime_error("[task] kind = \"" + kind + "\" needs " + to_string(k) + ", but " + config.model.path + " (" +
                               backbone.sites().info().architecture + ") is " + to_string(backbone.kind()));
  };
  if (kind == "sequence-classification") return need(BackboneKind::Encoder), std::make_unique<SequenceClassification>(config, backbone, tokenizer);
  if (kind == "token-classification") return need(BackboneKind::Encoder), std::make_unique<TokenClassification>(config, backbone, tokenizer);
  if (kind == "causal-lm") return need(BackboneKind::Decoder), std::make_unique<CausalLm>(config, backbone, tokenizer);
  if (kind == "seq2seq") return need(BackboneKind::EncoderDecoder), std::make_unique<Seq2Seq>(config, backbone, tokenizer);
  if (kind == "distillation") return std::make_unique<Distillation>(config, backbone, tokenizer);
  throw std::logic_error("unknown task kind '" + kind + "' passed the config check");
}

}  // namespace tessera
