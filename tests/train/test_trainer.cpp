// The Trainer: gradient accumulation, resume, bad input, data parallelism; and the checkpoint
// format (safetensors). Runs with no launcher (everything) and under mpirun (DataParallel.*).
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>

#include "loom/checkpoint/checkpoint.h"
#include "loom/checkpoint/safetensors.h"
#include "loom/comm/local_communicator.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"
#include "loom/data/loader.h"
#include "loom/model/offload.h"
#include "loom/train/executor.h"
#include "loom/train/memory_estimate.h"
#include "loom/train/straggler.h"
#include "loom/train/trainer.h"
#include "test_world.h"
#include "trainer_fixture.h"

namespace {

namespace fs = std::filesystem;
using loom::train::Trainer;

// The shared tiny job (tests/common/trainer_fixture.h), 6 steps of 4 micro-batches of 4 sequences.
loom::config::JobConfig tiny_job(bool moe = false) {
  auto j = loom::testing::tiny_job(moe);
  j.mutable_train()->set_steps(6);
  j.mutable_train()->set_micro_batch_size(4);
  j.mutable_parallel()->clear_grad_bucket_mb();
  return j;
}

std::string read_file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::string temp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("loom-test-" + std::to_string(getpid()) + "-" + name);
  fs::remove_all(p);
  return p.string();
}

double max_param_diff(Trainer& a, Trainer& b) {
  double m = 0;
  auto& pa = a.model().parameters();
  auto& pb = b.model().parameters();
  for (size_t i = 0; i < pa.size(); ++i) {
    m = std::max(m, (pa[i].tensor - pb[i].tensor).abs().max().item<double>());
  }
  return m;
}

bool params_equal(Trainer& a, Trainer& b) {
  auto& pa = a.model().parameters();
  auto& pb = b.model().parameters();
  for (size_t i = 0; i < pa.size(); ++i) {
    if (!at::equal(pa[i].tensor, pb[i].tensor)) return false;
  }
  return true;
}

template <typename F>
void expect_error(F&& f, loom::ErrorKind kind, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected an error containing '" << needle << "'";
  } catch (const loom::Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

// The one executor with a one-stage table (Note: step executor) against the hand-written loop it
// replaced (forward, scale the loss, backward, micro-batch after micro-batch): the same operations
// in the same order, so gradients and loss sums are bit-identical, in fp64 and in fp32, dense and
// MoE, with micro-batches of different lengths.
TEST(StepExecutor, OneStageEqualsTheHandWrittenLoopBitForBit) {
  for (bool fp64 : {true, false}) {
    for (bool moe : {false, true}) {
      const std::string what = std::string(fp64 ? "fp64" : "fp32") + (moe ? " moe" : " dense");
      loom::model::ModelSpec spec = loom::model::ModelSpec::from_config(tiny_job(moe).model());
      if (fp64) spec.param_dtype = at::kDouble;
      loom::model::GptModel a(spec, 5), b(spec, 5);
      std::vector<loom::model::Batch> batches;
      at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(3);
      for (int64_t len : {16, 9, 12}) {
        loom::model::Batch mb;
        mb.tokens = at::randint(64, {2, len}, gen, at::kLong);
        mb.targets = at::randint(64, {2, len}, gen, at::kLong);
        batches.push_back(mb);
      }
      const double tokens = 2.0 * (16 + 9 + 12), aux_scale = 1.0 / 3;
      double loss_sum = 0, aux_sum = 0;
      for (const auto& mb : batches) {
        loom::model::ModelOutput out = a.forward(mb);
        at::Tensor loss = out.loss_sum / tokens;
        if (moe) loss = loss + out.aux_loss * aux_scale;
        loss.backward();
        loss_sum += out.loss_sum.item<double>();
        aux_sum += out.aux_loss.item<double>();
      }
      loom::parallel::pipeline::ScheduleOptions o;  // one stage, one chunk
      loom::train::StepExecutor exec({&b}, o, nullptr, nullptr, at::kCPU);
      const loom::train::StepSums sums = exec.train(batches, tokens, aux_scale);
      EXPECT_EQ(sums.loss_sum, loss_sum) << what;
      if (moe) {
        EXPECT_EQ(sums.aux_sum, aux_sum) << what;
      }
      for (size_t i = 0; i < a.parameters().size(); ++i) {
        const at::Tensor& ga = a.parameters()[i].tensor.grad();
        const at::Tensor& gb = b.parameters()[i].tensor.grad();
        ASSERT_EQ(ga.defined(), gb.defined()) << what << " " << a.parameters()[i].name;
        if (ga.defined()) {
          EXPECT_TRUE(at::equal(ga, gb)) << what << " " << a.parameters()[i].name;
        }
      }
      // Evaluation on the same path: the forward's loss sum and token count.
      at::NoGradGuard no_grad;
      const loom::train::EvalSums e = exec.evaluate(batches);
      EXPECT_EQ(e.tokens, tokens) << what;
      EXPECT_NEAR(e.loss_sum, loss_sum, 1e-12 * loss_sum) << what;
    }
  }
}

// DOCUMENTS mode at model level: one step on the loader's packed micro-batches (several documents
// per row, long documents cut into pieces, padding) equals every piece run alone, unpacked, with
// the same per-token normalisation (fp64, 1e-12 relative): attention never crosses a piece,
// positions restart in each, padding does not count. LLaMA, GPT-2 (learned positions, tied head)
// and MoE. The MoE balance and z losses are off here: they are statistics of a micro-batch's
// tokens, so packing changes them by design (the LM loss and its gradients must not change).
TEST(PackedDocuments, AStepEqualsTheDocumentsRunOneByOne) {
  for (const std::string kind : {"llama", "gpt2", "moe"}) {
    auto j = tiny_job(kind == "moe");
    if (kind == "gpt2") j.mutable_model()->set_arch(loom::config::ModelConfig::GPT2);
    if (kind == "moe") {
      j.mutable_model()->mutable_moe()->set_aux_loss_coeff(0);
      j.mutable_model()->mutable_moe()->set_z_loss_coeff(0);
    }
    loom::model::ModelSpec spec = loom::model::ModelSpec::from_config(j.model());
    spec.param_dtype = at::kDouble;
    loom::model::GptModel packed(spec, 11), alone(spec, 11);
    loom::data::SyntheticMarkovCorpus corpus(64, 4, 21, /*max_document_len=*/10);
    loom::data::LoaderOptions o;
    o.mode = loom::data::BatchMode::kDocuments;
    o.seq_len = 16;
    o.global_batch = 20;
    o.micro_batch_tokens = 24;
    o.pad_multiple = 4;
    o.prefetch = false;
    loom::data::MicroBatchLoader loader(&corpus, o);
    const auto step = loader.next();
    ASSERT_GT(step.batches.size(), 1u) << kind;
    const double n = static_cast<double>(step.plan.loss_tokens);
    loom::parallel::pipeline::ScheduleOptions one;
    loom::train::StepExecutor exec({&packed}, one, nullptr, nullptr, at::kCPU);
    const auto sums = exec.train(step.batches, n, 1.0 / static_cast<double>(step.batches.size()));
    // Every piece alone: a batch of one row holding just its tokens.
    const auto samples = loader.global_samples(loom::data::Split::kTrain, 0);
    double loss_sum = 0;
    int64_t pieces = 0, longest = 0;
    for (const auto& mb : step.plan.micro_batches) {
      for (const auto& p : mb.rows[0]) {
        std::vector<int64_t> t(static_cast<size_t>(p.tokens + 1));
        corpus.document(loom::data::Split::kTrain, samples[static_cast<size_t>(p.sample)].index,
                        p.begin, p.tokens + 1, t.data());
        at::Tensor all = at::tensor(t, at::kLong).view({1, -1});
        loom::model::Batch b;
        b.tokens = all.narrow(1, 0, p.tokens).contiguous();
        b.targets = all.narrow(1, 1, p.tokens).contiguous();
        loom::model::ModelOutput out = alone.forward(b);
        (out.loss_sum / n).backward();
        loss_sum += out.loss_sum.item<double>();
        ++pieces;
        longest = std::max(longest, samples[static_cast<size_t>(p.sample)].length);
      }
    }
    EXPECT_GT(pieces, static_cast<int64_t>(step.batches.size()))
        << kind << ": rows must hold several documents";
    EXPECT_GT(longest, 17) << kind << ": some document must be cut into pieces";
    EXPECT_NEAR(sums.loss_sum, loss_sum, 1e-12 * loss_sum) << kind;
    double worst = 0;
    for (size_t i = 0; i < packed.parameters().size(); ++i) {
      const at::Tensor& ga = packed.parameters()[i].tensor.grad();
      const at::Tensor& gb = alone.parameters()[i].tensor.grad();
      ASSERT_EQ(ga.defined(), gb.defined()) << kind << " " << packed.parameters()[i].name;
      if (!ga.defined()) continue;
      const double scale = gb.abs().max().item<double>();
      worst = std::max(worst, (ga - gb).abs().max().item<double>() / std::max(scale, 1e-300));
    }
    EXPECT_LT(worst, 1e-12) << kind;
  }
}

// Four micro-batches of 4 sequences equal one micro-batch of 16: the loss is normalised per token
// over the global batch. fp32: the two runs sum the same per-token losses in a different grouping
// (rounding ~1e-7 relative); after AdamW steps (whose update size is ~lr regardless of gradient
// scale) parameters stay within 2e-5 of each other, while a wrong normalisation (e.g. averaging per
// micro-batch and summing) moves them by ~lr = 3e-3.
TEST(Trainer, AccumulationEqualsOneLargeBatch) {
  for (bool moe : {false, true}) {
    auto ja = tiny_job(moe);
    if (moe) ja.mutable_model()->mutable_moe()->set_aux_loss_coeff(0);  // per micro-batch by design
    auto jb = ja;
    jb.mutable_train()->set_micro_batch_size(16);
    Trainer a(ja), b(jb);
    EXPECT_EQ(a.micro_batches_per_rank(), 4);
    EXPECT_EQ(b.micro_batches_per_rank(), 1);
    for (int s = 0; s < 3; ++s) {
      auto ma = a.train_step();
      auto mb = b.train_step();
      EXPECT_NEAR(ma.loss, mb.loss, 1e-5 * mb.loss) << "moe " << moe << " step " << s;
      EXPECT_NEAR(ma.grad_norm, mb.grad_norm, 1e-4 * mb.grad_norm)
          << "moe " << moe << " step " << s;
    }
    EXPECT_LT(max_param_diff(a, b), 2e-5) << "moe " << moe;
  }
}

TEST(Trainer, LossFallsOnTheSyntheticCorpus) {
  auto j = tiny_job();
  j.mutable_train()->set_steps(40);
  j.mutable_optim()->set_lr(1e-2);
  Trainer t(j);
  auto summary = t.fit();
  // From about ln(64) = 4.16 nats; the chain's entropy is 1.14.
  EXPECT_GT(summary.first_loss, 3.9);
  EXPECT_LT(summary.last_loss, summary.first_loss - 1.0);
  EXPECT_EQ(t.step(), 40);
  EXPECT_EQ(t.consumed_samples(), 40 * 16);
  auto eval = t.evaluate();
  EXPECT_NEAR(eval.perplexity, std::exp(eval.loss), 1e-9 * eval.perplexity);
  EXPECT_EQ(eval.tokens, j.train().eval_batches() * 16 * 16);
}

// N steps, save, resume in a new Trainer, N more: bit-identical to 2N straight on the CPU.
TEST(Trainer, ResumeIsBitIdentical) {
  // Dense; MoE; MoE with the GLOBAL_BATCH balance and the aux-loss-free expert bias (restored from
  // the checkpoint's state, else the resumed routing differs).
  for (int variant : {0, 1, 2}) {
    const bool moe = variant > 0;
    const std::string dir = temp_dir(variant == 0   ? "resume"
                                     : variant == 1 ? "resume-moe"
                                                    : "resume-bias");
    auto j = tiny_job(moe);
    if (variant == 2) {
      j.mutable_model()->mutable_moe()->set_aux_loss_type(loom::config::MoeConfig::GLOBAL_BATCH);
      j.mutable_model()->mutable_moe()->set_bias_update_rate(0.05);
    }
    j.mutable_train()->set_checkpoint_dir(dir);
    j.mutable_train()->set_keep_checkpoints(1);
    Trainer straight(j);
    std::vector<double> losses;
    for (int s = 0; s < 6; ++s) losses.push_back(straight.train_step().loss);

    {
      Trainer first(j);
      for (int s = 0; s < 3; ++s) first.train_step();
      if (variant == 2) {  // three moves of +-rate: the saved bias is not zero
        for (auto* m : first.model().moe_layers())
          EXPECT_GT(m->expert_bias.abs().min().item<double>(), 0.0) << "the bias moved";
      }
      first.save_checkpoint();
    }
    auto jr = j;
    jr.mutable_train()->set_resume("latest");
    Trainer resumed(jr);
    auto summary = resumed.fit();
    EXPECT_EQ(summary.first_step, 3);
    EXPECT_EQ(resumed.step(), 6);
    ASSERT_EQ(resumed.history().size(), 3u);
    for (int s = 0; s < 3; ++s)
      EXPECT_EQ(resumed.history()[s].loss, losses[3 + s]) << "moe " << moe << " step " << 4 + s;
    EXPECT_TRUE(params_equal(straight, resumed)) << "moe " << moe;
    if (variant == 2) {
      const auto a = straight.model().moe_layers(), b = resumed.model().moe_layers();
      ASSERT_EQ(a.size(), b.size());
      for (size_t l = 0; l < a.size(); ++l) {
        EXPECT_TRUE(a[l]->expert_bias.equal(b[l]->expert_bias)) << "layer " << l;
      }
    }
    EXPECT_EQ(straight.optimizer().state()[5].tensor.sum().item<double>(),
              resumed.optimizer().state()[5].tensor.sum().item<double>());
    // fit() saved step 6 at the end and kept only the newest checkpoint.
    auto latest = loom::checkpoint::latest_checkpoint(dir);
    ASSERT_TRUE(latest.has_value());
    EXPECT_EQ(fs::path(*latest).filename(), "step-00000006");
    EXPECT_FALSE(fs::exists(fs::path(dir) / "step-00000003"));
    fs::remove_all(dir);
  }
}

// ---------------------------------------------------------------------------------------------
// Checkpoint integrity and lineage (issue 15). Each of these failed before its fix: a flipped byte
// resumed with rc 0, a rollback deleted the abandoned branch's checkpoint of the same step and a
// fresh start into a used directory pruned its own first checkpoint.

// Flips one byte of a file at `offset` from its end (or from the start when negative).
void flip_byte(const std::string& path, int64_t from_end) {
  std::string bytes = read_file_bytes(path);
  const size_t at = static_cast<size_t>(static_cast<int64_t>(bytes.size()) - 1 - from_end);
  bytes[at] = static_cast<char>(bytes[at] ^ 0x10);
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

// A trainer after one step, checkpointed under a fresh directory.
struct OneStepSaved {
  std::string dir;
  loom::config::JobConfig job;
  std::unique_ptr<Trainer> trainer;
  std::string saved;
};
OneStepSaved one_step_saved(const std::string& name) {
  OneStepSaved r{temp_dir(name), tiny_job(), nullptr, ""};
  r.job.mutable_train()->set_checkpoint_dir(r.dir);
  r.trainer = std::make_unique<Trainer>(r.job);
  r.trainer->train_step();
  r.saved = r.trainer->save_checkpoint();
  return r;
}

TEST(Checkpoint, AFlippedByteIsRefusedByName) {
  auto [dir, j, first, saved] = one_step_saved("crc");
  Trainer& a = *first;
  const std::string model = saved + "/model.safetensors", state = saved + "/state.safetensors";
  const std::string good_model = read_file_bytes(model), good_state = read_file_bytes(state);
  Trainer b(j);
  // The last tensor's last byte (tensors are stored in name order).
  flip_byte(model, 0);
  expect_error([&] { b.load_checkpoint(saved); }, loom::ErrorKind::kIO, "fails its CRC-32C check");
  expect_error([&] { loom::checkpoint::load_checkpoint(saved); }, loom::ErrorKind::kIO,
               "tensor 'output.weight' fails its CRC-32C check");
  EXPECT_EQ(b.step(), 0);
  // A metadata value (the step) changed in place, same length: the metadata's own CRC.
  std::ofstream(model, std::ios::binary | std::ios::trunc) << good_model;
  std::string st = good_state;
  const size_t pos = st.find("\"step\":\"1\"");
  ASSERT_NE(pos, std::string::npos);
  st[pos + 8] = '7';
  std::ofstream(state, std::ios::binary | std::ios::trunc) << st;
  expect_error([&] { b.load_checkpoint(saved); }, loom::ErrorKind::kIO,
               "its metadata fails its CRC-32C check");
  // Restored bytes load.
  std::ofstream(state, std::ios::binary | std::ios::trunc) << good_state;
  b.load_checkpoint(saved);
  EXPECT_EQ(b.step(), 1);
  EXPECT_TRUE(params_equal(a, b));
  fs::remove_all(dir);
}

// A rollback (resume from an earlier step into the same directory) keeps the abandoned branch's
// newer checkpoints aside, untouched, and "latest" follows the new branch; a fresh start into a
// used directory does the same instead of pruning its own checkpoints.
TEST(Checkpoint, ARollbackKeepsTheAbandonedBranchAside) {
  const std::string dir = temp_dir("lineage");
  auto j = tiny_job();
  j.mutable_train()->set_checkpoint_dir(dir);
  j.mutable_train()->set_save_every(1);
  j.mutable_train()->set_keep_checkpoints(2);
  j.mutable_train()->set_steps(4);
  Trainer(j).fit();  // step-3, step-4
  const std::string old4 = read_file_bytes(dir + "/step-00000004/model.safetensors");
  auto jr = j;
  jr.mutable_train()->set_resume(dir + "/step-00000003");
  jr.mutable_train()->set_steps(5);
  jr.mutable_optim()->set_lr(1e-2);  // another branch from step 3
  jr.mutable_train()->add_allow_config_changes("optim.lr");
  jr.mutable_train()->add_allow_config_changes("train.steps");
  Trainer(jr).fit();  // step-4 and step-5 of the new branch
  std::vector<fs::path> aside;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().filename().string().rfind("abandoned-", 0) == 0) aside.push_back(e.path());
  }
  ASSERT_EQ(aside.size(), 1u);
  EXPECT_EQ(read_file_bytes((aside[0] / "step-00000004/model.safetensors").string()), old4);
  EXPECT_NE(read_file_bytes(dir + "/step-00000004/model.safetensors"), old4);
  EXPECT_EQ(fs::path(*loom::checkpoint::latest_checkpoint(dir)).filename(), "step-00000005");
  // A fresh start into the same directory: steps 4 and 5 go aside, the new step 1 stays.
  auto jf = j;
  jf.mutable_train()->set_steps(1);
  Trainer(jf).fit();
  EXPECT_EQ(fs::path(*loom::checkpoint::latest_checkpoint(dir)).filename(), "step-00000001");
  int abandoned = 0;
  for (const auto& e : fs::directory_iterator(dir))
    abandoned += e.path().filename().string().rfind("abandoned-", 0) == 0;
  EXPECT_EQ(abandoned, 2);
  fs::remove_all(dir);
}

