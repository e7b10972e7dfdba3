// A one-line progress bar on stderr: position, ETA, loss and examples/s. On a terminal
// it redraws in place; otherwise (CI logs) it prints a line every tenth of the way.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace tessera {

class Progress {
 public:
  Progress(std::string label, std::int64_t total);
  void update(std::int64_t done, double loss, double examples_per_s);
  // The same bar with another text after the count (`tessera assess`: the setup running).
  void update(std::int64_t done, const std::string& detail);
  void finish();

 private:
  std::string label_;
  std::int64_t total_, last_decile_ = -1;
  bool tty_;
  std::chrono::steady_clock::time_point start_;
};

std::string format_duration(double seconds);  // "1:05" or "1:02:03"

}  // namespace tessera
