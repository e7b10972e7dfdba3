// Config errors name file, line and column, with a suggestion for a misspelt key.
#include "support.h"

#include "runtime/config.h"

#include <algorithm>
#include <fstream>

using namespace tessera;

namespace {

const char* kBase = R"([model]
path = "/m"
[data]
path = "/d.csv"
)";

std::string config_error(const std::string& body, bool check = false) {
  auto dir = test::temp_dir("cfg");
  auto path = (dir / "run.toml").string();
  {
    std::ofstream(path) << body;
  }
  try {
    Config c = load_config(path);
    if (check) check_methods(c, test::registry());
  } catch (const ConfigError& e) {
    std::string s = e.what();
    return s.substr(s.find("run.toml"));
  }
  return "no error";
}

}  // namespace

CATCH_TEST_CASE("a valid config loads, with defaults and relative paths", "[runtime][config]") {
  std::string body = std::string(kBase) + "[train]\nepochs = 2\nlr = 5e-4\n[output]\ndir = \"out\"\n"
                     "[[methods]]\nplugin = \"lora\"\ntargets = [\"attn.q\"]\n[methods.params]\nr = 4\n";
  auto dir = test::temp_dir("cfg-ok");
  auto path = (dir / "run.toml").string();
  {
    std::ofstream(path) << body;
  }
  Config c = load_config(path);
  check_methods(c, test::registry());
  CATCH_CHECK(c.train.epochs == 2);
  CATCH_CHECK(c.train.batch_size == 32);
  CATCH_CHECK(c.output_dir == (dir / "out").string());
  CATCH_REQUIRE(c.methods.size() == 1);
  CATCH_CHECK(c.methods[0].name == "lora");
  CATCH_CHECK(c.methods[0].checked.integer("r") == 4);
  CATCH_CHECK(c.methods[0].checked.number("lora_alpha") == 8.0);  // the schema's default
  CATCH_CHECK_THAT(resolved_toml(c), Catch::Contains("lora_alpha = 8.0"));
}

CATCH_TEST_CASE("config errors carry file, line, column and a suggestion", "[runtime][config]") {
  // Numbers that would reach the weights as nan or inf, or make no sense, with their place.
  CATCH_CHECK(config_error(std::string(kBase) + "[train]\nlr = nan\n") == "run.toml:6:6: 'lr' must be a finite number ≥ 0");
  CATCH_CHECK(config_error(std::string(kBase) + "[train]\nlr = -1e-3\n") == "run.toml:6:6: 'lr' must be a finite number ≥ 0");
  CATCH_CHECK(config_error(std::string(kBase) + "[train]\nweight_decay = inf\n") == "run.toml:6:16: 'weight_decay' must be a finite number ≥ 0");
  CATCH_CHECK(config_error(std::string(kBase) + "[train]\nwarmup_ratio = 1.5\n") == "run.toml:6:16: 'warmup_ratio' must be a finite number in [0, 1]");
  CATCH_CHECK(config_error(std::string(kBase) + "[train]\nthreads = 9999999999999\n") == "run.toml:6:11: 'threads' must be at most 4096");
  CATCH_CHECK(config_error(std::string(kBase) + "[train]\nlr = 0\nhead_lr = 3e-3\nmax_grad_norm = 0\n") == "no error");
  CATCH_CHECK(config_error(std::string(kBase) + "[train]\nepoch = 3\n") ==
              "run.toml:6:9: unknown key 'epoch' in [train] (did you mean 'epochs'?)");
  CATCH_CHECK(config_error(std::string(kBase) + "[train]\nepochs = \"three\"\n") == "run.toml:6:10: 'epochs' must be an integer");
  CATCH_CHECK(config_error(std::string(kBase) + "[trian]\n") == "run.toml:5:1: unknown section 'trian' (did you mean 'train'?)");
  CATCH_CHECK_THAT(config_error(std::string(kBase) + "[train\n"), Catch::StartsWith("run.toml:5:"));
  CATCH_CHECK(config_error(std::string(kBase) + "[model]\n") != "no error");  // redefined table: a TOML error
  CATCH_CHECK(config_error("[model]\npath = \"/m\"\ndevice = \"gpu\"\n[data]\npath = \"/d.csv\"\n") ==
              "run.toml:3:10: 'device' must be \"cpu\", \"cuda\" or \"cuda:N\", not \"gpu\"");
  CATCH_CHECK(config_error("[model]\npath = \"/m\"\ndevice = \"cuda:x\"\n[data]\npath = \"/d.csv\"\n") != "no error");
  CATCH_CHECK(config_error("[model]\npath = \"/m\"\ndevice = \"cuda:1\"\n[data]\npath = \"/d.csv\"\n") == "no error");
  // Each micro-batch needs an example of the batch.
  CATCH_CHECK(config_error(std::string(kBase) + "[train]\nbatch_size = 4\nmicro_batches = 5\n") ==
              "run.toml:7:17: 'micro_batches' (5) must be at most batch_size (4): each piece of a batch needs an example");
  CATCH_CHECK(config_error(std::string(kBase) + "[train]\nmicro_batches = 0\n") == "run.toml:6:17: 'micro_batches' must be at least 1");
  CATCH_CHECK(config_error(std::string(kBase) + "[train]\nbatch_size = 4\nmicro_batches = 4\n") == "no error");
}

