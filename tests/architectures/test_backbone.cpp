// load_backbone, the one place a model_type picks an architecture, and make_task, the one
// place a task kind is picked: the right kind for each, and a clear refusal otherwise.
#include "support.h"

#include "architectures/backbone.h"
#include "tasks/task.h"

#include <fstream>

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
