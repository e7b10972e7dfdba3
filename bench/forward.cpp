// Forward throughput of one checkpoint: tokens/s of no-grad forward passes over random
// ids, the peer's workload exactly (bench/peer_forward.py). Prints one JSON line.
//   tessera_bench_forward MODEL_DIR BATCH LENGTH ITERATIONS THREADS [logits|loss] [DEVICE]
// logits: the LM head's output at every position (decoders, T5). loss: the language-model
// loss of the ids themselves, as an evaluation computes perplexity (here the head runs
// chunked and the logits are never whole). DEVICE: "cpu" (default), "cuda" …; on a GPU the
// clock stops after the device has finished.
#include "architectures/bert.h"
#include "architectures/decoder.h"
#include "formats/json_file.h"
#include "architectures/t5.h"
#include "runtime/device.h"
#include "tasks/head_loss.h"
#include "train/trainer.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <nlohmann/json.hpp>
#include <torch/cuda.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <iostream>

using namespace tessera;

int main(int argc, char** argv) {
  if (argc < 6 || argc > 8) {
    std::cerr << "usage: tessera_bench_forward MODEL_DIR BATCH LENGTH ITERATIONS THREADS [logits|loss] [DEVICE]\n";
    return 2;
  }
  try {
    const std::string dir = argv[1];
    const std::int64_t B = std::stoll(argv[2]), T = std::stoll(argv[3]), iters = std::stoll(argv[4]);
    set_threads(std::stoll(argv[5]));
    const bool loss = argc >= 7 && std::string(argv[6]) == "loss";
    const c10::Device device(argc == 8 ? argv[7] : "cpu");
    prepare_device(device);
    const auto finish = [&] {  // device work is asynchronous: wait for it before reading the clock
      if (device.is_cuda()) torch::cuda::synchronize();
    };
    c10::InferenceMode inference;  // as the peer runs under torch.inference_mode
    const auto type = read_json_file((std::filesystem::path(dir) / "config.json").string()).value("model_type", "");
    const auto opts = at::TensorOptions().dtype(at::kFloat).device(device);
    std::unique_ptr<BertModel> bert;
    std::unique_ptr<DecoderModel> dec;
    std::unique_ptr<T5Model> t5;
    std::int64_t vocab = 0;
    double last_loss = 0;  // loss mode: the mean loss, printed so that the two sides can be compared
    std::function<void(const Tensor&, const Tensor&)> run;
    if (type == "bert" || type == "roberta") {
      bert = BertModel::load(dir, opts), vocab = bert->info().vocab_size;
      run = [&](const Tensor& ids, const Tensor& mask) { bert->forward(ids, mask); };
    } else if (type == "t5") {
      t5 = T5Model::load(dir, opts), vocab = t5->info().vocab_size;
      // The decoder reads a quarter of the source length, as a summary or answer would be.
      run = [&](const Tensor& ids, const Tensor& mask) {
        // The decoder reads [start ; target[:-1]] and is scored on target, as transformers shifts labels.
        const Tensor target = ids.narrow(1, 0, T / 4);  // (B, T/4)
        const Tensor input = at::cat({at::full({B, 1}, t5->config().decoder_start_token_id, ids.options()), target.narrow(1, 0, T / 4 - 1)}, 1);
        const Tensor h = t5->decode(input, t5->encode(ids, mask));  // (B, T/4, d)
        if (!loss) return (void)t5->logits(h);
        auto [rows, next] = labelled_rows(t5->head_input(h), target);
        last_loss = (head_loss_sum(t5->head(), rows, next) / static_cast<double>(next.size(0))).item<double>();
      };
    } else {
      dec = DecoderModel::load(dir, opts), vocab = dec->info().vocab_size;
      run = [&](const Tensor& ids, const Tensor& mask) {
        const Tensor h = dec->forward(ids, mask);  // (B, T, H)
        if (!loss) return (void)dec->logits(h);
        auto [rows, next] = labelled_rows(h.narrow(1, 0, T - 1), ids.narrow(1, 1, T - 1));  // position t predicts t + 1
        last_loss = (head_loss_sum(dec->head(), rows, next) / static_cast<double>(next.size(0))).item<double>();
      };
    }
    at::manual_seed(0);
    Tensor ids = at::randint(3, vocab, {B, T}, at::kLong).to(device), mask = at::ones({B, T}, opts.dtype(at::kLong));
    for (int w = 0; w < 2; ++w) run(ids, mask);  // warm-up: allocator, kernels
    finish();
    const auto start = std::chrono::steady_clock::now();
    for (std::int64_t i = 0; i < iters; ++i) run(ids, mask);
    finish();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    nlohmann::json out{{"tokens_per_s", static_cast<double>(B * T * iters) / s}, {"seconds", s}};
    if (loss) out["loss"] = last_loss;
    std::cout << out.dump() << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 1;
  }
}
