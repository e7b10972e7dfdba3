#include "runtime/config.h"
#include "runtime/config_toml.h"

#include "runtime/groups.h"
#include "runtime/plugin_registry.h"

#include <toml++/toml.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdlib>
#include <filesystem>
#include <regex>
#include <set>
#include <sstream>

namespace tessera {
namespace fs = std::filesystem;

std::string SourcePos::str() const { return file + ":" + std::to_string(line) + ":" + std::to_string(column); }

std::string nearest(const std::string& word, const std::vector<std::string>& candidates) {
  std::string best;
  std::size_t best_d = std::max<std::size_t>(2, word.size() / 3) + 1;
  for (const auto& c : candidates) {
    std::vector<std::size_t> prev(c.size() + 1), cur(c.size() + 1);
    for (std::size_t j = 0; j <= c.size(); ++j) prev[j] = j;
    for (std::size_t i = 1; i <= word.size(); ++i) {
      cur[0] = i;
      for (std::size_t j = 1; j <= c.size(); ++j)
        cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (word[i - 1] == c[j - 1] ? 0 : 1)});
      std::swap(prev, cur);
    }
    if (prev[c.size()] < best_d) { best_d = prev[c.size()]; best = c; }
  }
  return best;
}

namespace {

SourcePos pos_of(const std::string& file, const toml::node& n) {
  const auto& b = n.source().begin;
  return {file, static_cast<int>(b.line), static_cast<int>(b.column)};
}

std::string expand_env(const std::string& s, const SourcePos& pos) {
  static const std::regex var(R"(\$\{([A-Za-z_][A-Za-z0-9_]*)\})");
  std::string out;
  auto begin = std::sregex_iterator(s.begin(), s.end(), var);
  std::size_t last = 0;
  for (auto it = begin; it != std::sregex_iterator(); ++it) {
    out += s.substr(last, static_cast<std::size_t>(it->position()) - last);
    const char* v = std::getenv((*it)[1].str().c_str());
    if (v == nullptr) throw ConfigError(pos, "environment variable " + (*it)[1].str() + " is not set (run scripts/bootstrap and source its env.sh)");
    out += v;
    last = static_cast<std::size_t>(it->position() + it->length());
  }
  return out + s.substr(last);
}

// Reads the keys of one table, and reports the ones nobody asked for.
class Section {
 public:
  Section(const std::string& file, const std::string& name, const toml::table* t) : file_(file), name_(name), t_(t) {}

