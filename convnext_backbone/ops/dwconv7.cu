// ConvNeXt's depthwise 7x7 convolution (stride 1, padding 3, no bias) on NHWC tensors of a
// half-precision type, accumulated in fp32. Compiled at run time by NVRTC
// (convnext_backbone/ops/cuda_dwconv.py), one variant per set of these macros:
//   ELEM_BF16         1: the input is bfloat16; 0: float16
//   OUT_FP32          1: the output is fp32; 0: the input's type
//   RESIDUAL          0: none; 1: an fp32 tensor added to the fp32 sum; 2: one in the input's type
//   MIRROR_TAPS       1: the taps are used mirrored (the conv's input gradient)
//   GROUPS_PER_BLOCK  channel groups (of VEC channels) a thread block covers
//   COPY16            1: tiles are copied 16 bytes (two groups) at a time; needs an even
//                     GROUPS_PER_BLOCK and 16-byte aligned tensors. 0: 8 bytes
//   WGRAD             1: build the weight-gradient kernel (below) instead of the conv;
//                     with it only ELEM_BF16, GROUPS_PER_BLOCK, COPY16 and TILE_W count
// and these run-time parameters besides the tensors' sizes:
//   tile_rows         output rows a thread block covers (one strip of PIX pixels wide), at
//                     most MAX_TILE_ROWS; the block has GROUPS_PER_BLOCK * tile_rows threads
//
// A thread block first copies its input tile (tile_rows + 6 rows by PIX + 6 pixels by its
// channels) into shared memory with cp.async: every load of the tile in flight at once,
// pixels outside the image zero-filled (the padding). Its channels' taps come in the same
// copy and are then rounded to the input's type (as autocast rounds the fp32 weight) and
// transposed in shared memory. Then each thread computes VEC channels of PIX neighbouring
// output pixels of one row: for each of the 7 input rows it reads the PIX + 6 pixels once,
// and each value feeds up to 7 fused multiply-adds from registers.
//
// Measured on H100/H200 (.perf sweeps, README "Speed and memory"): this tiled form with 4
// channels, 8 pixels and 12 groups per block was the fastest, with up to 16 rows until the
// copies were made cheaper and up to 32 since (6% faster then); the same thread work
// reading its rows straight from global memory (through L1) took 8% longer in inference
// and 18% longer in training, with 8 channels per thread (221 registers) it was only on
// par with cuDNN, and 4/6/7/16 pixels, 128-512 threads, 2D tiles of strips, the next row
// prefetched into registers and the row loop unrolled were all slower.

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

#define MAX_TILE_ROWS 32
#define TILE_COLS (PIX + 6)
#define ROW_STRIDE (TILE_COLS * GROUPS_PER_BLOCK + 4)  // in uint2; +32 B against bank conflicts
// The host computes the tile's shared memory as (tile_rows + 6) * ROW_STRIDE * 8 bytes
// (cuda_dwconv._tile_bytes).

__device__ __forceinline__ unsigned shared_address(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

#if COPY16
#define COPY_GROUPS 2
#else
#define COPY_GROUPS 1
#endif

// Copies a window of `rows` x COLS pixels, from pixel (first_row, first_col) of the image
// whose group 0 of this block is at t + image_base, into shared memory with cp.async:
// pixel (r, c)'s groups at dst[r * stride + c * GROUPS_PER_BLOCK], zeros outside the image
// (the padding). All of the block's threads take part (blockDim.x is a multiple of the
// copies per pixel); a thread keeps one part of a pixel's groups and walks the pixels, so
// its loop does one constant division and no 64-bit arithmetic (the tensors have fewer
// than 2^31 elements) per copy.
template <int COLS>
__device__ __forceinline__ void copy_window(const uint2* __restrict__ t, int image_base,
                                            int first_row, int first_col, int rows,
                                            int height, int width, int groups, uint2* dst,
                                            int stride) {
  constexpr int copies_per_pixel = GROUPS_PER_BLOCK / COPY_GROUPS;
  const int part = (threadIdx.x % copies_per_pixel) * COPY_GROUPS;
  const int pixel_step = blockDim.x / copies_per_pixel;
  const uint2* part_base = t + image_base + part;
  const unsigned dst_base = shared_address(dst + part);
  for (int pix = threadIdx.x / copies_per_pixel; pix < rows * COLS; pix += pixel_step) {
    const int r = pix / COLS, c = pix - r * COLS;
    const int row = first_row + r, col = first_col + c;
    const bool inside = (unsigned)row < (unsigned)height && (unsigned)col < (unsigned)width;
    // src-size 0 writes zeros and reads nothing; the address is then any valid one.
    const uint2* src = inside ? part_base + (row * width + col) * groups : t;
    const unsigned to = dst_base + (r * stride + c * GROUPS_PER_BLOCK) * 8;
#if COPY16
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::
                 "r"(to), "l"(src), "r"(inside ? 16 : 0));
#else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::
                 "r"(to), "l"(src), "r"(inside ? 8 : 0));
#endif
  }
}

