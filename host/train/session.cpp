#include "train/session.h"

#include "runtime/device.h"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <filesystem>

namespace tessera {
namespace fs = std::filesystem;

c10::TensorOptions options_for(const ModelConfig& m) {
  const c10::Device device = rank_device(m.device);
  prepare_device(device);
  return c10::TensorOptions().dtype(m.dtype == "bf16" ? at::kBFloat16 : at::kFloat).device(device);
}

bool streams_blocks(const ModelConfig& m) { return m.quantize != "none" || !m.quantize_targets.empty(); }

Session::Session(Config config, const PluginRegistry& registry) : config_(std::move(config)) {
  backbone_ = load_backbone(config_.model.path, options_for(config_.model), streams_blocks(config_.model));
  for (const auto& n : model().ignored_tensors()) spdlog::debug("checkpoint tensor {} is not used by the model", n);
  tokenizer_ = load_tokenizer(config_.model.tokenizer_dir());
  task_ = make_task(config_, *backbone_, *tokenizer_);
  at::manual_seed(static_cast<std::uint64_t>(config_.train.seed));
  offer_extensions();
  methods_ = std::make_unique<MethodStack>(registry, config_.methods, model(), config_.model, config_.groups);
  model().drop_dense_copies();
  task_->use_base_only([this](const std::function<void()>& f) { methods_->base_only(f); });
  task_->create_head();
  if (config_.train.gradient_checkpointing) model().set_gradient_checkpointing(true);
}

Session::~Session() { methods_.reset(); }  // before the model they are attached to

void Session::offer_extensions() {
  training_ext_ = {{sizeof(tessera_host_training_v2), 2}, this,
                   [](void* host, const char*) { static_cast<Session*>(host)->trainable_changed_ = true; },
                   [](void* host, Tensor* loss, Tensor* logits) {
                     auto& s = *static_cast<Session*>(host);
                     if (s.training_batch_ == nullptr) throw std::runtime_error("forward_again runs only inside extra_loss() of a training step");
                     TaskOutput out = s.task_->forward(*s.training_batch_);
                     *loss = out.loss, *logits = out.logits;
                   },
                   [](void* host, Tensor* loss, Tensor* logits) {
                     auto& s = *static_cast<Session*>(host);
                     if (s.step_output_ == nullptr) throw std::runtime_error("step_output is there only inside extra_loss() of a training step");
                     *loss = s.step_output_->loss, *logits = s.step_output_->logits;
                   }};
  tokenizer_ext_ = std::make_unique<TokenizerExtension>(*tokenizer_);
  model().set_extension(TESSERA_EXT_HOST_TRAINING, &training_ext_);
  model().set_extension(TESSERA_EXT_HOST_TOKENIZER, tokenizer_ext_->table());
}

std::int64_t Session::base_parameter_count() {
  std::int64_t n = 0;
  for (auto* p : model().parameter_sites()) n += ParameterSiteImpl::of(*p).numel();
  return n;
}

std::int64_t Session::trainable_parameter_count() {
  std::int64_t n = methods_->trainable_count();
  for (const auto& [_, t] : task_->head()) n += t.numel();
  return n;
}

AdapterManifest Session::manifest() const {
  return {config_.task.kind, model().info().architecture, config_.task.pooling, data().label_names};
}

void Session::save_adapter(const std::string& dir) { tessera::save_adapter(dir, *methods_, task_->head(), manifest()); }

void Session::load_adapter(const std::string& dir) {
  tessera::load_adapter(dir, *methods_, manifest());
  if (!task_->head().empty()) task_->load_head((fs::path(dir) / "head.safetensors").string());
}

}  // namespace tessera
