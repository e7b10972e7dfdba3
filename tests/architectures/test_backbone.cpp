// load_backbone, the one place a model_type picks an architecture, and make_task, the one
// place a task kind is picked: the right kind for each, and a clear refusal otherwise.
#include "support.h"

#include "architectures/backbone.h"
#include "tasks/task.h"

#include <fstream>
#include <map>

using namespace tessera;

CATCH_TEST_CASE("load_backbone picks the architecture from model_type and refuses an unknown one by name", "[model][backbone]") {
  CATCH_CHECK(load_backbone(test::model_dir(), test::options())->kind() == BackboneKind::Encoder);
  CATCH_CHECK(load_backbone(test::fixture("decoders/gpt2"), test::options())->kind() == BackboneKind::Decoder);
  CATCH_CHECK(load_backbone(test::fixture("decoders/llama"), test::options())->kind() == BackboneKind::Decoder);
  CATCH_CHECK(load_backbone(test::fixture("seq2seq/t5_text"), test::options())->kind() == BackboneKind::EncoderDecoder);
  auto dir = test::temp_dir("backbone-unknown");
  std::ofstream(dir / "config.json") << R"({"model_type": "xlm-roberta"})";
  CATCH_CHECK_THROWS_WITH(load_backbone(dir.string(), test::options()),
                          Catch::Contains((dir / "config.json").string()) && Catch::Contains("model_type \"xlm-roberta\" is not supported (encoders: bert"));
  std::ofstream(dir / "config.json") << R"({"model_type": 7})";
  CATCH_CHECK_THROWS_WITH(load_backbone(dir.string(), test::options()), Catch::Contains((dir / "config.json").string()));
  // An encoder has no language-model head: asked anyway, it says so.
  auto bert = load_backbone(test::model_dir(), test::options());
  CATCH_CHECK_THROWS_WITH(bert->lm_head(), Catch::Contains("bert is an encoder: it has no language-model head"));
}

CATCH_TEST_CASE("make_task refuses a model of the wrong kind, naming the task, the model and both kinds", "[model][backbone]") {
  Config c;
  c.model.path = test::model_dir();
  c.data.path = "/nonexistent.csv";
  auto bert = load_backbone(test::model_dir(), test::options());
  auto tokenizer = load_tokenizer(test::model_dir());
  for (const char* kind : {"causal-lm", "seq2seq"}) {
    c.task.kind = kind;
    CATCH_CHECK_THROWS_WITH(make_task(c, *bert, *tokenizer),
                            Catch::Contains(std::string("[task] kind = \"") + kind + "\" needs") && Catch::Contains("(bert) is an encoder"));
  }
}

CATCH_TEST_CASE("linear sites of one input group read one tensor in every forward pass: q, k, v, and gate, up, and T5's cross k, v", "[model][backbone]") {
  struct Case {
    std::string dir;
    std::vector<std::vector<std::string>> groups;  // site names that must share, within layer 0
    std::vector<std::string> alone;                // and sites that read an input of their own
  };
  const std::vector<Case> cases = {
      {test::model_dir(), {{"layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v"}}, {"layers.0.attn.o", "layers.0.mlp.up", "layers.0.mlp.down"}},
      {test::fixture("decoders/llama"), {{"layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v"}, {"layers.0.mlp.gate", "layers.0.mlp.up"}}, {"layers.0.attn.o", "layers.0.mlp.down"}},
      {test::fixture("decoders/gpt2"), {{"layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v"}}, {"layers.0.attn.qkv", "layers.0.attn.o", "layers.0.mlp.up"}},
      {test::fixture("seq2seq/t5_text"), {{"encoder.layers.0.attn.q", "encoder.layers.0.attn.k", "encoder.layers.0.attn.v"}, {"decoder.layers.0.cross.k", "decoder.layers.0.cross.v"}},
       {"decoder.layers.0.cross.q", "decoder.layers.0.cross.o"}},
  };
  for (const auto& c : cases) {
    CATCH_INFO(c.dir);
    auto model = load_backbone(c.dir, test::options());
    std::map<std::string, LinearSite*> by_name;
    for (auto* site : model->sites().linear_sites()) by_name[site->name()] = site;
    for (const auto& group : c.groups)
      for (const auto& name : group) {
        CATCH_INFO(name);
        CATCH_REQUIRE(by_name.count(name));
        CATCH_CHECK(by_name[name]->input_group() == by_name[group[0]]->input_group());
      }
    for (const auto& name : c.alone) {
      CATCH_REQUIRE(by_name.count(name));
      CATCH_CHECK(by_name[name]->input_group() == name);
    }
    // The promise itself: every site's branch records the tensor it is given (held, so no
    // two live records can share an address); sites of one group must see the same one.
    std::map<std::string, std::vector<Tensor>> seen;
    auto& o = test::owner("input-groups");
    for (auto& [name, site] : by_name) {
      if (name.find("attn.qkv") != std::string::npos) continue;  // GPT-2 runs the fused site or its parts, not both
      site->add_branch(o, [&seen, name = name, out = site->out_features()](const Tensor& x) {
        seen[name].push_back(x);
        auto shape = x.sizes().vec();
        shape.back() = out;
        return at::zeros(shape, x.options());
      });
    }
    const Tensor ids = at::randint(5, 90, {2, 6}, at::TensorOptions().dtype(at::kLong).device(test::device()));
    const Tensor mask = at::ones({2, 6}, ids.options());
    if (model->kind() == BackboneKind::EncoderDecoder) model->lm_states(ids, mask, ids.narrow(1, 0, 4));
    else model->encode(ids, mask);
    std::map<std::string, std::vector<std::string>> members;
    for (const auto& [name, site] : by_name)
      if (seen.count(name)) members[site->input_group()].push_back(name);
    for (const auto& [group, names] : members)
      for (const auto& name : names) {
        CATCH_INFO(name << " in " << group);
        CATCH_REQUIRE(seen[name].size() == seen[names[0]].size());
        for (std::size_t call = 0; call < seen[name].size(); ++call) CATCH_CHECK(seen[name][call].is_same(seen[names[0]][call]));
      }
    for (auto& [name, site] : by_name) site->remove(o);
  }
}
