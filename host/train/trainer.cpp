#include "train/trainer.h"

#include "formats/safetensors.h"
#include "train/adamw.h"
#include "train/distributed.h"
#include "train/pass_streams.h"
#include "train/progress.h"
#include "train/resume.h"
#include "train/tensorboard.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <thread>

namespace tessera {
namespace fs = std::filesystem;

void set_threads(std::int64_t threads) {
  const auto n = threads > 0 ? threads : static_cast<std::int64_t>(std::max(1u, std::thread::hardware_concurrency()));
  at::set_num_threads(static_cast<int>(n));
}

std::vector<std::vector<std::size_t>> epoch_batches(const Session& s, std::int64_t epoch) {
  const auto& cfg = s.config().train;
  const auto& ids = s.task().token_ids(Split::Train);
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

namespace {

// The model in evaluation mode for a scope, its mode back however the scope ends.
class EvalMode {
 public:
  explicit EvalMode(SiteModel& m) : m_(m), was_(m.training()) { m_.train(false); }
  ~EvalMode() { m_.train(was_); }
  EvalMode(const EvalMode&) = delete;
  EvalMode& operator=(const EvalMode&) = delete;

 private:
  SiteModel& m_;
  bool was_;
};

// Data-dependent set-up (Fisher masks, SVD inits): methods that override prepare()
// pull the loss of calibration batches; the others never run it. Before the optimizer
// is made: tensors a method creates here are trained too.
void calibrate(Session& s) {
  const auto calib = epoch_batches(s, -1);
  // Every training example once, in the calibration epoch's shuffled order.
  std::vector<std::size_t> examples;
  for (const auto& b : calib) examples.insert(examples.end(), b.begin(), b.end());
  Calibration c{static_cast<std::int64_t>(calib.size()),
                [&](std::int64_t i) {
                  const auto& order = calib.at(static_cast<std::size_t>(i));
                  return s.task().loss(s.task().batch(Split::Train, order, 0, order.size()));
                },
                static_cast<std::int64_t>(examples.size()),
                [&](std::int64_t i) {
                  const auto at = static_cast<std::size_t>(i);
                  if (i < 0 || at >= examples.size()) throw std::out_of_range("calibration example " + std::to_string(i) + " of " + std::to_string(examples.size()));
                  return s.task().loss(s.task().batch(Split::Train, examples, at, at + 1));
                }};
  const EvalMode mode(s.model());  // no dropout in the methods' statistics
  for (std::size_t i = 0; i < s.methods().size(); ++i) s.methods()[i].call("prepare", [&](Method& x) { x.prepare(c); });
  s.model().drop_dense_copies();  // what plugins read of quantized bases at attach and prepare()
}

// The longest example of each split through the model once, before any step: a prompt or
// prefix that leaves it no position (or a shape a method gets wrong) is refused before
// training, not at whichever batch happens to hold that example.
void check_longest(Session& s) {
  at::NoGradGuard no_grad;
  const EvalMode mode(s.model());
  for (const Split split : {Split::Train, Split::Test}) {
    const auto& ids = s.task().token_ids(split);
    std::size_t longest = 0;
    for (std::size_t i = 1; i < ids.size(); ++i)
      if (ids[i].size() > ids[longest].size()) longest = i;
    if (ids.empty()) continue;
    try {
      s.task().loss(s.task().batch(split, {longest}, 0, 1));
    } catch (const ParamError&) {
      throw;  // a config error keeps its key's position
    } catch (const std::exception& e) {
      throw std::runtime_error(fmt::format("before training: the longest {} example (#{}, {} tokens) does not run: {}",
                                           split == Split::Train ? "training" : "test", longest, ids[longest].size(), e.what()));
    }
  }
}

// The optimizer over two groups: method tensors at lr (group 0), the task head at
// head_lr (lr when 0; group 1); the learning rates follow HF's linear schedule.
class Optimizer {
 public:
  Optimizer(Session& s, std::int64_t total) : s_(s), total_(total) {
    const auto& cfg = s.config().train;
    warmup_ = static_cast<std::int64_t>(static_cast<double>(total) * cfg.warmup_ratio + 0.5);
    std::vector<Tensor> method_params = named(s.methods().named_trainable(), names_[0]);
    for (auto& [k, t] : s.task().head()) head_.push_back(t), names_[1].push_back("head/" + k);
    if (method_params.empty() && head_.empty()) throw std::runtime_error("nothing to train: a causal-lm run needs at least one method");
    opt_ = std::make_unique<FusedAdamW>(std::vector<FusedAdamW::Group>{{method_params, cfg.lr, cfg.weight_decay},
                                                                       {head_, cfg.head_lr > 0 ? cfg.head_lr : cfg.lr, cfg.weight_decay}});
    for (auto& g : opt_->groups()) base_lr_.push_back(g.lr);
    shown_ = method_params.empty() ? 1 : 0;  // the lr reported: the methods', else the head's
    all_ = method_params;
    all_.insert(all_.end(), head_.begin(), head_.end());
  }
  // Ramp over the warm-up steps, then decay to zero; returns the lr reported for the step.
  double schedule(std::int64_t step) {
    const double factor = step < warmup_ ? static_cast<double>(step) / static_cast<double>(std::max<std::int64_t>(1, warmup_))
                                         : std::max(0.0, static_cast<double>(total_ - step) / static_cast<double>(std::max<std::int64_t>(1, total_ - warmup_)));
    for (std::size_t g = 0; g < opt_->groups().size(); ++g) opt_->groups()[g].lr = base_lr_[g] * factor;
    return base_lr_[shown_] * factor;
  }
  // A method added or replaced tensors in this step's hooks: the optimizer follows.
  void refresh() {
    std::vector<Tensor> method_params = named(s_.methods().named_trainable(), names_[0]);
    opt_->replace(0, method_params);
    all_ = method_params;
    all_.insert(all_.end(), head_.begin(), head_.end());
  }
  FusedAdamW& adamw() { return *opt_; }
  const std::vector<Tensor>& all() const { return all_; }
  OptimizerView view() { return {*opt_, names_}; }

 private:
  static std::vector<Tensor> named(const std::vector<std::pair<std::string, Tensor>>& in, std::vector<std::string>& names) {
    std::vector<Tensor> out;
    names.clear();
    for (const auto& [k, t] : in) out.push_back(t), names.push_back(k);
    return out;
  }
  std::vector<std::vector<std::string>> names_{2};  // per group, the parameters' names (resume.h)
  Session& s_;
  std::int64_t total_, warmup_ = 0;
  std::size_t shown_ = 0;
  std::vector<Tensor> head_, all_;
  std::vector<double> base_lr_;
  std::unique_ptr<FusedAdamW> opt_;
};

// This process's part of a step: data-parallel, its shard is `weight` of the global batch
// (1 when it runs in micro-batches, whose pieces carry their own weights).
struct Shard {
  DataParallel* dp = nullptr;
  double weight = 1.0;
  double tokens = 0;  // the global batch's unpadded tokens (data-parallel: summed over the ranks)
  Tensor device_tokens;  // one process: the same count, on the model's device, read once at the end (no sync a step)
};

// One pass of a step: its examples and their share of the global batch.
struct Piece {
  Batch batch;
  double weight = 1.0;
};

// One pass: the loss of `batch` with every method's extra loss, and backward. `overlap`: the
// data-parallel reduction, weighted by `weight`, starts on buckets as backward fills them.
Tensor pass(Session& s, const Batch& batch, Optimizer& opt, DataParallel* overlap, double weight) {
  const TaskOutput step = s.task().forward(batch);
  Tensor loss = step.loss;
  {
    struct During {  // a method's extra_loss() may read this pass or run it again; not after it, even when one throws
      Session& s;
      ~During() { s.set_training_step(nullptr, nullptr); }
    } during{s};
    s.set_training_step(&batch, &step);
    for (std::size_t i = 0; i < s.methods().size(); ++i) {
      Tensor extra = s.methods()[i].call("extra_loss", [](Method& x) { return x.extra_loss(); });
      if (extra.defined()) loss = loss + extra;
    }
  }
  if (s.take_trainable_changed()) opt.refresh();  // before the reduction: it covers the tensors the update will
  if (overlap != nullptr) overlap->begin_gradients(opt.all(), weight, loss);
  loss.backward();
  return loss;
}

// A step in micro-batches: each piece's pass with its own random stream, its gradients
// weighted by its share (g·w, as the data-parallel reducer weighs a rank's) and added in
// pass order, so that one process in M pieces sums what M ranks would. Returns the weighted
// sum of the pieces' losses (f64).
Tensor accumulate(Session& s, const std::vector<Piece>& pieces, Optimizer& opt, PassStreams& streams) {
  std::vector<Tensor> params, sum;
  Tensor loss;
  for (std::size_t k = 0; k < pieces.size(); ++k) {
    Tensor l;
    streams.run(k, [&] { l = pass(s, pieces[k].batch, opt, nullptr, 1.0); });
    if (k == 0) params = opt.all(), sum.resize(params.size());
    bool same = params.size() == opt.all().size();
    for (std::size_t i = 0; same && i < params.size(); ++i) same = params[i].is_same(opt.all()[i]);
    if (!same) throw std::runtime_error("[train] micro_batches: a method changed its trainable tensors between the micro-batches of a step");
    at::NoGradGuard no_grad;
    for (std::size_t i = 0; i < params.size(); ++i) {
      if (!params[i].grad().defined()) continue;  // this piece did not reach it
      const Tensor g = params[i].grad() * pieces[k].weight;
      sum[i] = sum[i].defined() ? sum[i] + g : g;
      params[i].mutable_grad().reset();
    }
    const Tensor lk = l.detach().to(at::kDouble) * pieces[k].weight;
    loss = loss.defined() ? loss + lk : lk;
  }
  for (std::size_t i = 0; i < params.size(); ++i)
    if (sum[i].defined()) params[i].mutable_grad() = sum[i];
  return loss;
}

// The loss of one step and its gradients, then the methods' after_backward hooks;
// data-parallel, the gradients are summed over the ranks first, so that the hooks and the
// update see the global batch's.
Tensor forward_backward(Session& s, const std::vector<Piece>& pieces, Optimizer& opt, const Shard& shard, PassStreams& streams) {
  opt.adamw().zero_grad();
  // Data-parallel, the all-reduce overlaps backward (DataParallel::begin_gradients) unless
  // layers are recomputed: each runs a backward pass of its own, where a tensor two layers
  // share would be sent before its second part arrived; or unless the step runs in pieces,
  // whose gradients are summed here before the ranks'.
  // TESSERA_DP_OVERLAP=0 reduces after backward instead (bench/distributed.sh's A/B).
  static const bool allowed = std::getenv("TESSERA_DP_OVERLAP") == nullptr || std::string(std::getenv("TESSERA_DP_OVERLAP")) != "0";
  const bool overlap = allowed && shard.dp != nullptr && pieces.size() == 1 && !s.model().gradient_checkpointing();
  const Tensor loss = pieces.size() == 1 ? pass(s, pieces[0].batch, opt, overlap ? shard.dp : nullptr, shard.weight) : accumulate(s, pieces, opt, streams);
  if (s.take_trainable_changed()) opt.refresh();  // (methods change their set in extra_loss or after_backward, not during backward)
  if (overlap) shard.dp->finish_gradients();
  else if (shard.dp != nullptr) shard.dp->reduce_gradients(opt.all(), shard.weight);
  for (std::size_t i = 0; i < s.methods().size(); ++i) s.methods()[i].call("after_backward", [](Method& x) { x.after_backward(); });
  if (s.take_trainable_changed()) opt.refresh();
  return loss;
}

std::string show(double x) { return std::isnan(x) ? std::string("nan") : fmt::format("{}", x); }  // not "-nan"

// Where a run stands when a step's loss or gradient norm is not finite.
struct Position {
  std::int64_t step, epoch, epochs_saved;
  double lr;
  const std::string& run_dir;
};

// A nan or inf stops the run before the optimizer writes it into the weights, so the
// adapter saved at the last finished epoch stays the last good one.
[[noreturn]] void diverged(const Position& at, double l, double g, const std::function<void(const nlohmann::json&)>& log_metric) {
  const std::string what = std::isfinite(l) ? "the gradient norm is " + show(g) : "the loss is " + show(l);
  log_metric({{"event", "diverged"}, {"epoch", at.epoch + 1}, {"step", at.step + 1}, {"reason", what}});
  // Before any update the learning rate cannot be the cause: say where else to look.
  const std::string hint = at.step == 0 ? "It came before any update, so not from the learning rate: look at the model's dtype, the data or a method's parameters."
                                        : fmt::format("lr was {:g} at this step: a lower [train] lr, or max_grad_norm, may help.", at.lr);
  throw std::runtime_error(fmt::format("training diverged at step {} (epoch {}): {}; stopped before the update. {} {}", at.step + 1, at.epoch + 1, what, hint,
                                       at.epochs_saved > 0 ? "The adapter of the last finished epoch stays in " + (fs::path(at.run_dir) / "adapter").string()
                                                           : std::string("No epoch had finished: nothing was saved.")));
}

// Clips, reads the loss (and the gradient norm when clipping computed it) in one
// transfer, refuses a non-finite one, and steps; returns the loss.
double finish_step(Session& s, const Tensor& loss, Optimizer& opt, const Position& at, const std::function<void(const nlohmann::json&)>& log_metric, const Shard& shard) {
  const double max_norm = s.config().train.max_grad_norm;
  const Tensor norm = max_norm > 0 ? clip_grad_norm(opt.all(), max_norm) : Tensor();
  const Tensor read = (norm.defined() ? at::stack({loss.detach().to(at::kDouble).reshape({}), norm.to(loss.device(), at::kDouble)})
                                      : loss.detach().to(at::kDouble).reshape({1}))
                          .cpu();
  double l = read[0].item<double>();
  const double g = norm.defined() ? read[1].item<double>() : 0.0;  // of the averaged gradients: the same on every rank
  if (shard.dp != nullptr) l = shard.dp->sum({shard.weight * l})[0];  // the global batch's loss, on every rank
  if (!std::isfinite(l) || !std::isfinite(g)) diverged(at, l, g, log_metric);
  opt.adamw().step();
  s.model().drop_dense_copies();  // what a plugin dequantized of a stored base this step (ParameterSite::base())
  return l;
}

// Examples per second over the timed steps (after the first few: allocator and kernel
// warm-up); a run no longer than the warm-up is timed over all its steps.
struct Throughput {
  static constexpr std::int64_t kUntimedSteps = 3;
  double timed_seconds = 0, all_seconds = 0;
  std::int64_t timed_examples = 0, all_examples = 0;
  Tensor timed_tokens, all_tokens;  // sums kept where the counts are (a GPU's, in one process): read once, at the end
  void add(std::int64_t step, double seconds, std::int64_t examples, const Shard& part) {
    const Tensor tokens = part.device_tokens.defined() ? part.device_tokens : at::scalar_tensor(part.tokens, at::kDouble);
    auto sum = [&](Tensor& into) { into = into.defined() ? into + tokens : tokens; };
    if (step >= kUntimedSteps) timed_seconds += seconds, timed_examples += examples, sum(timed_tokens);
    all_seconds += seconds, all_examples += examples, sum(all_tokens);
  }
  double per_second() const {
    return timed_examples > 0 ? static_cast<double>(timed_examples) / timed_seconds
           : all_examples > 0 ? static_cast<double>(all_examples) / all_seconds
                              : 0.0;
  }
  double tokens_per_second() const {
    return timed_examples > 0 ? timed_tokens.item<double>() / timed_seconds : all_examples > 0 ? all_tokens.item<double>() / all_seconds : 0.0;
  }
};

void report_eval(Session& s, const EvalResult& ev, std::int64_t epoch, std::int64_t step, const std::function<void(const nlohmann::json&)>& log_metric) {
  nlohmann::json line = {{"event", "eval"}, {"epoch", epoch + 1}, {"step", step}};
  std::string text;
  for (const auto& m : s.task().metrics(ev)) {
    line[m.key] = m.count ? nlohmann::json(static_cast<std::int64_t>(m.value)) : nlohmann::json(m.value);
    text += fmt::format("{}{} {:.6g}", text.empty() ? "" : ", ", m.label, m.value);
  }
  spdlog::info("epoch {}: {}", epoch + 1, text);
  log_metric(line);
}

}  // namespace

namespace {

// Where the loop stands and what it reports, across epochs (and across a resume).
struct Loop {
  Session& s;
  Optimizer& opt;
  DataParallel* dp;  // null: one process
  PassStreams& streams;
  const std::string& run_dir;
  std::ofstream& metrics;
  const std::function<void(const nlohmann::json&)>& log_metric;
  std::int64_t total, per_epoch;
  TrainPosition at;
  Throughput speed;
  std::int64_t steps_here = 0;  // steps this process took (the timing's warm-up)

  bool lead() const { return dp == nullptr || dp->rank() == 0; }  // the rank that writes

  // This process's part of a global batch in [train] micro_batches pieces: piece k of rank r
  // is the shard of rank r·M + k of world·M, weighted by its part of what the loss averages
  // over (examples, or labelled tokens), so that the weighted sum of every piece's gradient is
  // the whole batch's. A piece left without examples (a last batch smaller than world·M) runs
  // one example at weight 0: every stream runs one pass per step, so methods that draw per pass
  // (diff pruning's gate noise) stay in step with each other.
  std::vector<Piece> pieces(const std::vector<std::size_t>& order, Shard& part) const {
    const std::int64_t passes = s.config().train.micro_batches;
    if (dp == nullptr && passes == 1) {
      std::vector<Piece> one{{s.task().batch(Split::Train, order, 0, order.size())}};
      part.device_tokens = one[0].batch.mask.sum();
      return one;
    }
    const std::int64_t rank = dp != nullptr ? dp->rank() : 0, world = dp != nullptr ? dp->world() : 1;
    std::vector<Piece> out;
    std::vector<double> units;
    double tokens = 0;
    for (std::int64_t k = 0; k < passes; ++k) {
      auto mine = shard(order, rank * passes + k, world * passes);
      const bool empty = mine.empty();
      if (empty) mine = {order.back()};
      out.push_back({s.task().batch(Split::Train, mine, 0, mine.size())});
      units.push_back(empty ? 0.0 : static_cast<double>(s.task().loss_units(out.back().batch)));
      tokens += empty ? 0.0 : static_cast<double>(out.back().batch.mask.sum().item<std::int64_t>());
    }
    double mine_units = 0;
    for (const double u : units) mine_units += u;
    const auto all = dp != nullptr ? dp->sum({mine_units, tokens}) : std::vector<double>{mine_units, tokens};
    for (std::size_t k = 0; k < out.size(); ++k) out[k].weight = all[0] > 0 ? units[k] / all[0] : 0.0;
    part = {dp, passes == 1 ? out[0].weight : 1.0, all[1]};
    return out;
  }

  void checkpoint() {
    // Every stream's state, in the order of the ranks they stand for (a collective: every rank
    // comes here at the same step).
    const std::vector<Tensor> mine = streams.states();
    std::vector<Tensor> ranks;
    if (dp != nullptr) {
      std::vector<std::vector<Tensor>> by_pass;
      for (const auto& st : mine) by_pass.push_back(dp->all_gather(st));
      for (std::int64_t r = 0; r < dp->world(); ++r)
        for (const auto& gathered : by_pass) ranks.push_back(gathered[static_cast<std::size_t>(r)]);
    } else if (mine.size() > 1) {
      ranks = mine;
    }
    if (!lead()) return;
    at.metrics_bytes = static_cast<std::uint64_t>(metrics.tellp());
    save_checkpoint(s, opt.view(), at, run_dir, ranks);
  }

  // The rest of the current epoch: from step at.epoch_step of its batches.
  void epoch() {
    const auto every = s.config().train.checkpoint_every;
    std::optional<Progress> bar;
    if (lead()) bar.emplace("epoch " + std::to_string(at.epoch + 1) + "/" + std::to_string(s.config().train.epochs), std::min(per_epoch, total - (at.step - at.epoch_step)));
    double loss_avg = 0, epoch_seconds = 0;
    std::int64_t epoch_seen = 0, shown = 0;
    const auto batches = epoch_batches(s, at.epoch);
    for (auto b = static_cast<std::size_t>(at.epoch_step); b < batches.size() && at.step < total; ++b) {
      const auto& order = batches[b];
      const auto t0 = std::chrono::steady_clock::now();
      const double lr = opt.schedule(at.step);
      StepInfo info{at.step, total, lr};
      for (std::size_t i = 0; i < s.methods().size(); ++i) s.methods()[i].call("on_step", [&](Method& x) { x.on_step(info); });
      Shard part;
      const auto passes = pieces(order, part);
      const double l = finish_step(s, forward_backward(s, passes, opt, part, streams), opt, Position{at.step, at.epoch, at.epochs_saved, lr, run_dir}, log_metric, part);
      s.methods().after_step(info);  // the step's gradients still held (AdaLoRA's allocation)
      if (s.take_trainable_changed()) opt.refresh();

      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const auto B = static_cast<std::int64_t>(order.size());  // every rank's examples
      speed.add(steps_here++, dt, B, part);
      epoch_seconds += dt, epoch_seen += B;
      loss_avg = shown++ == 0 ? l : 0.9 * loss_avg + 0.1 * l;
      ++at.step, ++at.epoch_step;
      if (bar) bar->update(at.epoch_step, loss_avg, static_cast<double>(epoch_seen) / std::max(epoch_seconds, 1e-9));
      log_metric({{"event", "step"}, {"epoch", at.epoch + 1}, {"step", at.step}, {"loss", l}, {"lr", lr}, {"seconds", dt}});
      if (every > 0 && at.step % every == 0 && at.step < total) checkpoint();
    }
    if (bar) bar->finish();
  }
};

// A resumed run: the checkpoint's tensors, moments and generators in place, metrics.jsonl
// cut back to what it held then (steps after it were lost with the process).
TrainPosition resume_from(Session& s, Optimizer& opt, PassStreams& streams, const Checkpoint& c, const std::string& run_dir, const DataParallel* dp) {
  const bool lead = dp == nullptr || dp->rank() == 0;
  streams.restore(restore_checkpoint(s, [&] {
    opt.refresh();  // load_state() may have replaced tensors
    return opt.view();
  }, c, dp ? dp->rank() : 0, dp ? dp->world() : 1, streams.passes()));
  const auto metrics = fs::path(run_dir) / "metrics.jsonl";
  if (lead && fs::exists(metrics) && fs::file_size(metrics) > c.at.metrics_bytes) fs::resize_file(metrics, c.at.metrics_bytes);
  spdlog::info("resuming from {} at step {} (epoch {}, its step {})", c.dir, c.at.step, c.at.epoch + 1, c.at.epoch_step);
  return c.at;
}

}  // namespace

namespace {

// The metrics' step and eval lines as TensorBoard scalars at the run's step.
void to_tensorboard(EventWriter& w, const nlohmann::json& j) {
  const auto step = j.value("step", std::int64_t{0});
  if (j["event"] == "step") {
    w.scalar("train/loss", j["loss"].get<double>(), step);
    w.scalar("train/lr", j["lr"].get<double>(), step);
  } else if (j["event"] == "eval") {
    for (const auto& [k, v] : j.items())
      if (v.is_number() && k != "epoch" && k != "step") w.scalar("test/" + k, v.get<double>(), step);
  }
}

}  // namespace

TrainResult train(Session& s, const std::string& run_dir, const TrainOptions& options) {
  const Checkpoint* resume = options.resume;
  DataParallel* dp = options.dp;
  const bool lead = dp == nullptr || dp->rank() == 0;
  const auto& cfg = s.config().train;
  if (dp != nullptr) dp->set_bucket_cap(cfg.bucket_cap_mb), dp->set_ordered(cfg.ordered_reduction);
  fs::create_directories(run_dir);
  const auto n_train = s.task().examples(Split::Train).size();
  const auto bs = static_cast<std::size_t>(cfg.batch_size);
  const std::int64_t per_epoch = static_cast<std::int64_t>((n_train + bs - 1) / bs);
  std::int64_t total = per_epoch * cfg.epochs;
  if (cfg.max_steps > 0) total = std::min(total, cfg.max_steps);
  calibrate(s);  // first: a method's forward may need what prepare() sets up
  check_longest(s);

  TrainResult result;
  result.trainable = s.trainable_parameter_count();
  result.base = s.base_parameter_count();
  for (auto* l : s.model().linear_sites()) result.matmul_parameters += l->in_features() * l->out_features();
  spdlog::info("training {} of {} parameters ({:.3f}% of the base) on {} examples, {} steps", result.trainable, result.base,
               100.0 * static_cast<double>(result.trainable) / static_cast<double>(result.base), n_train, total);
  Optimizer opt(s, total);
  PassStreams streams(s, cfg.micro_batches);  // each as the generators stand before the first step
  const TrainPosition start_at = resume ? resume_from(s, opt, streams, *resume, run_dir, dp) : TrainPosition{};
  std::ofstream metrics;
  if (lead) metrics.open(fs::path(run_dir) / "metrics.jsonl", std::ios::app);
  std::unique_ptr<EventWriter> board;
  if (lead && options.tensorboard) board = std::make_unique<EventWriter>((fs::path(run_dir) / "tensorboard").string());
  const std::function<void(const nlohmann::json&)> log_metric = [&](const nlohmann::json& j) {
    if (!lead) return;
    metrics << j.dump() << "\n" << std::flush;
    if (board) to_tensorboard(*board, j);
  };

  const auto start = std::chrono::steady_clock::now();
  Loop loop{s, opt, dp, streams, run_dir, metrics, log_metric, total, per_epoch, start_at, {}};
  auto& at = loop.at;
  s.model().train(true);
  Task::Share share;  // data-parallel: the test split shared by the ranks
  if (dp != nullptr) share = {dp->rank(), dp->world(), [dp](const std::vector<double>& v) { return dp->sum(v); }};
  while (at.epoch < cfg.epochs && at.step < total) {
    loop.epoch();
    const auto eval_start = std::chrono::steady_clock::now();
    result.test = evaluate(s, Split::Test, dp != nullptr ? &share : nullptr);
    result.eval_examples_per_s = static_cast<double>(result.test.examples) / std::chrono::duration<double>(std::chrono::steady_clock::now() - eval_start).count();
    report_eval(s, result.test, at.epoch, at.step, log_metric);
    if (lead) s.save_adapter((fs::path(run_dir) / "adapter").string());
    ++at.epochs_saved, ++at.epoch, at.epoch_step = 0;
    if (at.epoch < cfg.epochs && at.step < total) loop.checkpoint();  // a finished run needs none
  }
  s.model().train(false);
  result.steps = at.step;
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  result.examples_per_s = loop.speed.per_second();
  result.tokens_per_s = loop.speed.tokens_per_second();
  if (dp != nullptr && dp->traffic().reductions > 0) {
    const auto& t = dp->traffic();
    result.ranks = dp->world();
    result.allreduce_bytes_per_step = t.bytes / t.reductions;
    result.allreduce_seconds_per_step = t.seconds / static_cast<double>(t.reductions);
    result.allreduce_overlapped = t.buckets > 0 ? static_cast<double>(t.overlapped) / static_cast<double>(t.buckets) : 0.0;
    result.unused_per_step = static_cast<double>(t.unused) / static_cast<double>(t.reductions);
    result.graph_walk_seconds_per_step = t.walk_seconds / static_cast<double>(t.reductions);
  }
  return result;
}

}  // namespace tessera
