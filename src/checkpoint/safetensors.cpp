#include "loom/checkpoint/safetensors.h"

#include <fmt/format.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "loom/core/crc32c.h"
#include "loom/core/error.h"
#include "loom/core/fs.h"

namespace loom::checkpoint {

namespace {

struct DtypeName {
  at::ScalarType type;
  const char* name;
};
constexpr DtypeName kDtypes[] = {
    {at::kDouble, "F64"}, {at::kFloat, "F32"}, {at::kHalf, "F16"},  {at::kBFloat16, "BF16"},
    {at::kLong, "I64"},   {at::kInt, "I32"},   {at::kShort, "I16"}, {at::kChar, "I8"},
    {at::kByte, "U8"},    {at::kBool, "BOOL"},
};

const char* dtype_name(at::ScalarType t) {
  for (const auto& d : kDtypes) {
    if (d.type == t) return d.name;
  }
  LOOM_THROW(ErrorKind::kValue, "safetensors: dtype {} cannot be stored", c10::toString(t));
}

}  // namespace

namespace {
constexpr const char* kCrcPrefix = "crc32c:";  // + tensor name: the CRC-32C of its bytes
constexpr const char* kMetadataCrc = "crc32c:__metadata__";  // of the other metadata entries

std::string hex32(uint32_t v) { return fmt::format("{:08x}", v); }

// Of the bytes, then of the dtype and shape as the header writes them: a header edit that keeps
// the size (F32 <-> I32, a transposed shape) is caught too.
uint32_t tensor_crc(const at::Tensor& c) {
  const uint32_t crc = crc32c(c.data_ptr(), c.nbytes());
  const std::string layout = fmt::format("{}{}", dtype_name(c.scalar_type()), c.sizes());
  return crc32c(layout.data(), layout.size(), crc);
}

// The metadata entries other than the CRCs, as "key\0value\0" in key order.
uint32_t metadata_crc(const std::map<std::string, std::string>& metadata) {
  uint32_t crc = 0;
  for (const auto& [k, v] : metadata) {
    if (k.rfind(kCrcPrefix, 0) == 0) continue;
    crc = crc32c(k.c_str(), k.size() + 1, crc);
    crc = crc32c(v.c_str(), v.size() + 1, crc);
  }
  return crc;
}

// The 8-byte length and the padded JSON header; `data` gets the CPU tensors in file order.
std::string encode_header(const std::map<std::string, at::Tensor>& tensors,
                          const std::map<std::string, std::string>& metadata,
                          std::vector<at::Tensor>* data) {
  std::map<std::string, std::string> meta = metadata;
  for (const auto& [k, v] : metadata) {
    LOOM_CHECK(k.rfind(kCrcPrefix, 0) != 0,
               "safetensors: metadata key '{}' is reserved for integrity checks", k);
  }
  meta[kMetadataCrc] = hex32(metadata_crc(metadata));
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  nlohmann::ordered_json entries = nlohmann::ordered_json::object();
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    LOOM_CHECK(name != "__metadata__", "safetensors: '__metadata__' is not a valid tensor name");
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    const uint64_t bytes = c.nbytes();
    entries[name] = {{"dtype", dtype_name(c.scalar_type())},
                     {"shape", c.sizes().vec()},
                     {"data_offsets", {offset, offset + bytes}}};
    meta[kCrcPrefix + name] = hex32(tensor_crc(c));
    offset += bytes;
    data->push_back(c);
  }
  header["__metadata__"] = meta;
  for (auto& [name, e] : entries.items()) header[name] = e;
  std::string text = header.dump();
  while (text.size() % 8 != 0) text.push_back(' ');
  const uint64_t n = text.size();
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i)
    out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + text;
}

// Checks the CRCs a file carries (files from other writers have none) and removes them from
// `file.metadata`: a tensor or the metadata whose bytes changed is refused by name.
void verify_crcs(TensorFile& file, const std::string& source) {
  std::map<std::string, std::string> crcs;
  for (auto it = file.metadata.begin(); it != file.metadata.end();) {
    if (it->first.rfind(kCrcPrefix, 0) == 0) {
      crcs[it->first.substr(std::char_traits<char>::length(kCrcPrefix))] = it->second;
      it = file.metadata.erase(it);
    } else {
      ++it;
    }
  }
  if (crcs.empty()) return;
  auto corrupt = [&](const std::string& what, const std::string& stored, uint32_t computed) {
    LOOM_THROW(ErrorKind::kIO,
               "safetensors '{}' is corrupt: {} fails its CRC-32C check (stored {}, computed {}); "
               "restore the file or use an older checkpoint",
               source, what, stored, hex32(computed));
  };
  for (const auto& [name, t] : file.tensors) {
    auto it = crcs.find(name);
    LOOM_CHECK_KIND(ErrorKind::kIO, it != crcs.end(),
                    "safetensors '{}' is corrupt: tensor '{}' has no CRC-32C entry", source, name);
    const uint32_t c = tensor_crc(t);
    if (hex32(c) != it->second) corrupt(fmt::format("tensor '{}'", name), it->second, c);
    crcs.erase(it);
  }
  auto meta = crcs.find("__metadata__");
  LOOM_CHECK_KIND(ErrorKind::kIO, meta != crcs.end(),
                  "safetensors '{}' is corrupt: its metadata has no CRC-32C entry", source);
  const uint32_t mc = metadata_crc(file.metadata);
  if (hex32(mc) != meta->second) corrupt("its metadata", meta->second, mc);
  crcs.erase(meta);
  LOOM_CHECK_KIND(ErrorKind::kIO, crcs.empty(),
                  "safetensors '{}' is corrupt: a CRC-32C entry for tensor '{}', which it does not "
                  "hold",
                  source, crcs.empty() ? "" : crcs.begin()->first);
}
}  // namespace

