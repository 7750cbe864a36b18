// The CUDA entry points (kernels.cu), declared for the C++ side that load_inline binds to Python. They take the
// arguments of kernels.cpp's langevin_chain and hmc_chain and return the same outputs (tebm_outputs.h), and are bound
// under the same names: a caller picks the device's module, never a function. energy_kinds reports the energies this
// build compiled, as the CPU build's does. Their own namespace keeps their symbols
// apart from the CPU build's.
#pragma once
#include <torch/extension.h>
#include <optional>
#include <string>
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
std::vector<std::string> energy_kinds();
}  // namespace tebm_cuda

using tebm_cuda::energy_kinds;
using tebm_cuda::hmc_chain;
using tebm_cuda::langevin_chain;
