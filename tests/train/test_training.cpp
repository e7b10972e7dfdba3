// Training end to end on the real encoder and the real polarity data.
#include "support.h"

#include "tasks/bleu.h"
#include "tasks/causal_lm.h"
#include "tasks/seq2seq.h"
#include "train/trainer.h"

#include <tessera/extensions.h>

#include <nlohmann/json.hpp>

#include <set>
#include <sstream>

#include <fstream>
#include <iterator>

using namespace tessera;

namespace {

// `body` written as dir/run.toml, loaded and checked; the run goes to dir/run.
Config config_in(const std::filesystem::path& dir, const std::string& body) {
  {
    std::ofstream(dir / "run.toml") << body;
  }
  Config c = load_config((dir / "run.toml").string());
  check_methods(c, test::registry());
  c.output_dir = (dir / "run").string();
  c.model.device = test::device().str();  // the runs follow the test device like the model tests
  return c;
}

// [model] and [data] of a run on the real encoder and polarity data.
std::string polarity(std::int64_t max_length, std::int64_t limit) {
  return "[model]\npath = \"${TESSERA_MODEL_DIR}\"\n[data]\npath = \"${TESSERA_DATA_DIR}/polarity.csv\"\nmax_length = " +
         std::to_string(max_length) + "\nlimit = " + std::to_string(limit) + "\n";
}

// What train() throws; empty when it finishes.
std::string train_error(Session& s, const std::string& run_dir) {
  try {
    train(s, run_dir);
  } catch (const std::exception& e) {
    return e.what();
  }
  return {};
}

Config small_config(const std::string& name, bool with_lora, std::int64_t limit, std::int64_t max_steps) {
  auto dir = test::temp_dir(name);
  std::string body = R"([model]
path = "${TESSERA_MODEL_DIR}"
[data]
path = "${TESSERA_DATA_DIR}/polarity.csv"
max_length = 48
limit = )" + std::to_string(limit) + R"(
[train]
epochs = 1
batch_size = 16
lr = 1e-3
head_lr = 3e-3
threads = 0
max_steps = )" + std::to_string(max_steps) + "\n";
  if (with_lora)
    body += "[[methods]]\nplugin = \"lora\"\ntargets = [\"attn.q\", \"attn.k\", \"attn.v\", \"attn.o\", \"mlp.up\", \"mlp.down\"]\n"
            "[methods.params]\nr = 8\nlora_alpha = 16\nlora_dropout = 0.1\n";
  return config_in(dir, body);
}

}  // namespace