// A replacement interrupted between its two renames leaves step-N.old, which latest() finds and
// which loads; a newer incomplete directory is passed over.
TEST(Checkpoint, AnInterruptedReplacementIsFound) {
  auto [dir, j, first, saved] = one_step_saved("replace");
  Trainer& a = *first;
  EXPECT_EQ(a.save_checkpoint(), saved);  // replacing the same step in place
  fs::rename(saved, saved + ".old");
  fs::create_directories(dir + "/step-00000002");  // newer, incomplete
  const auto latest = loom::checkpoint::latest_checkpoint(dir);
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(*latest, saved + ".old");
  Trainer b(j);
  b.load_checkpoint(*latest);
  EXPECT_TRUE(params_equal(a, b));
  fs::remove_all(dir);
}

// metrics.jsonl across a crash: the steps a crashed run logged after its last checkpoint (and a
// torn last line) are dropped when the resumed run starts, so every step appears once (issue 15:
// they appeared twice), and each start is marked.
TEST(Metrics, JsonlHoldsEachStepOnceAcrossACrash) {
  const std::string dir = temp_dir("jsonl");
  auto j = tiny_job();
  j.mutable_train()->set_checkpoint_dir(dir + "/ckpt");
  j.mutable_train()->set_metrics_jsonl(dir + "/metrics.jsonl");
  j.mutable_train()->set_save_every(4);
  j.mutable_train()->set_keep_checkpoints(0);
  Trainer(j).fit();                             // steps 1..6, checkpoints 4 and 6
  fs::remove_all(dir + "/ckpt/step-00000006");  // the crash came before step 6 was saved
  std::ofstream(dir + "/metrics.jsonl", std::ios::app) << "{\"type\": \"tra";  // torn line
  auto jr = j;
  jr.mutable_train()->set_resume("latest");
  Trainer(jr).fit();  // steps 5..6 again
  std::map<int64_t, int> train_steps;
  std::vector<std::pair<int64_t, int64_t>> starts;  // (step, dropped)
  std::ifstream in(dir + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    const auto r = nlohmann::json::parse(line);
    if (r["type"] == "train") ++train_steps[r["step"].get<int64_t>()];
    if (r["type"] == "start") starts.emplace_back(r["step"], r["moved"]);
  }
  ASSERT_EQ(train_steps.size(), 6u);
  for (const auto& [step, n] : train_steps) EXPECT_EQ(n, 1) << "step " << step;
  ASSERT_EQ(starts.size(), 2u);
  EXPECT_EQ(starts[0], std::make_pair(int64_t{0}, int64_t{0}));
  EXPECT_EQ(starts[1], std::make_pair(int64_t{4}, int64_t{3}));  // steps 5, 6 and the torn line
  // Nothing is deleted: the abandoned records are in a side file; a fresh run sets the whole file
  // aside and starts a new one.
  int side_lines = 0, side_files = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().filename().string().rfind("metrics.jsonl.abandoned-", 0) != 0) continue;
    ++side_files;
    std::ifstream side(e.path());
    while (std::getline(side, line)) ++side_lines;
  }
  EXPECT_EQ(side_files, 1);
  EXPECT_EQ(side_lines, 3);
  auto jf = j;
  jf.mutable_train()->set_checkpoint_dir("");
  jf.mutable_train()->set_steps(1);
  Trainer(jf).fit();
  int lines = 0;
  std::ifstream fresh(dir + "/metrics.jsonl");
  while (std::getline(fresh, line)) ++lines;
  EXPECT_EQ(lines, 2);  // start + step 1
  int before = 0;
  for (const auto& e : fs::directory_iterator(dir))
    before += e.path().filename().string().rfind("metrics.jsonl.before-", 0) == 0;
  EXPECT_EQ(before, 1);
  fs::remove_all(dir);
}

