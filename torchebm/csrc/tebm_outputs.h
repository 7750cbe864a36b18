// torchebm fused samplers: the outputs of `langevin_chain` and `hmc_chain`, the same on both devices (kernels.cpp,
// kernels.cu; unpacked by _finish in nbs/41_kernels.ipynb): [x_final, trajectory, energy, block_stats, accepted,
// block_size, screen], with undefined tensors (None) where not asked for:
// - trajectory [n, T, d], energy [T, n] and accepted [T, n] (1 where the step's proposal was taken) in x's dtype;
// - block_stats [n_blocks, T, 2, d] float64: the mean and the sum of squared deviations of each block of block_size
//   consecutive chains (the last block holds the rest), with block_size an int64 CPU scalar tensor;
// - screen [n] uint8: each chain's Screen flags (tebm_common.h) when screening was asked and some chain has one.
#pragma once
#include <torch/extension.h>
#include <ATen/CPUGeneratorImpl.h>
#include <optional>
#include <vector>

#include "tebm_common.h"

namespace tebm {

struct Outputs {
  torch::Tensor traj, energy, stats, accepted, flags;
  int block;

  template <typename T> static T *ptr(const torch::Tensor &t) { return t.defined() ? t.data_ptr<T>() : nullptr; }
  ScreenSpec screen(double limit, double growth) const { return {ptr<uint8_t>(flags), limit, growth}; }

  // The outputs in order, `screen` left undefined when no chain has a flag (the common case costs the caller
  // nothing; on CUDA, finding out is one wait for the device, only when screening was asked).
  std::vector<torch::Tensor> pack(const torch::Tensor &x) const {
    return {x, traj, energy, stats, accepted, stats.defined() ? torch::tensor((int64_t)block) : torch::Tensor(),
            any_flag() ? flags : torch::Tensor()};
  }

  bool any_flag() const {
    if (!flags.defined()) return false;
    if (!flags.is_cpu()) return flags.any().item<bool>();
    const uint8_t *f = flags.data_ptr<uint8_t>();  // a plain loop: a torch reduction costs microseconds per call
    uint8_t any = 0;
    for (int64_t i = 0; i < flags.numel(); ++i) any |= f[i];
    return any != 0;
  }
};

// The run's seed: `seed` itself when it is >= 0, else one draw from `generator` (a CPU torch.Generator, torch's
// default one when None): the number torch.randint(0, 2**62, ()) would give, drawn here because a torch call costs
// more than a short run's Python side in all (kernels.py's `_seed` says which).
inline uint64_t run_seed(int64_t seed, const std::optional<at::Generator> &generator) {
  if (seed >= 0) return (uint64_t)seed;
  auto *cpu = at::check_generator<at::CPUGeneratorImpl>(generator.has_value() ? *generator
                                                                               : at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(cpu->mutex_);
  return cpu->random64() % (1ULL << 62);
}

// The outputs of a run from x [n, d] recording n_records steps, its statistics in blocks of `block` chains; screen
// flags when `screening`.
inline Outputs make_outputs(const torch::Tensor &x, int64_t n_records, int block, bool record_traj, bool record_diag,
                            bool record_accept, bool screening) {
  const int64_t n = x.size(0), d = x.size(1), n_blocks = (n + block - 1) / block;
  auto opt = x.options();
  Outputs o;
  o.block = block;
  if (record_traj) o.traj = torch::empty({n, n_records, d}, opt);
  if (record_diag) {
    o.energy = torch::empty({n_records, n}, opt);
    o.stats = torch::empty({n_blocks, n_records, 2, d}, opt.dtype(torch::kFloat64));
    if (record_accept) o.accepted = torch::empty({n_records, n}, opt);
  }
  if (screening) o.flags = torch::empty({n}, opt.dtype(torch::kUInt8));
  return o;
}

}  // namespace tebm
