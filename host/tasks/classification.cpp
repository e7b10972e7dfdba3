#include "tasks/classification.h"

#include "formats/safetensors.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>

namespace tessera {

ClassificationTask::ClassificationTask(const Config& config, Backbone& backbone, const Tokenizer& tokenizer, Labels labels)
    : Task(config, backbone, tokenizer, labels) {
  const auto L = config.task.num_labels;
  if (L != 0 && L < static_cast<std::int64_t>(data_.label_names.size()))
    throw std::runtime_error("task.num_labels = " + std::to_string(L) + " but the data has " + std::to_string(data_.label_names.size()) + " labels");
}

void ClassificationTask::create_head() {
  const std::int64_t L = config_.task.num_labels ? config_.task.num_labels : static_cast<std::int64_t>(data_.label_names.size());
  const auto& info = backbone_.sites().info();
  const double bound = 1.0 / std::sqrt(static_cast<double>(info.hidden_size));  // nn.Linear's default init
  w_ = at::empty({L, info.hidden_size}, info.param_options).uniform_(-bound, bound).set_requires_grad(true);
  b_ = at::empty({L}, info.param_options).uniform_(-bound, bound).set_requires_grad(true);
}

Tensor ClassificationTask::classify(const Tensor& h) const { return at::linear(h.to(w_.scalar_type()), w_, b_); }

void ClassificationTask::load_head(const std::string& file) {
  at::NoGradGuard no_grad;
  const NamedTensors stored = read_safetensors(file);
  for (auto [name, t] : head()) {
    auto it = stored.find(name);
    if (it == stored.end()) throw SafetensorsError(file, name, "missing");
    if (it->second.sizes() != t.sizes())
      throw SafetensorsError(file, name, "has shape " + c10::str(it->second.sizes()) + ", the task needs " + c10::str(t.sizes()));
    t.copy_(it->second);
  }
}

}  // namespace tessera
