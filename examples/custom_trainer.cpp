// A user's own training loop over Loom's library pieces: the loader and its step plan, the step
// executor, gradient synchronisation, clipping, the optimizer and the schedule, written out by hand
// (docs/training.md, "A step"). Useful as a template when the Trainer's loop is not the one you
// want (a custom loss, curriculum, RL fine-tuning...). It reads the same config as gpt_pretrain
// and, on the same config, prints the same losses (tests: examples.custom_trainer_same_losses*).
// Alone it trains in one process; under mpirun the ranks are data parallel (this example builds no
// tensor or pipeline groups: use the Trainer for those).
//
//   custom_trainer --config configs/tiny_gpt.pbtxt [--set train.steps=50 ...]
//   mpirun -np 2 custom_trainer --config configs/tiny_gpt.pbtxt
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdio>
#include <memory>

#include "loom/comm/bootstrap.h"
#include "loom/core/cli.h"
#include "loom/core/config.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"
#include "loom/data/loader.h"
#include "loom/model/gpt.h"
#include "loom/optim/adamw.h"
#include "loom/optim/schedule.h"
#include "loom/parallel/grad_sync.h"
#include "loom/train/executor.h"

int main(int argc, char** argv) {
  std::unique_ptr<loom::comm::Bootstrap> boot;
  try {
    loom::cli::CommandLine cl(argc, argv, {},
                              "A hand-written training loop over Loom's library pieces.");
    if (cl.handled_help()) return 0;
    loom::config::JobConfig job;
    if (!cl.config_path().empty()) loom::config::load_text_file(cl.config_path(), &job);
    for (const auto& o : cl.overrides()) loom::config::apply_override(o, &job);
    loom::config::validate(job);
    boot = std::make_unique<loom::comm::Bootstrap>(
        loom::comm::BootstrapOptions::from_config(job.comm()), &argc, &argv);
    loom::log::init(loom::log::LogOptions::from_config(job.logging(), boot->rank(), boot->size()));
    const auto& t = job.train();
    if (t.num_threads() > 0) at::set_num_threads(t.num_threads());
    const int dp = boot->size(), rank = boot->rank();
    // What this example does not build, refused by name rather than ignored.
    LOOM_CHECK_CONFIG(
        job.parallel().tp() == 1 && job.parallel().pp() == 1 && job.parallel().cp() == 1 &&
            job.parallel().ep() == 1,
        "custom_trainer is data parallel only; use gpt_pretrain for parallel.tp / pp / cp / ep");
    LOOM_CHECK_CONFIG(t.device() == "cpu",
                      "custom_trainer runs on the CPU; use gpt_pretrain for train.device '{}'",
                      t.device());

    // 1. The model: the config resolved into a spec; parameters initialised from their names.
    const loom::model::ModelSpec spec = loom::model::ModelSpec::from_config(job.model());
    loom::model::GptModel model(spec, job.seed());
    if (rank == 0) std::printf("model: %s\n", spec.summary().c_str());

    // 2. Data: the config's source, and the loader that plans each step (Note: step plan).
    const auto lo = loom::data::LoaderOptions::from_config(job, dp, rank, /*tp_size=*/1, at::kCPU);
    auto source = loom::data::make_source(job, spec.vocab_size, lo.global_batch);
    loom::data::MicroBatchLoader loader(source.get(), lo);

    // 3. Optimizer (AdamW or SGD, replicated or ZeRO-1 as the config says), schedule, gradient
    //    synchronisation over the data-parallel ranks (the world).
    auto optimizer =
        loom::optim::make_optimizer(&model.parameters(), job, boot->world(), nullptr, nullptr);
    loom::optim::LrSchedule schedule(job.optim(), t.steps());
    loom::parallel::GradSyncOptions sync;
    sync.dp = boot->world();
    sync.shards = optimizer->gradient_shards();  // ZeRO-1: reduce-scatter into the owners' shards
    sync.bucket_bytes = static_cast<int64_t>(job.parallel().grad_bucket_mb() * (1 << 20));
    sync.overlap = job.parallel().overlap_grad_reduce();
    loom::parallel::GradSync grad_sync(&model.parameters(), sync);

    // 4. The executor: one pipeline stage, so a one-stage 1F1B table (Note: step executor).
    loom::train::StepExecutor executor({&model}, {}, nullptr, &grad_sync, at::kCPU);

    // 5. The loop.
    for (int64_t step = 0; step < t.steps(); ++step) {
      const loom::data::StepData data = loader.next(step + 1 < t.steps());
      const double tokens = static_cast<double>(data.plan.loss_tokens);  // N over the global batch
      grad_sync.zero_grad();
      const auto sums = executor.train(data.batches, tokens,
                                       1.0 / static_cast<double>(data.plan.global_micro_batches));
      grad_sync.finish();
      at::Tensor loss = at::tensor({sums.loss_sum}, at::kDouble);
      boot->world()->all_reduce(loss);  // the reported loss: every rank's tokens
      const double norm = optimizer->clip_grad_norm(job.optim().clip_grad());
      const double lr = schedule.lr_at(step);
      optimizer->step(lr);
      if (rank == 0) {
        std::printf("step %lld/%lld | loss %.4f | lr %.3e | grad %.3f\n",
                    static_cast<long long>(step + 1), static_cast<long long>(t.steps()),
                    loss.item<double>() / tokens, lr, norm);
      }
    }
    return 0;
  } catch (const std::exception& e) {
    if (boot && boot->size() > 1) boot->abort(1, e.what());
    std::fprintf(stderr, "custom_trainer: %s\n", e.what());
    return 1;
  }
}