  template <class T>
  void get(const char* key, T& out) {
    known_.push_back(key);
    if (t_ == nullptr) return;
    const toml::node* n = t_->get(key);
    if (n == nullptr) return;
    if constexpr (std::is_same_v<T, bool>) {
      if (!n->is_boolean()) fail(*n, std::string("'") + key + "' must be true or false");
      out = n->as_boolean()->get();
    } else if constexpr (std::is_same_v<T, std::string>) {
      if (!n->is_string()) fail(*n, std::string("'") + key + "' must be a string");
      out = expand_env(n->as_string()->get(), pos_of(file_, *n));
    } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
      const toml::array* a = n->as_array();
      if (a == nullptr) fail(*n, std::string("'") + key + "' must be a list of strings");
      out.clear();
      for (const auto& e : *a) {
        if (!e.is_string()) fail(e, std::string("'") + key + "' must be a list of strings");
        out.push_back(e.as_string()->get());
      }
    } else if constexpr (std::is_same_v<T, double>) {
      if (n->is_integer()) out = static_cast<double>(n->as_integer()->get());
      else if (n->is_floating_point()) out = n->as_floating_point()->get();
      else fail(*n, std::string("'") + key + "' must be a number");
    } else {
      if (!n->is_integer()) fail(*n, std::string("'") + key + "' must be an integer");
      out = n->as_integer()->get();
    }
  }
  void path(const char* key, std::string& out) {
    get(key, out);
    if (!out.empty() && fs::path(out).is_relative()) out = (fs::path(file_).parent_path() / out).lexically_normal().string();
  }
  void choice(const char* key, std::string& out, const std::vector<std::string>& allowed) {
    get(key, out);
    if (std::find(allowed.begin(), allowed.end(), out) != allowed.end()) return;
    std::string list;
    for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
    fail(*t_->get(key), "'" + std::string(key) + "' = \"" + out + "\" is not one of: " + list);
  }
  void positive(const char* key, std::int64_t& out, std::int64_t min = 1, std::int64_t max = std::numeric_limits<std::int64_t>::max()) {
    get(key, out);
    if (out < min) fail(*t_->get(key), "'" + std::string(key) + "' must be at least " + std::to_string(min));
    if (out > max) fail(*t_->get(key), "'" + std::string(key) + "' must be at most " + std::to_string(max));
  }
  // A finite number in [min, max] (nan and inf are refused: they would reach the weights).
  void number(const char* key, double& out, double min, double max = std::numeric_limits<double>::max()) {
    get(key, out);
    if (std::isfinite(out) && out >= min && out <= max) return;
    std::ostringstream range;
    range << "'" << key << "' must be a finite number " << (max < std::numeric_limits<double>::max() ? "in [" : "≥ ") << min;
    if (max < std::numeric_limits<double>::max()) range << ", " << max << "]";
    fail(*t_->get(key), range.str());
  }
  // A table under this one (its keys are the caller's to check), or null when absent.
  const toml::table* table(const char* key) {
    known_.push_back(key);
    const toml::node* n = t_ ? t_->get(key) : nullptr;
    if (n != nullptr && !n->is_table()) fail(*n, std::string("'") + key + "' must be a table");
    return n ? n->as_table() : nullptr;
  }
  void known(const char* key) { known_.push_back(key); }  // read by the caller
  void finish() {
    if (t_ == nullptr) return;
    for (const auto& [k, v] : *t_) {
      std::string key(k.str());
      if (std::find(known_.begin(), known_.end(), key) != known_.end()) continue;
      std::string hint = nearest(key, known_);
      fail(v, "unknown key '" + key + "' in [" + name_ + "]" + (hint.empty() ? "" : " (did you mean '" + hint + "'?)"));
    }
  }
  [[noreturn]] void fail(const toml::node& n, const std::string& msg) const { throw ConfigError(pos_of(file_, n), msg); }

 private:
  std::string file_, name_;
  const toml::table* t_;
  std::vector<std::string> known_;
};

ParamValue to_param(const std::string& file, const std::string& key, const toml::node& n) {
  if (auto* b = n.as_boolean()) return b->get();
  if (auto* i = n.as_integer()) return static_cast<std::int64_t>(i->get());
  if (auto* f = n.as_floating_point()) return f->get();
  if (auto* s = n.as_string()) return s->get();
  if (auto* a = n.as_array()) {
    std::vector<std::string> out;
    for (const auto& e : *a) {
      if (!e.is_string()) throw ConfigError(pos_of(file, e), "'" + key + "' must be a list of strings");
      out.push_back(e.as_string()->get());
    }
    return out;
  }
  if (auto* t = n.as_table()) {
    NumberTable out;
    for (const auto& [k, v] : *t) {
      if (v.is_integer()) out[std::string(k.str())] = static_cast<double>(v.as_integer()->get());
      else if (v.is_floating_point()) out[std::string(k.str())] = v.as_floating_point()->get();
      else throw ConfigError(pos_of(file, v), "'" + key + "." + std::string(k.str()) + "' must be a number");
    }
    return out;
  }
  throw ConfigError(pos_of(file, n), "'" + key + "' has an unsupported type");
}

