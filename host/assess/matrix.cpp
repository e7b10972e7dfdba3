#include "assess/matrix.h"

#include "runtime/config_toml.h"
#include "runtime/plugin_registry.h"

#include <filesystem>
#include <set>

namespace tessera {
namespace fs = std::filesystem;
namespace {

[[noreturn]] void fail(const std::string& file, const toml::node& n, const std::string& why) { throw ConfigError(source_of(file, n), why); }

const toml::table* table_at(const std::string& file, const toml::table& t, const char* key) {
  const toml::node* n = t.get(key);
  if (n == nullptr) return nullptr;
  if (!n->is_table()) fail(file, *n, std::string("'") + key + "' must be a table");
  return n->as_table();
}

// The keys of a setup file that describe the method rather than the task: its [[methods]]
// and [[groups]], how it optimizes them, and how it keeps the base's weights (QLoRA's NF4).
void take_method_side(const Config& from, Config& run) {
  run.methods = from.methods;
  run.groups = from.groups;
  run.train.lr = from.train.lr, run.train.head_lr = from.train.head_lr, run.train.weight_decay = from.train.weight_decay;
  run.train.warmup_ratio = from.train.warmup_ratio, run.train.max_grad_norm = from.train.max_grad_norm;
  run.train.gradient_checkpointing = from.train.gradient_checkpointing;
  run.model.quantize = from.model.quantize, run.model.double_quant = from.model.double_quant, run.model.quantize_targets = from.model.quantize_targets;
  // A GGUF base is the same model in another file (llama.cpp's blocks, trained on as they are).
  if (from.model.quantize == "gguf") run.model.path = from.model.path, run.model.tokenizer = from.model.tokenizer;
}

Config build_setup(const std::string& file, const toml::table& t, const Matrix& m, const toml::table* budget, const PluginRegistry& registry) {
  Config run = m.base;
  run.methods.clear(), run.groups.clear();
  if (const toml::node* c = t.get("config")) take_method_side(load_config(config_path(file, *c)), run);
  if (t.get("methods") != nullptr || t.get("groups") != nullptr) {
    if (t.get("config") != nullptr) fail(file, *t.get("config"), "a setup takes its methods from 'config' or from [[setups.methods]], not both");
    read_methods_and_groups(file, t, run);
  }
  read_train_keys(file, budget, run.train);  // the matrix's budget over every setup
  read_train_keys(file, table_at(file, t, "train"), run.train);
  for (const auto& [k, v] : t) {
    const std::string key(k.str());
    static const std::vector<std::string> known = {"name", "config", "seeds", "methods", "groups", "train"};
    if (std::find(known.begin(), known.end(), key) != known.end()) continue;
    const std::string hint = nearest(key, known);
    fail(file, v, "unknown key '" + key + "' in [[setups]]" + (hint.empty() ? "" : " (did you mean '" + hint + "'?)"));
  }
  check_methods(run, registry);
  return run;
}

// A table's 'seeds' (the matrix's, or one setup's), else `fallback`.
std::vector<std::int64_t> read_seeds(const std::string& file, const toml::table& root, const std::vector<std::int64_t>& fallback) {
  const toml::node* n = root.get("seeds");
  if (n == nullptr) return fallback;
  const toml::array* a = n->as_array();
  if (a == nullptr || a->empty()) fail(file, *n, "'seeds' must be a non-empty list of integers");
  std::vector<std::int64_t> seeds;
  for (const auto& e : *a) {
    if (!e.is_integer()) fail(file, e, "'seeds' must be a non-empty list of integers");
    seeds.push_back(e.as_integer()->get());
    if (std::count(seeds.begin(), seeds.end(), seeds.back()) > 1) fail(file, e, "seed " + std::to_string(seeds.back()) + " is listed twice");
  }
  return seeds;
}

}  // namespace

Matrix load_matrix(const std::string& path, const PluginRegistry& registry) {
  Matrix m;
  m.file = path;
  const toml::table root = parse_toml(path);
  const toml::node* base = root.get("base");
  if (base == nullptr) throw ConfigError({path, 1, 1}, "a matrix needs 'base': the config whose model, data, task and budget every setup shares");
  m.base = load_config(config_path(path, *base));
  const toml::table* budget = table_at(path, root, "train");
  read_train_keys(path, budget, m.base.train);  // checked once here, with the file's positions
  m.seeds = read_seeds(path, root, {m.base.train.seed});
  m.out = root.get("out") ? config_path(path, *root.get("out")) : (fs::path("runs") / ("assess-" + fs::path(path).stem().string())).string();
  const toml::node* setups = root.get("setups");
  if (setups == nullptr || !setups->is_array_of_tables() || setups->as_array()->empty())
    throw ConfigError(setups ? source_of(path, *setups) : SourcePos{path, 1, 1}, "a matrix needs [[setups]]: each a name and a config or [[setups.methods]]");
  std::set<std::string> names;
  for (const auto& e : *setups->as_array()) {
    const toml::table& t = *e.as_table();
    const toml::node* name = t.get("name");
    if (name == nullptr || !name->is_string() || name->as_string()->get().empty()) fail(path, t, "a setup needs a 'name'");
    Setup s{name->as_string()->get(), {}, {}, m.seeds};
    if (s.name.find_first_of("/\\") != std::string::npos || s.name[0] == '.') fail(path, *name, "a setup's name is a folder's name: no '/', no leading '.'");
    if (!names.insert(s.name).second) fail(path, *name, "two setups are named '" + s.name + "'");
    try {
      s.seeds = read_seeds(path, t, m.seeds);
      s.config = build_setup(path, t, m, budget, registry);
    } catch (const std::exception& x) {
      s.error = one_line(x);
    }
    m.setups.push_back(std::move(s));
  }
  for (const auto& [k, v] : root) {
    const std::string key(k.str());
    static const std::vector<std::string> known = {"base", "seeds", "out", "train", "setups"};
    if (std::find(known.begin(), known.end(), key) == known.end()) {
      const std::string hint = nearest(key, known);
      fail(path, v, "unknown key '" + key + "'" + (hint.empty() ? "" : " (did you mean '" + hint + "'?)"));
    }
  }
  return m;
}

Config run_config(const Setup& s, std::int64_t seed, const std::string& run_dir) {
  Config c = s.config;
  c.train.seed = seed;
  c.output_dir = fs::absolute(run_dir).string();
  auto absolute = [](std::string& p) {
    if (!p.empty()) p = fs::absolute(p).lexically_normal().string();
  };
  absolute(c.model.path), absolute(c.model.tokenizer), absolute(c.data.path);
  for (auto& m : c.methods) absolute(m.load);
  return c;
}

}  // namespace tessera
