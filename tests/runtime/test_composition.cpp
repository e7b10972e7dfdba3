// Composition groups on a real model (the tiny RoBERTa) with real plugins: a routed batch
// gives each sample what its adapter alone gives, an average of an adapter with itself is
// that adapter, a gate's value acts as the instance's scale, switches and merges by name.
// The references are the same adapters attached alone, in their own model.
#include "support.h"

#include "plugins/adapterhub_parity.h"

#include "runtime/config.h"
#include "runtime/method_stack.h"
#include "architectures/decoder.h"
#include "architectures/t5.h"

#include <fstream>

using namespace tessera;

namespace {

struct Run {
  Config config;
  std::unique_ptr<BertModel> model;
  std::unique_ptr<MethodStack> stack;
};

// methods: [[methods]] tables; groups: [[groups]] tables.
Run build(const std::string& methods, const std::string& groups = "") {
  const auto dir = test::temp_dir("composition");
  const auto path = (dir / "run.toml").string();
  std::ofstream(path) << "[model]\npath = \"" << test::fixture("tiny_roberta") << "\"\n[data]\npath = \"/d.csv\"\ntag_columns = [\"adapter\"]\n"
                      << methods << groups;
  Run r{load_config(path), BertModel::load(test::fixture("tiny_roberta"), test::options()), nullptr};
  check_methods(r.config, test::registry());
  r.stack = std::make_unique<MethodStack>(test::registry(), r.config.methods, *r.model, r.config.model, r.config.groups);
  return r;
}

const char* kLoras = "[[methods]]\nplugin = \"lora\"\nname = \"a\"\ntargets = [\"attn.q\", \"attn.v\", \"mlp.up\"]\n[methods.params]\nr = 4\n"
                     "[[methods]]\nplugin = \"lora\"\nname = \"b\"\ntargets = [\"attn.q\", \"attn.v\", \"mlp.up\"]\n[methods.params]\nr = 4\n";
const char* kAdapters = "[[methods]]\nplugin = \"bottleneck\"\nname = \"a\"\n[methods.params]\nconfig = \"seq_bn\"\nreduction_factor = 4.0\n"
                        "[[methods]]\nplugin = \"bottleneck\"\nname = \"b\"\n[methods.params]\nconfig = \"seq_bn\"\nreduction_factor = 4.0\n";

std::size_t index_of(MethodStack& s, const std::string& name) {
  for (std::size_t i = 0; i < s.size(); ++i)
    if (s.config(i).name == name) return i;
  throw std::logic_error("no instance " + name);
}

NamedTensors state_of(MethodStack& s, const std::string& name) {
  return s[index_of(s, name)].call("state", [](Method& m) { return m.state(); });
}

// Every trainable tensor of instance `name` drawn anew (a fresh LoRA or adapter changes nothing).
void randomize(MethodStack& s, const std::string& name, std::uint64_t seed) {
  at::NoGradGuard no_grad;
  at::manual_seed(seed);
  for (auto& [_, t] : s[index_of(s, name)].call("trainable", [](Method& m) { return m.trainable(); })) t.normal_(0, 0.3);
}

void copy_state(MethodStack& from, const std::string& name, MethodStack& to, const std::string& as) {
  to[index_of(to, as)].call("load_state", [&](Method& m) { m.load_state(state_of(from, name)); });
}

struct Batch {
  Tensor ids, mask;
};
Batch batch() {  // 4 samples, two of them padded
  at::manual_seed(11);
  Batch b{at::randint(5, 90, {4, 7}, at::TensorOptions().dtype(at::kLong)).to(test::device()), at::ones({4, 7}, at::kLong)};
  b.mask.index_put_({1, at::indexing::Slice(4)}, 0);
  b.mask.index_put_({3, at::indexing::Slice(2)}, 0);
  b.mask = b.mask.to(test::device());
  return b;
}

Tensor hidden(Run& r, const Batch& b, const std::vector<std::string>& tags = {}) {
  at::NoGradGuard no_grad;
  r.model->set_sample_tags(tags.empty() ? std::map<std::string, std::vector<std::string>>{} : std::map<std::string, std::vector<std::string>>{{"adapter", tags}});
  return r.model->forward(b.ids, b.mask).hidden;  // (B, T, H)
}

const char* kRoute = "[[groups]]\nname = \"serve\"\nkind = \"route\"\nmembers = [\"a\", \"b\"]\ntag = \"adapter\"\n";

}  // namespace

