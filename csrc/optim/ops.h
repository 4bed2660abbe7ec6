// Host-side declarations shared by ops.cpp (registration, validation), cpu.cpp and cuda.cu.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace hift_ext {
namespace optim {

using OptTensor = std::optional<at::Tensor>;

struct NamedList {
  const char* name;
  at::TensorList list;
  // Required dtype of every tensor of this list: Undefined = the param's dtype (index by index),
  // Float = float32 whatever the param's dtype (states and masters when a call has masters).
  at::ScalarType dtype = at::ScalarType::Undefined;
  const char* dtype_why = nullptr;  // the reason in the error message when `dtype` is violated
};

// Checks the input contract of docs/internals.md and raises a clear error on the first violation:
// same list lengths, defined dense strided contiguous tensors, fp32/bf16/fp16, per index the same
// shape as params[i] and the same dtype (or float32 where a list says so: see NamedList::dtype),
// everything on one device, float32 one-element state_steps / grad_scale / found_inf.
// `lists[0]` must be params. A list a call does not use (max_exp_avg_sqs without amsgrad, empty
// master_params) is checked to be empty by the caller and not passed here.
// Returns the common device.
at::Device check_inputs(const char* op, const std::vector<NamedList>& lists,
                        const NamedList* state_steps, const OptTensor& grad_scale,
                        const OptTensor& found_inf);

// Instruction set of the CPU kernels this process uses: "avx2" or "generic" (cpu.cpp).
const char* cpu_kernel_isa();

// CPU kernels (cpu.cpp). Inputs are already validated. master_params: empty (params are updated
// in place in their own dtype) or one fp32 master per param (the update runs on the master with
// fp32 states; the param receives the master rounded to its dtype).
void adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
               at::TensorList state_steps, double lr, double beta1, double beta2,
               double weight_decay, double eps, bool amsgrad, bool maximize,
               const OptTensor& grad_scale, const OptTensor& found_inf,
               at::TensorList master_params);
void adagrad_cpu(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                 at::TensorList state_steps, double lr, double lr_decay, double weight_decay,
                 double eps, bool maximize, const OptTensor& grad_scale,
                 const OptTensor& found_inf, at::TensorList master_params);
void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
             double lr, double momentum, double dampening, bool nesterov, double weight_decay,
             bool maximize, bool is_first_step, const OptTensor& grad_scale,
             const OptTensor& found_inf, at::TensorList master_params);

}  // namespace optim
}  // namespace hift_ext

namespace hift_ext {
namespace optim {
// CUDA kernels (cuda.cu). In a CPU-only build (no HIFT_EXT_WITH_CUDA) ops.cpp defines them to
// raise "built without CUDA kernels".
void adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                at::TensorList state_steps, double lr, double beta1, double beta2,
                double weight_decay, double eps, bool amsgrad, bool maximize,
                const OptTensor& grad_scale, const OptTensor& found_inf,
                at::TensorList master_params,
                const OptTensor& lr_tensor);  // lr_tensor: read by the kernel instead of lr
void adagrad_cuda(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                  at::TensorList state_steps, double lr, double lr_decay, double weight_decay,
                  double eps, bool maximize, const OptTensor& grad_scale,
                  const OptTensor& found_inf, at::TensorList master_params);
void sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              double lr, double momentum, double dampening, bool nesterov, double weight_decay,
              bool maximize, bool is_first_step, const OptTensor& grad_scale,
              const OptTensor& found_inf, at::TensorList master_params);
}  // namespace optim
}  // namespace hift_ext
