#pragma once
// The device of `spear calibrate --device` / `spear diagnose --device`: where the
// calibration's forward-only phases run (compensate/forward_backend.h).
#include "compensate/forward_backend.h"
#include "runtime/device.h"

namespace spear {

// Cpu: empty (calibrate / diagnose use the CPU Runner, the results of before bit for bit).
// Cuda: the GPU runner's factory (calib_gpu/gpu_runner.h); throws spear::Error naming why
// when this build has no CUDA or no device is usable here.
ForwardFactory calib_forward_factory(Device d);

}  // namespace spear
