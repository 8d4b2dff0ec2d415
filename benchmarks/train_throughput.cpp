// Training throughput on the CPU: Loom's Trainer against the same model written in PyTorch eager
// (benchmarks/train_throughput_peer.py, Debian's python3-torch on the same LibTorch), both measured
// in this run, plus the achieved FLOP/s against a matmul ceiling measured here too.
//
// Validate, then time: the peer loads Loom's initial parameters and the first batch, and its
// first loss (and MoE auxiliary loss) must match Loom's within 1e-4 relative before any number is
// reported. Each side runs `--warmup` untimed and `--steps` timed training steps (forward,
// backward, clip, AdamW) on a batch of the same shape; medians are reported.
//
//   train_throughput [--cases dense,moe,dense_docs] [--steps 6] [--warmup 2] [--json out.json]
//
// A case name with "_offload" appended (dense_offload, dense_large_offload, ...) is that case with
// train.offload_fraction 1: every block's saved activations go to host memory and back (Note:
// activation offload), reported against the plain case when it ran first in the same run.
//
// dense_docs is the dense model on packed documents (data.mode DOCUMENTS: synthetic documents of
// 2..256 tokens with a tail to 1024 cut into pieces of 256, 16 per step, packed first-fit into
// micro-batches of one row of at most 256 tokens, the default). Its tokens/s counts real tokens
// only; there is no PyTorch peer for packing, so it is reported against Loom's own WINDOWS dense
// case of the same run (the packed step's correctness is tests/train's PackedDocuments against the
// documents run one by one).
//   train_throughput --device cuda --precision bf16 --cases dense_large,moe_large --python python3
//
// On a GPU both sides synchronise the device before reading the clock at the end of each step; the
// matmul ceiling is then measured on the device in the compute dtype (4096^3), and the peer uses
// PyTorch's scaled_dot_product_attention and torch.autocast for bf16, as a PyTorch user would.
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <tuple>
#include <vector>

#include "loom/checkpoint/safetensors.h"
#include "loom/core/cli.h"
#include "loom/core/error.h"
#include "loom/core/logging.h"
#include "loom/data/source.h"
#include "loom/model/gpt.h"
#include "loom/train/system.h"
#include "loom/train/trainer.h"