CATCH_TEST_CASE("a route group serves a mixed batch in one forward: each sample gets what its adapter alone gives, padding dropped", "[runtime][composition]") {
  const Batch b = batch();
  // Weight deltas (LoRA), and sequential modules chained at one site (bottleneck adapters:
  // b reads what a left, which for b's samples is the sublayer's own output).
  for (const char* members : {kLoras, kAdapters}) {
    CATCH_INFO(members);
    Run routed = build(members, kRoute);
    randomize(*routed.stack, "a", 1);
    randomize(*routed.stack, "b", 2);
    CATCH_CHECK(routed.model->token_wise_only());  // a sample mask needs no padding: the unpadded rows are gathered per sample
    const Tensor mixed = hidden(routed, b, {"a", "b", "b", "a"});
    const std::string text = members;
    for (const std::string name : {"a", "b"}) {
      const auto pos = text.find("name = \"" + name + "\"");
      const auto from = text.rfind("[[methods]]", pos), to = text.find("[[methods]]", pos);
      Run alone = build(text.substr(from, to == std::string::npos ? std::string::npos : to - from));
      copy_state(*routed.stack, name, *alone.stack, name);
      const Tensor own = hidden(alone, b);
      for (std::int64_t s = 0; s < 4; ++s) {
        const bool mine = (name == "a") == (s == 0 || s == 3);
        const Tensor m = b.mask[s].to(at::kBool);
        const double d = test::max_abs_diff(mixed[s].index({m}), own[s].index({m}));
        CATCH_INFO(name << " sample " << s << " differs by " << d);
        CATCH_CHECK((mine ? d < 1e-5 : d > 1e-3));
      }
    }
  }
  Run routed = build(kLoras, kRoute);
  // A tag that names no member, and a batch without the column, are refused by name.
  CATCH_CHECK_THROWS_WITH(hidden(routed, b, {"a", "c", "b", "a"}), Catch::Contains("sample 1's adapter is 'c', which names none of its members (a, b)"));
  CATCH_CHECK_THROWS_WITH(hidden(routed, b), Catch::Contains("route group 'serve' reads tag column 'adapter', which this batch does not carry"));
  // Merging a routed member would give every sample its change: refused.
  CATCH_CHECK_THROWS_WITH(routed.stack->merge(), Catch::Contains("method 'a' is in group 'serve'"));
}

CATCH_TEST_CASE("average and parallel groups: an adapter averaged with itself is that adapter, in parallel twice its change, weights are the members' scales", "[runtime][composition]") {
  const Batch b = batch();
  Run alone = build(std::string(kAdapters).substr(0, std::string(kAdapters).find("[[methods]]", 5)));
  randomize(*alone.stack, "a", 3);
  const Tensor base_out = [&] {
    Run none = build("");
    return hidden(none, b);
  }();
  const Tensor one = hidden(alone, b);
  for (const std::string kind : {"average", "parallel", "stack"}) {
    Run two = build(kAdapters, "[[groups]]\nname = \"g\"\nkind = \"" + kind + "\"\nmembers = [\"a\", \"b\"]\n");
    copy_state(*alone.stack, "a", *two.stack, "a");
    copy_state(*alone.stack, "a", *two.stack, "b");
    const Tensor out = hidden(two, b);
    CATCH_INFO(kind);
    if (kind == "average") {
      CATCH_CHECK(test::max_abs_diff_tokens(out, one, b.mask) < 1e-5);
    } else if (kind == "parallel") {  // h + 2(a(h) − h): the adapter alone at scale 2
      alone.stack->rescale("a", 2.0);
      CATCH_CHECK(test::max_abs_diff_tokens(out, hidden(alone, b), b.mask) < 1e-5);
      alone.stack->rescale("a", 0.5);
    } else {  // a(a(h)): neither
      CATCH_CHECK(test::max_abs_diff_tokens(out, one, b.mask) > 1e-3);
    }
  }
  CATCH_CHECK(test::max_abs_diff_tokens(one, base_out, b.mask) > 1e-3);  // the adapter really acts

  // LoRA under weights 1 and 3: a quarter of a's change and three quarters of b's — as the
  // two attached without a group and scaled so.
  Run avg = build(kLoras, "[[groups]]\nname = \"g\"\nkind = \"average\"\nmembers = [\"a\", \"b\"]\nweights = [1, 3]\n");
  randomize(*avg.stack, "a", 4);
  randomize(*avg.stack, "b", 5);
  Run scaled = build(kLoras);
  copy_state(*avg.stack, "a", *scaled.stack, "a");
  copy_state(*avg.stack, "b", *scaled.stack, "b");
  scaled.stack->rescale("a", 0.25);
  scaled.stack->rescale("b", 0.75);
  CATCH_CHECK(test::max_abs_diff_tokens(hidden(avg, b), hidden(scaled, b), b.mask) < 1e-5);
  // A plugin folds its whole change: a weighed instance is not merged.
  CATCH_CHECK_THROWS_WITH(avg.stack->merge(), Catch::Contains("method 'a' is weighed 0.25") && Catch::Contains("not merged"));
  // --disable by group name leaves the base model; --scale by group name scales every member.
  avg.stack->disable("g");
  CATCH_CHECK(test::max_abs_diff_tokens(hidden(avg, b), base_out, b.mask) == 0);
  CATCH_CHECK_THROWS_WITH(avg.stack->disable("gg"), Catch::Contains("no method instance or group is named 'gg' (the run has: a, b, g)"));
}

