// One table, every plugin: the life from DESIGN.md checked the same way for each, on the
// real MiniLM (its weights dense, and kept as NF4 as QLoRA keeps them) and on a tiny
// checkpoint of every other family (GPT-2 with its fused c_attn, LLaMA, T5). A plugin
// shipped in plugins/, or an SDK example (sdk/examples, built in the tree for this), without
// a row here fails the first test. (The test plugins under tests/plugins are harnesses of
// fixed interventions, not methods: nothing there trains.)
#include "support.h"

#include <tessera/extensions.h>

#include "architectures/decoder.h"
#include "architectures/t5.h"
#include "architectures/weight_storage.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <functional>
#include <set>

using namespace tessera;

namespace {

struct Row {
  std::string plugin;
  std::vector<std::string> targets;
  std::map<std::string, ParamValue> params;  // chosen so that the method changes the output at once
  std::set<std::string> only;                // the families whose sites it needs (empty: all)
};

const std::vector<Row>& table() {
  static const std::vector<Row> rows = {
      {"lora", {"attn.q", "attn.v", "mlp.up"}, {{"r", std::int64_t{4}}, {"init_lora_weights", std::string("false")}, {"lora_alpha", 8.0}}, {}},
      {"lora", {"attn.o", "mlp.up"}, {{"r", std::int64_t{4}}, {"init_lora_weights", std::string("false")}, {"use_dora", true}}, {}},  // DoRA
      {"lora", {"attn.q", "mlp.down"}, {{"r", std::int64_t{4}}, {"init_lora_weights", std::string("pissa_niter_2")}}, {}},  // PiSSA, randomised SVD
      {"lora", {"attn.v"}, {{"r", std::int64_t{4}}, {"init_lora_weights", std::string("olora")}}, {}},
      {"lora", {"attn.q", "mlp.up"}, {{"r", std::int64_t{4}}, {"init_lora_weights", std::string("false")}, {"lora_fa", true}}, {}},  // LoRA-FA: B alone trains
      {"loha", {"attn.q", "mlp.down"}, {{"r", std::int64_t{4}}, {"init_weights", false}}, {}},
      {"loha", {"attn.v"}, {{"r", std::int64_t{2}}, {"init_weights", false}, {"rank_dropout", 0.5}}, {}},
      // DyLoRA: B random too (init_weights = false), so both factors get a gradient at the drawn
      // rank from the first step; then the first b trained, eval_rank below r, dropout.
      {"dylora", {"attn.q", "attn.v", "mlp.up"}, {{"r", std::int64_t{4}}, {"init_weights", false}, {"alpha", 8.0}}, {}},
      {"dylora", {"attn.o", "mlp.down"}, {{"r", std::int64_t{4}}, {"r_min", std::int64_t{2}}, {"eval_rank", std::int64_t{3}}, {"train_parts", std::string("all")},
                                          {"init_weights", false}, {"dropout", 0.1}}, {}},
      // LoKr: both factors low-rank pairs where a side is long enough (decompose_both); then
      // KronA, both factors full at r = 32 on every family's sizes, with scaled rank dropout.
      {"lokr", {"attn.q", "mlp.down"}, {{"r", std::int64_t{2}}, {"init_weights", std::string("false")}, {"decompose_both", true}}, {}},
      {"lokr", {"attn.v", "mlp.up"}, {{"r", std::int64_t{32}}, {"init_weights", std::string("false")}, {"rank_dropout", 0.5}, {"rank_dropout_scale", true}}, {}},
      {"vera", {"attn.q", "mlp.up"}, {{"r", std::int64_t{4}}, {"init_weights", false}}, {}},
      // PEFT's init (Λ = 0) at a large scale: the two steps move Λ, the second allocation masks half the triplets
      {"adalora", {"attn.q", "attn.v", "mlp.down"}, {{"init_r", std::int64_t{4}}, {"target_r", std::int64_t{2}}, {"lora_alpha", 64.0}}, {}},
      {"ia3", {}, {{"init_ia3_weights", false}}, {}},  // PEFT's default targets on every family
      {"bottleneck", {}, {}, {}},  // seq_bn (Pfeiffer): bert init, so it acts at once
      {"bottleneck", {}, {{"config", std::string("double_seq_bn")}, {"cross_adapter", true}}, {}},  // Houlsby, T5's cross-attention too
      {"bottleneck", {}, {{"config", std::string("scaled_par_bn")}, {"init_weights", std::string("bert")}}, {}},  // parallel, learned scale
      {"bottleneck", {}, {{"use_gating", true}}, {}},  // gated per sample from its input (UniPELT)
      {"bottleneck", {}, {{"config", std::string("seq_bn_inv")}}, {}},  // MAD-X: a NICE block on the embeddings, its inverse before an LM head
      {"bottleneck", {}, {{"config", std::string("double_seq_bn_inv")}, {"inv_adapter", std::string("glow")}}, {}},  // the GLOW block
      // Compacter: r = 8 (H // 32 is too small for phm_dim 4 on the tiny checkpoints); the shared
      // rule drawn U(±1) so that it acts at once (N(0, 1e-4) by default). Then Compacter++ with
      // one full B per direction shared by all layers and a rule per projection.
      {"compacter", {}, {{"bottleneck_size", std::int64_t{8}}, {"cross_adapter", true}, {"phm_c_init", std::string("uniform")}}, {}},
      {"compacter", {}, {{"config", std::string("compacter++")}, {"bottleneck_size", std::int64_t{8}}, {"shared_W_phm", true}, {"factorized_phm_W", false},
                         {"shared_phm_rule", false}, {"phm_c_init", std::string("uniform")}, {"hypercomplex_nonlinearity", std::string("normal")},
                         {"phm_init_range", 1.0}, {"phm_bias", false}}, {}},
      // SparseAdapter: SNIP on Pfeiffer's adapter; GraSP (double backward, through the plain
      // attention path) on Houlsby's, T5's cross-attention too.
      {"sparse_adapter", {}, {{"sparsity", 0.5}}, {}},
      {"sparse_adapter", {}, {{"config", std::string("double_seq_bn")}, {"pruner", std::string("grasp")}, {"cross_adapter", true}}, {}},
      {"sparse_lora", {}, {{"r", std::int64_t{4}}, {"sparsity", 0.5}}, {}},  // SNIP on q and v's factors
      // AdaMix with one expert: a training step reaches only the drawn experts, so a mixture's
      // experts would not all get a gradient in the table's two steps (its routing, averaging
      // and consistency term: tests/plugins/test_adamix.cpp).
      {"adamix", {}, {{"num_experts", std::int64_t{1}}}, {}},
      {"adamix_lora", {}, {{"num_experts", std::int64_t{1}}, {"lora_dropout", 0.0}}, {}},
      {"propetl", {}, {{"keep", 0.5}}, {}},  // one prototype, a mask per layer from its scores
      {"propetl_lora", {}, {{"r", std::int64_t{4}}, {"keep", 0.5}}, {}},  // a prototype per module (q, v), masks per layer
      {"propetl_prefix", {}, {{"num_virtual_tokens", std::int64_t{3}}, {"encoder_hidden_size", std::int64_t{8}}, {"keep", 0.5}}, {}},  // one prototype prefix, a mask per layer; T5: both stacks
      {"lst", {}, {{"reduction_factor", std::int64_t{4}}, {"dropout", 0.0}}, {"bert", "gpt2", "llama", "t5"}},  // side blocks: BERT, pre-norm decoders, T5 (both stacks)
      {"coda", {}, {{"k", 0.5}}, {"bert", "t5"}},  // encoder layers (T5: its encoder)
      {"prompt_tuning", {}, {{"num_virtual_tokens", std::int64_t{3}}}, {}},  // T5: the encoder's input
      {"p_tuning", {}, {{"num_virtual_tokens", std::int64_t{3}}}, {}},
      {"p_tuning", {}, {{"num_virtual_tokens", std::int64_t{2}}, {"encoder_reparameterization_type", std::string("LSTM")}}, {}},
      {"prefix_tuning", {}, {{"num_virtual_tokens", std::int64_t{3}}}, {}},  // T5: the decoder's self-attention, as peft
      {"prefix_tuning", {}, {{"num_virtual_tokens", std::int64_t{2}}, {"prefix_projection", true}}, {}},
      {"prefix_tuning", {}, {{"num_virtual_tokens", std::int64_t{2}}, {"shift_positions", false}}, {}},  // positionless (SDK 2.8): AdapterHub's numbering
      {"bitfit", {}, {}, {"bert", "gpt2"}},  // the families with biases
      // Every tensor of the layers: `embeddings = false` also leaves out a decoder's separate LM head,
      // which the table's hidden-state loss does not reach (the tables train in tests/plugins/test_partial.cpp).
      {"full", {}, {{"embeddings", false}}, {}},
      {"ln_tuning", {}, {}, {}},              // peft's default norms (every LayerNorm in BERT)
      {"fish_mask", {}, {{"keep_ratio", 0.01}}, {}},  // its mask from prepare()'s calibration batches
      // Child-Tuning and diff pruning default to every tensor of the layers, dense in training
      // (task-free, diff pruning's first stage): the rows keep to a part, for the table's time.
      {"child_tuning", {}, {{"reserve_p", 0.02}}, {}},  // task-driven: the child network from prepare()
      {"child_tuning", {"mlp.down.weight"}, {{"mode", std::string("task_free")}}, {}},
      // Gates partly open (α = 1): each α gets a gradient once w has moved; one gate per tensor
      // (structured) would often sit clamped at 0 or 1, its α without one in two steps.
      {"diff_pruning", {"mlp.down.weight"}, {{"structured", false}, {"alpha_init", 1.0}}, {}},
      {"example-bias-delta", {}, {}, {"bert", "gpt2"}},  // the families with biases
      {"example-token-adapter", {}, {{"r", std::int64_t{4}}}, {}},
      {"example-soft-prompt", {}, {{"num_virtual_tokens", std::int64_t{3}}}, {}},
      {"example-attention-prefix", {}, {{"length", std::int64_t{2}}}, {}},
      {"example-layer-mix", {}, {}, {}},
  };
  return rows;
}

}  // namespace

