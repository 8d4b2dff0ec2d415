// GPU tests (built only against a CUDA LibTorch; skipped when no GPU is visible): the CUDA kernels
// against float64 references, and the model and Trainer on CUDA against the same on the CPU.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <gtest/gtest.h>

#include "loom/config.pb.h"
#include "loom/model/gpt.h"
#include "loom/model/model_spec.h"
#include "loom/train/trainer.h"
#ifdef LOOM_HAVE_CUDA_KERNELS
#include <c10/cuda/CUDAStream.h>

#include "loom_kernels/rmsnorm.h"
#endif

namespace {

using loom::config::JobConfig;

#define REQUIRE_GPU()                                           \
  do {                                                          \
    if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device visible"; \
  } while (0)

double rel_err(const at::Tensor& a, const at::Tensor& ref) {
  at::Tensor r = ref.to(at::kCPU, at::kDouble), x = a.to(at::kCPU, at::kDouble);
  return (x - r).norm().item<double>() / std::max(r.norm().item<double>(), 1e-300);
}

// fp32 on the GPU means fp32: no TF32 in cuBLAS or cuDNN for the equivalence tests.
struct NoTf32 {
  bool cublas = at::globalContext().allowTF32CuBLAS(), cudnn = at::globalContext().allowTF32CuDNN();
  NoTf32() {
    at::globalContext().setAllowTF32CuBLAS(false);
    at::globalContext().setAllowTF32CuDNN(false);
  }
  ~NoTf32() {
    at::globalContext().setAllowTF32CuBLAS(cublas);
    at::globalContext().setAllowTF32CuDNN(cudnn);
  }
};

#ifdef LOOM_HAVE_CUDA_KERNELS
// y = x * rsqrt(mean(x^2) + eps) * w against float64 on fresh random inputs; the output is poisoned
// with NaN first so an unwritten element fails. Shapes cover one element, a hidden size that is not a
// multiple of the block, and a large row count.
TEST(RmsNormKernel, MatchesFloat64Reference) {
  REQUIRE_GPU();
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{1, 1}, {7, 33}, {3, 255}, {1024, 4096}, {5, 12345}, {65536, 128}};
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    for (auto [rows, hidden] : shapes) {
      auto opts = at::TensorOptions().device(at::kCUDA).dtype(dtype);
      at::Tensor x = at::randn({rows, hidden}, opts) * 3 + 0.5;
      at::Tensor w = at::rand({hidden}, opts) + 0.5;
      at::Tensor y = at::full({rows, hidden}, NAN, opts);
      at::Tensor rstd = at::full({rows}, NAN, opts.dtype(at::kFloat));
      loom::kernels::RmsNormArgs a{x.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr<float>(), rows, hidden,
                                   1e-5f, dtype == at::kFloat ? loom::kernels::DType::kFloat32
                                                              : loom::kernels::DType::kBFloat16};
      ASSERT_EQ(loom::kernels::launch_rmsnorm_forward(a, c10::cuda::getCurrentCUDAStream()), cudaSuccess);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      at::Tensor xd = x.to(at::kDouble), wd = w.to(at::kDouble);
      at::Tensor ref_rstd = at::rsqrt(xd.pow(2).mean(-1) + 1e-5);
      at::Tensor ref = xd * ref_rstd.unsqueeze(1) * wd;
      ASSERT_FALSE(at::isnan(y).any().item<bool>()) << rows << "x" << hidden;
      // fp32: accumulation order only; bf16: the output's rounding (2^-9 relative) dominates.
      const double tol = dtype == at::kFloat ? 2e-6 : 4e-3;
      EXPECT_LT(rel_err(y, ref), tol) << dtype << " " << rows << "x" << hidden;
      EXPECT_LT(rel_err(rstd, ref_rstd), 2e-6) << dtype << " " << rows << "x" << hidden;
    }
  }
  // Bad arguments are refused, not launched.
  loom::kernels::RmsNormArgs bad{nullptr, nullptr, nullptr, nullptr, 4, 8, 1e-5f, loom::kernels::DType::kFloat32};
  EXPECT_EQ(loom::kernels::launch_rmsnorm_forward(bad, nullptr), cudaErrorInvalidValue);
}
#endif

