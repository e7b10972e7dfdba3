#include "train/trainer.h"

#include "model/safetensors.h"
#include "train/adamw.h"
#include "train/bleu.h"
#include "train/progress.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <thread>

namespace tessera {
namespace fs = std::filesystem;

void set_threads(std::int64_t threads) {
  const auto n = threads > 0 ? threads : static_cast<std::int64_t>(std::max(1u, std::thread::hardware_concurrency()));
  at::set_num_threads(static_cast<int>(n));
}

EvalResult evaluate(Session& s, Split split) {
  at::NoGradGuard no_grad;
  const bool was_training = s.model().training();
  s.model().train(false);
  const auto n = s.examples(split).size();
  std::vector<std::size_t> order(n);
  for (std::size_t i = 0; i < n; ++i) order[i] = i;
  EvalResult r;
  std::int64_t correct = 0;
  double loss_sum = 0;
  std::vector<std::string> hypotheses;
  const auto bs = static_cast<std::size_t>(s.config().train.eval_batch_size);
  for (std::size_t b = 0; b < n; b += bs) {
    Batch batch = s.batch(split, order, b, std::min(n, b + bs));
    if (s.seq2seq()) {
      auto texts = s.generate_text(split, order, b, std::min(n, b + bs));
      hypotheses.insert(hypotheses.end(), texts.begin(), texts.end());
    }
    if (s.causal() || s.seq2seq() || s.token_classification()) {
      TokenStats st = s.token_stats(batch);
      loss_sum += st.loss_sum, correct += st.correct, r.tokens += st.tokens;
      continue;
    }
    Tensor logits = s.logits(batch).to(at::kFloat);  // (B, L)
    loss_sum += at::cross_entropy_loss(logits, batch.labels, {}, at::Reduction::Sum).item<double>();
    correct += logits.argmax(-1).eq(batch.labels).sum().item<std::int64_t>();
  }
  s.model().train(was_training);
  r.examples = static_cast<std::int64_t>(n);
  const bool per_token = s.causal() || s.seq2seq() || s.token_classification();
  const auto count = static_cast<double>(per_token ? std::max<std::int64_t>(r.tokens, 1) : r.examples);
  r.accuracy = static_cast<double>(correct) / count;
  r.loss = loss_sum / count;
  if (s.causal() || s.seq2seq()) r.perplexity = std::exp(r.loss);
  if (s.seq2seq()) {
    std::vector<std::string> references;
    for (const auto& e : s.examples(split)) references.push_back(e.target);
    r.bleu = corpus_bleu(hypotheses, references).score;
  }
  return r;
}

std::vector<std::vector<std::size_t>> epoch_batches(const Session& s, std::int64_t epoch) {
  const auto& cfg = s.config().train;
  const auto& ids = s.token_ids(Split::Train);
  const auto bs = static_cast<std::size_t>(cfg.batch_size);
  const std::uint64_t seed = static_cast<std::uint64_t>(cfg.seed) * 1000003ULL + static_cast<std::uint64_t>(epoch);
  std::vector<std::size_t> order(ids.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  if (cfg.shuffle) seeded_shuffle(order, seed);
  if (cfg.group_by_length) {
    const std::size_t window = 50 * bs;
    for (std::size_t w = 0; w < order.size(); w += window)
      std::stable_sort(order.begin() + static_cast<long>(w), order.begin() + static_cast<long>(std::min(order.size(), w + window)),
                       [&](std::size_t a, std::size_t b) { return ids[a].size() > ids[b].size(); });
  }
  std::vector<std::vector<std::size_t>> batches;
  for (std::size_t b = 0; b < order.size(); b += bs)
    batches.emplace_back(order.begin() + static_cast<long>(b), order.begin() + static_cast<long>(std::min(order.size(), b + bs)));
  if (cfg.group_by_length) {
    std::vector<std::size_t> visit(batches.size());
    for (std::size_t i = 0; i < visit.size(); ++i) visit[i] = i;
    seeded_shuffle(visit, seed ^ 0xba7c4ULL);
    std::vector<std::vector<std::size_t>> shuffled;
    for (auto i : visit) shuffled.push_back(std::move(batches[i]));
    batches = std::move(shuffled);
  }
  return batches;
}

TrainResult train(Session& s, const std::string& run_dir) {
  const auto& cfg = s.config().train;
  fs::create_directories(run_dir);
  std::ofstream metrics(fs::path(run_dir) / "metrics.jsonl", std::ios::app);
  auto log_metric = [&](const nlohmann::json& j) { metrics << j.dump() << "\n" << std::flush; };

  const auto n_train = s.examples(Split::Train).size();
  const auto bs = static_cast<std::size_t>(cfg.batch_size);
  const std::int64_t per_epoch = static_cast<std::int64_t>((n_train + bs - 1) / bs);
  std::int64_t total = per_epoch * cfg.epochs;
  if (cfg.max_steps > 0) total = std::min(total, cfg.max_steps);
  const auto warmup = static_cast<std::int64_t>(static_cast<double>(total) * cfg.warmup_ratio + 0.5);

  // Data-dependent set-up (Fisher masks, SVD inits): methods that override prepare()
  // pull the loss of calibration batches; the others never run it. Before the optimizer
  // is made: tensors a method creates here are trained too.
  {
    const auto calib = epoch_batches(s, -1);
    Calibration c{std::min<std::int64_t>(8, static_cast<std::int64_t>(calib.size())), [&](std::int64_t i) {
                    Batch b = s.batch(Split::Train, calib.at(static_cast<std::size_t>(i)), 0, calib[static_cast<std::size_t>(i)].size());
                    return s.loss(b);
                  }};
    for (auto& m : s.methods()) m->call("prepare", [&](Method& x) { x.prepare(c); });
  }

  TrainResult result;
  result.trainable = s.trainable_parameter_count();
  result.base = s.base_parameter_count();
  spdlog::info("training {} of {} parameters ({:.3f}% of the base) on {} examples, {} steps", result.trainable, result.base,
               100.0 * static_cast<double>(result.trainable) / static_cast<double>(result.base), n_train, total);

  // Two groups: method tensors at lr (group 0), the head at head_lr (lr when 0; group 1).
  auto method_tensors = [&] {
    std::vector<Tensor> out;
    for (auto& m : s.methods())
      for (auto& [_, t] : m->call("trainable", [](Method& x) { return x.trainable(); })) out.push_back(t);
    return out;
  };
  std::vector<Tensor> method_params = method_tensors(), head_params;
  for (auto& [_, t] : s.head()) head_params.push_back(t);
  if (method_params.empty() && head_params.empty()) throw std::runtime_error("nothing to train: a causal-lm run needs at least one method");
  const double head_lr = cfg.head_lr > 0 ? cfg.head_lr : cfg.lr;
  FusedAdamW opt({{method_params, cfg.lr, cfg.weight_decay}, {head_params, head_lr, cfg.weight_decay}});
  std::vector<double> base_lr;
  for (auto& g : opt.groups()) base_lr.push_back(g.lr);
  const std::size_t shown = method_params.empty() ? 1 : 0;  // the lr reported: the methods', else the head's
  std::vector<Tensor> all_params = method_params;
  all_params.insert(all_params.end(), head_params.begin(), head_params.end());

  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  constexpr std::int64_t kUntimedSteps = 3;  // allocator and kernel warm-up, left out of examples/s
  double timed_seconds = 0, all_seconds = 0;
  std::int64_t step = 0, timed_examples = 0, all_examples = 0, epochs_saved = 0;
  s.model().train(true);
  for (std::int64_t epoch = 0; epoch < cfg.epochs && step < total; ++epoch) {
    const auto batches = epoch_batches(s, epoch);
    Progress bar("epoch " + std::to_string(epoch + 1) + "/" + std::to_string(cfg.epochs), std::min(per_epoch, total - step));
    double loss_avg = 0, epoch_seconds = 0;
    std::int64_t epoch_seen = 0, epoch_step = 0;
    for (const auto& order : batches) {
      if (step >= total) break;
      const auto t0 = clock::now();
      // HF's linear schedule: ramp over the warm-up steps, then decay to zero.
      const double factor = step < warmup ? static_cast<double>(step) / static_cast<double>(std::max<std::int64_t>(1, warmup))
                                          : std::max(0.0, static_cast<double>(total - step) / static_cast<double>(std::max<std::int64_t>(1, total - warmup)));
      for (std::size_t g = 0; g < opt.groups().size(); ++g) opt.groups()[g].lr = base_lr[g] * factor;
      StepInfo info{step, total, base_lr[shown] * factor};
      for (auto& m : s.methods()) m->call("on_step", [&](Method& x) { x.on_step(info); });

      Batch batch = s.batch(Split::Train, order, 0, order.size());
      Tensor loss = s.loss(batch);
      s.set_training_batch(&batch);  // a method's extra_loss() may run the forward pass again
      for (auto& m : s.methods()) {
        Tensor extra = m->call("extra_loss", [](Method& x) { return x.extra_loss(); });
        if (extra.defined()) loss = loss + extra;
      }
      s.set_training_batch(nullptr);
      opt.zero_grad();
      loss.backward();
      for (auto& m : s.methods()) m->call("after_backward", [](Method& x) { x.after_backward(); });
      if (s.take_trainable_changed()) {  // a method added or replaced tensors in this step's hooks
        method_params = method_tensors();
        opt.replace(0, method_params);
        all_params = method_params;
        all_params.insert(all_params.end(), head_params.begin(), head_params.end());
      }
      const Tensor norm = cfg.max_grad_norm > 0 ? clip_grad_norm(all_params, cfg.max_grad_norm) : Tensor();
      // One transfer reads the loss (and the gradient norm when clipping computed it); a
      // nan or inf stops the run before the optimizer writes it into the weights, so the
      // adapter saved at the last finished epoch stays the last good one.
      const Tensor read = (norm.defined() ? at::stack({loss.detach().to(at::kDouble).reshape({}), norm.to(loss.device(), at::kDouble)})
                                          : loss.detach().to(at::kDouble).reshape({1}))
                              .cpu();
      const double l = read[0].item<double>();
      const double g = norm.defined() ? read[1].item<double>() : 0.0;
      if (!std::isfinite(l) || !std::isfinite(g)) {
        auto show = [](double x) { return std::isnan(x) ? std::string("nan") : fmt::format("{}", x); };  // not "-nan"
        const std::string what = std::isfinite(l) ? "the gradient norm is " + show(g) : "the loss is " + show(l);
        log_metric({{"event", "diverged"}, {"epoch", epoch + 1}, {"step", step + 1}, {"reason", what}});
        // Before any update the learning rate cannot be the cause: say where else to look.
        const std::string hint = step == 0 ? "It came before any update, so not from the learning rate: look at the model's dtype, the data or a method's parameters."
                                           : fmt::format("lr was {:g} at this step: a lower [train] lr, or max_grad_norm, may help.", base_lr[shown] * factor);
        throw std::runtime_error(fmt::format("training diverged at step {} (epoch {}): {}; stopped before the update. {} {}", step + 1, epoch + 1, what, hint,
                                             epochs_saved > 0 ? "The adapter of the last finished epoch stays in " + (fs::path(run_dir) / "adapter").string()
                                                              : std::string("No epoch had finished: nothing was saved.")));
      }
      opt.step();

      const double dt = std::chrono::duration<double>(clock::now() - t0).count();
      const auto B = batch.ids.size(0);
      if (step >= kUntimedSteps) timed_seconds += dt, timed_examples += B;
      all_seconds += dt, all_examples += B;
      epoch_seconds += dt;
      epoch_seen += B;
      loss_avg = epoch_step == 0 ? l : 0.9 * loss_avg + 0.1 * l;
      ++step, ++epoch_step;
      bar.update(epoch_step, loss_avg, static_cast<double>(epoch_seen) / std::max(epoch_seconds, 1e-9));
      log_metric({{"event", "step"}, {"epoch", epoch + 1}, {"step", step}, {"loss", l}, {"lr", base_lr[shown] * factor}, {"seconds", dt}});
    }
    bar.finish();
    EvalResult ev = evaluate(s, Split::Test);
    if (s.seq2seq()) {
      spdlog::info("epoch {}: test BLEU {:.2f}, perplexity {:.3f}, next-token accuracy {:.4f}", epoch + 1, ev.bleu, ev.perplexity, ev.accuracy);
      log_metric({{"event", "eval"}, {"epoch", epoch + 1}, {"step", step}, {"accuracy", ev.accuracy}, {"loss", ev.loss},
                  {"perplexity", ev.perplexity}, {"bleu", ev.bleu}});
    } else if (s.causal()) {
      spdlog::info("epoch {}: test perplexity {:.3f}, next-token accuracy {:.4f}, loss {:.4f}", epoch + 1, ev.perplexity, ev.accuracy, ev.loss);
      log_metric({{"event", "eval"}, {"epoch", epoch + 1}, {"step", step}, {"accuracy", ev.accuracy}, {"loss", ev.loss}, {"perplexity", ev.perplexity}});
    } else {
      spdlog::info("epoch {}: test accuracy {:.4f}, test loss {:.4f}", epoch + 1, ev.accuracy, ev.loss);
      log_metric({{"event", "eval"}, {"epoch", epoch + 1}, {"step", step}, {"accuracy", ev.accuracy}, {"loss", ev.loss}});
    }
    s.save_adapter((fs::path(run_dir) / "adapter").string());
    ++epochs_saved;
    result.test = ev;
  }
  s.model().train(false);
  result.steps = step;
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // A run no longer than the warm-up is timed over all its steps rather than reported as 0.
  result.examples_per_s = timed_examples > 0 ? static_cast<double>(timed_examples) / timed_seconds
                          : all_examples > 0 ? static_cast<double>(all_examples) / all_seconds
                                             : 0.0;
  return result;
}

}  // namespace tessera
