// Int8 storage of a weight, per output channel, in the layout bitsandbytes' LLM.int8()
// (Dettmers et al. 2022, arXiv:2208.07339) keeps a Linear8bitLt's weight in
// (int8_vectorwise_quant, no outlier threshold):
//   scale[r] = max |W[r, :]|  (f32, one per row: the output channel)
//   code[r, c] = round(W[r, c] · (127 / scale[r]))  (int8; round half to even)
//   dequantized: code · scale[r] · (1/127)  (f32, two roundings, as bitsandbytes multiplies)
// A row of zeros keeps scale 0 and codes 0 (bitsandbytes would divide by 0). Products run
// on f32 activations through the dequantized weight (the activations are not quantized).
#pragma once

#include <tessera/internal/sites_impl.h>

#include <memory>

namespace tessera {

struct Int8Parts {
  Tensor codes;   // (out, in) int8
  Tensor scales;  // (out) f32
};

Int8Parts int8_quantize(const Tensor& w);                              // w (out, in)
Tensor int8_dequantize(const Int8Parts& q, c10::TensorOptions options);  // (out, in)

// A parameter site's base kept as int8 rows (StoredTensor).
std::unique_ptr<StoredTensor> int8_storage(const Tensor& dense);

}  // namespace tessera
