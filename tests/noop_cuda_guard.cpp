// A device guard for CUDA that does nothing, for a CPU-only PyTorch: indexing and other C++
// paths construct a guard for a tensor's device, which then exists for (fake) CUDA tensors.
// Used by the simulated-CUDA test tier (tests/simulated_cuda.py) only.
#include <c10/core/impl/DeviceGuardImplInterface.h>

C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::NoOpDeviceGuardImpl<c10::DeviceType::CUDA>);
