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
//   TENSOR_CORES      1: build the conv on the tensor cores (below) instead; with it
//                     RESIDUAL must be 0, COPY16 does not count and GROUPS_PER_BLOCK is
//                     twice the warps a block (8 channels each)
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

#if !WGRAD && !TENSOR_CORES
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
#endif  // !WGRAD && !TENSOR_CORES

#if TENSOR_CORES
// The same conv on the tensor cores (sm_80+), built with TENSOR_CORES=1. A thread block
// covers tiles of TC_TILE x TC_TILE output pixels of one image and TC_CHANNELS channels,
// a warp per 8 of them (GROUPS_PER_BLOCK is even). For one channel and tap row kh, a tile's
// sums are a product: out[r][n] += sum_k in[r + kh][n + k] w[kh][k] is D = A B with
// A[r][k'] = in[r + kh][k'] (16 rows by 16 input columns) and B[k'][n] = w[kh][k' - n]
// (zero outside 0..6), one mma.m16n8k16 per 8 output columns, products summed in fp32.
// The input tile is stored channel by channel (rows of TC_IN_COLS pixels), so that
// ldmatrix reads A from it: the fill loads each pixel's 8 channels (16 bytes, neighbouring
// threads on neighbouring bytes) and stores pixel pairs per channel. The band matrices'
// fragments come from a per-block table of tap pairs, built once: a block walks tiles with
// a grid stride. The sums go back through shared memory (pixel-major) so that the output
// stores are whole pixels' channels. No residual is added (RESIDUAL must be 0): with one,
// as the input gradient, it was only on par with the CUDA-core kernel.
#define TC_TILE 16
#define TC_IN_ROWS (TC_TILE + 6)
#define TC_IN_COLS 24                   // TC_TILE + 6 taps' reach, rounded up to 8 pixels
#define TC_ROW_BYTES (TC_IN_COLS * 2)   // 48: ldmatrix's 8 row addresses hit distinct banks
#define TC_CHANNEL_BYTES (TC_IN_ROWS * TC_ROW_BYTES)
#define TC_CHUNK_BYTES (8 * TC_CHANNEL_BYTES + 32)  // +32: the fill's chunks on other banks
#define TC_PAIRS 22                     // tap pairs per (channel, kh): k' - n + 7 in 0..21
#define TC_WARPS (GROUPS_PER_BLOCK / 2)
#define TC_CHANNELS (8 * TC_WARPS)
#define TC_HALF_BYTES (4 * TC_CHANNEL_BYTES)  // a warp's 4 channel tiles; later their sums
#define TC_TILE_BYTES (TC_WARPS * TC_CHUNK_BYTES)
// The host sizes shared memory as cuda_dwconv._tc_smem_bytes: TC_TILE_BYTES (the input
// tile, later the sums), then the tap-pair tables.

// Where a pixel's 4 fp32 sums go: 16 bytes a pixel, bit 0 flipped on odd 16-pixel rows so
// that the 8 pixels a quarter warp writes (rows g, g + 1) fall on distinct banks.
__device__ __forceinline__ int sum_offset(int pixel) {
  return (pixel ^ ((pixel >> 4) & 1)) * 16;
}

#if ELEM_BF16
#define MMA_ELEM "bf16"
#else
#define MMA_ELEM "f16"
#endif

// d += A B for one m16n8k16 tile: A's fragment in a0..a3, B's in b0, b1 (fp32 sums).
__device__ __forceinline__ void mma_16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3,
                                          u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_ELEM "." MMA_ELEM ".f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The A fragments of step kh * 4 + c: channel c's tile rows kh..kh+15 (ldmatrix x4: rows
// 0-7 | 8-15 by columns 0-7 | 8-15; x2: the same rows of columns 16-23).
__device__ __forceinline__ void load_a(u32 (&a)[6], unsigned a4, unsigned a2, int step) {
  const unsigned offset = (step % 4) * TC_CHANNEL_BYTES + (step / 4) * TC_ROW_BYTES;
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(a4 + offset));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(a[4]), "=r"(a[5]) : "r"(a2 + offset));
}

