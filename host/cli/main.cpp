// The `tessera` binary: `plugins`, `train`, `eval`, `generate`. Any error ends in one
// line on stderr and a non-zero exit; nothing a plugin or a file does aborts the host.
#include "cli/sites.h"
#include "model/decoder.h"
#include "model/generate.h"
#include "model/json_file.h"
#include "model/safetensors.h"
#include "model/tokenizer.h"
#include "runtime/peft_import.h"
#include "runtime/config.h"
#include "runtime/plugin_registry.h"
#include "train/progress.h"
#include "train/run_dir.h"
#include "train/session.h"
#include "train/trainer.h"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <spdlog/sinks/stdout_color_sinks.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

namespace fs = std::filesystem;
using namespace tessera;

namespace {

std::string number(double x) {
  std::ostringstream o;
  o << x;
  return o.str();
}

void print_plugins(const PluginRegistry& reg) {
  std::cout << reg.plugins().size() << " plugin(s) found\n";
  for (const auto& p : reg.plugins()) {
    std::cout << "\n" << p.id << " " << p.version << "  [" << p.family << ", SDK " << TESSERA_SDK_ABI_MAJOR << "." << p.abi_minor << "]  " << p.summary << "\n"
              << "  paper: " << p.paper << "\n  file:  " << p.path << "\n  parameters:\n";
    for (const auto& s : p.params) {
      std::cout << "    " << s.name << " (" << to_string(s.type) << ", default " << format_value(s.default_value);
      if (s.min || s.max) std::cout << ", range [" << (s.min ? number(*s.min) : "-inf") << ", " << (s.max ? number(*s.max) : "inf") << "]";
      if (!s.choices.empty()) {
        std::cout << ", one of";
        for (const auto& c : s.choices) std::cout << " " << c;
      }
      std::cout << ")\n        " << s.doc << "\n";
    }
  }
  if (!reg.refused().empty()) {
    std::cout << "\n" << reg.refused().size() << " refused:\n";
    for (const auto& r : reg.refused()) std::cout << "  " << r.path << ": " << r.reason << "\n";
  }
}

std::string report(const Config& c, const TrainResult& r, const std::vector<std::string>& labels) {
  std::ostringstream o;
  o << "# Tessera run\n\n"
    << "- config: `" << c.file << "`\n- model: `" << c.model.path << "` (" << c.model.dtype << ", " << c.model.device << ")\n"
    << "- data: `" << c.data.path << "`, labels:";
  for (const auto& l : labels) o << " `" << l << "`";
  o << "\n- methods:";
  if (c.methods.empty()) o << " none (task head only)";
  for (const auto& m : c.methods) o << " `" << m.name << "` (" << m.plugin << ")";
  o << "\n\n| metric | value |\n|---|---|\n";
  if (c.task.kind == "seq2seq") o << "| test BLEU | " << r.test.bleu << " |\n";
  if (c.task.kind != "sequence-classification")
    o << "| test perplexity | " << r.test.perplexity << " |\n| next-token accuracy | " << r.test.accuracy << " |\n"
      << "| test loss (per token) | " << r.test.loss << " |\n| test tokens | " << r.test.tokens << " |\n";
  else
    o << "| test accuracy | " << r.test.accuracy << " |\n| test loss | " << r.test.loss << " |\n";
  o
    << "| trainable parameters | " << r.trainable << " (" << 100.0 * static_cast<double>(r.trainable) / static_cast<double>(r.base) << "% of " << r.base << ") |\n"
    << "| optimizer steps | " << r.steps << " |\n| wall time | " << format_duration(r.seconds) << " |\n"
    << "| examples/s (training) | " << r.examples_per_s << " |\n";
  return o.str();
}

// A method instance attached to `model` with the given state: from a PEFT adapter
// directory, or from a run's config and adapter directory.
std::unique_ptr<MethodInstance> attach_with_state(const PluginRegistry& reg, const MethodConfig& mc, ModelView& model,
                                                  const std::string& state_file) {
  auto inst = reg.create(mc.plugin, mc.name);
  inst->attach(model, mc.targets, mc.checked);
  auto file = SafetensorsFile::open(state_file);
  NamedTensors state;
  for (const auto& n : file->names()) state[n] = file->tensor(n);
  inst->call("load_state", [&](Method& m) { m.load_state(state); });
  return inst;
}

// A run's method whose plugin is not found now: said with where it came from at training
// time (adapter/tessera.json), so the fix is plain — a plugin outside the directory beside
// the binary needs --plugin-dir (or TESSERA_PLUGIN_PATH) again.
void refuse_missing_plugins(const std::string& run, const Config& config, const PluginRegistry& registry) {
  const fs::path manifest = fs::path(run) / "adapter" / "tessera.json";
  for (const auto& m : config.methods) {
    if (registry.find(m.plugin) != nullptr) continue;
    std::string was, dir = "DIR";
    if (fs::exists(manifest)) try {
        const auto j = read_json_file(manifest.string());
        for (const auto& e : j.value("methods", nlohmann::json::array()))
          if (e.is_object() && e.value("name", "") == m.name && e.contains("plugin_file")) {
            const std::string file = e.value("plugin_file", std::string());
            was = " (at training time version " + e.value("plugin_version", std::string("?")) + " from " + file + ")";
            dir = fs::path(file).parent_path().string();
          }
      } catch (...) {
        rethrow_naming(manifest.string());
      }
    throw std::runtime_error(run + ": method '" + m.name + "' needs plugin '" + m.plugin + "'" + was +
                             ", which is not among the plugins found: pass --plugin-dir " + dir + " (before `eval`), or set TESSERA_PLUGIN_PATH");
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Tessera: parameter-efficient fine-tuning of pretrained transformers"};
  app.require_subcommand(1);
  std::string log_level = "info";
  std::vector<std::string> plugin_dirs;
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, off")->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
  app.add_option("--plugin-dir", plugin_dirs, "extra plugin directory (repeatable; searched after the one beside the binary)");
  bool allow_insecure_plugins = false;
  app.add_flag("--allow-insecure-plugins", allow_insecure_plugins,
               "load plugin files that users other than their owner and root can write to (refused by default)");

  auto* plugins_cmd = app.add_subcommand("plugins", "list the plugins found and the ones refused");
  std::string sites_model, sites_pattern;
  auto* sites_cmd = app.add_subcommand("sites", "list a model's sites: what method targets name, with shapes and the interventions each accepts");
  sites_cmd->add_option("model", sites_model, "Hugging Face model directory")->required()->check(CLI::ExistingDirectory);
  sites_cmd->add_option("pattern", sites_pattern, "only sites matching this target (\"attn.q\", \"query\", a glob, \"re:<regex>\")");
  std::string config_path, run_dir, eval_dir;
  std::int64_t threads = -1;
  auto* train_cmd = app.add_subcommand("train", "fine-tune as a config file says");
  train_cmd->add_option("config", config_path, "TOML config")->required();
  train_cmd->add_option("--run-dir", run_dir, "run directory (default: [output] dir)");
  train_cmd->add_option("--threads", threads, "override [train] threads")->check(CLI::Range(0, 4096));
  bool overwrite = false;
  train_cmd->add_flag("--overwrite", overwrite, "replace an earlier run in the run directory (refused without it)");
  auto* eval_cmd = app.add_subcommand("eval", "reload base + adapter of a run and evaluate its test split");
  eval_cmd->add_option("run_dir", eval_dir, "run directory written by `tessera train`")->required()->check(CLI::ExistingDirectory);
  eval_cmd->add_option("--threads", threads, "override [train] threads")->check(CLI::Range(0, 4096));

  auto* gen_cmd = app.add_subcommand("generate", "continue a prompt (decoder) or answer a source (T5): greedy, or sampled with --sample");
  std::string gen_model, gen_run, gen_peft, prompt;
  GenerateOptions gen;
  gen_cmd->add_option("prompt", prompt, "text to continue")->required();
  gen_cmd->add_option("--model", gen_model, "Hugging Face model directory")->check(CLI::ExistingDirectory);
  gen_cmd->add_option("--run", gen_run, "run directory of a causal-lm `tessera train`: its model and adapter")->check(CLI::ExistingDirectory);
  gen_cmd->add_option("--peft", gen_peft, "Hugging Face PEFT adapter directory to apply")->check(CLI::ExistingDirectory);
  gen_cmd->add_option("--max-new-tokens", gen.max_new_tokens, "tokens to generate (default 32)")->check(CLI::PositiveNumber);
  gen_cmd->add_flag("--sample", gen.sample, "sample instead of taking the most likely token");
  gen_cmd->add_option("--temperature", gen.temperature, "sampling temperature (default 1)")->check(CLI::PositiveNumber);
  gen_cmd->add_option("--top-k", gen.top_k, "keep the k most likely tokens (0 = all)")->check(CLI::NonNegativeNumber);
  gen_cmd->add_option("--top-p", gen.top_p, "keep the most likely tokens up to this mass (1 = all)")->check(CLI::Range(0.0, 1.0));
  gen_cmd->add_option("--seed", gen.seed, "sampling seed");
  gen_cmd->add_option("--threads", threads, "intra-op threads (default: every processor)")->check(CLI::Range(0, 4096));
  bool merge = false;
  gen_cmd->add_flag("--merge", merge,
                    "fold the adapters into the weights before decoding: no per-token cost for them (the folded weights become "
                    "private copies of the mapped checkpoint's pages)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  auto logger = spdlog::stderr_color_mt("tessera");
  spdlog::set_default_logger(logger);
  spdlog::set_level(spdlog::level::from_str(log_level));
  spdlog::set_pattern("[%H:%M:%S] [%^%l%$] %v");

  try {
    PluginRegistry registry;
    registry.allow_insecure(allow_insecure_plugins);
    registry.scan(PluginRegistry::search_path(fs::path("/proc/self/exe").string(), plugin_dirs));
    if (*plugins_cmd) {
      print_plugins(registry);
      return 0;
    }
    if (*sites_cmd) {
      if (print_sites(sites_model, sites_pattern, std::cout) == 0) throw std::runtime_error("no site of " + sites_model + " matches '" + sites_pattern + "'");
      return 0;
    }
    if (*gen_cmd) {
      set_threads(threads >= 0 ? threads : 0);
      std::vector<MethodConfig> methods;
      std::vector<std::string> states;
      std::string dtype = "f32", device = "cpu";
      if (!gen_run.empty()) {
        Config rc = load_config((fs::path(gen_run) / "config.toml").string());
        check_methods(rc, registry);
        if (rc.task.kind == "sequence-classification") throw std::runtime_error(gen_run + ": a sequence-classification run does not generate text");
        gen_model = rc.model.path, dtype = rc.model.dtype, device = rc.model.device;
        for (const auto& m : rc.methods) methods.push_back(m), states.push_back((fs::path(gen_run) / "adapter" / m.name / "adapter_model.safetensors").string());
      }
      if (!gen_peft.empty()) {
        methods.push_back(method_from_peft_dir(gen_peft, registry, "peft"));
        states.push_back((fs::path(gen_peft) / "adapter_model.safetensors").string());
      }
      if (gen_model.empty()) throw std::runtime_error("generate needs --model or --run");
      const auto opts = options_for(ModelConfig{gen_model, dtype, device});
      auto tokenizer = load_tokenizer(gen_model);
      // An encoder-decoder continues from its encoded source; a decoder from its prompt.
      std::unique_ptr<T5Model> t5;
      std::unique_ptr<DecoderModel> decoder;
      SiteModel* model = nullptr;
      if (read_json_file((fs::path(gen_model) / "config.json").string()).value("model_type", "") == "t5") {
        t5 = T5Model::load(gen_model, opts), model = t5.get();
        gen.eos_token_ids = {t5->config().eos_token_id};
        gen.pad_token_id = t5->config().pad_token_id;
      } else {
        decoder = DecoderModel::load(gen_model, opts), model = decoder.get();
        gen.eos_token_ids = decoder->config().eos_token_ids;
        gen.pad_token_id = std::max<std::int64_t>(0, decoder->config().pad_token_id);
      }
      std::vector<std::unique_ptr<MethodInstance>> attached;
      for (std::size_t i = 0; i < methods.size(); ++i) attached.push_back(attach_with_state(registry, methods[i], *model, states[i]));
      // Folded, an adapter costs nothing per token (LoRA's branches were 15–20% of a SmolLM2
      // decoding step); refused, before any token, for a method that cannot fold.
      for (std::size_t i = 0; merge && i < attached.size(); ++i)
        if (!attached[i]->call("mergeable", [](Method& m) { return m.mergeable(); }))
          throw std::runtime_error("--merge: method '" + methods[i].name + "' (" + methods[i].plugin + ") cannot be folded into the weights");
      for (std::size_t i = 0; merge && i < attached.size(); ++i) attached[i]->call("merge", [](Method& m) { m.merge(); });
      auto prompt_ids = tokenizer->encode(prompt);
      // Nothing to continue (an empty prompt, a tokenizer that adds no BOS): start from the
      // config's bos_token_id, as transformers.generate does without input_ids.
      if (prompt_ids.empty() && decoder && decoder->config().bos_token_id >= 0) prompt_ids = {decoder->config().bos_token_id};
      auto out = t5 ? generate(*t5, {prompt_ids}, gen) : generate(*decoder, {prompt_ids}, gen);
      std::cout << (t5 ? "" : prompt) << tokenizer->decode(out[0]) << "\n";
      for (auto& m : attached) m->detach(*model);
      return 0;
    }
    if (*eval_cmd) {
      config_path = (fs::path(eval_dir) / "config.toml").string();
      if (!fs::exists(config_path) || !fs::is_directory(fs::path(eval_dir) / "adapter"))
        throw std::runtime_error(eval_dir + " is not a run directory of `tessera train` (it needs config.toml and adapter/)");
    }
    Config config = load_config(config_path);
    if (*eval_cmd) refuse_missing_plugins(eval_dir, config, registry);
    check_methods(config, registry);
    if (threads >= 0) config.train.threads = threads;
    set_threads(config.train.threads);

    if (*train_cmd) {
      if (run_dir.empty()) run_dir = config.output_dir;
      const auto earlier = earlier_run_entries(run_dir);
      if (!earlier.empty() && !overwrite) {
        std::string list;
        for (const auto& e : earlier) list += (list.empty() ? "" : ", ") + e;
        throw std::runtime_error(run_dir + " holds an earlier run (" + list + "): pass --overwrite to replace it, or --run-dir to write this one elsewhere");
      }
      config.output_dir = run_dir;
      // Model, data and methods load before anything of an earlier run is touched: a
      // mistake in this config leaves that run whole.
      Session session(config, registry);
      if (!earlier.empty()) {
        spdlog::info("replacing the earlier run in {}", run_dir);
        clear_earlier_run(run_dir);
      }
      fs::create_directories(run_dir);
      write_file_atomic((fs::path(run_dir) / "config.toml").string(), resolved_toml(config));
      TrainResult r = train(session, run_dir);
      nlohmann::json result = {{"test_accuracy", r.test.accuracy}, {"test_loss", r.test.loss}, {"test_examples", r.test.examples},
                               {"task", config.task.kind},
                               {"trainable_parameters", r.trainable}, {"base_parameters", r.base}, {"steps", r.steps},
                               {"seconds", r.seconds}, {"examples_per_s", r.examples_per_s}};
      if (session.causal() || session.seq2seq()) result["test_perplexity"] = r.test.perplexity, result["test_tokens"] = r.test.tokens;
      if (session.seq2seq()) result["test_bleu"] = r.test.bleu;
      write_file_atomic((fs::path(run_dir) / "result.json").string(), result.dump(2) + "\n");
      write_file_atomic((fs::path(run_dir) / "report.md").string(), report(config, r, session.data().label_names));
      if (session.seq2seq()) std::printf("test BLEU %.2f; ", r.test.bleu);
      if (session.causal() || session.seq2seq()) std::printf("test perplexity %.3f (next-token accuracy %.4f) on %lld tokens; ", r.test.perplexity, r.test.accuracy, static_cast<long long>(r.test.tokens));
      std::printf("test accuracy %.4f on %lld examples; trainable %.3f%% of the base; %s wall; run directory %s\n", r.test.accuracy,
                  static_cast<long long>(r.test.examples), 100.0 * static_cast<double>(r.trainable) / static_cast<double>(r.base),
                  format_duration(r.seconds).c_str(), run_dir.c_str());
      return 0;
    }
    Session session(config, registry);
    session.load_adapter((fs::path(eval_dir) / "adapter").string());
    EvalResult ev = evaluate(session, Split::Test);
    if (session.seq2seq()) std::printf("test BLEU %.2f; ", ev.bleu);
    if (session.causal() || session.seq2seq()) std::printf("test perplexity %.4f on %lld tokens; ", ev.perplexity, static_cast<long long>(ev.tokens));
    std::printf("test accuracy %.4f on %lld examples (loss %.6f)\n", ev.accuracy, static_cast<long long>(ev.examples), ev.loss);
    const std::string recorded = (fs::path(eval_dir) / "result.json").string();
    if (fs::exists(recorded)) {
      const auto j = read_json_file(recorded);
      const JsonFields f(j, recorded);
      if (!f.has("test_accuracy")) {
        std::printf("%s records no test accuracy to compare with\n", recorded.c_str());
        return 0;
      }
      const double was = f.number_or("test_accuracy", 0);
      std::printf("%s the accuracy recorded at training time (%.4f)\n", was == ev.accuracy ? "reproduces" : "DIFFERS FROM", was);
      if (was != ev.accuracy) return 3;
    }
    return 0;
  } catch (const std::exception& e) {
    spdlog::error("{}", one_line(e));
    return 1;
  }
}