CATCH_TEST_CASE("training leaves the base bit-for-bit unchanged and a saved adapter reloads to identical logits", "[train][minilm][parity]") {
  set_threads(0);
  Config c = small_config("train-save", true, 300, 4);
  Tensor logits_after;
  std::vector<std::size_t> order;
  {
    Session s(c, test::registry());
    std::map<std::string, Tensor> before;
    for (auto* p : s.model().parameter_sites()) before[p->name()] = p->base().clone();
    TrainResult r = train(s, c.output_dir);
    CATCH_CHECK(r.steps == 4);
    for (auto* p : s.model().parameter_sites()) {
      CATCH_INFO("base tensor " << p->name());
      CATCH_CHECK(at::equal(p->base(), before[p->name()]));
    }
    for (std::size_t i = 0; i < s.data().test.size(); ++i) order.push_back(i);
    at::NoGradGuard ng;
    logits_after = s.task().forward(s.task().batch(Split::Test, order, 0, order.size())).logits;
  }
  CATCH_CHECK(std::filesystem::exists(c.output_dir + "/adapter/lora/adapter_model.safetensors"));
  CATCH_CHECK(std::filesystem::exists(c.output_dir + "/adapter/lora/adapter_config.json"));
  CATCH_CHECK(std::filesystem::exists(c.output_dir + "/metrics.jsonl"));
  Session reloaded(c, test::registry());
  reloaded.load_adapter(c.output_dir + "/adapter");
  at::NoGradGuard ng;
  Tensor logits = reloaded.task().forward(reloaded.task().batch(Split::Test, order, 0, order.size())).logits;
  CATCH_CHECK(at::equal(logits, logits_after));

  // The manifest must describe this run: another method list, or none, is refused by name.
  const std::string manifest = c.output_dir + "/adapter/tessera.json";
  auto load_error = [&] {
    try {
      reloaded.load_adapter(c.output_dir + "/adapter");
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  std::ifstream in(manifest);
  auto j = nlohmann::json::parse(in);
  in.close();
  auto edited = j;
  edited["methods"][0]["name"] = "other";
  std::ofstream(manifest) << edited.dump();
  CATCH_CHECK(load_error() == manifest + ": methods are [other (lora)], but the run's config has [lora (lora)]");
  edited = j;
  edited["methods"][0].erase("name");  // errors inside name their place in the file
  std::ofstream(manifest) << edited.dump();
  CATCH_CHECK(load_error() == manifest + ": [json.exception.out_of_range.403] (/methods/0) key 'name' not found");
  edited["methods"] = 5;
  std::ofstream(manifest) << edited.dump();
  CATCH_CHECK(load_error() == manifest + ": methods must be a list, got 5");
  edited = j;
  edited["task"] = "causal-lm";
  std::ofstream(manifest) << edited.dump();
  CATCH_CHECK(load_error() == manifest + ": task is \"causal-lm\", but the run's task is \"sequence-classification\"");
  std::filesystem::remove(manifest);
  CATCH_CHECK(load_error() == manifest + ": missing (an adapter folder written by `tessera train` has one)");
  std::ofstream(manifest) << j.dump();
  CATCH_CHECK(load_error().empty());

  // The saved LoRA folder is HF PEFT's format: peft loads it and computes what we compute.
  const std::string peft_out = c.output_dir + "/peft_hidden.safetensors";
  const std::string cmd = test::python() + " " + TESSERA_SOURCE_DIR + "/tests/fixtures/peft_forward.py " + c.output_dir +
                          "/adapter/lora " + test::fixture("reference.safetensors") + " " + peft_out;
  CATCH_REQUIRE(std::system(cmd.c_str()) == 0);
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  test::perturb_if_asked(reloaded.model());
  Tensor ours = reloaded.backbone().encode(ref["input_ids"], ref["attention_mask"]).hidden;
  TESSERA_CHECK_PARITY(test::parity(ours, test::read_tensors(peft_out), "hidden", ref["attention_mask"]));
  CATCH_CHECK(test::max_abs_diff_tokens(ours, ref["hidden"], ref["attention_mask"]) > 1e-6);  // the adapter is not a no-op
}

CATCH_TEST_CASE("a run whose loss turns nan stops at that step, before the update, and names it", "[train][minilm]") {
  set_threads(0);
  auto dir = test::temp_dir("train-diverge");
  // lora_alpha = 1e300 is inf in f32: s·B·A·x is 0·inf = nan at the first step.
  Config c = config_in(dir, polarity(32, 100) + R"([train]
epochs = 1
batch_size = 8
max_steps = 3
[[methods]]
plugin = "lora"
targets = ["attn.q"]
[methods.params]
lora_alpha = 1e300
)");
  Session s(c, test::registry());
  const std::string message = train_error(s, c.output_dir);
  CATCH_CHECK_THAT(message, Catch::Matchers::StartsWith("training diverged at step 1 (epoch 1): the loss is nan; stopped before the update"));
  CATCH_CHECK_THAT(message, Catch::Matchers::Contains("It came before any update, so not from the learning rate"));
  CATCH_CHECK_THAT(message, Catch::Matchers::EndsWith("No epoch had finished: nothing was saved."));
  // The optimizer never ran: LoRA's B is still its zero initialisation, the head its own.
  for (auto& [name, t] : s.methods()[0].call("trainable", [](Method& x) { return x.trainable(); })) {
    CATCH_INFO(name);
    CATCH_CHECK(at::isfinite(t).all().item<bool>());
    if (name.find("lora_B") != std::string::npos) CATCH_CHECK(t.abs().max().item<double>() == 0.0);
  }
  CATCH_CHECK_FALSE(std::filesystem::exists(c.output_dir + "/adapter"));
  std::ifstream metrics(c.output_dir + "/metrics.jsonl");
  std::string all((std::istreambuf_iterator<char>(metrics)), std::istreambuf_iterator<char>());
  CATCH_CHECK_THAT(all, Catch::Matchers::Contains(R"("event":"diverged")"));
}

CATCH_TEST_CASE("a run that diverges after an epoch keeps that epoch's adapter and names the learning rate", "[train][minilm]") {
  set_threads(0);
  auto dir = test::temp_dir("train-diverge-later");
  // 60 training examples at batch 16: 4 steps an epoch; the probe's loss turns nan at step 5.
  Config c = config_in(dir, polarity(16, 75) + R"([train]
epochs = 2
batch_size = 16
lr = 1e-3
[[methods]]
plugin = "probe"
targets = ["attn.q"]
[methods.params]
kind = "nan_loss"
length = 5
)");
  Session s(c, test::registry());
  const std::string message = train_error(s, c.output_dir);
  CATCH_CHECK_THAT(message, Catch::Matchers::StartsWith("training diverged at step 6 (epoch 2): the loss is nan; stopped before the update. lr was "));
  CATCH_CHECK_THAT(message, Catch::Matchers::EndsWith("The adapter of the last finished epoch stays in " + c.output_dir + "/adapter"));
  // That adapter is epoch 1's, and it reloads.
  Session reloaded(c, test::registry());
  reloaded.load_adapter(c.output_dir + "/adapter");
  auto head = test::read_tensors(c.output_dir + "/adapter/head.safetensors");
  CATCH_CHECK(at::isfinite(head.at("classifier.weight")).all().item<bool>());
}

CATCH_TEST_CASE("a short real LoRA run beats the frozen-encoder baseline", "[train][slow][minilm]") {
  set_threads(0);
  Config lora_cfg = small_config("train-lora", true, 1200, 0);
  Config frozen_cfg = small_config("train-frozen", false, 1200, 0);
  Session lora(lora_cfg, test::registry());
  Session frozen(frozen_cfg, test::registry());
  const double lora_acc = train(lora, lora_cfg.output_dir).test.accuracy;
  const double frozen_acc = train(frozen, frozen_cfg.output_dir).test.accuracy;
  CATCH_INFO("LoRA " << lora_acc << " vs frozen " << frozen_acc << " on " << lora.data().test.size() << " test sentences");
  CATCH_CHECK(lora_acc > frozen_acc);
  CATCH_CHECK(lora_acc > 0.7);
}

CATCH_TEST_CASE("a max_length past a learned position table is refused before training", "[train][causal]") {
  auto dir = test::temp_dir("too-long");
  const std::string model = test::fixture("decoders/gpt2_text");  // n_positions 128
  auto body = [&](int max_length) {
    return "[model]\npath = \"" + model + "\"\n[data]\npath = \"${TESSERA_DATA_DIR}/polarity.csv\"\nmax_length = " + std::to_string(max_length) +
           "\nlimit = 20\n[task]\nkind = \"causal-lm\"\n";
  };
  CATCH_CHECK_THROWS_WITH(Session(config_in(dir, body(129)), test::registry()), "[data] max_length = 129 exceeds the 128 positions of " + model);
  CATCH_CHECK_NOTHROW(Session(config_in(dir, body(128)), test::registry()));
}

CATCH_TEST_CASE("prompts that truncation leaves no response token after are counted, and a split with none is refused", "[train][causal]") {
  auto dir = test::temp_dir("long-prompts");
  auto body = [&](int long_prompts) {
    std::ofstream data((dir / "pr.jsonl").string());
    for (int i = 0; i < 20; ++i)
      data << "{\"prompt\": \"" << (i < long_prompts ? std::string(200, 'a') : std::string("a film")) << "\", \"text\": \" was fine\"}\n";
    return "[model]\npath = \"" + test::fixture("decoders/gpt2_text") + "\"\n[data]\npath = \"" + (dir / "pr.jsonl").string() +
           "\"\nprompt_column = \"prompt\"\nmax_length = 16\n[task]\nkind = \"causal-lm\"\n";
  };
  CATCH_CHECK_THROWS_WITH(Session(config_in(dir, body(20)), test::registry()),
                          Catch::Contains("16 of 16 training examples keep no 'text' token after their prompt at max_length = 16"));
  CATCH_CHECK_NOTHROW(Session(config_in(dir, body(10)), test::registry()));  // some do: a warning, and the run goes on
}

CATCH_TEST_CASE("causal-LM fine-tuning with LoRA lowers the perplexity of held-out text, with prompts left out of the loss", "[train][causal]") {
  set_threads(0);
  auto dir = test::temp_dir("causal");
  Config c = config_in(dir, std::string("[model]\npath = \"") + test::fixture("decoders/gpt2_text") + R"("
[data]
path = "${TESSERA_DATA_DIR}/polarity.csv"
max_length = 48
limit = 400
[task]
kind = "causal-lm"
[train]
epochs = 1
batch_size = 16
lr = 3e-2
max_steps = 40
[[methods]]
plugin = "lora"
targets = ["c_attn", "attn.o", "mlp.up", "mlp.down"]
[methods.params]
r = 8
lora_alpha = 16
)");
  Session s(c, test::registry());
  CATCH_REQUIRE(std::string(s.task().kind()) == "causal-lm");
  CATCH_CHECK(s.task().head().empty());
  // Every example: <s> text </s>, labelled from the first token on.
  const auto& ids = s.task().token_ids(Split::Train)[0];
  CATCH_CHECK(ids.front() == 1);
  CATCH_CHECK((ids.back() == 2 || ids.size() == 48));
  const EvalResult before = evaluate(s, Split::Test);
  TrainResult r = train(s, c.output_dir);
  CATCH_INFO("perplexity " << before.perplexity << " -> " << r.test.perplexity);
  CATCH_CHECK(r.test.perplexity < 0.6 * before.perplexity);
  CATCH_CHECK(std::abs(r.test.perplexity - std::exp(r.test.loss)) < 1e-6 * r.test.perplexity);
  CATCH_CHECK(std::filesystem::exists(c.output_dir + "/adapter/lora/adapter_model.safetensors"));

  // With a prompt column the prompt tokens carry -100: only the text is learned.
  {
    std::ofstream(dir / "pairs.jsonl") << R"({"prompt": "Review: good film", "response": " positive"})" << "\n"
                                       << R"({"prompt": "Review: dull plot", "response": " negative"})" << "\n"
                                       << R"({"prompt": "Review: fine cast", "response": " positive"})" << "\n";
  }
  Config p = c;
  p.data.path = (dir / "pairs.jsonl").string();
  p.data.format = "auto";
  p.data.prompt_column = "prompt";
  p.data.text_column = "response";
  p.data.test_fraction = 0.34;
  p.data.limit = 0;
  Session sp(p, test::registry());
  const auto& pl = dynamic_cast<CausalLm&>(sp.task()).prompt_lengths(Split::Train);
  std::vector<std::size_t> order{0, 1};
  Batch b = sp.task().batch(Split::Train, order, 0, 2);
  for (std::int64_t row = 0; row < 2; ++row) {
    const auto prompt = pl[static_cast<std::size_t>(row)];
    const auto len = static_cast<std::int64_t>(sp.task().token_ids(Split::Train)[static_cast<std::size_t>(row)].size());
    CATCH_CHECK(prompt > 1);
    CATCH_CHECK(b.lm_labels[row].narrow(0, 0, prompt).eq(-100).all().item<bool>());
    CATCH_CHECK(b.lm_labels[row].narrow(0, prompt, len - prompt).equal(b.ids[row].narrow(0, prompt, len - prompt)));
  }
}

CATCH_TEST_CASE("seq2seq fine-tuning of T5 with LoRA: target perplexity falls, BLEU of greedy outputs is reported", "[train][seq2seq]") {
  set_threads(0);
  auto dir = test::temp_dir("seq2seq");
  {
    // A real-text task the tiny model can learn in a few steps: rewrite the first words
    // of each review (copying, the classic sequence-to-sequence check).
    auto rows = read_csv(std::string(std::getenv("TESSERA_DATA_DIR")) + "/polarity.csv");
    std::ofstream out(dir / "pairs.jsonl");
    for (std::size_t r = 1; r < 401; ++r) {
      std::istringstream words(rows[r][0]);
      std::string w, first;
      for (int k = 0; k < 4 && words >> w; ++k) first += (k ? " " : "") + w;
      out << nlohmann::json{{"source", first}, {"target", first}}.dump() << "\n";
    }
  }
  Config c = config_in(dir, std::string("[model]\npath = \"") + test::fixture("seq2seq/t5_text") + R"("
[data]
path = "pairs.jsonl"
text_column = "source"
target_column = "target"
max_length = 16
[task]
kind = "seq2seq"
[train]
epochs = 4
batch_size = 16
lr = 1e-2
[[methods]]
plugin = "lora"
targets = ["q", "k", "v", "o", "wi", "wo"]
[methods.params]
r = 8
lora_alpha = 16
)");
  Session s(c, test::registry());
  CATCH_REQUIRE(std::string(s.task().kind()) == "seq2seq");
  CATCH_CHECK(s.task().token_ids(Split::Train)[0].back() == 1);  // the template's </s>
  std::vector<std::size_t> order{0, 1};
  Batch b = s.task().batch(Split::Train, order, 0, 2);
  CATCH_CHECK(b.decoder_ids[0][0].item<std::int64_t>() == 0);  // decoder start
  CATCH_CHECK(b.decoder_ids[0][1].item<std::int64_t>() == b.lm_labels[0][0].item<std::int64_t>());
  const EvalResult before = evaluate(s, Split::Test);
  TrainResult r = train(s, c.output_dir);
  CATCH_INFO("perplexity " << before.perplexity << " -> " << r.test.perplexity << ", BLEU " << before.bleu << " -> " << r.test.bleu);
  CATCH_CHECK(r.test.perplexity < 0.5 * before.perplexity);
  // (A random 64-wide T5 does not learn to copy in seconds: BLEU stays near 0 here; its
  // computation is checked against sacrebleu in test_bleu.cpp.)
  // The reported BLEU is that of the texts the model writes.
  std::vector<std::size_t> all(s.task().examples(Split::Test).size());
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = i;
  std::vector<std::string> refs;
  for (const auto& e : s.task().examples(Split::Test)) refs.push_back(e.target);
  CATCH_CHECK(std::abs(corpus_bleu(dynamic_cast<Seq2Seq&>(s.task()).generate_text(Split::Test, all, 0, all.size()), refs).score - r.test.bleu) < 1e-9);
}

CATCH_TEST_CASE("token classification: each word's tag sits on its first piece, and LoRA or P-tuning v2 with a token head learns the tags", "[train][tokens][minilm]") {
  set_threads(0);
  auto dir = test::temp_dir("tokens");
  {
    // Real sentences, each word tagged by its kind (punctuation, number, function word, other).
    auto rows = read_csv(std::string(std::getenv("TESSERA_DATA_DIR")) + "/polarity.csv");
    const std::set<std::string> function{"the", "a", "an", "of", "and", "to", "is", "in", "it", "that", "this", "with", "for", "as"};
    std::ofstream out(dir / "tagged.jsonl");
    for (std::size_t r = 1; r < 601; ++r) {
      std::istringstream in(rows[r][0]);
      std::vector<std::string> words, tags;
      for (std::string w; in >> w;) {
        const bool punct = std::all_of(w.begin(), w.end(), [](unsigned char ch) { return std::ispunct(ch); });
        const bool digit = std::any_of(w.begin(), w.end(), [](unsigned char ch) { return std::isdigit(ch); });
        words.push_back(w);
        tags.push_back(punct ? "PUNCT" : digit ? "NUM" : function.count(w) ? "FUNC" : "WORD");
      }
      out << nlohmann::json{{"words", words}, {"tags", tags}}.dump() << "\n";
    }
  }
  // LoRA, and P-tuning v2's deep prompts (prefix tuning without its projection), which the
  // paper makes for token classification on encoders: the text's tokens are labelled.
  for (const std::string method : {"lr = 1e-3\n[[methods]]\nplugin = \"lora\"\ntargets = [\"attn.q\", \"attn.v\"]\n[methods.params]\nr = 4\n",
                                   "lr = 1e-2\n[[methods]]\nplugin = \"prefix_tuning\"\n[methods.params]\nnum_virtual_tokens = 8\n"}) {
  CATCH_INFO(method);
  Config c = config_in(dir, R"([model]
path = "${TESSERA_MODEL_DIR}"
[data]
path = "tagged.jsonl"
text_column = "words"
label_column = "tags"
max_length = 64
[task]
kind = "token-classification"
[train]
epochs = 1
batch_size = 16
head_lr = 2e-2
)" + method);
  c.output_dir += method.find("lora") != std::string::npos ? "-lora" : "-prefix";
  Session s(c, test::registry());
  CATCH_CHECK(s.data().label_names == std::vector<std::string>{"FUNC", "NUM", "PUNCT", "WORD"});
  // One labelled piece per word (none truncated at 64 here), [CLS] and [SEP] unlabelled.
  std::vector<std::size_t> order{0, 1, 2};
  Batch b = s.task().batch(Split::Train, order, 0, 3);
  for (std::int64_t row = 0; row < 3; ++row) {
    const auto& e = s.task().examples(Split::Train)[static_cast<std::size_t>(row)];
    CATCH_CHECK(b.lm_labels[row].ne(-100).sum().item<std::int64_t>() == static_cast<std::int64_t>(e.words.size()));
    CATCH_CHECK(b.lm_labels[row][0].item<std::int64_t>() == -100);
  }
  const EvalResult before = evaluate(s, Split::Test);
  std::map<std::string, Tensor> initial;
  for (const auto& [k, t] : s.methods()[0].call("trainable", [](Method& m) { return m.trainable(); })) initial[k] = t.detach().clone();
  TrainResult r = train(s, c.output_dir);
  CATCH_INFO("token accuracy " << before.accuracy << " -> " << r.test.accuracy);
  for (const auto& [k, t] : s.methods()[0].call("trainable", [](Method& m) { return m.trainable(); }))
    CATCH_CHECK(test::max_abs_diff(t.detach(), initial.at(k)) > 1e-3);  // the method learned, not the head alone
  CATCH_CHECK(r.test.accuracy > 0.85);
  CATCH_CHECK(r.test.accuracy > before.accuracy + 0.2);
  CATCH_CHECK(r.test.tokens > 1000);
  }
}

CATCH_TEST_CASE("life stages: trainable() after prepare(), tensors added at a step reach the optimizer, the step's pass and a second one from extra_loss(), the tokenizer at attach", "[train][minilm]") {
  set_threads(0);
  auto dir = test::temp_dir("train-life");
  Config c = config_in(dir, polarity(32, 64) + R"([train]
epochs = 1
batch_size = 8
max_steps = 3
lr = 1e-2
[[methods]]
plugin = "probe"
name = "life"
targets = ["attn.q"]
[methods.params]
kind = "life"
[[methods]]
plugin = "probe"
name = "again"
targets = ["attn.q"]
[methods.params]
kind = "forward_again"
[[methods]]
plugin = "probe"
name = "tok"
targets = ["attn.q"]
[methods.params]
kind = "tokenize"
)");
  Session s(c, test::registry());
  auto state = [&](std::size_t i) { return s.methods()[i].call("state", [](Method& m) { return m.state(); }); };
  const auto* ext = host_extension<tessera_host_training_v1>(s.model(), TESSERA_EXT_HOST_TRAINING, 1);
  CATCH_REQUIRE(ext != nullptr);
  Tensor loss, logits;
  CATCH_CHECK_THROWS_WITH(ext->forward_again(ext->host, &loss, &logits), Catch::Contains("only inside extra_loss()"));
  const auto* ext2 = host_extension<tessera_host_training_v2>(s.model(), TESSERA_EXT_HOST_TRAINING, 2);
  CATCH_REQUIRE(ext2 != nullptr);
  CATCH_CHECK_THROWS_WITH(ext2->step_output(ext2->host, &loss, &logits), Catch::Contains("only inside extra_loss()"));
  CATCH_CHECK(train_error(s, c.output_dir).empty());
  // "late" was created in prepare(), "grown" at step 1 (of 0, 1, 2): both were updated.
  const auto life = state(0);
  CATCH_REQUIRE(life.count("late") == 1);
  CATCH_REQUIRE(life.count("grown") == 1);
  CATCH_CHECK(life.at("late").abs().item<double>() > 0);
  CATCH_CHECK(life.at("grown").abs().item<double>() > 0);
  // tessera.method.after_step (SDK 2.5): once after each update, the last included, each time
  // with "late" already moved by that step and its gradient still there.
  const Tensor after = life.at("after_steps");  // (steps, [step, late, has grad])
  CATCH_REQUIRE(after.sizes() == at::IntArrayRef({3, 3}));
  for (std::int64_t i = 0; i < 3; ++i) {
    CATCH_CHECK(after[i][0].item<double>() == static_cast<double>(i));
    CATCH_CHECK(after[i][2].item<double>() == 1.0);
  }
  CATCH_CHECK(after[0][1].item<double>() != 0.0);  // zero before the first update
  CATCH_CHECK(after[2][1].item<double>() == life.at("late").item<double>());
  const auto again = state(1);
  CATCH_CHECK(std::isfinite(again.at("again_loss").item<double>()));
  CATCH_CHECK(again.at("again_logits").sizes() == at::IntArrayRef({8, 2}));
  // tessera.host.training version 2: the step's own pass, its graph alive for the extra term,
  // another draw of dropout than the pass again.
  CATCH_CHECK(again.at("step_has_graph").item<double>() == 1.0);
  CATCH_CHECK(again.at("step_logits").sizes() == at::IntArrayRef({8, 2}));
  CATCH_CHECK(std::isfinite(again.at("step_loss").item<double>()));
  CATCH_CHECK_FALSE(at::equal(again.at("step_logits"), again.at("again_logits")));
  const auto ids = load_tokenizer(test::model_dir())->encode("a great movie", 0, false);
  CATCH_CHECK(std::vector<std::int64_t>(state(2).at("ids").data_ptr<std::int64_t>(), state(2).at("ids").data_ptr<std::int64_t>() + ids.size()) == ids);
  CATCH_CHECK(state(2).at("ids").numel() == static_cast<std::int64_t>(ids.size()));
}

CATCH_TEST_CASE("[data] tag_columns reach methods as each sample's tags (ModelView::sample_tags)", "[train][minilm]") {
  auto dir = test::temp_dir("train-tags");
  {
    std::ofstream csv(dir / "tagged.csv");
    csv << "text,label,task\n";
    for (int i = 0; i < 12; ++i) csv << "sentence number " << i << "," << i % 2 << "," << (i % 3 == 0 ? "b" : "a") << "\n";
  }
  Config c = config_in(dir, R"([model]
path = "${TESSERA_MODEL_DIR}"
[data]
path = "tagged.csv"
tag_columns = ["task"]
test_fraction = 0.25
[[methods]]
plugin = "probe"
targets = ["layers.0.attn.q"]
[methods.params]
kind = "context"
)");
  Session s(c, test::registry());
  std::vector<std::size_t> order(s.task().examples(Split::Train).size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  Batch b = s.task().batch(Split::Train, order, 0, order.size());
  std::vector<std::int64_t> expect;
  for (const auto& e : s.task().examples(Split::Train)) expect.push_back(e.sample_tags.at(0) == "b");
  CATCH_CHECK(b.tags.at("task").size() == order.size());
  at::NoGradGuard no_grad;
  s.task().loss(b);
  const Tensor seen = s.methods()[0].call("state", [](Method& m) { return m.state(); }).at("task_is_b");
  CATCH_CHECK(std::vector<std::int64_t>(seen.data_ptr<std::int64_t>(), seen.data_ptr<std::int64_t>() + seen.numel()) == expect);
  CATCH_CHECK(std::count(expect.begin(), expect.end(), 1) > 0);
}

CATCH_TEST_CASE("QLoRA: LoRA trains over a base stored as NF4, the stored base never changes, and a reload reproduces it", "[train][minilm][nf4]") {
  set_threads(0);
  Config c = small_config("train-qlora", true, 160, 6);
  c.model.quantize = "nf4";
  c.model.double_quant = true;
  std::vector<std::size_t> order(16);
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  Tensor logits_after;
  double accuracy = 0;
  {
    Session s(c, test::registry());
    LinearSite* q = nullptr;
    for (auto* l : s.model().linear_sites())
      if (l->name() == "layers.0.attn.q") q = l;
    CATCH_REQUIRE(q != nullptr);
    CATCH_CHECK(std::string(q->weight().storage()) == "nf4");
    const Tensor before = ParameterSiteImpl::of(q->weight()).base_value();
    accuracy = train(s, c.output_dir).test.accuracy;
    CATCH_CHECK(at::equal(ParameterSiteImpl::of(q->weight()).base_value(), before));
    for (auto& [name, t] : s.methods()[0].call("trainable", [](Method& x) { return x.trainable(); }))
      if (name.find("lora_B") != std::string::npos) CATCH_CHECK(t.abs().max().item<double>() > 0);  // it trained
    at::NoGradGuard ng;
    logits_after = s.task().forward(s.task().batch(Split::Test, order, 0, order.size())).logits;
  }
  Session reloaded(c, test::registry());
  reloaded.load_adapter(c.output_dir + "/adapter");
  CATCH_CHECK(evaluate(reloaded, Split::Test).accuracy == accuracy);
  at::NoGradGuard ng;
  CATCH_CHECK(at::equal(reloaded.task().forward(reloaded.task().batch(Split::Test, order, 0, order.size())).logits, logits_after));
}

CATCH_TEST_CASE("a method asks for NF4 storage of the weights it targets (tessera.method.storage), before it attaches", "[train][minilm][nf4]") {
  auto dir = test::temp_dir("train-storage-request");
  Config c = config_in(dir, polarity(32, 40) + R"([[methods]]
plugin = "probe"
targets = ["attn.q", "mlp.down"]
[methods.params]
kind = "nf4_storage"
)");
  Session s(c, test::registry());
  std::size_t nf4 = 0, dense = 0;
  for (auto* l : s.model().linear_sites()) {
    const bool asked = l->name().find("attn.q") != std::string::npos || l->name().find("mlp.down") != std::string::npos;
    CATCH_INFO(l->name());
    CATCH_CHECK(std::string(l->weight().storage()) == (asked ? "nf4" : "dense"));
    (asked ? nf4 : dense) += 1;
  }
  CATCH_CHECK(nf4 == 12);
  CATCH_CHECK(dense > 0);
  // The method saw its weights stored so when it attached.
  CATCH_CHECK(s.methods()[0].call("state", [](Method& m) { return m.state(); }).at("nf4_sites").item<std::int64_t>() == 12);
}

CATCH_TEST_CASE("a prompt that leaves the longest example no position is refused before training, naming the example", "[train][minilm][prompts]") {
  set_threads(0);
  auto dir = test::temp_dir("train-long-prompt");
  // MiniLM has 512 positions: 481 virtual tokens leave 31, one fewer than the examples cut
  // at max_length 32 take; shorter ones fit (padding to each batch's longest), so only the
  // longest example finds it.
  Config c = config_in(dir, polarity(32, 40) + R"(padding = "longest"
[train]
epochs = 1
batch_size = 8
[[methods]]
plugin = "prompt_tuning"
[methods.params]
num_virtual_tokens = 481
)");
  Session s(c, test::registry());
  const std::string message = train_error(s, c.output_dir);
  CATCH_CHECK_THAT(message, Catch::Matchers::StartsWith("before training: the longest training example (#"));
  CATCH_CHECK_THAT(message, Catch::Matchers::Contains(", 32 tokens) does not run"));
  CATCH_CHECK_THAT(message, Catch::Matchers::Contains("sequence of 513 tokens exceeds the 512 positions of the model"));
  const auto metrics = c.output_dir + "/metrics.jsonl";
  CATCH_CHECK((!std::filesystem::exists(metrics) || std::filesystem::file_size(metrics) == 0));  // no step ran
}

CATCH_TEST_CASE("diff pruning in a real run projects at its step and trains the kept entries on (the optimizer follows)", "[train][minilm]") {
  set_threads(0);
  const auto dir = test::temp_dir("train-diff");
  Config c = config_in(dir, polarity(32, 64) + R"([train]
epochs = 1
batch_size = 16
lr = 1e-2
max_steps = 4
[[methods]]
plugin = "diff_pruning"
name = "diff"
targets = ["mlp.down.weight"]
[methods.params]
target_ratio = 0.01
prune_at = 0.5
)");
  Session s(c, test::registry());
  TrainResult r = train(s, c.output_dir);
  CATCH_CHECK(r.steps == 4);
  // Projected at step 2 of 4: what trains is 1% of the six down-projections' entries, and the
  // last two steps reached it (gradients on the values; the optimizer's refresh on a changed
  // trainable set is the host's, tested with the probe plugin's "life" tensors).
  std::int64_t kept = 0;
  for (const auto& t : s.methods().trainable()) {
    kept += t.numel();
    CATCH_CHECK(t.grad().defined());
  }
  CATCH_CHECK(kept == static_cast<std::int64_t>(std::ceil(0.01 * 6 * 384 * 1536)));
  const auto saved = test::read_tensors(c.output_dir + "/adapter/diff/adapter_model.safetensors");
  CATCH_CHECK(saved.count("encoder.layer.0.output.dense.weight.diff_indices") == 1);
  CATCH_CHECK(saved.count("encoder.layer.0.output.dense.weight.diff_w") == 0);
}

namespace {

// A copy of a model folder (links to its files) whose config.json turns every dropout off.
std::string without_dropout(const std::string& model, const std::filesystem::path& into) {
  std::filesystem::create_directories(into);
  for (const auto& e : std::filesystem::directory_iterator(model))
    if (e.path().filename() != "config.json") std::filesystem::create_symlink(e.path(), into / e.path().filename());
  nlohmann::json c = nlohmann::json::parse(std::ifstream(std::filesystem::path(model) / "config.json"));
  for (auto& [k, v] : c.items())
    if (k.find("drop") != std::string::npos && v.is_number_float()) v = 0.0;
  std::ofstream(into / "config.json") << c.dump();
  return into.string();
}

std::vector<double> step_losses(const std::string& run_dir) {
  std::vector<double> out;
  std::ifstream in(std::filesystem::path(run_dir) / "metrics.jsonl");
  for (std::string line; std::getline(in, line);)
    if (const auto j = nlohmann::json::parse(line); j["event"] == "step") out.push_back(j["loss"].get<double>());
  return out;
}

}  // namespace

CATCH_TEST_CASE("micro_batches: a batch in pieces weighted by their labelled tokens takes the whole batch's steps", "[train][causal]") {
  set_threads(1);
  auto dir = test::temp_dir("micro");
  const std::string model = without_dropout(test::fixture("decoders/gpt2_text"), dir / "model");
  auto run = [&](std::int64_t pieces) {
    const auto here = dir / ("m" + std::to_string(pieces));
    std::filesystem::create_directories(here);
    Config c = config_in(here, "[model]\npath = \"" + model + R"("
[data]
path = "${TESSERA_DATA_DIR}/polarity.csv"
max_length = 32
limit = 60
[task]
kind = "causal-lm"
[train]
epochs = 1
batch_size = 10
lr = 1e-2
micro_batches = )" + std::to_string(pieces) + R"(
[[methods]]
plugin = "lora"
targets = ["c_attn", "mlp.up"]
[methods.params]
r = 4
init_lora_weights = "false"
)");
    auto s = std::make_unique<Session>(c, test::registry());
    train(*s, c.output_dir);
    return std::make_pair(std::move(s), step_losses(c.output_dir));
  };
  // 48 training examples in batches of 10: pieces of 4, 3 and 3 examples (the last batch's
  // 8 as 3, 3, 2), of unequal token counts.
  auto [one, one_losses] = run(1);
  auto [three, three_losses] = run(3);
  CATCH_REQUIRE(one_losses.size() == 5);
  CATCH_REQUIRE(three_losses.size() == one_losses.size());
  for (std::size_t i = 0; i < one_losses.size(); ++i) CATCH_CHECK(std::abs(three_losses[i] - one_losses[i]) < 1e-5);
  const auto a = one->methods().named_trainable(), b = three->methods().named_trainable();
  CATCH_REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    CATCH_INFO(a[i].first);
    const double scale = a[i].second.abs().max().item<double>();
    CATCH_CHECK((a[i].second - b[i].second).abs().max().item<double>() < 1e-4 * scale);
  }
  // The trained adapter moved: equal because both trained, not because neither did.
  CATCH_CHECK(std::abs(one_losses.back() - one_losses.front()) > 1e-3);
  set_threads(0);
}
