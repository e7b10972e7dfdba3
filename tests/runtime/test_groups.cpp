// Composition groups in a config: every refusal with its place, the attach order, and what
// each instance becomes (its α and parallel group).
#include "support.h"

#include "runtime/config.h"
#include "runtime/groups.h"

#include <fstream>

using namespace tessera;

namespace {

const char* kMethods = R"([model]
path = "/m"
[data]
path = "/d.csv"
tag_columns = ["adapter"]
[[methods]]
plugin = "lora"
name = "a"
[[methods]]
plugin = "lora"
name = "b"
[[methods]]
plugin = "lora"
name = "c"
[[methods]]
plugin = "lora"
name = "d"
)";  // 17 lines: groups begin on line 18

Config write_and_load(const std::string& groups) {
  const auto dir = test::temp_dir("groups");
  const auto path = (dir / "run.toml").string();
  std::ofstream(path) << kMethods << groups;
  Config c = load_config(path);
  check_methods(c, test::registry());
  return c;
}

std::string refusal(const std::string& groups) {
  try {
    write_and_load(groups);
  } catch (const ConfigError& e) {
    const std::string s = e.what();
    return s.substr(s.find("run.toml"));
  }
  return "no error";
}

}  // namespace

CATCH_TEST_CASE("groups: each mistake is refused with file, line and column before the model is touched", "[runtime][groups]") {
  CATCH_CHECK(refusal("[[groups]]\nname = \"g\"\nkind = \"paralel\"\nmembers = [\"a\"]\n") ==
              "run.toml:20:8: group 'g': kind 'paralel' is not one of stack, parallel, average, gated, route (did you mean 'parallel'?)");
  CATCH_CHECK(refusal("[[groups]]\nname = \"g\"\nkind = \"stack\"\nmembers = [\"a\", \"bb\"]\n") ==
              "run.toml:21:17: group 'g': no method instance or group is named 'bb' (did you mean 'b'?)");
  CATCH_CHECK(refusal("[[groups]]\nname = \"g\"\nkind = \"stack\"\nmembers = [\"a\", \"a\"]\n") ==
              "run.toml:21:17: 'a' is listed twice in group 'g': an instance or group belongs to one group, once");
  CATCH_CHECK(refusal("[[groups]]\nname = \"g\"\nkind = \"stack\"\nmembers = [\"a\"]\n[[groups]]\nname = \"h\"\nkind = \"parallel\"\nmembers = [\"a\"]\n") ==
              "run.toml:25:12: 'a' is listed in groups 'g' and 'h': an instance or group belongs to one group, once");
  CATCH_CHECK(refusal("[[groups]]\nname = \"a\"\nkind = \"stack\"\nmembers = [\"b\"]\n") ==
              "run.toml:19:8: the name 'a' is taken by a method instance or another group");
  // A cycle: g holds h, h holds g.
  CATCH_CHECK_THAT(refusal("[[groups]]\nname = \"g\"\nkind = \"stack\"\nmembers = [\"h\", \"a\"]\n[[groups]]\nname = \"h\"\nkind = \"stack\"\nmembers = [\"g\"]\n"),
                   Catch::StartsWith("run.toml:18:1: groups form a cycle: g -> h -> g"));
  // The nesting table: a stack inside a parallel group is not in it.
  CATCH_CHECK_THAT(refusal("[[groups]]\nname = \"s\"\nkind = \"stack\"\nmembers = [\"a\", \"b\"]\n[[groups]]\nname = \"p\"\nkind = \"parallel\"\nmembers = [\"s\", \"c\"]\n"),
                   Catch::StartsWith("run.toml:25:12: group 'p' (parallel) cannot hold group 's' (stack)"));
  CATCH_CHECK(refusal("[[groups]]\nname = \"g\"\nkind = \"average\"\nmembers = [\"a\", \"b\"]\nweights = [1.0]\n") ==
              "run.toml:22:11: group 'g' has 1 weights for 2 members");
  CATCH_CHECK(refusal("[[groups]]\nname = \"g\"\nkind = \"average\"\nmembers = [\"a\", \"b\"]\nweights = [1.0, -1]\n") ==
              "run.toml:22:11: group 'g': weights must be finite and not negative");
  CATCH_CHECK(refusal("[[groups]]\nname = \"g\"\nkind = \"parallel\"\nmembers = [\"a\", \"b\"]\nweights = [1.0, 1.0]\n") ==
              "run.toml:22:11: group 'g': 'weights' belong to an average group");
  CATCH_CHECK(refusal("[[groups]]\nname = \"g\"\nkind = \"route\"\nmembers = [\"a\", \"b\"]\n") ==
              "run.toml:18:1: route group 'g' needs 'tag': the [data] tag column whose value names each sample's member");
  CATCH_CHECK(refusal("[[groups]]\nname = \"g\"\nkind = \"route\"\nmembers = [\"a\", \"b\"]\ntag = \"task\"\n") ==
              "run.toml:22:7: route group 'g': tag 'task' is not one of [data] tag_columns (add it there)");
  CATCH_CHECK(refusal("[[groups]]\nname = \"g\"\nkind = \"route\"\nmembers = [\"a\", \"b\"]\ntag = \"adapter\"\nwieghts = [1]\n") ==
              "run.toml:23:11: unknown key 'wieghts' in [groups] (did you mean 'weights'?)");
  CATCH_CHECK(refusal("[[groups]]\nname = \"g\"\nkind = \"route\"\nmembers = [\"a\", \"b\"]\ntag = \"adapter\"\n") == "no error");
}

