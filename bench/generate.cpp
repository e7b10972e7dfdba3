// Greedy generation throughput of one checkpoint: new tokens/s of `generate` (the prompt
// once, then one token a step through the key/value cache) from random prompt ids, the
// peer's workload exactly (bench/peer_generate.py). No EOS stops a row, so both sides make
// every token asked for. Prints one JSON line with the first row's new tokens, which the
// script compares with the peer's. With ADAPTER_DIR, a Hugging Face PEFT folder (a prefix, a
// prompt) is attached first, as `tessera generate --peft` attaches it.
//   tessera_bench_generate MODEL_DIR BATCH PROMPT_LENGTH NEW_TOKENS ITERATIONS THREADS [ADAPTER_DIR]
#include "architectures/decoder.h"
#include "architectures/generate.h"
#include "formats/json_file.h"
#include "architectures/t5.h"
#include "runtime/method_stack.h"
#include "runtime/peft_import.h"
#include "runtime/plugin_registry.h"
#include "tokenizers/tokenizer_extension.h"
#include "train/trainer.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <filesystem>
#include <iostream>

using namespace tessera;

int main(int argc, char** argv) {
  if (argc != 7 && argc != 8) {
    std::cerr << "usage: tessera_bench_generate MODEL_DIR BATCH PROMPT_LENGTH NEW_TOKENS ITERATIONS THREADS [ADAPTER_DIR]\n";
    return 2;
  }
  try {
    const std::string dir = argv[1];
    const std::int64_t B = std::stoll(argv[2]), T = std::stoll(argv[3]), iters = std::stoll(argv[5]);
    set_threads(std::stoll(argv[6]));
    c10::InferenceMode inference;  // as the peer runs under torch.inference_mode
    const auto type = read_json_file((std::filesystem::path(dir) / "config.json").string()).value("model_type", "");
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    GenerateOptions gen;
    gen.max_new_tokens = std::stoll(argv[4]);  // no eos_token_ids: every row runs to the end
    std::unique_ptr<DecoderModel> dec;
    std::unique_ptr<T5Model> t5;
    std::int64_t vocab = 0;
    if (type == "t5") t5 = T5Model::load(dir, opts), vocab = t5->info().vocab_size;
    else dec = DecoderModel::load(dir, opts), vocab = dec->info().vocab_size;
    PluginRegistry registry;
    std::unique_ptr<Tokenizer> tokenizer;
    std::unique_ptr<TokenizerExtension> tokenizer_ext;
    std::unique_ptr<MethodStack> methods;
    if (argc == 8) {
      registry.scan(PluginRegistry::search_path(std::filesystem::path("/proc/self/exe").string(), {}));
      tokenizer = load_tokenizer(dir);  // a prompt initialised from text attaches here too
      tokenizer_ext = std::make_unique<TokenizerExtension>(*tokenizer);
      (t5 ? static_cast<SiteModel&>(*t5) : static_cast<SiteModel&>(*dec)).set_extension(TESSERA_EXT_HOST_TOKENIZER, tokenizer_ext->table());
      const ModelConfig model_config{dir};
      methods = std::make_unique<MethodStack>(registry, std::vector<MethodConfig>{method_from_peft_dir(argv[7], registry, "adapter")},
                                              t5 ? static_cast<SiteModel&>(*t5) : static_cast<SiteModel&>(*dec), model_config);
      methods->load_state(0, methods->state_file(argv[7], 0));
    }
    at::manual_seed(0);
    const Tensor ids = at::randint(3, vocab, {B, T}, at::kLong);  // (B, T), the peer's torch.randint
    std::vector<std::vector<std::int64_t>> prompts;
    for (std::int64_t b = 0; b < B; ++b) prompts.emplace_back(ids[b].data_ptr<std::int64_t>(), ids[b].data_ptr<std::int64_t>() + T);
    auto run = [&] { return t5 ? generate(*t5, prompts, gen) : generate(*dec, prompts, gen); };
    auto out = run();  // warm-up: allocator, kernels
    const auto start = std::chrono::steady_clock::now();
    for (std::int64_t i = 0; i < iters; ++i) out = run();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::int64_t made = 0;
    for (const auto& row : out) made += static_cast<std::int64_t>(row.size());
    std::cout << nlohmann::json{{"new_tokens_per_s", static_cast<double>(made * iters) / s}, {"seconds", s}, {"first_row", out.at(0)}}.dump() << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 1;
  }
}
