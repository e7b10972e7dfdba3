// Reading a PEFT adapter directory: a bad adapter_config.json is refused with the file and
// the place in it.
#include "support.h"

#include "runtime/peft_import.h"

#include <fstream>

using namespace tessera;

CATCH_TEST_CASE("a bad adapter_config.json is refused naming the file and the place in it", "[runtime][peft]") {
  const auto dir = test::temp_dir("peft-import");
  const std::string path = (dir / "adapter_config.json").string();
  auto refusal = [&](const char* json) {
    std::ofstream(path) << json;
    try {
      method_from_peft_dir(dir.string(), test::registry(), "adapter");
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string("(loaded)");
  };
  CATCH_CHECK(refusal(R"({"peft_type": "NOPE"})") == path + ": no plugin for peft_type 'NOPE'");
  CATCH_CHECK_THAT(refusal(R"({"peft_type": 3})"), Catch::StartsWith(path + ": ") && Catch::Contains("(/peft_type) type must be string"));
  CATCH_CHECK_THAT(refusal(R"({"peft_type": "LORA", "target_modules": ["query", 7]})"),
                   Catch::StartsWith(path + ": ") && Catch::Contains("(/target_modules/1) type must be string"));
  CATCH_CHECK(refusal(R"({"peft_type": "LORA", "r": "eight"})") == path + ": 'r' does not fit the plugin's int parameter");
  CATCH_CHECK(refusal(R"({"peft_type": "LORA", "r": 8, "target_modules": ["query"]})") == "(loaded)");
}
