#include "runtime/plugin_registry.h"

#include <tessera/fingerprint.h>

#include <boost/dll/shared_library.hpp>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <sstream>

namespace tessera {
namespace fs = std::filesystem;

MethodInstance::MethodInstance(std::shared_ptr<boost::dll::shared_library> lib, const tessera_plugin_descriptor* d, Method* m,
                               std::string instance)
    : lib_(std::move(lib)), descriptor_(d), method_(m), id_(d->id), instance_(std::move(instance)),
      owner_(OwnerImpl::create(id_, instance_)) {}

MethodInstance::~MethodInstance() {
  owner_->remove_all();        // closures hold the method's state and code
  descriptor_->destroy(method_);  // in the library that allocated it
}

void MethodInstance::attach(ModelView& model, const std::vector<std::string>& targets, const Params& params) {
  AttachContext ctx{instance_, targets, params, model, *owner_};
  call("attach", [&](Method& m) { m.attach(ctx); });
}

void MethodInstance::detach(ModelView& model) {
  try {
    call("detach", [&](Method& m) { m.detach(model); });
  } catch (...) {
    owner_->remove_all();
    throw;
  }
  owner_->remove_all();
}

std::string MethodInstance::where(const char* step) const {
  return "plugin '" + id_ + "'" + (instance_.empty() ? "" : " (instance '" + instance_ + "')") + ": " + step + ": ";
}

std::string one_line(const std::exception& e) {
  std::string s = e.what();
  auto cut = s.find("\nException raised from");
  if (cut != std::string::npos) s.resize(cut);
  return s;
}

namespace {
bool known_family(const char* family) {
  if (family == nullptr) return false;
  for (const char* f : {TESSERA_FAMILIES})
    if (std::strcmp(f, family) == 0) return true;
  return false;
}
}  // namespace

bool compatible(const tessera_plugin_descriptor& d, std::string* reason) {
  std::ostringstream why;
  if (d.abi_major != TESSERA_SDK_ABI_MAJOR)
    why << "built for SDK ABI " << d.abi_major << "." << d.abi_minor << ", the host has " << TESSERA_SDK_ABI_MAJOR << "."
        << TESSERA_SDK_ABI_MINOR << " (a plugin needs the host's major version)";
  else if (d.abi_minor > TESSERA_SDK_ABI_MINOR)
    why << "built for SDK ABI " << d.abi_major << "." << d.abi_minor << ", newer than the host's " << TESSERA_SDK_ABI_MAJOR << "."
        << TESSERA_SDK_ABI_MINOR << ": it may call what this host lacks; update the host or rebuild the plugin against SDK "
        << TESSERA_SDK_ABI_MAJOR << "." << TESSERA_SDK_ABI_MINOR;
  else if (d.struct_size < TESSERA_DESCRIPTOR_SIZE_2_0)
    why << "descriptor is " << d.struct_size << " bytes, smaller than SDK " << TESSERA_SDK_ABI_MAJOR << ".0's " << TESSERA_DESCRIPTOR_SIZE_2_0;
  else if (!known_family(d.family))
    why << "unknown family '" << (d.family ? d.family : "(none)") << "' (one of: additive, partial, reparameterized, hybrid, unified)";
  else if (d.build.torch_version == nullptr || std::string(d.build.torch_version) != TESSERA_TORCH_VERSION)
    why << "built against libtorch " << (d.build.torch_version ? d.build.torch_version : "(none)") << ", the host uses "
        << TESSERA_TORCH_VERSION;
  else if (d.build.cxx11_abi != TESSERA_CXX11_ABI)
    why << "built with _GLIBCXX_USE_CXX11_ABI=" << d.build.cxx11_abi << ", the host with " << TESSERA_CXX11_ABI;
  else if (d.id == nullptr || *d.id == '\0' || d.create == nullptr || d.destroy == nullptr)
    why << "descriptor lacks an id, create or destroy";
  if (why.str().empty()) return true;
  if (reason) *reason = why.str();
  return false;
}

PluginRegistry::PluginRegistry() = default;
PluginRegistry::~PluginRegistry() = default;

std::vector<std::string> PluginRegistry::search_path(const std::string& exe_path, const std::vector<std::string>& plugin_dirs) {
  std::vector<std::string> dirs;
  std::error_code ec;
  fs::path exe = fs::canonical(exe_path, ec);
  if (!ec) dirs.push_back((exe.parent_path() / "plugins").string());
  dirs.insert(dirs.end(), plugin_dirs.begin(), plugin_dirs.end());
  if (const char* env = std::getenv("TESSERA_PLUGIN_PATH")) {
    std::stringstream s(env);
    std::string d;
    while (std::getline(s, d, ':'))
      if (!d.empty()) dirs.push_back(d);
  }
  return dirs;
}

void PluginRegistry::scan(const std::vector<std::string>& directories) {
  for (const auto& dir : directories) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) {
      spdlog::debug("plugin directory {} does not exist", dir);
      continue;
    }
    std::vector<std::string> files;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      const auto name = e.path().filename().string();
      if (e.is_regular_file() && name.rfind("tessera-plugin-", 0) == 0 && e.path().extension() == ".so") files.push_back(e.path().string());
    }
    std::sort(files.begin(), files.end());
    for (const auto& f : files) load(f);
  }
}