MethodConfig read_method(const std::string& file, const toml::table& t, std::size_t index) {
  MethodConfig m;
  m.pos = pos_of(file, t);
  m.params_pos = m.pos;
  const std::vector<std::string> known = {"plugin", "name", "targets", "params", "load"};
  for (const auto& [k, v] : t) {
    std::string key(k.str());
    if (key == "load") {
      if (!v.is_string()) throw ConfigError(pos_of(file, v), "'load' must be a string: an adapter folder");
      m.load_pos = pos_of(file, v);
      m.load = expand_env(v.as_string()->get(), m.load_pos);
      if (!m.load.empty() && fs::path(m.load).is_relative()) m.load = (fs::path(file).parent_path() / m.load).lexically_normal().string();
    } else if (key == "plugin" || key == "name") {
      if (!v.is_string()) throw ConfigError(pos_of(file, v), "'" + key + "' must be a string");
      (key == "plugin" ? m.plugin : m.name) = v.as_string()->get();
    } else if (key == "targets") {
      auto value = to_param(file, key, v);
      if (!std::holds_alternative<std::vector<std::string>>(value)) throw ConfigError(pos_of(file, v), "'targets' must be a list of strings");
      m.targets = std::get<std::vector<std::string>>(value);
    } else if (key == "params") {
      if (!v.is_table()) throw ConfigError(pos_of(file, v), "'params' must be a table");
      m.params_pos = pos_of(file, v);
      for (const auto& [pk, pv] : *v.as_table()) {
        std::string name(pk.str());
        m.params[name] = to_param(file, name, pv);
        m.param_pos[name] = pos_of(file, pv);
      }
    } else {
      std::string hint = nearest(key, known);
      throw ConfigError(pos_of(file, v), "unknown key '" + key + "' in [[methods]] (parameters go in [methods.params])" +
                                             (hint.empty() ? "" : "; did you mean '" + hint + "'?"));
    }
  }
  if (m.plugin.empty()) throw ConfigError(m.pos, "method " + std::to_string(index + 1) + " has no 'plugin' id");
  if (m.name.empty()) m.name = m.plugin;
  return m;
}

}  // namespace

