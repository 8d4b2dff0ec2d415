#include "loom/train/tensorboard.h"

#include <fmt/format.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "loom/core/crc32c.h"
#include "loom/core/error.h"

namespace loom::train {

namespace {
void put_varint(std::string* s, uint64_t v) {
  while (v >= 0x80) {
    s->push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  s->push_back(static_cast<char>(v));
}

template <typename T>
void put_fixed(std::string* s, T v) {
  s->append(reinterpret_cast<const char*>(&v), sizeof(T));  // little-endian hosts
}

void put_bytes(std::string* s, int field, const std::string& bytes) {
  put_varint(s, static_cast<uint64_t>(field) << 3 | 2);
  put_varint(s, bytes.size());
  s->append(bytes);
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string event_header(double wall_time, int64_t step) {
  std::string e;
  put_varint(&e, 1 << 3 | 1);  // wall_time, fixed64
  put_fixed(&e, wall_time);
  if (step != 0) {  // proto3: a zero field is not written (TensorBoard's own writer omits it too)
    put_varint(&e, 2 << 3 | 0);  // step, varint
    put_varint(&e, static_cast<uint64_t>(step));
  }
  return e;
}
}  // namespace

uint32_t masked_crc32c(const void* data, size_t size) {
  const uint32_t c = crc32c(data, size);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

TensorBoardWriter::TensorBoardWriter(const std::string& dir, std::function<double()> clock)
    : clock_(clock ? std::move(clock) : std::function<double()>(now_seconds)) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  LOOM_CHECK_KIND(ErrorKind::kIO, !ec, "cannot create TensorBoard directory '{}': {}", dir,
                  ec.message());
  char host[256] = "localhost";
  gethostname(host, sizeof host - 1);
  path_ = fmt::format("{}/events.out.tfevents.{}.{}.{}", dir, static_cast<int64_t>(now_seconds()),
                      host, getpid());
  out_.open(path_, std::ios::binary | std::ios::trunc);
  LOOM_CHECK_KIND(ErrorKind::kIO, out_.good(), "cannot create '{}'", path_);
  std::string e = event_header(clock_(), 0);
  put_bytes(&e, 3, "brain.Event:2");
  write_record(e);
  flush();
}

void TensorBoardWriter::add_scalars(int64_t step,
                                    const std::vector<std::pair<std::string, double>>& values) {
  std::string summary;
  for (const auto& [tag, v] : values) {
    std::string value;
    put_bytes(&value, 1, tag);
    put_varint(&value, 2 << 3 | 5);  // simple_value, fixed32
    put_fixed(&value, static_cast<float>(v));
    put_bytes(&summary, 1, value);
  }
  std::string e = event_header(clock_(), step);
  put_bytes(&e, 5, summary);
  write_record(e);
}

void TensorBoardWriter::write_record(const std::string& data) {
  std::string rec;
  const uint64_t n = data.size();
  put_fixed(&rec, n);
  put_fixed(&rec, masked_crc32c(rec.data(), 8));
  rec += data;
  put_fixed(&rec, masked_crc32c(data.data(), data.size()));
  out_.write(rec.data(), static_cast<std::streamsize>(rec.size()));
}

void TensorBoardWriter::flush() { out_.flush(); }

}  // namespace loom::train
