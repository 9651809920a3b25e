// The CUDA library's own entry points: its ABI version and the text of its error codes.
#include <cuda_runtime.h>
#include <stdint.h>

#include "pyquant/capi.h"

extern "C" {

int32_t pq_abi_version(void) { return PQ_ABI_VERSION; }

const char* pq_cuda_error_string(int32_t error) { return cudaGetErrorString((cudaError_t)error); }

}  // extern "C"
