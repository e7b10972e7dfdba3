// LST — Ladder Side-Tuning (Sung, Cho, Bansal 2022, "LST: Ladder Side-Tuning for Parameter
// and Memory Efficient Transfer Learning", arXiv:2206.06522), as its authors' code runs it:
// a side network r times narrower than the backbone, its blocks initialised from the
// backbone's own weights pruned, fed through gated ladders from every backbone layer, and
// its output (up-projected) replacing the backbone's before the task head. Nothing inside
// the backbone is trained, so the backbone builds no autograd graph: the method's point.
// The math and every key: README.md beside this.
//
//   s_0 = W_0↓ x_0 + b_0↓                                   x_0: the embeddings (B, T, H)
//   for layer i:  μ_i = σ(α_i / T)
//                 s   = μ_i s + (1 − μ_i)(W_i↓ h_i + b_i↓)    h_i: backbone layer i's output
//                 s   = SideBlock_i(s)                       a BERT block of width H / r
//   output = W↑ s + b↑                                       (B, T, H), read by the task head
#include <tessera/dropout.h>
#include <tessera/plugin.h>
#include <tessera/state.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <limits>
#include <map>
#include <memory>

namespace {

using tessera::Tensor;

// The `keep` rows with the largest score, in their original order (as a pruning mask keeps them).
Tensor top_rows(const Tensor& score, std::int64_t keep) {
  return std::get<0>(std::get<1>(at::topk(score, keep)).sort());
}

// Structured pruning by weight magnitude (the L1 rule of the authors' pruning code, with
// the weights as importance): each matrix keeps the input columns its predecessor kept and
// the rows whose kept part has the largest L1 norm. q, k and v keep the same rows (scored
// by the product of their magnitudes); o and the FFN's down projection choose the block's
// output dimensions afresh, as the authors' "without residual" variant does.
struct Pruner {
  tessera::ModelView& model;
  std::int64_t d, inner;  // side width, side FFN width

  Tensor base(const std::string& name) const {
    const auto found = model.match_parameters({name});
    if (found.size() != 1) throw std::runtime_error("LST needs the base tensor '" + name + "'");
    return found[0]->base().detach().to(at::kFloat).clone();  // held by value: a quantized base's copy goes
  }

  // Block i's tensors from the backbone's layer i, entered with the kept dimensions `prev`
  // of the residual stream; returns them and leaves `prev` at the block's output dimensions.
  std::map<std::string, Tensor> block(std::int64_t i, Tensor& prev) const {
    const std::string p = "layers." + std::to_string(i) + ".";
    std::map<std::string, Tensor> out;
    const Tensor q = base(p + "attn.q.weight"), k = base(p + "attn.k.weight"), v = base(p + "attn.v.weight");
    const Tensor cols = q.index_select(1, prev).abs() * k.index_select(1, prev).abs() * v.index_select(1, prev).abs();
    const Tensor qkv = top_rows(cols.sum(1), d);
    for (const auto& [ours, hf] : {std::pair{"attn.q", "attention.self.query"}, {"attn.k", "attention.self.key"}, {"attn.v", "attention.self.value"}}) {
      out[std::string(hf) + ".weight"] = base(p + ours + ".weight").index_select(0, qkv).index_select(1, prev);
      out[std::string(hf) + ".bias"] = base(p + ours + ".bias").index_select(0, qkv);
    }
    prev = linear(p + "attn.o", "attention.output.dense", qkv, d, out);
    norm(p + "attn.norm", "attention.output.LayerNorm", prev, out);
    const Tensor mid = linear(p + "mlp.up", "intermediate.dense", prev, inner, out);
    prev = linear(p + "mlp.down", "output.dense", mid, d, out);
    norm(p + "mlp.norm", "output.LayerNorm", prev, out);
    return out;
  }

