// Pretrains a Mixture-of-Experts model (8 experts, top-2 by default). Alone or under mpirun, like
// gpt_pretrain: `moe_pretrain --config configs/tiny_moe.pbtxt [--set model.moe.top_k=1 ...]`.
#include "loom/train/launch.h"

int main(int argc, char** argv) {
  loom::config::JobConfig defaults;
  defaults.set_name("moe_pretrain");
  auto* moe = defaults.mutable_model()->mutable_moe();
  moe->set_num_experts(8);
  moe->set_top_k(2);
  return loom::train::pretrain_main(argc, argv, "Pretrain a Mixture-of-Experts model.", defaults);
}