TEST(Trainer, NanLossStopsWithTheStepAndKeepsTheParameters) {
  Trainer t(tiny_job());
  t.train_step();
  auto& params = t.model().parameters();
  at::Tensor before = params[1].tensor.detach().clone();
  {
    at::NoGradGuard g;
    params[0].tensor.fill_(std::nan(""));
  }
  expect_error([&] { t.train_step(); }, loom::ErrorKind::kNumerics, "step 2: the loss is NaN");
  EXPECT_EQ(t.step(), 1);
  EXPECT_TRUE(at::equal(params[1].tensor, before));
  // The data position stays with the parameters: a retry reads step 2's batch, not step 3's.
  EXPECT_EQ(t.consumed_samples(), t.global_batch_size());
  expect_error([&] { t.train_step(); }, loom::ErrorKind::kNumerics, "step 2: the loss is NaN");
  EXPECT_EQ(t.consumed_samples(), t.global_batch_size());
}

// A checkpoint records the data mode: a position counted in windows is not resumed as a count of
// documents (or back), and the refusal changes nothing. A failed checkpoint write is an error on
// every rank, naming the step and the reason.
TEST(Trainer, CheckpointsRefuseAnotherDataModeAndReportFailedWrites) {
  const std::string dir = temp_dir("mode");
  auto j = tiny_job();
  j.mutable_train()->set_checkpoint_dir(dir);
  Trainer windows(j);
  windows.train_step();
  const std::string saved = windows.save_checkpoint();
  auto jd = j;
  jd.mutable_data()->set_mode(loom::config::DataConfig::DOCUMENTS);
  Trainer docs(jd);
  const at::Tensor before = docs.model().parameters()[0].tensor.detach().clone();
  // The stored config refuses the change first (Note: resume config check)...
  expect_error([&] { docs.load_checkpoint(saved); }, loom::ErrorKind::kConfig,
               "data.mode: WINDOWS in the checkpoint, DOCUMENTS now");
  // ...and allowed on purpose, the loader still cannot continue a position of the other mode.
  jd.mutable_train()->add_allow_config_changes("data.mode");
  Trainer docs_allowed(jd);
  expect_error([&] { docs_allowed.load_checkpoint(saved); }, loom::ErrorKind::kIO,
               "the position was saved with data.mode WINDOWS, this run uses DOCUMENTS");
  EXPECT_TRUE(at::equal(docs.model().parameters()[0].tensor, before));
  EXPECT_EQ(docs.step(), 0);
  // A checkpoint directory that cannot be written: a file stands where the directory should be.
  auto jf = j;
  jf.mutable_train()->set_checkpoint_dir(dir + "/step-00000001/model.safetensors");
  Trainer blocked(jf);
  blocked.train_step();
  expect_error([&] { blocked.save_checkpoint(); }, loom::ErrorKind::kIO,
               "writing the checkpoint of step 1 under");
  fs::remove_all(dir);
}

TEST(Trainer, MissingOrMismatchedCheckpointIsAClearError) {
  auto j = tiny_job();
  j.mutable_train()->set_resume("/nonexistent/loom/step-00000001");
  Trainer t(j);
  expect_error([&] { t.fit(); }, loom::ErrorKind::kIO,
               "checkpoint '/nonexistent/loom/step-00000001' does not exist");

  const std::string dir = temp_dir("mismatch");
  auto js = tiny_job();
  js.mutable_train()->set_checkpoint_dir(dir);
  Trainer small(js);
  std::string saved = small.save_checkpoint();
  auto jb = tiny_job();
  jb.mutable_model()->set_ffn_hidden_size(48);
  Trainer other(jb);
  expect_error([&] { other.load_checkpoint(saved); }, loom::ErrorKind::kConfig,
               "model.ffn_hidden_size: 64 in the checkpoint, 48 now");
  jb.mutable_train()->add_allow_config_changes("model");  // the shapes are still checked
  Trainer allowed(jb);
  expect_error([&] { allowed.load_checkpoint(saved); }, loom::ErrorKind::kIO,
               "parameter 'layers.0.mlp.fc1.weight' has shape [128, 32], the model needs [96, 32]");
  fs::remove(fs::path(saved) / "state.safetensors");
  expect_error([&] { small.load_checkpoint(saved); }, loom::ErrorKind::kIO,
               "'state.safetensors' is missing");
  // An incomplete directory is not "latest".
  EXPECT_FALSE(loom::checkpoint::latest_checkpoint(dir).has_value());
  fs::remove_all(dir);
}

TEST(Trainer, BadTrainConfigsAreRefused) {
  auto j = tiny_job();
  j.mutable_train()->set_seq_len(32);
  expect_error([&] { Trainer t(j); }, loom::ErrorKind::kConfig,
               "'train.seq_len' must be in [1, model.max_seq_len = 16], got 32");
  j = tiny_job();
  j.mutable_train()->set_global_batch_size(18);
  expect_error([&] { Trainer t(j); }, loom::ErrorKind::kConfig,
               "must be a multiple of train.micro_batch_size (4)");
  j = tiny_job();
  j.mutable_parallel()->set_tp(2);
  expect_error([&] { Trainer t(j, std::make_shared<loom::comm::LocalCommunicator>()); },
               loom::ErrorKind::kConfig, "");
  j = tiny_job();
  j.mutable_optim()->set_beta2(1.0);
  expect_error([&] { Trainer t(j); }, loom::ErrorKind::kConfig, "'optim.beta2' must be in [0, 1)");
  j = tiny_job();
  j.mutable_train()->set_device("tpu");
  expect_error([&] { Trainer t(j); }, loom::ErrorKind::kConfig, "field 'train.device'");
  if (!at::hasCUDA()) {
    j.mutable_train()->set_device("cuda");
    expect_error([&] { Trainer t(j); }, loom::ErrorKind::kUnsupported, "this LibTorch has no CUDA");
  }
  j = tiny_job();
  j.mutable_train()->set_progress("fancy");  // refused on every rank, before anything runs
  expect_error([&] { Trainer t(j); }, loom::ErrorKind::kConfig,
               "'train.progress' must be auto, bar, lines or off");
  // Checks that config::validate makes before any piece is built, each naming its field.
  j = tiny_job();
  j.mutable_optim()->set_clip_grad(-1);
  expect_error([&] { Trainer t(j); }, loom::ErrorKind::kConfig, "'optim.clip_grad' must be >= 0");
  j = tiny_job();
  j.mutable_parallel()->set_grad_bucket_mb(0);
  expect_error([&] { Trainer t(j); }, loom::ErrorKind::kConfig,
               "'parallel.grad_bucket_mb' must be > 0, got 0");
  j = tiny_job();
  j.mutable_parallel()->set_vocab_divisible_by(0);
  expect_error([&] { Trainer t(j); }, loom::ErrorKind::kConfig,
               "'parallel.vocab_divisible_by' must be >= 1, got 0");
  j = tiny_job();
  j.mutable_data()->set_mode(loom::config::DataConfig::DOCUMENTS);
  j.mutable_parallel()->set_pp(2);
  j.mutable_parallel()->set_virtual_pp(2);  // interleaved by default
  expect_error([&] { Trainer t(j); }, loom::ErrorKind::kConfig,
               "parallel.pp_schedule = interleaved cannot take");
  // Activation offload (Note: activation offload).
  j = tiny_job();
  j.mutable_train()->set_offload_fraction(1.5);
  expect_error([&] { Trainer t(j); }, loom::ErrorKind::kConfig,
               "train.offload_fraction = 1.5: the share of each model chunk's blocks");
  j = tiny_job();
  j.mutable_train()->set_offload_fraction(0.5);
  j.mutable_train()->set_offload_bandwidth_gbps(25);
  expect_error([&] { Trainer t(j); }, loom::ErrorKind::kConfig,
               "train.offload_bandwidth_gbps = 25 chooses each micro-batch's offload share from "
               "the hybrid data parallelism cost model, so it needs parallel.hdp: true");
  j.mutable_train()->set_offload_bandwidth_gbps(-1);
  expect_error([&] { Trainer t(j); }, loom::ErrorKind::kConfig,
               "train.offload_min_tokens = 0 and train.offload_bandwidth_gbps = -1 must not be "
               "negative");
}

