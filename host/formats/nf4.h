// NF4: 4-bit NormalFloat storage of a weight (Dettmers et al. 2023, QLoRA,
// arXiv:2305.14314, §3), in the layout bitsandbytes uses, so the numbers equal those of
// a `Linear4bit` base:
//   the weight is flattened row-major into blocks of `blocksize` (64) values; each block
//   keeps absmax = max |w| and, per value, the index of the nearest of the 16 NF4 levels
//   to w / absmax (a midpoint goes to the lower level); two indices per byte, the first in
//   the high nibble (an odd count padded with level 7, 0.0).
//   Double quantization (§3, "compress_statistics") keeps absmax − mean(absmax) itself in
//   8 bits: blocks of 256, each scaled by its own max |·| and rounded to the nearest
//   value of bitsandbytes' signed dynamic map.
//   Dequantized: w = NF4[code] · absmax[block], in f32, then the compute dtype.
// FP4 (QLoRA's other 4-bit type, bitsandbytes' quant_type "fp4") is the same layout with
// bitsandbytes' FP4 table as the levels: `code` says which.
#pragma once

#include <tessera/internal/sites_impl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tessera {

struct Nf4Parts {
  Tensor packed;         // (ceil(n / 2)) uint8
  Tensor absmax;         // (blocks) f32, or uint8 codes with double quantization
  Tensor nested_absmax;  // (ceil(blocks / 256)) f32; double quantization only
  double offset = 0;     // mean of absmax; double quantization only
  std::vector<std::int64_t> shape;
  std::int64_t blocksize = 64;
  bool double_quant = false;
  std::string code = "nf4";  // or "fp4"
};

Nf4Parts nf4_quantize(const Tensor& w, std::int64_t blocksize = 64, bool double_quant = false, const std::string& code = "nf4");
Tensor nf4_dequantize(const Nf4Parts& q, c10::TensorOptions options);  // shape q.shape

// A parameter site's base kept as NF4 (StoredTensor): dequantized for each use.
std::unique_ptr<StoredTensor> nf4_storage(const Tensor& dense, std::int64_t blocksize, bool double_quant, const std::string& code = "nf4");

}  // namespace tessera
