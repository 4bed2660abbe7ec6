// CPU kernels compiled for AVX2 + FMA + F16C (x86-64 only), used when the CPU has them
// (runtime check in cpu.cpp). setup.py's flags apply to every file, so the ISA is chosen here with
// a target pragma. Headers that are not ISA-specific are included BEFORE the pragma so their
// inline functions are compiled for the baseline ISA: only the code below the pragma (ATen's
// Vectorized AVX2 specializations, in namespace at::vec::AVX2, and our kernels, in their own
// namespaces) uses AVX2, and no symbol the generic path might link to is an AVX2 build.
#if defined(__x86_64__) || defined(_M_X64)

#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_work.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// The pragma enables the instructions but does not define the ISA macros that headers test
// (sleef.h declares its 8-wide functions only #ifdef __AVX__): define them for what follows.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define HIFT_CPU_ISA avx2
#define HIFT_UPDATE_NS cpu_avx2
#include "cpu_kernels.h"
#pragma GCC pop_options

#endif
