// The slab-at-a-time products through a quantized weight (sdk/src/blockwise_product.cpp):
// each format's rows dequantized by hand are the values its dense() has (which the NF4 and
// GGUF tests hold to bitsandbytes' layout and to the gguf package), and x Wᵀ and its input
// gradient equal the same products on the dense weight, in one slab and in several slabs
// of rows and of columns, a short last one included.
#include "support.h"

#include "formats/gguf.h"
#include "formats/gguf_llama.h"
#include "formats/nf4.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

using namespace tessera;

namespace {

// Rows, and column slabs of one block, from dequantize_row: dense()'s values bit for bit.
void check_rows(const StoredTensor& w) {
  const Tensor dense = w.dense();  // (out, in)
  const std::int64_t out = dense.size(0), in = dense.size(1), step = w.column_step();
  CATCH_REQUIRE(step > 0);
  CATCH_CHECK(w.rows() == out);
  Tensor rows = at::empty_like(dense), pieces = at::empty_like(dense);
  for (std::int64_t r = 0; r < out; ++r) {
    w.dequantize_row(r, 0, in, rows.data_ptr<float>() + r * in);
    for (std::int64_t c = 0; c < in; c += step) w.dequantize_row(r, c, c + step, pieces.data_ptr<float>() + r * in + c);
  }
  CATCH_CHECK(at::equal(rows, dense));
  CATCH_CHECK(at::equal(pieces, dense));
}

// recomputed_linear's value and input gradient against at::linear on dense(): the same sums
// in another order.
void check_product(const StoredTensor& w, std::int64_t tokens) {
  const Tensor dense = w.dense();
  const Tensor b = at::randn({dense.size(0)});
  const Tensor x = at::randn({2, tokens, dense.size(1)}).requires_grad_(true);
  const Tensor y = recomputed_linear(x, w, b);
  const Tensor g = at::randn_like(y);
  const Tensor gx = torch::autograd::grad({y}, {x}, {g})[0];
  const Tensor x2 = x.detach().clone().requires_grad_(true);
  const Tensor y2 = at::linear(x2, dense, b);
  const Tensor gx2 = torch::autograd::grad({y2}, {x2}, {g})[0];
  CATCH_CHECK(y.sizes() == y2.sizes());
  CATCH_CHECK(test::max_abs_diff(y, y2) < 1e-5 * y2.abs().max().item<double>());
  CATCH_CHECK(test::max_abs_diff(gx, gx2) < 1e-5 * gx2.abs().max().item<double>());
  // The product must depend on every slab: a row scaled in the weight changes the answer.
  CATCH_CHECK(test::max_abs_diff(y, at::linear(x.detach(), dense * 1.001, b)) > 1e-4 * y2.abs().max().item<double>());
}

}  // namespace

CATCH_TEST_CASE("NF4 rows dequantized by hand are dense()'s values, and products slab by slab equal the dense ones", "[nf4][blockwise]") {
  at::manual_seed(3);
  for (const bool dq : {false, true}) {
    // 2100 rows of 640 pass a slab's million values: two slabs of rows and two of columns,
    // the last of each short. The others are one slab, one product.
    for (const auto& shape : std::vector<std::vector<std::int64_t>>{{2100, 640}, {40, 64}, {96, 640}}) {
      CATCH_INFO("double_quant " << dq << " shape " << shape[0] << "x" << shape[1]);
      const auto w = nf4_storage(at::randn(shape) * 0.05, 64, dq);
      check_rows(*w);
      check_product(*w, 5);
    }
  }
  // Rows that are not whole blocks, or another dtype, stay on dense().
  CATCH_CHECK(nf4_storage(at::randn({10, 96}), 64, false)->column_step() == 0);
  CATCH_CHECK(nf4_storage(at::randn({10, 64}).to(at::kDouble), 64, false)->column_step() == 0);
}

CATCH_TEST_CASE("GGUF Q4_0, Q4_1 and Q8_0 rows dequantized by hand are the gguf package's values, and products equal the dense ones", "[formats][gguf][blockwise]") {
  at::manual_seed(4);
  auto f = GgufFile::open(test::fixture("gguf/tensors.gguf"));
  const auto expected = test::read_tensors(test::fixture("gguf/expected.safetensors"), at::kCPU);
  for (const std::string name : {"blocks.q4_0", "blocks.q4_1", "blocks.q8_0"}) {
    CATCH_INFO(name);
    const auto w = gguf_storage(f, name, at::TensorOptions().dtype(at::kFloat));
    CATCH_CHECK(at::equal(w->dense(), expected.at(name)));
    check_rows(*w);
    check_product(*w, 3);
  }
  CATCH_CHECK(gguf_storage(f, "half.f16", at::TensorOptions().dtype(at::kFloat))->column_step() == 0);
}