TEST(Trainer, ActivationOffloadTrainsTheSameSteps) {
  // Offloading every block's saved tensors (and, in documents mode, only the micro-batches with a
  // document of 8 tokens or more) changes where they wait, not their values: the same losses,
  // gradient norms and parameters as keeping them (Note: activation offload). Float32, to 1e-6
  // relative: the copies sit at other addresses, where BLAS may take another SIMD path (a wrong
  // tensor handed back would be off by far more).
  for (const bool documents : {false, true}) {
    auto j = tiny_job();
    j.mutable_train()->set_steps(3);
    if (documents) j.mutable_data()->set_mode(loom::config::DataConfig::DOCUMENTS);
    auto o = j;
    o.mutable_train()->set_offload_fraction(1);
    if (documents) o.mutable_train()->set_offload_min_tokens(8);
    Trainer a(j), b(o);
    const auto before = loom::model::offload_counters();
    for (int s = 0; s < 3; ++s) {
      const auto ma = a.train_step(), mb = b.train_step();
      EXPECT_NEAR(ma.loss, mb.loss, 1e-6 * ma.loss) << "documents " << documents << " step " << s;
      EXPECT_NEAR(ma.grad_norm, mb.grad_norm, 1e-6 * ma.grad_norm)
          << "documents " << documents << " step " << s;
    }
    const auto after = loom::model::offload_counters();
    EXPECT_GT(after.packed - before.packed, 0) << "documents " << documents;
    for (size_t i = 0; i < a.model().parameters().size(); ++i) {
      EXPECT_TRUE(at::allclose(a.model().parameters()[i].tensor, b.model().parameters()[i].tensor,
                               1e-6, 1e-7))
          << a.model().parameters()[i].name;
    }
  }
  // Micro-batches without a sequence of offload_min_tokens offload nothing.
  {
    auto j = tiny_job();
    j.mutable_data()->set_mode(loom::config::DataConfig::DOCUMENTS);
    j.mutable_train()->set_offload_fraction(1);
    j.mutable_train()->set_offload_min_tokens(1 << 20);
    Trainer c(j);
    const auto before = loom::model::offload_counters();
    c.train_step();
    EXPECT_EQ(loom::model::offload_counters().packed, before.packed);
  }
  // The memory estimate: on a GPU, with every micro-batch offloading, the offloaded blocks'
  // activations leave the device but the two that backward brings back; on the CPU (the same
  // memory) or when only some micro-batches offload, nothing is counted off.
  auto j = tiny_job();
  j.mutable_model()->set_num_layers(8);
  const auto spec = loom::model::ModelSpec::from_config(j.model());
  const auto one = loom::mesh::ParallelDims::create(1, 1, 1, 1, 1, 1);
  const auto kept = loom::train::estimate_memory(spec, j, one);
  j.mutable_train()->set_offload_fraction(1);
  EXPECT_EQ(loom::train::estimate_memory(spec, j, one).activations, kept.activations);  // CPU
  j.mutable_train()->set_device("cuda");
  const auto gpu = loom::train::estimate_memory(spec, j, one);
  EXPECT_DOUBLE_EQ(gpu.activations, kept.activations * 2 / 8);
  j.mutable_train()->set_offload_fraction(0.5);  // 4 of 8 layers stay, 2 come back
  EXPECT_DOUBLE_EQ(loom::train::estimate_memory(spec, j, one).activations,
                   kept.activations * 6 / 8);
  j.mutable_train()->set_offload_min_tokens(64);
  EXPECT_EQ(loom::train::estimate_memory(spec, j, one).activations, kept.activations);
  EXPECT_GT(kept.layer_bytes_per_token, 0);
}

// The run summary and a step's performance figures against closed forms.
TEST(Metrics, SummaryAndPerformanceAreTheClosedForms) {
  loom::train::StepMetrics m;
  m.tokens = 1000;
  m.seconds = 0.5;
  loom::train::add_performance(m, /*flops=*/8e12, /*devices=*/4, /*peak_flops=*/10e12, at::kCPU);
  EXPECT_DOUBLE_EQ(m.tokens_per_s, 2000);
  EXPECT_DOUBLE_EQ(m.tokens_per_s_per_device, 500);
  EXPECT_DOUBLE_EQ(m.tflops_per_device, 4);  // 8e12 / 0.5 s / 4 devices
  EXPECT_DOUBLE_EQ(m.mfu, 0.4);
  EXPECT_GT(m.rss, 0);

  loom::train::SummaryTracker one(7);  // one step: its own figures
  m.loss = 3;
  one.step(m);
  auto s = one.finish(8, "");
  EXPECT_EQ(s.first_step, 7);
  EXPECT_EQ(s.last_step, 8);
  EXPECT_DOUBLE_EQ(s.mean_tokens_per_s, 2000);
  EXPECT_TRUE(std::isnan(s.best_eval_loss));  // nothing evaluated

  loom::train::SummaryTracker three(0);  // the first (warm-up) step is left out of the means
  const double tps[] = {1, 10, 30}, mfu[] = {0.9, 0.2, 0.4}, loss[] = {5, 4, 3.5};
  for (int i = 0; i < 3; ++i) {
    m.tokens_per_s = tps[i];
    m.mfu = mfu[i];
    m.loss = loss[i];
    three.step(m);
  }
  loom::train::EvalMetrics e;
  for (double l : {4.0, 3.0, 3.5}) {
    e.loss = l;
    three.eval(e);
  }
  s = three.finish(3, "ckpt");
  EXPECT_DOUBLE_EQ(s.mean_tokens_per_s, 20);
  EXPECT_DOUBLE_EQ(s.mean_mfu, 0.3);
  EXPECT_DOUBLE_EQ(s.first_loss, 5);
  EXPECT_DOUBLE_EQ(s.last_loss, 3.5);
  EXPECT_DOUBLE_EQ(s.best_eval_loss, 3);
  EXPECT_EQ(s.checkpoint, "ckpt");
}

// [Note: memory estimate] The state part is exact: the parameters a Trainer builds, and closed
// forms for the optimizer's moments with and without ZeRO-1.
TEST(MemoryEstimate, StateIsWhatTheTrainerAllocates) {
  auto j = tiny_job();
  const auto spec = loom::model::ModelSpec::from_config(j.model());
  const auto one = loom::mesh::ParallelDims::create(1, 1, 1, 1, 1, 1);
  const auto est = loom::train::estimate_memory(spec, j, one);
  Trainer t(j);
  double bytes = 0;
  for (const auto& p : t.model().parameters()) bytes += static_cast<double>(p.tensor.nbytes());
  EXPECT_DOUBLE_EQ(est.parameters, bytes);
  EXPECT_DOUBLE_EQ(est.gradients, bytes);
  EXPECT_DOUBLE_EQ(est.optimizer, 2 * bytes);
  EXPECT_GT(est.activations, 0);
  EXPECT_GT(est.logits, 0);

  j.mutable_parallel()->set_distributed_optimizer(true);
  const auto dp4 = loom::mesh::ParallelDims::create(4, 1, 1, 1, 4, 1);
  EXPECT_DOUBLE_EQ(loom::train::estimate_memory(spec, j, dp4).optimizer, 2 * bytes / 4);

  // SGD keeps no state; a pipeline's fullest rank holds its stage's layers plus the embedding
  // (first stage) or the head and final norm (last stage).
  auto sgd = j;
  sgd.mutable_optim()->set_optimizer(loom::config::OptimConfig::SGD);
  EXPECT_EQ(loom::train::estimate_memory(spec, sgd, one).optimizer, 0);
  const auto p = spec.parameter_split();
  const auto pp2 = loom::mesh::ParallelDims::create(2, 1, 1, 1, 1, 2);
  const double stage = p.layers / 2;
  const double per_param = est.parameters / p.total();  // bytes of a master weight
  EXPECT_DOUBLE_EQ(loom::train::estimate_memory(spec, j, pp2).parameters,
                   per_param * std::max(stage + p.embedding, stage + p.head + p.final_norm));

  // Full recomputation keeps less; a longer micro-batch more.
  auto r = j;
  r.mutable_model()->set_recompute(loom::config::ModelConfig::FULL);
  EXPECT_LT(loom::train::estimate_memory(spec, r, one).activations, est.activations);
  auto m = j;
  m.mutable_train()->set_micro_batch_size(2 * j.train().micro_batch_size());
  EXPECT_DOUBLE_EQ(loom::train::estimate_memory(spec, m, one).activations, 2 * est.activations);
}

// A model that cannot fit is refused before anything is allocated, with the estimate and what to
// change (it used to end in the allocator: "can't allocate 51539607552 bytes" and a backtrace).
TEST(MemoryEstimate, AModelThatCannotFitIsRefusedUpFront) {
  auto huge = tiny_job();
  huge.mutable_model()->set_hidden_size(1000000000);  // 1e9: counts overflow int64 if not doubles
  loom::testing::expect_config_error(huge, "the model does not fit: each rank needs");
  auto wide = tiny_job();
  wide.mutable_model()->set_vocab_size(2147483647);  // the largest int32 vocabulary
  loom::testing::expect_config_error(wide,
                                     "or make it smaller (model.hidden_size, model.num_layers");

  const auto spec = loom::model::ModelSpec::from_config(huge.model());
  const auto est =
      loom::train::estimate_memory(spec, huge, loom::mesh::ParallelDims::create(1, 1, 1, 1, 1, 1));
  EXPECT_TRUE(std::isfinite(est.total()));
  EXPECT_GT(est.state(), 1e18);  // ~2e19 parameters' worth of bytes

  // The state alone decides the refusal; activations over the limit only warn.
  const auto small =
      loom::train::estimate_memory(loom::model::ModelSpec::from_config(tiny_job().model()),
                                   tiny_job(), loom::mesh::ParallelDims::create(1, 1, 1, 1, 1, 1));
  expect_error([&] { loom::train::check_memory(small, 0.5 * small.state(), at::kCPU, 1); },
               loom::ErrorKind::kConfig, "but has");
  EXPECT_NO_THROW(loom::train::check_memory(small, 1.01 * small.state(), at::kCPU, 1));
  EXPECT_NO_THROW(loom::train::check_memory(small, -1, at::kCPU, 1));  // unknown: only logged
}

// ---------------------------------------------------------------------------------------------
// safetensors.
TEST(Safetensors, RoundTripWithMetadataAndDtypes) {
  const std::string dir = temp_dir("st");
  fs::create_directories(dir);
  std::map<std::string, at::Tensor> tensors = {
      {"a", at::arange(6, at::kFloat).view({2, 3})},
      {"b", at::tensor({1.5, -2.25}, at::kDouble)},
      {"c", at::arange(4, at::kFloat).to(at::kBFloat16)},
      {"d", at::tensor({7, 8, 9}, at::kLong)},
      {"empty", at::empty({0, 4}, at::kFloat)},
  };
  const std::string path = dir + "/x.safetensors";
  loom::checkpoint::save_safetensors(path, tensors, {{"step", "12"}});
  auto f = loom::checkpoint::load_safetensors(path);
  EXPECT_EQ(f.metadata.at("step"), "12");
  ASSERT_EQ(f.tensors.size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    EXPECT_EQ(f.tensors.at(name).scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(at::equal(f.tensors.at(name), t)) << name;
  }
  // The header length is a multiple of 8 and the JSON is what the format says.
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_NE(bytes.find(R"("a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]})"),
            std::string::npos);
  fs::remove_all(dir);
}

