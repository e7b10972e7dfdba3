// Gradient checkpointing (architectures/recompute.h): a training step's gradients with every
// layer recomputed in backward equal those of the same step with the activations kept — with
// dropout inside the layers (the random streams must be replayed exactly) and an attention
// prefix computed outside them by a network (its gradient must leave the layer).
#include "support.h"

#include "train/session.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>

#include <fstream>
#include <numeric>
#include <set>

using namespace tessera;

namespace {

// Whether the graph behind `t` holds a recomputed layer.
bool has_recomputed(const Tensor& t) {
  std::vector<torch::autograd::Node*> todo{t.grad_fn().get()};
  std::set<torch::autograd::Node*> seen;
  while (!todo.empty()) {
    auto* n = todo.back();
    todo.pop_back();
    if (n == nullptr || !seen.insert(n).second) continue;
    if (n->name().find("Recomputed") != std::string::npos) return true;
    for (const auto& e : n->next_edges()) todo.push_back(e.function.get());
  }
  return false;
}

// Every trainable tensor's gradient after one step's loss on the first 8 training examples.
std::vector<Tensor> step_grads(const std::string& body, bool recompute) {
  auto dir = test::temp_dir("recompute");
  std::ofstream(dir / "run.toml") << body << std::flush;
  Config c = load_config((dir / "run.toml").string());
  check_methods(c, test::registry());
  c.model.device = test::device().str();
  c.train.gradient_checkpointing = recompute;
  Session s(c, test::registry());
  s.model().train(true);
  std::vector<std::size_t> order(8);
  std::iota(order.begin(), order.end(), 0);
  const Batch b = s.task().batch(Split::Train, order, 0, order.size());
  at::manual_seed(5);
  const Tensor loss = s.task().forward(b).loss;
  CATCH_CHECK(has_recomputed(loss) == recompute);
  loss.backward();
  std::vector<Tensor> grads;
  for (const auto& t : s.methods().trainable()) grads.push_back(t.grad().defined() ? t.grad().clone() : at::zeros_like(t));
  return grads;
}

void check_same_grads(const std::string& body) {
  const auto kept = step_grads(body, false), recomputed = step_grads(body, true);
  CATCH_REQUIRE(kept.size() == recomputed.size());
  double largest = 0;
  for (std::size_t i = 0; i < kept.size(); ++i) {
    CATCH_INFO("trainable tensor " << i << " " << kept[i].sizes());
    CATCH_CHECK(test::max_abs_diff(kept[i], recomputed[i]) <= 1e-5 * (kept[i].abs().max().item<double>() + 1e-6));
    largest = std::max(largest, kept[i].abs().max().item<double>());
  }
  CATCH_CHECK(largest > 0);  // the step did reach the methods
}

// A causal-LM run of the model at `path` on 40 polarity sentences, with `methods`.
std::string causal_lm(const std::string& path, std::int64_t max_length, const std::string& methods) {
  return "[model]\npath = \"" + path + "\"\n[data]\npath = \"${TESSERA_DATA_DIR}/polarity.csv\"\nmax_length = " + std::to_string(max_length) +
         "\nlimit = 40\n[task]\nkind = \"causal-lm\"\n" + methods;
}

// LoRA r 4 with dropout 0.2 on `targets` (a TOML list).
std::string lora(const std::string& targets) {
  return "[[methods]]\nplugin = \"lora\"\ntargets = " + targets + "\n[methods.params]\nr = 4\nlora_alpha = 8\nlora_dropout = 0.2\n";
}

}  // namespace

CATCH_TEST_CASE("gradient checkpointing on GPT-2: LoRA and a prefix network under the model's dropout give the kept activations' gradients", "[train][causal][recompute]") {
  check_same_grads(causal_lm(test::fixture("decoders/gpt2_text"), 24, lora(R"(["c_attn", "attn.o", "mlp.up", "mlp.down"])") + R"([[methods]]
plugin = "prefix_tuning"
[methods.params]
num_virtual_tokens = 3
prefix_projection = true
encoder_hidden_size = 16
)"));
}

CATCH_TEST_CASE("gradient checkpointing on the real SmolLM2 (LLaMA, rotary): LoRA with dropout gives the kept activations' gradients", "[train][causal][recompute][real]") {
  check_same_grads(causal_lm("${TESSERA_DECODER_DIR}", 16, lora(R"(["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"])")));
}

CATCH_TEST_CASE("gradient checkpointing on MiniLM: LoRA and Houlsby adapters under the encoder's own dropout give the kept activations' gradients", "[train][minilm][recompute]") {
  check_same_grads(R"([model]
path = "${TESSERA_MODEL_DIR}"
[data]
path = "${TESSERA_DATA_DIR}/polarity.csv"
max_length = 32
limit = 40
[[methods]]
plugin = "lora"
targets = ["attn.q", "attn.v", "mlp.down"]
[methods.params]
r = 4
lora_alpha = 8
lora_dropout = 0.1
[[methods]]
plugin = "bottleneck"
[methods.params]
config = "double_seq_bn"
)");
}

CATCH_TEST_CASE("gradient checkpointing on T5: LoRA in both stacks, a decoder prefix and cross-attention under the model's dropout give the kept activations' gradients", "[train][seq2seq][recompute]") {
  // The decoder's layers take the encoder's output, the position bias and the prefix from
  // outside; the encoder's gradient must come back through the recomputed decoder layers.
  check_same_grads(std::string("[model]\npath = \"") + test::fixture("seq2seq/t5_text") + R"("
[data]
path = "${TESSERA_DATA_DIR}/polarity.csv"
target_column = "text"
max_length = 16
limit = 20
[task]
kind = "seq2seq"
[[methods]]
plugin = "lora"
targets = ["attn.q", "attn.v", "cross.k", "mlp.down"]
[methods.params]
r = 4
lora_alpha = 8
lora_dropout = 0.2
[[methods]]
plugin = "prefix_tuning"
[methods.params]
num_virtual_tokens = 3
prefix_projection = true
encoder_hidden_size = 16
[[methods]]
plugin = "full"
[methods.params]
embeddings = true
)");
}
