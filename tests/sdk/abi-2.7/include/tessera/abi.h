/* Tessera plugin ABI, version 2.
 *
 * Minor versions (each only adds; docs/sdk-compatibility.md):
 *   2.0  handles, owners, extensions
 *   2.1  OutputSite (ModelView::output_site), EmbeddingSite::add_tap,
 *        LinearSite::add_weight_transform, SublayerSite::add_token_wise_{sequential,parallel},
 *        the extensions tessera.host.training and tessera.host.tokenizer,
 *        the forward context (ModelView::attention_mask, token_samples, sample_tags),
 *        AttentionSite::add_input_prefix and num_query_heads
 *
 * The only symbol a plugin library exports is `tessera_plugin_entry`. It returns a
 * plain C descriptor that the host reads before it touches any C++ type: the SDK ABI
 * version, who the plugin is, and the build fingerprint (libtorch version, C++ ABI,
 * compiler). Only when all of that suits the host does the host call `create`.
 *
 * Compatibility rule (docs/sdk-compatibility.md):
 *   - a plugin loads when its ABI major equals the host's and its minor is not above
 *     the host's; the host records that minor and never calls what it lacks;
 *   - a minor version only adds: functions of libtessera_sdk, extensions (tables fetched
 *     by id, each with its own version), fields at the end of structs the host fills;
 *     it never changes a vtable, a function's signature or a struct a plugin fills;
 *   - the descriptor is read up to its own `struct_size`: any size from the 2.0 size up
 *     is accepted, fields past `struct_size` are taken as absent;
 *   - its libtorch version and C++ ABI flag must equal the host's, since C++ objects
 *     (at::Tensor, std::function) cross the boundary.
 *
 * Lifetime: the descriptor and every string in it are static data of the plugin
 * library and live as long as the library stays loaded (the host keeps it loaded while
 * anything it created is alive).
 */
#ifndef TESSERA_ABI_H
#define TESSERA_ABI_H

#include <stddef.h>
#include <stdint.h>

#define TESSERA_SDK_ABI_MAJOR 2
#define TESSERA_SDK_ABI_MINOR 7

/* The minor a plugin declares, and so the oldest 2.x host that loads it: this SDK's
 * unless the plugin defines TESSERA_TARGET_ABI_MINOR before its first include, in which
 * case the headers leave out what later minors added (using it does not compile). */
#ifndef TESSERA_TARGET_ABI_MINOR
#define TESSERA_TARGET_ABI_MINOR TESSERA_SDK_ABI_MINOR
#endif
#if TESSERA_TARGET_ABI_MINOR > TESSERA_SDK_ABI_MINOR
#error "TESSERA_TARGET_ABI_MINOR is newer than this SDK"
#endif
#define TESSERA_PLUGIN_ENTRY_SYMBOL "tessera_plugin_entry"

/* The families of the PEFT review; the descriptor's `family` must be one of them. */
#define TESSERA_FAMILIES "additive", "partial", "reparameterized", "hybrid", "unified"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tessera_build_fingerprint {
  const char* torch_version; /* "2.11.0": TORCH_VERSION of the libtorch built against */
  int32_t cxx11_abi;         /* _GLIBCXX_USE_CXX11_ABI at build time */
  const char* compiler;      /* informational: "gcc 12.2.0" */
} tessera_build_fingerprint;

typedef struct tessera_plugin_descriptor {
  uint32_t struct_size;   /* sizeof(tessera_plugin_descriptor) in the plugin's SDK */
  uint32_t abi_major;
  uint32_t abi_minor;
  const char* id;         /* unique, what a config names: "lora" */
  const char* version;    /* the plugin's own version: "1.0.0" */
  const char* family;     /* one of TESSERA_FAMILIES */
  const char* summary;    /* one line */
  const char* paper;      /* reference of the method's paper */
  tessera_build_fingerprint build;
  /* Creates one method object (a tessera::Method*). Never throws: on failure it
   * returns NULL and writes a NUL-terminated reason into err (err_len bytes).
   * The caller owns the object and must release it with destroy(), while the
   * library is still loaded. */
  void* (*create)(char* err, size_t err_len);
  void (*destroy)(void* method);
  /* ---- end of the 2.0 descriptor; later minors append fields here ---- */
} tessera_plugin_descriptor;

/* The smallest descriptor a 2.x host accepts: the one of SDK 2.0. */
#define TESSERA_DESCRIPTOR_SIZE_2_0 ((uint32_t)(offsetof(tessera_plugin_descriptor, destroy) + sizeof(void (*)(void*))))

/* Whether a descriptor of `struct_size` bytes holds `field` (fields past it are absent). */
#define TESSERA_HAS_FIELD(desc, field) \
  ((desc)->struct_size >= offsetof(tessera_plugin_descriptor, field) + sizeof((desc)->field))

/* Every extension table, in either direction, begins with this header: the host (or the
 * plugin) reads no field past struct_size, and checks version before it relies on one. */
typedef struct tessera_extension_header {
  uint32_t struct_size; /* sizeof the whole table as its provider knows it */
  uint32_t version;     /* the extension's own version, from 1 */
} tessera_extension_header;

typedef const tessera_plugin_descriptor* (*tessera_plugin_entry_fn)(void);

#ifdef __cplusplus
}
#endif

#endif