TEST(Safetensors, InMemoryBytesEqualTheFile) {
  // encode_safetensors (what pipeline stages send to the checkpoint writer) is the file's bytes.
  const std::string dir = temp_dir("st-mem");
  fs::create_directories(dir);
  std::map<std::string, at::Tensor> tensors = {{"w", at::arange(10, at::kFloat)},
                                               {"z", at::ones({3}, at::kLong)}};
  loom::checkpoint::save_safetensors(dir + "/a.safetensors", tensors, {{"k", "v"}});
  std::ifstream in(dir + "/a.safetensors", std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(loom::checkpoint::encode_safetensors(tensors, {{"k", "v"}}), bytes);
  auto f =
      loom::checkpoint::parse_safetensors(loom::checkpoint::encode_safetensors(tensors), "memory");
  EXPECT_TRUE(at::equal(f.tensors.at("w"), tensors.at("w")));
  fs::remove_all(dir);
}

TEST(FaultInjection, ParsesAndRefusesMalformedValues) {
  using loom::train::FaultInjection;
  auto f = FaultInjection::parse("rank=3,step=7,kind=hang");
  EXPECT_EQ(f.rank, 3);
  EXPECT_EQ(f.step, 7);
  EXPECT_EQ(f.kind, FaultInjection::Kind::kHang);
  EXPECT_EQ(FaultInjection::parse("kind=exit,step=1,rank=0").kind, FaultInjection::Kind::kExit);
  auto bad = [](const std::string& v, const std::string& needle) {
    expect_error([&] { FaultInjection::parse(v); }, loom::ErrorKind::kConfig, needle);
  };
  bad("rank=1,step=2", "LOOM_FAULT_INJECT='rank=1,step=2' needs rank=, step= and kind=");
  bad("rank=1,step=0,kind=exit", "'step=0' needs an integer >= 1");
  bad("rank=x,step=2,kind=exit", "'rank=x' needs an integer >= 0");
  bad("rank=1,step=2,kind=crash", "kind 'crash' is not one of exit, hang, stop, slow, error");
  bad("rank=1,step=2,kind=exit,when=now", "unknown key 'when'");
  bad("rank", "'rank' is not key=value");
  // error: thrown on the named rank and step only.
  auto e = FaultInjection::parse("rank=0,step=2,kind=error");
  e.maybe_trigger(1, 2);
  e.maybe_trigger(0, 1);
  expect_error([&] { e.maybe_trigger(0, 2); }, loom::ErrorKind::kInternal,
               "rank 0 fails at step 2");
}

std::string file_with_header(const std::string& json, size_t data_bytes) {
  std::string out(8, '\0');
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + json + std::string(data_bytes, '\0');
}

TEST(Safetensors, LyingHeadersAreRefused) {
  using loom::checkpoint::parse_safetensors;
  auto bad = [](const std::string& bytes, const std::string& needle) {
    expect_error([&] { parse_safetensors(bytes, "t.safetensors"); }, loom::ErrorKind::kIO, needle);
  };
  bad("abc", "shorter than the 8-byte header length");
  bad(file_with_header("{}", 0).substr(0, 9), "header length 2 exceeds the 1 bytes");
  bad(file_with_header("{not json", 0), "header is not valid JSON");
  bad(file_with_header(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", 16),
      "data_offsets [0, 16] span 16 bytes, but dtype F32 and shape [2] need 8");
  bad(file_with_header(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8),
      "data_offsets end 16 is past the 8 data bytes");
  bad(file_with_header(R"({"w":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}})", 1),
      "unsupported dtype \"Q7\"");
  bad(file_with_header(
          R"({"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"v":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}})",
          3),
      "overlaps");
  bad(file_with_header(R"({"w":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})", 4), "has a gap");
  bad(file_with_header(R"({"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}})", 0),
      "bad dimension");
  expect_error([] { loom::checkpoint::load_safetensors("/nonexistent.safetensors"); },
               loom::ErrorKind::kIO, "cannot open '/nonexistent.safetensors'");
}

// ---------------------------------------------------------------------------------------------
// Data parallelism (run under mpirun): every step's loss and the final parameters equal a
// single-process run of the same global batch, computed on each rank with a world of one.
// Tolerance: the DP run sums gradients over ranks in a different order (fp32 rounding ~1e-7
// relative); 6 AdamW steps keep parameters within 2e-5 (a wrong scale moves them by ~lr = 3e-3).
// A pre-emption signal on one rank (the last) during step 3: every rank finishes step 3, the job
// writes checkpoint 3 and fit() returns early with the signal; resuming continues from there
// (issue 15: SIGTERM ended the job without a checkpoint).
TEST(DataParallel, OneRanksStopSignalStopsEveryRankWithACheckpoint) {
  auto world = loom::testing::world();
  const int n = world->size();
  if (16 % (4 * n) != 0) GTEST_SKIP() << "global batch 16 with micro-batch 4 needs dp | 4";
  // One directory for every rank of this launch (they share the launcher's process).
  const std::string dir =
      (fs::temp_directory_path() /
       ("loom-test-stop-" + std::to_string(getppid()) + "-" + std::to_string(n)))
          .string();
  if (world->rank() == 0) fs::remove_all(dir);
  world->barrier();
  auto j = tiny_job();
  j.mutable_train()->set_steps(20);
  j.mutable_train()->set_checkpoint_dir(dir);
  {
    Trainer t(j, world);
    t.set_gradient_observer([&] {
      if (t.step() == 2 && world->rank() == n - 1) std::raise(SIGTERM);  // during step 3
    });
    const auto s = t.fit();
    EXPECT_EQ(s.stop_signal, SIGTERM);
    EXPECT_EQ(t.step(), 3);
    EXPECT_EQ(fs::path(s.checkpoint).filename(), "step-00000003");
  }
  auto jr = j;
  jr.mutable_train()->set_resume("latest");
  jr.mutable_train()->set_steps(5);
  jr.mutable_train()->add_allow_config_changes("train.steps");
  Trainer r(jr, world);
  const auto s = r.fit();
  EXPECT_EQ(s.first_step, 3);
  EXPECT_EQ(s.stop_signal, 0);
  EXPECT_EQ(r.step(), 5);
  world->barrier();
  if (world->rank() == 0) fs::remove_all(dir);
}

// [Note: traces] The trace of steps 2-3 on every rank: Chrome trace-event JSON that Perfetto
// opens: every slice of the main thread nests inside its parent (Perfetto drops slices that
// overlap without nesting), each step holds its data, forward/backward and optimizer slices, and
// under data parallelism each DP gradient all-reduce is an async pair on the 'dp' track.
TEST(DataParallel, TracesOfChosenStepsOpenInPerfetto) {
  auto world = loom::testing::world();
  const int n = world->size();
  if (16 % (4 * n) != 0) GTEST_SKIP() << "global batch 16 with micro-batch 4 needs dp | 4";
  const std::string dir =
      (fs::temp_directory_path() /
       ("loom-test-trace-" + std::to_string(getppid()) + "-" + std::to_string(n)))
          .string();
  if (world->rank() == 0) fs::remove_all(dir);
  world->barrier();
  auto j = tiny_job();
  j.mutable_train()->set_steps(4);
  j.mutable_parallel()->set_grad_bucket_mb(0.01);
  j.mutable_logging()->set_trace_steps("2-3");
  j.mutable_logging()->set_trace_dir(dir);
  Trainer t(j, world);
  t.fit();
  const std::string path = dir + "/rank-" + std::to_string(world->rank()) + ".steps-2-3.json";
  ASSERT_TRUE(fs::exists(path)) << path;
  const auto doc = nlohmann::json::parse(read_file_bytes(path));
  const auto& events = doc.at("traceEvents");
  struct Slice {
    std::string name, cat;
    int64_t ts, end;
  };
  std::vector<Slice> main;
  std::map<int64_t, std::string> open_async;
  int async_pairs = 0, dp_reduces = 0;
  for (const auto& e : events) {
    const std::string ph = e.at("ph");
    EXPECT_EQ(e.at("pid").get<int>(), world->rank());
    if (ph == "X") {
      if (e.at("tid").get<int>() != 0) continue;
      main.push_back({e.at("name"), e.at("cat"), e.at("ts").get<int64_t>(),
                      e.at("ts").get<int64_t>() + e.at("dur").get<int64_t>()});
    } else if (ph == "b") {
      open_async[e.at("id").get<int64_t>()] = e.at("name");
    } else if (ph == "e") {
      auto it = open_async.find(e.at("id").get<int64_t>());
      ASSERT_NE(it, open_async.end()) << "an async end without its begin";
      EXPECT_EQ(it->second, e.at("name").get<std::string>());
      if (it->second.rfind("dp: all_reduce", 0) == 0) ++dp_reduces;
      open_async.erase(it);
      ++async_pairs;
    } else {
      EXPECT_EQ(ph, "M");
    }
  }
  EXPECT_TRUE(open_async.empty());
  // Nesting on the main thread: sorted by start (longer first), each slice ends before its parent.
  std::sort(main.begin(), main.end(), [](const Slice& a, const Slice& b) {
    return a.ts != b.ts ? a.ts < b.ts : a.end > b.end;
  });
  std::vector<const Slice*> stack;
  std::map<std::string, int> count;
  for (const auto& sl : main) {
    while (!stack.empty() && stack.back()->end <= sl.ts) stack.pop_back();
    if (!stack.empty()) {
      EXPECT_LE(sl.end, stack.back()->end)
          << sl.name << " overlaps " << stack.back()->name << " without nesting";
    } else {
      EXPECT_EQ(sl.cat, "step") << sl.name << " is outside every step";
    }
    stack.push_back(&sl);
    std::string key = sl.name.substr(0, sl.name.find(' '));
    ++count[sl.cat == "step" ? sl.name : key];
  }
  EXPECT_EQ(count["step 1"], 0);
  EXPECT_EQ(count["step 2"], 1);
  EXPECT_EQ(count["step 3"], 1);
  EXPECT_EQ(count["step 4"], 0);
  const int micro = 16 / (4 * n);
  EXPECT_EQ(count["F"], 2 * micro);
  EXPECT_EQ(count["B"], 2 * micro);
  EXPECT_EQ(count["data"], 2);
  EXPECT_EQ(count["optimizer"], 2);
  if (n > 1) {
    EXPECT_GE(dp_reduces, 2 * 2) << "several gradient buckets per step";
  } else {
    EXPECT_EQ(async_pairs, 0);
  }
  world->barrier();
  if (world->rank() == 0) fs::remove_all(dir);
}

// [Note: stragglers] Ranks slower than the factor x the median of their pipeline stage are named;
// stages are not compared with each other; a tie or a tiny excess is not a straggler.
TEST(Stragglers, NamesTheSlowRankWithinItsStage) {
  using loom::train::RankTimes;
  std::vector<RankTimes> r = {{0, 0, {1.00, 0.01, 0.1}}, {1, 0, {1.02, 0.01, 0.1}},
                              {2, 0, {1.60, 0.01, 0.1}}, {3, 0, {0.99, 0.30, 0.1}},
                              {4, 1, {3.00, 0.01, 0.1}}, {5, 1, {3.10, 0.01, 0.1}},
                              {6, 2, {9.00, 9.00, 9.0}}};
  const auto lines = loom::train::find_stragglers(r, {"compute", "data", "optimizer"}, 1.25);
  ASSERT_EQ(lines.size(), 2u) << ::testing::PrintToString(lines);
  EXPECT_EQ(lines[0], "world rank 2 (stage 0): compute 1.600 s per step, median 1.010 s (1.58x)");
  EXPECT_EQ(lines[1], "world rank 3 (stage 0): data 0.300 s per step, median 0.010 s (30.00x)");
  // 1 ms over a 1 ms median is noise, not a straggler.
  EXPECT_TRUE(loom::train::find_stragglers({{0, 0, {0.001}}, {1, 0, {0.002}}, {2, 0, {0.001}}},
                                           {"compute"}, 1.25)
                  .empty());
}

