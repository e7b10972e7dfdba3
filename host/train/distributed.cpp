#include "train/distributed.h"

#include "train/nccl_group.h"

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <dlfcn.h>

#include <chrono>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <map>
#include <mutex>
#include <stdexcept>
#include <tuple>
#include <unordered_set>

namespace tessera {

namespace {

// ((x₀ + x₁) + x₂) + …: the ranks' parts added in rank order, as one process adds its
// micro-batches (DataParallel::set_ordered).
at::Tensor in_rank_order(const std::vector<at::Tensor>& parts) {
  at::Tensor sum = parts[0].clone();
  for (std::size_t r = 1; r < parts.size(); ++r) sum.add_(parts[r]);
  return sum;
}

// The overlapped reduction's state for one set of tensors (DataParallel::begin_gradients).
struct Reducer {
  struct Bucket {
    std::vector<std::size_t> members;  // indices into params
    std::size_t pending = 0;           // members whose gradient has not arrived this step
    std::vector<at::Tensor> flat;      // what is being reduced: the weighted gradients, then one flag each
    std::vector<std::vector<at::Tensor>> gathered;  // ordered: every rank's flat, in rank order
    c10::intrusive_ptr<c10d::Work> work;
  };
  std::vector<at::Tensor> params;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators;  // held, so that the hooks on them live
  std::vector<std::uintptr_t> hooks;                                   // each accumulator's hook, removed with it
  std::mutex mutex;  // autograd runs each device's accumulators on a thread of its own
  std::vector<std::size_t> bucket_of;
  std::vector<bool> arrived;
  std::vector<bool> walked_past;  // marked unused by the graph walk this step
  std::int64_t late = -1;         // such a tensor whose gradient came all the same (the walk was wrong)
  std::vector<Bucket> buckets;
  std::size_t next = 0;  // the first bucket not started
  double weight = 1;
  bool ordered = false;  // gathered and added in rank order (DataParallel::set_ordered)
  std::int64_t world = 1;
  bool active = false;   // between begin and finish
  c10d::Backend* group = nullptr;
  std::int64_t bytes = 0;
  std::int64_t started_early = 0;  // buckets of this step started before finish_gradients()

  void arrive(std::size_t i, bool from_backward) {
    std::lock_guard<std::mutex> lock(mutex);
    if (active && from_backward && walked_past[i]) late = static_cast<std::int64_t>(i);  // its bucket may be gone already
    if (!active || arrived[i]) return;
    arrived[i] = true;
    --buckets[bucket_of[i]].pending;
    while (next < buckets.size() && buckets[next].pending == 0) start(next++), ++started_early;
  }

  void start(std::size_t b) {
    at::NoGradGuard no_grad;
    auto& k = buckets[b];
    std::vector<at::Tensor> parts;
    std::vector<double> has;
    for (const auto i : k.members) {
      const auto& p = params[i];
      parts.push_back(p.grad().defined() ? p.grad().reshape({-1}) * weight : at::zeros({p.numel()}, p.options()));
      has.push_back(p.grad().defined() ? 1.0 : 0.0);
    }
    const auto& first = params[k.members[0]];
    parts.push_back(at::tensor(has, at::TensorOptions().dtype(at::kDouble)).to(first.device(), first.scalar_type()));
    k.flat = {at::cat(parts)};
    bytes += k.flat[0].numel() * static_cast<std::int64_t>(k.flat[0].element_size()) * (ordered ? world : 1);
    if (!ordered) {
      k.work = group->allreduce(k.flat);
      return;
    }
    k.gathered.assign(1, {});
    for (std::int64_t r = 0; r < world; ++r) k.gathered[0].push_back(at::empty_like(k.flat[0]));
    k.work = group->allgather(k.gathered, k.flat);
  }