#if RESIDUAL
#error "the tensor-core conv adds no residual (on par with the CUDA-core kernel there)"
#endif
extern "C" __global__ void __launch_bounds__(32 * TC_WARPS, 16 / TC_WARPS)
dwconv7_nhwc_tc(const uint4* __restrict__ x, const float* __restrict__ taps,
                out_t* __restrict__ out, int images, int height, int width, int chunks,
                int row_tiles, int col_tiles) {
  extern __shared__ __align__(16) unsigned char tc_smem[];
  u32* pairs = reinterpret_cast<u32*>(tc_smem + TC_TILE_BYTES);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int first_chunk = blockIdx.y * TC_WARPS;  // chunks of 8 channels
  const int channels = chunks * 8;

  // Tap pairs: pairs[(c * 7 + kh) * TC_PAIRS + e] = (w[kh][e - 7], w[kh][e - 6]), each
  // rounded to the input's type (as autocast rounds the weight), zero outside 0..6.
  const float* block_taps = taps + first_chunk * 8 * TAPS;
  for (int i = threadIdx.x; i < TC_CHANNELS * 7 * TC_PAIRS; i += blockDim.x) {
    const int c = i / (7 * TC_PAIRS), rest = i - c * (7 * TC_PAIRS);
    const int kh = rest / TC_PAIRS, d = rest - kh * TC_PAIRS - 7;
    float v[2];
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int kw = d + s;
      const int tap = MIRROR_TAPS ? TAPS - 1 - (kh * 7 + kw) : kh * 7 + kw;
      v[s] = (kw >= 0 && kw < 7) ? block_taps[c * TAPS + tap] : 0.f;
    }
    pairs[i] = pack_rounded(v[0], v[1]);
  }

  const int g = lane / 4, q = lane % 4;  // the mma fragments' row and column pair
  // ldmatrix row addresses: x4 gives the 8x8 blocks (rows 0-7 | 8-15) x (columns 0-7 | 8-15),
  // x2 the rows 0-7 | 8-15 of columns 16-23.
  const int a_row = (lane & 7) + 8 * ((lane >> 3) & 1);
  const unsigned warp_tile = shared_address(tc_smem) + warp * TC_CHUNK_BYTES;
  const unsigned a4 = warp_tile + a_row * TC_ROW_BYTES + (lane >> 4) * 16;
  const unsigned a2 = warp_tile + a_row * TC_ROW_BYTES + 32;
  const u32* my_pairs = pairs + warp * 8 * 7 * TC_PAIRS + 2 * q - g + 7;
  const int tiles_per_image = row_tiles * col_tiles;
  const int tiles = images * tiles_per_image;

#pragma unroll 1
  for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int image = t / tiles_per_image, rest = t - image * tiles_per_image;
    const int first_row = (rest / col_tiles) * TC_TILE, first_col = (rest % col_tiles) * TC_TILE;
    __syncthreads();  // the last tile's sums are stored (and the pairs are built)
    // Fill: a unit is two neighbouring pixels' 8 channels (16 bytes each), the block's
    // chunks varying fastest across threads (whole pixels' channels per load), stored as
    // one 4-byte pixel pair per channel. Loads are issued a batch at a time.
    constexpr int UNITS = TC_WARPS * TC_IN_ROWS * (TC_IN_COLS / 2);
    constexpr int PER_THREAD = (UNITS + 32 * TC_WARPS - 1) / (32 * TC_WARPS);
    constexpr int BATCH = 5;
#pragma unroll
    for (int b0 = 0; b0 < PER_THREAD; b0 += BATCH) {
      uint4 v[BATCH][2];
      int where[BATCH];
#pragma unroll
      for (int b = 0; b < BATCH; ++b) {
        const int u = threadIdx.x + (b0 + b) * 32 * TC_WARPS;
        const int chunk = u % TC_WARPS, pixel_pair = u / TC_WARPS;
        const int row = pixel_pair / (TC_IN_COLS / 2), pair = pixel_pair % (TC_IN_COLS / 2);
        where[b] = (b0 + b < PER_THREAD && u < UNITS)
                       ? chunk * TC_CHUNK_BYTES + row * TC_ROW_BYTES + pair * 4 : -1;
        const int in_row = first_row - 3 + row, in_col = first_col - 3 + 2 * pair;
        const bool row_inside = where[b] >= 0 && (unsigned)in_row < (unsigned)height;
        const int base = ((image * height + in_row) * width + in_col) * chunks + first_chunk +
                         chunk;
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          const bool inside = row_inside && (unsigned)(in_col + s) < (unsigned)width;
          v[b][s] = inside ? __ldg(x + base + s * chunks) : make_uint4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int b = 0; b < BATCH; ++b) {
        if (where[b] < 0) continue;
        unsigned char* dst = tc_smem + where[b];
        const u32 p0[4] = {v[b][0].x, v[b][0].y, v[b][0].z, v[b][0].w};
        const u32 p1[4] = {v[b][1].x, v[b][1].y, v[b][1].z, v[b][1].w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          *reinterpret_cast<u32*>(dst + (2 * i) * TC_CHANNEL_BYTES) =
              __byte_perm(p0[i], p1[i], 0x5410);
          *reinterpret_cast<u32*>(dst + (2 * i + 1) * TC_CHANNEL_BYTES) =
              __byte_perm(p0[i], p1[i], 0x7632);
        }
      }
    }
    __syncthreads();
    // Two halves of 4 channels (32 sums live, not 64). Channels innermost: consecutive
    // products go to different sums, and the A fragments are loaded one step ahead.
