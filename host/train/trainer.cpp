#include "train/trainer.h"

#include "model/safetensors.h"
#include "train/progress.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

namespace tessera {
namespace fs = std::filesystem;

void set_threads(std::int64_t threads) {
  const auto n = threads > 0 ? threads : static_cast<std::int64_t>(std::max(1u, std::thread::hardware_concurrency()));
  at::set_num_threads(static_cast<int>(n));
}

EvalResult evaluate(Session& s, const std::vector<Example>& split) {
  at::NoGradGuard no_grad;
  const bool was_training = s.model().training();
  s.model().train(false);
  std::vector<std::size_t> order(split.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  EvalResult r;
  std::int64_t correct = 0;
  double loss_sum = 0;
  const auto bs = static_cast<std::size_t>(s.config().train.eval_batch_size);
  for (std::size_t b = 0; b < split.size(); b += bs) {
    Batch batch = s.batch(split, order, b, std::min(split.size(), b + bs));
    Tensor logits = s.logits(batch).to(at::kFloat);  // (B, L)
    loss_sum += at::cross_entropy_loss(logits, batch.labels, {}, at::Reduction::Sum).item<double>();
    correct += logits.argmax(-1).eq(batch.labels).sum().item<std::int64_t>();
  }
  s.model().train(was_training);
  r.examples = static_cast<std::int64_t>(split.size());
  r.accuracy = static_cast<double>(correct) / static_cast<double>(r.examples);
  r.loss = loss_sum / static_cast<double>(r.examples);
  return r;
}

TrainResult train(Session& s, const std::string& run_dir) {
  const auto& cfg = s.config().train;
  fs::create_directories(run_dir);
  std::ofstream metrics(fs::path(run_dir) / "metrics.jsonl", std::ios::app);
  auto log_metric = [&](const nlohmann::json& j) { metrics << j.dump() << "\n" << std::flush; };

  // Two groups: method tensors at lr, the head at head_lr (lr when 0).
  std::vector<Tensor> method_params, head_params;
  for (auto& m : s.methods())
    for (auto& [_, t] : m->call("trainable", [](Method& x) { return x.trainable(); })) method_params.push_back(t);
  for (auto& [_, t] : s.head()) head_params.push_back(t);
  const double head_lr = cfg.head_lr > 0 ? cfg.head_lr : cfg.lr;
  std::vector<torch::optim::OptimizerParamGroup> groups;
  auto group = [&](std::vector<Tensor> params, double lr) {
    auto o = std::make_unique<torch::optim::AdamWOptions>(lr);
    o->weight_decay(cfg.weight_decay);
    groups.emplace_back(std::move(params), std::move(o));
  };
  if (!method_params.empty()) group(method_params, cfg.lr);
  group(head_params, head_lr);
  torch::optim::AdamW opt(groups, torch::optim::AdamWOptions(cfg.lr).weight_decay(cfg.weight_decay));
  std::vector<double> base_lr;
  for (auto& g : opt.param_groups()) base_lr.push_back(static_cast<torch::optim::AdamWOptions&>(g.options()).lr());
  std::vector<Tensor> all_params = method_params;
  all_params.insert(all_params.end(), head_params.begin(), head_params.end());

  const auto& train_set = s.data().train;
  const auto bs = static_cast<std::size_t>(cfg.batch_size);
  const std::int64_t per_epoch = static_cast<std::int64_t>((train_set.size() + bs - 1) / bs);
  std::int64_t total = per_epoch * cfg.epochs;
  if (cfg.max_steps > 0) total = std::min(total, cfg.max_steps);
  const auto warmup = static_cast<std::int64_t>(static_cast<double>(total) * cfg.warmup_ratio + 0.5);

  TrainResult result;
  result.trainable = s.trainable_parameter_count();
  result.base = s.base_parameter_count();
  spdlog::info("training {} of {} parameters ({:.3f}% of the base) on {} examples, {} steps", result.trainable, result.base,
               100.0 * static_cast<double>(result.trainable) / static_cast<double>(result.base), train_set.size(), total);

  const auto start = std::chrono::steady_clock::now();
  std::int64_t step = 0, seen = 0;
  s.model().train(true);
  for (std::int64_t epoch = 0; epoch < cfg.epochs && step < total; ++epoch) {
    std::vector<std::size_t> order(train_set.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    seeded_shuffle(order, static_cast<std::uint64_t>(cfg.seed) * 1000003ULL + static_cast<std::uint64_t>(epoch));
    Progress bar("epoch " + std::to_string(epoch + 1) + "/" + std::to_string(cfg.epochs), std::min(per_epoch, total - step));
    double loss_avg = 0;
    const auto epoch_start = std::chrono::steady_clock::now();
    std::int64_t epoch_seen = 0, epoch_step = 0;
    for (std::size_t b = 0; b < train_set.size() && step < total; b += bs, ++step, ++epoch_step) {
      // HF's linear schedule: ramp over the warm-up steps, then decay to zero.
      const double factor = step < warmup ? static_cast<double>(step) / static_cast<double>(std::max<std::int64_t>(1, warmup))
                                          : std::max(0.0, static_cast<double>(total - step) / static_cast<double>(std::max<std::int64_t>(1, total - warmup)));
      for (std::size_t g = 0; g < opt.param_groups().size(); ++g)
        static_cast<torch::optim::AdamWOptions&>(opt.param_groups()[g].options()).lr(base_lr[g] * factor);
      StepInfo info{step, total, base_lr[0] * factor};
      for (auto& m : s.methods()) m->call("on_step", [&](Method& x) { x.on_step(info); });

      Batch batch = s.batch(train_set, order, b, std::min(train_set.size(), b + bs));
      Tensor loss = at::cross_entropy_loss(s.logits(batch).to(at::kFloat), batch.labels);
      for (auto& m : s.methods()) {
        Tensor extra = m->call("extra_loss", [](Method& x) { return x.extra_loss(); });
        if (extra.defined()) loss = loss + extra;
      }
      opt.zero_grad();
      loss.backward();
      for (auto& m : s.methods()) m->call("after_backward", [](Method& x) { x.after_backward(); });
      if (cfg.max_grad_norm > 0) torch::nn::utils::clip_grad_norm_(all_params, cfg.max_grad_norm);
      opt.step();

      const double l = loss.item<double>();
      loss_avg = epoch_step == 0 ? l : 0.9 * loss_avg + 0.1 * l;
      epoch_seen += batch.ids.size(0);
      seen += batch.ids.size(0);
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - epoch_start).count();
      bar.update(epoch_step + 1, loss_avg, static_cast<double>(epoch_seen) / std::max(secs, 1e-9));
      log_metric({{"event", "step"}, {"epoch", epoch + 1}, {"step", step + 1}, {"loss", l}, {"lr", base_lr[0] * factor}});
    }
    bar.finish();
    EvalResult ev = evaluate(s, s.data().test);
    spdlog::info("epoch {}: test accuracy {:.4f}, test loss {:.4f}", epoch + 1, ev.accuracy, ev.loss);
    log_metric({{"event", "eval"}, {"epoch", epoch + 1}, {"step", step}, {"accuracy", ev.accuracy}, {"loss", ev.loss}});
    s.save_adapter((fs::path(run_dir) / "adapter").string());
    result.test = ev;
  }
  s.model().train(false);
  result.steps = step;
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  result.examples_per_s = static_cast<double>(seen) / std::max(result.seconds, 1e-9);
  return result;
}

}  // namespace tessera
