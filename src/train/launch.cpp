#include "loom/train/launch.h"

#include <ATen/Parallel.h>

#include <cstdio>
#include <thread>

#include "loom/comm/bootstrap.h"
#include "loom/core/cli.h"
#include "loom/core/config.h"
#include "loom/core/env.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"
#include "loom/train/trainer.h"

namespace loom::train {

int pretrain_main(int argc, char** argv, const std::string& description,
                  const config::JobConfig& defaults) {
  std::unique_ptr<comm::Bootstrap> boot;
  try {
    cli::CommandLine cl(argc, argv, {}, description);
    if (cl.handled_help()) return 0;
    config::JobConfig job = defaults;
    if (!cl.config_path().empty()) config::load_text_file(cl.config_path(), &job);
    for (const auto& o : cl.overrides()) config::apply_override(o, &job);
    config::validate(job);

    boot = std::make_unique<comm::Bootstrap>(comm::BootstrapOptions::from_config(job.comm()), &argc, &argv);
    log::init(log::LogOptions::from_config(job.logging(), boot->rank(), boot->size()));
    // Ranks sharing a node share its cores: without an explicit setting, split them.
    if (job.train().num_threads() == 0 && !env::get("OMP_NUM_THREADS") && boot->local_size() > 1) {
      const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
      job.mutable_train()->set_num_threads(std::max(1, cores / boot->local_size()));
    }
    if (boot->rank() == 0) LOOM_LOG_INFO("config:\n{}", config::to_text(job));
    Trainer trainer(job, boot->world());
    trainer.fit();
    return 0;
  } catch (const std::exception& e) {
    if (boot && boot->size() > 1) {
      boot->abort(1, e.what());  // logs, then ends every rank
    }
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}

}  // namespace loom::train
