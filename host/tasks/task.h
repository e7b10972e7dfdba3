// A task: what a run learns from its data. Each owns its tokenizing (text to ids, labels
// aligned), batching, head, loss and metrics; the backbone and the methods are the same
// for all. Kinds (config [task] kind):
//   sequence-classification  an encoder, pooled, a linear head        tasks/sequence_classification.h
//   token-classification     an encoder, a linear head per token      tasks/token_classification.h
//   causal-lm                a decoder and its own LM head            tasks/causal_lm.h
//   seq2seq                  an encoder-decoder, loss over the target tasks/seq2seq.h
//   distillation             any backbone learning its own base's states tasks/distillation.h
// `make_task` is the one place a kind is chosen by name.
#pragma once

#include "architectures/backbone.h"
#include "runtime/config.h"
#include "tokenizers/tokenizer.h"
#include "train/dataset.h"

#include <tessera/method.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace tessera {

enum class Split { Train, Test };

struct Batch {
  Tensor ids;        // (B, T) int64, padded on the right
  Tensor mask;       // (B, T) int64, 1 = token
  Tensor labels;     // (B) int64: classification
  Tensor lm_labels;  // token-classification (B, T): the word's tag on its first piece, else -100;
                     // causal-lm (B, T): the ids with -100 on padding and prompt tokens;
                     // seq2seq (B, U): the target ids with -100 on padding
  Tensor decoder_ids;  // seq2seq (B, U): [decoder start ; target[:-1]]
  std::map<std::string, std::vector<std::string>> tags;  // [data] tag_columns: column -> (B) values
};

// What one forward pass of a batch gives: the task's loss (scalar f32) and, for
// classification, the logits ((B, L) or (B, T, L)); undefined for language models.
struct TaskOutput {
  Tensor loss, logits;
};

// Sequence classification: accuracy and mean loss per example. Token classification: the
// same per labelled word (its first piece). Causal-lm and seq2seq: next-token
// accuracy, mean loss per predicted token and its exponential, the perplexity; seq2seq
// also the corpus BLEU of greedy outputs against the targets.
struct EvalResult {
  double accuracy = 0, loss = 0, perplexity = 0, bleu = 0;
  std::int64_t examples = 0, tokens = 0;
};

// One number of a result as a task reports it: its key in result.json and
// metrics.jsonl, and its label for people ("test perplexity").
struct Metric {
  std::string key, label;
  double value = 0;
  bool count = false;  // a number of tokens or words: written as an integer
};

class Task {
 public:
  virtual ~Task() = default;
  virtual const char* kind() const = 0;  // as [task] kind spells it
  const Dataset& data() const { return data_; }
  const std::vector<Example>& examples(Split split) const { return split == Split::Train ? data_.train : data_.test; }
  // Token ids of every example, special tokens included (tokenized once).
  const std::vector<std::vector<std::int64_t>>& token_ids(Split split) const { return ids_[split == Split::Train ? 0 : 1]; }
  // Examples order[begin, end) of a split, padded as [data] padding says, on the model's device.
  Batch batch(Split split, const std::vector<std::size_t>& order, std::size_t begin, std::size_t end) const;

  virtual TaskOutput forward(const Batch& b) = 0;
  // What forward()'s loss is a mean over, counted in a batch: examples here; labelled tokens
  // for the token-level losses. Data-parallel ranks weigh their gradients by their share of it.
  virtual std::int64_t loss_units(const Batch& b) const { return b.ids.size(0); }
  Tensor loss(const Batch& b) { return forward(b).loss; }
  // Over a whole split, gradients off, the model in eval mode (restored after). Shared by
  // data-parallel ranks (`share`): batch i goes to rank i mod world and the ranks' sums are
  // added before the means, unless the task's sums do not add (then each rank runs it all).
  struct Share {
    std::int64_t rank = 0, world = 1;
    std::function<std::vector<double>(const std::vector<double>&)> sum;  // over the ranks
  };
  EvalResult evaluate(Split split, const Share* share = nullptr);
  // Whether accumulate()'s sums (accuracy, loss, tokens) are all a result needs before finish():
  // Seq2Seq's BLEU keeps its sentences, so it does not split.
  virtual bool sums_add() const { return true; }
  // A result's numbers, the headline first.
  virtual std::vector<Metric> metrics(const EvalResult& r) const = 0;

  // The task's own trainable tensors (a classification head); empty when it has none.
  virtual NamedTensors head() const { return {}; }
  // Made after the methods attach, so the seeded initialisations keep their order.
  virtual void create_head() {}
  // Reads head() back from a file save_safetensors wrote; refuses a missing or misshapen tensor by name.
  virtual void load_head(const std::string& file) { (void)file; }
  // Runs a function with every method instance switched off: the base model alone. Given
  // once the methods are attached; a task that learns from the base itself keeps it.
  using BaseOnly = std::function<void(const std::function<void()>&)>;
  virtual void use_base_only(BaseOnly run) { (void)run; }

 protected:
  Task(const Config& config, Backbone& backbone, const Tokenizer& tokenizer, Labels labels);
  // Fills ids_ (and whatever per-example labels the task keeps) for both splits.
  void tokenize_with(const std::function<std::vector<std::int64_t>(const Example&, Split)>& encode);
  // Adds the task's labels to a batch whose ids, mask and tags are set.
  virtual void label(Batch& b, Split split, const std::vector<std::size_t>& rows) const = 0;
  // Before the first batch of an evaluation.
  virtual void start(Split split) { (void)split; }
  // Batch by batch over a split: the accumulating half of evaluate().
  virtual void accumulate(const Batch& b, Split split, const std::vector<std::size_t>& rows, EvalResult& sums) = 0;
  // Turns the sums into means once every batch is in.
  virtual void finish(EvalResult& r, Split split) const = 0;
  // What methods may read of the batch a forward pass is about to run (ModelView::sample_tags).
  void enter(const Batch& b) const { backbone_.sites().set_sample_tags(b.tags); }
  static std::int64_t row(const std::vector<std::size_t>& rows, std::int64_t r) { return static_cast<std::int64_t>(rows[static_cast<std::size_t>(r)]); }

  const Config& config_;
  Backbone& backbone_;
  const Tokenizer& tokenizer_;
  Dataset data_;
  std::int64_t pad_id_ = 0;
  std::vector<std::vector<std::int64_t>> ids_[2];
};

// Refuses a backbone of a kind the task cannot use, naming both.
std::unique_ptr<Task> make_task(const Config& config, Backbone& backbone, const Tokenizer& tokenizer);

}  // namespace tessera
