// What an assessment ran on, for its report: the processor, the threads, torch's and
// Tessera's versions, the date, and this machine's dense f32 product peak measured now (the
// ceiling the setups' training FLOP/s are read against).
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>

namespace tessera {

// threads: the runs' [train] threads (0: every processor), used for the peak's product too.
nlohmann::json machine_info(std::int64_t threads);

}  // namespace tessera
