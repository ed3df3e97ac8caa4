// Included first by isa_x86_avx2.cpp and isa_x86_avx512.cpp after their GCC target
// pragma. In C++, GCC's target pragma changes code generation but not the feature macros;
// sleef.h declares its vector functions only under them, so they are set by hand.
#pragma once

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
// ATen builds with -Wno-psabi: the warning is about lambdas of its own vector headers.
#pragma GCC diagnostic ignored "-Wpsabi"
