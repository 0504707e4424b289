// ConvNeXt's depthwise 7x7 convolution (stride 1, padding 3, no bias) on NHWC tensors of a
// half-precision type, accumulated in fp32. Compiled at run time by NVRTC
// (convnext_backbone/ops/cuda_dwconv.py), one variant per set of these macros:
//   ELEM_BF16         1: the input is bfloat16; 0: float16
//   OUT_FP32          1: the output is fp32; 0: the input's type
//   RESIDUAL          0: none; 1: an fp32 tensor added to the fp32 sum; 2: one in the input's type
//   MIRROR_TAPS       1: the taps are used mirrored (the conv's input gradient)
//   GROUPS_PER_BLOCK  channel groups (of VEC channels) a thread block covers
//   ROWS_PER_BLOCK    strips a thread block covers per channel group
//
// Each thread owns VEC channels (one 8-byte load) and a strip of PIX neighbouring output
// pixels of one row. For each of the 7 input rows it loads the PIX + 6 pixels once, and each
// loaded value feeds up to 7 fused multiply-adds from registers. The block stages its
// channels' taps in shared memory once, rounded to the input's type as autocast rounds the
// fp32 weight. A block's threads take consecutive output rows of one strip, so the input
// rows they share are read from L1.
//
// Measured on an H200 (.perf sweep, README "Speed"): 4 channels and 8 pixels per thread,
// 256 threads and at most 128 registers (2 blocks per multiprocessor) was the fastest of
// 8 or 4 channels, 4, 7, 8 or 16 pixels, 128 to 512 threads, 2D tiles of strips, the next
// row prefetched into registers, and the row loop unrolled.

typedef unsigned int u32;

#define TAPS 49
#define VEC 4
#define PIX 8
#define MIN_BLOCKS_PER_SM 2

#if RESIDUAL == 1
typedef float residual_t;
#else
typedef unsigned short residual_t;  // raw half-precision bits (unused when RESIDUAL == 0)
#endif
#if OUT_FP32
typedef float out_t;
#else
typedef unsigned short out_t;
#endif

__device__ __forceinline__ void lo_hi_to_float(u32 v, float& lo, float& hi) {
#if ELEM_BF16
  lo = __uint_as_float(v << 16);
  hi = __uint_as_float(v & 0xffff0000u);
#else
  const unsigned short l = (unsigned short)(v & 0xffffu), h = (unsigned short)(v >> 16);
  asm("cvt.f32.f16 %0, %1;" : "=f"(lo) : "h"(l));
  asm("cvt.f32.f16 %0, %1;" : "=f"(hi) : "h"(h));
#endif
}

__device__ __forceinline__ u32 pack_rounded(float lo, float hi) {
  u32 r;
#if ELEM_BF16
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
  return r;
}

__device__ __forceinline__ float round_to_elem(float v) {
  float lo, hi;
  lo_hi_to_float(pack_rounded(v, 0.f), lo, hi);
  return lo;
}

__device__ __forceinline__ void unpack(const uint2 v, float (&f)[VEC]) {
  lo_hi_to_float(v.x, f[0], f[1]);
  lo_hi_to_float(v.y, f[2], f[3]);
}

extern "C" __global__ void __launch_bounds__(GROUPS_PER_BLOCK * ROWS_PER_BLOCK, MIN_BLOCKS_PER_SM)
dwconv7_nhwc(const uint2* __restrict__ x, const float* __restrict__ taps,
             const residual_t* __restrict__ residual, out_t* __restrict__ out,
             int images, int height, int width, int groups, int strips) {
  __shared__ __align__(16) float tap_tile[TAPS][GROUPS_PER_BLOCK * VEC];
  const int group_in_block = threadIdx.x % GROUPS_PER_BLOCK;
  const int row_in_block = threadIdx.x / GROUPS_PER_BLOCK;
  const int first_group = blockIdx.y * GROUPS_PER_BLOCK;

  // taps: (C, 49) fp32, row-major; read along the taps so the loads coalesce.
  const float* block_taps = taps + (long long)first_group * VEC * TAPS;
  for (int i = threadIdx.x; i < TAPS * GROUPS_PER_BLOCK * VEC; i += blockDim.x) {
    const int channel = i / TAPS, tap = i - channel * TAPS;
    tap_tile[MIRROR_TAPS ? TAPS - 1 - tap : tap][channel] = round_to_elem(block_taps[i]);
  }
  __syncthreads();

  // Work items are (image, strip, output row), the row varying fastest.
  const long long item = (long long)blockIdx.x * ROWS_PER_BLOCK + row_in_block;
  if (item >= (long long)images * strips * height) return;
  const int out_row = (int)(item % height);
  const long long image_strip = item / height;
  const int first_col = (int)(image_strip % strips) * PIX;
  const int image = (int)(image_strip / strips);
  const int group = first_group + group_in_block;

  float acc[PIX][VEC];
#pragma unroll
  for (int p = 0; p < PIX; ++p)
#pragma unroll
    for (int c = 0; c < VEC; ++c) acc[p][c] = 0.f;

#pragma unroll 1
  for (int kh = 0; kh < 7; ++kh) {
    const int in_row = out_row + kh - 3;
    if (in_row < 0 || in_row >= height) continue;
    float w[7][VEC];
#pragma unroll
    for (int kw = 0; kw < 7; ++kw) {
      const float4 t = *reinterpret_cast<const float4*>(&tap_tile[kh * 7 + kw][group_in_block * VEC]);
      w[kw][0] = t.x; w[kw][1] = t.y; w[kw][2] = t.z; w[kw][3] = t.w;
    }
    const uint2* row = x + ((long long)image * height + in_row) * width * groups + group;
#pragma unroll
    for (int j = 0; j < PIX + 6; ++j) {
      const int in_col = first_col - 3 + j;
      uint2 v = make_uint2(0u, 0u);
      if (in_col >= 0 && in_col < width) v = __ldg(row + (long long)in_col * groups);
      float f[VEC];
      unpack(v, f);
#pragma unroll
      for (int kw = 0; kw < 7; ++kw) {
        const int p = j - kw;  // the output pixel this input pixel meets through tap kw
        if (p >= 0 && p < PIX) {
#pragma unroll
          for (int c = 0; c < VEC; ++c) acc[p][c] = fmaf(w[kw][c], f[c], acc[p][c]);
        }
      }
    }
  }

  const long long channels = (long long)groups * VEC;
  const long long row_base =
      (((long long)image * height + out_row) * width) * channels + (long long)group * VEC;
#pragma unroll
  for (int p = 0; p < PIX; ++p) {
    const int col = first_col + p;
    if (col >= width) break;
    const long long at = row_base + (long long)col * channels;
#if RESIDUAL == 1
    const float4 r = __ldg(reinterpret_cast<const float4*>(residual + at));
    acc[p][0] += r.x; acc[p][1] += r.y; acc[p][2] += r.z; acc[p][3] += r.w;
#elif RESIDUAL == 2
    float r[VEC];
    unpack(__ldg(reinterpret_cast<const uint2*>(residual + at)), r);
#pragma unroll
    for (int c = 0; c < VEC; ++c) acc[p][c] += r[c];
#endif
#if OUT_FP32
    *reinterpret_cast<float4*>(out + at) = make_float4(acc[p][0], acc[p][1], acc[p][2], acc[p][3]);
#else
    *reinterpret_cast<uint2*>(out + at) =
        make_uint2(pack_rounded(acc[p][0], acc[p][1]), pack_rounded(acc[p][2], acc[p][3]));
#endif
  }
}