#if !WGRAD
extern "C" __global__ void __launch_bounds__(GROUPS_PER_BLOCK * MAX_TILE_ROWS)
dwconv7_nhwc(const uint2* __restrict__ x, const float* __restrict__ taps,
             const residual_t* __restrict__ residual, out_t* __restrict__ out,
             int images, int height, int width, int groups, int strips, int tile_rows) {
  __shared__ __align__(16) float tap_tile[TAPS][GROUPS_PER_BLOCK * VEC];
  __shared__ __align__(16) float raw_taps[GROUPS_PER_BLOCK * VEC * TAPS];
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

  copy_window<TILE_COLS>(x, image * height * width * groups + first_group, first_row - 3,
                         first_col - 3, tile_rows + 6, height, width, groups, in_tile,
                         ROW_STRIDE);
  // The block's taps as stored, (channel, tap) fp32, 16-byte aligned (the host's check),
  // copied with the tile; then rounded and transposed to (tap, channel) from shared memory.
  // Loading them through registers put a global load's latency before every block's sums
  // (0.23 of 1.55 ms in a 128x224^2 inference step's convs).
  const float* block_taps = taps + first_group * VEC * TAPS;
  for (int i = threadIdx.x; i < GROUPS_PER_BLOCK * TAPS; i += blockDim.x)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::
                 "r"(shared_address(&raw_taps[4 * i])), "l"(block_taps + 4 * i));
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_group 0;\n" ::);
  __syncthreads();
  // Consecutive threads take consecutive channels of one tap: no bank conflicts either way
  // (the raw rows are 49 floats apart).
  for (int i = threadIdx.x; i < TAPS * GROUPS_PER_BLOCK * VEC; i += blockDim.x) {
    const int tap = i / (GROUPS_PER_BLOCK * VEC), channel = i - tap * (GROUPS_PER_BLOCK * VEC);
    tap_tile[MIRROR_TAPS ? TAPS - 1 - tap : tap][channel] =
        round_to_elem(raw_taps[channel * TAPS + tap]);
  }
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
#endif  // !WGRAD

#if WGRAD
// The weight gradient: dtaps[c][kh * 7 + kw] = sum over n, h, w of
// x[n][h + kh - 3][w + kw - 3][c] * dy[n][h][w][c], accumulated in fp32.
//   TILE_W            output columns of a tile (the inner loop is unrolled over them)
// and the run-time parameters:
//   tile_rows         output rows of a tile, at most WG_MAX_ROWS
//   tiles_per_chunk   consecutive tiles a thread block sums (its chunk)
// Tiles are (image, strip of TILE_W columns, band of tile_rows rows), the band varying
// fastest, so that a block's next tile shares 6 rows of x with its last one (in L2). A block
// copies a tile of dy (tile_rows x TILE_W pixels) and of x (6 rows and columns more: the
// taps' reach, zeros outside the image) into shared memory with cp.async, the next tile's
// copy in flight while the current one is summed. Thread (g, kh, r) owns VEC channels of
// one tap row and one output row of the tile: it walks the x row once, each x value
// meeting the 7 dy values it multiplies (a sliding window in registers) in 28 fused
// multiply-adds into its 7 x VEC sums. At the end the block adds its rows' sums and writes
// one partial (C, 49) slice per chunk; the caller sums the chunks (no atomics: the result
// does not depend on scheduling).
// Measured on an H100 (bf16, .perf sweeps, README "Speed and memory"): 4 groups a block
// were the fastest of 2/4/8 groups, and 3-6 blocks per SM within 2% of each other (4
// kept; 9 and 12 slower). Summed over ConvNeXt-T's blocks it takes 1.80 ms for a
// 32x512^2 training step (cuDNN: 2.41) and 0.76 ms for a 2x800x1333 detection step
// (cuDNN: 1.88; its kernels are poor there: 0.344 ms at 2x96x200x336, ours 0.079); its
// fp32 result is 1e-7 from fp64, cuDNN's bf16 one 1.7e-3.
#define WG_MAX_ROWS 8
#define WG_X_COLS (TILE_W + 6)
// Row strides in uint2, padded to GROUPS_PER_BLOCK modulo 16 (128 bytes): the tap rows a
// warp reads at once fall into different shared-memory banks.
#define WG_PAD(n) ((n) + ((GROUPS_PER_BLOCK - (n)) & 15))
#define WG_X_STRIDE WG_PAD(WG_X_COLS * GROUPS_PER_BLOCK)
#define WG_DY_STRIDE WG_PAD(TILE_W * GROUPS_PER_BLOCK)
// The host sizes shared memory as cuda_dwconv._wgrad_smem_bytes does: two buffers of
// (tile_rows + 6) * WG_X_STRIDE + tile_rows * WG_DY_STRIDE uint2, or the final sums'
// tile_rows * 7 * GROUPS_PER_BLOCK * 7 * VEC floats if that is more.