void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<at::Tensor> data;
  const std::string header = encode_header(tensors, metadata, &data);
  AtomicFile out(path);  // fsynced, renamed into place only when complete
  out.write(header.data(), header.size());
  for (const auto& c : data) out.write(c.data_ptr(), c.nbytes());
  out.commit();
}

std::string encode_safetensors(const std::map<std::string, at::Tensor>& tensors,
                               const std::map<std::string, std::string>& metadata) {
  std::vector<at::Tensor> data;
  std::string out = encode_header(tensors, metadata, &data);
  for (const auto& c : data) out.append(static_cast<const char*>(c.data_ptr()), c.nbytes());
  return out;
}

TensorFile parse_safetensors(const std::string& bytes, const std::string& source) {
  auto fail = [&](const std::string& what) {
    LOOM_THROW(ErrorKind::kIO, "safetensors '{}': {}", source, what);
  };
  if (bytes.size() < 8)
    fail(fmt::format("file is {} bytes, shorter than the 8-byte header length", bytes.size()));
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  if (n > bytes.size() - 8) {
    fail(fmt::format("header length {} exceeds the {} bytes that follow it", n, bytes.size() - 8));
  }
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes.begin() + 8,
                                   bytes.begin() + 8 + static_cast<std::ptrdiff_t>(n));
  } catch (const std::exception& e) {
    fail(fmt::format("header is not valid JSON ({})", e.what()));
  }
  if (!header.is_object()) fail("header is not a JSON object");
  const uint64_t data_size = bytes.size() - 8 - n;
  const char* data = bytes.data() + 8 + n;
  TensorFile file;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const auto& entry = it.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) fail("__metadata__ is not an object");
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (!m.value().is_string())
          fail(fmt::format("__metadata__ value '{}' is not a string", m.key()));
        file.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
        !entry.contains("data_offsets")) {
      fail(fmt::format("tensor '{}' needs dtype, shape and data_offsets", name));
    }
    at::ScalarType type = at::kFloat;
    bool known = false;
    const auto& dt = entry["dtype"];
    for (const auto& d : kDtypes) {
      if (dt.is_string() && dt.get<std::string>() == d.name) {
        type = d.type;
        known = true;
      }
    }
    if (!known) fail(fmt::format("tensor '{}' has unsupported dtype {}", name, dt.dump()));
    std::vector<int64_t> shape;
    if (!entry["shape"].is_array()) fail(fmt::format("tensor '{}': shape is not an array", name));
    uint64_t numel = 1;
    for (const auto& d : entry["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) {
        fail(fmt::format("tensor '{}': shape {} has a bad dimension", name, entry["shape"].dump()));
      }
      shape.push_back(d.get<int64_t>());
      numel *= static_cast<uint64_t>(shape.back());
    }
    const auto& off = entry["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned()) {
      fail(fmt::format("tensor '{}': data_offsets must be two non-negative integers, got {}", name,
                       off.dump()));
    }
    const uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    const uint64_t expect = numel * c10::elementSize(type);
    if (end < begin || end - begin != expect) {
      fail(fmt::format(
          "tensor '{}': data_offsets [{}, {}] span {} bytes, but dtype {} and shape {} need {}",
          name, begin, end, end - begin, dt.get<std::string>(), entry["shape"].dump(), expect));
    }
    if (end > data_size) {
      fail(fmt::format("tensor '{}': data_offsets end {} is past the {} data bytes in the file",
                       name, end, data_size));
    }
    ranges.emplace_back(begin, end);
    at::Tensor t = at::empty(shape, at::TensorOptions().dtype(type));
    if (expect > 0) std::memcpy(t.data_ptr(), data + begin, expect);
    file.tensors[name] = t;
  }
  std::sort(ranges.begin(), ranges.end());
  uint64_t pos = 0;
  for (const auto& [b, e] : ranges) {
    if (b != pos)
      fail(fmt::format("tensor data {} at byte {} (expected {}): overlapping or with a gap",
                       b < pos ? "overlaps" : "has a gap", b, pos));
    pos = e;
  }
  if (pos != data_size)
    fail(fmt::format("{} trailing bytes after the last tensor", data_size - pos));
  verify_crcs(file, source);
  return file;
}

TensorFile load_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  LOOM_CHECK_KIND(ErrorKind::kIO, in.good(), "cannot open '{}': {}", path, std::strerror(errno));
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_safetensors(ss.str(), path);
}

}  // namespace loom::checkpoint
