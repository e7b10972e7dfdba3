// Extensions: capabilities fetched by id, each a C table with its own version, so that
// the SDK grows without changing a vtable (as CLAP does). Both directions:
//
//   host → plugin   ModelView::extension(id)   tables the host offers to methods
//   plugin → host   Method::extension(id)      tables a method offers to the host
//
// Every table begins with a tessera_extension_header (abi.h). A provider fills
// struct_size with the size it knows; a reader reads no field past it and checks
// `version` before relying on what that version added. An id never changes meaning;
// an incompatible change takes a new id.
#pragma once

#include <tessera/abi.h>
#include <tessera/model_view.h>
#include <tessera/params.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

// ---- tessera.host.log, version 1: the run's log, so plugins need no logging library ----
#define TESSERA_EXT_HOST_LOG "tessera.host.log"

extern "C" {
typedef enum tessera_log_level { TESSERA_LOG_DEBUG = 1, TESSERA_LOG_INFO = 2, TESSERA_LOG_WARN = 3 } tessera_log_level;

typedef struct tessera_host_log_v1 {
  tessera_extension_header header;  // version 1
  // Writes one message to the run's log, prefixed by the instance name. Never throws.
  void (*write)(int32_t level, const char* instance, const char* message);
} tessera_host_log_v1;
}

#if TESSERA_TARGET_ABI_MINOR >= 1
// ---- tessera.host.training, version 1 (SDK 2.1): life stages of a training run ----------
// Offered while a training run holds the model (not by eval or generate). C++ function
// pointers: the build fingerprint guarantees both sides share at::Tensor's layout. They
// may throw; the host reports it as the calling method's error.
#define TESSERA_EXT_HOST_TRAINING "tessera.host.training"

struct tessera_host_training_v1 {
  tessera_extension_header header;  // version 1
  void* host;
  // The instance's trainable() now lists other tensors (added or replaced in on_step,
  // extra_loss or after_backward): the host reads it again before the update; moments of
  // tensors still listed are kept, new tensors start from zero moments.
  void (*trainable_changed)(void* host, const char* instance);
  // Inside extra_loss(): the task's forward pass once more on the current training batch,
  // with every method as it is now (dropout drawn anew): its loss, without extra terms, and
  // for classification tasks the head's logits ((B, L), or (B, T, L) per token; undefined for
  // language-model tasks). For losses that compare two passes (AdaMix's consistency).
  void (*forward_again)(void* host, at::Tensor* loss, at::Tensor* logits);
};

// Version 2 (same id, a longer table; read it through host_extension<…v2>(…, 2)): also, inside
// extra_loss(), the step's own forward pass — its loss, without extra terms, and its logits as
// forward_again gives them, with their graph: a loss that compares two passes (AdaMix's
// consistency) runs one more pass, not two.
struct tessera_host_training_v2 {
  tessera_extension_header header;  // version 2
  void* host;
  void (*trainable_changed)(void* host, const char* instance);
  void (*forward_again)(void* host, at::Tensor* loss, at::Tensor* logits);
  void (*step_output)(void* host, at::Tensor* loss, at::Tensor* logits);
};

// ---- tessera.host.tokenizer, version 1 (SDK 2.1): the run's tokenizer -----------------
#define TESSERA_EXT_HOST_TOKENIZER "tessera.host.tokenizer"

struct tessera_host_tokenizer_v1 {
  tessera_extension_header header;  // version 1
  void* host;
  // The ids of a text without special tokens (a prompt initialised from words).
  std::vector<std::int64_t> (*encode)(void* host, const std::string& text);
};

// Version 2 (same id, a longer table): the ids as the model's tokenizer gives them with its
// special tokens ([CLS] … [SEP], <s> … </s>, BOS), as `tokenizer(text)` does in transformers:
// PEFT's prompt_tuning_init_text tokenizes so. Read it through host_extension<…v2>(…, 2).
struct tessera_host_tokenizer_v2 {
  tessera_extension_header header;  // version 2
  void* host;
  std::vector<std::int64_t> (*encode)(void* host, const std::string& text);
  std::vector<std::int64_t> (*encode_with_special)(void* host, const std::string& text);
};

#endif

