// Everything one run works on: the base model (a Backbone), its tokenizer, the task
// (data, head, loss, metrics) and the attached method instances. `tessera train` and
// `tessera eval` both build one from a config, so evaluation sees exactly what training
// saw.
#pragma once

#include "architectures/backbone.h"
#include "runtime/config.h"
#include "runtime/method_stack.h"
#include "runtime/plugin_registry.h"
#include "tasks/task.h"
#include "tokenizers/tokenizer.h"
#include "tokenizers/tokenizer_extension.h"
#include "train/adapter_folder.h"

#include <tessera/extensions.h>

#include <memory>
#include <string>
#include <utility>

namespace tessera {

class Session {
 public:
  // `config` must have passed check_methods against `registry`.
  Session(Config config, const PluginRegistry& registry);
  ~Session();  // detaches every method before the model goes

  const Config& config() const { return config_; }
  Backbone& backbone() { return *backbone_; }
  SiteModel& model() { return backbone_->sites(); }
  const SiteModel& model() const { return backbone_->sites(); }
  Task& task() { return *task_; }
  const Task& task() const { return *task_; }
  const Dataset& data() const { return task_->data(); }
  MethodStack& methods() { return *methods_; }

  // The training step's batch and its own forward pass, for methods that read the pass or run
  // it again from extra_loss() (tessera.host.training); null outside it.
  void set_training_step(const Batch* b, const TaskOutput* out) { training_batch_ = b, step_output_ = out; }
  // Whether a method said its trainable tensors changed since the last call.
  bool take_trainable_changed() { return std::exchange(trainable_changed_, false); }

  std::int64_t base_parameter_count();
  std::int64_t trainable_parameter_count();

  // The adapter folder (train/adapter_folder.h): the methods' states and the task's head.
  void save_adapter(const std::string& dir);
  void load_adapter(const std::string& dir);

 private:
  AdapterManifest manifest() const;
  // The host extensions methods may ask the model for (tessera/extensions.h).
  void offer_extensions();
  Config config_;
  std::unique_ptr<Backbone> backbone_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<Task> task_;
  std::unique_ptr<MethodStack> methods_;
  const Batch* training_batch_ = nullptr;
  const TaskOutput* step_output_ = nullptr;
  bool trainable_changed_ = false;
  tessera_host_training_v2 training_ext_{};
  std::unique_ptr<TokenizerExtension> tokenizer_ext_;
};

c10::TensorOptions options_for(const ModelConfig& m);
// Whether the model's storage stage may keep quantized weights, so a GGUF file's blocks load
// streamed rather than dense (load_backbone's stream_blocks).
bool streams_blocks(const ModelConfig& m);

}  // namespace tessera
