// Reading config.json: JsonFields' checks, and every architecture refusing a bad value at
// load with the file and the key (before, a zero head count divided by zero and a wrong
// type surfaced as a bare JSON library message).
#include "architectures/bert.h"
#include "architectures/decoder.h"
#include "formats/json_file.h"
#include "architectures/t5.h"

#include "support.h"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

using namespace tessera;

CATCH_TEST_CASE("JsonFields: absent or null gives the fallback, a wrong type or range names file and key", "[model][config]") {
  const auto j = nlohmann::json::parse(R"({"n": 3, "zero": 0, "f": 0.25, "s": "x", "b": true, "nul": null, "rope": {"factor": -2}})");
  const JsonFields f(j, "dir/config.json");
  CATCH_CHECK(f.size("n") == 3);
  CATCH_CHECK(f.size_or("absent", 7) == 7);
  CATCH_CHECK(f.size_or("nul", 7) == 7);
  CATCH_CHECK(f.int_or("zero", 5) == 0);
  CATCH_CHECK(f.number_or("n", 0) == 3.0);  // an integer is a number
  CATCH_CHECK(f.probability_or("f", 1) == 0.25);
  CATCH_CHECK(f.string_or("s", "") == "x");
  CATCH_CHECK(f.bool_or("b", false));
  CATCH_CHECK_FALSE(f.has("nul"));
  CATCH_CHECK_THROWS_WITH(f.size("absent"), "dir/config.json: absent is missing (an integer ≥ 1)");
  CATCH_CHECK_THROWS_WITH(f.size("zero"), "dir/config.json: zero must be an integer ≥ 1, got 0");
  CATCH_CHECK_THROWS_WITH(f.size("f"), "dir/config.json: f must be an integer ≥ 1, got 0.25");
  CATCH_CHECK_THROWS_WITH(f.int_or("s", 0), "dir/config.json: s must be an integer, got \"x\"");
  CATCH_CHECK_THROWS_WITH(f.bool_or("n", false), "dir/config.json: n must be true or false, got 3");
  CATCH_CHECK_THROWS_WITH(f.string_or("b", ""), "dir/config.json: b must be a string, got true");
  CATCH_CHECK_THROWS_WITH(f.probability_or("n", 0), "dir/config.json: n must be a number in [0, 1], got 3");
  CATCH_CHECK_THROWS_WITH(f.nonnegative_or("s", 0), "dir/config.json: s must be a number ≥ 0, got \"x\"");
  const JsonFields rope(j["rope"], "dir/config.json", "rope.");
  CATCH_CHECK_THROWS_WITH(rope.positive_or("factor", 1), "dir/config.json: rope.factor must be a number > 0, got -2");
  CATCH_CHECK_THROWS_WITH(JsonFields(j["n"], "dir/config.json", "rope_scaling."), "dir/config.json: rope_scaling must be an object");
}

namespace {

struct BadConfig {
  const char* fixture;  // under the test fixtures
  const char* kind;     // decoder, t5, bert
  const char* edit;     // a JSON object merged into config.json (a "/"-separated key reaches into an object)
  const char* error;    // what the refusal must contain after "config.json: "; "" = it loads
};

void load(const std::string& kind, const std::string& dir) {
  if (kind == "decoder") DecoderModel::load(dir, at::TensorOptions());
  if (kind == "t5") T5Model::load(dir, at::TensorOptions());
  if (kind == "bert") BertModel::load(dir, at::TensorOptions());
}

}  // namespace

CATCH_TEST_CASE("every architecture refuses a bad config.json value at load, naming file and key", "[model][config]") {
  namespace fs = std::filesystem;
  const BadConfig cases[] = {
      {"decoders/gpt2", "decoder", R"({"n_head": 0})", "n_head must be an integer ≥ 1, got 0"},  // was SIGFPE
      {"decoders/gpt2", "decoder", R"({"n_layer": 3})", "n_layer is 3, but"},
      {"decoders/gpt2", "decoder", R"({"attn_pdrop": 1.5})", "attn_pdrop must be a number in [0, 1], got 1.5"},
      {"decoders/gpt2", "decoder", R"({"tie_word_embeddings": "yes"})", "tie_word_embeddings must be true or false, got \"yes\""},
      {"decoders/gpt2", "decoder", R"({"n_inner": null})", ""},
      {"decoders/llama", "decoder", R"({"num_key_value_heads": 0})", "num_key_value_heads must be an integer ≥ 1, got 0"},  // was SIGFPE
      {"decoders/llama", "decoder", R"({"num_hidden_layers": 1099511627776})", "num_hidden_layers is 1099511627776, but"},
      {"decoders/llama", "decoder", R"({"rope_parameters/factor": "x"})", "rope_parameters.factor must be a number > 0, got \"x\""},
      {"decoders/llama", "decoder", R"({"rope_parameters/rope_type": "longrope"})", "rope_parameters.rope_type 'longrope' is not supported"},
      {"decoders/llama", "decoder", R"({"head_dim": 15})", "head_dim must be even for rotary embeddings, got 15"},
      {"decoders/llama", "decoder", R"({"eos_token_id": [2, "x"]})", "eos_token_id must be an integer or a list of them"},
      {"decoders/llama", "decoder", R"({"rms_norm_eps": -1})", "rms_norm_eps must be a number ≥ 0, got -1"},
      {"decoders/llama", "decoder", R"({"attention_bias": null, "pad_token_id": null})", ""},
      {"seq2seq/t5_v1_1", "t5", R"({"num_heads": 0})", "num_heads must be an integer ≥ 1, got 0"},
      {"seq2seq/t5_v1_1", "t5", R"({"num_decoder_layers": 5})", "num_decoder_layers is 5, but"},
      {"seq2seq/t5_v1_1", "t5", R"({"relative_attention_max_distance": 2})", "relative_attention_max_distance must exceed half"},  // was an index error
      {"seq2seq/t5_v1_1", "t5", R"({"decoder_start_token_id": 100000})", "decoder_start_token_id (the decoder's start token) must be a token id below vocab_size"},
      {"seq2seq/t5_v1_1", "t5", R"({"feed_forward_proj": 3})", "feed_forward_proj must be a string, got 3"},
      {"tiny_bert_mlm", "bert", R"({"num_attention_heads": 0})", "num_attention_heads must be an integer ≥ 1, got 0"},  // was SIGFPE
      {"tiny_bert_mlm", "bert", R"({"hidden_dropout_prob": -0.5})", "hidden_dropout_prob must be a number in [0, 1], got -0.5"},
      {"tiny_bert_mlm", "bert", R"({"num_hidden_layers": 7})", "num_hidden_layers is 7, but"},
      {"tiny_bert_mlm", "bert", R"({"layer_norm_eps": null})", ""},
  };
  for (const auto& c : cases) {
    CATCH_INFO(c.fixture << " with " << c.edit);
    const auto dir = test::temp_dir("bad-config");
    for (const auto& f : fs::directory_iterator(test::fixture(c.fixture))) fs::copy(f.path(), dir / f.path().filename());
    nlohmann::json config;
    std::ifstream((dir / "config.json").string()) >> config;
    const auto edit = nlohmann::json::parse(c.edit);
    for (const auto& [key, value] : edit.items()) config[nlohmann::json::json_pointer("/" + key)] = value;
    std::ofstream((dir / "config.json").string()) << config.dump();
    if (*c.error == '\0') {
      CATCH_CHECK_NOTHROW(load(c.kind, dir.string()));
    } else {
      CATCH_CHECK_THROWS_WITH(load(c.kind, dir.string()), Catch::Contains((dir / "config.json").string() + ": " + c.error));
    }
  }
}