CATCH_TEST_CASE("nested groups at run time: an average over a parallel group weighs its members, a route to a gated group serves its samples the gated pair", "[runtime][composition]") {
  const Batch b = batch();
  const std::string three = std::string(kLoras) + "[[methods]]\nplugin = \"lora\"\nname = \"c\"\ntargets = [\"attn.q\", \"mlp.up\"]\n[methods.params]\nr = 4\n";
  const std::string ab = std::string(kLoras);
  auto copy_all = [](Run& from, Run& to, const std::vector<std::string>& names) {
    for (const auto& n : names) copy_state(*from.stack, n, *to.stack, n);
  };
  // average(parallel(a, b), c) with weights 1 and 3: a and b each at a quarter, c at three quarters.
  Run nested = build(three, "[[groups]]\nname = \"pair\"\nkind = \"parallel\"\nmembers = [\"a\", \"b\"]\n"
                            "[[groups]]\nname = \"outer\"\nkind = \"average\"\nmembers = [\"pair\", \"c\"]\nweights = [1, 3]\n");
  for (const auto& [n, seed] : std::vector<std::pair<std::string, int>>{{"a", 21}, {"b", 22}, {"c", 23}}) randomize(*nested.stack, n, seed);
  Run flat = build(three);
  copy_all(nested, flat, {"a", "b", "c"});
  flat.stack->rescale("a", 0.25);
  flat.stack->rescale("b", 0.25);
  flat.stack->rescale("c", 0.75);
  CATCH_CHECK(test::max_abs_diff_tokens(hidden(nested, b), hidden(flat, b), b.mask) < 1e-5);
  // route(gated(a, b), c): samples tagged "pair" get a and b weighed by their gates (σ = 1
  // here: the two in full), samples tagged "c" get c alone — in one forward.
  Run routed = build(three, "[[groups]]\nname = \"pair\"\nkind = \"gated\"\nmembers = [\"a\", \"b\"]\n"
                            "[[groups]]\nname = \"serve\"\nkind = \"route\"\nmembers = [\"pair\", \"c\"]\ntag = \"adapter\"\n");
  copy_all(nested, routed, {"a", "b", "c"});
  {
    at::NoGradGuard no_grad;
    for (auto& [name, t] : routed.stack->group_state()) Tensor(t).fill_(name.compare(name.size() - 5, 5, ".bias") == 0 ? 30.0 : 0.0);
  }
  CATCH_CHECK(routed.model->token_wise_only());
  const Tensor mixed = hidden(routed, b, {"pair", "c", "c", "pair"});
  Run pair = build(ab);
  copy_all(nested, pair, {"a", "b"});
  Run c_alone = build(three.substr(three.rfind("[[methods]]")));
  copy_all(nested, c_alone, {"c"});
  const Tensor want_pair = hidden(pair, b), want_c = hidden(c_alone, b);
  for (std::int64_t i = 0; i < 4; ++i) {
    const Tensor m = b.mask[i].to(at::kBool);
    const Tensor& want = (i == 0 || i == 3) ? want_pair : want_c;
    CATCH_INFO("sample " << i);
    CATCH_CHECK(test::max_abs_diff(mixed[i].index({m}), want[i].index({m})) < 1e-5);
    CATCH_CHECK(test::max_abs_diff(mixed[i].index({m}), ((i == 0 || i == 3) ? want_c : want_pair)[i].index({m})) > 1e-3);
  }
}

