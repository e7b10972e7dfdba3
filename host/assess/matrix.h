// `tessera assess`'s matrix: one base config (model, data, split, task, budget) and the
// method setups to run on it, each with every seed. A setup is a config file's methods
// (`config = FILE`: its [[methods]], [[groups]], optimizer keys and base-weight storage —
// with quantize = "gguf", the GGUF file it names) or
// [[setups.methods]] written in place; [setups.train] and the matrix's own [train] change
// keys of [train] over them. A setup that cannot be built (an unknown plugin, a bad key) is
// kept with its error: its rows say why and the rest of the matrix runs.
//
//   base = "../quickstart.toml"
//   seeds = [42, 7]                        # [train] seed of each repetition (default: the base's)
//   out = "../../runs/assess-quickstart"   # default: runs/assess-<matrix name> in the working directory
//   [train]                                # over every setup: the budget (epochs, max_steps, threads …)
//   [[setups]]  name, config, seeds, [[setups.methods]], [[setups.groups]], [setups.train]
//               (a setup's own seeds: more repetitions where one setup's metric swings more)
#pragma once

#include "runtime/config.h"

#include <cstdint>
#include <string>
#include <vector>

namespace tessera {

struct Setup {
  std::string name;
  Config config;      // the base with this setup's methods; seed set per run
  std::string error;  // non-empty: the setup could not be built (file:line:column: why)
  std::vector<std::int64_t> seeds;  // its own 'seeds', else the matrix's
};

struct Matrix {
  std::string file, out;
  Config base;
  std::vector<std::int64_t> seeds;
  std::vector<Setup> setups;

  // Every setup's seeds together: the runs the matrix makes.
  std::size_t runs() const {
    std::size_t n = 0;
    for (const auto& s : setups) n += s.seeds.size();
    return n;
  }
};

// Throws ConfigError for a matrix that cannot be read at all (syntax, base, seeds, a setup
// without a unique name); a setup's own mistakes stay in its Setup::error.
Matrix load_matrix(const std::string& path, const PluginRegistry& registry);

// The run of one setup with one seed: its config with every path absolute (the child reads
// it from the run's own directory).
Config run_config(const Setup& s, std::int64_t seed, const std::string& run_dir);

}  // namespace tessera
