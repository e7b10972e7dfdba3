// The attention core every architecture shares: dropout(softmax(QKᵀ/√d + mask)) V, through
// at::scaled_dot_product_attention unless the attention site has score hooks (which must
// see the scores before the softmax) or, on the CPU, dropout applies in training (torch's
// fused CPU kernels have none and fall back to this same computation; here its dropout is
// tessera::dropout).
#pragma once

#include <tessera/internal/sites_impl.h>

#include <initializer_list>
#include <optional>
#include <utility>

namespace tessera {

using KVPair = std::pair<Tensor, Tensor>;

// Keys and values (B, heads, S, hd) with each defined prefix (B, heads, P_i, hd) put in
// front, in the order given: [prefix_1 ; … ; k].
void prepend_prefixes(Tensor& k, Tensor& v, std::initializer_list<const KVPair*> prefixes);

// q (B, nh, T, hd); k, v (B, nh, S, hd); keep broadcastable to (B, nh, T, S), bool, true =
// attend; every query row must keep at least one key. An undefined keep means every key
// (or, with causal, every key up to the query's own position, T == S): the kernels run
// fastest without a mask. Returns (B, nh, T, hd).
// bias: an additive score bias broadcastable to (B, nh, T, S) (T5's relative positions);
// scale: the factor on QKᵀ, 1/√hd when absent (T5 uses 1).
Tensor attend(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& keep, double dropout, bool training,
              const AttentionSiteImpl& site, const Tensor& bias = {}, std::optional<double> scale = std::nullopt, bool causal = false);

}  // namespace tessera
