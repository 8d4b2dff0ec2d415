// A user's own training loop over Loom's pieces: build the model from a spec, draw batches from a
// data source, and write forward / backward / clip / AdamW / schedule by hand. Useful as a template
// when the Trainer's loop is not the one you want (a custom loss, curriculum, RL fine-tuning...).
//
//   custom_trainer [--steps 200] [--lr 1e-3]
#include <cstdio>

#include "loom/core/cli.h"
#include "loom/core/error.h"
#include "loom/data/source.h"
#include "loom/model/gpt.h"
#include "loom/optim/adamw.h"
#include "loom/optim/clip.h"
#include "loom/optim/schedule.h"

int main(int argc, char** argv) try {
  loom::cli::CommandLine cl(argc, argv,
                            {{"steps", "200", "optimizer steps"},
                             {"lr", "1e-3", "peak learning rate"},
                             {"batch", "8", "sequences per step"},
                             {"seq", "64", "tokens per sequence"}},
                            "A hand-written training loop over Loom's model, optimizer and data.");
  if (cl.handled_help()) return 0;
  const int64_t steps = cl.get_int("steps"), batch = cl.get_int("batch"), seq = cl.get_int("seq");

  // 1. The model: a config (here written in code; a .pbtxt works the same) resolved into a spec.
  loom::config::ModelConfig mc;
  mc.set_vocab_size(512);
  mc.set_hidden_size(128);
  mc.set_num_layers(2);
  mc.set_num_heads(4);
  mc.set_num_kv_heads(2);
  mc.set_max_seq_len(seq);
  loom::model::GptModel model(loom::model::ModelSpec::from_config(mc), /*seed=*/42);
  std::printf("model: %s\n", model.spec().summary().c_str());

  // 2. Optimizer and schedule.
  loom::config::OptimConfig oc;
  oc.set_lr(cl.get_double("lr"));
  oc.set_min_lr(cl.get_double("lr") / 10);
  oc.set_warmup_steps(steps / 10);
  loom::optim::AdamW adamw(&model.parameters(), loom::optim::AdamWOptions::from_config(oc));
  loom::optim::LrSchedule schedule(oc, steps);

  // 3. Data: any DataSource; the synthetic Markov corpus needs no files.
  loom::data::SyntheticMarkovCorpus corpus(mc.vocab_size(), /*branching=*/4, /*seed=*/7);

  // 4. The loop: two micro-batches per step, loss normalised per token over the whole step.
  const int64_t micro = batch / 2;
  for (int64_t step = 0; step < steps; ++step) {
    model.zero_grad();
    double loss_sum = 0;
    const double tokens = static_cast<double>(batch * seq);
    for (int64_t mb = 0; mb < 2; ++mb) {
      at::Tensor buf = at::empty({micro, seq + 1}, at::kLong);
      for (int64_t i = 0; i < micro; ++i) {
        corpus.sample(loom::data::Split::kTrain, step * batch + mb * micro + i, seq + 1,
                      buf.data_ptr<int64_t>() + i * (seq + 1));
      }
      loom::model::Batch b;
      b.tokens = buf.narrow(1, 0, seq).contiguous();
      b.targets = buf.narrow(1, 1, seq).contiguous();
      loom::model::ModelOutput out = model.forward(b);
      (out.loss_sum / tokens).backward();
      loss_sum += out.loss_sum.item<double>();
    }
    const double norm = loom::optim::clip_grad_norm(model.parameters(), 1.0);
    adamw.step(schedule.lr_at(step));
    if (step % 20 == 0 || step + 1 == steps) {
      std::printf("step %4lld  loss %.4f  grad norm %.3f  lr %.2e\n", static_cast<long long>(step + 1),
                  loss_sum / tokens, norm, schedule.lr_at(step));
    }
  }
  std::printf("corpus entropy (the best achievable loss): %.4f\n", corpus.entropy());
  return 0;
} catch (const loom::Error& e) {
  std::fprintf(stderr, "custom_trainer: %s\n", e.what());
  return 1;
}
