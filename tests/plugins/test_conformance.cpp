// One table, every plugin: the life from DESIGN.md checked the same way for each.
// A plugin shipped in plugins/ without a row here fails the first test.
#include "support.h"

#include <nlohmann/json.hpp>

using namespace tessera;

namespace {

struct Row {
  std::string plugin;
  std::vector<std::string> targets;
  std::map<std::string, ParamValue> params;  // chosen so that the method changes the output at once
};

const std::vector<Row>& table() {
  static const std::vector<Row> rows = {
      {"lora", {"attn.q", "attn.v", "mlp.up"}, {{"r", std::int64_t{4}}, {"init_lora_weights", std::string("false")}, {"lora_alpha", 8.0}}},
  };
  return rows;
}

}  // namespace

CATCH_TEST_CASE("every shipped plugin has a conformance row", "[plugins][conformance]") {
  PluginRegistry shipped;
  shipped.scan({TESSERA_PLUGIN_DIR});
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

CATCH_TEST_CASE("conformance: attach, train, state, merge, detach", "[plugins][conformance][minilm]") {
  auto ref = test::read_tensors(test::fixture("reference.safetensors"));
  const auto& ids = ref["input_ids"];
  const auto& mask = ref["attention_mask"];
  for (const auto& row : table()) {
    CATCH_INFO("plugin " << row.plugin);
    auto model = test::load_minilm();
    const auto* info = test::registry().find(row.plugin);
    CATCH_REQUIRE(info != nullptr);
    Params params = apply_schema(info->params, row.params);
    std::map<std::string, Tensor> base_before;
    for (auto* p : model->parameter_sites()) base_before[p->name()] = p->base().clone();
    Tensor base_out;
    {
      at::NoGradGuard ng;
      base_out = model->forward(ids, mask).hidden;
    }

    auto m = test::registry().create(row.plugin, "under_test");
    AttachContext ctx{"under_test", row.targets, params, *model};
    m->call("attach", [&](Method& x) { x.attach(ctx); });
    auto trainable = m->call("trainable", [](Method& x) { return x.trainable(); });
    CATCH_REQUIRE_FALSE(trainable.empty());
    for (const auto& [k, t] : trainable) {
      CATCH_CHECK(t.is_leaf());
      CATCH_CHECK(t.requires_grad());
      CATCH_CHECK(t.scalar_type() == at::kFloat);
    }

    // One training step by hand: every trainable tensor gets a gradient; the base none.
    model->train(true);
    Tensor loss = model->forward(ids, mask).hidden.pow(2).mean();
    loss.backward();
    model->train(false);
    {
      at::NoGradGuard ng;
      for (auto& [k, t] : trainable) {
        CATCH_INFO("tensor " << k);
        CATCH_REQUIRE(t.grad().defined());
        CATCH_CHECK(t.grad().abs().sum().item<double>() > 0);
        t.sub_(t.grad() * 0.05);
      }
    }
    for (auto* p : model->parameter_sites()) CATCH_CHECK((!p->base().requires_grad() && at::equal(p->base(), base_before[p->name()])));

    at::NoGradGuard ng;
    Tensor adapted = model->forward(ids, mask).hidden;
    CATCH_CHECK(test::max_abs_diff_tokens(adapted, base_out, mask) > 1e-4);

    // State round trip into a fresh instance on a fresh model.
    auto state = m->call("state", [](Method& x) { return x.state(); });
    auto model2 = test::load_minilm();
    auto m2 = test::registry().create(row.plugin, "under_test");
    AttachContext ctx2{"under_test", row.targets, params, *model2};
    m2->call("attach", [&](Method& x) { x.attach(ctx2); });
    m2->call("load_state", [&](Method& x) { x.load_state(state); });
    CATCH_CHECK(at::equal(model2->forward(ids, mask).hidden, adapted));
    CATCH_CHECK_FALSE(nlohmann::json::parse(m->call("cfg", [](Method& x) { return x.adapter_config_json(); })).empty());

    if (m->call("mergeable", [](Method& x) { return x.mergeable(); })) {
      m->call("merge", [](Method& x) { x.merge(); });
      CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, adapted, mask) < 1e-4);
      m->call("unmerge", [](Method& x) { x.unmerge(); });
      CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, adapted, mask) < 1e-4);
    }
    m->call("detach", [&](Method& x) { x.detach(*model); });
    CATCH_CHECK(test::max_abs_diff_tokens(model->forward(ids, mask).hidden, base_out, mask) < 1e-4);  // merge + unmerge round in f32
    m2->call("detach", [&](Method& x) { x.detach(*model2); });
  }
}
