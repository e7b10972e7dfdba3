// Resumable checkpoints of a training run, so that a killed run continues where it stood and
// ends bit for bit as an uninterrupted one with the same seed and threads would. Each lives
// in <run>/checkpoints/step-<N>/:
//   position.json        where the run stands (step, epoch, step within the epoch, epochs
//                        saved, metrics.jsonl's length then) and the resolved config it ran with
//   tensors.safetensors  every instance's state() and trainable() tensors, the groups' gates,
//                        the task head, what methods hand over through tessera.method.resume,
//                        the optimizer's moments and step counts by parameter name, and torch's
//                        generators (tessera::dropout draws from the default one)
// written whole as step-<N>.partial and then renamed, so a folder without the suffix is
// complete; the newest two are kept. The data order and the learning rate need nothing:
// both follow from the seed, the epoch and the step.
#pragma once

#include "train/adamw.h"
#include "train/session.h"

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace tessera {

struct TrainPosition {
  std::int64_t step = 0;          // optimizer steps taken
  std::int64_t epoch = 0;         // the epoch the next step belongs to
  std::int64_t epoch_step = 0;    // steps of that epoch already taken
  std::int64_t epochs_saved = 0;  // epochs whose adapter was saved
  std::uint64_t metrics_bytes = 0;
};

// The optimizer as a checkpoint sees it: per group, its parameters' names in order.
struct OptimizerView {
  FusedAdamW& adamw;
  std::vector<std::vector<std::string>> names;
};

struct Checkpoint {
  std::string dir;
  TrainPosition at;
  std::string config;  // resolved_toml of the run that wrote it
};

// `ranks`: in a data-parallel run or one in micro-batches, rank_generators() of every stream,
// in the order of the ranks they stand for (train/pass_streams.h: pass k of rank r is rank
// r·M + k; the first is the checkpoint's own); a resume with as many gives each its own back.
void save_checkpoint(Session& s, const OptimizerView& opt, const TrainPosition& at, const std::string& run_dir,
                     const std::vector<at::Tensor>& ranks = {});

// This process's random streams as one byte tensor (torch's CPU generator's state, then the
// compute device's when it is not the CPU): what differs between data-parallel ranks, whose
// dropout draws masks for shards of different sizes.
at::Tensor rank_generators(Session& s);
// Puts such a tensor back into the generators.
void set_rank_generators(Session& s, const at::Tensor& bytes);

// The newest checkpoint whose files read back whole; one that does not is skipped for the
// one before, said in one line. None: nullopt.
std::optional<Checkpoint> newest_checkpoint(const std::string& run_dir);

// Puts a checkpoint into the run: methods' states and trainable tensors, gates, head, what
// methods saved through tessera.method.resume, the optimizer's moments, torch's generators.
// A tensor the run lacks or has in another shape is refused by name.
// `optimizer` is asked for the optimizer once the tensors are in (a method's load_state()
// may replace tensors, which the optimizer must follow before its moments are set).
// Data-parallel rank `rank` of `world`, computing each batch in `passes` micro-batches, gets
// its own streams back when the checkpoint was written by as many ranks × passes; otherwise (a
// changed N or M) rank 0's, as every stream had at the start. The generators get its first
// pass's; the states of its other passes are returned (PassStreams::restore).
std::vector<at::Tensor> restore_checkpoint(Session& s, const std::function<OptimizerView()>& optimizer, const Checkpoint& c, std::int64_t rank = 0,
                                           std::int64_t world = 1, std::int64_t passes = 1);

}  // namespace tessera
