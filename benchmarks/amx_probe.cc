// Probe (not part of the library): would AMX's bf16 tiles run the LSTM step's product faster than the fp32
// AVX-512 tile of jaxseq/native/lstm_cpu.cc, and how accurate would they be? AMX multiplies bf16 (8-bit mantissa)
// and accumulates in fp32, so fp32 operands are split, x = hi + lo (+ lo2), each part bf16:
//   bf16x1: A_hi W_hi; bf16x3: + A_hi W_lo + A_lo W_hi; bf16x6: + A_hi W_lo2 + A_lo W_lo + A_lo2 W_hi.
// One thread. Product: A [M, K] (a step's [x_t, h_{t-1}]) times W [K, N] (N = 4H), as in the forward step.
// Prints each variant's error against a float64 product, then its time against the fp32 tile's (best of `secs`).
//
//   g++ -O3 -march=native -mamx-tile -mamx-bf16 -o /tmp/amx_probe benchmarks/amx_probe.cc
//   /tmp/amx_probe 64 456 1024 0.7      # M K N seconds: the step of (64, 34, 200, 256); also 128 768 2048
// Needs a CPU with AMX-BF16 (Sapphire Rapids or later) and Linux >= 5.16 (the tile-data permission).
// Results and what they mean for the fast LSTM: benchmarks/RESULTS.md, "AMX bf16 splits, measured".
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef uint16_t bf16;

static bf16 to_bf16(float x) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<bf16>(u >> 16);
}
static float from_bf16(bf16 h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Writes x's parts at `at` in each of out's matrices: hi = bf16(x), lo = bf16(x - hi), lo2 = bf16(x - hi - lo).
static void Split(float x, std::vector<std::vector<bf16>>& out, size_t at) {
  for (auto& part : out) {
    const bf16 h = to_bf16(x);
    part[at] = h;
    x -= from_bf16(h);
  }
}

// Splits [M, K] fp32 into `parts` bf16 matrices by 16x32 tiles, [M/16][Kp/32][16][32] (Kp = K padded to 32,
// zeros), so that a tile load reads 1 KiB in a row (1.35x faster than row-major A).
static void SplitRows(const float* a, int M, int K, int Kp, int parts, std::vector<std::vector<bf16>>& out) {
  out.assign(parts, std::vector<bf16>(static_cast<size_t>(M) * Kp, 0));
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < K; ++k)
      Split(a[m * K + k], out, ((static_cast<size_t>(m / 16) * (Kp / 32) + k / 32) * 16 + m % 16) * 32 + k % 32);
}

// Splits W [K, N] into `parts` VNNI-packed bf16 matrices [N/16][Kp/2][16][2].
static void SplitPackW(const float* w, int K, int N, int Kp, int parts, std::vector<std::vector<bf16>>& out) {
  out.assign(parts, std::vector<bf16>(static_cast<size_t>(Kp) * N, 0));
  for (int k = 0; k < K; ++k)
    for (int n = 0; n < N; ++n)
      Split(w[k * N + n], out, ((static_cast<size_t>(n / 16) * (Kp / 2) + k / 2) * 16 + n % 16) * 2 + k % 2);
}

// The pairs (i, j) of parts whose products are kept: bf16x1: (0,0); x3: + (0,1) (1,0); x6: + (0,2) (1,1) (2,0).
static const int kPairs[6][2] = {{0, 0}, {0, 1}, {1, 0}, {0, 2}, {1, 1}, {2, 0}};

// C [M, N] = sum over kept pairs of A_i W_j; M a multiple of 32, N of 32. 2x2 tiles of 16x16 outputs.
static void AmxProduct(const std::vector<std::vector<bf16>>& A, const std::vector<std::vector<bf16>>& W, int pairs,
                       int M, int N, int Kp, float* C) {
  for (int n0 = 0; n0 < N; n0 += 32) {
    for (int m0 = 0; m0 < M; m0 += 32) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int k0 = 0; k0 < Kp; k0 += 32) {
        for (int p = 0; p < pairs; ++p) {
          const bf16* a = A[kPairs[p][0]].data();
          const bf16* w = W[kPairs[p][1]].data();
          _tile_loadd(4, a + (static_cast<size_t>(m0 / 16) * (Kp / 32) + k0 / 32) * 512, 64);
          _tile_loadd(5, a + (static_cast<size_t>(m0 / 16 + 1) * (Kp / 32) + k0 / 32) * 512, 64);
          _tile_loadd(6, w + (static_cast<size_t>(n0 / 16) * (Kp / 2) + k0 / 2) * 32, 64);
          _tile_loadd(7, w + (static_cast<size_t>(n0 / 16 + 1) * (Kp / 2) + k0 / 2) * 32, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, C + static_cast<size_t>(m0) * N + n0, N * 4);
      _tile_stored(1, C + static_cast<size_t>(m0) * N + n0 + 16, N * 4);
      _tile_stored(2, C + static_cast<size_t>(m0 + 16) * N + n0, N * 4);
      _tile_stored(3, C + static_cast<size_t>(m0 + 16) * N + n0 + 16, N * 4);
    }
  }
}

