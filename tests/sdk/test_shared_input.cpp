// tessera::SharedInput: members called with one tensor share one computation; any other
// call (another tensor, the same member twice, an input written in place) computes again,
// so each member always gets its own input's output.
#include "support.h"

#include <tessera/shared_input.h>

using namespace tessera;

namespace {

// Three members; member i's output is x · (i + 1).
SharedInput three() {
  return SharedInput(3, [](const Tensor& x) { return std::vector<Tensor>{x * 1, x * 2, x * 3}; });
}

}  // namespace

CATCH_TEST_CASE("SharedInput: one computation for members given one tensor, in any order", "[sdk][shared_input]") {
  auto group = three();
  const Tensor x = at::randn({4, 5}, test::options());
  CATCH_CHECK(at::equal(group(1, x), x * 2));
  CATCH_CHECK(at::equal(group(0, x), x * 1));
  CATCH_CHECK(at::equal(group(2, x), x * 3));
  CATCH_CHECK(group.computed() == 1);
  // The next forward pass: a new tensor, computed again once.
  const Tensor x2 = at::randn({4, 5}, test::options());
  for (std::size_t i : {0, 1, 2}) CATCH_CHECK(at::equal(group(i, x2), x2 * static_cast<double>(i + 1)));
  CATCH_CHECK(group.computed() == 2);
}

CATCH_TEST_CASE("SharedInput: another tensor, a member asked twice, or an input written in place computes again", "[sdk][shared_input]") {
  auto group = three();
  Tensor x = at::randn({4, 5}, test::options());
  const Tensor same_values = x.clone();
  CATCH_CHECK(at::equal(group(0, x), x));
  CATCH_CHECK(at::equal(group(1, same_values), same_values * 2));  // equal values, another tensor
  CATCH_CHECK(group.computed() == 2);
  CATCH_CHECK(at::equal(group(1, same_values), same_values * 2));  // member 1 again: its output was taken
  CATCH_CHECK(group.computed() == 3);
  group(0, x);
  x.add_(1.0);  // written in place after member 0 read it
  CATCH_CHECK(at::equal(group(2, x), x * 3));
  CATCH_CHECK(group.computed() == 5);
}

CATCH_TEST_CASE("SharedInput: compute must give one output per member", "[sdk][shared_input]") {
  SharedInput bad(2, [](const Tensor& x) { return std::vector<Tensor>{x}; });
  CATCH_CHECK_THROWS_WITH(bad(0, at::zeros({1}, test::options())), Catch::Contains("compute returned 1 outputs for 2 members"));
}