  // A linear map's kept columns `in` and its `rows` strongest rows; returns those rows.
  Tensor linear(const std::string& ours, const std::string& hf, const Tensor& in, std::int64_t rows, std::map<std::string, Tensor>& out) const {
    const Tensor w = base(ours + ".weight").index_select(1, in);
    const Tensor kept = top_rows(w.abs().sum(1), rows);
    out[hf + ".weight"] = w.index_select(0, kept);
    out[hf + ".bias"] = base(ours + ".bias").index_select(0, kept);
    return kept;
  }

  void norm(const std::string& ours, const std::string& hf, const Tensor& kept, std::map<std::string, Tensor>& out) const {
    out[hf + ".weight"] = base(ours + ".weight").index_select(0, kept);
    out[hf + ".bias"] = base(ours + ".bias").index_select(0, kept);
  }
};

class Lst final : public tessera::Method {
 public:
  tessera::MethodSchema describe() const override {
    using tessera::ParamType;
    return {{
        {"reduction_factor", ParamType::Int, std::int64_t{8}, "r: the side network is hidden / r wide (FFN: intermediate / r); must divide both", 2, 4096, {}},
        {"gate_T", ParamType::Float, 0.1, "the ladder gates' temperature T: μ = σ(α / T)", 1e-6, std::nullopt, {}},
        {"gate_alpha", ParamType::Float, 0.0, "every gate's α at the start (0: μ = ½)", std::nullopt, std::nullopt, {}},
        {"dropout", ParamType::Float, 0.1, "the side blocks' dropout (hidden states and attention probabilities), in training", 0.0, 0.99, {}},
        {"layer_norm_eps", ParamType::Float, 0.0, "the side blocks' LayerNorm epsilon; 0: the architecture's (BERT 1e-12, RoBERTa 1e-5)", 0.0, 1.0, {}},
        {"init_std", ParamType::Float, 0.02, "the ladders' and the final up-projection's weights ~ N(0, init_std), biases 0", 0.0, 1.0, {}},
    }};
  }

  void attach(tessera::AttachContext& ctx) override {
    const auto& info = ctx.model.info();
    arch_ = info.architecture;
    if (arch_ != "bert" && arch_ != "roberta")
      throw std::runtime_error("LST's side network is written for BERT-family encoders (bert, roberta), not a " + arch_ + " model");
    model_ = &ctx.model;
    read(ctx.params, info);
    const auto& opts = info.param_options;
    Pruner pruner{ctx.model, d_, inner_};
    // The residual stream's first kept dimensions: the word embeddings' strongest columns.
    Tensor prev = top_rows(pruner.base("embed.word.weight").abs().sum(0), d_);
    at::NoGradGuard no_grad;
    auto linear = [&](std::int64_t out, std::int64_t in) {
      return std::make_pair(at::empty({out, in}, opts).normal_(0.0, init_std_), at::zeros({out}, opts));
    };
    first_ = linear(d_, H_);
    for (std::int64_t i = 0; i < layers_; ++i) {
      downs_.push_back(linear(d_, H_));
      gates_.push_back(at::full({1}, gate_alpha_, opts));
      std::map<std::string, Tensor> b;
      for (auto& [k, t] : pruner.block(i, prev)) b[k] = t.to(opts.dtype()).to(opts.device()).contiguous();
      blocks_.push_back(std::move(b));
    }
    up_ = linear(H_, d_);
    for (auto& [k, t] : state()) t.set_requires_grad(true);
    install(ctx);
  }

  tessera::NamedTensors trainable() override { return state(); }

  // Tessera's layout, with the authors' names: side_first_downsample, side_downsamples.i,
  // side_gate_params.i, side_block.i.<BERT layer tensor>, side_final_upsample.
  tessera::NamedTensors state() override {
    tessera::NamedTensors out;
    out["side_first_downsample.weight"] = first_.first;
    out["side_first_downsample.bias"] = first_.second;
    for (std::int64_t i = 0; i < layers_; ++i) {
      const std::string n = std::to_string(i);
      out["side_downsamples." + n + ".weight"] = downs_[i].first;
      out["side_downsamples." + n + ".bias"] = downs_[i].second;
      out["side_gate_params." + n] = gates_[i];
      for (auto& [k, t] : blocks_[i]) out["side_block." + n + "." + k] = t;
    }
    out["side_final_upsample.weight"] = up_.first;
    out["side_final_upsample.bias"] = up_.second;
    return out;
  }

