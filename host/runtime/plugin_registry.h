// Finds method plugins, checks their descriptors, and hands out method objects.
//
// Search order: the `plugins` directory beside the binary, then each --plugin-dir, then
// each entry of TESSERA_PLUGIN_PATH (':'-separated). The first library with an id wins;
// later ones are reported as duplicates. A library is refused — with the reason, the
// host carrying on — when it has no entry symbol, its ABI major differs or its minor is
// newer than the host's, its descriptor is smaller than SDK 2.0's, its family is not one
// of the five, its libtorch version or C++ ABI differs, or it fails to create its method.
// The host records each plugin's ABI minor and calls nothing that minor lacks.
// Libraries stay loaded for the life of the registry and of every method object created
// from them (each MethodInstance holds its library).
#pragma once

#include <tessera/abi.h>
#include <tessera/internal/sites_impl.h>
#include <tessera/method.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace boost::dll { class shared_library; }

namespace tessera {

// Any failure inside a plugin, named by plugin id (and instance when there is one).
class PluginError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct PluginInfo {
  std::string id, version, family, summary, paper, path;
  std::vector<ParamSpec> params;
  std::uint32_t abi_minor = 0;  // the SDK 2.x minor the plugin was built against
};

struct RefusedPlugin {
  std::string path;
  std::string reason;
};

// An exception's message without libtorch's appended C++ backtrace.
std::string one_line(const std::exception& e);

class MethodInstance {
 public:
  MethodInstance(std::shared_ptr<boost::dll::shared_library> lib, const tessera_plugin_descriptor* d, Method* m,
                 std::string instance);
  // Removes whatever the instance still has installed, then destroys the method in its
  // library: no closure of it can run after.
  ~MethodInstance();
  MethodInstance(const MethodInstance&) = delete;
  MethodInstance& operator=(const MethodInstance&) = delete;

  const std::string& plugin_id() const { return id_; }
  const std::string& instance() const { return instance_; }
  std::uint32_t abi_minor() const { return descriptor_->abi_minor; }
  // The owner of every intervention the instance installs: the host switches and scales
  // the instance through it (composition, evaluation without the adapter).
  OwnerImpl& owner() { return *owner_; }

  // attach() with the context the host builds for this instance.
  void attach(ModelView& model, const std::vector<std::string>& targets, const Params& params);
  // detach(), then removes whatever the instance left installed.
  void detach(ModelView& model);

  // The method's extension `id` as a table of type T, when it offers it at `version` or
  // later (a plugin of an older minor may lack it: null).
  template <class T>
  const T* extension(const char* id, std::uint32_t version) {
    const void* raw = call("extension", [&](Method& m) { return m.extension(id); });
    const auto* h = static_cast<const tessera_extension_header*>(raw);
    if (h == nullptr || h->version < version || h->struct_size < sizeof(T)) return nullptr;
    return reinterpret_cast<const T*>(h);
  }

  // Runs f(method) and converts anything it throws into a PluginError that names the
  // plugin, the instance and the step.
  template <class F>
  auto call(const char* step, F&& f) -> decltype(f(std::declval<Method&>())) {
    try {
      return f(*method_);
    } catch (const ParamError&) {
      throw;  // the config layer adds file, line and column
    } catch (const std::exception& e) {
      throw PluginError(where(step) + one_line(e));
    } catch (...) {
      throw PluginError(where(step) + "unknown exception");
    }
  }

 private:
  std::string where(const char* step) const;
  std::shared_ptr<boost::dll::shared_library> lib_;  // declared first: destroyed last
  const tessera_plugin_descriptor* descriptor_;
  Method* method_;
  std::string id_, instance_;
  std::shared_ptr<OwnerImpl> owner_;
};

class PluginRegistry {
 public:
  PluginRegistry();
  ~PluginRegistry();

  // Directories in search order for a binary at `exe_path` (see above).
  static std::vector<std::string> search_path(const std::string& exe_path, const std::vector<std::string>& plugin_dirs);

  void scan(const std::vector<std::string>& directories);
  // Plugins are code: a file, or its directory, that users other than its owner and root
  // can write to is refused (as ssh refuses such keys) unless this is set
  // (`--allow-insecure-plugins`).
  void allow_insecure(bool on) { allow_insecure_ = on; }
  // Loads one library file; refusals are recorded, never thrown.
  void load(const std::string& path);

  const std::vector<PluginInfo>& plugins() const { return plugins_; }
  const std::vector<RefusedPlugin>& refused() const { return refused_; }
  const PluginInfo* find(const std::string& id) const;

  // Throws PluginError when the id is unknown or creation fails.
  std::unique_ptr<MethodInstance> create(const std::string& id, const std::string& instance) const;

 private:
  struct Loaded {
    std::shared_ptr<boost::dll::shared_library> lib;
    const tessera_plugin_descriptor* descriptor;
  };
  std::vector<PluginInfo> plugins_;
  std::vector<Loaded> loaded_;  // parallel to plugins_
  std::vector<RefusedPlugin> refused_;
  bool allow_insecure_ = false;
};

// Why a plugin file may not be trusted ("" when it may): writable by group or others, or
// owned by another user than root or the one running the host — the file or its directory.
std::string insecure_reason(const std::string& path);

// Whether a descriptor may be used by this host; the reason when not. Reads no field past
// d.struct_size.
bool compatible(const tessera_plugin_descriptor& d, std::string* reason);

}  // namespace tessera
