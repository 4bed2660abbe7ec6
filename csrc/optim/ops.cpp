// TORCH_LIBRARY registration of torch.ops.hift_ext.fused_{adamw,adagrad,sgd}_ and the input
// validation every device shares. One entry function per op validates, then picks the CPU or
// CUDA kernel by device; it is registered for the CPU, CUDA and sparse dispatch keys so that
// sparse or mixed-device inputs reach a clear error instead of "no kernel for backend".
// Other files that add ops to the hift_ext namespace must use TORCH_LIBRARY_FRAGMENT.
#include "ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace hift_ext {
namespace optim {

namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_scalar_tensor(const char* op, const char* name, const at::Tensor& t,
                         const at::Device& device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense tensor, got layout ",
              t.layout());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a float32 tensor, got dtype ", t.scalar_type());
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must hold exactly one element, got shape ",
              t.sizes());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(),
              " but params are on ", device, " (it must live on the params' device)");
}

[[noreturn]] void no_cuda_kernels(const char* op) {
  TORCH_CHECK(false, op,
              ": got CUDA tensors, but hift_ext was built without CUDA kernels "
              "(hift_ext._C is a CPU-only build). Rebuild with nvcc available and a CUDA build "
              "of torch: `HIFT_EXT_CUDA=1 pip install --no-build-isolation -e .`");
}

}  // namespace

at::Device check_inputs(const char* op, const std::vector<NamedList>& lists,
                        const NamedList* state_steps, const OptTensor& grad_scale,
                        const OptTensor& found_inf) {
  TORCH_INTERNAL_ASSERT(!lists.empty());
  const at::TensorList params = lists[0].list;
  const size_t n = params.size();
  for (const auto& l : lists) {
    TORCH_CHECK(l.list.size() == n, op, ": ", l.name, " has ", l.list.size(), " tensors but ",
                lists[0].name, " has ", n, " (every list needs one entry per parameter)");
  }
  if (state_steps != nullptr) {
    TORCH_CHECK(state_steps->list.size() == n, op, ": ", state_steps->name, " has ",
                state_steps->list.size(), " tensors but ", lists[0].name, " has ", n,
                " (every list needs one entry per parameter)");
  }
  if (n == 0) return at::Device(at::kCPU);

  TORCH_CHECK(params[0].defined(), op, ": params[0] is an undefined tensor");
  const at::Device device = params[0].device();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    for (const auto& l : lists) {
      const at::Tensor& t = l.list[i];
      TORCH_CHECK(t.defined(), op, ": ", l.name, "[", i, "] is an undefined tensor (None)");
      TORCH_CHECK(t.layout() == at::kStrided, op, ": ", l.name, "[", i, "] is sparse (layout ",
                  t.layout(), "); hift_ext's fused optimizers support dense tensors only");
      TORCH_CHECK(supported_dtype(t.scalar_type()), op, ": ", l.name, "[", i, "] has dtype ",
                  t.scalar_type(), "; supported dtypes are float32, bfloat16 and float16");
      TORCH_CHECK(t.device() == device, op, ": ", l.name, "[", i, "] is on ", t.device(),
                  " but params[0] is on ", device, " (all tensors must be on one device)");
      if (&l != &lists[0]) {
        if (l.dtype == at::ScalarType::Undefined) {
          TORCH_CHECK(t.scalar_type() == p.scalar_type(), op, ": ", l.name, "[", i,
                      "] has dtype ", t.scalar_type(), " but params[", i, "] has dtype ",
                      p.scalar_type(), " (",
                      l.dtype_why != nullptr ? l.dtype_why
                                             : "a parameter's grad and states share its dtype",
                      ")");
        } else {
          TORCH_CHECK(t.scalar_type() == l.dtype, op, ": ", l.name, "[", i, "] has dtype ",
                      t.scalar_type(), " but must be ", l.dtype, " (", l.dtype_why, ")");
        }
        TORCH_CHECK(t.sizes().equals(p.sizes()), op, ": ", l.name, "[", i, "] has shape ",
                    t.sizes(), " but params[", i, "] has shape ", p.sizes());
      }
      TORCH_CHECK(t.is_contiguous(), op, ": ", l.name, "[", i,
                  "] is not contiguous (shape ", t.sizes(), ", strides ", t.strides(),
                  "); pass contiguous tensors");
    }
    if (state_steps != nullptr) {
      const std::string name = std::string(state_steps->name) + "[" + std::to_string(i) + "]";
      check_scalar_tensor(op, name.c_str(), state_steps->list[i], device);
    }
  }
  if (grad_scale.has_value() && grad_scale->defined())
    check_scalar_tensor(op, "grad_scale", *grad_scale, device);
  if (found_inf.has_value() && found_inf->defined())
    check_scalar_tensor(op, "found_inf", *found_inf, device);
  return device;
}

