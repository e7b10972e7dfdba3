// Int8 rows (formats/int8.h) against bitsandbytes' own int8_vectorwise_quant and
// int8_vectorwise_dequant (tests/fixtures/make_nf4.py writes them from bitsandbytes itself).
#include "support.h"

#include "formats/int8.h"

#include <ATen/ATen.h>

using namespace tessera;

CATCH_TEST_CASE("int8 rows: codes, row scales and dequantized values are bitsandbytes' LLM.int8() weights bit for bit", "[int8]") {
  const auto f = test::read_tensors(test::fixture("nf4/blocks.safetensors"), at::kCPU);
  const auto bnb = test::read_tensors(test::fixture("nf4/bnb_blocks.safetensors"), at::kCPU);
  for (int i = 0; i < 4; ++i) {
    const std::string tag = std::to_string(i);
    CATCH_INFO("weight " << i);
    const Int8Parts q = int8_quantize(f.at("w" + tag));
    CATCH_CHECK(at::equal(q.codes, bnb.at("int8.codes" + tag)));
    CATCH_CHECK(at::equal(q.scales, bnb.at("int8.scales" + tag)));
    CATCH_CHECK(at::equal(int8_dequantize(q, at::kFloat), bnb.at("int8.dequant" + tag)));
    // Stored: dense() and each row by hand are the same values.
    const auto stored = int8_storage(f.at("w" + tag));
    CATCH_CHECK(std::string(stored->format()) == "int8");
    CATCH_CHECK(stored->stored_bytes() == q.codes.numel() + 4 * q.scales.numel());
    const Tensor dense = stored->dense();
    CATCH_CHECK(at::equal(dense, bnb.at("int8.dequant" + tag)));
    Tensor rows = at::empty_like(dense);
    for (std::int64_t r = 0; r < dense.size(0); ++r) stored->dequantize_row(r, 0, dense.size(1), rows.data_ptr<float>() + r * dense.size(1));
    CATCH_CHECK(at::equal(rows, dense));
  }
  // A row of zeros (bitsandbytes would divide by zero) keeps zeros; 8 bits lose something.
  const Tensor w4 = f.at("w4");
  const Int8Parts q = int8_quantize(w4);
  CATCH_CHECK(q.scales[0].item<float>() == 0.0f);
  CATCH_CHECK(at::equal(int8_dequantize(q, at::kFloat)[0], at::zeros({w4.size(1)})));
  const double err = (int8_dequantize(q, at::kFloat) - w4).abs().max().item<double>();
  CATCH_CHECK(err > 0);
  CATCH_CHECK(err <= 0.5 / 127 * w4.abs().max().item<double>() * 1.001);
  CATCH_CHECK_THROWS_WITH(int8_quantize(at::zeros({2, 3, 4})), Catch::Contains("3 dimensions"));
}
