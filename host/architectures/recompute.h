// Activation checkpointing ([train] gradient_checkpointing, Chen et al. 2016, "Training Deep
// Nets with Sublinear Memory Cost"): a layer runs forward without keeping its activations for
// backward — only its input — and runs again in the backward pass, with gradients, to get
// them back. Memory then holds one layer's activations instead of every layer's, for a second
// forward pass of the layers (about a third more compute).
//
// The recomputation is exact: the random streams (torch's, and so tessera::dropout's, which
// seeds from it) are set back to where the first pass found them, so dropout draws the same
// masks. The body reads only what it is given and what it owns: tensors from outside the
// layer that carry a gradient (an attention site's prefix) must be among `extras`, which get
// their gradients back like the input. Trainable parameters inside the layer (a method's
// weights) get theirs accumulated when the layer is recomputed and differentiated — into
// their .grad, as loss.backward() does (the trainer's way): torch::autograd::grad() over a
// recomputed model would not see them. What the layer does besides computing (a site's tap,
// a router) happens again in the second pass.
#pragma once

#include <tessera/internal/sites_impl.h>

#include <functional>
#include <utility>
#include <vector>

namespace tessera {

using LayerBody = std::function<Tensor(const Tensor& x, const std::vector<Tensor>& extras)>;

// body(x, extras), its activations recomputed in backward rather than kept. x (N, …) is made
// to carry a gradient if it does not, so that a layer whose only trainables are inside it
// still reaches backward.
Tensor recomputed_layer(const Tensor& x, const std::vector<Tensor>& extras, LayerBody body);

// An attention site's prefix (K, V) as extras, and back; an undefined prefix is no extras.
std::vector<Tensor> prefix_extras(const std::pair<Tensor, Tensor>& kv);
std::pair<Tensor, Tensor> prefix_of(const std::vector<Tensor>& extras);

}  // namespace tessera
