// The run configuration, read from TOML. Every error names file, line and column, and
// an unknown key comes with the nearest known one.
//
//   [model]  path, dtype ("f32" | "bf16"), device ("cpu" | "cuda" | "cuda:N")
//   [data]   path, format ("auto" | "csv" | "jsonl"), text_column, label_column,
//            prompt_column, target_column, test_fraction, seed, max_length, limit,
//            padding ("longest" | "max_length")
//   [task]   kind ("sequence-classification" | "token-classification" | "causal-lm" | "seq2seq"), num_labels,
//            pooling ("mean" | "cls")
//   [train]  epochs, batch_size, eval_batch_size, lr, head_lr, weight_decay,
//            warmup_ratio, max_grad_norm, threads, seed, max_steps, group_by_length, shuffle,
//            gradient_checkpointing, checkpoint_every, bucket_cap_mb, micro_batches,
//            ordered_reduction
//   [output] dir
//   [[methods]] plugin, name, targets, load, [methods.params] …
//   [[groups]]  name, kind, members, weights, normalize, tag (runtime/groups.h)
//
// Strings may use ${VAR} for environment variables; relative paths are taken from the
// config file's directory.
#pragma once

#include <tessera/params.h>

#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace tessera {

class PluginRegistry;

struct SourcePos {
  std::string file;
  int line = 0, column = 0;
  std::string str() const;  // "file:line:column"
};

class ConfigError : public std::runtime_error {
 public:
  ConfigError(const SourcePos& pos, const std::string& message) : std::runtime_error(pos.str() + ": " + message) {}
};

struct MethodConfig {
  std::string plugin, name;
  std::vector<std::string> targets;
  std::map<std::string, ParamValue> params;  // as written; checked by check_methods
  std::map<std::string, SourcePos> param_pos;
  SourcePos pos, params_pos;
  Params checked;                           // after check_methods: schema defaults filled
  std::map<std::string, ParamValue> defaults;  // after check_methods: the schema's default of every parameter
  // An adapter folder of this method to start from (its state is read after attaching): a
  // run's adapter/<name>, or what `tessera train` wrote for another run. Empty: fresh.
  std::string load;
  SourcePos load_pos;
};

// A composition group over method instances and other groups (runtime/groups.h).
struct GroupConfig {
  std::string name, kind;            // kind: stack | parallel | gated | average | route
  std::vector<std::string> members;  // instance or group names
  std::vector<double> weights;       // average: one per member; empty: equal
  bool normalize = true;             // average: weights divided by their sum
  std::string tag;                   // route: the [data] tag column naming each sample's member
  SourcePos pos;
  std::map<std::string, SourcePos> key_pos;  // where each key was written
  std::vector<SourcePos> member_pos;
  SourcePos at(const std::string& key) const { return key_pos.count(key) ? key_pos.at(key) : pos; }
};

struct ModelConfig {
  std::string path, dtype = "f32", device = "cpu";
  // The directory the tokenizer is read from; empty: `path` (a GGUF file's own tokenizer.ggml.*,
  // tokenizers/gguf_tokenizer.h).
  std::string tokenizer;
  const std::string& tokenizer_dir() const { return tokenizer.empty() ? path : tokenizer; }
  // How the layers' linear weights are kept: "none" (dense), "nf4" (QLoRA's 4-bit NormalFloat,
  // formats/nf4.h), with the block scales themselves quantized when double_quant is set, or
  // "gguf" (a GGUF path's own blocks, Q4_1 as Q4_1: formats/gguf_llama.h).
  // "fp4" (bitsandbytes' 4-bit float, the same blocks) and "int8" (LLM.int8()'s rows,
  // formats/int8.h) too. quantize_targets ([model.quantize_targets]): target patterns, as
  // methods' targets, and the format of the layer weights they match, over `quantize`.
  std::string quantize = "none";
  bool double_quant = false;
  std::vector<std::pair<std::string, std::string>> quantize_targets;
};

struct DataConfig {
  std::string path, format = "auto", text_column = "text", label_column = "label";
  // causal-lm: an optional prompt column; the loss covers text_column (the response) only.
  std::string prompt_column;
  // seq2seq: the target column; text_column is the source.
  std::string target_column;
  // Columns whose value each example carries as a tag (a task or adapter name), for methods
  // that route by sample (ModelView::sample_tags).
  std::vector<std::string> tag_columns;
  std::string padding = "longest";  // or "max_length": every batch padded to max_length
  double test_fraction = 0.2;
  std::int64_t seed = 13, max_length = 128, limit = 0;
};

struct TaskConfig {
  std::string kind = "sequence-classification", pooling = "mean";
  std::int64_t num_labels = 0;  // 0: from the data
};

struct TrainConfig {
  std::int64_t epochs = 3, batch_size = 32, eval_batch_size = 128, threads = 0, seed = 42, max_steps = 0;
  double lr = 1e-3, head_lr = 0, weight_decay = 0.01, warmup_ratio = 0.06, max_grad_norm = 1.0;
  bool group_by_length = false;  // batches of similar length (less padding), in shuffled order
  bool shuffle = true;           // false: every epoch visits the train split in its order
  // Layers keep only their inputs for backward and run again there (architectures/recompute.h):
  // one layer's activations held instead of all of them, for a second forward of the layers.
  bool gradient_checkpointing = false;
  // A resumable checkpoint every this many optimizer steps (0: only at the end of each
  // epoch), in the run directory's checkpoints/ (train/resume.h).
  std::int64_t checkpoint_every = 0;
  // Data-parallel: the size of the buckets whose gradients are all-reduced while backward
  // runs (DDP's bucket_cap_mb; the first bucket is 1 MiB as DDP's); train/distributed.h.
  double bucket_cap_mb = 25;
  // Each global batch computed in this many pieces whose gradients are summed, weighted by
  // their share of the batch (gradient accumulation): the update of the whole batch with the
  // activations of one piece. Piece k of rank r is what rank r·M + k of a run with M times
  // the ranks computes, with a random stream of its own (train/pass_streams.h).
  std::int64_t micro_batches = 1;
  // Data-parallel: each bucket's sum over the ranks is added in rank order (every rank's
  // bucket gathered, then 0 + 1 + … + N−1), not in the ring order of an all-reduce: N ranks
  // then take the steps of one process in N micro-batches bit for bit, for any N, at N times
  // the traffic (train/distributed.h).
  bool ordered_reduction = false;
};

struct Config {
  std::string file;
  ModelConfig model;
  DataConfig data;
  TaskConfig task;
  TrainConfig train;
  std::string output_dir = "runs/latest";
  std::vector<MethodConfig> methods;
  std::vector<GroupConfig> groups;
};

Config load_config(const std::string& path);
// Checks every method's parameters against its plugin's schema and its validate();
// fills MethodConfig::checked. Errors point at the key in the file.
void check_methods(Config& config, const PluginRegistry& registry);
// The config as TOML with every default filled in (written into the run directory).
std::string resolved_toml(const Config& config);

// The keys whose values differ between a resolved config written before (resolved_toml's
// text) and `now`'s, as "train.lr: 0.001 → 0.002" (methods by position:
// "methods[0].params.r"), in key order. A key `before` lacks — a host key or a plugin
// parameter added since it was written — counts only when `now` has it away from its
// default (a parameter's: its plugin's schema's, known once check_methods ran).
std::vector<std::string> config_differences(const std::string& before, const Config& now);

// Levenshtein-nearest candidate within a small distance, or "".
std::string nearest(const std::string& word, const std::vector<std::string>& candidates);

}  // namespace tessera
