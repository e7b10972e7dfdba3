// TensorBoard event files, so that a run's curves open in TensorBoard beside metrics.jsonl:
// `tessera train --tensorboard` writes them into RUN/tensorboard/, the same numbers as the
// metrics' step and eval lines (train/loss, train/lr, test/<metric>).
//
// Written by hand: no kept C++ library on Debian's or PyPI's registries writes them (the
// writers live in TensorFlow and in Python's tensorboard), and the format is small — TFRecord
// framing (length, masked CRC-32C of the length, the bytes, masked CRC-32C of the bytes)
// around protobuf `Event` messages, of which a scalar needs six fields (wall_time, step,
// file_version; summary.value.tag, summary.value.simple_value). The test reads the files back
// with tensorboard's own EventAccumulator.
#pragma once

#include <cstdint>
#include <fstream>
#include <string>

namespace tessera {

class EventWriter {
 public:
  // A new file dir/events.out.tfevents.<seconds>.<host>.<pid> (each run and each resume
  // writes its own, as TensorBoard's writers do), opened with the file-version event.
  explicit EventWriter(const std::string& dir);
  // One scalar of `tag` at `step`, flushed: TensorBoard shows it while the run goes on.
  void scalar(const std::string& tag, double value, std::int64_t step);
  const std::string& path() const { return path_; }

 private:
  void record(const std::string& event);
  std::string path_;
  std::ofstream out_;
};

// CRC-32C (Castagnoli), as TFRecord frames use it before masking.
std::uint32_t crc32c(const void* data, std::size_t size);

}  // namespace tessera