namespace {

// The table `name` of the file's root, or null when absent; anything else is refused.
const toml::table* section_table(const std::string& path, const toml::table& root, const char* name) {
  const toml::node* n = root.get(name);
  if (n != nullptr && !n->is_table()) throw ConfigError(pos_of(path, *n), std::string("[") + name + "] must be a table");
  return n ? n->as_table() : nullptr;
}

void read_model(const std::string& path, const toml::table* t, ModelConfig& m) {
  Section s(path, "model", t);
  s.path("path", m.path);
  s.path("tokenizer", m.tokenizer);
  s.choice("dtype", m.dtype, {"f32", "bf16"});
  s.get("device", m.device);
  const std::vector<std::string> formats = {"none", "nf4", "fp4", "int8", "gguf"};
  s.choice("quantize", m.quantize, formats);
  s.get("double_quant", m.double_quant);
  bool four_bit = m.quantize == "nf4" || m.quantize == "fp4", gguf_asked = m.quantize == "gguf";
  if (const toml::table* targets = s.table("quantize_targets")) {
    for (const auto& [k, v] : *targets) {
      const std::string f = v.is_string() ? v.as_string()->get() : "";
      if (std::find(formats.begin(), formats.end(), f) == formats.end())
        s.fail(v, "quantize_targets: '" + std::string(k.str()) + "' must name a storage format: none, nf4, fp4, int8 or gguf" +
                      (v.is_table() ? " (a pattern with dots is one key only in quotes: \"mlp.down\" = \"int8\")" : ""));
      m.quantize_targets.emplace_back(std::string(k.str()), f);
      four_bit = four_bit || f == "nf4" || f == "fp4", gguf_asked = gguf_asked || f == "gguf";
    }
  }
  s.finish();
  // "cpu", "cuda" or "cuda:N"; whether this machine has one is known only when a run starts.
  const auto& d = m.device;
  const bool index_ok = d.size() > 5 && d.find_first_not_of("0123456789", 5) == std::string::npos;
  if (d != "cpu" && d != "cuda" && !(d.rfind("cuda:", 0) == 0 && index_ok))
    s.fail(*t->get("device"), "'device' must be \"cpu\", \"cuda\" or \"cuda:N\", not \"" + d + "\"");
  if (m.double_quant && !four_bit)
    s.fail(*t->get("double_quant"), "'double_quant' quantizes the block scales of a 4-bit base: set quantize = \"nf4\" or \"fp4\" too");
  if (m.path.empty()) throw ConfigError({path, 1, 1}, "[model] needs 'path'");
  const bool gguf = m.path.size() > 5 && m.path.compare(m.path.size() - 5, 5, ".gguf") == 0;
  if (gguf_asked && !gguf)
    s.fail(*t->get(m.quantize == "gguf" ? "quantize" : "quantize_targets"), "\"gguf\" storage keeps a GGUF file's own blocks: 'path' must name a .gguf file");
}

void read_data(const std::string& path, const toml::table* t, DataConfig& d) {
  Section s(path, "data", t);
  s.path("path", d.path);
  s.choice("format", d.format, {"auto", "csv", "jsonl"});
  s.get("text_column", d.text_column);
  s.get("label_column", d.label_column);
  s.get("prompt_column", d.prompt_column);
  s.get("target_column", d.target_column);
  s.get("tag_columns", d.tag_columns);
  s.get("test_fraction", d.test_fraction);
  s.get("seed", d.seed);
  s.positive("max_length", d.max_length, 2);
  s.positive("limit", d.limit, 0);
  s.choice("padding", d.padding, {"longest", "max_length"});
  s.finish();
  if (d.path.empty()) throw ConfigError({path, 1, 1}, "[data] needs 'path'");
  if (!(d.test_fraction > 0 && d.test_fraction < 1)) s.fail(*t->get("test_fraction"), "'test_fraction' must lie strictly between 0 and 1");
}

void read_task(const std::string& path, const toml::table* t, Config& c) {
  Section s(path, "task", t);
  s.choice("kind", c.task.kind, {"sequence-classification", "token-classification", "causal-lm", "seq2seq", "distillation"});
  s.positive("num_labels", c.task.num_labels, 0);
  s.choice("pooling", c.task.pooling, {"mean", "cls"});
  s.finish();
  if (c.task.kind == "seq2seq" && c.data.target_column.empty())
    s.fail(*t->get("kind"), "a seq2seq task needs [data] target_column (text_column is the source)");
}

void read_train(const std::string& path, const toml::table* t, TrainConfig& c) {
  Section s(path, "train", t);
  s.positive("epochs", c.epochs);
  s.positive("batch_size", c.batch_size);
  s.positive("eval_batch_size", c.eval_batch_size);
  s.number("lr", c.lr, 0);
  s.number("head_lr", c.head_lr, 0);  // 0: lr
  s.number("weight_decay", c.weight_decay, 0);
  s.number("warmup_ratio", c.warmup_ratio, 0, 1);
  s.number("max_grad_norm", c.max_grad_norm, 0);  // 0: no clipping
  s.positive("threads", c.threads, 0, 4096);      // 0: every processor
  s.get("seed", c.seed);
  s.positive("max_steps", c.max_steps, 0);
  s.get("group_by_length", c.group_by_length);
  s.get("shuffle", c.shuffle);
  s.get("gradient_checkpointing", c.gradient_checkpointing);
  s.positive("checkpoint_every", c.checkpoint_every, 0);
  s.number("bucket_cap_mb", c.bucket_cap_mb, 1.0 / 1024);
  s.positive("micro_batches", c.micro_batches);
  s.get("ordered_reduction", c.ordered_reduction);
  if (c.micro_batches > c.batch_size) {
    // Read twice over (a matrix's budget, then a setup's), the key that broke it is the one here.
    const toml::node* at = t->get("micro_batches") != nullptr ? t->get("micro_batches") : t->get("batch_size");
    s.fail(*at, "'micro_batches' (" + std::to_string(c.micro_batches) + ") must be at most batch_size (" + std::to_string(c.batch_size) +
                    "): each piece of a batch needs an example");
  }
  s.finish();
}

void read_methods(const std::string& path, const toml::node* n, std::vector<MethodConfig>& out) {
  const toml::array* arr = n->as_array();
  // An empty list is a run without methods (the frozen baseline writes `methods = []`).
  if (arr == nullptr || (!arr->empty() && !arr->is_array_of_tables()))
    throw ConfigError(pos_of(path, *n), "'methods' must be an array of tables ([[methods]])");
  std::set<std::string> names;
  for (std::size_t i = 0; i < arr->size(); ++i) {
    MethodConfig m = read_method(path, *arr->get(i)->as_table(), i);
    if (!names.insert(m.name).second) throw ConfigError(m.pos, "two methods are named '" + m.name + "'; give each a unique 'name'");
    out.push_back(std::move(m));
  }
}

GroupConfig read_group(const std::string& file, const toml::table& t) {
  GroupConfig g;
  g.pos = pos_of(file, t);
  Section s(file, "groups", &t);
  s.get("name", g.name);
  s.get("kind", g.kind);
  s.get("members", g.members);
  s.get("normalize", g.normalize);
  s.get("tag", g.tag);
  if (const toml::node* w = t.get("weights")) {
    const toml::array* a = w->as_array();
    if (a == nullptr) s.fail(*w, "'weights' must be a list of numbers");
    for (const auto& e : *a) {
      if (!e.is_number()) s.fail(e, "'weights' must be a list of numbers");
      g.weights.push_back(e.is_integer() ? static_cast<double>(e.as_integer()->get()) : e.as_floating_point()->get());
    }
  }
  s.known("weights");
  s.finish();
  for (const auto& [k, v] : t) g.key_pos[std::string(k.str())] = pos_of(file, v);
  if (const toml::array* a = t.get("members") ? t.get("members")->as_array() : nullptr)
    for (const auto& e : *a) g.member_pos.push_back(pos_of(file, e));
  if (g.name.empty()) throw ConfigError(g.pos, "a group needs a 'name'");
  return g;
}

void read_groups(const std::string& path, const toml::node* n, std::vector<GroupConfig>& out) {
  const toml::array* arr = n->as_array();
  if (arr == nullptr || (!arr->empty() && !arr->is_array_of_tables()))
    throw ConfigError(pos_of(path, *n), "'groups' must be an array of tables ([[groups]])");
  for (const auto& e : *arr) out.push_back(read_group(path, *e.as_table()));
}

}  // namespace

