/* Tessera plugin ABI, version 1.
 *
 * The only symbol a plugin library exports is `tessera_plugin_entry`. It returns a
 * plain C descriptor that the host reads before it touches any C++ type: the SDK ABI
 * version, who the plugin is, and the build fingerprint (libtorch version, C++ ABI,
 * compiler). Only when all of that matches the host does the host call `create`.
 *
 * Compatibility rule (fixed from version 1 on): a plugin loads when its ABI major equals
 * the host's and its ABI minor is not greater than the host's; its libtorch version and
 * C++ ABI flag must equal the host's, since C++ objects (at::Tensor, std::function)
 * cross the boundary.
 *
 * Lifetime: the descriptor and every string in it are static data of the plugin
 * library and live as long as the library stays loaded (the host keeps it loaded while
 * anything it created is alive).
 */
#ifndef TESSERA_ABI_H
#define TESSERA_ABI_H

#include <stddef.h>
#include <stdint.h>

#define TESSERA_SDK_ABI_MAJOR 1
#define TESSERA_SDK_ABI_MINOR 0
#define TESSERA_PLUGIN_ENTRY_SYMBOL "tessera_plugin_entry"

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
  const char* family;     /* additive | partial | reparameterized | hybrid | unified */
  const char* summary;    /* one line */
  const char* paper;      /* reference of the method's paper */
  tessera_build_fingerprint build;
  /* Creates one method object (a tessera::Method*). Never throws: on failure it
   * returns NULL and writes a NUL-terminated reason into err (err_len bytes).
   * The caller owns the object and must release it with destroy(), while the
   * library is still loaded. */
  void* (*create)(char* err, size_t err_len);
  void (*destroy)(void* method);
} tessera_plugin_descriptor;

typedef const tessera_plugin_descriptor* (*tessera_plugin_entry_fn)(void);

#ifdef __cplusplus
}
#endif

#endif
