// The CUDA entry points (kernels.cu), declared for the C++ side that load_inline binds to Python.
#pragma once
#include <torch/extension.h>
#include <vector>

std::vector<torch::Tensor> langevin_chain_cuda(torch::Tensor x, int64_t kind, std::vector<double> params,
                                               torch::Tensor mean, torch::Tensor prec, torch::Tensor step_sizes,
                                               torch::Tensor noise_scales, bool metropolis, int64_t thin,
                                               bool record_traj, bool record_diag, int64_t seed);
std::vector<torch::Tensor> hmc_chain_cuda(torch::Tensor x, int64_t kind, std::vector<double> params, torch::Tensor mean,
                                          torch::Tensor prec, torch::Tensor step_sizes, int64_t n_leapfrog, double mass,
                                          int64_t thin, bool record_traj, bool record_diag, int64_t seed);
