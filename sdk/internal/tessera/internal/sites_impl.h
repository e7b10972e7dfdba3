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

// A factor a composition group multiplies an owner's contributions by, worked out in each
// forward pass (runtime/composition.h): a route group's sample mask, a gated group's gate.
// The site asks for the shape its contribution has; a factor refuses a shape it cannot give.
class ContributionFactor {
 public:
  virtual ~ContributionFactor() = default;
  // For a contribution shaped like x's rows (..., F) at `site`, x being what it reads (a
  // branch's or a scale's input, a sequential module's h): (..., 1), broadcastable against it.
  virtual Tensor per_token(const std::string& site, const Tensor& x) const = 0;
  // For a contribution with no tokens, batch first (a prefix's keys and values): (B), or
  // (B, 2) to weigh keys (column 0) and values (column 1) apart. x: the site's input (B, T, H), or
  // (N, H), the real tokens' rows, while the host runs unpadded.
  virtual Tensor per_sample(const std::string& site, const Tensor& x, std::int64_t batch) const = 0;
  // For a parameter delta, which reads nothing and is one for every sample: a scalar ().
  virtual Tensor scalar(const std::string& site) const = 0;
  // Whether a prefix's keys and values may be weighed: a gate's yes; a route mask's no (a
  // zeroed key still takes part in the softmax, so the sample would not get what it would alone).
  virtual bool weighs_prefixes() const { return true; }
};

class OwnerImpl final : public Owner, public std::enable_shared_from_this<OwnerImpl> {
 public:
  static std::shared_ptr<OwnerImpl> create(std::string plugin, std::string instance);
  OwnerImpl(std::string plugin, std::string instance);  // through create(): sites share it
  ~OwnerImpl();

  void set_enabled(bool on) { enabled_ = on; }
  void set_scale(double alpha) { scale_ = alpha; }
  // The factors of the groups the owner is in (innermost first); none: α alone.
  void set_factors(std::vector<std::shared_ptr<const ContributionFactor>> f) { factors_ = std::move(f); }
  const std::vector<std::shared_ptr<const ContributionFactor>>& factors() const { return factors_; }
  // Owners with the same non-zero parallel group read the same input where their
  // interventions chain (sequential modules, transforms): their changes add up instead.
  void set_parallel_group(int id) { parallel_group_ = id; }
  int parallel_group() const { return parallel_group_; }
  // Removes every intervention of this owner from every site it installed one on.
  void remove_all();
  std::size_t site_count() const { return sites_.size(); }
  const std::set<SiteCore*>& sites() const { return sites_; }  // where it has interventions
  // "plugin 'x' (instance 'y') at site 's': "
  std::string where(const std::string& site) const;

  static OwnerImpl& of(const Owner& o) { return const_cast<OwnerImpl&>(static_cast<const OwnerImpl&>(o)); }

 private:
  friend class Owner;
  friend class SiteCore;
  std::string plugin_, instance_;
  bool enabled_ = true;
  double scale_ = 1.0;
  std::vector<std::shared_ptr<const ContributionFactor>> factors_;
  int parallel_group_ = 0;
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
  bool token_wise = false;  // a sublayer module that maps each token on its own
  bool positionless = false;  // a prefix whose keys are not earlier tokens (SDK 2.8)
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
  // The kinds of intervention `owner` has installed here, as error messages name them ("a
  // prompt", "an output transform", …): what a composition checks before the first forward
  // pass (runtime/composition.cpp).
  virtual std::vector<std::string> kinds(const OwnerImpl& owner) const = 0;

