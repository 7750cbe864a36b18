// The CUDA entry points (kernels.cu), declared for the C++ side that load_inline binds to Python. They take the
// arguments of kernels.cpp's langevin_chain and hmc_chain and return the same outputs (tebm_outputs.h), and are bound
// under the same names: a caller picks the device's module, never a function. Their own namespace keeps their symbols
// apart from the CPU build's.
#pragma once
#include <torch/extension.h>
#include <optional>
#include <vector>

namespace tebm_cuda {
std::vector<torch::Tensor> langevin_chain(torch::Tensor x, int64_t kind, std::vector<double> params, torch::Tensor mean,
                                          torch::Tensor prec, torch::Tensor step_sizes, torch::Tensor noise_scales,
                                          bool metropolis, int64_t thin, bool record_traj, bool record_diag, int64_t seed,
                                          std::optional<at::Generator> generator, double energy_limit,
                                          double energy_growth);
std::vector<torch::Tensor> hmc_chain(torch::Tensor x, int64_t kind, std::vector<double> params, torch::Tensor mean,
                                     torch::Tensor prec, torch::Tensor step_sizes, int64_t n_leapfrog, double mass,
                                     int64_t thin, bool record_traj, bool record_diag, int64_t seed,
                                     std::optional<at::Generator> generator);
}  // namespace tebm_cuda

using tebm_cuda::hmc_chain;
using tebm_cuda::langevin_chain;
