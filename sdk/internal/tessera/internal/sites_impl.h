// The host's side of the sites: their data, how each kind executes its interventions in
// the documented order (tessera/sites.h), owners the host switches and scales, and the
// model view's registry of sites and extensions.
//
// Not installed and not on a plugin's include path: what a plugin compiles against is
// the handle classes alone, so everything here may change in a minor version. The
// functions live in libtessera_sdk beside the handles' own.
#pragma once

#include <tessera/dense_linear.h>
#include <tessera/model_view.h>

#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace tessera {

class SiteCore;

class OwnerImpl final : public Owner, public std::enable_shared_from_this<OwnerImpl> {
 public:
  static std::shared_ptr<OwnerImpl> create(std::string plugin, std::string instance);
  OwnerImpl(std::string plugin, std::string instance);  // through create(): sites share it
  ~OwnerImpl();

  void set_enabled(bool on) { enabled_ = on; }
  void set_scale(double alpha) { scale_ = alpha; }
  // Removes every intervention of this owner from every site it installed one on.
  void remove_all();
  std::size_t site_count() const { return sites_.size(); }
  // "plugin 'x' (instance 'y') at site 's': "
  std::string where(const std::string& site) const;

  static OwnerImpl& of(const Owner& o) { return const_cast<OwnerImpl&>(static_cast<const OwnerImpl&>(o)); }

 private:
  friend class Owner;
  friend class SiteCore;
  std::string plugin_, instance_;
  bool enabled_ = true;
  double scale_ = 1.0;
  std::set<SiteCore*> sites_;  // where it has interventions; sites tell it when they go
};

// Thrown when an intervention's closure throws: names plugin, instance and site.
class InterventionError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

template <class Fn>
struct Entry {
  std::shared_ptr<OwnerImpl> owner;
  Fn fn;
  bool on() const { return owner->enabled(); }
  double alpha() const { return owner->scale(); }
};
template <class Fn>
using Entries = std::vector<Entry<Fn>>;

// What every site implementation shares: its names and the bookkeeping of its owners.
class SiteCore {
 public:
  SiteCore(std::string name, std::string hf_path) : name_(std::move(name)), hf_path_(std::move(hf_path)) {}
  virtual ~SiteCore();
  SiteCore(const SiteCore&) = delete;
  SiteCore& operator=(const SiteCore&) = delete;

  const std::string& site_name() const { return name_; }
  const std::string& site_hf_path() const { return hf_path_; }
  // Drops every intervention of `owner` (the owner forgets this site).
  void remove_owner(const OwnerImpl& owner);

  template <class Fn>
  void add(Entries<Fn>& list, const Owner& owner, Fn fn) {
    if (!fn) throw std::invalid_argument("site '" + name_ + "': an empty function was installed");
    list.push_back({claim(owner), std::move(fn)});
  }
  // e.fn(args...), with anything it throws re-raised naming plugin, instance and site.
  template <class Fn, class... Args>
  auto call(const Entry<Fn>& e, Args&&... args) const -> decltype(e.fn(std::forward<Args>(args)...)) {
    try {
      return e.fn(std::forward<Args>(args)...);
    } catch (const InterventionError&) {
      throw;
    } catch (const std::exception& x) {
      rethrow(*e.owner, x.what());
    } catch (...) {
      rethrow(*e.owner, "unknown exception");
    }
  }

 protected:
  virtual void drop(const OwnerImpl& owner) = 0;  // erase the owner's entries from every list

  std::string name_, hf_path_;

 private:
  std::shared_ptr<OwnerImpl> claim(const Owner& owner);
  [[noreturn]] void rethrow(const OwnerImpl& owner, const std::string& what) const;
  std::set<std::shared_ptr<OwnerImpl>> owners_;
};

class ParameterSiteImpl final : public ParameterSite, public SiteCore {
 public:
  ParameterSiteImpl(std::string name, std::string hf_name, Tensor base);
  static ParameterSiteImpl& of(ParameterSite& s) { return static_cast<ParameterSiteImpl&>(s); }
  static const ParameterSiteImpl& of(const ParameterSite& s) { return static_cast<const ParameterSiteImpl&>(s); }

 private:
  friend class ParameterSite;
  void drop(const OwnerImpl& owner) override;
  Tensor base_;
  Entries<TensorThunk> deltas_;
};

class LinearSiteImpl final : public LinearSite, public SiteCore {
 public:
  LinearSiteImpl(std::string name, std::string hf_path, ParameterSite* weight, ParameterSite* bias);
  static LinearSiteImpl& of(LinearSite& s) { return static_cast<LinearSiteImpl&>(s); }
  static const LinearSiteImpl& of(const LinearSite& s) { return static_cast<const LinearSiteImpl&>(s); }

  Tensor forward(const Tensor& x) const;  // (..., in) -> (..., out), in the documented order
  // act(forward(x)) ∘ times (times: (..., out) or undefined), the activation and the
  // product inside the GEMM's epilogue when no output scale or branch comes between.
  Tensor forward(const Tensor& x, Activation act, const Tensor& times = {}) const;