CATCH_TEST_CASE("a gated group: the gate σ(x W_g + b_g), averaged over each sample's real tokens, acts as the member's scale per sample, it trains and is saved", "[runtime][composition]") {
  const Batch b = batch();
  const std::string lora_a = std::string(kLoras).substr(0, std::string(kLoras).find("[[methods]]", 5));
  Run gated = build(lora_a, "[[groups]]\nname = \"g\"\nkind = \"gated\"\nmembers = [\"a\"]\n");
  randomize(*gated.stack, "a", 6);
  CATCH_CHECK(gated.model->token_wise_only());  // the gates' means read the real tokens' rows: padding stays dropped
  const NamedTensors gates = gated.stack->group_state();
  CATCH_REQUIRE(gates.count("g.a.layers.0.attn.q.weight"));
  CATCH_CHECK(gates.at("g.a.layers.0.mlp.up.weight").sizes() == std::vector<std::int64_t>{1, gated.model->info().hidden_size});
  auto set_gates = [&](double w, double bias) {
    at::NoGradGuard no_grad;
    for (auto& [name, t] : gated.stack->group_state()) {
      Tensor x = t;
      x.fill_(name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0 ? bias : w);
    }
  };
  Run alone = build(lora_a);
  copy_state(*gated.stack, "a", *alone.stack, "a");
  const Tensor full = hidden(alone, b);
  set_gates(0, 30);  // σ = 1: the adapter alone
  CATCH_CHECK(test::max_abs_diff_tokens(hidden(gated, b), full, b.mask) < 1e-5);
  set_gates(0, std::log(0.3 / 0.7));  // σ = 0.3 everywhere: the adapter at scale 0.3
  alone.stack->rescale("a", 0.3);
  CATCH_CHECK(test::max_abs_diff_tokens(hidden(gated, b), hidden(alone, b), b.mask) < 1e-5);
  // Gates that read the input differ by sample, and gradients reach them.
  {
    at::NoGradGuard no_grad;
    at::manual_seed(8);
    for (auto& [_, t] : gated.stack->group_state()) t.normal_(0, 0.5);
  }
  // Pads do not count in a gate's mean: each sample run alone, unpadded, gets what it gets
  // in the padded batch (AdapterHub's mean counts every position, so there it would not).
  const Tensor together = hidden(gated, b);
  for (std::int64_t i = 0; i < b.ids.size(0); ++i) {
    const std::int64_t n = b.mask[i].sum().item<std::int64_t>();
    const Batch one{b.ids.narrow(0, i, 1).narrow(1, 0, n), b.mask.narrow(0, i, 1).narrow(1, 0, n)};
    CATCH_CHECK(at::allclose(hidden(gated, one), together.narrow(0, i, 1).narrow(1, 0, n), 1e-5, 1e-5));
  }
  gated.model->set_sample_tags({});
  gated.model->forward(b.ids, b.mask).hidden.pow(2).sum().backward();
  for (auto& [name, t] : gated.stack->group_state()) {
    CATCH_INFO(name);
    CATCH_CHECK((t.grad().defined() && t.grad().abs().sum().item<double>() > 0));
  }
  // Saved and read back into a fresh model: the same outputs.
  const auto dir = test::temp_dir("gates");
  save_safetensors((dir / "groups.safetensors").string(), gated.stack->group_state());
  Run again = build(lora_a, "[[groups]]\nname = \"g\"\nkind = \"gated\"\nmembers = [\"a\"]\n");
  copy_state(*gated.stack, "a", *again.stack, "a");
  again.stack->load_group_state((dir / "groups.safetensors").string());
  CATCH_CHECK(test::max_abs_diff_tokens(hidden(again, b), hidden(gated, b), b.mask) == 0);
  CATCH_CHECK_THROWS_WITH(gated.stack->merge(), Catch::Contains("method 'a' is in group 'g', whose weight differs by sample"));
}

CATCH_TEST_CASE("what a group cannot weigh or add is refused once attached, at the member's place in the config", "[runtime][composition]") {
  const std::string prompt = "[[methods]]\nplugin = \"prompt_tuning\"\nname = \"p\"\n[methods.params]\nnum_virtual_tokens = 2\n";
  const std::string lora = std::string(kLoras).substr(0, std::string(kLoras).find("[[methods]]", 5));
  CATCH_CHECK_THROWS_WITH(build(lora + prompt, "[[groups]]\nname = \"g\"\nkind = \"gated\"\nmembers = [\"a\", \"p\"]\n"),
                          Catch::Contains("run.toml:") && Catch::Contains("group 'g' (gated): instance 'p' installs a prompt at site 'embed', which cannot be weighed per sample or per token"));
  // Nested: the member named is the group under the one that refuses, where it is listed.
  CATCH_CHECK_THROWS_WITH(build(lora + prompt, "[[groups]]\nname = \"inner\"\nkind = \"parallel\"\nmembers = [\"a\", \"p\"]\n"
                                               "[[groups]]\nname = \"outer\"\nkind = \"gated\"\nmembers = [\"inner\"]\n"),
                          Catch::Contains("group 'outer' (gated): instance 'p' installs a prompt"));
  // Two side networks in one parallel group would both replace the backbone's output.
  const std::string lst = "[[methods]]\nplugin = \"lst\"\nname = \"s1\"\n[[methods]]\nplugin = \"lst\"\nname = \"s2\"\n";
  CATCH_CHECK_THROWS_WITH(build(lst, "[[groups]]\nname = \"g\"\nkind = \"parallel\"\nmembers = [\"s1\", \"s2\"]\n"),
                          Catch::Contains("group 'g' (parallel) adds its members' changes, but 's1' and 's2' both replace the hidden states at site 'output'"));
  CATCH_CHECK_NOTHROW(build(lst, "[[groups]]\nname = \"g\"\nkind = \"average\"\nmembers = [\"s1\", \"s2\"]\n"));  // their mean is one
  // Two invertible adapters would both replace the first layer's input (SDK 2.7).
  const std::string inv = "[[methods]]\nplugin = \"bottleneck\"\nname = \"i1\"\n[methods.params]\nconfig = \"seq_bn_inv\"\n"
                          "[[methods]]\nplugin = \"bottleneck\"\nname = \"i2\"\n[methods.params]\nconfig = \"seq_bn_inv\"\n";
  CATCH_CHECK_THROWS_WITH(build(inv, "[[groups]]\nname = \"g\"\nkind = \"gated\"\nmembers = [\"i1\", \"i2\"]\n"),
                          Catch::Contains("'i1' and 'i2' both replace the hidden states at site 'embed' (an embedding transform)"));
}