  void load_state(const tessera::NamedTensors& tensors) override {
    tessera::load_exact(state(), tensors, "this LST side network (" + std::to_string(layers_) + " layers, width " + std::to_string(d_) + ")",
                        "reduction factor " + std::to_string(r_));
  }

  std::string adapter_config_json() const override {
    return nlohmann::json{{"tessera",
                           {{"method", "lst"}, {"architecture", arch_}, {"reduction_factor", r_}, {"gate_T", gate_T_}, {"hidden_size", H_},
                            {"side_hidden_size", d_}, {"side_intermediate_size", inner_}, {"num_layers", layers_}, {"num_attention_heads", heads_},
                            {"dropout", dropout_}, {"layer_norm_eps", eps_}, {"init", "pruned by weight magnitude (L1)"}}}}
        .dump(2);
  }

 private:
  void read(const tessera::Params& p, const tessera::ModelInfo& info) {
    r_ = p.integer("reduction_factor");
    H_ = info.hidden_size, layers_ = info.num_layers, heads_ = info.num_heads;
    if (H_ % r_ != 0 || info.intermediate_size % r_ != 0)
      throw tessera::ParamError("reduction_factor", "reduction_factor " + std::to_string(r_) + " does not divide the hidden size " + std::to_string(H_) +
                                                        " and the intermediate size " + std::to_string(info.intermediate_size));
    d_ = H_ / r_, inner_ = info.intermediate_size / r_;
    if (d_ % heads_ != 0)
      throw tessera::ParamError("reduction_factor", "reduction_factor " + std::to_string(r_) + " leaves a side width of " + std::to_string(d_) +
                                                        ", which the model's " + std::to_string(heads_) + " heads do not divide");
    gate_T_ = p.number("gate_T"), gate_alpha_ = p.number("gate_alpha"), dropout_ = p.number("dropout");
    eps_ = p.number("layer_norm_eps") > 0 ? p.number("layer_norm_eps") : info.architecture == "roberta" ? 1e-5 : 1e-12;
    init_std_ = p.number("init_std");
  }

  void install(tessera::AttachContext& ctx) {
    auto* out = ctx.model.output_site();
    auto* embed = ctx.model.embedding_site();
    const auto layer_sites = ctx.model.layer_sites();
    if (out == nullptr || embed == nullptr || static_cast<std::int64_t>(layer_sites.size()) != layers_)
      throw std::runtime_error("LST needs the model's embedding, layer and output sites");
    auto seen = std::make_shared<std::vector<Tensor>>(layers_ + 1);  // x_0, h_0 … h_{L-1}: detached, (B, T, H)
    embed->add_tap(ctx.owner, [seen](const Tensor& x) {  // a forward starts: no state of an earlier one survives
      for (auto& t : *seen) t = Tensor();
      (*seen)[0] = x;
    });
    for (std::int64_t i = 0; i < layers_; ++i) layer_sites[i]->add_tap(ctx.owner, [seen, i](const Tensor& h) { (*seen)[i + 1] = h; });
    out->add_transform(ctx.owner, [this, seen](const Tensor& h) {
      Tensor y = side(*seen, h.scalar_type());
      for (auto& t : *seen) t = Tensor();  // the backbone's states go with this forward
      return y;
    });
  }