#ifndef HIFT_EXT_WITH_CUDA
void adamw_cuda(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                at::TensorList, double, double, double, double, double, bool, bool,
                const OptTensor&, const OptTensor&, at::TensorList, const OptTensor&) {
  no_cuda_kernels("hift_ext::fused_adamw_");
}
void adagrad_cuda(at::TensorList, at::TensorList, at::TensorList, at::TensorList, double, double,
                  double, double, bool, const OptTensor&, const OptTensor&, at::TensorList) {
  no_cuda_kernels("hift_ext::fused_adagrad_");
}
void sgd_cuda(at::TensorList, at::TensorList, at::TensorList, double, double, double, bool,
              double, bool, bool, const OptTensor&, const OptTensor&, at::TensorList) {
  no_cuda_kernels("hift_ext::fused_sgd_");
}
#endif

namespace {

// AdamW's lr as a tensor: one float32/float64 element on the params' device, read by the kernel
// when it runs (so a CUDA graph replays with the lr a scheduler last wrote into it).
void check_lr_tensor(const char* op, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.layout() == at::kStrided, op, ": lr_tensor must be a dense tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
              ": lr_tensor must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == 1, op, ": lr_tensor must hold exactly one element, got shape ",
              t.sizes());
  TORCH_CHECK(t.device() == device, op, ": lr_tensor is on ", t.device(), " but params are on ",
              device, " (pass the lr tensor on the params' device, or a python float)");
}

[[noreturn]] void bad_device(const char* op, const at::Device& d) {
  TORCH_CHECK(false, op, ": tensors on ", d, " are not supported (CPU and CUDA only)");
}

// With master_params: states must be fp32 (they belong to the fp32 master), grads keep the
// param's dtype, masters are fp32 with the param's shape. Without: every list has the param's
// dtype, as before.
constexpr const char* kMasterStateWhy =
    "with master_params, optimizer states are float32 like the masters";
constexpr const char* kMasterGradWhy = "with master_params, a grad keeps its param's dtype";

NamedList state_list(const char* name, at::TensorList l, bool master) {
  return master ? NamedList{name, l, at::kFloat, kMasterStateWhy} : NamedList{name, l};
}

// Adds master_params to the checked lists when the call has masters.
void add_masters(std::vector<NamedList>& lists, at::TensorList master_params) {
  if (master_params.empty()) return;
  lists[1].dtype_why = kMasterGradWhy;  // lists[1] is grads
  lists.push_back({"master_params", master_params, at::kFloat, "master weights are float32"});
}

void fused_adamw_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                  at::TensorList state_steps, double lr, double beta1, double beta2,
                  double weight_decay, double eps, bool amsgrad, bool maximize,
                  at::TensorList master_params, const OptTensor& grad_scale,
                  const OptTensor& found_inf, const OptTensor& lr_tensor) {
  const char* op = "hift_ext::fused_adamw_";
  const bool master = !master_params.empty();
  std::vector<NamedList> lists{{"params", params},
                               {"grads", grads},
                               state_list("exp_avgs", exp_avgs, master),
                               state_list("exp_avg_sqs", exp_avg_sqs, master)};
  if (amsgrad) {
    lists.push_back(state_list("max_exp_avg_sqs", max_exp_avg_sqs, master));
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty(), op, ": max_exp_avg_sqs must be empty when "
                "amsgrad=False, got ", max_exp_avg_sqs.size(), " tensors");
  }
  add_masters(lists, master_params);
  const NamedList steps{"state_steps", state_steps};
  const at::Device d = check_inputs(op, lists, &steps, grad_scale, found_inf);
  const bool has_lr_tensor = lr_tensor.has_value() && lr_tensor->defined();
  if (has_lr_tensor && !params.empty()) check_lr_tensor(op, *lr_tensor, d);
  if (params.empty() || d.is_meta()) return;  // meta/fake tensors: shape checks only
  if (d.is_cpu()) {
    // the CPU kernel takes the value (reading host memory is no sync)
    const double lr_value = has_lr_tensor ? lr_tensor->item<double>() : lr;
    adamw_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr_value, beta1,
              beta2, weight_decay, eps, amsgrad, maximize, grad_scale, found_inf, master_params);
  } else if (d.is_cuda()) {
    adamw_cuda(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1,
               beta2, weight_decay, eps, amsgrad, maximize, grad_scale, found_inf, master_params,
               lr_tensor);
  } else {
    bad_device(op, d);
  }
}