CATCH_TEST_CASE("groups: the nesting table, as docs/composing.md prints it, and a stack deeper below a parallel group", "[runtime][groups]") {
  const std::vector<std::string> kinds = {"stack", "parallel", "average", "gated", "route"};
  CATCH_CHECK(group_kinds() == kinds);
  const std::map<std::string, std::string> table = {  // parent -> which of the kinds it holds, in that order
      {"stack", "yyyyy"}, {"parallel", "nyyyy"}, {"average", "nyyyy"}, {"gated", "nyyyy"}, {"route", "yyyyy"}};
  for (const auto& [parent, row] : table)
    for (std::size_t k = 0; k < kinds.size(); ++k) {
      CATCH_INFO(parent << " holding " << kinds[k]);
      CATCH_CHECK(nesting_allowed(parent, kinds[k]) == (row[k] == 'y'));
    }
  // parallel[route[stack[a, b]], c]: each step is in the table, but the stack would be flattened.
  CATCH_CHECK_THAT(refusal("[[groups]]\nname = \"s\"\nkind = \"stack\"\nmembers = [\"a\", \"b\"]\n"
                           "[[groups]]\nname = \"r\"\nkind = \"route\"\ntag = \"adapter\"\nmembers = [\"s\"]\n"
                           "[[groups]]\nname = \"p\"\nkind = \"parallel\"\nmembers = [\"r\", \"c\"]\n"),
                   Catch::StartsWith("run.toml:26:12: stack group 's' sits inside parallel group 'p' (through 'r')"));
}

CATCH_TEST_CASE("groups: attach order keeps a group together where its first instance stood, α and parallel groups follow the nesting", "[runtime][groups]") {
  // The stack [c, avg(b, a)] holds a, the file's first instance: it goes first, then d.
  const Config c = write_and_load(
      "[[groups]]\nname = \"avg\"\nkind = \"average\"\nmembers = [\"b\", \"a\"]\nweights = [1.0, 3.0]\n"
      "[[groups]]\nname = \"top\"\nkind = \"stack\"\nmembers = [\"c\", \"avg\"]\n");
  std::vector<std::string> order;
  for (std::size_t i : attach_order(c)) order.push_back(c.methods[i].name);
  CATCH_CHECK(order == std::vector<std::string>{"c", "b", "a", "d"});
  const auto p = placements(c);
  CATCH_CHECK(p.at("a").alpha == 0.75);
  CATCH_CHECK(p.at("b").alpha == 0.25);
  CATCH_CHECK(p.at("c").alpha == 1.0);
  CATCH_CHECK(p.at("a").parallel_group == p.at("b").parallel_group);
  CATCH_CHECK(p.at("a").parallel_group != 0);
  CATCH_CHECK(p.at("c").parallel_group == 0);  // a stack chains
  CATCH_CHECK(p.at("d").path.empty());
  CATCH_CHECK(p.at("a").path == std::vector<std::string>{"avg", "top"});
  // Unnormalised weights count as written; no weights with normalize: equal shares.
  const Config raw = write_and_load("[[groups]]\nname = \"avg\"\nkind = \"average\"\nmembers = [\"a\", \"b\", \"c\", \"d\"]\nnormalize = false\nweights = [2, 1, 1, 1]\n");
  CATCH_CHECK(placements(raw).at("a").alpha == 2.0);
  const Config equal = write_and_load("[[groups]]\nname = \"avg\"\nkind = \"average\"\nmembers = [\"a\", \"b\", \"c\", \"d\"]\n");
  CATCH_CHECK(placements(equal).at("c").alpha == 0.25);
  // Groups survive the run's written config.
  CATCH_CHECK_THAT(resolved_toml(c), Catch::Contains("kind = 'average'") && Catch::Contains("weights = [ 1.0, 3.0 ]"));
}