TEST(DataParallel, MatchesSingleProcess) {
  auto world = loom::testing::world();
  const int n = world->size();
  if (16 % (4 * n) != 0) GTEST_SKIP() << "global batch 16 with micro-batch 4 needs dp | 4";
  for (bool moe : {false, true}) {
    auto j = tiny_job(moe);
    Trainer single(j, std::make_shared<loom::comm::LocalCommunicator>());
    Trainer dp(j, world);
    EXPECT_EQ(dp.micro_batches_per_rank(), 4 / n);
    for (int s = 0; s < 6; ++s) {
      auto a = single.train_step();
      auto b = dp.train_step();
      EXPECT_NEAR(b.loss, a.loss, 1e-5 * a.loss) << "moe " << moe << " step " << s;
      EXPECT_NEAR(b.aux_loss, a.aux_loss, 1e-5 * a.aux_loss + 1e-9)
          << "moe " << moe << " step " << s;
      EXPECT_EQ(b.tokens, a.tokens);
    }
    const double diff = max_param_diff(single, dp);
    EXPECT_LT(diff, 2e-5) << "moe " << moe;
    // Every rank holds the same parameters: every tensor, element by element.
    loom::testing::expect_replicas_identical(dp, moe ? "moe" : "gpt");
  }
}

}  // namespace

#include "loom/data/indexed_dataset.h"

namespace {
// A Megatron dataset at `prefix` of `docs` documents from the synthetic corpus (vocabulary 64),
// document i of min_len + (37 i mod spread) tokens.
void write_corpus(const std::string& prefix, int docs, int min_len, int spread) {
  fs::create_directories(fs::path(prefix).parent_path());
  loom::data::SyntheticMarkovCorpus corpus(64, 4, 3);
  loom::data::IndexedDatasetBuilder b(prefix, 8);
  std::vector<int64_t> doc;
  for (int i = 0; i < docs; ++i) {
    doc.resize(static_cast<size_t>(min_len + (i * 37) % spread));
    corpus.sample(loom::data::Split::kTrain, i, static_cast<int64_t>(doc.size()), doc.data());
    b.add_document(doc);
  }
  b.finish();
}

// The trainer on a Megatron indexed dataset (written here from the synthetic corpus, documents of
// varied length): the loss falls, and a dataset with ids beyond the model's vocabulary is refused.
TEST(Trainer, TrainsOnAnIndexedDataset) {
  const std::string dir = temp_dir("indexed");
  write_corpus(dir + "/corpus", 400, 5, 90);
  auto j = tiny_job();
  j.mutable_data()->set_source(loom::config::DataConfig::INDEXED);
  j.mutable_data()->add_paths(dir + "/corpus");
  j.mutable_data()->set_cache_dir(dir + "/cache");
  j.mutable_train()->set_steps(30);
  j.mutable_optim()->set_lr(1e-2);
  Trainer t(j);
  auto s = t.fit();
  EXPECT_LT(s.last_loss, s.first_loss - 1.0);
  EXPECT_TRUE(std::isfinite(t.evaluate().loss));
  EXPECT_TRUE(fs::exists(dir + "/cache"));

  j.mutable_model()->set_vocab_size(32);  // the corpus uses ids up to 63
  expect_error([&] { Trainer bad(j); }, loom::ErrorKind::kIO, "outside the vocabulary [0, 32)");
  // Without the up-front scan the loader still refuses the first out-of-range id, naming it (issue
  // 15: it trained on such ids with tp 2, and crashed in the embedding with tp 1).
  j.mutable_data()->set_check_vocab(false);
  Trainer unchecked(j);
  expect_error([&] { unchecked.train_step(); }, loom::ErrorKind::kIO,
               "outside the model's vocabulary [0, 32)");
  EXPECT_EQ(unchecked.step(), 0);
  EXPECT_EQ(unchecked.consumed_samples(), 0);
  fs::remove_all(dir);
}

// DOCUMENTS mode on a Megatron dataset: whole documents of an epoch-shuffled split, packed. A run
// resumed in the middle of an epoch (step 3 of 6; the 39-document epoch ends inside step 3)
// continues with the same documents in the same order and packing: its losses equal the
// uninterrupted run's bit for bit, and it reads the documents the straight run read.
TEST(Trainer, DocumentsResumeMidEpochInTheSameOrder) {
  const std::string dir = temp_dir("documents");
  write_corpus(dir + "/corpus", 40, 3, 40);
  auto j = tiny_job();
  j.mutable_data()->set_source(loom::config::DataConfig::INDEXED);
  j.mutable_data()->set_mode(loom::config::DataConfig::DOCUMENTS);
  j.mutable_data()->add_paths(dir + "/corpus");
  j.mutable_data()->set_cache_dir(dir + "/cache");
  j.mutable_train()->set_micro_batch_tokens(48);
  j.mutable_train()->set_checkpoint_dir(dir + "/ckpt");
  Trainer straight(j);
  std::vector<double> losses;
  std::vector<int64_t> tokens;
  for (int s = 0; s < 6; ++s) {
    const auto m = straight.train_step();
    losses.push_back(m.loss);
    tokens.push_back(m.tokens);
  }
  EXPECT_EQ(straight.consumed_samples(), 6 * 16);
  {
    Trainer first(j);
    for (int s = 0; s < 3; ++s) first.train_step();
    first.save_checkpoint();
  }
  auto jr = j;
  jr.mutable_train()->set_resume("latest");
  Trainer resumed(jr);
  resumed.fit();
  ASSERT_EQ(resumed.history().size(), 3u);
  for (int s = 0; s < 3; ++s) {
    EXPECT_EQ(resumed.history()[s].loss, losses[3 + s]) << "step " << 4 + s;
    EXPECT_EQ(resumed.history()[s].tokens, tokens[3 + s]) << "step " << 4 + s;
  }
  EXPECT_TRUE(params_equal(straight, resumed));
  // Real tokens only: a step's token count is its documents' targets, not padded rows.
  int64_t expect = 0;
  for (const auto& s : resumed.loader().global_samples(loom::data::Split::kTrain, 5 * 16))
    expect += s.length - 1;
  EXPECT_EQ(tokens[5], expect);
  fs::remove_all(dir);
}
}  // namespace

#include "loom/train/tensorboard.h"

namespace {
// An independent reader: bitwise CRC-32C, TFRecord framing, and a generic protobuf field walker.
uint32_t slow_crc32c(const std::string& s) {
  uint32_t c = 0xFFFFFFFFu;
  for (unsigned char b : s) {
    c ^= b;
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
  }
  return ~c;
}
uint32_t slow_masked(const std::string& s) {
  const uint32_t c = slow_crc32c(s);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

struct Field {
  int number = 0;
  int wire = 0;
  uint64_t varint = 0;
  std::string bytes;  // length-delimited and fixed payloads
};

std::vector<Field> parse_fields(const std::string& s) {
  std::vector<Field> out;
  size_t i = 0;
  auto varint = [&]() {
    uint64_t v = 0;
    for (int shift = 0;; shift += 7) {
      const auto b = static_cast<unsigned char>(s.at(i++));
      v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
  };
  while (i < s.size()) {
    Field f;
    const uint64_t key = varint();
    f.number = static_cast<int>(key >> 3);
    f.wire = static_cast<int>(key & 7);
    if (f.wire == 0) {
      f.varint = varint();
    } else if (f.wire == 1) {
      f.bytes = s.substr(i, 8);
      i += 8;
    } else if (f.wire == 5) {
      f.bytes = s.substr(i, 4);
      i += 4;
    } else if (f.wire == 2) {
      const auto n = static_cast<size_t>(varint());
      f.bytes = s.substr(i, n);
      i += n;
    } else {
      ADD_FAILURE() << "unexpected wire type " << f.wire;
      return out;
    }
    out.push_back(f);
  }
  return out;
}

std::vector<std::string> read_records(const std::string& path) {
  std::string bytes = read_file_bytes(path);
  std::vector<std::string> records;
  size_t i = 0;
  while (i < bytes.size()) {
    const std::string len = bytes.substr(i, 8);
    uint64_t n = 0;
    std::memcpy(&n, len.data(), 8);
    uint32_t lc = 0, dc = 0;
    std::memcpy(&lc, bytes.data() + i + 8, 4);
    EXPECT_EQ(lc, slow_masked(len)) << "length CRC of record " << records.size();
    std::string data = bytes.substr(i + 12, n);
    std::memcpy(&dc, bytes.data() + i + 12 + n, 4);
    EXPECT_EQ(dc, slow_masked(data)) << "data CRC of record " << records.size();
    records.push_back(data);
    i += 12 + n + 4;
  }
  EXPECT_EQ(i, bytes.size());
  return records;
}

TEST(TensorBoard, EventFileDecodesWithAnIndependentReader) {
  const std::string dir = temp_dir("tb");
  {
    loom::train::TensorBoardWriter w(dir);
    w.add_scalars(7, {{"train/loss", 2.5}, {"train/lr", 1e-3}});
  }
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir)) files.push_back(e.path().string());
  ASSERT_EQ(files.size(), 1u);
  EXPECT_NE(files[0].find("events.out.tfevents."), std::string::npos);
  auto records = read_records(files[0]);
  ASSERT_EQ(records.size(), 2u);
  auto first = parse_fields(records[0]);
  ASSERT_EQ(first.size(), 2u);    // step 0 is not written (proto3)
  EXPECT_EQ(first[0].number, 1);  // wall_time
  EXPECT_EQ(first[0].wire, 1);
  EXPECT_EQ(first[1].number, 3);  // file_version
  EXPECT_EQ(first[1].bytes, "brain.Event:2");
  auto second = parse_fields(records[1]);
  ASSERT_EQ(second.size(), 3u);
  EXPECT_EQ(second[1].number, 2);
  EXPECT_EQ(second[1].varint, 7u);  // step
  EXPECT_EQ(second[2].number, 5);   // summary
  auto values = parse_fields(second[2].bytes);
  ASSERT_EQ(values.size(), 2u);
  std::map<std::string, float> got;
  for (const auto& v : values) {
    EXPECT_EQ(v.number, 1);
    auto inner = parse_fields(v.bytes);
    ASSERT_EQ(inner.size(), 2u);
    EXPECT_EQ(inner[0].number, 1);  // tag
    EXPECT_EQ(inner[1].number, 2);  // simple_value
    ASSERT_EQ(inner[1].wire, 5);
    float f = 0;
    std::memcpy(&f, inner[1].bytes.data(), 4);
    got[inner[0].bytes] = f;
  }
  EXPECT_EQ(got["train/loss"], 2.5f);
  EXPECT_EQ(got["train/lr"], 1e-3f);
  fs::remove_all(dir);
}

// tests/fixtures/tensorboard/events.reference was written by TensorBoard's own RecordWriter and
// event_pb2 / summary_pb2 messages (tests/interop/device_interop.py) with fixed wall times: the
// independent reader decodes it, and Loom's writer given the same content and times writes the same
// bytes.
TEST(TensorBoard, SameBytesAsTensorBoardsOwnWriter) {
  const std::string fixture =
      std::string(LOOM_SOURCE_DIR) + "/tests/fixtures/tensorboard/events.reference";
  auto content = nlohmann::json::parse(read_file_bytes(fixture + ".json"));
  auto records = read_records(fixture);
  ASSERT_EQ(records.size(), 1 + content["events"].size());
  EXPECT_EQ(parse_fields(records[0]).back().bytes, "brain.Event:2");

  std::vector<double> times = {content["version_wall_time"].get<double>()};
  for (const auto& e : content["events"]) times.push_back(e["wall_time"].get<double>());
  size_t next = 0;
  const std::string dir = temp_dir("tbref");
  std::string written;
  {
    loom::train::TensorBoardWriter w(dir, [&] { return times.at(next++); });
    for (const auto& e : content["events"]) {
      std::vector<std::pair<std::string, double>> values;
      for (const auto& v : e["values"])
        values.emplace_back(v[0].get<std::string>(), v[1].get<double>());
      w.add_scalars(e["step"].get<int64_t>(), values);
    }
    w.flush();
    written = w.path();
  }
  const std::string ours = read_file_bytes(written), theirs = read_file_bytes(fixture);
  EXPECT_EQ(ours.size(), theirs.size());
  EXPECT_TRUE(ours == theirs) << "Loom's event bytes differ from TensorBoard's";
  fs::remove_all(dir);
}

TEST(TensorBoard, TrainerWritesOneEventPerStep) {
  const std::string dir = temp_dir("tbtrain");
  auto j = tiny_job();
  j.mutable_train()->set_steps(3);
  j.mutable_train()->set_tensorboard_dir(dir);
  {
    Trainer t(j);
    t.fit();
  }
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir)) files.push_back(e.path().string());
  ASSERT_EQ(files.size(), 1u);
  auto records = read_records(files[0]);
  EXPECT_EQ(records.size(), 4u);  // version + 3 steps
  fs::remove_all(dir);
}