CATCH_TEST_CASE("every shipped plugin and SDK example has a conformance row", "[plugins][conformance]") {
  PluginRegistry shipped;
  shipped.scan({TESSERA_PLUGIN_DIR, TESSERA_EXAMPLE_PLUGIN_DIR});
  CATCH_CHECK(shipped.plugins().size() >= 7);
  CATCH_CHECK(shipped.refused().empty());
  for (const auto& p : shipped.plugins()) {
    bool found = false;
    for (const auto& r : table()) found |= r.plugin == p.id;
    CATCH_INFO("plugin " << p.id);
    CATCH_CHECK(found);
    CATCH_CHECK_FALSE(p.summary.empty());
    CATCH_CHECK_FALSE(p.paper.empty());
    CATCH_CHECK_NOTHROW(apply_schema(p.params, {}));  // the defaults satisfy the schema
  }
}

namespace {

// A base model of one family and what the table compares on it: hidden states over a fixed
// batch, (B, T, H), with the mask of its real positions.
struct Base {
  std::string family;
  std::function<std::unique_ptr<SiteModel>(at::ScalarType)> load;  // the model in that compute dtype
  std::function<Tensor(SiteModel&)> out;                           // over the input's positions (prompts dropped)
  Tensor mask;
};

void conform(const Row& row, const Base& base) {
  if (!row.only.empty() && row.only.count(base.family) == 0) return;
  CATCH_INFO("plugin " << row.plugin << " on " << base.family);
  const auto& mask = base.mask;
  auto model = base.load(at::kFloat);
  const auto* info = test::registry().find(row.plugin);
  CATCH_REQUIRE(info != nullptr);
  Params params = apply_schema(info->params, row.params);
  std::map<std::string, Tensor> base_before;
  for (auto* p : model->parameter_sites()) base_before[p->name()] = p->base().clone();
  Tensor base_out;
  {
    at::NoGradGuard ng;
    base_out = base.out(*model);
  }

  // The loss projects the output on a fixed random direction: unlike its squared norm, that
  // moves under a final normalisation too.
  at::manual_seed(7);
  const Tensor direction = at::randn(base_out.sizes(), base_out.options()) / std::sqrt(static_cast<double>(base_out.numel()));
  auto m = test::registry().create(row.plugin, "under_test");
  m->attach(*model, row.targets, params);
  // prepare(): data-dependent set-up (Fisher masks) from two calibration batches of that loss.
  const Calibration calibration{2, [&](std::int64_t) { return (base.out(*model) * direction).sum(); }};
  m->call("prepare", [&](Method& x) { x.prepare(calibration); });
  auto trainable = m->call("trainable", [](Method& x) { return x.trainable(); });
  CATCH_REQUIRE_FALSE(trainable.empty());
  for (const auto& [k, t] : trainable) {
    CATCH_CHECK(t.is_leaf());
    CATCH_CHECK(t.requires_grad());
    CATCH_CHECK(t.scalar_type() == at::kFloat);
  }

  // Two training steps by hand: every trainable tensor gets a gradient (in one step at
  // least: a zero-initialised up-projection leaves its down-projection none at the first);
  // the base none.
  std::map<std::string, double> grad_seen;
  for (int step = 0; step < 2; ++step) {
    model->train(true);
    Tensor loss = (base.out(*model) * direction).sum();
    loss.backward();
    model->train(false);
    at::NoGradGuard ng;
    for (auto& [k, t] : trainable) {
      CATCH_INFO("tensor " << k << ", step " << step);
      CATCH_REQUIRE(t.grad().defined());
      grad_seen[k] += t.grad().abs().sum().item<double>();
      t.sub_(t.grad() * 0.05);
    }
    // As the trainer does: after the update, with the gradients still held (AdaLoRA's allocation).
    if (const auto* ext = m->extension<tessera_method_after_step_v1>(TESSERA_EXT_METHOD_AFTER_STEP, 1)) {
      const StepInfo info{step, 2, 0.05};
      m->call("after_step", [&](Method&) { ext->after_step(ext->method, &info); });
    }
    for (auto& [k, t] : trainable) t.mutable_grad().reset();
  }
  for (const auto& [k, g] : grad_seen) {
    CATCH_INFO("tensor " << k);
    CATCH_CHECK(g > 0);
  }
  for (auto* p : model->parameter_sites()) CATCH_CHECK((!p->base().requires_grad() && at::equal(p->base(), base_before[p->name()])));

  at::NoGradGuard ng;
  Tensor adapted = base.out(*model);
  // Changed by the method, well past the rounding of an f32 output (100 ε of its scale).
  const double scale = std::max(1.0, base_out.abs().max().item<double>());  // tolerances relative to the output's size
  CATCH_CHECK(test::max_abs_diff_tokens(adapted, base_out, mask) > 100 * 1.1920929e-7 * scale);
  // Switched off by the host: the bare model, bit for bit; on again: the adapted one.
  m->owner().set_enabled(false);
  CATCH_CHECK(at::equal(base.out(*model), base_out));
  m->owner().set_enabled(true);
  CATCH_CHECK(at::equal(base.out(*model), adapted));

  // State round trip into a fresh instance on a fresh model.
  auto state = m->call("state", [](Method& x) { return x.state(); });
  auto model2 = base.load(at::kFloat);
  auto m2 = test::registry().create(row.plugin, "under_test");
  m2->attach(*model2, row.targets, params);
  m2->call("load_state", [&](Method& x) { x.load_state(state); });
  CATCH_CHECK(at::equal(base.out(*model2), adapted));
  CATCH_CHECK_FALSE(nlohmann::json::parse(m->call("cfg", [](Method& x) { return x.adapter_config_json(); })).empty());

  // (Merging into a base kept as NF4 makes that weight dense — its dequantized value plus
  // the update — so the same tolerances hold.)
  const double merge_tolerance = 1e-4 * scale;
  if (m->call("mergeable", [](Method& x) { return x.mergeable(); })) {
    m->call("merge", [](Method& x) { x.merge(); });
    CATCH_CHECK(test::max_abs_diff_tokens(base.out(*model), adapted, mask) < merge_tolerance);
    m->call("unmerge", [](Method& x) { x.unmerge(); });
    CATCH_CHECK(test::max_abs_diff_tokens(base.out(*model), adapted, mask) < merge_tolerance);
  }
  m->detach(*model);
  CATCH_CHECK(test::max_abs_diff_tokens(base.out(*model), base_out, mask) < merge_tolerance);  // merge + unmerge round
  m2->detach(*model2);
  CATCH_CHECK(at::equal(base.out(*model2), base_out));  // never merged: detached is the bare model, bit for bit

  // bf16: the method runs on a bf16 model, its trainable tensors stay f32 masters and get
  // f32 gradients, the state loads, the output is finite.
  at::AutoGradMode grad(true);
  auto model3 = base.load(at::kBFloat16);
  auto m3 = test::registry().create(row.plugin, "under_test");
  m3->attach(*model3, row.targets, params);
  m3->call("load_state", [&](Method& x) { x.load_state(state); });
  model3->train(true);
  Tensor out3 = base.out(*model3);
  CATCH_CHECK(out3.scalar_type() == at::kBFloat16);
  CATCH_CHECK(at::isfinite(out3).all().item<bool>());
  out3.to(at::kFloat).pow(2).mean().backward();
  for (auto& [k, t] : m3->call("trainable", [](Method& x) { return x.trainable(); })) {
    CATCH_INFO("bf16, tensor " << k);
    CATCH_CHECK(t.scalar_type() == at::kFloat);
    CATCH_REQUIRE(t.grad().defined());
    CATCH_CHECK(t.grad().scalar_type() == at::kFloat);
    CATCH_CHECK(at::isfinite(t.grad()).all().item<bool>());
  }
}

}  // namespace

