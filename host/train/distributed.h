// Data-parallel training on libtorch's own c10d, as torchrun + DDP run it: each rank is a
// process told its place by the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
// MASTER_ADDR, MASTER_PORT), ranks meet through c10d's TCPStore and reduce through its
// Gloo backend (a CPU model) or its NCCL backend (a CUDA model; train/nccl_group.h). Each
// rank computes its shard of every global batch; the trainable tensors' gradients alone are
// averaged, weighted by each shard's examples, so every rank applies the same update as one
// process on the whole batch would. Rank 0 alone writes the run directory.
//
// Kept out of the other headers: c10d's headers are heavy, and only this file includes them.
#pragma once

#include "train/c10d_fwd.h"

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tessera {

// The process group for a model on `device`: Gloo for the CPU; for CUDA, NCCL from
// libtessera_nccl.so (in the lib/ beside the running binary's directory), bound to the
// device's GPU. Throws naming the backend and the reason (no module, no GPU …).
c10::intrusive_ptr<c10d::Backend> make_process_group(const c10::intrusive_ptr<c10d::Store>& store, int rank, int world,
                                                      std::chrono::milliseconds timeout, const c10::Device& device);

class DataParallel {
 public:
  // From torchrun's environment; null when WORLD_SIZE is unset or 1. Refuses a partial or
  // inconsistent environment naming the variable. Waits for every rank (`timeout_s`).
  // `device` is the model's (rank_device()): it picks the backend.
  static std::unique_ptr<DataParallel> from_environment(const c10::Device& device, double timeout_s = 300);
  ~DataParallel();

  std::int64_t rank() const { return rank_; }
  std::int64_t world() const { return world_; }

  // grads[i] ← Σ_r weight_r · grads_r[i] over the ranks, in one flat bucket per dtype and
  // device (an adapter's gradients are a few MB); an undefined gradient counts as zeros.
  // Each rank passes its weight (its shard's share of the global batch).
  void reduce_gradients(const std::vector<at::Tensor>& params, double weight);
  // The same reduction overlapped with the backward pass, as DDP's reducer does it: call
  // begin_gradients() before loss.backward() and finish_gradients() after. The tensors go
  // into buckets in reverse order (the order backward reaches them: the head and the last
  // layers first), the first of 1 MiB (or less) and the rest of set_bucket_cap()'s (25 MiB by default, DDP's bucket_cap_mb), one
  // dtype and device each; a bucket's all-reduce starts, on Gloo's threads, as soon as
  // every gradient in it has been accumulated — and only after every bucket before it, so
  // that every rank starts the same collectives in the same order. finish_gradients()
  // starts those still waiting, waits for all and writes the sums back. `loss` is what
  // backward will start from: its graph is walked (DDP's find_unused_parameters) and a tensor
  // it does not reach counts as arrived, without a gradient, at once — otherwise it would hold
  // its bucket and every later one until backward ended. Only for a backward pass that
  // accumulates each tensor's gradient once: recomputed layers (gradient checkpointing) run a
  // backward pass of their own per layer, so a tensor used in two layers would be sent
  // half-done; use reduce_gradients() there.
  void begin_gradients(const std::vector<at::Tensor>& params, double weight, const at::Tensor& loss);
  void set_bucket_cap(double mib) { bucket_cap_mib_ = mib; }  // [train] bucket_cap_mb
  // [train] ordered_reduction: every sum over the ranks (gradient buckets, sum()) gathers each
  // rank's part and adds them in rank order, ((x₀ + x₁) + x₂) + …, as one process adds its
  // micro-batches, instead of an all-reduce's ring order, which depends on the rank's place in
  // the ring. The same bits for any number of ranks, at N times the traffic.
  void set_ordered(bool ordered) { ordered_ = ordered; }
  void finish_gradients();
  // Every rank's `t` (the same shape and dtype on each, a CPU tensor), in rank order, on the CPU.
  std::vector<at::Tensor> all_gather(const at::Tensor& t);
  // Σ over the ranks of each value (evaluation counts, throughput).
  std::vector<double> sum(const std::vector<double>& values);
  void barrier();

  // What the gradient reductions have cost so far: bytes each rank sent into them (the
  // buckets' size; ordered: N times it, what each rank receives), the wall time a step spent on them outside the backward pass (all of it
  // for reduce_gradients(); for the overlapped form, what finish_gradients() waited), and how
  // many there were.
  // Also: buckets reduced, and how many of them started before backward ended (the overlap);
  // the tensors the graph walk found unused, summed over the steps, and the walk's time.
  struct Traffic {
    std::int64_t bytes = 0, reductions = 0, buckets = 0, overlapped = 0, unused = 0;
    double seconds = 0, walk_seconds = 0;
  };
  const Traffic& traffic() const { return traffic_; }

 private:
  Traffic traffic_;
  double bucket_cap_mib_ = 25;
  bool ordered_ = false;
  struct Impl;
  DataParallel(std::int64_t rank, std::int64_t world, std::unique_ptr<Impl> impl);
  std::int64_t rank_, world_;
  std::unique_ptr<Impl> impl_;
};

// This rank's part of a global batch: a contiguous slice, the first ranks one example
// longer when the batch does not divide (as DistributedSampler's shards differ by at most one).
std::vector<std::size_t> shard(const std::vector<std::size_t>& batch, std::int64_t rank, std::int64_t world);

}  // namespace tessera
