// CPU kernels for any CPU (baseline compiler flags). See cpu_kernels.h.
#define HIFT_CPU_ISA generic
#define HIFT_UPDATE_NS cpu_generic
#include "cpu_kernels.h"