SourcePos source_of(const std::string& file, const toml::node& n) { return pos_of(file, n); }

toml::table parse_toml(const std::string& file) {
  try {
    return toml::parse_file(file);
  } catch (const toml::parse_error& e) {
    const auto& b = e.source().begin;
    throw ConfigError({file, static_cast<int>(b.line), static_cast<int>(b.column)}, std::string(e.description()));
  }
}

void read_methods_and_groups(const std::string& file, const toml::table& t, Config& c) {
  if (const toml::node* n = t.get("methods")) read_methods(file, n, c.methods);
  if (const toml::node* n = t.get("groups")) read_groups(file, n, c.groups);
}

void read_train_keys(const std::string& file, const toml::table* t, TrainConfig& c) { read_train(file, t, c); }

std::string config_path(const std::string& file, const toml::node& n) {
  if (!n.is_string()) throw ConfigError(pos_of(file, n), "a path must be a string");
  const std::string s = expand_env(n.as_string()->get(), pos_of(file, n));
  return fs::path(s).is_relative() ? (fs::path(file).parent_path() / s).lexically_normal().string() : s;
}

Config load_config(const std::string& path) {
  Config c;
  c.file = path;
  const toml::table root = parse_toml(path);
  read_model(path, section_table(path, root, "model"), c.model);
  read_data(path, section_table(path, root, "data"), c.data);
  read_task(path, section_table(path, root, "task"), c);
  read_train(path, section_table(path, root, "train"), c.train);
  {
    Section s(path, "output", section_table(path, root, "output"));
    s.path("dir", c.output_dir);
    s.finish();
  }
  read_methods_and_groups(path, root, c);
  const std::vector<std::string> sections = {"model", "data", "task", "train", "output", "methods", "groups"};
  for (const auto& [k, v] : root) {
    std::string key(k.str());
    if (std::find(sections.begin(), sections.end(), key) != sections.end()) continue;
    std::string hint = nearest(key, sections);
    throw ConfigError(pos_of(path, v), "unknown section '" + key + "'" + (hint.empty() ? "" : " (did you mean '" + hint + "'?)"));
  }
  return c;
}

