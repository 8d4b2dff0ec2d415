// Hugging Face config.json reader (convert_hf --to-loom): any text is a model config or a
// loom::Error naming the key, never a crash, undefined behaviour or a raw JSON exception.
#include "loom/checkpoint/hf_config.h"
#include "loom/core/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    loom::checkpoint::model_config_from_hf(std::string(reinterpret_cast<const char*>(data), size));
  } catch (const loom::Error&) {
  }
  return 0;
}
