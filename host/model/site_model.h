// What every architecture shares: it owns its sites and hands them out as a ModelView.
// An architecture creates its sites through these helpers while it loads.
#pragma once

#include <tessera/model_view.h>

#include <memory>
#include <string>
#include <vector>

namespace tessera {

// An encoder's output: hidden states over [prompt tokens ; input tokens].
struct Encoded {
  Tensor hidden;                   // (B, P + T, H)
  Tensor mask;                     // (B, P + T), 1 = real token (prompt tokens are real)
  std::int64_t prompt_length = 0;  // P
};

// Padding tokens dropped: token-wise work (linear sites, norms, activations, dropout)
// runs on the N real tokens' rows; attention runs on the padded layout rebuilt from
// `index`, the flat positions of those tokens in (B, S).
struct Unpadded {
  Tensor index;  // (N) int64 into B * S
  std::int64_t batch = 0, seq = 0;
  static Unpadded of(const Tensor& mask);  // mask (B, S), 1 = real token
  Tensor rows(const Tensor& x) const;      // (B, S, …) -> (N, …)
  Tensor padded(const Tensor& x) const;    // (N, …) -> (B, S, …), zeros at padding
};

class SiteModel : public ModelView {
 public:
  const ModelInfo& info() const override { return info_; }
  bool training() const override { return training_; }
  void train(bool on) { training_ = on; }
  // No sublayer or layer site has interventions: every method on the model is token-wise,
  // so padding tokens can be dropped (see Unpadded).
  bool token_wise_only() const;
  // Tensors in the checkpoint the architecture does not use (pooler, task heads, buffers).
  const std::vector<std::string>& ignored_tensors() const { return ignored_; }

  std::vector<LinearSite*> linear_sites() override { return raw(linears_); }
  std::vector<SublayerSite*> sublayer_sites() override { return raw(sublayers_); }
  std::vector<AttentionSite*> attention_sites() override { return raw(attentions_); }
  std::vector<LayerSite*> layer_sites() override { return raw(layer_sites_); }
  EmbeddingSite* embedding_site() override { return embed_site_.get(); }
  std::vector<ParameterSite*> parameter_sites() override { return raw(params_); }

 protected:
  template <class T, class... Args>
  static T* own(std::vector<std::unique_ptr<T>>& into, Args&&... args) {
    into.push_back(std::make_unique<T>(std::forward<Args>(args)...));
    return into.back().get();
  }
  ParameterSite* param(const std::string& canonical, const std::string& hf, Tensor t) { return own(params_, canonical, hf, std::move(t)); }
  LinearSite* linear(const std::string& canonical, const std::string& hf, ParameterSite* w, ParameterSite* b) {
    return own(linears_, canonical, hf, w, b);
  }
  SublayerSite* sublayer(const std::string& canonical, const std::string& hf, std::int64_t hidden) { return own(sublayers_, canonical, hf, hidden); }
  AttentionSite* attention_site(const std::string& canonical, const std::string& hf, std::int64_t heads, std::int64_t head_dim) {
    return own(attentions_, canonical, hf, heads, head_dim);
  }
  LayerSite* layer_site(const std::string& canonical, const std::string& hf, std::int64_t index) { return own(layer_sites_, canonical, hf, index); }

  ModelInfo info_;
  bool training_ = false;
  std::vector<std::string> ignored_;
  std::unique_ptr<EmbeddingSite> embed_site_;

 private:
  template <class T>
  static std::vector<T*> raw(const std::vector<std::unique_ptr<T>>& v) {
    std::vector<T*> out;
    for (const auto& p : v) out.push_back(p.get());
    return out;
  }
  std::vector<std::unique_ptr<ParameterSite>> params_;
  std::vector<std::unique_ptr<LinearSite>> linears_;
  std::vector<std::unique_ptr<SublayerSite>> sublayers_;
  std::vector<std::unique_ptr<AttentionSite>> attentions_;
  std::vector<std::unique_ptr<LayerSite>> layer_sites_;
};

}  // namespace tessera
