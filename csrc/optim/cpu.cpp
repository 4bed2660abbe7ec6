// CPU entry points: turn validated tensor lists into plain work items and per-call scalars, then
// run the kernels for the best instruction set this CPU has (cpu_kernels.h, compiled as
// cpu_avx2.cpp and cpu_generic.cpp). HIFT_EXT_CPU_ISA=generic (or torch's ATEN_CPU_CAPABILITY=
// default) forces the portable kernels, e.g. to test them on an AVX2 machine.
#include "cpu_work.h"
#include "ops.h"
#include "update.h"

#include <cstdlib>
#include <cstring>

namespace hift_ext {
namespace optim {

void cpu::unsupported_dtype(c10::ScalarType t) {
  TORCH_CHECK(false, "hift_ext: unsupported dtype ", t);
}

namespace {

bool use_avx2() {
#if defined(HIFT_HAVE_AVX2_KERNELS) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = [] {
    for (const char* var : {"HIFT_EXT_CPU_ISA", "ATEN_CPU_CAPABILITY"}) {
      const char* v = std::getenv(var);
      if (v != nullptr && (std::strcmp(v, "generic") == 0 || std::strcmp(v, "default") == 0)) return false;
    }
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

// found_inf set -> the whole call is a no-op (AMP overflow step).
bool skip_step(const OptTensor& found_inf) {
  return found_inf.has_value() && found_inf->defined() && *found_inf->const_data_ptr<float>() != 0.f;
}

bool scale_of(const OptTensor& grad_scale, float& scale) {
  const bool has = grad_scale.has_value() && grad_scale->defined();
  scale = has ? *grad_scale->const_data_ptr<float>() : 1.f;
  return has;
}

// One tensor's work item. Written tensors (weight, states, param) through mutable_data_ptr(),
// the grad (read only) through const_data_ptr(). With a master, the master is the weight the
// update reads and writes and the param only receives its rounded value.
cpu::Work work_of(const at::Tensor& param, const at::Tensor& grad,
                  std::initializer_list<const at::Tensor*> states, at::TensorList masters,
                  size_t i) {
  cpu::Work w;
  const bool master = !masters.empty();
  w.weight = master ? masters[i].mutable_data_ptr() : param.mutable_data_ptr();
  w.param = master ? param.mutable_data_ptr() : nullptr;
  w.grad = grad.const_data_ptr();
  size_t k = 0;
  for (const at::Tensor* t : states) w.state[k++] = t->mutable_data_ptr();
  w.numel = param.numel();
  w.dtype = param.scalar_type();
  return w;
}

}  // namespace

const char* cpu_kernel_isa() { return use_avx2() ? "avx2" : "generic"; }

void adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
               at::TensorList state_steps, double lr, double beta1, double beta2,
               double weight_decay, double eps, bool amsgrad, bool maximize,
               const OptTensor& grad_scale, const OptTensor& found_inf,
               at::TensorList master_params) {
  if (skip_step(found_inf)) return;
  const AdamWHostScalars hs = adamw_host_scalars(lr, beta1, beta2, weight_decay, eps);
  cpu::AdamWCall c{};
  c.lerp_w = hs.lerp_w;
  c.lerp_small = hs.lerp_small;
  c.beta2 = hs.beta2;
  c.one_minus_beta2 = hs.one_minus_beta2;
  c.decay = hs.decay;
  c.eps = hs.eps;
  c.has_scale = scale_of(grad_scale, c.grad_scale);
  c.maximize = maximize;
  c.has_wd = weight_decay != 0.0;
  c.amsgrad = amsgrad;
  c.master = !master_params.empty();
  std::vector<cpu::Work> work;
  work.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    work.push_back(amsgrad ? work_of(params[i], grads[i],
                                     {&exp_avgs[i], &exp_avg_sqs[i], &max_exp_avg_sqs[i]},
                                     master_params, i)
                           : work_of(params[i], grads[i], {&exp_avgs[i], &exp_avg_sqs[i]},
                                     master_params, i));
    const auto st = adamw_step_scalars(lr, beta1, beta2, *state_steps[i].const_data_ptr<float>());
    work.back().s0 = st.neg_step;
    work.back().s1 = st.bc2_sqrt;
  }
#ifdef HIFT_HAVE_AVX2_KERNELS
  if (use_avx2()) return cpu::avx2::adamw(work, c);
#endif
  cpu::generic::adamw(work, c);
}

void adagrad_cpu(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                 at::TensorList state_steps, double lr, double lr_decay, double weight_decay,
                 double eps, bool maximize, const OptTensor& grad_scale,
                 const OptTensor& found_inf, at::TensorList master_params) {
  if (skip_step(found_inf)) return;
  cpu::AdagradCall c{};
  c.wd = static_cast<float>(weight_decay);
  c.eps = static_cast<float>(eps);
  c.has_scale = scale_of(grad_scale, c.grad_scale);
  c.maximize = maximize;
  c.has_wd = weight_decay != 0.0;
  c.master = !master_params.empty();
  std::vector<cpu::Work> work;
  work.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    work.push_back(work_of(params[i], grads[i], {&state_sums[i]}, master_params, i));
    work.back().s0 = adagrad_neg_clr(lr, lr_decay, *state_steps[i].const_data_ptr<float>());
  }
#ifdef HIFT_HAVE_AVX2_KERNELS
  if (use_avx2()) return cpu::avx2::adagrad(work, c);
#endif
  cpu::generic::adagrad(work, c);
}

void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
             double lr, double momentum, double dampening, bool nesterov, double weight_decay,
             bool maximize, bool is_first_step, const OptTensor& grad_scale,
             const OptTensor& found_inf, at::TensorList master_params) {
  if (skip_step(found_inf)) return;
  cpu::SgdCall c{};
  c.wd = static_cast<float>(weight_decay);
  c.momentum = static_cast<float>(momentum);
  c.one_minus_dampening = static_cast<float>(1.0 - dampening);
  c.neg_lr = static_cast<float>(-lr);
  c.has_scale = scale_of(grad_scale, c.grad_scale);
  c.maximize = maximize;
  c.has_wd = weight_decay != 0.0;
  c.has_momentum = momentum != 0.0;
  c.nesterov = nesterov;
  c.first_step = is_first_step;
  c.master = !master_params.empty();
  std::vector<cpu::Work> work;
  work.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    work.push_back(c.has_momentum
                       ? work_of(params[i], grads[i], {&momentum_buffers[i]}, master_params, i)
                       : work_of(params[i], grads[i], {}, master_params, i));
  }
#ifdef HIFT_HAVE_AVX2_KERNELS
  if (use_avx2()) return cpu::avx2::sgd(work, c);
#endif
  cpu::generic::sgd(work, c);
}

}  // namespace optim
}  // namespace hift_ext
