// Pretrains a dense GPT/LLaMA-style model. Alone: `gpt_pretrain --config configs/tiny_gpt.pbtxt`;
// data-parallel: `mpirun -np 4 gpt_pretrain --config ...`. Every field can be overridden with
// --set (e.g. --set train.steps=50 --set model.num_layers=2).
#include "loom/train/launch.h"

int main(int argc, char** argv) {
  loom::config::JobConfig defaults;  // the proto defaults: a small LLaMA-style model
  defaults.set_name("gpt_pretrain");
  return loom::train::pretrain_main(argc, argv, "Pretrain a dense GPT/LLaMA-style model.", defaults);
}