CATCH_TEST_CASE("conformance on the real MiniLM, dense and stored as NF4: attach, train, state, merge, detach", "[plugins][conformance][minilm]") {
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  const Tensor ids = ref["input_ids"], mask = ref["attention_mask"];
  auto bert = [&](bool nf4) {
    return Base{nf4 ? "bert (nf4)" : "bert",
                [nf4](at::ScalarType dtype) {
                  auto m = BertModel::load(test::model_dir(), test::options(dtype));
                  store_weights(*m, nf4 ? "nf4" : "none", true);
                  return std::unique_ptr<SiteModel>(std::move(m));
                },
                [=](SiteModel& m) {
                  Encoded e = static_cast<BertModel&>(m).forward(ids, mask);
                  return e.hidden.narrow(1, e.prompt_length, ids.size(1));
                },
                mask};
  };
  for (const auto& base : {bert(false), bert(true)})
    for (const auto& row : table()) {
      Row r = row;
      if (!r.only.empty() && r.only.count("bert")) r.only.insert(base.family);  // bert (nf4)
      conform(r, base);
    }
}

CATCH_TEST_CASE("conformance on GPT-2 (fused c_attn), LLaMA and T5: the same life on every family", "[plugins][conformance]") {
  auto dec = test::read_tensors(test::fixture("decoders/reference.safetensors"));
  auto s2s = test::read_tensors(test::fixture("seq2seq/reference.safetensors"));
  const Tensor ids = dec["input_ids"], mask = dec["attention_mask"];
  auto decoder = [&](const std::string& name) {
    return Base{name,
                [name](at::ScalarType dtype) { return std::unique_ptr<SiteModel>(DecoderModel::load(test::fixture("decoders/" + name), test::options(dtype))); },
                [=](SiteModel& m) {
                  Tensor h = static_cast<DecoderModel&>(m).forward(ids, mask);  // (B, P + T, H)
                  return h.narrow(1, h.size(1) - ids.size(1), ids.size(1));
                },
                mask};
  };
  const Tensor src = s2s["input_ids"], src_mask = s2s["attention_mask"], target = s2s["t5.decoder_input_ids"];
  // t5_text, not the large-weight t5: there the encoder's first attention is saturated, and
  // its q gets an exactly zero gradient in transformers too.
  Base t5{"t5", [](at::ScalarType dtype) { return std::unique_ptr<SiteModel>(T5Model::load(test::fixture("seq2seq/t5_text"), test::options(dtype))); },
          [=](SiteModel& m) {
            auto& t = static_cast<T5Model&>(m);
            return t.decode(target, t.encode(src, src_mask));  // (B, U, d): every decoder position is real
          },
          at::ones_like(target)};
  for (const auto& base : {decoder("gpt2"), decoder("llama"), t5})
    for (const auto& row : table()) conform(row, base);
}