void check_methods(Config& config, const PluginRegistry& registry) {
  for (auto& m : config.methods) {
    const PluginInfo* info = registry.find(m.plugin);
    if (info == nullptr) {
      std::vector<std::string> ids;
      for (const auto& p : registry.plugins()) ids.push_back(p.id);
      std::string hint = nearest(m.plugin, ids);
      throw ConfigError(m.pos, "no plugin with id '" + m.plugin + "'" + (hint.empty() ? "" : " (did you mean '" + hint + "'?)") +
                                   "; `tessera plugins` lists the plugins found");
    }
    std::vector<std::string> keys;
    for (const auto& s : info->params) keys.push_back(s.name);
    m.defaults = apply_schema(info->params, {}).values();  // typed as checked values are (an Int default of a Float: a double)
    for (const auto& [k, v] : m.params) {
      auto spec = std::find_if(info->params.begin(), info->params.end(), [&](const ParamSpec& s) { return s.name == k; });
      if (spec == info->params.end()) {
        std::string hint = nearest(k, keys);
        throw ConfigError(m.param_pos.at(k), "plugin '" + m.plugin + "' has no parameter '" + k + "'" +
                                                 (hint.empty() ? "" : " (did you mean '" + hint + "'?)"));
      }
    }
    auto at = [&](const std::string& key) { return m.param_pos.count(key) ? m.param_pos.at(key) : m.params_pos; };
    try {
      m.checked = apply_schema(info->params, m.params);
      auto probe = registry.create(m.plugin, m.name);
      probe->call("validate", [&](Method& method) { method.validate(m.checked); });
    } catch (const ParamError& e) {
      throw ConfigError(at(e.key()), "method '" + m.name + "' (plugin '" + m.plugin + "'): " + e.what());
    }
  }  check_groups(config);
}

std::string resolved_toml(const Config& c) {
  toml::table root;
  root.insert("model", toml::table{{"path", c.model.path}, {"dtype", c.model.dtype}, {"device", c.model.device},
                                   {"quantize", c.model.quantize}, {"double_quant", c.model.double_quant}});
  if (!c.model.tokenizer.empty()) root["model"].as_table()->insert("tokenizer", c.model.tokenizer);
  if (!c.model.quantize_targets.empty()) {
    toml::table targets;
    for (const auto& [pattern, format] : c.model.quantize_targets) targets.insert(pattern, format);
    root["model"].as_table()->insert("quantize_targets", std::move(targets));
  }
  root.insert("data", toml::table{{"path", c.data.path}, {"format", c.data.format}, {"text_column", c.data.text_column},
                                  {"label_column", c.data.label_column}, {"prompt_column", c.data.prompt_column}, {"target_column", c.data.target_column},
                                  {"test_fraction", c.data.test_fraction},
                                  {"seed", c.data.seed}, {"max_length", c.data.max_length}, {"limit", c.data.limit},
                                  {"padding", c.data.padding}});
  toml::array tag_columns;
  for (const auto& t : c.data.tag_columns) tag_columns.push_back(t);
  root["data"].as_table()->insert("tag_columns", tag_columns);
  root.insert("task", toml::table{{"kind", c.task.kind}, {"num_labels", c.task.num_labels}, {"pooling", c.task.pooling}});
  root.insert("train", toml::table{{"epochs", c.train.epochs}, {"batch_size", c.train.batch_size},
                                   {"eval_batch_size", c.train.eval_batch_size}, {"lr", c.train.lr}, {"head_lr", c.train.head_lr},
                                   {"weight_decay", c.train.weight_decay}, {"warmup_ratio", c.train.warmup_ratio},
                                   {"max_grad_norm", c.train.max_grad_norm}, {"threads", c.train.threads},
                                   {"seed", c.train.seed}, {"max_steps", c.train.max_steps},
                                   {"group_by_length", c.train.group_by_length},
                                   {"shuffle", c.train.shuffle}, {"gradient_checkpointing", c.train.gradient_checkpointing},
                                   {"checkpoint_every", c.train.checkpoint_every}, {"bucket_cap_mb", c.train.bucket_cap_mb},
                                   {"micro_batches", c.train.micro_batches}, {"ordered_reduction", c.train.ordered_reduction}});
  root.insert("output", toml::table{{"dir", c.output_dir}});
  toml::array methods;
  for (const auto& m : c.methods) {
    toml::array targets;
    for (const auto& t : m.targets) targets.push_back(t);
    toml::table params;
    for (const auto& [k, v] : (m.checked.values().empty() ? m.params : m.checked.values())) {
      std::visit([&](const auto& x) {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, std::vector<std::string>>) {
          toml::array a;
          for (const auto& s : x) a.push_back(s);
          params.insert(k, a);
        } else if constexpr (std::is_same_v<T, NumberTable>) {
          toml::table t;
          for (const auto& [tk, tv] : x) t.insert(tk, tv);
          params.insert(k, t);
        } else {
          params.insert(k, x);
        }
      }, v);
    }
    methods.push_back(toml::table{{"plugin", m.plugin}, {"name", m.name}, {"targets", targets}, {"params", params}});
    if (!m.load.empty()) methods.back().as_table()->insert("load", m.load);
  }
  root.insert("methods", methods);
  if (!c.groups.empty()) {
    toml::array groups;
    for (const auto& g : c.groups) {
      toml::array members, weights;
      for (const auto& m : g.members) members.push_back(m);
      for (double w : g.weights) weights.push_back(w);
      toml::table t{{"name", g.name}, {"kind", g.kind}, {"members", members}};
      if (!g.weights.empty()) t.insert("weights", weights);
      if (g.kind == "average") t.insert("normalize", g.normalize);
      if (!g.tag.empty()) t.insert("tag", g.tag);
      groups.push_back(std::move(t));
    }
    root.insert("groups", groups);
  }
  std::ostringstream out;
  out << toml::toml_formatter(root) << "\n";
  return out.str();
}

