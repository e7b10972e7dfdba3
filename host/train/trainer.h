// The training loop, readable top to bottom: AdamW over the trainable tensors only
// (method tensors and the task head), linear warm-up then linear decay, gradient
// clipping, method hooks, evaluation each epoch, metrics as JSON lines, the adapter
// saved atomically after each epoch.
#pragma once

#include "train/session.h"

#include <string>

namespace tessera {

struct TrainResult {
  EvalResult test;
  double seconds = 0;         // wall time of the whole run, evaluation included
  double examples_per_s = 0;  // training steps only, after the first few (warm-up of allocators and kernels)
  double tokens_per_s = 0;         // the same steps' tokens (padding not counted)
  double eval_examples_per_s = 0;  // the last evaluation of the test split
  std::int64_t steps = 0, trainable = 0, base = 0;
  // Weights of the layers' linear products (in × out summed): what a token's forward costs,
  // 2 FLOPs each (`tessera assess` reads training FLOP/s from it).
  std::int64_t matmul_parameters = 0;
  // Data-parallel: the ranks and what reducing the gradients cost per step (bytes each rank
  // sent into the all-reduce, seconds of it); 1 and 0 for one process.
  std::int64_t ranks = 1, allreduce_bytes_per_step = 0;
  double allreduce_seconds_per_step = 0;
  // Of the buckets reduced, the share started before backward ended; the trainable tensors the
  // loss did not reach, per step; the graph walk that found them, seconds per step.
  double allreduce_overlapped = 0, unused_per_step = 0, graph_walk_seconds_per_step = 0;
};

// Sets libtorch's intra-op threads: `threads`, or every processor when 0 (libtorch may
// see fewer cores than there are).
void set_threads(std::int64_t threads);

inline EvalResult evaluate(Session& s, Split split, const Task::Share* share = nullptr) { return s.task().evaluate(split, share); }

// The batches of one epoch: a seeded shuffle; with group_by_length, batches of similar
// length (sorted within windows of 50 batches) visited in a seeded order.
std::vector<std::vector<std::size_t>> epoch_batches(const Session& s, std::int64_t epoch);
// From the start, or from a checkpoint (train/resume.h) of the same config: the run then
// ends as the uninterrupted one would, bit for bit with the same threads.
struct Checkpoint;
class DataParallel;
struct TrainOptions {
  const Checkpoint* resume = nullptr;  // continue from it (train/resume.h)
  // Data-parallel (train/distributed.h): this process is one rank; it trains on its shard of
  // each batch, and only rank 0 writes into the run directory.
  DataParallel* dp = nullptr;
  bool tensorboard = false;  // also TensorBoard event files in RUN/tensorboard/ (train/tensorboard.h)
};
TrainResult train(Session& s, const std::string& run_dir, const TrainOptions& options = {});

}  // namespace tessera