CATCH_TEST_CASE("config_differences: changed, removed and added keys, a host key or plugin parameter added since at its default is none", "[runtime][config]") {
  auto dir = test::temp_dir("cfg-diff");
  const auto path = (dir / "run.toml").string();
  {
    std::ofstream(path) << kBase << "[train]\nlr = 5e-4\n";
  }
  const Config cfg = load_config(path);
  const std::string now = resolved_toml(cfg);
  CATCH_CHECK(config_differences(now, cfg).empty());
  // A text written before [train] micro_batches existed: the key at its default changes nothing.
  std::string before = now;
  const auto at = before.find("micro_batches = 1\n");
  CATCH_REQUIRE(at != std::string::npos);
  before.erase(at, std::string("micro_batches = 1\n").size());
  CATCH_CHECK(config_differences(before, cfg).empty());
  Config two = cfg;
  two.train.micro_batches = 2;
  CATCH_CHECK(config_differences(before, two) == std::vector<std::string>{"train.micro_batches: (absent) → 2"});
  CATCH_CHECK(config_differences(resolved_toml(two), cfg) == std::vector<std::string>{"train.micro_batches: 2 → 1"});
  // A key the older text has and this version does not: removed.
  CATCH_CHECK(config_differences(now + "[extra]\nold_key = 3\n", cfg) == std::vector<std::string>{"extra.old_key: 3 → (absent)"});

  // A plugin parameter added since (prefix_tuning's embedding_width): the same at its schema's
  // default, written or not (a resumed run's config.toml, written again, writes every key).
  const std::string prefix = std::string(kBase) + "[[methods]]\nplugin = \"prefix_tuning\"\n[methods.params]\nprefix_projection = true\n";
  auto checked = [&](const std::string& text) {
    std::ofstream(path) << text;
    Config c = load_config(path);
    check_methods(c, test::registry());
    return c;
  };
  const Config p = checked(prefix);
  std::string old_text = resolved_toml(p);
  const auto key = old_text.find("embedding_width = 'kv'\n");
  CATCH_REQUIRE(key != std::string::npos);
  old_text.erase(key, std::string("embedding_width = 'kv'\n").size());
  CATCH_CHECK(config_differences(old_text, p).empty());
  CATCH_CHECK(config_differences(old_text, checked(old_text)).empty());  // a resumed run's config.toml, read back
  CATCH_CHECK(config_differences(old_text, checked(prefix + "embedding_width = \"hidden\"\n")) ==
              std::vector<std::string>{"methods[0].params.embedding_width: (absent) → 'hidden'"});
  CATCH_CHECK(config_differences(old_text, checked(prefix + "embedding_width = \"kv\"\n")).empty());
  CATCH_CHECK(config_differences(old_text, checked(resolved_toml(p))).empty());
  // A method added since is a change, though every key of it is at its default.
  const std::string two_methods = prefix + "[[methods]]\nplugin = \"prompt_tuning\"\n";
  const auto added = config_differences(old_text, checked(two_methods));
  CATCH_CHECK(std::count(added.begin(), added.end(), "methods[1].plugin: (absent) → 'prompt_tuning'") == 1);
  CATCH_CHECK(std::count(added.begin(), added.end(), "methods[1].params.num_virtual_tokens: (absent) → 20") == 1);
}

