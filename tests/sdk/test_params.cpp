#include "support.h"

#include <tessera/params.h>

using namespace tessera;

CATCH_TEST_CASE("apply_schema fills defaults and checks types, ranges and choices", "[sdk]") {
  std::vector<ParamSpec> schema = {
      {"r", ParamType::Int, std::int64_t{8}, "", 1, 64, {}},
      {"alpha", ParamType::Float, 16.0, "", 0, std::nullopt, {}},
      {"init", ParamType::String, std::string("a"), "", std::nullopt, std::nullopt, {"a", "b"}},
  };
  Params p = apply_schema(schema, {{"alpha", std::int64_t{4}}});
  CATCH_CHECK(p.integer("r") == 8);
  CATCH_CHECK(p.number("alpha") == 4.0);  // an int where a float is expected is accepted
  CATCH_CHECK(p.text("init") == "a");

  auto error_key = [&](std::map<std::string, ParamValue> given) {
    try {
      apply_schema(schema, std::move(given));
    } catch (const ParamError& e) {
      return e.key();
    }
    return std::string("no error");
  };
  CATCH_CHECK(error_key({{"r", std::int64_t{0}}}) == "r");
  CATCH_CHECK(error_key({{"r", 2.5}}) == "r");
  CATCH_CHECK(error_key({{"init", std::string("c")}}) == "init");
  CATCH_CHECK(error_key({{"alpha", std::string("x")}}) == "alpha");
}

CATCH_TEST_CASE("target patterns: suffix, glob and regex over both names", "[sdk]") {
  CATCH_CHECK(matches("attn.q", "layers.3.attn.q"));
  CATCH_CHECK_FALSE(matches("q", "layers.3.attn.qq"));
  CATCH_CHECK(matches("query", "encoder.layer.3.attention.self.query"));
  CATCH_CHECK(matches("layers.*.mlp.up", "layers.11.mlp.up"));
  CATCH_CHECK_FALSE(matches("layers.1?.mlp.up", "layers.1.mlp.up"));
  CATCH_CHECK(matches("re:layers\\.[0-2]\\.attn\\.(q|v)", "layers.2.attn.v"));
  CATCH_CHECK_FALSE(matches("re:layers\\.[0-2]\\.attn\\.(q|v)", "layers.3.attn.v"));
  CATCH_CHECK(matches_any({"nothing", "value"}, "layers.0.attn.v", "encoder.layer.0.attention.self.value"));
}