void fused_adagrad_(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                    at::TensorList state_steps, double lr, double lr_decay, double weight_decay,
                    double eps, bool maximize, at::TensorList master_params,
                    const OptTensor& grad_scale, const OptTensor& found_inf) {
  const char* op = "hift_ext::fused_adagrad_";
  const bool master = !master_params.empty();
  std::vector<NamedList> lists{
      {"params", params}, {"grads", grads}, state_list("state_sums", state_sums, master)};
  add_masters(lists, master_params);
  const NamedList steps{"state_steps", state_steps};
  const at::Device d = check_inputs(op, lists, &steps, grad_scale, found_inf);
  if (params.empty() || d.is_meta()) return;
  if (d.is_cpu()) {
    adagrad_cpu(params, grads, state_sums, state_steps, lr, lr_decay, weight_decay, eps,
                maximize, grad_scale, found_inf, master_params);
  } else if (d.is_cuda()) {
    adagrad_cuda(params, grads, state_sums, state_steps, lr, lr_decay, weight_decay, eps,
                 maximize, grad_scale, found_inf, master_params);
  } else {
    bad_device(op, d);
  }
}

void fused_sgd_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                double lr, double momentum, double dampening, bool nesterov, double weight_decay,
                bool maximize, bool is_first_step, at::TensorList master_params,
                const OptTensor& grad_scale, const OptTensor& found_inf) {
  const char* op = "hift_ext::fused_sgd_";
  const bool master = !master_params.empty();
  std::vector<NamedList> lists{{"params", params}, {"grads", grads}};
  if (momentum != 0.0) {
    lists.push_back(state_list("momentum_buffers", momentum_buffers, master));
  } else {
    TORCH_CHECK(momentum_buffers.empty(), op, ": momentum_buffers must be empty when "
                "momentum == 0, got ", momentum_buffers.size(), " tensors");
  }
  TORCH_CHECK(!nesterov || (momentum > 0.0 && dampening == 0.0), op,
              ": nesterov momentum requires a momentum and zero dampening");
  add_masters(lists, master_params);
  const at::Device d = check_inputs(op, lists, nullptr, grad_scale, found_inf);
  if (params.empty() || d.is_meta()) return;
  if (d.is_cpu()) {
    sgd_cpu(params, grads, momentum_buffers, lr, momentum, dampening, nesterov, weight_decay,
            maximize, is_first_step, grad_scale, found_inf, master_params);
  } else if (d.is_cuda()) {
    sgd_cuda(params, grads, momentum_buffers, lr, momentum, dampening, nesterov, weight_decay,
             maximize, is_first_step, grad_scale, found_inf, master_params);
  } else {
    bad_device(op, d);
  }
}

// ADInplaceOrView kernels: run the op below this key, then bump the version counters of the
// tensors it mutated, as torch's own in-place ops do (autograd then detects a saved tensor that
// an optimizer step modified, and functionalization sees the mutation).
void bump_versions(at::TensorList ts) {
  for (const auto& t : ts) {
    if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
}

template <class Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

void fused_adamw_view(c10::DispatchKeySet ks, at::TensorList params, at::TensorList grads,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr,
                      double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                      bool maximize, at::TensorList master_params, const OptTensor& grad_scale,
                      const OptTensor& found_inf, const OptTensor& lr_tensor) {
  static const auto op = find_op<decltype(fused_adamw_)>("hift_ext::fused_adamw_");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, params, grads, exp_avgs, exp_avg_sqs,
                  max_exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps, amsgrad,
                  maximize, master_params, grad_scale, found_inf, lr_tensor);
  }
  bump_versions(params);
  bump_versions(exp_avgs);
  bump_versions(exp_avg_sqs);
  bump_versions(max_exp_avg_sqs);
  bump_versions(master_params);
}