CATCH_TEST_CASE("a method's load key starts it from a saved adapter folder, a bad folder is refused at the key", "[runtime][composition]") {
  const Batch b = batch();
  const std::string lora_a = std::string(kLoras).substr(0, std::string(kLoras).find("[[methods]]", 5));
  Run first = build(lora_a);
  randomize(*first.stack, "a", 9);
  const auto dir = test::temp_dir("load-key");
  save_safetensors((dir / "adapter_model.safetensors").string(), state_of(*first.stack, "a"));
  Run loaded = build(lora_a.substr(0, lora_a.find("[methods.params]")) + "load = \"" + dir.string() + "\"\n[methods.params]\nr = 4\n");
  CATCH_CHECK(test::max_abs_diff_tokens(hidden(loaded, b), hidden(first, b), b.mask) == 0);
  const auto empty = test::temp_dir("load-key-empty");
  CATCH_CHECK_THROWS_WITH(build(lora_a.substr(0, lora_a.find("[methods.params]")) + "load = \"" + empty.string() + "\"\n[methods.params]\nr = 4\n"),
                          Catch::Contains("run.toml:10:8: method 'a': load = ") && Catch::Contains("adapter_model.safetensors"));
}

CATCH_TEST_CASE("a gated prefix is weighed from the layer's input inside the model, a routed one is refused before the first forward", "[runtime][composition]") {
  const Batch b = batch();
  const std::string prefix = "[[methods]]\nplugin = \"prefix_tuning\"\nname = \"a\"\n[methods.params]\nnum_virtual_tokens = 3\n";
  Run alone = build(prefix);
  randomize(*alone.stack, "a", 12);
  const Tensor own = hidden(alone, b);
  Run gated = build(prefix, "[[groups]]\nname = \"g\"\nkind = \"gated\"\nmembers = [\"a\"]\n");
  copy_state(*alone.stack, "a", *gated.stack, "a");
  const NamedTensors gates = gated.stack->group_state();
  CATCH_REQUIRE(gates.count("g.a.layers.0.attn.bias"));
  auto set_bias = [&](double v) {
    at::NoGradGuard no_grad;
    for (auto& [name, t] : gated.stack->group_state()) {
      Tensor x = t;
      x.fill_(name.compare(name.size() - 5, 5, ".bias") == 0 ? v : 0.0);
    }
  };
  set_bias(30);  // σ = 1: the prefix as it is
  CATCH_CHECK(test::max_abs_diff_tokens(hidden(gated, b), own, b.mask) < 1e-5);
  set_bias(-3);  // keys and values scaled by σ(−3): another output, so the architecture did weigh them
  CATCH_CHECK(test::max_abs_diff_tokens(hidden(gated, b), own, b.mask) > 1e-3);
  // Routed, it is refused once attached, before any forward pass, where the config lists it.
  CATCH_CHECK_THROWS_WITH(build(prefix + "[[methods]]\nplugin = \"prefix_tuning\"\nname = \"b\"\n[methods.params]\nnum_virtual_tokens = 3\n", kRoute),
                          Catch::Contains("run.toml:19:12:") && Catch::Contains("group 'serve' (route): instance 'a' installs a prefix at site 'layers.0.attn', which cannot be routed by sample"));
}

