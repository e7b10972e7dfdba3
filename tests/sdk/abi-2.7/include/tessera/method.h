// The C++ interface of a PEFT method: the life from DESIGN.md.
//
//   describe → validate → attach → prepare → training hooks → merge/unmerge → state
//
// Every call may throw; the host catches at the boundary and reports the plugin and the
// instance. Objects are created and destroyed only through the plugin's descriptor, so
// the deleter runs in the library that allocated them.
//
// The vtable of Method is fixed for all of SDK 2.x: a capability added in a minor
// version is an extension (extension(id), see extensions.h), never a new virtual.
// The structs below are filled by the host and only read by methods; a minor version
// may append fields to them.
#pragma once

#include <tessera/model_view.h>
#include <tessera/params.h>

#include <functional>
#include <map>
#include <string>
#include <vector>

namespace tessera {

using NamedTensors = std::map<std::string, Tensor>;

struct AttachContext {
  std::string instance;              // instance name from the config, unique per run
  std::vector<std::string> targets;  // target patterns (see matches()); empty: the method's
                                     // own default sites (say which in its README)
  Params params;                     // checked against describe().params, defaults filled
  ModelView& model;
  const Owner& owner;                // names every intervention this instance installs
};

// Data-dependent set-up before training (Fisher masks, SVD inits): the host runs the
// forward pass on calibration batch i and returns its loss; the method may backward it.
struct Calibration {
  std::int64_t batches = 0;  // the trainer's: every training batch once, in a fixed shuffled order
  std::function<Tensor(std::int64_t)> loss;
#if TESSERA_TARGET_ABI_MINOR >= 4
  // Since SDK 2.4: the loss of training example i alone (a batch of one), i < examples, in a
  // fixed shuffled order, for per-example statistics (FISH's empirical Fisher). The model is
  // in evaluation mode (no dropout) throughout prepare().
  std::int64_t examples = 0;
  std::function<Tensor(std::int64_t)> example_loss;
#endif
};

struct StepInfo {
  std::int64_t step = 0;    // optimizer steps taken so far (0-based, before this step)
  std::int64_t total = 0;   // optimizer steps in the run
  double lr = 0.0;
};

struct MethodSchema {
  std::vector<ParamSpec> params;
};

class Method {
 public:
  virtual ~Method() = default;

  virtual MethodSchema describe() const = 0;
  // Cross-key checks beyond the schema; throw ParamError naming the key.
  virtual void validate(const Params&) const {}
  // Choose sites, install interventions, create trainable tensors. Throws when no site
  // matches or a site does not suit the method.
  virtual void attach(AttachContext& ctx) = 0;
  // Called before the instance goes; the host then removes whatever the owner still has
  // installed, so a method overrides this only for work of its own.
  virtual void detach(ModelView&) {}

  virtual void prepare(const Calibration&) {}
  virtual Tensor extra_loss() { return {}; }  // undefined: no extra term
  virtual void after_backward() {}            // gradient edits, before clipping and the step
  virtual void on_step(const StepInfo&) {}

  virtual bool mergeable() const { return false; }
  virtual void merge() {}
  virtual void unmerge() {}

  // The tensors the optimizer updates (leaf tensors with requires_grad).
  virtual NamedTensors trainable() = 0;
  // Everything saved: keys as written to the adapter file (HF PEFT names where PEFT has
  // the method). load_state must accept exactly what state() returns.
  virtual NamedTensors state() = 0;
  virtual void load_state(const NamedTensors& tensors) = 0;
  // The adapter config written beside the tensors (JSON text, HF PEFT layout when PEFT
  // has the method).
  virtual std::string adapter_config_json() const = 0;

  // A table this method offers the host under `id` (beginning with a
  // tessera_extension_header), or null. New method capabilities arrive this way.
  virtual const void* extension(const char* /*id*/) const { return nullptr; }
};

}  // namespace tessera