// The tags of a TensorBoard event record's scalars.
std::vector<std::string> scalar_tags(const std::string& record) {
  std::vector<std::string> tags;
  for (const auto& f : parse_fields(record)) {
    if (f.number != 5) continue;  // summary
    for (const auto& v : parse_fields(f.bytes)) tags.push_back(parse_fields(v.bytes).at(0).bytes);
  }
  return tags;
}

// The per-layer MoE figures of a step (model::MoeStepStats) against what the step reports as a
// whole: the layers' balance and z losses add up to the aux loss, and with one micro-batch per step
// the dropped fractions times the assignments add up to the dropped count; both balance options.
TEST(Metrics, PerLayerMoeFiguresAddUp) {
  for (const auto type :
       {loom::config::MoeConfig::MICRO_BATCH, loom::config::MoeConfig::GLOBAL_BATCH}) {
    auto j = tiny_job(/*moe=*/true);
    j.mutable_train()->set_steps(3);
    j.mutable_train()->set_micro_batch_size(16);  // the global batch in one micro-batch
    j.mutable_model()->mutable_moe()->set_capacity_factor(1.0);
    j.mutable_model()->mutable_moe()->set_aux_loss_type(type);
    const auto spec = loom::model::ModelSpec::from_config(j.model());
    Trainer t(j);
    for (int step = 0; step < 3; ++step) {
      const auto m = t.train_step();
      ASSERT_EQ(static_cast<int64_t>(m.moe_layer_balance_loss.size()), spec.num_moe_layers());
      ASSERT_EQ(m.moe_layer_z_loss.size(), m.moe_layer_balance_loss.size());
      ASSERT_EQ(m.moe_layer_dropped_fraction.size(), m.moe_layer_balance_loss.size());
      double losses = 0, dropped = 0;
      for (size_t l = 0; l < m.moe_layer_balance_loss.size(); ++l) {
        EXPECT_GT(m.moe_layer_balance_loss[l], 0) << "layer " << l;
        EXPECT_GT(m.moe_layer_z_loss[l], 0) << "layer " << l;
        losses += m.moe_layer_balance_loss[l] + m.moe_layer_z_loss[l];
        dropped += m.moe_layer_dropped_fraction[l] * 16 * 16 * spec.moe.top_k;
      }
      EXPECT_NEAR(losses, m.aux_loss, 1e-6 * m.aux_loss) << "step " << step;
      EXPECT_GT(m.moe_dropped, 0) << "capacity 1.0 drops nothing: the check below tests nothing";
      EXPECT_NEAR(dropped, static_cast<double>(m.moe_dropped), 1e-6) << "step " << step;
    }
  }
}

// [Note: expert specialisation] The table's shares and mutual information against closed forms,
// and a blended MoE run's JSONL and TensorBoard reports.
TEST(Metrics, ExpertSpecialisationIsTheClosedForm) {
  loom::train::SpecialisationTable table({"a", "b"}, 4);
  loom::train::StepMetrics m;
  m.moe_source_counts = {
      {5, 5, 0, 0, 0, 0, 3, 3},  // every expert serves one source: I = H(S)
      {2, 4, 6, 8, 1, 2, 3, 4},  // both sources spread alike: I = 0
      {3, 1, 0, 2, 1, 1, 4, 0},  // in between
  };
  table.add(m);
  table.add(m);
  EXPECT_EQ(table.steps(), 2);
  ASSERT_EQ(table.layers(), 3);
  auto entropy = [](const std::vector<double>& counts) {  // bits
    double n = 0, h = 0;
    for (double c : counts) n += c;
    for (double c : counts) h -= c > 0 ? c / n * std::log2(c / n) : 0.0;
    return h;
  };
  EXPECT_NEAR(table.mutual_information_bits(0), entropy({10, 6}), 1e-12);
  EXPECT_NEAR(table.mutual_information_bits(1), 0.0, 1e-12);
  // I(S; E) = H(E) - H(E | S), written out.
  const std::vector<double>& c = m.moe_source_counts[2];
  const double h_e = entropy({c[0] + c[4], c[1] + c[5], c[2] + c[6], c[3] + c[7]});
  const double h_e_s = 6.0 / 12 * entropy({3, 1, 0, 2}) + 6.0 / 12 * entropy({1, 1, 4, 0});
  EXPECT_NEAR(table.mutual_information_bits(2), h_e - h_e_s, 1e-12);
  EXPECT_EQ(table.assignments(0, 0), 20.0);
  EXPECT_EQ(table.assignments(2, 1), 12.0);
  EXPECT_DOUBLE_EQ(table.share(2, 1, 2), 4.0 / 6.0);
  EXPECT_DOUBLE_EQ(table.share(1, 0, 3), 8.0 / 20.0);
  table.reset();
  EXPECT_EQ(table.steps(), 0);
  EXPECT_EQ(table.mutual_information_bits(0), 0.0);

  // A blended run: each log_every-th record carries the table of the steps since the last one.
  const std::string dir = temp_dir("specialisation");
  auto j = tiny_job(/*moe=*/true);
  j.mutable_train()->set_steps(4);
  j.mutable_train()->set_log_every(2);
  j.mutable_train()->set_metrics_jsonl(dir + "/metrics.jsonl");
  j.mutable_train()->set_tensorboard_dir(dir + "/tb");
  j.mutable_data()->set_synthetic_sources(2);
  j.mutable_data()->add_weights(3);
  j.mutable_data()->add_weights(1);
  const auto spec = loom::model::ModelSpec::from_config(j.model());
  {
    Trainer t(j);
    t.fit();
    ASSERT_EQ(t.history().size(), 4u);
    for (const auto& s : t.history()) {
      ASSERT_EQ(static_cast<int64_t>(s.moe_source_counts.size()), spec.num_moe_layers());
      for (const auto& layer : s.moe_source_counts) {
        // Every real token's top_k assignments, of one source or the other.
        EXPECT_EQ(std::accumulate(layer.begin(), layer.end(), 0.0), 16.0 * 16 * spec.moe.top_k);
      }
    }
  }
  std::ifstream in(dir + "/metrics.jsonl");
  std::string line;
  int reports = 0;
  while (std::getline(in, line)) {
    const auto r = nlohmann::json::parse(line);
    if (r["type"] != "train") continue;
    const int64_t step = r["step"].get<int64_t>();
    ASSERT_EQ(r.contains("moe_specialisation"), step % 2 == 0) << line;
    if (step % 2 != 0) continue;
    ++reports;
    const auto& sp = r["moe_specialisation"];
    EXPECT_EQ(sp["steps"].get<int64_t>(), 2);
    EXPECT_EQ(sp["sources"].get<std::vector<std::string>>(),
              (std::vector<std::string>{"chain0", "chain1"}));
    ASSERT_EQ(static_cast<int64_t>(sp["share"].size()), spec.num_moe_layers());
    for (size_t l = 0; l < sp["share"].size(); ++l) {
      const auto counts = sp["assignments"][l].get<std::vector<double>>();
      EXPECT_EQ(counts[0] + counts[1], 2 * 16.0 * 16 * spec.moe.top_k);
      EXPECT_GT(counts[1], 0);
      EXPECT_GT(counts[0], counts[1]) << "weights 3:1";
      for (const auto& row : sp["share"][l]) {
        const auto v = row.get<std::vector<double>>();
        ASSERT_EQ(static_cast<int64_t>(v.size()), spec.moe.num_experts);
        EXPECT_NEAR(std::accumulate(v.begin(), v.end(), 0.0), 1.0, 1e-12);
      }
      const double mi = sp["mi_bits"][l].get<double>();
      EXPECT_GE(mi, 0.0);
      EXPECT_LE(mi, 1.0);  // at most H(source) <= 1 bit for two sources
    }
  }
  EXPECT_EQ(reports, 2);
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir + "/tb")) files.push_back(e.path().string());
  ASSERT_EQ(files.size(), 1u);
  const auto records = read_records(files[0]);
  ASSERT_EQ(records.size(), 5u);  // version + 4 steps
  for (size_t step = 1; step <= 4; ++step) {
    const auto tags = scalar_tags(records[step]);
    const bool has =
        std::find(tags.begin(), tags.end(), "moe/specialisation_mi_layer0") != tags.end();
    EXPECT_EQ(has, step % 2 == 0) << "step " << step;
    EXPECT_EQ(std::find(tags.begin(), tags.end(), "moe/share_layer0/chain1/expert3") != tags.end(),
              step % 2 == 0)
        << "step " << step;
  }
  // One source: no tables anywhere.
  j.mutable_data()->set_synthetic_sources(1);
  j.mutable_data()->clear_weights();
  j.mutable_train()->set_steps(1);
  j.mutable_train()->set_tensorboard_dir("off");
  j.mutable_train()->set_metrics_jsonl("");
  Trainer one(j);
  EXPECT_TRUE(one.train_step().moe_source_counts.empty());
  fs::remove_all(dir);
}
}  // namespace