 private:
  friend class LinearSite;
  void drop(const OwnerImpl& owner) override;
  ParameterSite* weight_;  // not owned: the model owns its parameter sites
  ParameterSite* bias_;
  Entries<TensorThunk> weight_deltas_, input_scales_, output_scales_;
  Entries<TensorMap> branches_;
};

class SublayerSiteImpl final : public SublayerSite, public SiteCore {
 public:
  SublayerSiteImpl(std::string name, std::string hf_path, std::int64_t hidden_size);
  Tensor apply(const Tensor& x, Tensor h) const;  // x: block input, h: block output, (B, T, H)

 private:
  friend class SublayerSite;
  void drop(const OwnerImpl& owner) override;
  std::int64_t hidden_size_;
  Entries<TensorMap> sequential_, parallel_, gates_;
};

class AttentionSiteImpl final : public AttentionSite, public SiteCore {
 public:
  AttentionSiteImpl(std::string name, std::string hf_path, std::int64_t num_heads, std::int64_t head_dim);
  // Concatenated prefixes for a batch: (B, heads, P, head_dim) each; undefined when none.
  std::pair<Tensor, Tensor> prefix(std::int64_t batch) const;
  Tensor hook_scores(Tensor scores) const;

 private:
  friend class AttentionSite;
  void drop(const OwnerImpl& owner) override;
  std::int64_t num_heads_, head_dim_;
  Entries<KVPrefix> prefixes_;
  Entries<TensorMap> score_hooks_;
};

class EmbeddingSiteImpl final : public EmbeddingSite, public SiteCore {
 public:
  EmbeddingSiteImpl(std::string name, std::string hf_path, std::int64_t hidden_size);
  // (B, T, H) -> (B, P + T, H); P is returned through prompt_length.
  Tensor prepend(const Tensor& embedded, std::int64_t* prompt_length) const;

 private:
  friend class EmbeddingSite;
  void drop(const OwnerImpl& owner) override;
  std::int64_t hidden_size_;
  Entries<PerBatch> prompts_;
};

class LayerSiteImpl final : public LayerSite, public SiteCore {
 public:
  LayerSiteImpl(std::string name, std::string hf_path, std::int64_t index);
  // Runs `layer` on h under the routers, then the taps.
  Tensor run(const Tensor& h, const std::function<Tensor(const Tensor&)>& layer) const;

 private:
  friend class LayerSite;
  void drop(const OwnerImpl& owner) override;
  std::int64_t index_;
  Entries<HiddenTap> taps_;
  Entries<TensorMap> routers_;
};

// The model view's data: the sites an architecture creates while it loads, its facts,
// and the extension tables the host offers. Architectures derive from it.
class ModelViewImpl : public ModelView {
 public:
  ModelViewImpl();
  virtual ~ModelViewImpl();
  static ModelViewImpl& of(ModelView& m) { return static_cast<ModelViewImpl&>(m); }
  static const ModelViewImpl& of(const ModelView& m) { return static_cast<const ModelViewImpl&>(m); }

  void train(bool on) { training_ = on; }
  // Offers `table` (beginning with a tessera_extension_header) under `id`; it must outlive the view.
  void set_extension(const std::string& id, const void* table) { extensions_[id] = table; }

 protected:
  friend class ModelView;
  template <class T, class... Args>
  static T* own(std::vector<std::unique_ptr<T>>& into, Args&&... args) {
    into.push_back(std::make_unique<T>(std::forward<Args>(args)...));
    return into.back().get();
  }
  ParameterSiteImpl* param(const std::string& canonical, const std::string& hf, Tensor t) { return own(params_, canonical, hf, std::move(t)); }
  LinearSiteImpl* linear(const std::string& canonical, const std::string& hf, ParameterSite* w, ParameterSite* b) {
    return own(linears_, canonical, hf, w, b);
  }
  SublayerSiteImpl* sublayer(const std::string& canonical, const std::string& hf, std::int64_t hidden) { return own(sublayers_, canonical, hf, hidden); }
  AttentionSiteImpl* attention_site(const std::string& canonical, const std::string& hf, std::int64_t heads, std::int64_t head_dim) {
    return own(attentions_, canonical, hf, heads, head_dim);
  }
  LayerSiteImpl* layer_site(const std::string& canonical, const std::string& hf, std::int64_t index) {
    return own(layer_sites_, canonical, hf, index);
  }

  ModelInfo info_;
  bool training_ = false;
  std::unique_ptr<EmbeddingSiteImpl> embed_site_;
  std::vector<std::unique_ptr<LinearSiteImpl>> linears_;
  std::vector<std::unique_ptr<SublayerSiteImpl>> sublayers_;
  std::vector<std::unique_ptr<AttentionSiteImpl>> attentions_;
  std::vector<std::unique_ptr<LayerSiteImpl>> layer_sites_;
  std::vector<std::unique_ptr<ParameterSiteImpl>> params_;

 private:
  std::map<std::string, const void*> extensions_;
};

}  // namespace tessera