CATCH_TEST_CASE("method parameters are checked against the plugin's schema with positions", "[runtime][config]") {
  const std::string m = std::string(kBase) + "[[methods]]\nplugin = \"lora\"\ntargets = [\"attn.q\"]\n[methods.params]\n";
  CATCH_CHECK(config_error(m + "lora_alpah = 4\n", true) ==
              "run.toml:9:14: plugin 'lora' has no parameter 'lora_alpah' (did you mean 'lora_alpha'?)");
  CATCH_CHECK(config_error(m + "r = \"eight\"\n", true) == "run.toml:9:5: method 'lora' (plugin 'lora'): 'r' must be an int, not a string");
  CATCH_CHECK(config_error(m + "r = 0\n", true) == "run.toml:9:5: method 'lora' (plugin 'lora'): 'r' = 0 is outside [1, 65536]");
  CATCH_CHECK_THAT(config_error(m + "rank_pattern = { \"q\" = 2.5 }\n", true),
                   Catch::StartsWith("run.toml:9:16: method 'lora' (plugin 'lora'): rank_pattern['q'] must be a positive integer"));
  CATCH_CHECK(config_error(std::string(kBase) + "[[methods]]\nplugin = \"lorra\"\n", true) ==
              "run.toml:5:1: no plugin with id 'lorra' (did you mean 'lora'?); `tessera plugins` lists the plugins found");
  CATCH_CHECK(config_error(std::string(kBase) + "[[methods]]\nplugin = \"lora\"\nrank = 8\n") ==
              "run.toml:7:8: unknown key 'rank' in [[methods]] (parameters go in [methods.params])");
}

CATCH_TEST_CASE("every example config under configs/ loads, and its methods pass their plugins' schemas", "[runtime][config]") {
  std::size_t n = 0;
  for (const auto& e : std::filesystem::recursive_directory_iterator(std::string(TESSERA_SOURCE_DIR) + "/configs")) {  // configs/hybrid too
    if (e.path().extension() != ".toml") continue;
    if (e.path().parent_path().filename() == "assess") continue;  // `tessera assess` matrices: tests/cli/assess.sh runs --check on them
    CATCH_INFO(e.path().string());
    Config c;
    CATCH_CHECK_NOTHROW(c = load_config(e.path().string()));
    CATCH_CHECK_NOTHROW(check_methods(c, test::registry()));
    ++n;
  }
  CATCH_CHECK(n >= 4);
}

CATCH_TEST_CASE("[model] quantize takes none, nf4, fp4, int8 or gguf, and double_quant only with a 4-bit base", "[runtime][config]") {
  CATCH_CHECK(config_error(kBase) == "no error");
  const std::string bad = R"([model]
path = "/m"
quantize = "nf3"
[data]
path = "/d.csv"
)";
  CATCH_CHECK_THAT(config_error(bad), Catch::Contains("run.toml:3:12") && Catch::Contains("one of"));
  const std::string dq = R"([model]
path = "/m"
double_quant = true
[data]
path = "/d.csv"
)";
  CATCH_CHECK_THAT(config_error(dq), Catch::Contains("run.toml:3:16") && Catch::Contains("set quantize = \"nf4\" or \"fp4\" too"));
  CATCH_CHECK(config_error("[model]\npath = \"/m\"\nquantize = \"int8\"\ndouble_quant = true\n[data]\npath = \"/d.csv\"\n") ==
              "run.toml:4:16: 'double_quant' quantizes the block scales of a 4-bit base: set quantize = \"nf4\" or \"fp4\" too");
  CATCH_CHECK(config_error("[model]\npath = \"/m\"\nquantize = \"fp4\"\ndouble_quant = true\n[data]\npath = \"/d.csv\"\n") == "no error");
}

