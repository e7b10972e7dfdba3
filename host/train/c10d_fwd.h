// c10d's classes that headers name without needing their (heavy) definitions.
#pragma once

namespace c10d {
class Backend;
class Store;
}  // namespace c10d