  // After the bucket's work: its sum over the ranks (ordered: added in rank order here).
  static const at::Tensor& summed(Bucket& k) {
    if (!k.gathered.empty()) {
      k.flat[0] = in_rank_order(k.gathered[0]);
      k.gathered.clear();
    }
    return k.flat[0];
  }
};

// Called by autograd after a tensor's gradient has been accumulated into its .grad.
class Arrived final : public torch::autograd::FunctionPostHook {
 public:
  Arrived(Reducer* r, std::size_t index) : r_(r), index_(index) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs, const torch::autograd::variable_list&) override {
    r_->arrive(index_, true);
    return outputs;
  }

 private:
  Reducer* r_;
  std::size_t index_;
};

// The nodes a backward pass from `root` can reach, gradient accumulators included: a walk
// of its graph (DDP's find_unused_parameters). A trainable tensor whose accumulator is not
// among them gets no gradient this step, so its bucket need not wait for it.
std::unordered_set<const torch::autograd::Node*> reachable(const at::Tensor& root) {
  std::unordered_set<const torch::autograd::Node*> seen;
  std::vector<torch::autograd::Node*> todo;
  if (const auto& f = root.grad_fn()) todo.push_back(f.get());
  while (!todo.empty()) {
    torch::autograd::Node* n = todo.back();
    todo.pop_back();
    if (!seen.insert(n).second) continue;
    for (const auto& e : n->next_edges())
      if (e.function) todo.push_back(e.function.get());
  }
  return seen;
}

bool same_tensors(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!a[i].is_same(b[i])) return false;
  return true;
}

}  // namespace

struct DataParallel::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> group;
  c10::Device device{c10::kCPU};  // where the group's tensors live (NCCL: the rank's GPU)
  Reducer reducer;

  ~Impl() {
    unhook();
    if (!group) return;
    // NCCL: its watchdog and communicators end here, not in a destructor's warning. Leaving
    // by an exception, collectives may be in flight that the other ranks never join: abort
    // them rather than wait for them (shutdown() would flush them, up to the timeout).
    try {
      if (std::uncaught_exceptions() > 0) group->abort();
      else group->shutdown();
    } catch (const std::exception&) {  // nothing to do about it on the way out
    }
  }
  // Takes this set's hooks off their accumulators (a node that outlives the reducer must not call it).
  void unhook() {
    auto& r = reducer;
    for (std::size_t j = 0; j < r.hooks.size(); ++j) r.accumulators[j]->del_post_hook(r.hooks[j]);
    r.hooks.clear();
    r.accumulators.clear();
  }

  // Buckets and hooks for `params`, made again only when the set changes (a method's
  // trainable tensors may change at a step).
  void prepare(const std::vector<at::Tensor>& params, double cap_mib) {
    auto& r = reducer;
    r.group = group.get();
    if (same_tensors(r.params, params)) return;
    unhook();
    r.params = params;
    r.buckets.clear();
    r.bucket_of.assign(params.size(), 0);
    const auto later = static_cast<std::int64_t>(cap_mib * (1 << 20));
    std::int64_t filled = 0, cap = std::min<std::int64_t>(std::int64_t{1} << 20, later);  // DDP: 1 MiB first, then bucket_cap_mb
    for (std::size_t j = params.size(); j-- > 0;) {
      const auto& p = params[j];
      const auto bytes = p.numel() * static_cast<std::int64_t>(p.element_size());
      const bool fits = !r.buckets.empty() && filled + bytes <= cap && params[r.buckets.back().members[0]].options().type_equal(p.options()) &&
                        params[r.buckets.back().members[0]].device() == p.device();
      if (!fits) {
        if (!r.buckets.empty()) cap = later;
        r.buckets.emplace_back();
        filled = 0;
      }
      r.buckets.back().members.push_back(j);
      r.bucket_of[j] = r.buckets.size() - 1;
      filled += bytes;
    }
    for (std::size_t j = 0; j < params.size(); ++j) {
      auto acc = torch::autograd::impl::grad_accumulator(params[j]);
      if (!acc) throw std::logic_error("data-parallel training: trainable tensor " + std::to_string(j) + " is not a leaf that accumulates its gradient");
      r.hooks.push_back(acc->add_post_hook(std::make_unique<Arrived>(&r, j)));
      r.accumulators.push_back(std::move(acc));
    }
  }
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