CATCH_TEST_CASE("[model.quantize_targets] gives layer weights a format of their own, each value checked where it stands", "[runtime][config]") {
  const std::string ok = R"([model]
path = "/m"
quantize = "nf4"
double_quant = true
[model.quantize_targets]
"mlp.down" = "int8"
"attn.o" = "none"
[data]
path = "/d.csv"
)";
  CATCH_CHECK(config_error(ok) == "no error");
  const auto path = (test::temp_dir("cfg") / "run.toml").string();
  std::ofstream(path) << ok << std::flush;
  const Config c = load_config(path);
  CATCH_CHECK(c.model.quantize_targets == std::vector<std::pair<std::string, std::string>>{{"attn.o", "none"}, {"mlp.down", "int8"}});
  // An override alone may ask for the 4-bit blocks double_quant needs.
  CATCH_CHECK(config_error("[model]\npath = \"/m\"\ndouble_quant = true\n[model.quantize_targets]\n\"mlp.up\" = \"fp4\"\n[data]\npath = \"/d.csv\"\n") == "no error");
  CATCH_CHECK(config_error("[model]\npath = \"/m\"\n[model.quantize_targets]\n\"mlp.up\" = \"nf5\"\n[data]\npath = \"/d.csv\"\n") ==
              "run.toml:4:12: quantize_targets: 'mlp.up' must name a storage format: none, nf4, fp4, int8 or gguf");
  CATCH_CHECK(config_error("[model]\npath = \"/m\"\n[model.quantize_targets]\n\"mlp.up\" = 4\n[data]\npath = \"/d.csv\"\n") ==
              "run.toml:4:12: quantize_targets: 'mlp.up' must name a storage format: none, nf4, fp4, int8 or gguf");
  CATCH_CHECK_THAT(config_error("[model]\npath = \"/m\"\n[model.quantize_targets]\nmlp.up = \"int8\"\n[data]\npath = \"/d.csv\"\n"),
                   Catch::Contains("'mlp' must name a storage format") && Catch::Contains("in quotes"));
  CATCH_CHECK(config_error("[model]\npath = \"/m\"\nquantize_targets = \"mlp.up\"\n[data]\npath = \"/d.csv\"\n") ==
              "run.toml:3:20: 'quantize_targets' must be a table");
  CATCH_CHECK(config_error("[model]\npath = \"/m\"\n[model.quantize_targets]\n\"mlp.up\" = \"gguf\"\n[data]\npath = \"/d.csv\"\n") ==
              "run.toml:3:1: \"gguf\" storage keeps a GGUF file's own blocks: 'path' must name a .gguf file");
}

CATCH_TEST_CASE("[model] path may be a GGUF file, with or without a tokenizer directory, and gguf storage asks for one", "[runtime][config]") {
  CATCH_CHECK(config_error("[model]\npath = \"/m/x.gguf\"\n[data]\npath = \"/d.csv\"\n") == "no error");  // its own tokenizer
  CATCH_CHECK(config_error("[model]\npath = \"/m/x.gguf\"\ntokenizer = \"/m\"\n[data]\npath = \"/d.csv\"\n") == "no error");
  CATCH_CHECK(config_error("[model]\npath = \"/m/x.gguf\"\ntokenizer = \"/m\"\nquantize = \"gguf\"\n[data]\npath = \"/d.csv\"\n") == "no error");
  CATCH_CHECK(config_error("[model]\npath = \"/m\"\nquantize = \"gguf\"\n[data]\npath = \"/d.csv\"\n") ==
              "run.toml:3:12: \"gguf\" storage keeps a GGUF file's own blocks: 'path' must name a .gguf file");
}