CATCH_TEST_CASE("a gated prefix in GPT-2 and in T5's decoder: a gate of σ(b) is the prefix's keys and values scaled by σ(b)", "[runtime][composition][decoder][t5]") {
  for (const std::string family : {"gpt2", "t5"}) {
    CATCH_INFO(family);
    const bool t5 = family == "t5";
    const std::string dir = t5 ? test::fixture("seq2seq/t5") : test::fixture("decoders/gpt2");
    const auto cfg_dir = test::temp_dir("composition-" + family);
    auto load = [&](const std::string& groups) {
      const auto path = (cfg_dir / ("run" + std::to_string(groups.size()) + ".toml")).string();
      std::ofstream(path) << "[model]\npath = \"" << dir << "\"\n[data]\npath = \"/d.csv\"\n"
                          << "[[methods]]\nplugin = \"prefix_tuning\"\nname = \"a\"\n[methods.params]\nnum_virtual_tokens = 3\n" << groups;
      Config c = load_config(path);
      check_methods(c, test::registry());
      return c;
    };
    std::unique_ptr<SiteModel> model;
    if (t5) model = T5Model::load(dir, test::options());
    else model = DecoderModel::load(dir, test::options());
    auto& ref = test::cached_tensors(t5 ? test::fixture("seq2seq/reference.safetensors") : test::fixture("decoders/reference.safetensors"));
    auto out = [&] {
      at::NoGradGuard no_grad;
      if (t5) {
        auto& m = static_cast<T5Model&>(*model);
        return m.logits(m.decode(ref["t5.decoder_input_ids"], m.encode(ref["input_ids"], ref["attention_mask"])));
      }
      auto& d = static_cast<DecoderModel&>(*model);
      return d.logits(d.forward(ref["input_ids"], ref["attention_mask"]));
    };
    at::manual_seed(13);
    Tensor z;
    {
      Config c = load({});
      MethodStack alone(test::registry(), c.methods, *model, c.model, c.groups);
      z = at::randn_like(alone[0].call("state", [](Method& m) { return m.state(); }).at("prompt_embeddings"));
      alone[0].call("load_state", [&](Method& m) { m.load_state({{"prompt_embeddings", z * (1.0 / (1.0 + std::exp(3.0)))}}); });  // Z · σ(−3)
      const Tensor scaled = out();
      alone[0].detach(*model);
      Config g = load("[[groups]]\nname = \"g\"\nkind = \"gated\"\nmembers = [\"a\"]\n");
      MethodStack gated(test::registry(), g.methods, *model, g.model, g.groups);
      gated[0].call("load_state", [&](Method& m) { m.load_state({{"prompt_embeddings", z}}); });
      {
        at::NoGradGuard no_grad;
        for (auto& [name, t] : gated.group_state()) {
          Tensor x = t;
          x.fill_(name.compare(name.size() - 5, 5, ".bias") == 0 ? -3.0 : 0.0);
        }
      }
      // Over real tokens (T5's decoder inputs are all real; GPT-2's batch is padded).
      auto differ = [&](const Tensor& a, const Tensor& b) { return t5 ? (a - b).abs().max().item<double>() : test::max_abs_diff_tokens(a, b, ref["attention_mask"]); };
      CATCH_CHECK(differ(out(), scaled) < 1e-5 * std::max(1.0, scaled.abs().max().item<double>()));
      gated[0].call("load_state", [&](Method& m) { m.load_state({{"prompt_embeddings", z * 0.5}}); });
      CATCH_CHECK(differ(out(), scaled) > 1e-4);  // the check can fail: another prefix differs
    }
  }
}

