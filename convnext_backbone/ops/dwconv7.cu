// ConvNeXt's depthwise 7x7 convolution (stride 1, padding 3, no bias) on NHWC tensors of a
// half-precision type, accumulated in fp32. Compiled at run time by NVRTC
// (convnext_backbone/ops/cuda_dwconv.py), one variant per set of these macros:
//   ELEM_BF16         1: the input is bfloat16; 0: float16
//   OUT_FP32          1: the output is fp32; 0: the input's type
//   RESIDUAL          0: none; 1: an fp32 tensor added to the fp32 sum; 2: one in the input's type
//   MIRROR_TAPS       1: the taps are used mirrored (the conv's input gradient)
//   GROUPS_PER_BLOCK  channel groups (of VEC channels) a thread block covers
// and these run-time parameters besides the tensors' sizes:
//   tile_rows         output rows a thread block covers (one strip of PIX pixels wide), at
//                     most MAX_TILE_ROWS; the block has GROUPS_PER_BLOCK * tile_rows threads
//
// A thread block first copies its input tile (tile_rows + 6 rows by PIX + 6 pixels by its
// channels) into shared memory with cp.async: every load of the tile in flight at once,
// pixels outside the image zero-filled (the padding). Its channels' taps are staged next
// to it, rounded to the input's type as autocast rounds the fp32 weight. Then each thread
// computes VEC channels of PIX neighbouring output pixels of one row: for each of the 7
// input rows it reads the PIX + 6 pixels once, and each value feeds up to 7 fused
// multiply-adds from registers.
//
// Measured on H100/H200 (.perf sweeps, README "Speed and memory"): this tiled form with 4
// channels, 8 pixels, up to 16 rows and 12 groups per block was the fastest; the same
// thread work reading its rows straight from global memory (through L1) took 8% longer in
// inference and 18% longer in training, with 8 channels per thread (221 registers) it was
// only on par with cuDNN, and 4/6/7/16 pixels, 128-512 threads, 2D tiles of strips, the
// next row prefetched into registers and the row loop unrolled were all slower.

typedef unsigned int u32;

#define TAPS 49
#define VEC 4
#define PIX 8

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

#define MAX_TILE_ROWS 16
#define TILE_COLS (PIX + 6)
#define ROW_STRIDE (TILE_COLS * GROUPS_PER_BLOCK + 4)  // in uint2; +32 B against bank conflicts
// The host computes the tile's shared memory as (tile_rows + 6) * ROW_STRIDE * 8 bytes
// (cuda_dwconv._tile_bytes).

__device__ __forceinline__ unsigned shared_address(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

extern "C" __global__ void __launch_bounds__(GROUPS_PER_BLOCK * MAX_TILE_ROWS)
dwconv7_nhwc(const uint2* __restrict__ x, const float* __restrict__ taps,
             const residual_t* __restrict__ residual, out_t* __restrict__ out,
             int images, int height, int width, int groups, int strips, int tile_rows) {
  __shared__ __align__(16) float tap_tile[TAPS][GROUPS_PER_BLOCK * VEC];
  // (tile_rows + 6) * ROW_STRIDE entries, sized at launch: small images keep more blocks
  // resident.
  extern __shared__ __align__(16) uint2 in_tile[];
  const int group_in_block = threadIdx.x % GROUPS_PER_BLOCK;
  const int row_in_block = threadIdx.x / GROUPS_PER_BLOCK;
  const int first_group = blockIdx.y * GROUPS_PER_BLOCK;
  // Blocks are (image, strip, row tile), the row tile varying fastest.
  const int row_tiles = (height + tile_rows - 1) / tile_rows;
  const int image = blockIdx.x / (strips * row_tiles);
  const int rest = blockIdx.x - image * strips * row_tiles;
  const int first_col = (rest / row_tiles) * PIX;
  const int first_row = (rest % row_tiles) * tile_rows;

  const uint2* image_x = x + (long long)image * height * width * groups + first_group;
  for (int e = threadIdx.x; e < (tile_rows + 6) * TILE_COLS * GROUPS_PER_BLOCK; e += blockDim.x) {
    const int g = e % GROUPS_PER_BLOCK, pix = e / GROUPS_PER_BLOCK;
    const int c = pix % TILE_COLS, r = pix / TILE_COLS;
    const int in_row = first_row - 3 + r, in_col = first_col - 3 + c;
    const bool inside = in_row >= 0 && in_row < height && in_col >= 0 && in_col < width;
    // src-size 0 writes zeros and reads nothing; the address is then any valid one.
    const uint2* src = inside ? image_x + ((long long)in_row * width + in_col) * groups + g : x;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::
                 "r"(shared_address(&in_tile[r * ROW_STRIDE + c * GROUPS_PER_BLOCK + g])),
                 "l"(src), "r"(inside ? 8 : 0));
  }
  asm volatile("cp.async.commit_group;\n" ::);
  const float* block_taps = taps + (long long)first_group * VEC * TAPS;
  for (int i = threadIdx.x; i < TAPS * GROUPS_PER_BLOCK * VEC; i += blockDim.x) {
    const int channel = i / TAPS, tap = i - channel * TAPS;
    tap_tile[MIRROR_TAPS ? TAPS - 1 - tap : tap][channel] = round_to_elem(block_taps[i]);
  }
  asm volatile("cp.async.wait_group 0;\n" ::);
  __syncthreads();

  const int out_row = first_row + row_in_block;
  if (out_row >= height) return;  // the last row tile's rows below the image
  const int group = first_group + group_in_block;
  float acc[PIX][VEC];
#pragma unroll
  for (int p = 0; p < PIX; ++p)
#pragma unroll
    for (int c = 0; c < VEC; ++c) acc[p][c] = 0.f;
#pragma unroll 1
  for (int kh = 0; kh < 7; ++kh) {
    float w[7][VEC];
#pragma unroll
    for (int kw = 0; kw < 7; ++kw) {
      const float4 t =
          *reinterpret_cast<const float4*>(&tap_tile[kh * 7 + kw][group_in_block * VEC]);
      w[kw][0] = t.x; w[kw][1] = t.y; w[kw][2] = t.z; w[kw][3] = t.w;
    }
    const uint2* row = in_tile + (row_in_block + kh) * ROW_STRIDE + group_in_block;
#pragma unroll
    for (int j = 0; j < TILE_COLS; ++j) {
      float f[VEC];
      unpack(row[j * GROUPS_PER_BLOCK], f);
#pragma unroll
      for (int kw = 0; kw < 7; ++kw) {
        const int p = j - kw;
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