void fused_adagrad_view(c10::DispatchKeySet ks, at::TensorList params, at::TensorList grads,
                        at::TensorList state_sums, at::TensorList state_steps, double lr,
                        double lr_decay, double weight_decay, double eps, bool maximize,
                        at::TensorList master_params, const OptTensor& grad_scale,
                        const OptTensor& found_inf) {
  static const auto op = find_op<decltype(fused_adagrad_)>("hift_ext::fused_adagrad_");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, params, grads, state_sums, state_steps,
                  lr, lr_decay, weight_decay, eps, maximize, master_params, grad_scale,
                  found_inf);
  }
  bump_versions(params);
  bump_versions(state_sums);
  bump_versions(master_params);
}

void fused_sgd_view(c10::DispatchKeySet ks, at::TensorList params, at::TensorList grads,
                    at::TensorList momentum_buffers, double lr, double momentum,
                    double dampening, bool nesterov, double weight_decay, bool maximize,
                    bool is_first_step, at::TensorList master_params,
                    const OptTensor& grad_scale, const OptTensor& found_inf) {
  static const auto op = find_op<decltype(fused_sgd_)>("hift_ext::fused_sgd_");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, params, grads, momentum_buffers, lr,
                  momentum, dampening, nesterov, weight_decay, maximize, is_first_step,
                  master_params, grad_scale, found_inf);
  }
  bump_versions(params);
  bump_versions(momentum_buffers);
  bump_versions(master_params);
}

// Autograd kernels (unboxed): optimizer updates are not differentiable. Registering them avoids
// torch's boxed autograd fallback, which would copy every tensor of every list into IValues on
// each call (measurable with thousands of tensors), and gives a clear error instead of a silent
// in-place update of tensors autograd is tracking.
void check_no_grad(const char* op, at::TensorList params, at::TensorList master_params) {
  if (!at::GradMode::is_enabled()) return;
  for (const auto& p : params) {
    TORCH_CHECK(!p.defined() || !p.requires_grad(), op,
                ": params require grad and grad mode is enabled; optimizer updates are not "
                "differentiable, call it under torch.no_grad() (torch.optim optimizers do)");
  }
  for (const auto& p : master_params) {
    TORCH_CHECK(!p.defined() || !p.requires_grad(), op,
                ": master_params require grad and grad mode is enabled; optimizer updates are "
                "not differentiable, call it under torch.no_grad() (torch.optim optimizers do)");
  }
}

void fused_adamw_autograd(c10::DispatchKeySet ks, at::TensorList params, at::TensorList grads,
                          at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                          at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr,
                          double beta1, double beta2, double weight_decay, double eps,
                          bool amsgrad, bool maximize, at::TensorList master_params,
                          const OptTensor& grad_scale, const OptTensor& found_inf,
                          const OptTensor& lr_tensor) {
  static const auto op = find_op<decltype(fused_adamw_)>("hift_ext::fused_adamw_");
  check_no_grad("hift_ext::fused_adamw_", params, master_params);
  at::AutoDispatchBelowAutograd guard;
  op.redispatch(ks & c10::after_autograd_keyset, params, grads, exp_avgs, exp_avg_sqs,
                max_exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, eps, amsgrad,
                maximize, master_params, grad_scale, found_inf, lr_tensor);
}

void fused_adagrad_autograd(c10::DispatchKeySet ks, at::TensorList params, at::TensorList grads,
                            at::TensorList state_sums, at::TensorList state_steps, double lr,
                            double lr_decay, double weight_decay, double eps, bool maximize,
                            at::TensorList master_params, const OptTensor& grad_scale,
                            const OptTensor& found_inf) {
  static const auto op = find_op<decltype(fused_adagrad_)>("hift_ext::fused_adagrad_");
  check_no_grad("hift_ext::fused_adagrad_", params, master_params);
  at::AutoDispatchBelowAutograd guard;
  op.redispatch(ks & c10::after_autograd_keyset, params, grads, state_sums, state_steps, lr,
                lr_decay, weight_decay, eps, maximize, master_params, grad_scale, found_inf);
}

