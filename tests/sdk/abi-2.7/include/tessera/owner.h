// The owner of interventions: one method instance, as the sites and the host know it.
//
// The host creates one Owner per method instance and hands it to attach() in the
// AttachContext; every intervention the method installs names it. Through it the host
// — never the method — switches the instance's interventions on and off and scales
// them (composition, adapter switching, evaluation without the adapter), removes
// whatever the instance left behind when it goes, and names the plugin and instance
// when a closure throws: "plugin 'x' (instance 'y') at site 'layers.3.attn.q': ...".
//
// A handle: plugins hold a reference and call functions that live in libtessera_sdk;
// its data layout is the SDK's own and may grow in a minor version.
#pragma once

#include <string>

namespace tessera {

class Owner {
 public:
  const std::string& plugin() const;    // plugin id: "lora"
  const std::string& instance() const;  // instance name from the config
  bool enabled() const;                 // false: every intervention of the owner is skipped
  double scale() const;                 // how much of each contribution counts (1: all; see sites.h)

  Owner(const Owner&) = delete;
  Owner& operator=(const Owner&) = delete;

 protected:
  Owner() = default;
  ~Owner() = default;
};

}  // namespace tessera