#if TESSERA_TARGET_ABI_MINOR >= 2
// ---- tessera.method.storage, version 1 (SDK 2.2): a method chooses how base weights are kept
// Plugin → host. Asked once per linear site after the model is read and before any method
// attaches (the instance exists, unattached), with the instance's params and targets as the
// config gives them: the storage the method needs for that site's weight — "nf4" (QLoRA's
// 4-bit NormalFloat) — or null for no preference. A method's request wins over [model]
// quantize; two methods asking different storage for one weight are refused, naming both.
// The returned string must outlive the call (a literal).
#define TESSERA_EXT_METHOD_STORAGE "tessera.method.storage"

struct tessera_method_storage_v1 {
  tessera_extension_header header;  // version 1
  void* method;
  const char* (*storage_for)(void* method, const tessera::Params& params, const std::vector<std::string>& targets, const char* site,
                             const char* hf_path);
};

#endif

#if TESSERA_TARGET_ABI_MINOR >= 3
// ---- tessera.method.files, version 1 (SDK 2.3): how a method's adapter folder names its tensors
// Plugin → host. The file its state() goes to in <adapter>/<instance>/, and load_state()
// comes from: a safetensors file, beside adapter_config.json. Without the extension
// "adapter_model.safetensors" (PEFT's name); AdapterHub's layout is "adapter.safetensors".
#define TESSERA_EXT_METHOD_FILES "tessera.method.files"

struct tessera_method_files_v1 {
  tessera_extension_header header;  // version 1
  const char* weights_file;         // a plain file name, no directory
};
#endif

#if TESSERA_TARGET_ABI_MINOR >= 5
// ---- tessera.method.after_step, version 1 (SDK 2.5): work after each optimizer update -----
// Plugin → host. Called by a training run right after each optimizer step, with `info.step`
// the step just taken (0-based) — so also after the last one, before the epoch's evaluation
// and save — while the step's gradients (clipped, as the optimizer used them) are still on
// the trainable tensors: what PEFT's AdaLoRA does in update_and_allocate() between
// optimizer.step() and zero_grad() (importance from |θ · ∂L/∂θ|, masks to a rank budget).
// In-place edits of trainable tensors keep their optimizer moments; a method that adds or
// replaces tensors says so through tessera.host.training's trainable_changed.
namespace tessera {
struct StepInfo;
}
#define TESSERA_EXT_METHOD_AFTER_STEP "tessera.method.after_step"

struct tessera_method_after_step_v1 {
  tessera_extension_header header;  // version 1
  void* method;
  void (*after_step)(void* method, const tessera::StepInfo* info);
};
#endif

#if TESSERA_TARGET_ABI_MINOR >= 6
// ---- tessera.method.resume, version 1 (SDK 2.6): what a resumed run needs beyond state() --
// Plugin → host. A training run checkpoints every instance's state() and trainable() tensors,
// the optimizer's moments and torch's generators; a method whose training carries more —
// moving averages (AdaLoRA's importance), its own generator (DyLoRA's rank draws), a step
// counter — hands it over here, so that `tessera train --resume` continues bit for bit.
// save() is called at each checkpoint; load() on resume with what save() returned, in place
// of load_state() (a state() that differs from the training tensors — AdaLoRA's kept subset —
// would reshape them), and before the trainable tensors get their checkpointed values: it
// leaves the method with trainable() of the checkpoint's names and shapes (diff pruning past
// its projection: the sparse stage). A generator travels as its get_state() bytes (a uint8
// tensor). A method without the extension is resumed by load_state(state()), then its
// trainable tensors' values. (Added within 2.6: the host asks for it by id, so an
// older plugin answers null and an older host never asks.)
#define TESSERA_EXT_METHOD_RESUME "tessera.method.resume"
struct tessera_method_resume_v1 {
  tessera_extension_header header;  // version 1
  void* method;
  void (*save)(void* method, std::map<std::string, at::Tensor>* out);
  void (*load)(void* method, const std::map<std::string, at::Tensor>* in);
};
#endif

namespace tessera {

// The extension `id` as a table of type T, when the host offers it at `version` or later.
template <class T>
const T* host_extension(const ModelView& model, const char* id, std::uint32_t version) {
  const auto* h = static_cast<const tessera_extension_header*>(model.extension(id));
  if (h == nullptr || h->version < version || h->struct_size < sizeof(T)) return nullptr;
  return reinterpret_cast<const T*>(h);
}

// Logs through the host when it offers tessera.host.log; silent otherwise.
inline void log(const ModelView& model, tessera_log_level level, const std::string& instance, const std::string& message) {
  if (const auto* ext = host_extension<tessera_host_log_v1>(model, TESSERA_EXT_HOST_LOG, 1))
    ext->write(level, instance.c_str(), message.c_str());
}

}  // namespace tessera