// fp32 AVX-512 reference kernel, the jaxseq kernel's tile: 6 rows x 4 vectors, W packed [N/64][K][64].
template <int R>
static void Fp32Tile(const float* a, int K, const float* w, float* c, int N) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < 4; ++g) acc[r][g] = _mm512_setzero_ps();
  for (int k = 0; k < K; ++k) {
    __m512 wk[4];
    for (int g = 0; g < 4; ++g) wk[g] = _mm512_loadu_ps(w + k * 64 + g * 16);
    for (int r = 0; r < R; ++r) {
      __m512 x = _mm512_set1_ps(a[r * K + k]);
      for (int g = 0; g < 4; ++g) acc[r][g] = _mm512_fmadd_ps(x, wk[g], acc[r][g]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < 4; ++g) _mm512_storeu_ps(c + r * N + g * 16, acc[r][g]);
}
static void Fp32Product(const float* a, int M, int K, const float* wp, int N, float* c) {
  for (int n0 = 0; n0 < N; n0 += 64) {
    const float* w = wp + static_cast<size_t>(n0 / 64) * K * 64;
    int m = 0;
    for (; m + 6 <= M; m += 6) Fp32Tile<6>(a + m * K, K, w, c + m * N + n0, N);
    for (; m + 4 <= M; m += 4) Fp32Tile<4>(a + m * K, K, w, c + m * N + n0, N);
    for (; m < M; ++m) Fp32Tile<1>(a + m * K, K, w, c + m * N + n0, N);
  }
}

template <typename F>
static double Best(F f, double seconds) {
  double best = 1e30, end = now() + seconds;
  do {
    double t0 = now();
    f();
    best = std::min(best, now() - t0);
  } while (now() < end);
  return best;
}

int main(int argc, char** argv) {
  const int M = argc > 1 ? atoi(argv[1]) : 64, K = argc > 2 ? atoi(argv[2]) : 456, N = argc > 3 ? atoi(argv[3]) : 1024;
  const double secs = argc > 4 ? atof(argv[4]) : 1.0;
  if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) {
    std::printf("AMX permission refused\n");
    return 1;
  }
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);

  const int Kp = (K + 31) / 32 * 32;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> a(static_cast<size_t>(M) * K), w(static_cast<size_t>(K) * N);
  for (auto& v : a) v = std::tanh(normal(rng));                     // like h and x: bounded
  for (auto& v : w) v = normal(rng) / std::sqrt(static_cast<float>(K));  // like an initialised weight

  std::vector<double> exact(static_cast<size_t>(M) * N, 0.0), scale(static_cast<size_t>(M) * N, 0.0);
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < K; ++k)
      for (int n = 0; n < N; ++n) {
        exact[m * N + n] += static_cast<double>(a[m * K + k]) * w[k * N + n];
        scale[m * N + n] += std::fabs(static_cast<double>(a[m * K + k]) * w[k * N + n]);
      }
  auto report_error = [&](const char* name, const std::vector<float>& c) {
    double max_abs = 0, max_rel_scale = 0;
    for (size_t i = 0; i < c.size(); ++i) {
      double e = std::fabs(c[i] - exact[i]);
      max_abs = std::max(max_abs, e);
      max_rel_scale = std::max(max_rel_scale, e / scale[i]);
    }
    std::printf("  %-8s max |err| %.2e   max |err| / sum|a w| %.2e\n", name, max_abs, max_rel_scale);
  };

  std::vector<float> wp(static_cast<size_t>(K) * N);
  for (int k = 0; k < K; ++k)
    for (int n = 0; n < N; ++n) wp[(static_cast<size_t>(n / 64) * K + k) * 64 + n % 64] = w[k * N + n];
  std::vector<float> c32(static_cast<size_t>(M) * N), camx(static_cast<size_t>(M) * N);
  std::vector<std::vector<bf16>> As, Ws;
  SplitRows(a.data(), M, K, Kp, 3, As);
  SplitPackW(w.data(), K, N, Kp, 3, Ws);

  const double flops = 2.0 * M * K * N;
  std::printf("M=%d K=%d N=%d (Kp=%d), one thread, %.1f s per variant\n", M, K, N, Kp, secs);
  Fp32Product(a.data(), M, K, wp.data(), N, c32.data());
  report_error("fp32", c32);
  for (int pairs : {1, 3, 6}) {
    AmxProduct(As, Ws, pairs, M, N, Kp, camx.data());
    char name[16];
    std::snprintf(name, sizeof name, "bf16x%d", pairs);
    report_error(name, camx);
  }
  for (int round = 0; round < 3; ++round) {
    double t32 = Best([&] { Fp32Product(a.data(), M, K, wp.data(), N, c32.data()); }, secs);
    std::printf("round %d: fp32 AVX-512 %.1f us (%.0f GFLOP/s)", round, t32 * 1e6, flops / t32 * 1e-9);
    for (int pairs : {1, 3, 6}) {
      double t = Best([&] { AmxProduct(As, Ws, pairs, M, N, Kp, camx.data()); }, secs);
      std::printf(" | bf16x%d %.1f us (%.2fx fp32's time, %.0f fp32-equivalent GFLOP/s)", pairs, t * 1e6, t / t32,
                  flops / t * 1e-9);
    }
    std::printf("\n");
  }
  {  // the AMX unit alone: dependent-free dps on tiles already loaded
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    _tile_loadd(4, As[0].data(), Kp * 2); _tile_loadd(5, As[0].data() + 16 * Kp, Kp * 2);
    _tile_loadd(6, Ws[0].data(), 64); _tile_loadd(7, Ws[0].data() + 512, 64);
    const int reps = 100000;
    double t = Best([&] {
      for (int i = 0; i < reps; ++i) {
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, camx.data(), 64);
    }, secs);
    std::printf("AMX dps alone: %.0f GFLOP/s (bf16)\n", 4.0 * reps * 16384 / t * 1e-9);
  }
  _tile_release();
  return 0;
}
