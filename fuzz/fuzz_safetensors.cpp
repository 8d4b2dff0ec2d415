// The safetensors reader: any bytes are a checked file or a loom::Error (kIO naming the file, the
// tensor and the field), never a crash or an out-of-bounds read. Edits mutate a valid Loom file
// (three dtypes, metadata, CRCs).
#include <ATen/ATen.h>

#include "fuzz_common.h"
#include "loom/checkpoint/safetensors.h"
#include "loom/core/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string valid = [] {
    std::map<std::string, at::Tensor> t;
    t["a"] = at::arange(6, at::kFloat).reshape({2, 3});
    t["b"] = at::arange(4, at::kLong);
    t["c"] = at::ones({3}, at::kBFloat16);
    return loom::checkpoint::encode_safetensors(t, {{"step", "7"}});
  }();
  const std::string bytes = loom::fuzz::mutate(valid, data, size);
  try {
    auto f = loom::checkpoint::parse_safetensors(bytes, "fuzz");
    for (auto& [name, tensor] : f.tensors) (void)tensor.sum().item<double>();
  } catch (const loom::Error&) {
  }
  return 0;
}