std::string insecure_reason(const std::string& path) {
  const fs::path file(path);
  for (const fs::path& p : {file, file.parent_path().empty() ? fs::path(".") : file.parent_path()}) {
    struct stat st {};
    if (::stat(p.c_str(), &st) != 0) return "cannot stat " + p.string();
    const char* what = p == file ? "the file" : "its directory";
    if (st.st_uid != 0 && st.st_uid != ::geteuid())
      return fmt::format("{} {} is owned by uid {}, neither root nor this user", what, p.string(), st.st_uid);
    if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0)
      return fmt::format("{} {} is writable by {} (mode {:o}): another user could replace the code; chmod go-w it, or pass "
                         "--allow-insecure-plugins",
                         what, p.string(), (st.st_mode & S_IWOTH) ? "every user" : "its group", st.st_mode & 07777);
  }
  return "";
}

void PluginRegistry::load(const std::string& given) {
  std::error_code ec;  // absolute, so a run's record of it holds from any directory
  const std::string path = fs::absolute(given, ec).lexically_normal().string();
  auto refuse = [&](const std::string& why) {
    spdlog::warn("plugin {} refused: {}", path, why);
    refused_.push_back({path, why});
  };
  // Before the library is opened: loading it already runs its constructors.
  if (!allow_insecure_)
    if (std::string why = insecure_reason(path); !why.empty()) return refuse(why);
  auto lib = std::make_shared<boost::dll::shared_library>();
  try {
    // rtld_now: a symbol the plugin needs and this libtessera_sdk lacks refuses the plugin
    // here, with the loader's message, instead of failing at its first call.
    lib->load(path, boost::dll::load_mode::rtld_now | boost::dll::load_mode::rtld_local);
  } catch (const std::exception& e) {
    return refuse(std::string("cannot be loaded: ") + e.what());
  }
  if (!lib->has(TESSERA_PLUGIN_ENTRY_SYMBOL)) return refuse("no entry symbol '" TESSERA_PLUGIN_ENTRY_SYMBOL "'");
  const tessera_plugin_descriptor* d = lib->get<const tessera_plugin_descriptor*()>(TESSERA_PLUGIN_ENTRY_SYMBOL)();
  if (d == nullptr) return refuse("entry returned no descriptor");
  std::string why;
  if (!compatible(*d, &why)) return refuse(std::string("plugin '") + (d->id ? d->id : "?") + "': " + why);
  if (const PluginInfo* first = find(d->id))
    return refuse("duplicate id '" + std::string(d->id) + "', already loaded from " + first->path);

  PluginInfo info{d->id, d->version ? d->version : "", d->family, d->summary ? d->summary : "",
                  d->paper ? d->paper : "", path, {}, d->abi_minor};
  // Create one method to read its schema: a plugin that cannot even be created is refused now.
  char err[512] = {0};
  void* raw = d->create(err, sizeof err);
  if (raw == nullptr) return refuse("plugin '" + info.id + "': cannot create its method: " + (err[0] ? err : "no reason given"));
  MethodInstance probe(lib, d, static_cast<Method*>(raw), "");
  try {
    info.params = probe.call("describe", [](Method& m) { return m.describe().params; });
  } catch (const std::exception& e) {
    return refuse(e.what());
  }
  spdlog::debug("plugin {} {} loaded from {}", info.id, info.version, path);
  plugins_.push_back(std::move(info));
  loaded_.push_back({lib, d});
}

const PluginInfo* PluginRegistry::find(const std::string& id) const {
  for (const auto& p : plugins_)
    if (p.id == id) return &p;
  return nullptr;
}

std::unique_ptr<MethodInstance> PluginRegistry::create(const std::string& id, const std::string& instance) const {
  for (std::size_t i = 0; i < plugins_.size(); ++i) {
    if (plugins_[i].id != id) continue;
    char err[512] = {0};
    void* raw = loaded_[i].descriptor->create(err, sizeof err);
    if (raw == nullptr) throw PluginError("plugin '" + id + "': cannot create instance '" + instance + "': " + err);
    return std::make_unique<MethodInstance>(loaded_[i].lib, loaded_[i].descriptor, static_cast<Method*>(raw), instance);
  }
  std::string known;
  for (const auto& p : plugins_) known += (known.empty() ? "" : ", ") + p.id;
  throw PluginError("no plugin with id '" + id + "' (found: " + (known.empty() ? "none" : known) + ")");
}

}  // namespace tessera