// AdapterHub's prefix leaves the tokens' positions at 0..; transformers (and so peft's prefix
// tuning, and Tessera's default) numbers them after the prefix's 30. The configs say
// shift_positions = false (SDK 2.8's positionless prefix), so the reference is AdapterHub's MAM
// as it runs; the prefix alone, numbered after the prefix, would differ (checked below).
CATCH_TEST_CASE("configs/hybrid/mam.toml is AdapterHub's MAMConfig: the same prefix and parallel adapter give its outputs on MiniLM, positions as AdapterHub numbers them", "[runtime][composition][minilm][parity]") {
  Config c = load_config(std::string(TESSERA_SOURCE_DIR) + "/configs/hybrid/mam.toml");
  check_methods(c, test::registry());
  auto model = test::load_minilm();
  MethodStack stack(test::registry(), c.methods, *model, c.model, c.groups);
  // tests/fixtures/make_adapters.py: AdapterHub's prefix as peft's file holds it ("prefix.":
  // the MLP's output rows), its parallel adapter under AdapterHub's names ("adapter.").
  NamedTensors prefix, adapter;
  for (const auto& [k, t] : test::read_tensors(test::adapters_fixture("minilm_mam/tensors.safetensors")))
    (k.rfind("prefix.", 0) == 0 ? prefix[k.substr(7)] : adapter[k.substr(8)]) = t;
  stack[index_of(stack, "prefix")].call("load_state", [&](Method& m) { m.load_state(prefix); });
  stack[index_of(stack, "adapter")].call("load_state", [&](Method& m) { m.load_state(adapter); });
  auto& base = test::cached_tensors(test::fixture("reference.safetensors"));
  at::NoGradGuard no_grad;
  TESSERA_CHECK_PARITY(test::parity(model->forward(base["input_ids"], base["attention_mask"]).hidden, test::adapters_reference(), "minilm_mam", base["attention_mask"]));
  // The prefix alone (the adapter's up-projection 0), which tells the two parts apart.
  for (auto& [k, t] : adapter)
    if (k.find(".adapter_up.") != std::string::npos) t = at::zeros_like(t);
  stack[index_of(stack, "adapter")].call("load_state", [&](Method& m) { m.load_state(adapter); });
  TESSERA_CHECK_PARITY(test::parity(model->forward(base["input_ids"], base["attention_mask"]).hidden, test::adapters_reference(), "minilm_mam_prefix_only",
                                    base["attention_mask"]));
  // peft's numbering (after the prefix) is another model: the check tells them apart.
  for (auto& m : c.methods)
    if (m.plugin == "prefix_tuning") m.params["shift_positions"] = true;
  check_methods(c, test::registry());
  auto shifted_model = test::load_minilm();
  MethodStack shifted(test::registry(), c.methods, *shifted_model, c.model, c.groups);
  shifted[index_of(shifted, "prefix")].call("load_state", [&](Method& m) { m.load_state(prefix); });
  shifted[index_of(shifted, "adapter")].call("load_state", [&](Method& m) { m.load_state(adapter); });
  CATCH_CHECK(test::max_abs_diff_tokens(shifted_model->forward(base["input_ids"], base["attention_mask"]).hidden,
                                        test::adapters_reference()["minilm_mam_prefix_only"], base["attention_mask"]) > 1e-2);
}

// AdapterHub's UniPELT tensors (tests/fixtures/make_adapters.py) loaded into the stack of
// configs/hybrid/unipelt.toml: prefix (unless prefix_rows is false) and LoRA as peft's files
// hold them, the adapter (its gate inside) under AdapterHub's names, the LoRA and prefix gates
// under the group's.
static void load_unipelt(MethodStack& stack, const std::string& file, bool prefix_rows = true) {
  std::map<std::string, NamedTensors> parts;
  for (const auto& [k, t] : test::read_tensors(test::adapters_fixture(file))) {
    const auto dot = k.find('.');
    parts[k.substr(0, dot)][k.substr(dot + 1)] = t;
  }
  for (const char* name : {"prefix", "lora", "adapter"})
    if (prefix_rows || std::string(name) != "prefix") stack[index_of(stack, name)].call("load_state", [&](Method& m) { m.load_state(parts.at(name)); });
  NamedTensors gates = stack.group_state();
  CATCH_REQUIRE(gates.size() == parts.at("gate").size());  // q, v and attention gates of every layer, weight and bias each
  at::NoGradGuard no_grad;
  for (auto& [k, t] : gates) Tensor(t).copy_(parts.at("gate").at(k));
}

CATCH_TEST_CASE("configs/hybrid/unipelt.toml is AdapterHub's UniPELTConfig: the same LoRA, prefix, adapter and gates give its outputs on MiniLM, each sample as alone, positions as AdapterHub's", "[runtime][composition][minilm][parity]") {
  Config c = load_config(std::string(TESSERA_SOURCE_DIR) + "/configs/hybrid/unipelt.toml");
  check_methods(c, test::registry());
  auto model = test::load_minilm();
  MethodStack stack(test::registry(), c.methods, *model, c.model, c.groups);
  CATCH_CHECK(model->token_wise_only());  // the gates average real tokens: the batch runs unpadded
  load_unipelt(stack, "minilm_unipelt/tensors.safetensors");
  auto& base = test::cached_tensors(test::fixture("reference.safetensors"));
  at::NoGradGuard no_grad;
  TESSERA_CHECK_PARITY(test::parity(model->forward(base["input_ids"], base["attention_mask"]).hidden, test::adapters_reference(), "minilm_unipelt", base["attention_mask"]));
}

// configs/hybrid/unipelt.toml on make_adapters.py's tiny grouped-query LLaMA.
struct LlamaUnipelt {
  Config config = [] {
    Config c = load_config(std::string(TESSERA_SOURCE_DIR) + "/configs/hybrid/unipelt.toml");
    check_methods(c, test::registry());
    return c;
  }();
  std::unique_ptr<DecoderModel> model = [] {
    auto m = DecoderModel::load(test::adapters_fixture("llama_gqa"), test::options());
    test::perturb_if_asked(*m);
    return m;
  }();
  std::unique_ptr<MethodStack> stack = std::make_unique<MethodStack>(test::registry(), config.methods, *model, config.model, config.groups);
};

