// A mutation fuzzer over every file the host reads: safetensors (header and data),
// config.json (BERT, decoder and T5 readers), tokenizer.json (BPE), TOML run configs and
// PEFT adapter directories. Each input is a seed file with random byte edits (flip, set,
// insert, delete, duplicate a span, truncate); the reader must either accept it or throw
// a std::exception. Inputs run in forked children, a chunk at a time, so a crash (a signal)
// or a hang (over 120 s a chunk) is counted, its input found again and saved, and the run
// goes on. Prints one JSON line per target and a total.
//   tessera_bench_fuzz SEED_DIR OUT_DIR INPUTS_PER_TARGET [TARGET]
// SEED_DIR: the test fixtures directory (build/tests/fixtures); the model's config.json
// comes from $TESSERA_MODEL_DIR, the TOML seeds from configs/ beside the build.
#include "architectures/bert.h"
#include "architectures/decoder.h"
#include "formats/safetensors.h"
#include "architectures/t5.h"
#include "tokenizers/tokenizer.h"
#include "runtime/config.h"
#include "runtime/peft_import.h"
#include "runtime/plugin_registry.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <random>
#include <sstream>

namespace fs = std::filesystem;
using namespace tessera;

namespace {

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read seed " + p.string());
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void spill(const fs::path& p, const std::string& bytes) { std::ofstream(p, std::ios::binary | std::ios::trunc) << bytes; }

// Input i of a target: a seed with one edit (3 in 4) or 2–8, all drawn from (target seed, i), so that the
// parent can make input i again to find the one that crashed a chunk. `focus`: edits fall in
// the first `focus` bytes (a safetensors header) when > 0.
std::string mutate(const std::vector<std::string>& seeds, std::uint64_t key, std::uint64_t i, std::size_t focus) {
  std::mt19937_64 rng(key * 0x9E3779B97F4A7C15ULL + i);
  std::string s = seeds[rng() % seeds.size()];
  const int edits = rng() % 4 != 0 ? 1 : 2 + static_cast<int>(rng() % 7);  // mostly one: deep into the reader
  for (int e = 0; e < edits && !s.empty(); ++e) {
    const std::size_t span = focus > 0 ? std::min(focus, s.size()) : s.size();
    const std::size_t at = rng() % span;
    switch (rng() % 7) {
      case 0: s[at] = static_cast<char>(s[at] ^ (1 << (rng() % 8))); break;                                          // flip a bit
      case 1: s[at] = "{}[]\",:0\\9-e.\n\x00\xff"[rng() % 16]; break;                                                 // a syntax byte
      case 2: s.insert(at, 1, static_cast<char>(rng() % 256)); break;                                                 // insert
      case 3: s.erase(at, 1 + rng() % 16); break;                                                                     // delete
      case 4: { const std::size_t n = 1 + rng() % 32; s.insert(at, s.substr(rng() % s.size(), n)); break; }          // duplicate a span
      case 5: s.resize(at); break;                                                                                    // truncate
      default: { const std::string digits = std::to_string(static_cast<std::int64_t>(rng())); s.insert(at, digits); }  // a big number
    }
  }
  return s;
}

struct Target {
  std::string name;
  std::vector<std::string> seeds;
  std::size_t focus = 0;
  std::string file;                          // the name the input is written as, in a directory of its own
  std::function<void(const fs::path&)> read;  // the reader on that directory; may throw
};

// Runs inputs [begin, end) in this process and appends "accepted refused" to dir/counts;
// returns normally or dies.
void run_chunk(const Target& t, std::uint64_t key, std::uint64_t begin, std::uint64_t end, const fs::path& dir) {
  std::uint64_t accepted = 0, refused = 0;
  for (std::uint64_t i = begin; i < end; ++i) {
    spill(dir / t.file, mutate(t.seeds, key, i, t.focus));
    try {
      t.read(dir);
      ++accepted;
    } catch (const std::exception&) {  // a clear refusal: what the reader must do with bad input
      ++refused;
    }
  }
  std::ofstream(dir / "counts", std::ios::app) << accepted << " " << refused << "\n";
}

// 0: finished; otherwise the signal that ended the child (SIGALRM: a hang).
int in_child(const std::function<void()>& f) {
  const pid_t pid = fork();
  if (pid == 0) {
    alarm(120);
    f();
    _exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  if (WIFSIGNALED(status)) return WTERMSIG(status);
  return WEXITSTATUS(status) == 0 ? 0 : 1000 + WEXITSTATUS(status);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4 || argc > 5) {
    std::cerr << "usage: tessera_bench_fuzz SEED_DIR OUT_DIR INPUTS_PER_TARGET [TARGET]\n";
    return 2;
  }
  const fs::path seeds = argv[1], out = argv[2];
  const std::uint64_t n = std::stoull(argv[3]);
  const std::string only = argc == 5 ? argv[4] : "";
  const char* model_dir = std::getenv("TESSERA_MODEL_DIR");
  if (model_dir == nullptr) throw std::runtime_error("TESSERA_MODEL_DIR is not set: source the bootstrap's env.sh");
  at::set_num_threads(1);
  fs::create_directories(out);
  const fs::path work = fs::path("/dev/shm").is_absolute() && fs::exists("/dev/shm") ? fs::path("/dev/shm") / ("tessera-fuzz-" + std::to_string(getpid()))
                                                                                        : out / "work";
  fs::create_directories(work);

  // A small safetensors seed: several dtypes and shapes, so the header has variety.
  const fs::path st_seed = work / "seed.safetensors";
  save_safetensors(st_seed.string(), {{"a.weight", at::randn({3, 4})}, {"b.bias", at::arange(5, at::kLong)},
                                      {"c", at::ones({2, 2}, at::kBFloat16)}, {"d.scalar", at::zeros({}, at::kHalf)}}, {{"format", "pt"}});
  const std::string st = slurp(st_seed);
  std::vector<std::string> configs;
  for (const auto& p : {fs::path(model_dir) / "config.json", seeds / "decoders/llama/config.json", seeds / "decoders/gpt2/config.json",
                        seeds / "seq2seq/t5/config.json"})
    configs.push_back(slurp(p));
  std::vector<std::string> tokenizers;
  for (const char* t : {"gpt2", "roberta", "llama3"}) tokenizers.push_back(slurp(seeds / "tokenizers" / t / "tokenizer.json"));
  std::vector<std::string> tomls;
  const fs::path configs_dir = fs::path(TESSERA_SOURCE_DIR) / "configs";
  for (const auto& e : fs::directory_iterator(configs_dir))
    if (e.path().extension() == ".toml") tomls.push_back(slurp(e.path()));
  const std::vector<std::string> adapters = {slurp(seeds / "lora_basic/adapter_config.json"), slurp(seeds / "lora_rs_patterns/adapter_config.json")};

  PluginRegistry registry;
  registry.scan({TESSERA_PLUGIN_DIR});
  std::vector<Target> targets = {
      {"safetensors", {st}, 8 + 400, "model.safetensors",
       [](const fs::path& d) {
         auto f = SafetensorsFile::open((d / "model.safetensors").string());
         for (const auto& name : f->names()) f->tensor(name).sum();
       }},
      {"config.json", configs, 0, "config.json",
       [](const fs::path& d) {
         const std::string p = (d / "config.json").string();
         std::string refusals;  // accepted when one of the three readers takes it
         for (const auto& read : std::vector<std::function<void()>>{[&] { BertConfig::from_json_file(p); }, [&] { DecoderConfig::from_json_file(p); },
                                                                    [&] { T5Config::from_json_file(p); }}) {
           try {
             read();
             return;
           } catch (const std::exception& e) {
             refusals += std::string(e.what()) + "; ";
           }
         }
         throw std::runtime_error(refusals);
       }},
      {"tokenizer.json", tokenizers, 0, "tokenizer.json",
       [](const fs::path& d) { load_tokenizer(d.string())->encode("Fuzzing finds what tests miss, 12 times.", 0, true); }},
      {"run.toml", tomls, 0, "run.toml", [](const fs::path& d) { load_config((d / "run.toml").string()); }},
      {"adapter_config.json", adapters, 0, "adapter_config.json",
       [&registry](const fs::path& d) { method_from_peft_dir(d.string(), registry, "fuzz"); }},
  };

  constexpr std::uint64_t kChunk = 2000;
  std::uint64_t total = 0, total_crashes = 0;
  for (std::size_t ti = 0; ti < targets.size(); ++ti) {
    const Target& t = targets[ti];
    if (!only.empty() && only != t.name) continue;
    const fs::path dir = work / t.name;
    fs::create_directories(dir);
    // Every seed as it is must be accepted: a reader that refuses everything tests nothing.
    for (const auto& seed : t.seeds) {
      spill(dir / t.file, seed);
      t.read(dir);
    }
    std::uint64_t crashes = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (std::uint64_t begin = 0; begin < n; begin += kChunk) {
      const std::uint64_t end = std::min(n, begin + kChunk);
      if (in_child([&] { run_chunk(t, ti + 1, begin, end, dir); }) == 0) continue;
      for (std::uint64_t i = begin; i < end; ++i) {  // find the inputs that crash, one child each
        const int sig = in_child([&] { run_chunk(t, ti + 1, i, i + 1, dir); });
        if (sig == 0) continue;
        ++crashes;
        const fs::path saved = out / (t.name + "-crash-" + std::to_string(i) + "-signal-" + std::to_string(sig));
        spill(saved, mutate(t.seeds, ti + 1, i, t.focus));
        std::cerr << t.name << ": input " << i << " ended with signal " << sig << ", saved as " << saved << "\n";
      }
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::uint64_t accepted = 0, refused = 0, a = 0, r = 0;
    for (std::ifstream counts(dir / "counts"); counts >> a >> r;) accepted += a, refused += r;
    std::cout << nlohmann::json{{"target", t.name}, {"inputs", n}, {"accepted", accepted}, {"refused", refused}, {"crashes", crashes}, {"seconds", s}}.dump()
              << std::endl;
    total += n, total_crashes += crashes;
  }
  std::cout << nlohmann::json{{"target", "all"}, {"inputs", total}, {"crashes", total_crashes}}.dump() << std::endl;
  fs::remove_all(work);
  return total_crashes == 0 ? 0 : 1;
}
