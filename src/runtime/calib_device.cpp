#include "runtime/calib_device.h"

#include <string>

#include "core/error.h"
#ifdef SPEAR_WITH_CUDA
#include "calib_gpu/gpu_runner.h"
#endif

namespace spear {

ForwardFactory calib_forward_factory(Device d) {
  if (d == Device::Cpu) return {};
  std::string why;
  SPEAR_CHECK(device_available(d, &why), "--device cuda: no usable CUDA device (" + why + ")");
#ifdef SPEAR_WITH_CUDA
  return calib_gpu::gpu_forward_factory();
#else
  throw Error("--device cuda: this spear was built without CUDA");
#endif
}

}  // namespace spear