c10::intrusive_ptr<c10d::Backend> gloo_group(const c10::intrusive_ptr<c10d::Store>& store, int rank, int world, std::chrono::milliseconds timeout) {
  auto opts = c10d::ProcessGroupGloo::Options::create();
  opts->timeout = timeout;
  opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
}

// libtessera_nccl.so: in the lib/ beside the running binary's bin/ (the build tree's layout).
std::filesystem::path nccl_module() {
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) throw std::runtime_error("data-parallel training through NCCL: cannot tell where this binary is (/proc/self/exe): " + ec.message());
  return exe.parent_path().parent_path() / "lib" / kNcclModuleName;
}

c10::intrusive_ptr<c10d::Backend> nccl_group(const c10::intrusive_ptr<c10d::Store>& store, int rank, int world, std::chrono::milliseconds timeout,
                                             const c10::Device& device) {
  const auto module = nccl_module();
  const std::string what = "data-parallel training on " + device.str() + " through NCCL";
  if (!std::filesystem::exists(module))
    throw std::runtime_error(what + " needs " + module.string() + ", which is built only against a CUDA build of the torch wheel");
  // Loaded once and never unloaded: the group's threads run its code until the process ends.
  void* handle = dlopen(module.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    throw std::runtime_error(what + ": cannot load " + module.string() + ": " + (why != nullptr ? why : "unknown reason"));
  }
  const auto make = reinterpret_cast<MakeNcclGroup>(dlsym(handle, kMakeNcclGroupSymbol));
  if (make == nullptr) throw std::runtime_error(what + ": " + module.string() + " has no " + kMakeNcclGroupSymbol);
  NcclGroupRequest request;
  request.store = store.get();
  request.rank = rank, request.world = world;
  request.device_index = device.has_index() ? device.index() : 0;
  request.timeout_ms = timeout.count();
  if (make(&request) != 0) throw std::runtime_error(what + ": " + request.error);
  return c10::intrusive_ptr<c10d::Backend>::reclaim(request.group);
}

}  // namespace

c10::intrusive_ptr<c10d::Backend> make_process_group(const c10::intrusive_ptr<c10d::Store>& store, int rank, int world,
                                                      std::chrono::milliseconds timeout, const c10::Device& device) {
  if (device.is_cuda()) return nccl_group(store, rank, world, timeout, device);
  if (!device.is_cpu()) throw std::runtime_error("data-parallel training on " + device.str() + ": no c10d backend for it (cpu: Gloo, cuda: NCCL)");
  return gloo_group(store, rank, world, timeout);
}

std::unique_ptr<DataParallel> DataParallel::from_environment(const c10::Device& device, double timeout_s) {
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
  impl->group = make_process_group(impl->store, static_cast<int>(rank), static_cast<int>(world), timeout, device);
  impl->device = device;  // make_process_group took only a CPU or CUDA one
  return std::unique_ptr<DataParallel>(new DataParallel(rank, world, std::move(impl)));
}

DataParallel::DataParallel(std::int64_t rank, std::int64_t world, std::unique_ptr<Impl> impl)
    : rank_(rank), world_(world), impl_(std::move(impl)) {}
DataParallel::~DataParallel() = default;

void DataParallel::reduce_gradients(const std::vector<at::Tensor>& params, double weight) {
  begin_gradients(params, weight, at::Tensor());  // after backward: every bucket starts in finish_gradients()
  finish_gradients();
}