namespace {

// Every leaf of a TOML tree as "a.b[2].c" -> its value written as TOML.
void flatten(const toml::node& n, const std::string& at, std::map<std::string, std::string>& out) {
  if (const auto* t = n.as_table()) {
    for (const auto& [k, v] : *t) flatten(v, at.empty() ? std::string(k.str()) : at + "." + std::string(k.str()), out);
  } else if (const auto* a = n.as_array(); a != nullptr && !a->empty() && a->front().is_table()) {
    for (std::size_t i = 0; i < a->size(); ++i) flatten(*a->get(i), at + "[" + std::to_string(i) + "]", out);
  } else {
    std::ostringstream v;
    n.visit([&](const auto& x) { v << toml::toml_formatter(x); });
    out[at] = v.str();
  }
}

}  // namespace

namespace {

// The defaults a key added since `before` is compared with: the host's, and for each of
// `now`'s methods (at its position) its plugin schema's parameters'.
std::string defaults_toml(const Config& now) {
  Config d;
  for (const auto& m : now.methods) {
    MethodConfig x;
    x.plugin = m.plugin, x.name = m.name, x.params = m.defaults;
    d.methods.push_back(std::move(x));
  }
  return resolved_toml(d);
}

}  // namespace

std::vector<std::string> config_differences(const std::string& before, const Config& now) {
  std::map<std::string, std::string> a, b;
  flatten(toml::parse(before), "", a);
  flatten(toml::parse(resolved_toml(now)), "", b);
  std::vector<std::string> out;
  for (const auto& [k, v] : a) {
    const auto it = b.find(k);
    if (it == b.end()) out.push_back(k + ": " + v + " → (absent)");
    else if (it->second != v) out.push_back(k + ": " + v + " → " + it->second);
  }
  // A key the older text lacks at its default value was added since, and changes nothing.
  std::map<std::string, std::string> defaults;
  flatten(toml::parse(defaults_toml(now)), "", defaults);
  // A method's parameter only where `before` has the same plugin at that position: a method
  // added since is a change, its parameters at their defaults or not.
  auto same_plugin = [&](const std::string& k) {
    if (k.rfind("methods[", 0) != 0) return true;
    const auto plugin = k.substr(0, k.find(']') + 1) + ".plugin";
    return k.find("].params.") != std::string::npos && a.count(plugin) && b.count(plugin) && a.at(plugin) == b.at(plugin);
  };
  for (const auto& [k, v] : b) {
    const auto d = defaults.find(k);
    if (!a.count(k) && (d == defaults.end() || d->second != v || !same_plugin(k))) out.push_back(k + ": (absent) → " + v);
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace tessera