JobConfig tiny_job(bool moe) {
  JobConfig j;
  j.set_seed(7);
  auto* m = j.mutable_model();
  m->set_vocab_size(256);
  m->set_hidden_size(64);
  m->set_num_layers(2);
  m->set_num_heads(4);
  m->set_num_kv_heads(2);
  m->set_max_seq_len(64);
  if (moe) {
    m->mutable_moe()->set_num_experts(4);
    m->mutable_moe()->set_top_k(2);
    m->mutable_moe()->set_expert_ffn_hidden_size(32);
    m->mutable_moe()->set_aux_loss_coeff(0.01);
  }
  auto* t = j.mutable_train();
  t->set_steps(6);
  t->set_seq_len(64);
  t->set_micro_batch_size(4);
  t->set_global_batch_size(8);
  t->set_progress("off");
  t->set_peak_tflops(1);
  t->set_eval_every(0);
  j.mutable_optim()->set_lr(3e-3);
  j.mutable_optim()->set_warmup_steps(0);
  j.mutable_logging()->set_dir("");
  return j;
}

// The same model and batch on the GPU and the CPU, fp32: loss and every gradient agree.
TEST(CudaModel, ForwardBackwardMatchesCpu) {
  REQUIRE_GPU();
  NoTf32 no_tf32;
  for (bool moe : {false, true}) {
    auto spec = loom::model::ModelSpec::from_config(tiny_job(moe).model());
    loom::model::GptModel cpu(spec, 3, at::kCPU), gpu(spec, 3, at::kCUDA);
    loom::model::Batch b;
    b.tokens = at::randint(0, spec.vocab_size, {2, 48}, at::kLong);
    b.targets = at::randint(0, spec.vocab_size, {2, 48}, at::kLong);
    auto oc = cpu.forward(b);
    auto og = gpu.forward(b.to(at::kCUDA));
    EXPECT_LT(rel_err(og.loss_sum, oc.loss_sum), 1e-5) << "moe=" << moe;
    EXPECT_LT(rel_err(og.aux_loss, oc.aux_loss), 1e-5) << "moe=" << moe;
    (oc.loss_sum + oc.aux_loss).backward();
    (og.loss_sum + og.aux_loss).backward();
    for (size_t i = 0; i < cpu.parameters().size(); ++i) {
      const auto& pc = cpu.parameters()[i];
      const auto& pg = gpu.parameters()[i];
      ASSERT_TRUE(pg.tensor.is_cuda());
      ASSERT_EQ(pc.tensor.grad().defined(), pg.tensor.grad().defined()) << pc.name;
      if (pc.tensor.grad().defined()) {
        EXPECT_LT(rel_err(pg.tensor.grad(), pc.tensor.grad()), 1e-4) << pc.name;
      }
    }
  }
}

// Six Trainer steps on the GPU equal six on the CPU (fp32): losses and final parameters.
TEST(CudaTrainer, MatchesCpuTrainer) {
  REQUIRE_GPU();
  NoTf32 no_tf32;
  for (bool moe : {false, true}) {
    auto j = tiny_job(moe);
    auto jg = j;
    jg.mutable_train()->set_device("cuda");
    loom::train::Trainer c(j), g(jg);
    for (int s = 0; s < 6; ++s) {
      auto mc = c.train_step();
      auto mg = g.train_step();
      EXPECT_NEAR(mg.loss, mc.loss, 1e-4 * mc.loss) << "moe=" << moe << " step " << s;
      EXPECT_NEAR(mg.grad_norm, mc.grad_norm, 1e-3 * mc.grad_norm) << "moe=" << moe << " step " << s;
    }
    for (size_t i = 0; i < c.model().parameters().size(); ++i) {
      EXPECT_LT(rel_err(g.model().parameters()[i].tensor, c.model().parameters()[i].tensor), 1e-4)
          << c.model().parameters()[i].name;
    }
    EXPECT_GT(g.history().back().device_peak, 0);
  }
}

// bf16 compute with fp32 master weights on the GPU learns the synthetic corpus, and its first loss
// is the fp32 one within bf16 rounding.
TEST(CudaTrainer, Bf16Learns) {
  REQUIRE_GPU();
  for (bool moe : {false, true}) {
    auto j = tiny_job(moe);
    j.mutable_train()->set_device("cuda");
    j.mutable_train()->set_steps(40);
    auto jb = j;
    jb.mutable_model()->set_precision(loom::config::ModelConfig::BF16);
    loom::train::Trainer f(j), b(jb);
    const double first_f = f.train_step().loss;
    const double first_b = b.train_step().loss;
    EXPECT_NEAR(first_b, first_f, 0.02 * first_f) << "moe=" << moe;
    double last = 0;
    for (int s = 1; s < 40; ++s) last = b.train_step().loss;
    EXPECT_LT(last, 0.8 * first_b) << "moe=" << moe;
    EXPECT_EQ(b.model().parameters()[0].tensor.scalar_type(), at::kFloat);
  }
}

}  // namespace
