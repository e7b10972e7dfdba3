// `tessera generate PROMPT`: continues a prompt with a decoder, or answers a source with
// an encoder-decoder — the base model alone (--model), a causal-lm or seq2seq run with its
// adapter (--run), and/or a Hugging Face PEFT adapter (--peft) or an AdapterHub one (--adapterhub). The model, the methods and
// the adapter come from the same code as `tessera train` and `eval`.
#include "cli/commands.h"
#include "cli/switches.h"

#include "architectures/backbone.h"
#include "formats/checkpoint.h"
#include "runtime/method_stack.h"
#include "runtime/adapterhub_import.h"
#include "runtime/peft_import.h"
#include "tokenizers/tokenizer.h"
#include "tokenizers/tokenizer_extension.h"
#include "train/adapter_folder.h"
#include "train/session.h"
#include "train/trainer.h"

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <memory>

namespace tessera {
namespace fs = std::filesystem;
namespace {

struct Args {
  std::string model, tokenizer, run, peft, adapterhub, prompt, quantize;
  GenerateOptions gen;
  std::int64_t threads = -1;
  bool merge = false;
  Switches switches;
  std::vector<std::string> tags;
};

// What to load: the model, its dtype and device, the methods and the folder of each one's
// state (the file in it is the method's: MethodStack::weights_file).
struct Plan {
  ModelConfig model;
  std::vector<MethodConfig> methods;
  std::vector<std::string> state_dirs;
  std::vector<GroupConfig> groups;
};

Plan plan(const Args& a, const PluginRegistry& registry) {
  Plan p{ModelConfig{a.model, "f32", "cpu", a.tokenizer}, {}, {}};
  if (!a.run.empty()) {
    const Config rc = load_run_config(a.run, registry);
    p.model = rc.model;
    p.methods = rc.methods;
    p.groups = rc.groups;
    for (const auto& m : rc.methods) p.state_dirs.push_back((fs::path(a.run) / "adapter" / m.name).string());
  }
  if (!a.peft.empty()) {
    p.methods.push_back(method_from_peft_dir(a.peft, registry, "peft"));
    p.state_dirs.push_back(a.peft);
  }
  if (!a.adapterhub.empty()) {
    p.methods.push_back(method_from_adapterhub_dir(a.adapterhub, registry, "adapterhub"));
    p.state_dirs.push_back(a.adapterhub);
  }
  if (p.model.path.empty()) throw std::runtime_error("generate needs --model or --run");
  if (!a.quantize.empty()) p.model.quantize = a.quantize;  // checked by the storage stage, naming the value
  return p;
}

// The folder instance `name`'s state is read from (the stack attaches in its own order).
std::string dir_of(const Plan& p, const std::string& name) {
  for (std::size_t i = 0; i < p.methods.size(); ++i)
    if (p.methods[i].name == name) return p.state_dirs[i];
  throw std::logic_error("no state folder for method '" + name + "'");
}

int run_generate(const Args& a, const PluginRegistry& registry) {
  set_threads(a.threads >= 0 ? a.threads : 0);
  const Plan p = plan(a, registry);
  auto backbone = load_backbone(p.model.path, options_for(p.model), streams_blocks(p.model));
  if (backbone->kind() == BackboneKind::Encoder)
    throw std::runtime_error("generate needs a decoder or an encoder-decoder: " + p.model.path + " (" + backbone->sites().info().architecture + ") is an encoder");
  auto tokenizer = load_tokenizer(p.model.tokenizer_dir());
  TokenizerExtension tokenizer_ext(*tokenizer);  // a prompt initialised from text attaches here too
  backbone->sites().set_extension(TESSERA_EXT_HOST_TOKENIZER, tokenizer_ext.table());
  MethodStack methods(registry, p.methods, backbone->sites(), p.model, p.groups);
  if (!a.run.empty()) {
    const Config rc = load_config((fs::path(a.run) / "config.toml").string());
    std::vector<MethodConfig> run_methods;  // in the stack's order (groups gather their members), as the adapter was saved
    for (const auto& m : methods.configs())
      if (std::any_of(rc.methods.begin(), rc.methods.end(), [&](const MethodConfig& r) { return r.name == m.name; })) run_methods.push_back(m);
    check_adapter((fs::path(a.run) / "adapter").string(), {rc.task.kind, backbone->sites().info().architecture, rc.task.pooling, {}}, run_methods);
  }
  for (std::size_t i = 0; i < methods.size(); ++i) methods.load_state(i, methods.state_file(dir_of(p, methods.config(i).name), i));
  if (!a.run.empty() && !methods.group_state().empty()) methods.load_group_state((fs::path(a.run) / "adapter" / "groups.safetensors").string());
  a.switches.apply(methods);
  std::map<std::string, std::vector<std::string>> tags;  // the prompt's, as a [data] tag column gives a sample's
  for (const auto& t : a.tags) {
    const auto eq = t.find('=');
    if (eq == std::string::npos || eq == 0) throw std::runtime_error("--tag " + t + ": write COLUMN=VALUE (--tag adapter=french)");
    tags[t.substr(0, eq)] = {t.substr(eq + 1)};
  }
  backbone->sites().set_sample_tags(tags);
  // Folded, an adapter costs nothing per token (LoRA's branches were 15–20% of a SmolLM2
  // decoding step); refused, before any token, for a method that cannot fold.
  if (a.merge) try {
      methods.merge();
    } catch (const std::exception& e) {
      throw std::runtime_error(std::string("--merge: ") + e.what());
    }
  backbone->sites().drop_dense_copies();  // what plugins dequantized of a stored base at attach
  auto ids = tokenizer->encode(a.prompt);
  // Nothing to continue (an empty prompt, a tokenizer that adds no BOS): start from the
  // config's bos_token_id, as transformers.generate does without input_ids.
  const bool decoder = backbone->kind() == BackboneKind::Decoder;
  if (ids.empty() && decoder && backbone->special_ids().bos >= 0) ids = {backbone->special_ids().bos};
  const auto out = backbone->generate({ids}, a.gen);
  std::cout << (decoder ? a.prompt : "") << tokenizer->decode(out[0]) << "\n";
  return 0;
}

}  // namespace

Command generate_command() {
  auto a = std::make_shared<Args>();
  return {"generate", "continue a prompt (decoder) or answer a source (T5): greedy, or sampled with --sample",
          [a](CLI::App& c) {
            c.add_option("prompt", a->prompt, "text to continue")->required();
            c.add_option("--model", a->model, "Hugging Face model directory, or a LLaMA GGUF file")->check(CLI::ExistingPath);
            c.add_option("--tokenizer", a->tokenizer, "directory of the tokenizer (default: the model's; a GGUF file's own tokenizer.ggml.*)")->check(CLI::ExistingDirectory);
            c.add_option("--run", a->run, "run directory of a causal-lm or seq2seq `tessera train`: its model and adapter")->check(CLI::ExistingDirectory);
            c.add_option("--peft", a->peft, "Hugging Face PEFT adapter directory to apply")->check(CLI::ExistingDirectory);
            c.add_option("--adapterhub", a->adapterhub, "AdapterHub (adapters) bottleneck adapter directory to apply")->check(CLI::ExistingDirectory);
            c.add_option("--quantize", a->quantize,
                         "keep the layers' linear weights as none, nf4, fp4, int8 or gguf (a GGUF file's own blocks, loaded without a dense copy); "
                         "default: --run's [model] quantize, else none")
                ->check(CLI::IsMember({"none", "nf4", "fp4", "int8", "gguf"}));
            c.add_option("--max-new-tokens", a->gen.max_new_tokens, "tokens to generate (default 32)")->check(CLI::PositiveNumber);
            c.add_flag("--sample", a->gen.sample, "sample instead of taking the most likely token");
            c.add_option("--temperature", a->gen.temperature, "sampling temperature (default 1)")->check(CLI::PositiveNumber);
            c.add_option("--top-k", a->gen.top_k, "keep the k most likely tokens (0 = all)")->check(CLI::NonNegativeNumber);
            c.add_option("--top-p", a->gen.top_p, "keep the most likely tokens up to this mass (1 = all)")->check(CLI::Range(0.0, 1.0));
            c.add_option("--seed", a->gen.seed, "sampling seed");
            c.add_option("--threads", a->threads, "intra-op threads (default: every processor)")->check(CLI::Range(0, 4096));
            c.add_flag("--merge", a->merge,
                       "fold the adapters into the weights before decoding: no per-token cost for them (the folded weights become "
                       "private copies of the mapped checkpoint's pages)");
            a->switches.add_options(c);
            c.add_option("--tag", a->tags, "COLUMN=VALUE: the prompt's tag, as a [data] tag column gives a sample's (route groups read it; repeatable)")
                ->allow_extra_args(false);  // one tag per flag: the prompt after it stays the prompt
          },
          [a](const PluginRegistry& r) { return run_generate(*a, r); }};
}

}  // namespace tessera