  template <class Fn>
  void add(Entries<Fn>& list, const Owner& owner, Fn fn, bool token_wise = false) {
    if (!fn) throw std::invalid_argument("site '" + name_ + "': an empty function was installed");
    list.push_back({claim(owner), std::move(fn), token_wise});
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

// A base tensor kept in another form than a dense tensor — a quantized weight (NF4): the
// chosen storage stage hands one to a parameter site at load time, and the site asks it
// for the dense value whenever a product or a plugin needs one.
class StoredTensor {
 public:
  virtual ~StoredTensor() = default;
  virtual const char* format() const = 0;            // "nf4"
  virtual Tensor dense() const = 0;                  // dequantized, in the model's compute dtype and device
  virtual std::int64_t stored_bytes() const = 0;
  // A CPU f32 matrix whose rows are whole blocks answers column_step() > 0 (its block size):
  // dequantize_row writes row r's columns [c0, c1) — c0 a multiple of column_step(), c1 one
  // too or the row's end — as f32, the same values dense() has there. The blockwise product
  // multiplies through such slabs, a cache-sized piece at a time, and never holds the whole
  // dense weight. 0 (the default): dense() only.
  virtual std::int64_t column_step() const { return 0; }
  virtual std::int64_t rows() const { return 0; }
  virtual void dequantize_row(std::int64_t /*r*/, std::int64_t /*c0*/, std::int64_t /*c1*/, float* /*out*/) const {}
};

class ParameterSiteImpl;

// x Wᵀ + b through a stored weight, dequantized in forward and again for the input's
// gradient, never kept for backward (the frozen weight needs no gradient): a slab at a time
// where the weight has blocks of rows (column_step() > 0) and x is CPU f32, whole otherwise.
Tensor recomputed_linear(const Tensor& x, const StoredTensor& w, const Tensor& b);

// The slab-at-a-time products (blockwise_product.cpp), for x (..., in) and g (..., out) on
// a CPU in f32 and w with column_step() > 0: x Wᵀ (..., out), and g W (..., in).
Tensor blockwise_forward(const Tensor& x, const StoredTensor& w);
Tensor blockwise_input_grad(const Tensor& g, const StoredTensor& w, std::int64_t in_features);

// Rows [start, start + rows) of another site's stored weight: GPT-2's q, k and v views of
// its fused c_attn once c_attn is quantized. Keeps nothing of its own.
class RowBlock final : public StoredTensor {
 public:
  RowBlock(const ParameterSiteImpl& whole, std::int64_t start, std::int64_t rows) : whole_(whole), start_(start), rows_(rows) {}
  const char* format() const override;
  Tensor dense() const override;
  std::int64_t stored_bytes() const override { return 0; }
  std::int64_t column_step() const override;
  std::int64_t rows() const override { return rows_; }
  void dequantize_row(std::int64_t r, std::int64_t c0, std::int64_t c1, float* out) const override;
  const ParameterSiteImpl& whole() const { return whole_; }
  std::int64_t start() const { return start_; }

 private:
  const ParameterSiteImpl& whole_;
  std::int64_t start_, rows_;
};

class ParameterSiteImpl final : public ParameterSite, public SiteCore {
 public:
  ParameterSiteImpl(std::string name, std::string hf_name, Tensor base);
  static ParameterSiteImpl& of(ParameterSite& s) { return static_cast<ParameterSiteImpl&>(s); }
  static const ParameterSiteImpl& of(const ParameterSite& s) { return static_cast<const ParameterSiteImpl&>(s); }
  // Keeps the base as `stored` from now on; the dense tensor is dropped.
  void store(std::unique_ptr<StoredTensor> stored);
  // Keeps `dense` as the base from now on: a weight loaded as stored blocks (a GGUF file's,
  // streamed) that the storage stage keeps dense after all.
  void unstore(Tensor dense);
  const StoredTensor* stored() const { return stored_.get(); }
  c10::IntArrayRef sizes() const { return shape_; }
  std::int64_t numel() const;
  std::int64_t stored_bytes() const;  // what the base takes in memory
  // base() of a stored tensor keeps a dequantized copy for the plugin that asked; the host
  // drops it once methods are attached and prepared, so training holds only the stored form.
  void drop_dense_copy() const { dense_copy_ = Tensor(); }
  Tensor base_value() const { return stored_ ? stored_->dense() : base_; }  // without keeping a copy
  const Tensor& dense_base() const { return base_; }  // undefined while stored
  bool has_dense_copy() const { return dense_copy_.defined(); }

 private:
  friend class ParameterSite;
  void drop(const OwnerImpl& owner) override;
  std::vector<std::string> kinds(const OwnerImpl& owner) const override;
  Tensor base_;
  std::vector<std::int64_t> shape_;
  std::unique_ptr<StoredTensor> stored_;
  mutable Tensor dense_copy_;
  Entries<TensorThunk> deltas_;
  struct Sparse {
    Tensor indices;     // (k) int64 into the flattened base
    TensorThunk values;  // () -> (k)
    Tensor operator()() const { return values(); }
    explicit operator bool() const { return static_cast<bool>(values); }
  };
  Entries<Sparse> sparse_;
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
  // This site reads the same tensor as `group`'s first site (LinearSite::input_group).
  void read_input_of(const LinearSiteImpl& first) { input_group_ = first.input_group_; }

 private:
  friend class LinearSite;
  std::string input_group_;
  void drop(const OwnerImpl& owner) override;
  std::vector<std::string> kinds(const OwnerImpl& owner) const override;
  ParameterSite* weight_;  // not owned: the model owns its parameter sites
  ParameterSite* bias_;
  Entries<TensorThunk> weight_deltas_, input_scales_, output_scales_;
  Entries<TensorMap> branches_, weight_transforms_;
  Entries<RowScaledBranch> row_branches_;  // SDK 2.8: branches that take the per-row weight inside
};

class SublayerSiteImpl final : public SublayerSite, public SiteCore {
 public:
  SublayerSiteImpl(std::string name, std::string hf_path, std::int64_t hidden_size);
  // x: what the block read, h: its output, residual: the stream h is added to (BERT: x;
  // pre-norm blocks: before their norm), norm: what the block applies after the add
  // (identity in pre-norm blocks), each (B, T, H) or (N, H).
  Tensor apply(const Tensor& x, Tensor h, const Tensor& residual, const TensorMap& norm) const;
  static const TensorMap& identity();  // the norm of a pre-norm block
  // Every enabled intervention maps tokens on their own: apply() may take (N, H) rows.
  bool token_wise() const;

 private:
  friend class SublayerSite;
  void drop(const OwnerImpl& owner) override;
  std::vector<std::string> kinds(const OwnerImpl& owner) const override;
  std::int64_t hidden_size_;
  Entries<ResidualModule> sequential_;  // a plain sequential module ignores r and N
  Entries<TensorMap> parallel_, gates_;
};

// An input prefix with its declared length.
struct InputPrefix {
  std::int64_t length = 0;
  KVFromInput fn;
  std::pair<Tensor, Tensor> operator()(const Tensor& x) const { return fn(x); }
  explicit operator bool() const { return static_cast<bool>(fn); }
};

class AttentionSiteImpl final : public AttentionSite, public SiteCore {
 public:
  // query_heads: 0 = num_heads (no grouped-query attention)
  AttentionSiteImpl(std::string name, std::string hf_path, std::int64_t num_heads, std::int64_t head_dim, std::int64_t query_heads = 0);
  // Concatenated input-free prefixes for a batch: (B, heads, P, head_dim) each; undefined when none.
  std::pair<Tensor, Tensor> prefix(std::int64_t batch) const;
  // How many keys of the last prefix(batch) count as earlier tokens (add_prefix's); the rest
  // (add_positionless_prefix's, SDK 2.8) leave the tokens' positions alone. They come first:
  // [positionless ; positioned], so a relative bias reads the positioned ones as the nearest past.
  std::int64_t positioned_prefix_length() const;
  // The input prefixes' total declared length, and their (K, V) for the attention input x
  // (B, T, H): (B, heads, P_in, head_dim) each, undefined when none.
  std::int64_t input_prefix_length() const;
  std::pair<Tensor, Tensor> input_prefix(const Tensor& x) const;
  // The last prefix(batch) of this site with each owner's part weighed by its groups'
  // factors from the attention input x (B, T, H) (or the unpadded rows: a route mask reads
  // none of it): the architecture calls it where the layer's input exists. kv unchanged
  // when no owner of a prefix is in a gated or route group.
  std::pair<Tensor, Tensor> weigh_prefix(const std::pair<Tensor, Tensor>& kv, const Tensor& x) const;
  Tensor hook_scores(Tensor scores) const;

 private:
  friend class AttentionSite;
  void drop(const OwnerImpl& owner) override;
  std::vector<std::string> kinds(const OwnerImpl& owner) const override;
  std::int64_t num_heads_, head_dim_, query_heads_;
  Entries<KVPrefix> prefixes_;
  mutable std::vector<std::int64_t> prefix_lengths_;  // of each enabled prefix in the last prefix(batch)
  Entries<InputPrefix> input_prefixes_;
  Entries<TensorMap> score_hooks_;
};

class EmbeddingSiteImpl final : public EmbeddingSite, public SiteCore {
 public:
  EmbeddingSiteImpl(std::string name, std::string hf_path, std::int64_t hidden_size);
  // (B, T, H) -> (B, P + T, H); P is returned through prompt_length.
  Tensor prepend(const Tensor& embedded, std::int64_t* prompt_length) const;
  // The first layer's input x0 (B, S, H) through every transform, then shown to every tap.
  Tensor enter(const Tensor& x0) const;

 private:
  friend class EmbeddingSite;
  void drop(const OwnerImpl& owner) override;
  std::vector<std::string> kinds(const OwnerImpl& owner) const override;
  std::int64_t hidden_size_;
  Entries<PerBatch> prompts_;
  Entries<HiddenTap> taps_;
  Entries<TensorMap> transforms_;
};

class OutputSiteImpl final : public OutputSite, public SiteCore {
 public:
  OutputSiteImpl(std::string name, std::string hf_path, std::int64_t hidden_size);
  Tensor apply(Tensor h) const;  // (B, T, H) through every transform in install order
  // Whether a transform that is on may read other positions than its own (not token-wise).
  bool reads_sequence() const;

 private:
  friend class OutputSite;
  void drop(const OwnerImpl& owner) override;
  std::vector<std::string> kinds(const OwnerImpl& owner) const override;
  std::int64_t hidden_size_;
  Entries<TensorMap> transforms_;
};

// A layer as a site runs it: h (B, T, H) and the routers' kept tokens (B, T) bool, or
// undefined without routers; kept tokens must attend to kept tokens only (the layer may
// gather them, and return anything at the others: the site keeps h there).
using LayerFn = std::function<Tensor(const Tensor& h, const Tensor& kept)>;

class LayerSiteImpl final : public LayerSite, public SiteCore {
 public:
  LayerSiteImpl(std::string name, std::string hf_path, std::int64_t index);
  // Shows h to the input taps, runs `layer` on it under the routers, adds the parallel
  // modules, then runs the taps.
  Tensor run(const Tensor& h, const LayerFn& layer) const;

 private:
  friend class LayerSite;
  void drop(const OwnerImpl& owner) override;
  std::vector<std::string> kinds(const OwnerImpl& owner) const override;
  std::int64_t index_;
  Entries<HiddenTap> taps_, input_taps_;
  Entries<TensorMap> routers_, parallel_;
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
  // The forward context closures read (ModelView::attention_mask …), set by the architecture
  // (mask, unpadded rows) and the task (tags) as a forward pass starts.
  // Per forward pass, so set from the architectures' const forward functions.
  void set_attention_mask(Tensor mask) const { mask_ = std::move(mask); }
  // rows: the flat (B·S) positions of the rows token-wise closures see, undefined while
  // padded; the samples (rows / S) are worked out only when a closure asks.
  void set_token_rows(Tensor rows, std::int64_t seq) const { rows_ = std::move(rows), seq_ = seq; }
  void set_sample_tags(std::map<std::string, std::vector<std::string>> tags) const { tags_ = std::move(tags); }
  // Offers `table` (beginning with a tessera_extension_header) under `id`; it must outlive the view.
  void set_extension(const std::string& id, const void* table) { extensions_[id] = table; }
  // Whether an output transform that is not token-wise is on: it may read every earlier
  // position, so generation runs each step over the whole sequence rather than a KV cache's
  // new tokens.
  bool output_reads_sequence() const { return output_site_ && output_site_->reads_sequence(); }

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
  // Declares that these linear sites read one input tensor in every forward pass.
  static void share_input(std::initializer_list<LinearSiteImpl*> sites) {
    for (auto* site : sites) site->read_input_of(**sites.begin());
  }
  SublayerSiteImpl* sublayer(const std::string& canonical, const std::string& hf, std::int64_t hidden) { return own(sublayers_, canonical, hf, hidden); }
  AttentionSiteImpl* attention_site(const std::string& canonical, const std::string& hf, std::int64_t heads, std::int64_t head_dim,
                                    std::int64_t query_heads = 0) {
    return own(attentions_, canonical, hf, heads, head_dim, query_heads);
  }
  LayerSiteImpl* layer_site(const std::string& canonical, const std::string& hf, std::int64_t index) {
    return own(layer_sites_, canonical, hf, index);
  }
  // The output site of the backbone, "output" (hf: the module whose output it is).
  OutputSiteImpl* output(const std::string& hf, std::int64_t hidden) {
    output_site_ = std::make_unique<OutputSiteImpl>("output", hf, hidden);
    return output_site_.get();
  }

  ModelInfo info_;
  bool training_ = false;
  std::unique_ptr<EmbeddingSiteImpl> embed_site_;
  std::unique_ptr<OutputSiteImpl> output_site_;
  std::vector<std::unique_ptr<LinearSiteImpl>> linears_;
  std::vector<std::unique_ptr<SublayerSiteImpl>> sublayers_;
  std::vector<std::unique_ptr<AttentionSiteImpl>> attentions_;
  std::vector<std::unique_ptr<LayerSiteImpl>> layer_sites_;
  std::vector<std::unique_ptr<ParameterSiteImpl>> params_;

 private:
  std::map<std::string, const void*> extensions_;
  mutable Tensor mask_, rows_;
  mutable std::int64_t seq_ = 0;
  mutable std::map<std::string, std::vector<std::string>> tags_;
};

}  // namespace tessera
