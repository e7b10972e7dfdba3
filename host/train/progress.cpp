#include "train/progress.h"

#include <unistd.h>

#include <cstdio>

namespace tessera {

std::string format_duration(double seconds) {
  auto s = static_cast<long>(seconds + 0.5);
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
  else std::snprintf(buf, sizeof buf, "%ld:%02ld", s / 60, s % 60);
  return buf;
}

Progress::Progress(std::string label, std::int64_t total)
    : label_(std::move(label)), total_(total > 0 ? total : 1), tty_(isatty(STDERR_FILENO) != 0), start_(std::chrono::steady_clock::now()) {}

void Progress::update(std::int64_t done, double loss, double examples_per_s) {
  char detail[96];
  std::snprintf(detail, sizeof detail, "loss %.4f  %.1f ex/s", loss, examples_per_s);
  update(done, std::string(detail));
}

void Progress::update(std::int64_t done, const std::string& detail) {
  const double frac = static_cast<double>(done) / static_cast<double>(total_);
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double eta = done > 0 ? elapsed * (1.0 - frac) / frac : 0.0;
  constexpr int width = 28;
  std::string bar(static_cast<std::size_t>(frac * width), '#');
  bar.resize(width, '.');
  char line[384];
  std::snprintf(line, sizeof line, "%s [%s] %3.0f%% %lld/%lld  %s  ETA %s", label_.c_str(), bar.c_str(), frac * 100, static_cast<long long>(done),
                static_cast<long long>(total_), detail.c_str(), done > 0 ? format_duration(eta).c_str() : "?");
  if (tty_) {
    std::fprintf(stderr, "\r%s\033[K", line);
  } else {
    auto decile = static_cast<std::int64_t>(frac * 10);
    if (decile == last_decile_) return;
    last_decile_ = decile;
    std::fprintf(stderr, "%s\n", line);
  }
  std::fflush(stderr);
}

void Progress::finish() {
  if (tty_) std::fprintf(stderr, "\n");
}

}  // namespace tessera
