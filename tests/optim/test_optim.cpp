// AdamW, the LR schedules and gradient clipping against their closed forms, computed here in
// float64 scalar code.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>

#include "loom/core/error.h"
#include "loom/optim/adamw.h"
#include "loom/optim/clip.h"
#include "loom/optim/schedule.h"

namespace {

using loom::model::Parameter;

Parameter make_param(const std::string& name, at::Tensor value, bool decay) {
  Parameter p;
  p.name = name;
  p.tensor = value.to(at::kDouble).detach().requires_grad_(true);
  p.global_shape = value.sizes().vec();
  p.weight_decay = decay;
  return p;
}

TEST(Sgd, MatchesClosedFormAndHoldsNoState) {
  // optim.optimizer = SGD: p -= lr * wd * p (decayed parameters), then p -= lr * g; an undefined
  // gradient leaves only the decay. No moments: nothing in state(), nothing to load.
  std::vector<Parameter> params;
  params.push_back(make_param("w", at::tensor({0.5, -1.0}), true));
  params.push_back(make_param("b", at::tensor({2.0}), false));
  loom::config::OptimConfig c;
  c.set_optimizer(loom::config::OptimConfig::SGD);
  c.set_weight_decay(0.1);
  loom::optim::AdamW sgd(&params, loom::optim::AdamWOptions::from_config(c));
  std::vector<double> w = {0.5, -1.0}, b = {2.0};
  const std::vector<std::vector<double>> gw = {{0.3, -0.2}, {1.0, 4.0}};
  for (int step = 0; step < 2; ++step) {
    const double lr = step == 0 ? 0.5 : 0.25;
    params[0].tensor.mutable_grad() = at::tensor(gw[step], at::kDouble);
    params[1].tensor.mutable_grad() = step == 0 ? at::tensor({-1.0}, at::kDouble) : at::Tensor();
    sgd.step(lr);
    for (size_t i = 0; i < 2; ++i) w[i] = w[i] - lr * 0.1 * w[i] - lr * gw[step][i];
    if (step == 0) b[0] -= lr * -1.0;
    EXPECT_NEAR(params[0].tensor[0].item<double>(), w[0], 1e-15);
    EXPECT_NEAR(params[0].tensor[1].item<double>(), w[1], 1e-15);
    EXPECT_NEAR(params[1].tensor[0].item<double>(), b[0], 1e-15);
  }
  EXPECT_EQ(sgd.step_count(), 2);
  EXPECT_TRUE(sgd.state().empty());
  EXPECT_EQ(sgd.state_bytes(), 0);
  sgd.load_state({}, 7);
  EXPECT_EQ(sgd.step_count(), 7);
}

TEST(AdamW, MatchesClosedFormOverSeveralSteps) {
  std::vector<Parameter> params;
  params.push_back(make_param("w", at::tensor({0.5, -1.0, 2.0, 0.25}).view({2, 2}), true));
  params.push_back(make_param("norm.weight", at::tensor({1.0, -0.5}), false));
  params.push_back(
      make_param("idle", at::tensor({0.3, 0.7}).view({1, 2}), true));  // never gets a gradient
  loom::optim::AdamWOptions o;
  o.beta1 = 0.8;
  o.beta2 = 0.9;
  o.eps = 1e-3;
  o.weight_decay = 0.05;
  loom::optim::AdamW adam(&params, o);

  // Reference state, element by element.
  std::vector<std::vector<double>> p = {{0.5, -1.0, 2.0, 0.25}, {1.0, -0.5}, {0.3, 0.7}};
  std::vector<std::vector<double>> m = {{0, 0, 0, 0}, {0, 0}, {0, 0}}, v = m;
  const std::vector<std::vector<std::vector<double>>> grads = {
      {{0.1, -0.2, 0.3, 0.0}, {1.0, 2.0}},
      {{-0.5, 0.5, 0.0, 1.5}, {0.0, -1.0}},
      {{2.0, 0.1, -0.1, -3.0}, {0.5, 0.5}}};
  const std::vector<double> lrs = {0.1, 0.05, 0.2};
  for (int step = 0; step < 3; ++step) {
    params[0].tensor.mutable_grad() = at::tensor(grads[step][0], at::kDouble).view({2, 2});
    params[1].tensor.mutable_grad() = at::tensor(grads[step][1], at::kDouble);
    params[2].tensor.mutable_grad() = at::Tensor();
    adam.step(lrs[step]);
    const double t = step + 1;
    for (size_t k = 0; k < p.size(); ++k) {
      for (size_t i = 0; i < p[k].size(); ++i) {
        const double g = k < 2 ? grads[step][k][i] : 0.0;
        m[k][i] = o.beta1 * m[k][i] + (1 - o.beta1) * g;
        v[k][i] = o.beta2 * v[k][i] + (1 - o.beta2) * g * g;
        const bool decay = k != 1;
        if (decay) p[k][i] -= lrs[step] * o.weight_decay * p[k][i];
        const double mhat = m[k][i] / (1 - std::pow(o.beta1, t));
        const double vhat = v[k][i] / (1 - std::pow(o.beta2, t));
        p[k][i] -= lrs[step] * mhat / (std::sqrt(vhat) + o.eps);
      }
    }
    for (size_t k = 0; k < p.size(); ++k) {
      at::Tensor actual = params[k].tensor.detach().reshape({-1});
      for (size_t i = 0; i < p[k].size(); ++i) {
        EXPECT_NEAR(actual[i].item<double>(), p[k][i], 1e-14)
            << "step " << step << " param " << k << "[" << i << "]";
      }
    }
  }
  EXPECT_EQ(adam.step_count(), 3);
  // State round trip.
  auto state = adam.state();
  ASSERT_EQ(state.size(), 6u);
  EXPECT_EQ(state[0].name, "w.exp_avg");
  EXPECT_EQ(state[1].name, "w.exp_avg_sq");
  EXPECT_NEAR(state[0].tensor.reshape({-1})[3].item<double>(), m[0][3], 1e-15);
  loom::optim::AdamW other(&params, o);
  other.load_state(state, 3);
  EXPECT_EQ(other.step_count(), 3);
  EXPECT_TRUE(at::equal(other.state()[3].tensor, state[3].tensor));
  state.pop_back();
  EXPECT_THROW(other.load_state(state, 3), loom::Error);
}

loom::config::OptimConfig schedule_config(loom::config::OptimConfig::Schedule kind) {
  loom::config::OptimConfig c;
  c.set_lr(1.0);
  c.set_min_lr(0.1);
  c.set_warmup_steps(10);
  c.set_schedule(kind);
  return c;
}

TEST(LrSchedule, ClosedForms) {
  const double pi = 3.14159265358979323846;
  using C = loom::config::OptimConfig;
  // 110 steps: 10 warm-up, 100 decay.
  loom::optim::LrSchedule cosine(schedule_config(C::COSINE), 110);
  EXPECT_DOUBLE_EQ(cosine.lr_at(0), 0.1);
  EXPECT_DOUBLE_EQ(cosine.lr_at(4), 0.5);
  EXPECT_DOUBLE_EQ(cosine.lr_at(9), 1.0);
  EXPECT_DOUBLE_EQ(cosine.lr_at(10), 1.0);
  EXPECT_NEAR(cosine.lr_at(35), 0.1 + 0.9 * 0.5 * (1 + std::cos(pi * 25 / 100)), 1e-15);
  EXPECT_NEAR(cosine.lr_at(60), 0.55, 1e-15);
  EXPECT_NEAR(cosine.lr_at(110), 0.1, 1e-15);
  EXPECT_NEAR(cosine.lr_at(500), 0.1, 1e-15);  // stays at the floor past the end

  loom::optim::LrSchedule linear(schedule_config(C::LINEAR), 110);
  EXPECT_NEAR(linear.lr_at(35), 1.0 - 0.9 * 0.25, 1e-15);

  loom::optim::LrSchedule constant(schedule_config(C::CONSTANT), 110);
  EXPECT_DOUBLE_EQ(constant.lr_at(4), 0.5);
  EXPECT_DOUBLE_EQ(constant.lr_at(100), 1.0);

  auto wc = schedule_config(C::WSD);
  wc.set_wsd_decay_fraction(0.2);  // decay over the last 20 of the 100 post-warm-up steps
  wc.set_wsd_decay(C::WSD_LINEAR);
  loom::optim::LrSchedule wsd(wc, 110);
  EXPECT_DOUBLE_EQ(wsd.lr_at(50), 1.0);
  EXPECT_DOUBLE_EQ(wsd.lr_at(89), 1.0);  // t = 79 < 80
  EXPECT_NEAR(wsd.lr_at(95), 0.1 + 0.9 * (1 - 5.0 / 20), 1e-15);
  EXPECT_NEAR(wsd.lr_at(110), 0.1, 1e-15);
  wc.set_wsd_decay(C::WSD_SQRT);
  loom::optim::LrSchedule wsd_sqrt(wc, 110);
  EXPECT_NEAR(wsd_sqrt.lr_at(95), 0.1 + 0.9 * (1 - std::sqrt(0.25)), 1e-15);
  wc.set_wsd_decay(C::WSD_COSINE);
  loom::optim::LrSchedule wsd_cos(wc, 110);
  EXPECT_NEAR(wsd_cos.lr_at(100), 0.1 + 0.9 * 0.5 * (1 + std::cos(pi * 0.5)), 1e-15);

  auto bad = schedule_config(C::COSINE);
  bad.set_min_lr(2.0);
  EXPECT_THROW(loom::optim::LrSchedule(bad, 10), loom::Error);
  bad = schedule_config(C::COSINE);
  bad.set_lr(0);
  EXPECT_THROW(loom::optim::LrSchedule(bad, 10), loom::Error);
}

TEST(Clip, GlobalNormAndScaling) {
  std::vector<Parameter> params;
  params.push_back(make_param("a", at::zeros({2}), true));
  params.push_back(make_param("b", at::zeros({1, 2}), true));
  params.push_back(make_param("c", at::zeros({3}), true));  // no gradient: counts as zero
  params[0].tensor.mutable_grad() = at::tensor({3.0, 0.0}, at::kDouble);
  params[1].tensor.mutable_grad() = at::tensor({0.0, 4.0}, at::kDouble).view({1, 2});
  EXPECT_DOUBLE_EQ(loom::optim::grad_norm(params), 5.0);
  // Below the threshold: untouched.
  EXPECT_DOUBLE_EQ(loom::optim::clip_grad_norm(params, 10.0), 5.0);
  EXPECT_DOUBLE_EQ(params[0].tensor.grad()[0].item<double>(), 3.0);
  // Above: scaled to max_norm (up to the 1e-6 guard).
  EXPECT_DOUBLE_EQ(loom::optim::clip_grad_norm(params, 1.0), 5.0);
  EXPECT_NEAR(loom::optim::grad_norm(params), 1.0, 1e-6);
  EXPECT_NEAR(params[1].tensor.grad()[0][1].item<double>(), 0.8, 1e-6);
  // Non-finite: reported, nothing scaled.
  params[0].tensor.mutable_grad()[0] = std::nan("");
  EXPECT_TRUE(std::isnan(loom::optim::clip_grad_norm(params, 1.0)));
  EXPECT_NEAR(params[1].tensor.grad()[0][1].item<double>(), 0.8, 1e-6);
}

}  // namespace