namespace {

using loom::config::JobConfig;

JobConfig make_case(const std::string& name, int steps, const std::string& device,
                    const std::string& precision) {
  JobConfig j;
  j.set_seed(5);
  auto* m = j.mutable_model();
  auto* t = j.mutable_train();
  const std::string offload_suffix = "_offload";
  if (name.size() > offload_suffix.size() &&
      name.compare(name.size() - offload_suffix.size(), offload_suffix.size(), offload_suffix) ==
          0) {
    // Any case with every block's saved activations offloaded (Note: activation offload).
    j = make_case(name.substr(0, name.size() - offload_suffix.size()), steps, device, precision);
    j.mutable_train()->set_offload_fraction(1.0);
    return j;
  }
  if (name == "dense_docs") {
    j = make_case("dense", steps, device, precision);
    j.mutable_data()->set_mode(loom::config::DataConfig::DOCUMENTS);
    j.mutable_train()->set_global_batch_size(16);  // documents per step
    // micro_batch_tokens: the default, one packed row of at most seq_len tokens per micro-batch
    return j;
  }
  if (name == "dense") {
    // The fixed config: vocab 8192, d_model 512, 8 layers, 8 heads, seq 256, batch 8, fp32.
    m->set_vocab_size(8192);
    m->set_hidden_size(512);
    m->set_num_layers(8);
    m->set_num_heads(8);
  } else if (name == "moe") {
    m->set_vocab_size(8192);
    m->set_hidden_size(256);
    m->set_num_layers(4);
    m->set_num_heads(4);
    auto* moe = m->mutable_moe();
    moe->set_num_experts(8);
    moe->set_top_k(2);
    moe->set_expert_ffn_hidden_size(512);
    moe->set_aux_loss_coeff(0.01);
  } else if (name == "dense_large") {
    // Sized for one GPU: a 0.5B LLaMA-style model at sequence 2048.
    m->set_vocab_size(32000);
    m->set_hidden_size(2048);
    m->set_num_layers(8);
    m->set_num_heads(16);
    m->set_num_kv_heads(8);
  } else if (name == "moe_large") {
    m->set_vocab_size(32000);
    m->set_hidden_size(1024);
    m->set_num_layers(8);
    m->set_num_heads(8);
    auto* moe = m->mutable_moe();
    moe->set_num_experts(8);
    moe->set_top_k(2);
    moe->set_expert_ffn_hidden_size(2816);
    moe->set_aux_loss_coeff(0.01);
  } else {
    LOOM_THROW(loom::ErrorKind::kConfig,
               "flag --cases: unknown case '{}' (dense, moe, dense_docs, dense_large, moe_large, "
               "each also with _offload)",
               name);
  }
  const bool large = name.find("_large") != std::string::npos;
  m->set_max_seq_len(large ? 2048 : 256);
  t->set_seq_len(large ? 2048 : 256);
  t->set_micro_batch_size(large ? 4 : 8);
  t->set_device(device);
  LOOM_CHECK_CONFIG(precision == "fp32" || precision == "bf16",
                    "flag --precision: '{}' (fp32 or bf16)", precision);
  m->set_precision(precision == "bf16" ? loom::config::ModelConfig::BF16
                                       : loom::config::ModelConfig::FP32);
  t->set_steps(steps);
  t->set_progress("off");
  t->set_peak_tflops(1.0);  // replaced by the ceiling measured below
  j.mutable_optim()->set_lr(1e-4);
  j.mutable_optim()->set_warmup_steps(0);
  j.mutable_optim()->set_schedule(loom::config::OptimConfig::CONSTANT);
  j.mutable_logging()->set_dir("");
  return j;
}

std::string run_command(const std::string& cmd) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  LOOM_CHECK_KIND(loom::ErrorKind::kIO, p != nullptr, "cannot run '{}'", cmd);
  char buf[4096];
  while (fgets(buf, sizeof buf, p)) out += buf;
  const int rc = pclose(p);
  LOOM_CHECK_KIND(loom::ErrorKind::kIO, rc == 0, "'{}' failed (status {}):\n{}", cmd, rc, out);
  return out;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int run(int argc, char** argv) {
  loom::cli::CommandLine cl(
      argc, argv,
      {{"cases", "dense,moe", "which models: dense (the issue's fixed config), moe"},
       {"steps", "6", "timed training steps per side"},
       {"warmup", "2", "untimed steps first"},
       {"threads", "0", "intra-op threads for both sides (0: LibTorch's default)"},
       {"device", "cpu", "cpu or cuda"},
       {"precision", "fp32", "fp32 or bf16 (compute; master weights stay fp32)"},
       {"python", "/usr/bin/python3", "the Python with torch for the peer"},
       {"peer", "", "peer script (default: next to this source)"},
       {"no-peer", "", "skip the PyTorch peer", true},
       {"json", "", "also write the results as JSON here"}},
      "Loom training throughput vs the same model in PyTorch eager.");
  if (cl.handled_help()) return 0;
  loom::log::LogOptions lo;
  lo.level = "warn";
  loom::log::init(lo);
  const int steps = static_cast<int>(cl.get_int("steps")),
            warmup = static_cast<int>(cl.get_int("warmup"));
  LOOM_CHECK_CONFIG(steps >= 1 && warmup >= 0, "need --steps >= 1 and --warmup >= 0");
  if (cl.get_int("threads") > 0) at::set_num_threads(static_cast<int>(cl.get_int("threads")));
  const int threads = at::get_num_threads();
  std::string peer = cl.get("peer");
  if (peer.empty()) peer = std::string(LOOM_SOURCE_DIR) + "/benchmarks/train_throughput_peer.py";
  const bool with_peer = !cl.get_bool("no-peer");
  if (with_peer) {
    const int rc = std::system((cl.get("python") + " -c 'import torch' 2>/dev/null").c_str());
    LOOM_CHECK_KIND(
        loom::ErrorKind::kUnsupported, rc == 0,
        "{} cannot import torch: install Debian's python3-torch (scripts/install-deps.sh --bench) "
        "or pass --no-peer",
        cl.get("python"));
  }
  const at::Device device(cl.get("device"));
  const std::string precision = cl.get("precision");
  const bool gpu = device.is_cuda();
  const auto tmp = std::filesystem::temp_directory_path() / ("loom-tt-" + std::to_string(getpid()));
  std::filesystem::create_directories(tmp);

  // The first batch of a case, as the trainer will draw it.
  auto first_batch = [](const JobConfig& job, int64_t vocab) {
    const int64_t b = job.train().micro_batch_size(), s = job.train().seq_len();
    auto source = loom::data::make_source(job, vocab, b);
    at::Tensor buf = at::empty({b, s + 1}, at::kLong);
    for (int64_t i = 0; i < b; ++i)
      source->sample(loom::data::Split::kTrain, i, s + 1, buf.data_ptr<int64_t>() + i * (s + 1));
    loom::model::Batch batch;
    batch.tokens = buf.narrow(1, 0, s).contiguous();
    batch.targets = buf.narrow(1, 1, s).contiguous();
    return batch;
  };

  // The PyTorch peers run first, before this process touches the GPU: a child started after CUDA is
  // initialised here made this process crash at exit on the GPU machine (seen 2026-11-22). The
  // initial parameters come from a CPU model: initialisation is by (seed, name), whatever the
  // device.
  std::map<std::string, std::pair<nlohmann::json, nlohmann::json>> peers;  // case -> (plain, tuned)
  if (with_peer) {
    for (const auto& name : cl.get_list("cases")) {
      // No packing peer (see the top of this file); an offload case is compared with its own case.
      if (name == "dense_docs" || name.find("_offload") != std::string::npos) continue;
      JobConfig job = make_case(name, warmup + steps, "cpu", precision);
      const auto spec = loom::model::ModelSpec::from_config(job.model());
      loom::model::GptModel cpu_model(spec, job.seed(), at::kCPU);
      loom::model::Batch batch = first_batch(job, spec.vocab_size);
      std::map<std::string, at::Tensor> tensors;
      for (const auto& p : cpu_model.parameters()) tensors[p.name] = p.tensor.detach();
      tensors["batch.tokens"] = batch.tokens;
      tensors["batch.targets"] = batch.targets;
      nlohmann::json cfg = {{"heads", spec.num_heads},
                            {"kv_heads", spec.num_kv_heads},
                            {"head_dim", spec.head_dim},
                            {"layers", spec.num_layers},
                            {"eps", spec.norm_eps},
                            {"theta", spec.rope_theta},
                            {"experts", spec.moe.num_experts},
                            {"top_k", spec.moe.top_k},
                            {"aux_coeff", spec.moe.aux_loss_coeff}};
      const std::string weights = (tmp / (name + ".safetensors")).string();
      loom::checkpoint::save_safetensors(weights, tensors, {{"config", cfg.dump()}});
      const std::string cmd = fmt::format(
          "{} {} --weights {} --steps {} --warmup {} --threads {} --device {} --precision {}",
          cl.get("python"), peer, weights, steps, warmup, threads, gpu ? "cuda" : "cpu", precision);
      auto plain = nlohmann::json::parse(run_command(cmd));
      // The allocator tuning concerns host memory: on a GPU the second peer run would time the same
      // thing.
      auto tuned = gpu ? plain : nlohmann::json::parse(run_command(cmd + " --tune-malloc"));
      peers[name] = {plain, tuned};
      std::filesystem::remove(weights);
    }
  }

  // The matmul ceiling in the compute dtype, as used for MFU.
  const int64_t probe_n = gpu ? 4096 : 1024;
  const double ceiling = loom::train::probe_matmul_flops(
      device, precision == "bf16" ? at::kBFloat16 : at::kFloat, probe_n, 7);
  std::printf("# train_throughput on %s (%s): %d intra-op threads; BLAS: %s\n",
              device.str().c_str(), precision.c_str(), threads,
              loom::train::blas_description().c_str());
  std::printf("# %s matmul ceiling (%ld^3 GEMM, median of 7): %.1f GFLOP/s\n", precision.c_str(),
              static_cast<long>(probe_n), ceiling / 1e9);
  std::printf("# %-13s %11s %11s %11s %7s %7s %9s %7s %9s %s\n", "case", "loom tok/s",
              "torch tok/s", "torch+tune", "ratio", "ratio+", "GFLOP/s", "MFU", "loss", "check");
  nlohmann::json results = nlohmann::json::array();
  int failures = 0;
  double dense_tps = 0;                    // the dense WINDOWS case's, for dense_docs
  std::map<std::string, double> case_tps;  // for the _offload cases
  for (const auto& name : cl.get_list("cases")) {
    JobConfig job = make_case(name, warmup + steps, cl.get("device"), precision);
    job.mutable_train()->set_peak_tflops(ceiling / 1e12);
    loom::train::Trainer trainer(job);
    auto& model = trainer.model();
    const auto& spec = model.spec();
    const int64_t b = job.train().micro_batch_size(), s = job.train().seq_len();

    // Loom's first loss on the first batch, on the device.
    loom::model::Batch batch = first_batch(job, spec.vocab_size);
    double loom_loss = 0, loom_aux = 0;
    {
      at::NoGradGuard g;
      auto out = model.forward(batch.to(model.parameters()[0].tensor.device()));
      loom_loss = out.loss_sum.item<double>() / static_cast<double>(out.num_tokens);
      loom_aux = out.aux_loss.item<double>();
    }

    nlohmann::json peer_plain, peer_tuned;
    std::string check = "no peer";
    const bool has_peer = with_peer && peers.count(name) == 1;
    if (has_peer) {
      std::tie(peer_plain, peer_tuned) = peers.at(name);
      const double dl = std::abs(peer_plain["loss"].get<double>() - loom_loss) / loom_loss;
      const double da =
          std::abs(peer_plain["aux"].get<double>() - loom_aux) / std::max(loom_aux, 1e-12);
      // fp32: both sides compute the same function in the same dtype; bf16: rounding of the compute
      // dtype.
      const double tol = precision == "bf16" ? 2e-2 : 1e-4;
      const bool ok = dl < tol && (spec.moe.num_experts == 0 || da < tol);
      check = ok ? fmt::format("ok (rel diff {:.1e})", std::max(dl, spec.is_moe() ? da : 0.0))
                 : fmt::format("MISMATCH loss {} vs {}, aux {} vs {}", loom_loss,
                               peer_plain["loss"].get<double>(), loom_aux,
                               peer_plain["aux"].get<double>());
      if (!ok) ++failures;
    }

    std::vector<double> times;
    double mfu = 0, tflops = 0, real_tokens = 0, model_flops = 0;
    const at::Tensor probe = model.parameters()[0].tensor;
    for (int i = 0; i < warmup + steps; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      auto m = trainer.train_step();
      if (gpu) (void)probe.view(-1)[0].item<float>();  // waits for the step's device work
      const double secs =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (i >= warmup) {
        times.push_back(secs);
        real_tokens += static_cast<double>(m.tokens);
        model_flops += m.tflops_per_device * 1e12 * m.seconds;  // the step's real sequences
        mfu = m.mfu;
        tflops = m.tflops_per_device;
      }
    }
    const double t = median(times);
    const double tokens = static_cast<double>(b * s);
    // WINDOWS: every step has b x s tokens (median step time); DOCUMENTS: steps differ, so real
    // tokens over the timed steps' total time.
    double total = 0;
    for (double x : times) total += x;
    const bool docs = job.data().mode() == loom::config::DataConfig::DOCUMENTS;
    const double loom_tps = docs ? real_tokens / total : tokens / t;
    if (name == "dense") dense_tps = loom_tps;
    if (docs && dense_tps > 0)
      check = fmt::format("no peer; {:.2f}x the dense WINDOWS case", loom_tps / dense_tps);
    case_tps[name] = loom_tps;
    const auto off = name.find("_offload");
    if (off != std::string::npos && case_tps.count(name.substr(0, off)) == 1) {
      check = fmt::format("no peer; {:.3f}x the {} case (every block offloaded)",
                          loom_tps / case_tps.at(name.substr(0, off)), name.substr(0, off));
    }
    // DOCUMENTS: the attention FLOPs of each packed piece (ModelSpec::step_flops), over the same
    // time.
    const double achieved = docs ? model_flops / total : spec.flops_per_token(s) * loom_tps;
    mfu = achieved / ceiling;
    (void)tflops;
    double torch_tps = 0, torch_tuned_tps = 0;
    if (has_peer) {
      torch_tps = tokens / peer_plain["median_step_s"].get<double>();
      torch_tuned_tps = tokens / peer_tuned["median_step_s"].get<double>();
    }
    std::printf("  %-13s %11.0f %11.0f %11.0f %7.2f %7.2f %9.1f %6.1f%% %9.4f %s\n", name.c_str(),
                loom_tps, torch_tps, torch_tuned_tps, has_peer ? loom_tps / torch_tps : 0.0,
                has_peer ? loom_tps / torch_tuned_tps : 0.0, achieved / 1e9, mfu * 100, loom_loss,
                check.c_str());
    results.push_back({{"case", name},
                       {"params", spec.num_parameters()},
                       {"flops_per_token", spec.flops_per_token(s)},
                       {"loom_tokens_per_s", loom_tps},
                       {"loom_median_step_s", t},
                       {"torch_tokens_per_s", torch_tps},
                       {"torch_tuned_tokens_per_s", torch_tuned_tps},
                       {"ratio_vs_torch", has_peer ? loom_tps / torch_tps : 0.0},
                       {"ratio_vs_torch_tuned", has_peer ? loom_tps / torch_tuned_tps : 0.0},
                       {"mode", docs ? "DOCUMENTS" : "WINDOWS"},
                       {"achieved_flops", achieved},
                       {"matmul_ceiling_flops", ceiling},
                       {"mfu", mfu},
                       {"loom_first_loss", loom_loss},
                       {"check", check}});
  }
  std::printf(
      "# ratio = Loom tokens/s over PyTorch eager (default glibc malloc); ratio+ = over PyTorch "
      "with the\n"
      "# same allocator tuning Loom applies (mallopt: no mmap, no trim). MFU = achieved / the "
      "ceiling above.\n");
  if (!cl.get("json").empty()) {
    std::FILE* f = std::fopen(cl.get("json").c_str(), "w");
    LOOM_CHECK_KIND(loom::ErrorKind::kIO, f != nullptr, "cannot write '{}'", cl.get("json"));
    nlohmann::json doc = {{"threads", threads},
                          {"device", device.str()},
                          {"precision", precision},
                          {"ceiling_flops", ceiling},
                          {"results", results}};
    std::fputs(doc.dump(2).c_str(), f);
    std::fclose(f);
  }
  std::filesystem::remove_all(tmp);
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  return loom::cli::guarded_main(
      "train_throughput", [&] { return run(argc, argv); }, 2);
}
