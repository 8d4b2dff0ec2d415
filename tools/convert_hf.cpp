// Converts between Loom checkpoints and Hugging Face directories (LLaMA- and Mixtral-style models):
//   convert_hf --to-hf   --from checkpoints/run/step-00001000 --to hf/run     (model.safetensors +
//   config.json) convert_hf --to-loom --from hf/llama --to checkpoints/init/step-00000000  (a
//   step-0 Loom checkpoint)
// A step-0 checkpoint starts a run from the HF weights: --set
// train.resume=checkpoints/init/step-00000000 with a model config of the same shape (convert_hf
// prints it).
//
// --logits FILE also writes Loom's fp32 logits for --tokens (from the Loom side of the conversion)
// into a safetensors file {tokens [1, s], logits [1, s, V]}; tools/check_hf_logits.py compares them
// with what transformers computes from the HF directory.
#include <ATen/ATen.h>
#include <fmt/format.h>

#include <cstdio>
#include <fstream>
#include <iterator>

#include "loom/checkpoint/checkpoint.h"
#include "loom/checkpoint/hf.h"
#include "loom/checkpoint/safetensors.h"
#include "loom/core/cli.h"
#include "loom/core/config.h"
#include "loom/core/error.h"

int main(int argc, char** argv) {
  return loom::cli::guarded_main(
      "convert_hf",
      [&] {
        loom::cli::CommandLine cl(
            argc, argv,
            {{"to-hf", "", "Loom checkpoint -> Hugging Face directory", true},
             {"to-loom", "", "Hugging Face directory -> Loom checkpoint", true},
             {"from", "", "source directory"},
             {"to", "", "destination directory"},
             {"logits", "", "also write Loom's logits for --tokens to this .safetensors file"},
             {"tokens", "1,2,3,5,8,13,21,34,55,89,144,233", "token ids for --logits"}},
            "Convert Loom checkpoints to and from Hugging Face (LLaMA / Mixtral).");
        if (cl.handled_help()) return 0;
        const bool to_hf = cl.get_bool("to-hf"), to_loom = cl.get_bool("to-loom");
        LOOM_CHECK_CONFIG(to_hf != to_loom, "give exactly one of --to-hf and --to-loom");
        LOOM_CHECK_CONFIG(!cl.get("from").empty() && !cl.get("to").empty(),
                          "flags --from and --to are required");
        // Every flag is checked before anything is written (a bad --tokens left an export behind).
        std::vector<int64_t> ids;
        if (!cl.get("logits").empty()) {
          for (const auto& t : cl.get_list("tokens")) {
            size_t used = 0;
            long long v = -1;
            try {
              v = std::stoll(t, &used);
            } catch (const std::exception&) {
            }
            LOOM_CHECK_CONFIG(used == t.size() && v >= 0,
                              "flag --tokens: '{}' is not a non-negative integer", t);
            ids.push_back(v);
          }
          LOOM_CHECK_CONFIG(!ids.empty(), "flag --tokens is empty");
          // ...and against the model being converted.
          loom::config::ModelConfig model;
          if (to_hf) {
            const auto src = loom::checkpoint::load_checkpoint(cl.get("from"));
            model = loom::checkpoint::stored_config(src, cl.get("from")).model();
          } else {
            std::ifstream in(cl.get("from") + "/config.json");
            LOOM_CHECK_KIND(loom::ErrorKind::kIO, in.good(), "'{}' has no config.json",
                            cl.get("from"));
            model = loom::checkpoint::model_config_from_hf(
                std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()));
          }
          for (int64_t id : ids) {
            LOOM_CHECK_CONFIG(id < model.vocab_size(),
                              "flag --tokens: id {} is outside the model's vocabulary [0, {})", id,
                              model.vocab_size());
          }
          LOOM_CHECK_CONFIG(static_cast<int64_t>(ids.size()) <= model.max_seq_len(),
                            "flag --tokens: {} ids exceed the model's max_seq_len {}", ids.size(),
                            model.max_seq_len());
        }
        std::string loom_side;
        if (to_hf) {
          loom::checkpoint::export_hf(cl.get("from"), cl.get("to"));
          std::printf("wrote %s/model.safetensors and config.json\n", cl.get("to").c_str());
          loom_side = cl.get("from");
        } else {
          loom::checkpoint::import_hf(cl.get("from"), cl.get("to"));
          auto data = loom::checkpoint::load_checkpoint(cl.get("to"));
          std::printf("wrote Loom checkpoint %s; its model config:\n%s", cl.get("to").c_str(),
                      data.metadata.at("config").c_str());
          loom_side = cl.get("to");
        }
        if (!cl.get("logits").empty()) {
          at::Tensor tokens = at::tensor(ids, at::kLong).unsqueeze(0);
          at::Tensor logits = loom::checkpoint::checkpoint_logits(loom_side, tokens);
          loom::checkpoint::save_safetensors(cl.get("logits"),
                                             {{"tokens", tokens}, {"logits", logits.contiguous()}},
                                             {{"checkpoint", loom_side}});
          std::printf("%s\n",
                      fmt::format("wrote Loom's logits {} to {}", logits.sizes(), cl.get("logits"))
                          .c_str());
        }
        return 0;
      },
      1);
}
