// Owners and the bookkeeping between owners and the sites that hold their interventions.
#include <tessera/internal/sites_impl.h>

namespace tessera {

const std::string& Owner::plugin() const { return OwnerImpl::of(*this).plugin_; }
const std::string& Owner::instance() const { return OwnerImpl::of(*this).instance_; }
bool Owner::enabled() const { return OwnerImpl::of(*this).enabled_; }
double Owner::scale() const { return OwnerImpl::of(*this).scale_; }

std::shared_ptr<OwnerImpl> OwnerImpl::create(std::string plugin, std::string instance) {
  return std::make_shared<OwnerImpl>(std::move(plugin), std::move(instance));
}

OwnerImpl::OwnerImpl(std::string plugin, std::string instance) : plugin_(std::move(plugin)), instance_(std::move(instance)) {}
OwnerImpl::~OwnerImpl() = default;  // sites hold owners, so none is left here

void OwnerImpl::remove_all() {
  const auto sites = sites_;  // remove_owner() edits sites_
  for (SiteCore* s : sites) s->remove_owner(*this);
}

std::string OwnerImpl::where(const std::string& site) const {
  return "plugin '" + plugin_ + "' (instance '" + instance_ + "') at site '" + site + "': ";
}

SiteCore::~SiteCore() {
  for (const auto& o : owners_) o->sites_.erase(this);
}

std::shared_ptr<OwnerImpl> SiteCore::claim(const Owner& owner) {
  std::shared_ptr<OwnerImpl> o = OwnerImpl::of(owner).shared_from_this();
  owners_.insert(o);
  o->sites_.insert(this);
  return o;
}

void SiteCore::remove_owner(const OwnerImpl& owner) {
  drop(owner);
  auto& mutable_owner = const_cast<OwnerImpl&>(owner);
  mutable_owner.sites_.erase(this);
  owners_.erase(mutable_owner.shared_from_this());
}

void SiteCore::rethrow(const OwnerImpl& owner, const std::string& what) const {
  std::string msg = what;
  auto cut = msg.find("\nException raised from");  // libtorch appends a C++ backtrace
  if (cut != std::string::npos) msg.resize(cut);
  throw InterventionError(owner.where(name_) + msg);
}

}  // namespace tessera
