#include "train/distributed.h"

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <chrono>
#include <cstdlib>
#include <map>
#include <stdexcept>
#include <tuple>

namespace tessera {

struct DataParallel::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> group;
};

namespace {

std::string env(const char* name, const std::string& fallback = "") {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::string(v) : fallback;
}

std::int64_t env_int(const char* name, const std::string& fallback = "") {
  const std::string v = env(name, fallback);
  if (v.empty()) throw std::runtime_error(std::string("data-parallel training: ") + name + " is not set (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)");
  try {
    std::size_t used = 0;
    const auto n = std::stoll(v, &used);
    if (used == v.size()) return n;
  } catch (const std::exception&) {
  }
  throw std::runtime_error(std::string("data-parallel training: ") + name + "=" + v + " is not an integer");
}

}  // namespace

std::unique_ptr<DataParallel> DataParallel::from_environment(double timeout_s) {
  const std::int64_t world = env("WORLD_SIZE").empty() ? 1 : env_int("WORLD_SIZE");
  if (world <= 1) return nullptr;
  const std::int64_t rank = env_int("RANK");
  if (rank < 0 || rank >= world) throw std::runtime_error("data-parallel training: RANK=" + std::to_string(rank) + " is outside WORLD_SIZE=" + std::to_string(world));
  const auto port = env_int("MASTER_PORT");
  if (port <= 0 || port > 65535) throw std::runtime_error("data-parallel training: MASTER_PORT=" + std::to_string(port) + " is not a port");
  const auto timeout = std::chrono::milliseconds(static_cast<std::int64_t>(timeout_s * 1000));
  c10d::TCPStoreOptions o;
  o.port = static_cast<std::uint16_t>(port);
  o.isServer = rank == 0;
  o.numWorkers = static_cast<std::size_t>(world);
  o.waitWorkers = true;
  o.timeout = timeout;
  auto impl = std::make_unique<Impl>();
  impl->store = c10::make_intrusive<c10d::TCPStore>(env("MASTER_ADDR", "127.0.0.1"), o);
  auto opts = c10d::ProcessGroupGloo::Options::create();
  opts->timeout = timeout;
  opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  impl->group = c10::make_intrusive<c10d::ProcessGroupGloo>(impl->store, static_cast<int>(rank), static_cast<int>(world), opts);
  return std::unique_ptr<DataParallel>(new DataParallel(rank, world, std::move(impl)));
}

DataParallel::DataParallel(std::int64_t rank, std::int64_t world, std::unique_ptr<Impl> impl)
    : rank_(rank), world_(world), impl_(std::move(impl)) {}
DataParallel::~DataParallel() = default;

void DataParallel::reduce_gradients(const std::vector<at::Tensor>& params, double weight) {
  at::NoGradGuard no_grad;
  const auto start = std::chrono::steady_clock::now();
  // One bucket per (device, dtype): the gradients flattened, weighted, summed, copied back.
  std::map<std::tuple<std::string, at::ScalarType>, std::vector<std::size_t>> buckets;
  for (std::size_t i = 0; i < params.size(); ++i) buckets[{params[i].device().str(), params[i].scalar_type()}].push_back(i);
  for (const auto& [_, members] : buckets) {
    // After the gradients, one flag per tensor: whether the rank has its gradient. A tensor no
    // rank has one for stays without (AdamW then skips it, as in one process).
    std::vector<at::Tensor> flat;
    for (const auto i : members) {
      const auto& p = params[i];
      flat.push_back(p.grad().defined() ? p.grad().reshape({-1}) * weight : at::zeros({p.numel()}, p.options()));
    }
    std::vector<double> has;
    for (const auto i : members) has.push_back(params[i].grad().defined() ? 1.0 : 0.0);
    flat.push_back(at::tensor(has, at::TensorOptions().dtype(at::kDouble)).to(params[members[0]].device(), params[members[0]].scalar_type()));
    std::vector<at::Tensor> bucket{at::cat(flat)};
    impl_->group->allreduce(bucket)->wait();
    traffic_.bytes += bucket[0].numel() * static_cast<std::int64_t>(bucket[0].element_size());
    const at::Tensor any = bucket[0].narrow(0, bucket[0].numel() - static_cast<std::int64_t>(members.size()), static_cast<std::int64_t>(members.size())).cpu();
    std::int64_t at = 0;
    for (std::size_t m = 0; m < members.size(); ++m) {
      const auto& p = params[members[m]];
      at::Tensor g = bucket[0].narrow(0, at, p.numel()).view(p.sizes());
      at += p.numel();
      if (any[static_cast<std::int64_t>(m)].item<double>() == 0.0) {
        if (p.grad().defined()) p.mutable_grad().reset();
        continue;
      }
      if (p.grad().defined()) p.mutable_grad().copy_(g);
      else p.mutable_grad() = g.clone();
    }
  }
  traffic_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ++traffic_.reductions;
}

std::vector<double> DataParallel::sum(const std::vector<double>& values) {
  std::vector<at::Tensor> t{at::tensor(values, at::kDouble)};
  impl_->group->allreduce(t)->wait();
  return {t[0].data_ptr<double>(), t[0].data_ptr<double>() + t[0].numel()};
}

void DataParallel::barrier() { impl_->group->barrier()->wait(); }

std::vector<std::size_t> shard(const std::vector<std::size_t>& batch, std::int64_t rank, std::int64_t world) {
  const auto n = static_cast<std::int64_t>(batch.size());
  const auto base = n / world, extra = n % world;
  const auto begin = rank * base + std::min(rank, extra), size = base + (rank < extra ? 1 : 0);
  return {batch.begin() + begin, batch.begin() + begin + size};
}

}  // namespace tessera
