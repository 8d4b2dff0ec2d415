// TensorBoard event files, written directly: `tensorboard --logdir <dir>` shows the scalars.
//
// An event file is a sequence of TFRecords:
//   u64 length (little-endian) | u32 masked_crc32c(length bytes) | data | u32 masked_crc32c(data)
// with masked_crc(c) = ((c >> 15) | (c << 17)) + 0xa282ead8 and CRC-32C (Castagnoli). Each record's
// data is a serialised tensorflow.Event: wall_time (1, double), step (2, int64) and either
// file_version (3, string; the first record: "brain.Event:2") or summary (5, Summary). A Summary
// holds repeated value (1) messages of tag (1, string) and simple_value (2, float). The protobuf
// wire format is written by hand here: four message types do not justify a .proto dependency.
#pragma once

#include <cstdint>
#include <fstream>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace loom::train {

uint32_t masked_crc32c(const void* data, size_t size);

class TensorBoardWriter {
 public:
  // Creates <dir>/events.out.tfevents.<unix time>.<host>.<pid> and writes the version record.
  // `clock` gives each event's wall time (default: the system clock; tests pass fixed times).
  explicit TensorBoardWriter(const std::string& dir, std::function<double()> clock = {});
  void add_scalars(int64_t step, const std::vector<std::pair<std::string, double>>& values);
  void flush();
  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& data);
  std::function<double()> clock_;
  std::string path_;
  std::ofstream out_;
};

}  // namespace loom::train
