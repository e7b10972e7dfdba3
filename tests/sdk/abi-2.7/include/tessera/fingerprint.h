// The build fingerprint of the translation unit that includes this header. The host
// compiles it into itself, each plugin into its descriptor; a mismatch is refused.
#pragma once

#include <torch/version.h>

#define TESSERA_STR_(x) #x
#define TESSERA_STR(x) TESSERA_STR_(x)

#define TESSERA_TORCH_VERSION \
  TESSERA_STR(TORCH_VERSION_MAJOR) "." TESSERA_STR(TORCH_VERSION_MINOR) "." TESSERA_STR(TORCH_VERSION_PATCH)

#ifdef _GLIBCXX_USE_CXX11_ABI
#define TESSERA_CXX11_ABI _GLIBCXX_USE_CXX11_ABI
#else
#define TESSERA_CXX11_ABI 0
#endif

#if defined(__clang__)
#define TESSERA_COMPILER "clang " __clang_version__
#elif defined(__GNUC__)
#define TESSERA_COMPILER "gcc " TESSERA_STR(__GNUC__) "." TESSERA_STR(__GNUC_MINOR__) "." TESSERA_STR(__GNUC_PATCHLEVEL__)
#else
#define TESSERA_COMPILER "unknown"
#endif
