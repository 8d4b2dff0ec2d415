// Shared by the fuzz targets (fuzz/README.md): a valid file mutated by the fuzzer's bytes, and a
// per-process scratch directory.
//
// Inputs whose first byte is even are used as they are (the whole file); odd ones are edits of a
// valid file the target made once: records of (4-byte little-endian offset, 1-byte value), each
// setting the byte at offset % size, and a final short record that truncates to remainder/256 of
// the size. Edits of a valid file reach the checks behind the header much sooner than raw bytes.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

namespace loom::fuzz {

inline std::string mutate(const std::string& valid, const uint8_t* data, size_t size) {
  if (size == 0 || data[0] % 2 == 0) return std::string(reinterpret_cast<const char*>(data), size);
  std::string out = valid;
  size_t i = 1;
  for (; i + 5 <= size && !out.empty(); i += 5) {
    uint32_t off = 0;
    std::memcpy(&off, data + i, 4);
    out[off % out.size()] = static_cast<char>(data[i + 4]);
  }
  if (i < size) out.resize(out.size() * data[i] / 256);
  return out;
}

inline std::string scratch_dir() {
  static const std::string dir = [] {
    auto d = std::filesystem::temp_directory_path() / ("loom-fuzz-" + std::to_string(getpid()));
    std::filesystem::create_directories(d);
    return d.string();
  }();
  return dir;
}

inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

}  // namespace loom::fuzz