  // The side network over the tapped states; (B, T, H) in the compute dtype.
  Tensor side(const std::vector<Tensor>& seen, c10::ScalarType dtype) const {
    for (const auto& t : seen)
      if (!t.defined()) throw std::runtime_error("LST's side network ran without every layer's states (a layer was skipped)");
    auto lin = [dtype](const Tensor& x, const std::pair<Tensor, Tensor>& w) { return at::linear(x, w.first.to(dtype), w.second.to(dtype)); };
    const Tensor keep = model_->attention_mask().to(at::kBool);  // (B, T): real tokens
    const Tensor mask = keep.unsqueeze(1).unsqueeze(1);           // (B, 1, 1, T)
    Tensor s = lin(seen[0], first_);                              // (B, T, d)
    for (std::int64_t i = 0; i < layers_; ++i) {
      const Tensor mu = at::sigmoid(gates_[i] / gate_T_).to(dtype);
      s = mu * s + (1 - mu) * lin(seen[i + 1], downs_[i]);
      s = block(blocks_[i], s, mask, dtype);
    }
    return lin(s, up_);
  }

  // A BERT layer of width d: self-attention, then the FFN, each followed by residual + LayerNorm.
  Tensor block(const std::map<std::string, Tensor>& b, const Tensor& s, const Tensor& mask, c10::ScalarType dtype) const {
    const bool train = model_->training();
    auto w = [&](const char* name) { return b.at(name).to(dtype); };
    auto heads = [&](const Tensor& x) { return x.view({x.size(0), x.size(1), heads_, d_ / heads_}).transpose(1, 2); };  // (B, heads, T, d/heads)
    const Tensor q = heads(at::linear(s, w("attention.self.query.weight"), w("attention.self.query.bias")));
    const Tensor k = heads(at::linear(s, w("attention.self.key.weight"), w("attention.self.key.bias")));
    const Tensor v = heads(at::linear(s, w("attention.self.value.weight"), w("attention.self.value.bias")));
    Tensor scores = at::matmul(q, k.transpose(-1, -2)) / std::sqrt(static_cast<double>(d_ / heads_));  // (B, heads, T, T)
    scores = scores.masked_fill(mask.logical_not(), -std::numeric_limits<float>::infinity());
    const Tensor probs = tessera::dropout(at::softmax(scores, -1), dropout_, train);
    const Tensor ctx = at::matmul(probs, v).transpose(1, 2).reshape({s.size(0), s.size(1), d_});  // (B, T, d)
    const std::vector<std::int64_t> shape{d_};
    const Tensor a = tessera::dropout(at::linear(ctx, w("attention.output.dense.weight"), w("attention.output.dense.bias")), dropout_, train);
    const Tensor s1 = at::layer_norm(s + a, shape, w("attention.output.LayerNorm.weight"), w("attention.output.LayerNorm.bias"), eps_);
    const Tensor m = tessera::dropout(
        at::linear(at::gelu(at::linear(s1, w("intermediate.dense.weight"), w("intermediate.dense.bias"))), w("output.dense.weight"), w("output.dense.bias")), dropout_,
        train);
    return at::layer_norm(s1 + m, shape, w("output.LayerNorm.weight"), w("output.LayerNorm.bias"), eps_);
  }

  tessera::ModelView* model_ = nullptr;
  std::string arch_;
  std::int64_t r_ = 8, H_ = 0, layers_ = 0, heads_ = 0, d_ = 0, inner_ = 0;
  double gate_T_ = 0.1, gate_alpha_ = 0.0, dropout_ = 0.1, eps_ = 1e-12, init_std_ = 0.02;
  std::pair<Tensor, Tensor> first_, up_;                // (d, H), (d); (H, d), (H)
  std::vector<std::pair<Tensor, Tensor>> downs_;        // per layer: (d, H), (d)
  std::vector<Tensor> gates_;                           // per layer: α (1)
  std::vector<std::map<std::string, Tensor>> blocks_;   // per layer: kBlockTensors
};

}  // namespace

TESSERA_PLUGIN(Lst, "lst", "1.0.0", "additive",
               "Ladder side-tuning: a narrow side network, initialised from the pruned backbone, fed by gated ladders; no backward through the backbone",
               "Sung, Cho, Bansal 2022, LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning, arXiv:2206.06522")