static NamedTensors trainable_of(MethodStack& s, const std::string& name) {
  return s[index_of(s, name)].call("trainable", [](Method& m) { return m.trainable(); });
}

// The same on a decoder: a tiny LLaMA with grouped-query attention (its prefix one row per
// key/value head, as AdapterHub lays it out), causal attention over prefix + tokens; logits
// and the gradient of every trained tensor (the prefix's on its rows Z) against AdapterHub's.
CATCH_TEST_CASE("UniPELT on a LLaMA with grouped query attention: configs/hybrid/unipelt.toml gives AdapterHub's logits and gradients", "[runtime][composition][decoder][parity]") {
  LlamaUnipelt u;
  auto& model = u.model;
  auto& stack = *u.stack;
  load_unipelt(stack, "llama_unipelt/tensors.safetensors");
  auto& ref = test::adapters_reference();
  auto& base = test::cached_tensors(test::fixture("decoders/reference.safetensors"));
  const Tensor& mask = base["attention_mask"];
  const Tensor logits = model->logits(model->forward(base["input_ids"], mask));
  TESSERA_CHECK_PARITY(test::parity(logits.detach(), ref, "llama_unipelt", mask));
  (logits * ref["llama_unipelt.grad.direction"] * mask.unsqueeze(-1)).sum().backward();
  std::size_t compared = 0;
  auto check = [&](const std::string& key, const Tensor& t) {
    CATCH_INFO(key);
    const auto it = ref.find("llama_unipelt.grad." + key);
    CATCH_REQUIRE(it != ref.end());
    CATCH_REQUIRE(t.grad().defined());
    const Tensor theirs = it->second.to(at::kDouble);
    CATCH_REQUIRE(t.grad().sizes() == theirs.sizes());
    CATCH_CHECK((t.grad().to(at::kCPU, at::kDouble) - theirs).abs().max().item<double>() <= 2e-3 * theirs.abs().max().item<double>());
    ++compared;
  };
  // The loaded prefix trains its rows Z (its state() is a detached copy of them).
  check("prefix.prompt_embeddings", trainable_of(stack, "prefix").at("prompt_encoder.embedding.weight"));
  for (const auto& [k, t] : state_of(stack, "lora")) check("lora." + k, t);
  for (const auto& [k, t] : state_of(stack, "adapter")) {  // AdapterHub's names carry the adapter's: "a" there
    const std::string ours = ".adapters.adapter.";
    std::string theirs = k;
    check("adapter." + theirs.replace(theirs.find(ours), ours.size(), ".adapters.a."), t);
  }
  for (const auto& [k, t] : stack.group_state()) check("gate." + k, t);
  std::size_t theirs = 0;
  for (const auto& [k, _] : ref) theirs += k.rfind("llama_unipelt.grad.", 0) == 0 && k != "llama_unipelt.grad.direction";
  CATCH_CHECK(compared == theirs);
}

// AdapterHub's prefix MLP itself, its input table as wide as the hidden size (64 here, the
// key/value heads' 32): the config's projection (embedding_width = "hidden") takes its tensors
// as they are and gives its logits.
CATCH_TEST_CASE("UniPELT's prefix MLP on a grouped query LLaMA: configs/hybrid/unipelt.toml takes AdapterHub's tensors as they are and gives its logits", "[runtime][composition][decoder][parity]") {
  LlamaUnipelt u;
  auto& model = u.model;
  auto& stack = *u.stack;
  load_unipelt(stack, "llama_unipelt/tensors.safetensors", /*prefix_rows=*/false);
  auto ours = trainable_of(stack, "prefix");
  std::size_t copied = 0;
  {
    at::NoGradGuard no_grad;
    for (const auto& [k, t] : test::read_tensors(test::adapters_fixture("llama_unipelt/tensors.safetensors"))) {
      if (k.rfind("prefix_mlp.", 0) != 0) continue;
      CATCH_INFO(k);
      Tensor mine = ours.at(k.substr(11));
      CATCH_REQUIRE(mine.sizes() == t.sizes());  // E' (10, 64), W1 (512, 64), W2 (2·2·32, 512)
      mine.copy_(t), ++copied;
    }
  }
  CATCH_CHECK(copied == ours.size());
  auto& base = test::cached_tensors(test::fixture("decoders/reference.safetensors"));
  at::NoGradGuard no_grad;
  const Tensor& mask = base["attention_mask"];
  TESSERA_CHECK_PARITY(test::parity(model->logits(model->forward(base["input_ids"], mask)), test::adapters_reference(), "llama_unipelt", mask));
}
