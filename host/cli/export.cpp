// `tessera export RUN_DIR OUT_DIR`: the run's base model with every method folded into
// its weights, written as a Hugging Face model directory — config.json, the tokenizer's
// files and one model.safetensors holding every tensor of the base checkpoint under the
// checkpoint's own names — so that transformers' from_pretrained computes what the run's
// merged model computes. A method that cannot fold (a soft prompt) is refused before
// anything is written; the task head is no part of such a model and stays in the run.
#include "cli/commands.h"

#include "formats/checkpoint.h"
#include "formats/gguf_llama.h"
#include "formats/json_file.h"
#include "formats/safetensors.h"
#include "train/run_dir.h"
#include "train/session.h"
#include "train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <optional>

namespace tessera {
namespace fs = std::filesystem;
namespace {

struct Args {
  std::string run_dir, out_dir, dtype;
  std::int64_t threads = -1;
  bool overwrite = false;
};

// What transformers reads beside the weights; the weight files themselves are written anew.
constexpr const char* kModelFiles[] = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                                       "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json",
                                       "merges.txt", "spiece.model", "tokenizer.model", "chat_template.jinja"};

// `p` is `dir` or lies inside it.
bool within(const fs::path& dir, const fs::path& p) {
  const fs::path d = fs::weakly_canonical(dir), q = fs::weakly_canonical(p);
  return std::mismatch(d.begin(), d.end(), q.begin(), q.end()).first == d.end();
}

// OUT_DIR without a trailing separator (its `.partial` sibling is named from it), refused
// before any work when it could not be written or would replace what the export reads.
fs::path check_out_dir(const Args& a, const std::string& model_dir) {
  fs::path out = fs::absolute(a.out_dir).lexically_normal();
  if (!out.has_filename()) out = out.parent_path();
  if (fs::exists(out) && !fs::is_directory(out)) throw std::runtime_error(a.out_dir + " exists and is not a directory");
  if (fs::exists(out) && !fs::is_empty(out) && !a.overwrite)
    throw std::runtime_error(a.out_dir + " is not empty: pass --overwrite to replace it");
  for (const auto& [what, dir] : {std::pair{"run directory", fs::path(a.run_dir)}, std::pair{"base model directory", fs::path(model_dir)}})
    if (within(out, dir)) throw std::runtime_error(a.out_dir + " would replace the " + what + " " + dir.string() + " that the export reads");
  fs::path parent = out.parent_path();
  while (!fs::exists(parent)) parent = parent.parent_path();
  if (!fs::is_directory(parent) || ::access(parent.c_str(), W_OK) != 0) throw std::runtime_error("cannot write " + a.out_dir + ": " + parent.string() + " is not a writable directory");
  return out;
}

struct Weights {
  std::map<std::string, at::Tensor> tensors;  // under the checkpoint's names
  std::int64_t changed = 0, bytes = 0;
};

// Every tensor of the base checkpoint: the value its parameter site holds now where one
// holds it (merged, or dequantized from NF4) and differs from the file's, the file's own
// otherwise, each in the file's dtype unless `dtype` says another.
Weights merged_weights(const SiteModel& model, const std::string& base_dir, std::optional<at::ScalarType> dtype) {
  at::NoGradGuard no_grad;
  const Checkpoint file = Checkpoint::open(base_dir);
  const auto& held = model.checkpoint_tensors();
  Weights w;
  for (const auto& name : file.names()) {
    at::Tensor t = file.stored(name);
    if (const auto it = held.find(name); it != held.end()) {
      at::Tensor now = it->second.site->base_value();
      if (it->second.transposed) now = now.t();  // back to the file's (in, out)
      if (now.sizes() != t.sizes())
        throw std::runtime_error(base_dir + ": tensor " + name + " has shape " + c10::str(t.sizes()) + ", the model holds it as " + c10::str(now.sizes()));
      now = now.to(at::kCPU);
      if (!at::equal(now, t.to(now.scalar_type()))) {
        t = now.to(t.scalar_type());
        ++w.changed;
      }
    }
    if (dtype && t.is_floating_point()) t = t.to(*dtype);
    w.bytes += t.numel() * static_cast<std::int64_t>(t.element_size());
    w.tensors[name] = t;
  }
  return w;
}

// config.json (a GGUF base's from its metadata) and the tokenizer's files (from [model]
// tokenizer when given), as the base has them; config.json's torch_dtype follows --dtype.
void copy_model_files(const ModelConfig& m, const std::string& out, const std::string& dtype) {
  const bool gguf = is_gguf_file(m.path);
  for (const char* f : kModelFiles) {
    const bool config = std::string(f) == "config.json" || std::string(f) == "generation_config.json";
    const fs::path from = fs::path(config ? m.path : m.tokenizer_dir()) / f;
    if (!(config && gguf) && fs::exists(from)) fs::copy_file(from, fs::path(out) / f);
  }
  if (gguf) write_file_atomic((fs::path(out) / "config.json").string(), llama_config_from_gguf(*GgufFile::open(m.path)).dump(2) + "\n");
  if (dtype.empty()) return;
  const std::string config = (fs::path(out) / "config.json").string();
  nlohmann::json j = read_json_file(config);
  j["torch_dtype"] = dtype == "f32" ? "float32" : dtype == "bf16" ? "bfloat16" : "float16";
  write_file_atomic(config, j.dump(2) + "\n");
}

std::optional<at::ScalarType> dtype_of(const std::string& d) {
  if (d.empty()) return std::nullopt;
  return d == "f32" ? at::kFloat : d == "bf16" ? at::kBFloat16 : at::kHalf;
}

int run_export(const Args& a, const PluginRegistry& registry) {
  Config config = load_run_config(a.run_dir, registry);
  const fs::path out = check_out_dir(a, config.model.path);
  if (a.threads >= 0) config.train.threads = a.threads;
  set_threads(config.train.threads);
  Session session(config, registry);
  session.load_adapter((fs::path(a.run_dir) / "adapter").string());
  try {
    session.methods().merge();
  } catch (const std::exception& e) {
    throw std::runtime_error("cannot export " + a.run_dir + ": " + e.what());
  }
  const Weights w = merged_weights(session.model(), config.model.path, dtype_of(a.dtype));
  replace_folder(out.string(), [&](const std::string& partial) {
    save_safetensors((fs::path(partial) / "model.safetensors").string(), w.tensors, {{"format", "pt"}});
    copy_model_files(config.model, partial, a.dtype);
  });
  const bool quantized = config.model.quantize != "none" ||
                         std::any_of(config.model.quantize_targets.begin(), config.model.quantize_targets.end(), [](const auto& t) { return t.second != "none"; });
  if (quantized)
    std::printf("the base was loaded quantized ([model] quantize = \"%s\"): its weights are written dequantized\n", config.model.quantize.c_str());
  if (!session.task().head().empty())
    std::printf("the task head (%s) is no part of a Hugging Face base model: it stays in %s, not exported\n", config.task.kind.c_str(),
                (fs::path(a.run_dir) / "adapter" / "head.safetensors").c_str());
  std::printf("exported %s: %zu tensors, %lld changed by the merge%s, %.1f MB\n", a.out_dir.c_str(), w.tensors.size(), static_cast<long long>(w.changed),
              quantized ? " or the dequantization" : "", static_cast<double>(w.bytes) / 1e6);
  return 0;
}

}  // namespace

Command export_command() {
  auto a = std::make_shared<Args>();
  return {"export", "write a run's base model with every method merged into it as a Hugging Face model directory",
          [a](CLI::App& c) {
            c.add_option("run_dir", a->run_dir, "run directory written by `tessera train`")->required()->check(CLI::ExistingDirectory);
            c.add_option("out_dir", a->out_dir, "the model directory to write (config.json, tokenizer files, model.safetensors)")->required();
            c.add_flag("--overwrite", a->overwrite, "replace an OUT_DIR that is not empty");
            c.add_option("--dtype", a->dtype, "store the weights as f32, bf16 or f16 (default: the checkpoint's own dtype)")
                ->check(CLI::IsMember({"f32", "bf16", "f16"}));
            c.add_option("--threads", a->threads, "override [train] threads")->check(CLI::Range(0, 4096));
          },
          [a](const PluginRegistry& r) { return run_export(*a, r); }};
}

}  // namespace tessera
