// Inverted dropout (Srivastava et al. 2014, as torch's dropout scales it): in training each
// element is kept with probability 1 − p and scaled by 1/(1 − p), else zeroed; outside
// training, or with p = 0, x itself.
//
// On the CPU, torch's dropout draws a float Bernoulli tensor one element after another
// (one 32-bit draw of its Mersenne Twister per element), scales it and multiplies, and
// autograd keeps the 4-byte noise. Here each element gets a 15-bit draw (a 64-bit draw is
// four of them): blocks of 2^16 draws, each SplitMix64's sequence (Steele, Lea & Flood 2014)
// from its own seed taken from the default CPU generator, are drawn in parallel, and an
// element is kept where its draw is ≥ round(p · 2^15): p is used rounded to a multiple of
// 2^-15 (|Δp| ≤ 1.6e-5), and the kept values are scaled by the same rounded p, so
// E[y] = x exactly. The mask depends on the seed alone (not on the thread count); the
// forward and the backward pass are one vectorised pass each over x and the mask, and
// autograd keeps the mask as one byte per element. On other devices it is torch's own
// fused kernel, p unrounded.
#pragma once

#include <ATen/core/Tensor.h>

namespace tessera {

// x: any shape -> the same shape. p in [0, 1]; p = 1 zeroes everything. Throws
// std::invalid_argument for p outside [0, 1].
at::Tensor dropout(const at::Tensor& x, double p, bool training);

}  // namespace tessera
