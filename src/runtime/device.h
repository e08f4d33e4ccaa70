#pragma once
// Where a model runs, parsed once at the command line's edge.
#include <string>
#include <string_view>

namespace spear {

enum class Device { Cpu, Cuda };

// "cpu" | "cuda"; throws spear::Error naming the accepted values otherwise.
Device parse_device(std::string_view s);
std::string_view device_name(Device d);
// Whether this build has the device and it is usable here; `why` says what is missing.
bool device_available(Device d, std::string* why = nullptr);

}  // namespace spear