#include "loom/checkpoint/hf.h"

namespace {
loom::model::ModelSpec hf_spec(bool moe) {
  auto j = tiny_job(moe);
  if (moe) j.mutable_model()->mutable_moe()->set_num_shared_experts(0);
  return loom::model::ModelSpec::from_config(j.model());
}

TEST(HuggingFace, NamesAndLayoutsRoundTrip) {
  for (bool moe : {false, true}) {
    auto spec = hf_spec(moe);
    loom::model::GptModel m(spec, 3);
    loom::checkpoint::TensorMap loom;
    for (const auto& p : m.parameters()) loom[p.name] = p.tensor.detach();
    auto hf = loom::checkpoint::to_hf(spec, loom);
    EXPECT_TRUE(hf.count("lm_head.weight"));
    EXPECT_TRUE(hf.count(moe ? "model.layers.1.block_sparse_moe.experts.3.w3.weight"
                             : "model.layers.1.mlp.up_proj.weight"));
    // q_proj head j of KV group g is the fused QKV block (g, j); k_proj head g the block (g,
    // group).
    const int64_t d = spec.head_dim, g = spec.num_heads / spec.num_kv_heads;
    at::Tensor qkv = loom.at("layers.0.attn.qkv.weight");
    for (int64_t head = 0; head < spec.num_heads; ++head) {
      const int64_t kv = head / g, j = head % g;
      EXPECT_TRUE(at::equal(hf.at("model.layers.0.self_attn.q_proj.weight").narrow(0, head * d, d),
                            qkv.narrow(0, (kv * (g + 2) + j) * d, d)));
    }
    for (int64_t kv = 0; kv < spec.num_kv_heads; ++kv) {
      EXPECT_TRUE(at::equal(hf.at("model.layers.0.self_attn.k_proj.weight").narrow(0, kv * d, d),
                            qkv.narrow(0, (kv * (g + 2) + g) * d, d)));
    }
    auto back = loom::checkpoint::from_hf(spec, hf);
    ASSERT_EQ(back.size(), loom.size());
    for (const auto& [name, t] : loom) EXPECT_TRUE(at::equal(back.at(name), t)) << name;
    // config.json describes the same model.
    auto mc =
        loom::checkpoint::model_config_from_hf(loom::checkpoint::hf_config_json(spec, "float32"));
    auto spec2 = loom::model::ModelSpec::from_config(mc);
    EXPECT_EQ(spec2.num_parameters(), spec.num_parameters());
    EXPECT_EQ(spec2.num_kv_heads, spec.num_kv_heads);
    EXPECT_EQ(spec2.moe.num_experts, spec.moe.num_experts);
    // A missing tensor or a wrong shape is named.
    hf.erase("model.norm.weight");
    expect_error([&] { loom::checkpoint::from_hf(spec, hf); }, loom::ErrorKind::kIO,
                 "have no 'model.norm.weight'");
  }
  auto j = tiny_job();
  j.mutable_model()->set_arch(loom::config::ModelConfig::GPT2);
  auto gpt2 = loom::model::ModelSpec::from_config(j.model());
  expect_error([&] { loom::checkpoint::check_hf_compatible(gpt2); }, loom::ErrorKind::kUnsupported,
               "model.norm must be RMSNORM");
}

// Checkpoints written by transformers' save_pretrained (5.17, tests/fixtures/hf_*, made by
// tests/interop/device_interop.py, every weight perturbed so that no mapping hides behind a
// constant): imported into Loom, the model's logits equal the logits transformers computed (fp32,
// 1e-5 relative); exported back, every tensor is bitwise what transformers wrote. The LLaMA fixture
// uses rope_theta 500000 in transformers 5's rope_parameters form, so a theta read wrongly fails
// here.
TEST(HuggingFace, TransformersWrittenCheckpoints) {
  for (const char* name : {"hf_llama", "hf_mixtral"}) {
    const std::string fixture = std::string(LOOM_SOURCE_DIR) + "/tests/fixtures/" + name;
    const std::string dir = temp_dir(name);
    loom::checkpoint::import_hf(fixture, dir + "/step-00000000");
    auto expected = loom::checkpoint::load_safetensors(fixture + "/expected.safetensors").tensors;
    at::Tensor logits =
        loom::checkpoint::checkpoint_logits(dir + "/step-00000000", expected.at("tokens"));
    at::Tensor ref = expected.at("logits").to(at::kDouble);
    const double rel =
        (logits.to(at::kDouble) - ref).norm().item<double>() / ref.norm().item<double>();
    EXPECT_LT(rel, 1e-5) << name;

    loom::checkpoint::export_hf(dir + "/step-00000000", dir + "/hf");
    auto theirs = loom::checkpoint::load_safetensors(fixture + "/model.safetensors").tensors;
    auto ours = loom::checkpoint::load_safetensors(dir + "/hf/model.safetensors").tensors;
    EXPECT_EQ(ours.size(), theirs.size()) << name;
    for (const auto& [k, t] : theirs) {
      auto it = ours.find(k);
      ASSERT_NE(it, ours.end()) << name << ": export lacks " << k;
      EXPECT_TRUE(at::equal(it->second, t.to(it->second.scalar_type()))) << name << ": " << k;
    }
    // The exported config.json reads back as the same model.
    auto a = loom::checkpoint::model_config_from_hf(read_file_bytes(fixture + "/config.json"));
    auto b = loom::checkpoint::model_config_from_hf(read_file_bytes(dir + "/hf/config.json"));
    EXPECT_EQ(a.SerializeAsString(), b.SerializeAsString()) << name;
    if (std::string(name) == "hf_llama") {
      EXPECT_EQ(a.rope_theta(), 500000.0);
    }
    fs::remove_all(dir);
  }
  // transformers 5 variants Loom does not implement are refused by name, not imported wrongly.
  auto cfg = nlohmann::json::parse(
      read_file_bytes(std::string(LOOM_SOURCE_DIR) + "/tests/fixtures/hf_llama/config.json"));
  cfg["rope_parameters"]["rope_type"] = "llama3";
  expect_error([&] { loom::checkpoint::model_config_from_hf(cfg.dump()); },
               loom::ErrorKind::kUnsupported, "rope_type is 'llama3'");
  cfg = nlohmann::json::parse(
      read_file_bytes(std::string(LOOM_SOURCE_DIR) + "/tests/fixtures/hf_mixtral/config.json"));
  cfg["sliding_window"] = 4096;
  expect_error([&] { loom::checkpoint::model_config_from_hf(cfg.dump()); },
               loom::ErrorKind::kUnsupported, "sliding_window");
}

// Issue 15: conversions that would be silently wrong are refused by field, and a bad flag is
// refused before anything is written.
TEST(HuggingFace, WrongConversionsAreRefusedBeforeWriting) {
  // A capacity drops tokens, which HF Mixtral never does: the logits would differ.
  auto j = tiny_job(true);
  j.mutable_model()->mutable_moe()->set_num_shared_experts(0);
  j.mutable_model()->mutable_moe()->set_capacity_factor(1.25);
  expect_error(
      [&] {
        loom::checkpoint::check_hf_compatible(loom::model::ModelSpec::from_config(j.model()));
      },
      loom::ErrorKind::kUnsupported, "model.moe.capacity_factor must be 0 (dropless)");
  // An activation other than silu is not read as SwiGLU.
  auto cfg = nlohmann::json::parse(
      read_file_bytes(std::string(LOOM_SOURCE_DIR) + "/tests/fixtures/hf_llama/config.json"));
  cfg["hidden_act"] = "gelu";
  expect_error([&] { loom::checkpoint::model_config_from_hf(cfg.dump()); },
               loom::ErrorKind::kUnsupported, "hidden_act is 'gelu'");
  // convert_hf with a bad --tokens writes nothing.
  const std::string dir = temp_dir("convert");
  const std::string fixture = std::string(LOOM_SOURCE_DIR) + "/tests/fixtures/hf_llama";
  for (const char* tokens : {"1,x,3", "1,-2", "99999999"}) {
    const std::string cmd = std::string(LOOM_CONVERT_HF_TOOL) + " --to-loom --from " + fixture +
                            " --to " + dir + "/step-00000000 --logits " + dir +
                            "/logits.safetensors --tokens " + tokens + " > " + dir + ".log 2>&1";
    EXPECT_NE(std::system(cmd.c_str()), 0) << tokens;
    EXPECT_NE(read_file_bytes(dir + ".log").find("flag --tokens"), std::string::npos)
        << read_file_bytes(dir + ".log");
    EXPECT_FALSE(fs::exists(dir)) << tokens << ": something was written";
  }
  fs::remove(dir + ".log");
}

// Loom checkpoint -> HF directory -> Loom step-0 checkpoint -> a Trainer resumed from it computes
// the same loss as the original model.
TEST(HuggingFace, ExportImportAndResumeFromIt) {
  const std::string dir = temp_dir("hf");
  auto j = tiny_job(true);
  j.mutable_model()->mutable_moe()->set_num_shared_experts(0);
  j.mutable_train()->set_checkpoint_dir(dir + "/loom");
  Trainer a(j);
  a.train_step();
  const std::string ckpt = a.save_checkpoint();
  loom::checkpoint::export_hf(ckpt, dir + "/hf");
  EXPECT_TRUE(fs::exists(dir + "/hf/config.json"));
  loom::checkpoint::import_hf(dir + "/hf", dir + "/init/step-00000000");
  auto jb = j;
  jb.mutable_train()->set_resume(dir + "/init/step-00000000");
  jb.mutable_train()->set_checkpoint_dir("");
  jb.mutable_train()->set_steps(1);
  Trainer b(jb);
  b.load_checkpoint(dir + "/init/step-00000000");
  EXPECT_EQ(b.step(), 0);
  EXPECT_TRUE(params_equal(a, b));
  fs::remove_all(dir);
}
}  // namespace

namespace {
// Reading the next step's batches in the background changes nothing: bit-identical to reading them
// in the step, and a prefetched batch for a position the run left (a checkpoint load) is discarded.
TEST(Trainer, PrefetchIsInvisible) {
  auto j = tiny_job();
  auto jn = j;
  jn.mutable_train()->set_prefetch(false);
  Trainer a(j), b(jn);
  for (int s = 0; s < 4; ++s) EXPECT_EQ(a.train_step().loss, b.train_step().loss) << s;
  EXPECT_TRUE(params_equal(a, b));
  const std::string dir = temp_dir("prefetch");
  auto jc = j;
  jc.mutable_train()->set_checkpoint_dir(dir);
  Trainer c(jc);
  c.train_step();
  const std::string at1 = c.save_checkpoint();  // step 1
  c.train_step();                               // prefetched step 3's batches
  c.load_checkpoint(at1);                       // back to step 1: step 2's batches must be read
  Trainer d(jn);
  d.train_step();
  EXPECT_EQ(c.train_step().loss, d.train_step().loss);
  fs::remove_all(dir);
}
}  // namespace
