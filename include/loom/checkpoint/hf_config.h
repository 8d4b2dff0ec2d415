// Reading a Hugging Face config.json into a Loom model config (convert_hf --to-loom). Apart from
// the tensor conversions (hf.h) so that it builds without ATen, for its fuzz target.
#pragma once

#include <string>

#include "loom/config.pb.h"

namespace loom::checkpoint {

// A Loom model config from an HF config.json (llama, mistral or mixtral model_type). Every key is
// checked for its JSON type and range: anything else is a loom::Error naming the key (kIO), or
// kUnsupported for a valid feature Loom does not implement.
config::ModelConfig model_config_from_hf(const std::string& config_json);

}  // namespace loom::checkpoint