void DataParallel::begin_gradients(const std::vector<at::Tensor>& params, double weight, const at::Tensor& loss) {
  impl_->prepare(params, bucket_cap_mib_);
  auto& r = impl_->reducer;
  r.weight = weight;
  r.ordered = ordered_, r.world = world_;
  r.arrived.assign(params.size(), false);
  r.walked_past.assign(params.size(), false);
  r.late = -1;
  for (auto& b : r.buckets) b.pending = b.members.size(), b.work.reset(), b.flat.clear(), b.gathered.clear();
  r.next = 0;
  r.started_early = 0;
  r.active = true;
  if (!loss.defined()) return;
  // Tensors the loss does not reach (AdaMix's undrawn experts, a switched-off member) arrive
  // now, with no gradient, so that the buckets after theirs start while backward runs.
  const auto walk = std::chrono::steady_clock::now();
  const auto reached = reachable(loss);
  for (std::size_t j = 0; j < params.size(); ++j)
    if (reached.count(r.accumulators[j].get()) == 0) r.walked_past[j] = true, r.arrive(j, false), ++traffic_.unused;
  traffic_.walk_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - walk).count();
}

void DataParallel::finish_gradients() {
  at::NoGradGuard no_grad;
  const auto start = std::chrono::steady_clock::now();
  auto& r = impl_->reducer;
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    r.active = false;
    while (r.next < r.buckets.size()) r.start(r.next++);
  }
  for (auto& b : r.buckets) {
    b.work->wait();
    const at::Tensor& flat = Reducer::summed(b);
    const auto n = static_cast<std::int64_t>(b.members.size());
    const at::Tensor any = flat.narrow(0, flat.numel() - n, n).cpu();
    std::int64_t at = 0;
    for (std::int64_t m = 0; m < n; ++m) {
      const auto& p = r.params[b.members[static_cast<std::size_t>(m)]];
      at::Tensor g = flat.narrow(0, at, p.numel()).view(p.sizes());
      at += p.numel();
      if (any[m].item<double>() == 0.0) {  // no rank had one: it stays without (AdamW skips it)
        if (p.grad().defined()) p.mutable_grad().reset();
        continue;
      }
      if (p.grad().defined()) p.mutable_grad().copy_(g);
      else p.mutable_grad() = g.clone();
    }
    b.work.reset();
    b.flat.clear();
  }
  traffic_.bytes += r.bytes;
  traffic_.buckets += static_cast<std::int64_t>(r.buckets.size());
  traffic_.overlapped += r.started_early;
  r.bytes = 0;
  traffic_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ++traffic_.reductions;
  if (r.late >= 0)  // its gradient would be left out of the sum on this rank: stop rather than train on
    throw std::logic_error("data-parallel training: trainable tensor " + std::to_string(r.late) +
                           " got a gradient in backward after the walk of the loss's graph found it unreachable");
}

std::vector<double> DataParallel::sum(const std::vector<double>& values) {
  at::Tensor s;
  if (ordered_) {  // as one process adds its micro-batches' losses
    s = in_rank_order(all_gather(at::tensor(values, at::kDouble)));
  } else {
    std::vector<at::Tensor> t{at::tensor(values, at::kDouble).to(impl_->device)};
    impl_->group->allreduce(t)->wait();
    s = t[0].cpu();
  }
  return {s.data_ptr<double>(), s.data_ptr<double>() + s.numel()};
}

std::vector<at::Tensor> DataParallel::all_gather(const at::Tensor& t) {
  std::vector<std::vector<at::Tensor>> out(1);
  const at::Tensor mine = t.to(impl_->device).contiguous();
  for (std::int64_t r = 0; r < world_; ++r) out[0].push_back(at::empty_like(mine));
  std::vector<at::Tensor> in{mine};
  impl_->group->allgather(out, in)->wait();
  for (auto& each : out[0]) each = each.cpu();
  return out[0];
}

void DataParallel::barrier() { impl_->group->barrier()->wait(); }

std::vector<std::size_t> shard(const std::vector<std::size_t>& batch, std::int64_t rank, std::int64_t world) {
  const auto n = static_cast<std::int64_t>(batch.size());
  const auto base = n / world, extra = n % world;
  const auto begin = rank * base + std::min(rank, extra), size = base + (rank < extra ? 1 : 0);
  return {batch.begin() + begin, batch.begin() + begin + size};
}

}  // namespace tessera