__device__ __forceinline__ void wgrad_load_tile(
    const uint2* __restrict__ x, const uint2* __restrict__ dy, uint2* buf, int tile,
    int first_group, int height, int width, int groups, int strips, int tile_rows) {
  const int row_tiles = (height + tile_rows - 1) / tile_rows;
  const int image = tile / (strips * row_tiles);
  const int rest = tile - image * strips * row_tiles;
  const int first_col = (rest / row_tiles) * TILE_W;
  const int first_row = (rest % row_tiles) * tile_rows;
  const int image_base = image * height * width * groups + first_group;
  copy_window<WG_X_COLS>(x, image_base, first_row - 3, first_col - 3, tile_rows + 6, height,
                         width, groups, buf, WG_X_STRIDE);
  copy_window<TILE_W>(dy, image_base, first_row, first_col, tile_rows, height, width, groups,
                      buf + (tile_rows + 6) * WG_X_STRIDE, WG_DY_STRIDE);
  asm volatile("cp.async.commit_group;\n" ::);
}

extern "C" __global__ void __launch_bounds__(GROUPS_PER_BLOCK * 7 * WG_MAX_ROWS, 1)
dwconv7_wgrad_nhwc(const uint2* __restrict__ x, const uint2* __restrict__ dy,
                   float* __restrict__ partial, int images, int height, int width, int groups,
                   int strips, int tile_rows, int tiles_per_chunk) {
  extern __shared__ __align__(16) uint2 wg_smem[];
  const int g = threadIdx.x % GROUPS_PER_BLOCK;
  const int kh = (threadIdx.x / GROUPS_PER_BLOCK) % 7;
  const int r = threadIdx.x / (GROUPS_PER_BLOCK * 7);
  const int first_group = blockIdx.y * GROUPS_PER_BLOCK;
  const int row_tiles = (height + tile_rows - 1) / tile_rows;
  const int tiles = images * strips * row_tiles;
  const int first_tile = blockIdx.x * tiles_per_chunk;
  const int end_tile = min(first_tile + tiles_per_chunk, tiles);
  const int buf_len = (tile_rows + 6) * WG_X_STRIDE + tile_rows * WG_DY_STRIDE;

  float acc[7][VEC];
#pragma unroll
  for (int kw = 0; kw < 7; ++kw)
#pragma unroll
    for (int c = 0; c < VEC; ++c) acc[kw][c] = 0.f;

  if (first_tile < end_tile)
    wgrad_load_tile(x, dy, wg_smem, first_tile, first_group, height, width, groups, strips,
                    tile_rows);
#pragma unroll 1
  for (int t = first_tile; t < end_tile; ++t) {
    const uint2* buf = wg_smem + ((t - first_tile) & 1) * buf_len;
    if (t + 1 < end_tile) {
      wgrad_load_tile(x, dy, wg_smem + ((t + 1 - first_tile) & 1) * buf_len, t + 1,
                      first_group, height, width, groups, strips, tile_rows);
      asm volatile("cp.async.wait_group 1;\n" ::);
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::);
    }
    __syncthreads();
    const uint2* x_row = buf + (r + kh) * WG_X_STRIDE + g;
    const uint2* dy_row = buf + (tile_rows + 6) * WG_X_STRIDE + r * WG_DY_STRIDE + g;
    float d[TILE_W][VEC];  // only the last 7 are live at any column
#pragma unroll
    for (int j = 0; j < WG_X_COLS; ++j) {
      if (j < TILE_W) unpack(dy_row[j * GROUPS_PER_BLOCK], d[j]);
      float f[VEC];
      unpack(x_row[j * GROUPS_PER_BLOCK], f);
#pragma unroll
      for (int kw = 0; kw < 7; ++kw) {
        const int p = j - kw;  // the output column that x column j meets at tap kw
        if (p >= 0 && p < TILE_W) {
#pragma unroll
          for (int c = 0; c < VEC; ++c) acc[kw][c] = fmaf(f[c], d[p][c], acc[kw][c]);
        }
      }
    }
    __syncthreads();  // the buffer is refilled by the next iteration's copy
  }

  // Sum the block's rows: thread sums to shared memory, then one thread per (channel, tap).
  float* sums = reinterpret_cast<float*>(wg_smem);
  float* mine = sums + ((r * 7 + kh) * GROUPS_PER_BLOCK + g) * (7 * VEC);
#pragma unroll
  for (int kw = 0; kw < 7; ++kw)
#pragma unroll
    for (int c = 0; c < VEC; ++c) mine[kw * VEC + c] = acc[kw][c];
  __syncthreads();
  const int channels = groups * VEC;
  float* out = partial + (long long)blockIdx.x * channels * TAPS +
               (long long)first_group * VEC * TAPS;
  for (int e = threadIdx.x; e < GROUPS_PER_BLOCK * VEC * TAPS; e += blockDim.x) {
    const int channel = e / TAPS, tap = e - channel * TAPS;
    const int tap_row = tap / 7, tap_col = tap - tap_row * 7;
    const int gg = channel / VEC, c = channel - gg * VEC;
    float s = 0.f;
    for (int rr = 0; rr < tile_rows; ++rr)
      s += sums[((rr * 7 + tap_row) * GROUPS_PER_BLOCK + gg) * (7 * VEC) + tap_col * VEC + c];
    out[e] = s;
  }
}
#endif  // WGRAD
