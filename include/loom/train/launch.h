// The main() of Loom's pretraining programs (examples/gpt_pretrain, examples/moe_pretrain):
//   prog [--config FILE.pbtxt] [--set a.b.c=value ...] [--help]
// Bootstraps (MPI under mpirun, a world of one without a launcher), sets up logging, builds a
// Trainer from `defaults` + file + overrides and runs it. A failure on any rank is logged with its
// cause and ends the whole job (MPI_Abort) instead of leaving the other ranks waiting.
#pragma once

#include <string>

#include "loom/config.pb.h"

namespace loom::train {

int pretrain_main(int argc, char** argv, const std::string& description,
                  const config::JobConfig& defaults);

}  // namespace loom::train
