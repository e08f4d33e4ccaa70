#include "runtime/device.h"

#include "core/error.h"
#ifdef SPEAR_WITH_CUDA
#include "gpu/gpu_model.h"
#endif

namespace spear {

Device parse_device(std::string_view s) {
  if (s == "cpu") return Device::Cpu;
  if (s == "cuda") return Device::Cuda;
  throw Error("--device must be cpu or cuda, got '" + std::string(s) + "'");
}

std::string_view device_name(Device d) { return d == Device::Cpu ? "cpu" : "cuda"; }

bool device_available(Device d, std::string* why) {
  if (d == Device::Cpu) return true;
#ifdef SPEAR_WITH_CUDA
  return cuda::cuda_available(why);
#else
  if (why) *why = "this spear was built without CUDA";
  return false;
#endif
}

}  // namespace spear
