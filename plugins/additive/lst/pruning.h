// LST's initialisation: the side network's blocks pruned from the backbone's own weights by
// magnitude, as the authors' pruning code does (README.md beside this). Beside lst.cpp, which
// builds and runs the side network; SDK-only, like the plugin.
#pragma once

#include <tessera/model_view.h>

#include <ATen/ATen.h>

#include <map>
#include <stdexcept>
#include <string>
#include <utility>

namespace tessera::lst {

// The `keep` rows with the largest score, in their original order (as a pruning mask keeps them).
inline Tensor top_rows(const Tensor& score, std::int64_t keep) {
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
  std::int64_t attn = 0;  // T5: the side attention's inner width, heads · d_kv / r

  Tensor base(const std::string& name) const {
    Tensor t = maybe(name);
    if (!t.defined()) throw std::runtime_error("LST needs the base tensor '" + name + "'");
    return t;
  }
  // Undefined when the backbone has no such tensor (a bias-free projection or norm).
  Tensor maybe(const std::string& name) const {
    for (auto* site : model.match_parameters({name}))  // a target also matches longer names ("norm.weight")
      if (site->name() == name) return site->base().detach().to(at::kFloat).clone();  // by value: a quantized base's copy goes
    return {};
  }
  // A projection's weight and bias; GPT-2's q, k and v are row blocks of the fused c_attn.
  std::pair<Tensor, Tensor> projection(const std::string& name) const {
    if (Tensor w = maybe(name + ".weight"); w.defined()) return {w, maybe(name + ".bias")};
    const auto dot = name.rfind('.');
    const auto part = static_cast<std::int64_t>(std::string("qkv").find(name.substr(dot + 1)));
    if (part < 0 || part > 2) throw std::runtime_error("LST needs the base tensor '" + name + ".weight'");
    const std::string fused = name.substr(0, dot) + ".qkv";
    Tensor w = base(fused + ".weight"), b = maybe(fused + ".bias");
    return {w.chunk(3, 0)[part], b.defined() ? b.chunk(3, 0)[part] : b};
  }

  // Block i's tensors from the backbone's layer i, entered with the kept dimensions `prev`
  // of the residual stream; returns them and leaves `prev` at the block's output dimensions.
  std::map<std::string, Tensor> bert_block(std::int64_t i, Tensor& prev) const {
    const std::string p = "layers." + std::to_string(i) + ".";
    std::map<std::string, Tensor> out;
    const Tensor q = base(p + "attn.q.weight"), k = base(p + "attn.k.weight"), v = base(p + "attn.v.weight");
    const Tensor cols = q.index_select(1, prev).abs() * k.index_select(1, prev).abs() * v.index_select(1, prev).abs();
    const Tensor qkv = top_rows(cols.sum(1), d);
    for (const auto& [ours, hf] : {std::pair{"attn.q", "attention.self.query"}, {"attn.k", "attention.self.key"}, {"attn.v", "attention.self.value"}})
      keep(projection(p + ours), prev, qkv, hf, out);
    prev = linear(p + "attn.o", "attention.output.dense", qkv, d, out);
    norm(p + "attn.norm", "attention.output.LayerNorm", prev, out);
    const Tensor mid = linear(p + "mlp.up", "intermediate.dense", prev, inner, out);
    prev = linear(p + "mlp.down", "output.dense", mid, d, out);
    norm(p + "mlp.norm", "output.LayerNorm", prev, out);
    return out;
  }

  // A pre-norm decoder block (our canonical names): the norms keep the stream's dimensions;
  // q, k and v keep the same rows, or with grouped-query attention q its d strongest rows
  // and k, v the same d·kv/q rows; a gated MLP's gate and up keep the same rows.
  std::map<std::string, Tensor> decoder_block(std::int64_t i, Tensor& prev) const {
    const std::string p = "layers." + std::to_string(i) + ".";
    std::map<std::string, Tensor> out;
    norm(p + "attn.norm", "attn.norm", prev, out);
    const auto q = projection(p + "attn.q"), k = projection(p + "attn.k"), v = projection(p + "attn.v");
    const Tensor qa = q.first.index_select(1, prev).abs(), ka = k.first.index_select(1, prev).abs(), va = v.first.index_select(1, prev).abs();
    const bool grouped = q.first.size(0) != k.first.size(0);
    const Tensor q_rows = top_rows(grouped ? qa.sum(1) : (qa * ka * va).sum(1), d);
    const Tensor kv_rows = grouped ? top_rows((ka * va).sum(1), d * k.first.size(0) / q.first.size(0)) : q_rows;
    keep(q, prev, q_rows, "attn.q", out);
    keep(k, prev, kv_rows, "attn.k", out);
    keep(v, prev, kv_rows, "attn.v", out);
    prev = linear(p + "attn.o", "attn.o", q_rows, d, out);
    norm(p + "mlp.norm", "mlp.norm", prev, out);
    prev = ffn(p, prev, out);
    return out;
  }

  // A T5 block (our canonical names) of stack `which`: each norm keeps the stream's
  // dimensions; self-attention's (and the decoder's cross-attention's) q, k and v keep the
  // stream's columns and the same rows, scored by |W_q| ∘ |W_k| ∘ |W_v|; o keeps those rows as
  // columns (the authors' chain: cross-attention's k and v are pruned on the decoder's stream
  // too); a gated FFN's gate and up keep the same rows.
  std::map<std::string, Tensor> t5_block(const std::string& which, std::int64_t i, Tensor& prev, bool cross) const {
    const std::string p = which + ".layers." + std::to_string(i) + ".";
    std::map<std::string, Tensor> out;
    for (const std::string kind : {"attn", "cross"}) {
      if (kind == "cross" && !cross) continue;
      norm(p + kind + ".norm", kind + ".norm", prev, out);
      const auto q = projection(p + kind + ".q"), k = projection(p + kind + ".k"), v = projection(p + kind + ".v");
      const Tensor rows = top_rows((q.first.index_select(1, prev).abs() * k.first.index_select(1, prev).abs() * v.first.index_select(1, prev).abs()).sum(1), attn);
      keep(q, prev, rows, kind + ".q", out);
      keep(k, prev, rows, kind + ".k", out);
      keep(v, prev, rows, kind + ".v", out);
      prev = linear(p + kind + ".o", kind + ".o", rows, d, out);
    }
    norm(p + "mlp.norm", "mlp.norm", prev, out);
    prev = ffn(p, prev, out);
    return out;
  }

  // The FFN of block prefix p on the stream's kept dimensions: up's `inner` strongest rows (a
  // gated FFN's gate and up the same rows, by |W_gate| ∘ |W_up|), then down's `d`; returns those.
  Tensor ffn(const std::string& p, const Tensor& prev, std::map<std::string, Tensor>& out) const {
    Tensor mid;
    if (const auto gate = maybe(p + "mlp.gate.weight"); gate.defined()) {
      mid = top_rows((gate.index_select(1, prev).abs() * base(p + "mlp.up.weight").index_select(1, prev).abs()).sum(1), inner);
      keep(projection(p + "mlp.gate"), prev, mid, "mlp.gate", out);
      keep(projection(p + "mlp.up"), prev, mid, "mlp.up", out);
    } else {
      mid = linear(p + "mlp.up", "mlp.up", prev, inner, out);
    }
    return linear(p + "mlp.down", "mlp.down", mid, d, out);
  }

  // A linear map's kept columns `in` and its `rows` strongest rows; returns those rows.
  Tensor linear(const std::string& ours, const std::string& side, const Tensor& in, std::int64_t rows, std::map<std::string, Tensor>& out) const {
    const auto wb = projection(ours);
    const Tensor kept = top_rows(wb.first.index_select(1, in).abs().sum(1), rows);
    keep(wb, in, kept, side, out);
    return kept;
  }

  static void keep(const std::pair<Tensor, Tensor>& wb, const Tensor& cols, const Tensor& rows, const std::string& side, std::map<std::string, Tensor>& out) {
    out[side + ".weight"] = wb.first.index_select(1, cols).index_select(0, rows);
    if (wb.second.defined()) out[side + ".bias"] = wb.second.index_select(0, rows);
  }

  void norm(const std::string& ours, const std::string& side, const Tensor& kept, std::map<std::string, Tensor>& out) const {
    out[side + ".weight"] = base(ours + ".weight").index_select(0, kept);
    if (Tensor b = maybe(ours + ".bias"); b.defined()) out[side + ".bias"] = b.index_select(0, kept);
  }
};

}  // namespace tessera::lst
