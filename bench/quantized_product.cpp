// What the slab-at-a-time product through a quantized weight costs: for each of SmolLM2's
// three shapes of layer weight (576x576, 1536x576, 576x1536), stored as NF4 with double
// quantization and as Q4_1-like GGUF blocks when a GGUF file is given, one training step's
// products through it — x Wᵀ and the input's gradient g W — three ways:
//   dense     the f32 weight itself (the ceiling: no dequantization at all);
//   blockwise recomputed_linear, a cache-sized slab of W dequantized and multiplied at a time;
//   whole     W dequantized whole with torch's ops, then dense_linear (what the slabs replace).
// Best of ITERATIONS after a warm-up; prints one JSON line.
//   tessera_bench_quantized_product TOKENS ITERATIONS THREADS [SMOLLM2.gguf]
#include "formats/gguf.h"
#include "formats/gguf_llama.h"
#include "formats/nf4.h"
#include "train/trainer.h"

#include <tessera/dense_linear.h>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/autograd/autograd.h>

#include <chrono>
#include <functional>
#include <iostream>

using namespace tessera;

namespace {

double best_ms(std::int64_t iters, const std::function<void()>& step) {
  step();
  double best = 1e30;
  for (std::int64_t i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    step();
    best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

// Forward and input gradient of one product, x (T, in) -> (T, out).
void train_step(const std::function<at::Tensor(const at::Tensor&)>& product, const at::Tensor& x, const at::Tensor& g) {
  const at::Tensor xi = x.detach().requires_grad_(true);
  torch::autograd::grad({product(xi)}, {xi}, {g});
}

nlohmann::json measure(const StoredTensor& w, const at::Tensor& dense, std::int64_t tokens, std::int64_t iters) {
  const at::Tensor x = at::randn({tokens, dense.size(1)}), g = at::randn({tokens, dense.size(0)});
  const double d = best_ms(iters, [&] { train_step([&](const at::Tensor& xi) { return dense_linear(xi, dense); }, x, g); });
  const double b = best_ms(iters, [&] { train_step([&](const at::Tensor& xi) { return recomputed_linear(xi, w, at::Tensor()); }, x, g); });
  const double whole = best_ms(iters, [&] {
    train_step([&](const at::Tensor& xi) { return dense_linear(xi, w.dense()); }, x, g);  // autograd keeps W for backward
  });
  std::vector<float> buffer(dense.numel());
  const double rows = best_ms(iters, [&] {
    for (std::int64_t r = 0; r < dense.size(0); ++r) w.dequantize_row(r, 0, dense.size(1), buffer.data() + r * dense.size(1));
  });
  const double torch_dq = best_ms(iters, [&] { w.dense(); });
  return {{"rows_ms", rows}, {"torch_dequant_ms", torch_dq}, {"dense_ms", d}, {"blockwise_ms", b}, {"whole_ms", whole}, {"blockwise_over_dense", b / d}, {"whole_over_blockwise", whole / b}};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) {
    std::cerr << "usage: tessera_bench_quantized_product TOKENS ITERATIONS THREADS [SMOLLM2.gguf]\n";
    return 2;
  }
  const std::int64_t tokens = std::stoll(argv[1]), iters = std::stoll(argv[2]);
  set_threads(std::stoll(argv[3]));
  at::manual_seed(0);
  nlohmann::json out = {{"tokens", tokens}, {"threads", std::stoll(argv[3])}};
  for (const auto& [name, shape] : std::vector<std::pair<std::string, std::vector<std::int64_t>>>{
           {"attn.q 576x576", {576, 576}}, {"mlp.up 1536x576", {1536, 576}}, {"mlp.down 576x1536", {576, 1536}}}) {
    const auto w = nf4_storage(at::randn(shape) * 0.05, 64, true);
    out["nf4 " + name] = measure(*w, w->dense(), tokens, iters);
  }
  if (argc == 5) {
    auto f = GgufFile::open(argv[4]);
    for (const std::string name : {"blk.0.attn_q.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"}) {
      const auto w = gguf_storage(f, name, at::TensorOptions().dtype(at::kFloat));
      out[std::string("gguf ") + GgufFile::type_name(f->info(name).type) + " " + name] = measure(*w, w->dense(), tokens, iters);
    }
  }
  std::cout << out.dump(1) << "\n";
  return 0;
}