#pragma unroll 1
    for (int half = 0; half < 2; ++half) {
      float acc[4][2][4];
#pragma unroll
      for (int c = 0; c < 4; ++c)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[c][j][e] = 0.f;
      const unsigned half_a4 = a4 + half * 4 * TC_CHANNEL_BYTES;
      const unsigned half_a2 = a2 + half * 4 * TC_CHANNEL_BYTES;
      const u32* half_pairs = my_pairs + half * 4 * 7 * TC_PAIRS;
      u32 a[2][6];
      load_a(a[0], half_a4, half_a2, 0);
#pragma unroll 1
      for (int kh = 0; kh < 7; ++kh) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int next = kh * 4 + c + 1;  // (kh, c) flattened, one ahead
          if (next < 28) load_a(a[(c + 1) & 1], half_a4, half_a2, next);
          const u32 b0 = half_pairs[(c * 7 + kh) * TC_PAIRS];
          const u32 b1 = half_pairs[(c * 7 + kh) * TC_PAIRS + 8];
          const u32(&t)[6] = a[c & 1];
          mma_16816(acc[c][0], t[0], t[1], t[2], t[3], b0, b1);
          mma_16816(acc[c][1], t[2], t[3], t[4], t[5], b0, b1);
        }
      }
      // The sums replace the half's 4 channel tiles, which only this warp reads:
      // acc[c][j][e] is pixel (g + 8 (e / 2), 8 j + 2 q + e % 2) of channel 4 half + c.
      __syncwarp();
      unsigned char* half_sums = tc_smem + warp * TC_CHUNK_BYTES + half * TC_HALF_BYTES;
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int pixel = (g + 8 * (e / 2)) * TC_TILE + 8 * j + 2 * q + e % 2;
          *reinterpret_cast<float4*>(half_sums + sum_offset(pixel)) =
              make_float4(acc[0][j][e], acc[1][j][e], acc[2][j][e], acc[3][j][e]);
        }
    }
    __syncthreads();
    // Stores: a thread per (pixel, chunk of 8 channels), the chunks varying fastest, a
    // batch of sums loaded at a time.
    constexpr int OUT_PER_THREAD = TC_TILE * TC_TILE / 32;  // 8
    constexpr int OUT_BATCH = 4;
#pragma unroll
    for (int o0 = 0; o0 < OUT_PER_THREAD; o0 += OUT_BATCH) {
      float4 s[OUT_BATCH][2];
      int at[OUT_BATCH];
#pragma unroll
      for (int k = 0; k < OUT_BATCH; ++k) {
        const int u = threadIdx.x + (o0 + k) * 32 * TC_WARPS;
        const int chunk = u % TC_WARPS, pixel = u / TC_WARPS;
        const int row = first_row + pixel / TC_TILE, col = first_col + pixel % TC_TILE;
        at[k] = row < height && col < width
                    ? ((image * height + row) * width + col) * channels + (first_chunk + chunk) * 8
                    : -1;
        const unsigned char* chunk_sums = tc_smem + chunk * TC_CHUNK_BYTES + sum_offset(pixel);
        s[k][0] = *reinterpret_cast<const float4*>(chunk_sums);
        s[k][1] = *reinterpret_cast<const float4*>(chunk_sums + TC_HALF_BYTES);
      }
#pragma unroll
      for (int k = 0; k < OUT_BATCH; ++k) {
        if (at[k] < 0) continue;
#if OUT_FP32
        float4* o = reinterpret_cast<float4*>(out + at[k]);
        o[0] = s[k][0];
        o[1] = s[k][1];
#else
        *reinterpret_cast<uint4*>(out + at[k]) =
            make_uint4(pack_rounded(s[k][0].x, s[k][0].y), pack_rounded(s[k][0].z, s[k][0].w),
                       pack_rounded(s[k][1].x, s[k][1].y), pack_rounded(s[k][1].z, s[k][1].w));
#endif
      }
    }
  }
}
#endif  // TENSOR_CORES

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