void fused_sgd_autograd(c10::DispatchKeySet ks, at::TensorList params, at::TensorList grads,
                        at::TensorList momentum_buffers, double lr, double momentum,
                        double dampening, bool nesterov, double weight_decay, bool maximize,
                        bool is_first_step, at::TensorList master_params,
                        const OptTensor& grad_scale, const OptTensor& found_inf) {
  static const auto op = find_op<decltype(fused_sgd_)>("hift_ext::fused_sgd_");
  check_no_grad("hift_ext::fused_sgd_", params, master_params);
  at::AutoDispatchBelowAutograd guard;
  op.redispatch(ks & c10::after_autograd_keyset, params, grads, momentum_buffers, lr, momentum,
                dampening, nesterov, weight_decay, maximize, is_first_step, master_params,
                grad_scale, found_inf);
}

}  // namespace
}  // namespace optim
}  // namespace hift_ext

// lr_tensor (fused_adamw_ only, optional): a one-element float32/float64 tensor on the params'
// device; when given, the kernel reads lr from it at run time and the float lr is ignored (CUDA
// graph capture: replays use the value last written into it, with no host sync per step).
// master_params (keyword, required by the raw op; the python wrappers default it to []): empty,
// or one float32 master weight per param. With masters the update runs in fp32 on the master
// (states fp32, grads in the param's dtype) and each param receives its master rounded to the
// param's dtype; see csrc/optim/update.h (storage policies).
TORCH_LIBRARY(hift_ext, m) {
  m.def(
      "fused_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor[] state_steps, *, "
      "float lr, float beta1, float beta2, float weight_decay, float eps, bool amsgrad, "
      "bool maximize, Tensor(e!)[] master_params, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor? lr_tensor=None) -> ()");
  m.def(
      "fused_adagrad_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, "
      "Tensor[] state_steps, *, float lr, float lr_decay, float weight_decay, float eps, "
      "bool maximize, Tensor(c!)[] master_params, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def(
      "fused_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, *, "
      "float lr, float momentum, float dampening, bool nesterov, float weight_decay, "
      "bool maximize, bool is_first_step, Tensor(c!)[] master_params, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
}

#define HIFT_REGISTER_IMPLS(KEY)                                      \
  TORCH_LIBRARY_IMPL(hift_ext, KEY, m) {                              \
    m.impl("fused_adamw_", &hift_ext::optim::fused_adamw_);           \
    m.impl("fused_adagrad_", &hift_ext::optim::fused_adagrad_);       \
    m.impl("fused_sgd_", &hift_ext::optim::fused_sgd_);               \
  }

HIFT_REGISTER_IMPLS(CPU)
HIFT_REGISTER_IMPLS(CUDA)
// Sparse grads land here and get check_inputs' "is sparse" error.
HIFT_REGISTER_IMPLS(SparseCPU)
HIFT_REGISTER_IMPLS(SparseCUDA)
// Meta (and so FakeTensor / torch.compile tracing): validation only, nothing to compute.
HIFT_REGISTER_IMPLS(Meta)

TORCH_LIBRARY_IMPL(hift_ext, Autograd, m) {
  m.impl("fused_adamw_", TORCH_FN(hift_ext::optim::fused_adamw_autograd));
  m.impl("fused_adagrad_", TORCH_FN(hift_ext::optim::fused_adagrad_autograd));
  m.impl("fused_sgd_", TORCH_FN(hift_ext::optim::fused_sgd_autograd));
}

TORCH_LIBRARY_IMPL(hift_ext, ADInplaceOrView, m) {
  m.impl("fused_adamw_", TORCH_FN(hift_ext::optim::fused_adamw_view));
  m.impl("fused_adagrad_", TORCH_FN(hift_ext::optim::fused_adagrad_view));
  m.impl("fused_sgd_", TORCH_FN(hift_ext::optim::fused_sgd_view));
}
