// The safetensors format (Hugging Face): an 8-byte little-endian header length N, N bytes of JSON
//   {"<name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"key": "value"}}
// then the raw little-endian tensor bytes, offsets relative to the end of the header. Loom writes
// tensors in name order, packed, and pads the header with spaces to a multiple of 8 bytes.
// The reader trusts nothing: the header length, JSON, dtypes, shapes and offsets are all checked
// (offsets must match the shape, stay inside the file and tile the data without gaps or overlap),
// and a failure names the file, the tensor and the field.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <string>
#include <vector>

namespace loom::checkpoint {

struct TensorFile {
  std::map<std::string, at::Tensor> tensors;  // CPU, contiguous
  std::map<std::string, std::string> metadata;
};

void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// The bytes save_safetensors writes, in memory (e.g. to send a stage's tensors to another rank).
std::string encode_safetensors(const std::map<std::string, at::Tensor>& tensors,
                               const std::map<std::string, std::string>& metadata = {});

TensorFile load_safetensors(const std::string& path);

// Same, from bytes in memory (`source` names them in errors).
TensorFile parse_safetensors(const std::string& bytes, const std::string& source);

}  // namespace loom::checkpoint
