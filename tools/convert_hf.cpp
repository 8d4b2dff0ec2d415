// Converts between Loom checkpoints and Hugging Face directories (LLaMA- and Mixtral-style models):
//   convert_hf --to-hf   --from checkpoints/run/step-00001000 --to hf/run     (model.safetensors + config.json)
//   convert_hf --to-loom --from hf/llama --to checkpoints/init/step-00000000  (a step-0 Loom checkpoint)
// A step-0 checkpoint starts a run from the HF weights: --set train.resume=checkpoints/init/step-00000000
// with a model config of the same shape (convert_hf prints it).
#include <cstdio>

#include "loom/checkpoint/checkpoint.h"
#include "loom/checkpoint/hf.h"
#include "loom/core/cli.h"
#include "loom/core/config.h"
#include "loom/core/error.h"

int main(int argc, char** argv) try {
  loom::cli::CommandLine cl(argc, argv,
                            {{"to-hf", "", "Loom checkpoint -> Hugging Face directory", true},
                             {"to-loom", "", "Hugging Face directory -> Loom checkpoint", true},
                             {"from", "", "source directory"},
                             {"to", "", "destination directory"}},
                            "Convert Loom checkpoints to and from Hugging Face (LLaMA / Mixtral).");
  if (cl.handled_help()) return 0;
  const bool to_hf = cl.get_bool("to-hf"), to_loom = cl.get_bool("to-loom");
  LOOM_CHECK_CONFIG(to_hf != to_loom, "give exactly one of --to-hf and --to-loom");
  LOOM_CHECK_CONFIG(!cl.get("from").empty() && !cl.get("to").empty(), "flags --from and --to are required");
  if (to_hf) {
    loom::checkpoint::export_hf(cl.get("from"), cl.get("to"));
    std::printf("wrote %s/model.safetensors and config.json\n", cl.get("to").c_str());
  } else {
    loom::checkpoint::import_hf(cl.get("from"), cl.get("to"));
    auto data = loom::checkpoint::load_checkpoint(cl.get("to"));
    std::printf("wrote Loom checkpoint %s; its model config:\n%s", cl.get("to").c_str(),
                data.metadata.at("config").c_str());
  }
  return 0;
} catch (const loom::Error& e) {
  std::fprintf(stderr, "convert_hf: %s\n", e.what());
  return 1;
}
