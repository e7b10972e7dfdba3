#include "architectures/recompute.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <mutex>

namespace tessera {
namespace {

// The body and the random states the first pass started from, kept until backward.
struct Pending : torch::CustomClassHolder {
  LayerBody body;
  Tensor cpu_state, device_state;  // device_state: the tensors' own device's generator, off the CPU
  c10::Device device = c10::kCPU;
};

at::Generator generator(c10::Device d) { return d.is_cpu() ? at::detail::getDefaultCPUGenerator() : at::globalContext().defaultGenerator(d); }

Tensor state_of(c10::Device d) {
  auto g = generator(d);
  std::lock_guard<std::mutex> lock(g.mutex());
  return g.get_state();
}

void set_state(c10::Device d, const Tensor& s) {
  auto g = generator(d);
  std::lock_guard<std::mutex> lock(g.mutex());
  g.set_state(s);
}

// Sets the streams back to where the first pass found them, and — whatever the body does,
// a throw included — forward again to where they are now when it ends.
class ReplayedStreams {
 public:
  explicit ReplayedStreams(const Pending& p) : device_(p.device), cpu_now_(state_of(c10::kCPU)) {
    if (!device_.is_cpu()) device_now_ = state_of(device_);
    set_state(c10::kCPU, p.cpu_state);
    if (!device_.is_cpu()) set_state(device_, p.device_state);
  }
  ~ReplayedStreams() {
    set_state(c10::kCPU, cpu_now_);
    if (!device_.is_cpu()) set_state(device_, device_now_);
  }
  ReplayedStreams(const ReplayedStreams&) = delete;
  ReplayedStreams& operator=(const ReplayedStreams&) = delete;

 private:
  c10::Device device_;
  Tensor cpu_now_, device_now_;
};

struct Recomputed : torch::autograd::Function<Recomputed> {
  // x (N, …), extras: tensors from outside with their own gradients -> the body's output
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, at::TensorList extras, c10::intrusive_ptr<Pending> p) {
    p->cpu_state = state_of(c10::kCPU);
    p->device = x.device();
    if (!x.is_cpu()) p->device_state = state_of(x.device());
    std::vector<Tensor> saved{x};
    saved.insert(saved.end(), extras.begin(), extras.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["pending"] = c10::IValue::make_capsule(p);
    return p->body(x, std::vector<Tensor>(extras.begin(), extras.end()));  // no graph: autograd is off in forward
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list g) {
    const auto p = c10::static_intrusive_pointer_cast<Pending>(ctx->saved_data["pending"].toCapsule());
    std::vector<Tensor> in;
    for (const auto& t : ctx->get_saved_variables()) in.push_back(t.defined() ? t.detach().requires_grad_(t.requires_grad()) : t);
    Tensor y;
    {
      const ReplayedStreams replay(*p);  // the same draws as the first pass
      at::AutoGradMode on(true);
      y = p->body(in[0], std::vector<Tensor>(in.begin() + 1, in.end()));
    }
    if (y.requires_grad()) torch::autograd::backward({y}, {g[0]});  // parameters inside accumulate theirs
    torch::autograd::variable_list grads;
    for (const auto& t : in) grads.push_back(t.defined() && t.requires_grad() ? t.grad() : Tensor());
    grads.emplace_back();  // the pending body
    return grads;
  }
};

}  // namespace

Tensor recomputed_layer(const Tensor& x, const std::vector<Tensor>& extras, LayerBody body) {
  auto p = c10::make_intrusive<Pending>();
  p->body = std::move(body);
  const Tensor input = x.requires_grad() ? x : x.detach().requires_grad_(true);
  return Recomputed::apply(input, at::TensorList(extras), p);
}

std::vector<Tensor> prefix_extras(const std::pair<Tensor, Tensor>& kv) {
  return kv.first.defined() ? std::vector<Tensor>{kv.first, kv.second} : std::vector<Tensor>{};
}

std::pair<Tensor, Tensor> prefix_of(const std::vector<Tensor>& extras) {
  return extras.empty() ? std::pair<Tensor, Tensor>{} : std::pair<Tensor, Tensor>{extras[0], extras[1]};
}

}  // namespace tessera
