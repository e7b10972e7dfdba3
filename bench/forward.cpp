// Forward throughput of one checkpoint: tokens/s of no-grad forward passes over random
// ids, the peer's workload exactly (bench/peer_forward.py). Prints one JSON line.
//   tessera_bench_forward MODEL_DIR BATCH LENGTH ITERATIONS THREADS
#include "model/bert.h"
#include "model/decoder.h"
#include "model/json_file.h"
#include "model/t5.h"
#include "train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <iostream>

using namespace tessera;

int main(int argc, char** argv) {
  if (argc != 6) {
    std::cerr << "usage: tessera_bench_forward MODEL_DIR BATCH LENGTH ITERATIONS THREADS\n";
    return 2;
  }
  try {
    const std::string dir = argv[1];
    const std::int64_t B = std::stoll(argv[2]), T = std::stoll(argv[3]), iters = std::stoll(argv[4]);
    set_threads(std::stoll(argv[5]));
    at::NoGradGuard no_grad;
    const auto type = read_json_file((std::filesystem::path(dir) / "config.json").string()).value("model_type", "");
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    std::unique_ptr<BertModel> bert;
    std::unique_ptr<DecoderModel> dec;
    std::unique_ptr<T5Model> t5;
    std::int64_t vocab = 0;
    std::function<void(const Tensor&, const Tensor&)> run;
    if (type == "bert" || type == "roberta") {
      bert = BertModel::load(dir, opts), vocab = bert->info().vocab_size;
      run = [&](const Tensor& ids, const Tensor& mask) { bert->forward(ids, mask); };
    } else if (type == "t5") {
      t5 = T5Model::load(dir, opts), vocab = t5->info().vocab_size;
      // The decoder reads a quarter of the source length, as a summary or answer would be.
      run = [&](const Tensor& ids, const Tensor& mask) {
        t5->logits(t5->decode(ids.narrow(1, 0, T / 4), t5->encode(ids, mask)));
      };
    } else {
      dec = DecoderModel::load(dir, opts), vocab = dec->info().vocab_size;
      run = [&](const Tensor& ids, const Tensor& mask) { dec->logits(dec->forward(ids, mask)); };
    }
    at::manual_seed(0);
    Tensor ids = at::randint(3, vocab, {B, T}, at::kLong), mask = at::ones({B, T}, at::kLong);
    for (int w = 0; w < 2; ++w) run(ids, mask);  // warm-up: allocator, kernels
    const auto start = std::chrono::steady_clock::now();
    for (std::int64_t i = 0; i < iters; ++i) run(ids, mask);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::cout << nlohmann::json{{"tokens_per_s", static_cast<double>(B * T * iters) / s}, {"seconds", s}}.dump() << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 1;
  }
}
