// The fused LSTM's two time loops on the CPU, as XLA FFI custom calls (jaxseq/native/__init__.py builds and
// registers them; jaxseq/layers.py calls them).
//
// Why a kernel: XLA:CPU runs a while loop's body on one thread, so at thin shapes (B·H small) each step's
// [B, I+H]·[I+H, 4H] product ran single-threaded while PyTorch's oneDNN LSTM used every core
// (benchmarks/RESULTS.md). Here a team of threads splits the hidden units: each step is a stage whose blocks
// are column blocks (kLanes hidden units of every gate: those columns of z_t, their activations, their part of h_t
// and c_t), and step t+1 starts when every block of step t has finished (class Stages). The backward loop is
// split the same way: a block forms its columns of δh_t = δz_{t+1} Wᵀ and then of δz_t.
//
// Semantics are exactly those of layers._forward_loop / _backward_loop (tests compare them):
//   forward:  z = x_t U + h W + b (hoisted: x U + b for all steps in the first stage), i f o = σ, g = tanh,
//             c' = f c + i g, h' = o tanh c'; where t >= length: carry kept, y_t = 0.
//             Saved: activated gates (unmasked) and the carried c, by blocks of 16 hidden units (TapeRow).
//   backward: dh += dy_t; dc' = dc + dh o (1 - tanh²c); δz as bptt.lstm_step_backward_parts;
//             where t >= length: δz_t = 0 and the carry passes through.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// vf is one vector register: 16 floats with AVX-512 (32 registers), 8 with AVX/AVX2 (16 registers), 4 with SSE.
// A column block is kLanes hidden units of every gate. Wider vectors than the registers (16 floats on AVX2)
// made GCC keep the product's accumulators on the stack: on an AMD EPYC (Zen 3, AVX2) the kernel took
// 2.0-7.5x the time of XLA's loops (benchmarks/RESULTS.md).
#if defined(__AVX512F__)
constexpr int kLanes = 16, kVectorRegisters = 32;
#elif defined(__AVX__)
constexpr int kLanes = 8, kVectorRegisters = 16;
#else
constexpr int kLanes = 4, kVectorRegisters = 16;
#endif
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef float vf_unaligned __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

inline vf load(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }
inline vf splat(float x) { return x - vf{}; }  // one broadcast: x - (+0) is x, -0 included

// The tape (what the forward saves for the backward) by blocks of 16 hidden units: gates [T][H/16][B][4][16]
// (i, f, g, o) and cs [T][H/16][B][16], so that a column block's tape rows of one step are contiguous. In
// [4, T, B, H] and [T, B, H] they lay 4·H bytes apart in five planes, so that the hardware prefetchers, which
// stay inside a 4 KiB page, hardly helped. Training step, in-process A/B against that layout (bit-identical;
// medians of 12-100 alternating rounds, three A/Bs per shape): 0.92-0.97x at (128, 100, 256, 512), 0.94-0.98x
// at (64, 34, 200, 256), 0.96-1.00x at (32, 500, 64, 128), 0.96-1.02x at (1, 100, 128, 256).
// 16 is jaxseq.native.LANES (the padding of H), not kLanes, so that the layout does not depend on the build.
constexpr int64_t kTapeLanes = 16;
static_assert(kTapeLanes % kLanes == 0, "a tape block holds whole vectors");

// Where hidden unit `col` of batch row `row` at step t starts in the tape, in units of one 16-float row of cs
// (the gates' offset is 4x this, plus q·16 for gate q).
inline int64_t TapeRow(int64_t t, int64_t row, int64_t col, int64_t batch, int64_t hidden) {
  return (t * (hidden / kTapeLanes) + col / kTapeLanes) * batch + row;
}
template <typename F>
inline F* TapeGate(F* gates, int64_t tape_row, int q, int64_t col) {
  return gates + (tape_row * 4 + q) * kTapeLanes + col % kTapeLanes;
}
template <typename F>
inline F* TapeC(F* cs, int64_t tape_row, int64_t col) {
  return cs + tape_row * kTapeLanes + col % kTapeLanes;
}

// The gate nonlinearities cost about a tenth of a forward step at (128, 100, 256, 512) on one AVX2 core: the
// kernel ran 12-16 % faster with them replaced by multiply-adds. These forms, at about the accuracy of XLA's
// own CPU functions, take 0.6-0.8x the time of the ones they replaced (Cephes' exp rounding by compare and
// convert; tanh as both its small-|x| polynomial and its exp form): 25-38 against 40-48 ns per 8 units of a
// cell in a microbenchmark.

// exp with Cephes' single-precision polynomial (about 1 ulp on the clamped range). Adding 1.5·2^23 rounds
// x·log2(e) to the nearest integer n in the low mantissa bits, which then also form 2^n.
inline vf vexp(vf x) {
  constexpr float kRound = 12582912.0f;  // 1.5 · 2^23; its bit pattern is 0x4B400000
  x = x < -87.3f ? splat(-87.3f) : x;    // keeps 2^n normal
  x = x > 88.3f ? splat(88.3f) : x;      // keeps p · 2^n finite
  vf shifted = x * 1.44269504088896341f + kRound;
  vf n = shifted - kRound;
  vf r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n·ln 2 in two parts
  vf r2 = r * r;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  vi bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  bits = (bits - (0x4B400000 - 127)) << 23;  // the exponent field of 2^n
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Within 9e-8 of σ (1.5e-7 relative), like XLA's 1 / (1 + exp(-x)).
inline vf vsigmoid(vf x) { return 1.0f / (1.0f + vexp(-x)); }

// tanh as x·P(x²)/Q(x²), of degrees 13 and 6 in x, fitted to tanh's relative error on [0, 9] by Lawson-weighted
// least squares (scripts/fit_tanh.py; 1e-8 in float64). Evaluated in float32 as here, it is within 3.2e-7 of
// tanh on every float32 in [0, 10) (XLA's CPU tanh, also rational: 2.7e-7); beyond ±9, tanh rounds to ±1 in
// float32. Rounding takes the quotient up to 1.00000024, so it is clamped to [-1, 1] (1 - tanh² stays ≥ 0).
inline vf vtanh(vf x) {
  x = x > 9.0f ? splat(9.0f) : x;
  x = x < -9.0f ? splat(-9.0f) : x;
  vf x2 = x * x;
  vf p = x2 * -8.511130711e-14f + 5.283762317e-11f;
  p = p * x2 - 2.023142187e-08f;
  p = p * x2 + 1.115463965e-05f;
  p = p * x2 + 3.103919560e-03f;
  p = p * x2 + 1.308395863e-01f;
  p = p * x2 * x + x;
  vf q = x2 * 2.546132018e-04f + 2.449497022e-02f;
  q = q * x2 + 4.641728699e-01f;
  q = q * x2 + 1.0f;
  vf t = p / q;
  t = t > 1.0f ? splat(1.0f) : t;
  return t < -1.0f ? splat(-1.0f) : t;
}

// ---------------------------------------------------------------------------------------------------------
// A team of threads that run one job together. A worker joins a job only while the caller has not finished
// it: a worker the OS has not scheduled yet (XLA's own threads may still spin on its core after a GEMM, or
// another process holds it) never delays the caller, who does the work of absent threads (see Stages).

class Team {
 public:
  static Team& Get() {
    static Team* team = new Team();  // never destroyed: its workers live as long as the process
    return *team;
  }

  int max_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs job(index, count) on the caller (index 0) and on the workers 1 .. count-1 that join in time, and
  // returns when the caller's part and every joined worker's part have finished. Returns false (and runs
  // nothing) if another call is using the team, or in a forked child.
  bool TryRun(int count, const std::function<void(int, int)>& job) {
    if (getpid() != owner_) return false;  // a forked child: the workers stayed in the parent
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    count = std::max(1, std::min(count, max_threads()));
    if (count > 1) {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      count_ = count;
      finished_.store(0, std::memory_order_relaxed);
      ++generation_;
      gate_.store(generation_ << 32, std::memory_order_release);  // open, nobody joined
    }
    if (count > 1) wake_.notify_all();
    job(0, count);
    if (count > 1) {
      const uint64_t joined = gate_.fetch_or(kClosed, std::memory_order_acq_rel) & kJoinedMask;
      while (finished_.load(std::memory_order_acquire) != joined) Relax();
    }
    return true;
  }

  static void Relax() {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }

 private:
  static constexpr uint64_t kClosed = 1u << 31, kJoinedMask = kClosed - 1;

  Team() : owner_(getpid()) {
    cpu_set_t set;
    int cores = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
    for (int index = 1; index < std::max(1, cores); ++index) workers_.emplace_back([this, index] { Work(index); });
  }

  // Joins the job of `generation` if its caller has not closed it: gate_ = (generation << 32) | closed | joined
  // (the generation's low 32 bits, so that it keeps matching after 2^32 calls).
  bool Join(uint64_t generation) {
    uint64_t gate = gate_.load(std::memory_order_acquire);
    while ((gate >> 32) == (generation & 0xffffffffu) && !(gate & kClosed)) {
      if (gate_.compare_exchange_weak(gate, gate + 1, std::memory_order_acq_rel)) return true;
    }
    return false;
  }

  void Work(int index) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int, int)>* job;
      int count;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;
        count = count_;
      }
      if (index < count && Join(seen)) {
        (*job)(index, count);
        finished_.fetch_add(1, std::memory_order_acq_rel);
      }
    }
  }

  const pid_t owner_;
  std::vector<std::thread> workers_;
  std::mutex busy_;
  std::mutex mutex_;
  std::condition_variable wake_;
  uint64_t generation_ = 0;
  const std::function<void(int, int)>* job_ = nullptr;
  int count_ = 1;
  std::atomic<uint64_t> gate_{0};
  std::atomic<uint64_t> finished_{0};
};

// The work of one call as a sequence of stages (time steps): stage s has blocks 0 .. n_s-1 that may run in any
// order and on any thread, and stage s+1 starts when all of stage s has finished. Thread i of count owns an
// equal range of every stage's blocks (so that the weights its blocks read stay in its own cache), runs those,
// then claims the unclaimed blocks of the other ranges. A thread that is late, or never joins, costs the others
// only its unclaimed blocks; with a fixed split and a barrier per step, one descheduled thread stalled every
// step (at (1, 100, 128, 256) after XLA's input GEMM, two threads ran 1.3-1.7x one thread's time).
// A stage may also have lagging blocks, which only the stage after next waits for (the backward's input
// gradient): the thread that finishes first goes on with the next step instead of waiting at the barrier for
// the other's last block. At (64, 34, 200, 256) the input gradient's 13 vectors split 6 : 7 between two
// threads, and the end of every step waited for the seventh.
class Stages {
 public:
  explicit Stages(int count) : claims_(count), lagging_claims_(count) {}

  int threads() const { return static_cast<int>(claims_.size()); }

  // Runs stages 0 .. num_stages-1 as thread `index`. Stage s has blocks(s) blocks that stage s+1 needs, run by
  // run(s, b), and lagging(s) lagging blocks, run by run_lagging(s, b), that only stage s+2 needs: a thread that
  // has claimed all of stage s goes on to stage s+1 while the other may still run a lagging block of stage s.
  // In each stage a thread runs its range of blocks(s), takes over unclaimed ones of other ranges, then the
  // unclaimed lagging blocks of stage s-1, then its range of lagging(s) and unclaimed ones of other ranges.
  // Thread 0 (the caller) returns only when every block of every stage has finished.
  template <typename Blocks, typename Lagging, typename Run, typename RunLagging>
  void Execute(int index, int64_t num_stages, Blocks blocks, Lagging lagging, Run run, RunLagging run_lagging) {
    int64_t before = 0, lagging_last = 0;  // blocks of the stages before s; lagging blocks of stage s-1
    int64_t lagging_before[2] = {0, 0};    // lagging blocks of the stages before s, by the stage's parity
    for (int64_t s = 0; s < num_stages; ++s) {
      const int64_t n = blocks(s), m = lagging(s);
      // Stage s-2's lagging blocks have finished when the count of its parity's is complete: a lagging block
      // of stage s-1 may still run (the other parity), and none of stage s has started. One count for both
      // parities let a thread that ran stage s-1's lagging blocks go on while the other still ran one of
      // stage s-2's, whose δz slot the next stage then overwrote (tests/test_native.py caught it, in about one
      // call in twenty-five).
      WaitForDone(before, s % 2, lagging_before[s % 2]);
      ClaimAndRun(claims_, index, s, n, run, done_);
      if (s > 0) ClaimAll(s - 1, lagging_last, run_lagging);
      ClaimAndRun(lagging_claims_, index, s, m, run_lagging, lagging_done_[s % 2].value);
      before += n;
      lagging_before[s % 2] += m;
      lagging_last = m;
    }
    if (num_stages > 0) ClaimAll(num_stages - 1, lagging_last, run_lagging);
    if (index == 0) {
      WaitForDone(before, 0, lagging_before[0]);
      WaitForDone(before, 1, lagging_before[1]);
    }
  }
  template <typename Blocks, typename Run>
  void Execute(int index, int64_t num_stages, Blocks blocks, Run run) {
    Execute(index, num_stages, blocks, [](int64_t) { return int64_t{0}; }, run, [](int64_t, int64_t) {});
  }

 private:
  struct alignas(64) Claim_ {
    std::atomic<uint64_t> value{0};  // ((stage + 1) << 32) | the next unclaimed block of the range
  };

  static int64_t RangeBegin(int64_t n, int range, int count) { return n * range / count; }

  // Thread `index`'s range of stage s's n blocks first, then the unclaimed blocks of the other ranges.
  template <typename Run>
  void ClaimAndRun(std::vector<Claim_>& claims, int index, int64_t s, int64_t n, Run& run, std::atomic<int64_t>& done) {
    const int count = static_cast<int>(claims.size());
    for (int k = 0; k < count; ++k) {
      const int range = (index + k) % count;
      const int64_t lo = RangeBegin(n, range, count), hi = RangeBegin(n, range + 1, count);
      for (int64_t b; (b = Claim(claims[range], s, hi - lo)) >= 0;) {
        run(s, lo + b);
        done.fetch_add(1, std::memory_order_acq_rel);
      }
    }
  }
  // The unclaimed lagging blocks of stage s, of every range.
  template <typename Run>
  void ClaimAll(int64_t s, int64_t n, Run& run) {
    ClaimAndRun(lagging_claims_, 0, s, n, run, lagging_done_[s % 2].value);
  }

  // The next unclaimed block of `range` in stage s (0 .. size-1), or -1 when all are claimed. A thread still
  // in an earlier stage finds the range's counter moved on and claims nothing.
  static int64_t Claim(Claim_& range, int64_t s, int64_t size) {
    std::atomic<uint64_t>& counter = range.value;
    const uint64_t key = static_cast<uint64_t>(s + 1) << 32;
    uint64_t value = counter.load(std::memory_order_acquire);
    for (;;) {
      uint64_t next;
      int64_t block;
      if (value < key) {  // the first claim of this stage in this range
        if (size == 0) return -1;
        next = key | 1;
        block = 0;
      } else if ((value & ~0xffffffffull) == key && static_cast<int64_t>(value & 0xffffffffu) < size) {
        next = value + 1;
        block = static_cast<int64_t>(value & 0xffffffffu);
      } else {
        return -1;
      }
      if (counter.compare_exchange_weak(value, next, std::memory_order_acq_rel)) return block;
    }
  }

  // Until `target` blocks and, of the lagging blocks of stages with parity `parity`, `lagging_target` have finished.
  void WaitForDone(int64_t target, int parity, int64_t lagging_target) {
    int spins = 0;
    while (done_.load(std::memory_order_acquire) < target ||
           lagging_done_[parity].value.load(std::memory_order_acquire) < lagging_target) {
      if (++spins > 4096) sched_yield();  // another thread holds our core: let it run
      else Team::Relax();
    }
  }

  struct alignas(64) Count {
    std::atomic<int64_t> value{0};
  };
  std::vector<Claim_> claims_, lagging_claims_;
  alignas(64) std::atomic<int64_t> done_{0};
  Count lagging_done_[2];  // finished lagging blocks of even and of odd stages
};

// XLA:CPU allocates a call's large buffers afresh (glibc maps them with mmap and unmaps them after the call),
// so the kernel's first writes to its outputs page-fault, 4 KiB at a time, on every thread at once. Asking for
// huge pages and populating the range first cut the fused training step at (32, 500, 64, 128) from about 150
// to 100 ms here. Both are hints: where the kernel refuses them, the writes fault as before. Populating is
// split into parts that stage 0's blocks take (PopulatePart): done by the caller alone before the loop, the
// 170 MB of a training step at (128, 100, 256, 512) took 31 ms while the other core waited.
struct Prefault {
  static constexpr uintptr_t kHuge = 2 << 20;
  uintptr_t begin = 0, end = 0;  // whole pages inside the buffer; empty below two huge pages

  Prefault() = default;
  Prefault(float* data, int64_t count) {
    if (count * static_cast<int64_t>(sizeof(float)) < static_cast<int64_t>(2 * kHuge)) return;
    const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    begin = (reinterpret_cast<uintptr_t>(data) + page - 1) & ~(page - 1);
    end = reinterpret_cast<uintptr_t>(data + count) & ~(page - 1);
    if (end <= begin) begin = end = 0;
    uintptr_t huge_begin = (begin + kHuge - 1) & ~(kHuge - 1), huge_end = end & ~(kHuge - 1);
    if (huge_end > huge_begin) madvise(reinterpret_cast<void*>(huge_begin), huge_end - huge_begin, MADV_HUGEPAGE);
  }

  // Populates part `part` of `parts`, cut at huge-page boundaries so that no huge page is split between two.
  void PopulatePart(int64_t part, int64_t parts) const {
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
    if (end == begin) return;
    auto cut = [&](int64_t k) {
      if (k == 0) return begin;
      if (k == parts) return end;
      const uintptr_t at = begin + static_cast<uintptr_t>(static_cast<double>(end - begin) * k / parts);
      return std::min(end, std::max(begin, at & ~(kHuge - 1)));
    };
    const uintptr_t lo = cut(part), hi = cut(part + 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_POPULATE_WRITE);
  }
};

// The outputs a call populates, block by block in its stage 0.
struct Prefaults {
  Prefault ranges[3];
  int count = 0;

  void Add(float* data, int64_t size) { ranges[count++] = Prefault(data, size); }
  void PopulatePart(int64_t part, int64_t parts) const {
    for (int k = 0; k < count; ++k) ranges[k].PopulatePart(part, parts);
  }
};

// Threads worth using: every thread needs at least one vector of hidden units, and enough work per step to
// pay for a stage's synchronisation (about a microsecond with two threads): 2 x 8·B·depth·H FLOPs for two
// (jaxseq/layers.py's _native_fits mirrors this rule).
int TeamSize(int64_t batch, int64_t depth, int64_t hidden) {
  int64_t flops = 8 * batch * depth * hidden;
  int by_work = static_cast<int>(std::max<int64_t>(1, flops / 200000));
  int by_units = static_cast<int>(std::max<int64_t>(1, hidden / kLanes));
  int size = std::min({Team::Get().max_threads(), by_work, by_units});
  if (const char* env = std::getenv("JAXSEQ_NATIVE_THREADS")) size = std::max(1, std::min(size, std::atoi(env)));
  return size;
}

// The register tiles of the products: R rows by G vectors (gates of a column block, or column blocks of Wᵀ)
// keep R·G accumulators in registers; the rest hold the loaded weights and a broadcast row value. With
// AVX-512 a tile is 6 rows by the 4 gates (24 of 32 registers); with AVX2, 6 rows by 2 gates (12 of 16), two
// passes over the same L1-resident rows.
constexpr int kAccumulatorRegisters = kVectorRegisters * 3 / 4;
constexpr int kRows = 6;  // rows per register tile

// Vectors per tile of R rows: the most of 4, 2, 1 that fit.
template <int R>
constexpr int TileWidth() {
  for (int width : {4, 2}) {
    if (R * width <= kAccumulatorRegisters) return width;
  }
  return 1;
}

// Calls f(std::integral_constant<int, width>{}) for a tile width known only at run time, 1 <= width <= Max: the
// rest of a block narrower than a full tile runs as one tile of its own width (three vectors as a 6x3 tile, not
// three 6x1 tiles, in which each broadcast feeds a single product).
template <int Max, typename F>
inline void WithTileWidth(int width, F f) {
  if (width == Max) f(std::integral_constant<int, Max>{});
  else if constexpr (Max > 1) WithTileWidth<Max - 1>(width, f);
}

// The register tile of every product here: acc[r][g] += Σ_k a[r·a_row + k·a_k] · w[g·w_vector + k·w_k .. + L],
// R·G accumulators, each loaded vector of w feeding R of them and each broadcast of a feeding G. With Ahead > 0,
// each of w's G streams is prefetched Ahead steps of k ahead (see DzProductBlock).
template <int R, int G, int Ahead = 0>
inline void TileProduct(vf (&acc)[R][G], const float* a, int64_t a_row, int64_t a_k, const float* w, int64_t w_vector,
                        int64_t w_k, int64_t depth) {
  for (int64_t k = 0; k < depth; ++k) {
    vf wk[G];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) wk[g] = load(w + g * w_vector + k * w_k);
    if constexpr (Ahead > 0) {
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) __builtin_prefetch(w + g * w_vector + (k + Ahead) * w_k, 0, 3);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      vf x = splat(a[r * a_row + k * a_k]);
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) acc[r][g] += x * wk[g];
    }
  }
}

// acc[r][g] += Σ_k a[r·a_row + k·a_k] · w[(k·4 + g)·kLanes ..] for R rows of a and G consecutive gates of one
// column block of the packed weights ([depth][4 gates][kLanes units]); w points at the first gate's k = 0.
template <int R, int G>
inline void AccumulateGates(vf (&acc)[R][G], const float* a, int64_t a_row, int64_t a_k, const float* w,
                            int64_t depth) {
  if constexpr (R <= 2 && 2 * R * G <= kAccumulatorRegisters) {
    // Few rows: R·G chains of dependent FMAs would wait on the FMA latency; a second set for odd k doubles them.
    vf odd[R][G] = {};
    int64_t k = 0;
    for (; k + 1 < depth; k += 2) {
      const float* wk = w + k * 4 * kLanes;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        vf x0 = splat(a[r * a_row + k * a_k]), x1 = splat(a[r * a_row + (k + 1) * a_k]);
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) {
          acc[r][g] += x0 * load(wk + g * kLanes);
          odd[r][g] += x1 * load(wk + (4 + g) * kLanes);
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) acc[r][g] += odd[r][g];
    }
    if (k == depth) return;
    a += k * a_k;
    w += k * 4 * kLanes;
    depth -= k;
  }
  TileProduct<R, G>(acc, a, a_row, a_k, w, kLanes, 4 * kLanes, depth);
}

// Where row b of step t starts in a sequence operand (xs, ys, dys, dxs): data + t·step + b·row. They are
// [B, T, F] (step F, row T·F), the layer's own order, so that XLA need not transpose xs, ys and their cotangents
// into time-major order and back around every call (it did, when the kernel took [T, B, F]).
struct TimeRows {
  int64_t step, row;
  static TimeRows Of(int64_t steps, int64_t features) { return TimeRows{features, steps * features}; }
  int64_t at(int64_t t, int64_t b) const { return t * step + b * row; }
};

struct ForwardArgs {
  int64_t steps, batch, in_size, hidden;
  const float* xs;  // [B, T, I] (x_rows)
  const float* U;   // [I, 4H]
  const float* W;   // [H, 4H]
  const float* b;   // [4H]
  const float* h0;
  const float* c0;
  const int32_t* lengths;  // [B] or nullptr
  // Hoisted: x_t U + b for every step first, [H/L][T·B][4][L] (L = kLanes; stage 0, each column block over all T·B rows,
  // in 6-row register blocks), then only h W inside the loop; nullptr: [x_t, h] [U; W] inside the loop.
  float* projected;
  float* h;       // [B, H] final
  float* c;       // [B, H] final
  float* ys;      // [B, T, H] (y_rows)
  float* gates;   // [T, H/16, B, 4, 16] (i, f, g, o; see TapeRow) or nullptr
  float* cs;      // [T, H/16, B, 16] or nullptr
  float* h_buffers;  // [2, B, H] scratch
  // [H/L][I + H][4][L]: [U; W] repacked so that one block of L hidden units reads its weights for all
  // four gates contiguously. In the [I + H, 4H] layout each k row of a block touched four places 4H floats
  // apart, a new page per load at H = 512: the forward step ran at a third of the XLA loop's rate there.
  float* packed;
  // [2][B][I + H]: step t's [x_t, h_{t-1}] in slot t & 1, by the row blocks of ForEachRowBlock, each [I + H][rows]
  // (PackedRows), so that a register tile reads its broadcast operand from one contiguous stream. Read from
  // xs and [B, H], the tile's rows lay 4·I (or more) and 4·H bytes apart and were re-read from L2 by every chunk of
  // depth: the forward products took 1.2x the time per FLOP of the backward's (perf, (128, 100, 256, 512)).
  // x_t is packed in the stage before its step's, a share by each block; h_t by the block that forms it.
  float* packed_rows;
  Prefaults prefaults;  // ys, gates, cs
  TimeRows x_rows{}, y_rows{};  // of xs and ys
};

// Where rows r0 .. r0+rows of step t's packed [x_t, h_{t-1}] start: element (r, k) is at [k·rows + r].
inline float* PackedRows(const ForwardArgs& a, int64_t t, int64_t r0) {
  return a.packed_rows + (t & 1) * a.batch * (a.in_size + a.hidden) + r0 * (a.in_size + a.hidden);
}

// Rows r0 .. r0+rows of a [*, row_stride] matrix's columns 0 .. width into dst as [width][rows].
inline void PackRowsTransposed(float* dst, const float* src, int64_t row_stride, int rows, int64_t width) {
  for (int64_t k = 0; k < width; ++k) {
    for (int r = 0; r < rows; ++r) dst[k * rows + r] = src[r * row_stride + k];
  }
}

// k rows of a column block per pass: 96 x 4 x 16 floats = 24 KiB with AVX-512, half of L1 (12 KiB with AVX2). Against whole-depth passes in one
// interleaved run (forward with its tape): 0.94x the time at (128, 100, 256, 512), 0.96x at (32, 500, 64, 128),
// 0.97x at (64, 34, 200, 256); 64 and 128 were within 2 % of it, 192 and 256 slower.
constexpr int64_t kDepthChunk = 96;

// acc += [x_t, h_{t-1}][rows r0.., k in [k0, k1)] · w[k0 .. k1) for G gates from the one w points at.
template <int R, int G>
inline void AccumulateDepthRange(const ForwardArgs& a, int64_t t, int64_t r0, const float* w, int64_t k0, int64_t k1,
                                 vf (&acc)[R][G]) {
  AccumulateGates<R, G>(acc, PackedRows(a, t, r0) + k0 * R, 1, R, w + k0 * 4 * kLanes, k1 - k0);
}

// One pass over k in [k0, k1) for rows r0 .. r0+R, gate q, hidden units col .. col+L. The first pass starts
// from the bias (or the hoisted input product), later ones from `partial` ([B][4][L], this column block's
// running sums); the last one returns the pre-activations in z, the others store them back. Passes over a
// 24 KiB chunk of the weights let every row block reuse it from L1; whole-depth passes streamed the column
// block's weights (up to 196 KiB) from L2 once per row block. Kept out of line so that its 4R accumulators
// have the vector registers to themselves (inlined into the elementwise code, GCC spilled some of them).
template <int R>
__attribute__((noinline)) bool GatePreactivations(const ForwardArgs& a, int64_t t, int64_t r0, int64_t col,
                                                  int64_t k0, int64_t k1, bool first, float* partial,
                                                  vf (&z)[R][4]) {
  constexpr int G = TileWidth<R>();
  const int64_t B = a.batch, H = a.hidden, I = a.in_size;
  const bool last = k1 == I + H;
  const float* w = a.packed + (col / kLanes) * (I + H) * 4 * kLanes;
  for (int q0 = 0; q0 < 4; q0 += G) {  // one pass with AVX-512, two with AVX2 (see TileWidth)
    vf acc[R][G];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        const int q = q0 + g;
        acc[r][g] = !first        ? load(partial + ((r0 + r) * 4 + q) * kLanes)
                    : a.projected ? load(a.projected + (((col / kLanes) * a.steps * B + t * B + r0 + r) * 4 + q) * kLanes)
                                  : load(a.b + q * H + col);
      }
    }
    AccumulateDepthRange<R, G>(a, t, r0, w + q0 * kLanes, k0, k1, acc);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        if (last) z[r][q0 + g] = acc[r][g];
        else store(partial + ((r0 + r) * 4 + q0 + g) * kLanes, acc[r][g]);
      }
    }
  }
  return last;
}

// Step t for rows r0 .. r0+R and hidden units col .. col+L.
template <int R>
void ForwardBlock(const ForwardArgs& a, int64_t t, int64_t r0, int64_t col, int64_t k0, int64_t k1, bool first,
                  float* partial) {
  const int64_t B = a.batch, H = a.hidden;
  const float* h_prev = a.h_buffers + (t & 1) * B * H;
  float* h_next = a.h_buffers + ((t + 1) & 1) * B * H;
  float* h_packed = PackedRows(a, t + 1, r0) + (a.in_size + col) * R;  // the next step's operand
  if (k1 == a.in_size + H) {
    // While the last pass of the product runs, ask for the lines the elementwise code then reads (c, evicted
    // by the weights streamed since the last step) and writes (y and the tape: fresh pages, so every store
    // first read its line from memory and filled the store queue). Forward with its tape at (128, 100, 256,
    // 512): 0.91x the time, in every round of an in-process A/B; without the prefetch of c, 1.02-1.04x that.
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(a.c + (r0 + r) * H + col, 0, 3);
      __builtin_prefetch(a.ys + a.y_rows.at(t, r0 + r) + col, 1, 3);
      if (a.gates != nullptr) {
        const int64_t tape_row = TapeRow(t, r0 + r, col, B, H);
        for (int q = 0; q < 4; ++q) __builtin_prefetch(TapeGate(a.gates, tape_row, q, col), 1, 3);
        __builtin_prefetch(TapeC(a.cs, tape_row, col), 1, 3);
      }
    }
  }
  {
    vf acc[R][4];
    if (!GatePreactivations<R>(a, t, r0, col, k0, k1, first, partial, acc)) return;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int64_t row = r0 + r, at = row * H + col;
      vf i = vsigmoid(acc[r][0]), f = vsigmoid(acc[r][1]), g = vtanh(acc[r][2]), o = vsigmoid(acc[r][3]);
      vf c_old = load(a.c + at);
      vf c_new = f * c_old + i * g;
      vf h_new = o * vtanh(c_new);
      vf y = h_new;
      if (a.lengths != nullptr && t >= a.lengths[row]) {
        c_new = c_old;
        h_new = load(h_prev + at);
        y = vf{};
      }
      store(a.c + at, c_new);
      store(h_next + at, h_new);
#pragma GCC unroll 16
      for (int u = 0; u < kLanes; ++u) h_packed[u * R + r] = h_new[u];
      store(a.ys + a.y_rows.at(t, row) + col, y);
      if (a.gates != nullptr) {
        const int64_t tape_row = TapeRow(t, row, col, B, H);
        store(TapeGate(a.gates, tape_row, 0, col), i);
        store(TapeGate(a.gates, tape_row, 1, col), f);
        store(TapeGate(a.gates, tape_row, 2, col), g);
        store(TapeGate(a.gates, tape_row, 3, col), o);
        store(TapeC(a.cs, tape_row, col), c_new);
      }
    }
  }
}

// Calls rows(R, r0) for blocks of R rows that cover 0 .. batch: blocks of kRows and as few of kRows - 1 as make
// up the rest (32 = 6 + 6 + 5 + 5 + 5 + 5). A 5-row tile costs about what a 6-row one does per row, a 3-row tile
// 1.7-1.9x (each loaded vector of weights feeds three products): at (32, 500, 64, 128), cut 6 x 4 + 5 + 3, the
// 3-row blocks' products took 7 % of the training step's perf samples for 9 % of the rows. Batches too small for
// that (1-4, 7-9, 13, 14, 19) take kRows at a time and then the rest, a rest of 2 after a full block cut again
// with it into 5 + 3: with AVX2, a 2-row tile holds 8 accumulators (2 rows x 4 vectors), against 10 for 5 rows
// and 12 for 3 and 6.
template <typename Rows>
void ForEachRowBlock(int64_t batch, Rows rows) {
  constexpr int kShort = kRows - 1;
  const int64_t shorts = (kRows - batch % kRows) % kRows;  // kRows·a + kShort·shorts = batch
  int64_t r0 = 0;
  if (batch >= kShort * shorts) {
    for (; r0 < batch - kShort * shorts; r0 += kRows) rows(std::integral_constant<int, kRows>{}, r0);
    for (; r0 < batch; r0 += kShort) rows(std::integral_constant<int, kShort>{}, r0);
    return;
  }
  int64_t full = batch / kRows;
  const bool recut = full > 0 && batch % kRows == 2;
  if (recut) --full;
  for (int64_t i = 0; i < full; ++i, r0 += kRows) rows(std::integral_constant<int, kRows>{}, r0);
  if (recut) {
    rows(std::integral_constant<int, 5>{}, r0);
    r0 += 5;
  }
  switch (batch - r0) {  // the rest: 1 to 4 rows
    case 4: rows(std::integral_constant<int, 4>{}, r0); break;
    case 3: rows(std::integral_constant<int, 3>{}, r0); break;
    case 2: rows(std::integral_constant<int, 2>{}, r0); break;
    case 1: rows(std::integral_constant<int, 1>{}, r0); break;
    default: break;
  }
}

// The hoisted input product of xs's rows r0 .. r0+R (of all B·T, in memory order: row b·T + t) for the column
// block at col: x U + b, stored by step (row t·B + b of the column block's [T·B][4][L]).
template <int R>
void ProjectBlock(const ForwardArgs& a, int64_t r0, int64_t col) {
  constexpr int G = TileWidth<R>();
  const int64_t H = a.hidden, I = a.in_size, T = a.steps, B = a.batch;
  const float* w = a.packed + (col / kLanes) * (I + H) * 4 * kLanes;
  float* out = a.projected + (col / kLanes) * T * B * 4 * kLanes;
  int64_t out_row[R];
  for (int r = 0; r < R; ++r) out_row[r] = (r0 + r) % T * B + (r0 + r) / T;
  for (int q0 = 0; q0 < 4; q0 += G) {
    vf acc[R][G];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) acc[r][g] = load(a.b + (q0 + g) * H + col);
    }
    AccumulateGates<R, G>(acc, a.xs + r0 * I, I, 1, w + q0 * kLanes, I);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) store(out + (out_row[r] * 4 + q0 + g) * kLanes, acc[r][g]);
    }
  }
}

// Block `block` of `blocks`'s share of step t's packed x_t (ForwardArgs::packed_rows): whole row blocks, as
// ForEachRowBlock cuts them.
void PackInputShare(const ForwardArgs& a, int64_t t, int64_t block, int64_t blocks) {
  const int64_t B = a.batch, I = a.in_size;
  int64_t row_blocks = 0;  // counted, not computed, so that it follows however ForEachRowBlock cuts the rows
  ForEachRowBlock(B, [&](auto, int64_t) { ++row_blocks; });
  const int64_t first = row_blocks * block / blocks, end = row_blocks * (block + 1) / blocks;
  int64_t j = 0;
  ForEachRowBlock(B, [&](auto rows, int64_t r0) {
    if (j >= first && j < end)
      PackRowsTransposed(PackedRows(a, t, r0), a.xs + a.x_rows.at(t, r0), a.x_rows.row, rows, I);
    ++j;
  });
}

// Stage 0 packs each column block's weights, forms its hoisted input product, copies its part of the initial
// state and packs its columns of h0 and its share of x_0; stages 1 .. T run the steps (each block also packs
// its share of the next step's x), and the last copies out the final h; a block is one column block (L hidden
// units of every gate).
void RunForward(const ForwardArgs& a, int index, Stages& stages) {
  const int64_t B = a.batch, H = a.hidden, I = a.in_size, H4 = 4 * H, blocks = H / kLanes;
  std::vector<float> partial(B * 4 * kLanes);  // one column block's running sums between depth chunks
  stages.Execute(index, a.steps + 2, [&](int64_t) { return blocks; }, [&](int64_t s, int64_t block) {
    const int64_t col = block * kLanes;
    if (s == 0) {
      a.prefaults.PopulatePart(block, blocks);
      float* packed = a.packed + block * (I + H) * 4 * kLanes;
      for (int64_t k = 0; k < I + H; ++k) {
        const float* row = k < I ? a.U + k * H4 : a.W + (k - I) * H4;
        for (int q = 0; q < 4; ++q) std::memcpy(packed + (k * 4 + q) * kLanes, row + q * H + col, sizeof(vf));
      }
      if (a.projected != nullptr) {
        ForEachRowBlock(a.steps * B, [&](auto rows, int64_t r0) { ProjectBlock<decltype(rows)::value>(a, r0, col); });
      }
      for (int64_t row = 0; row < B; ++row) {
        store(a.h_buffers + row * H + col, load(a.h0 + row * H + col));
        store(a.c + row * H + col, load(a.c0 + row * H + col));
      }
      ForEachRowBlock(B, [&](auto rows, int64_t r0) {
        constexpr int R = decltype(rows)::value;
        PackRowsTransposed(PackedRows(a, 0, r0) + (I + col) * R, a.h0 + r0 * H + col, H, R, kLanes);
      });
      if (a.projected == nullptr) PackInputShare(a, 0, block, blocks);
    } else if (s <= a.steps) {
      // Chunks of depth outside, rows inside: one chunk of the column block's weights stays in L1 while
      // every row block uses it.
      const int64_t t = s - 1, depth_begin = a.projected != nullptr ? I : 0;
      for (int64_t k0 = depth_begin; k0 < I + H; k0 += kDepthChunk) {
        const int64_t k1 = std::min(I + H, k0 + kDepthChunk);
        ForEachRowBlock(B, [&](auto rows, int64_t r0) {
          ForwardBlock<decltype(rows)::value>(a, t, r0, col, k0, k1, k0 == depth_begin, partial.data());
        });
      }
      if (a.projected == nullptr && t + 1 < a.steps) PackInputShare(a, t + 1, block, blocks);
    } else {
      const float* h_last = a.h_buffers + (a.steps & 1) * B * H;
      for (int64_t row = 0; row < B; ++row) store(a.h + row * H + col, load(h_last + row * H + col));
    }
  });
}

struct BackwardArgs {
  int64_t steps, batch, hidden;
  const float* W;      // [H, 4H], the recurrent kernel (packed as Wᵀ panels in stage 0)
  const float* gates;  // [T, H/16, B, 4, 16] (see TapeRow)
  const float* cs;     // [T, H/16, B, 16]
  const float* c0;     // [B, H]
  const float* dys;    // [B, T, H] (y_rows)
  const int32_t* lengths;
  float* dh;  // [B, H]: in, the carry's cotangent after the last step; out, before the first
  float* dc;  // [B, H]: likewise
  float* dz;  // [T, B, 4H], or [3, B, 4H] (see dz_steps)
  float* packed;  // [H/L][4H][L]: Wᵀ by blocks of L columns, each contiguous (see ForwardArgs::packed)
  // Weight gradients inside the loop (all nullptr without): dU += x_tᵀ δz_t, dW += h_{t-1}ᵀ δz_t, db += Σ δz_t,
  // each block its own columns, at the step that formed δz_t (see WeightGradients).
  int64_t in_size;  // I, with the weight or the input gradients
  const float* xs;  // [B, T, I] (x_rows)
  const float* ys;  // [B, T, H] (y_rows): h_t at valid steps
  const float* h0;  // [B, H]
  float* dU;        // [I, 4H]
  float* dW;        // [H, 4H]
  float* db;        // [4H]
  // The running sums of dU and dW by hidden block (hidden units lo .. hi): at 4·(I + H)·lo, per gate its tiles'
  // [I + H][width·L] one after another (see WeightTiles), copied into dU and dW at the end. Summed in place, a
  // tile's rows lay 16·H bytes apart, a new page each: at (128, 100, 256, 512) the backward kernel took 761-946
  // ms against 562-641 with these sums.
  float* weight_sums;
  // [2][I + H][B]: [x_t, h_{t-1}] of two steps by blocks of kRows rows (RowBlock), each [B][rows]: the
  // products then read their broadcast operand contiguously (in xs and ys it lies 4·I and 4·H bytes apart, or
  // T times that batch-major). Step t's is packed in the stage before (step t+1's), a share by each block.
  float* packed_inputs;
  // Steps that dz holds: T (the output), or 3, a ring of the last three steps, where the caller needs no δz (no
  // input gradient) and the weight gradients are formed here. δz_t is read in its own stage (WeightGradients)
  // and the next one (δh_{t-1}, and dxs_t, a lagging block that may still run in the stage after: see Stages),
  // so three slots suffice. At (32, 500, 64, 128) the output δz is 33 MB that XLA
  // allocates afresh on every call, and populating its pages alone took 5-48 ms of a ~120 ms step.
  int64_t dz_steps;
  // The input gradient inside the loop (nullptr without): dxs_t = δz_t Uᵀ, in the stage after δz_t's, by blocks
  // of kWide·L of its Ip columns (I padded to L), so that δz need not be kept for a product after the loop.
  int64_t in_padded;       // Ip
  const float* U;          // [I, 4H], the input kernel (packed as Uᵀ panels, zero past I)
  float* dxs;              // [B, T, I] (x_rows; the products form Ip columns and store the first I)
  float* packed_UT;        // [Ip/L][4H][L], as packed for Wᵀ
  Prefaults prefaults;     // dz (when kept), dxs
  TimeRows x_rows{}, y_rows{};  // of xs and dxs, of ys and dys
};

// δz_t, [B, 4H].
inline float* StepDz(const BackwardArgs& a, int64_t t) { return a.dz + (t % a.dz_steps) * a.batch * 4 * a.hidden; }

// The rows of [x_t, h_{t-1}]ᵀ by blocks of kRows: the input rows 0 .. I first, then the hidden rows, so that no
// block straddles the two. Block j is rows first .. first+count.
int64_t RowBlockCount(const BackwardArgs& a) {
  return (a.in_size + kRows - 1) / kRows + (a.hidden + kRows - 1) / kRows;
}
void RowBlock(const BackwardArgs& a, int64_t j, int64_t& first, int& count) {
  const int64_t input_blocks = (a.in_size + kRows - 1) / kRows;
  const int64_t begin = j < input_blocks ? j * kRows : a.in_size + (j - input_blocks) * kRows;
  const int64_t end = j < input_blocks ? a.in_size : a.in_size + a.hidden;
  first = begin;
  count = static_cast<int>(std::min<int64_t>(kRows, end - begin));
}

// Packs row blocks j0 .. j1 of step t's [x_t, h_{t-1}]ᵀ into packed_inputs[t & 1].
void PackInputs(const BackwardArgs& a, int64_t t, int64_t j0, int64_t j1) {
  constexpr int kMove = 8;
  static_assert(kRows <= kMove, "a row block's part of a row fits one move");
  const int64_t B = a.batch, H = a.hidden, I = a.in_size;
  const float* x = a.xs + a.x_rows.at(t, 0);
  const float* h_prev = t > 0 ? a.ys + a.y_rows.at(t - 1, 0) : a.h0;
  float* packed = a.packed_inputs + (t & 1) * (I + H) * B;
  for (int64_t j = j0; j < j1; ++j) {
    int64_t first;
    int count;
    RowBlock(a, j, first, count);
    const float* source = first < I ? x + first : h_prev + (first - I);
    const int64_t stride = first < I ? a.x_rows.row : t > 0 ? a.y_rows.row : H;
    float* out = packed + first * B;
    // One 8-float move per row where it stays inside this block's B·count floats and reads a row that is not
    // the source's last (a later row follows it in memory): the floats past `count` land in the next row's
    // place, which its own move then overwrites. Scalar copies did 6 moves per row.
    int64_t b = 0;
    for (; b < B - 1 && b * count + kMove <= B * count; ++b)
      std::memcpy(out + b * count, source + b * stride, sizeof(float) * kMove);
    for (; b < B; ++b) {
      for (int r = 0; r < count; ++r) out[b * count + r] = source[b * stride + r];
    }
  }
}

void BackwardElementwise(const BackwardArgs& a, int64_t t, int64_t lo, int64_t hi) {
  const int64_t B = a.batch, H = a.hidden, step_rows = (H / kTapeLanes) * B;
  // The tape rows of two rows ahead are asked for while this row's are used. With the tape in [4, T, B, H] and
  // [T, B, H] (before TapeRow), the gates, c and c_prev of a row lay H floats from the last row's, and the rows'
  // first loads stalled (28.8 % of this code's perf samples at (64, 34, 200, 256), 13.5 % with the prefetch).
  // Training step, in-process A/B against no prefetch: 0.955x and 0.965x at (128, 100, 256, 512), 0.98x at
  // (32, 500, 64, 128), 0.99-1.00x at (64, 34, 200, 256).
  constexpr int64_t kAhead = 2, kLineFloats = 64 / sizeof(float);
  for (int64_t row = 0; row < B; ++row) {
    if (row + kAhead < B) {
      const float* dys_ahead = a.dys + a.y_rows.at(t, row + kAhead);
      for (int64_t col = lo; col < hi; col += kLineFloats) {
        const int64_t tape_row = TapeRow(t, row + kAhead, col, B, H);
        for (int q = 0; q < 4; ++q) __builtin_prefetch(TapeGate(a.gates, tape_row, q, col), 0, 3);
        __builtin_prefetch(TapeC(a.cs, tape_row, col), 0, 3);
        if (t > 0) __builtin_prefetch(TapeC(a.cs, tape_row - step_rows, col), 0, 3);
        __builtin_prefetch(dys_ahead + col, 0, 3);
      }
    }
    const bool valid = a.lengths == nullptr || t < a.lengths[row];
    float* dz = StepDz(a, t) + row * 4 * H;
    for (int64_t col = lo; col < hi; col += kLanes) {
      if (!valid) {
        #pragma GCC unroll 8
        for (int q = 0; q < 4; ++q) store(dz + q * H + col, vf{});
        continue;
      }
      const int64_t tape_row = TapeRow(t, row, col, B, H);
      vf i = load(TapeGate(a.gates, tape_row, 0, col)), f = load(TapeGate(a.gates, tape_row, 1, col)),
         g = load(TapeGate(a.gates, tape_row, 2, col)), o = load(TapeGate(a.gates, tape_row, 3, col));
      vf c = load(TapeC(a.cs, tape_row, col));
      vf c_prev = t > 0 ? load(TapeC(a.cs, tape_row - step_rows, col)) : load(a.c0 + row * H + col);
      vf tanh_c = vtanh(c);
      vf dh = load(a.dh + row * H + col) + load(a.dys + a.y_rows.at(t, row) + col);
      vf dc = load(a.dc + row * H + col) + dh * o * (1.0f - tanh_c * tanh_c);
      store(dz + col, dc * g * i * (1.0f - i));
      store(dz + H + col, dc * c_prev * f * (1.0f - f));
      store(dz + 2 * H + col, dc * i * (1.0f - g * g));
      store(dz + 3 * H + col, dh * tanh_c * o * (1.0f - o));
      store(a.dc + row * H + col, dc * f);
    }
  }
}

constexpr int kWide = 4;  // column blocks per backward product block

// out[rows, col .. col+LV] = δz_t[rows] Mᵀ[:, col .. col+LV] for R rows, Mᵀ packed by blocks of L columns
// ([4H][L] each): R x V accumulators, so that each loaded row of Mᵀ feeds R products and each broadcast of δz
// feeds V. For δh (Mᵀ = Wᵀ) rows past their length keep their carry; for dxs they are stored (δz is 0 there).
// The V panels of Mᵀ (4H rows of one cache line each, 64 KiB apart at H = 256) stream from L2 once per row block,
// which the hardware prefetchers did not keep ahead of: this product ran at 1.48x the weight-gradient tile's time
// per FLOP. Prefetched 16 lines ahead, 1.20x; training step, in-process A/B, bit-identical: 0.95-0.96x at
// (64, 34, 200, 256), 0.95x at (128, 100, 256, 512), 0.97x at (32, 500, 64, 128), 0.92x at (1, 100, 128, 256)
// (8 lines ahead: 0.954x, 32: 0.975x at the first; the AVX2 build on the same CPU: 1.006x). Prefetching δz's
// rows as well did not help (0.99x, 1.00x), nor the forward's weights (0.99x; 1.35x for the forward at batch 1,
// where the prefetches doubled the loop's loads).
constexpr int kPanelAhead = 16;
template <int R, int V>
__attribute__((noinline)) void DzProductBlock(const BackwardArgs& a, int64_t t, int64_t r0, int64_t col,
                                              const float* packed, float* out, int64_t ldo, int64_t out_width,
                                              bool keep_finished_rows) {
  const int64_t H4 = 4 * a.hidden;
  const float* dz = StepDz(a, t) + r0 * H4;
  vf acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[r][v] = vf{};
  }
  TileProduct<R, V, kPanelAhead>(acc, dz, H4, 1, packed + (col / kLanes) * H4 * kLanes, H4 * kLanes, kLanes, H4);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const int64_t row = r0 + r;
    if (keep_finished_rows && a.lengths != nullptr && t >= a.lengths[row]) continue;
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      float* at = out + row * ldo + col + v * kLanes;
      const int64_t left = out_width - col - v * kLanes;  // out's columns from here: a padded vector's are fewer
      if (left >= kLanes) {
        store(at, acc[r][v]);
      } else {
        for (int64_t u = 0; u < left; ++u) at[u] = acc[r][v][u];
      }
    }
  }
}

// Columns lo .. hi of δz_t Mᵀ into out's first out_width columns: columns outside, rows inside, as in the forward
// loop; each row block takes its columns in tiles of TileWidth<R>() column blocks (4 with AVX-512, 2 for 6 rows
// with AVX2), and the rest in one narrower tile (WithTileWidth).
void DzProduct(const BackwardArgs& a, int64_t t, int64_t lo, int64_t hi, const float* packed, float* out,
               int64_t ldo, int64_t out_width, bool keep_finished_rows) {
  for (int64_t col = lo; col < hi; col += kWide * kLanes) {
    const int64_t end = std::min(hi, col + kWide * kLanes);
    ForEachRowBlock(a.batch, [&](auto rows, int64_t r0) {
      constexpr int R = decltype(rows)::value, V = TileWidth<R>();
      for (int64_t c = col; c < end;) {
        const int vectors = static_cast<int>(std::min<int64_t>(V, (end - c) / kLanes));
        WithTileWidth<V>(vectors, [&](auto width) {
          DzProductBlock<R, decltype(width)::value>(a, t, r0, c, packed, out, ldo, out_width, keep_finished_rows);
        });
        c += vectors * kLanes;
      }
    });
  }
}

// δh_{t-1} = δz_t Wᵀ, hidden units lo .. hi.
void BackwardProduct(const BackwardArgs& a, int64_t t, int64_t lo, int64_t hi) {
  DzProduct(a, t, lo, hi, a.packed, a.dh, a.hidden, a.hidden, true);
}

// dxs_t = δz_t Uᵀ, input columns lo .. hi (of Ip; those past I are not stored).
void InputGradient(const BackwardArgs& a, int64_t t, int64_t lo, int64_t hi) {
  DzProduct(a, t, lo, hi, a.packed_UT, a.dxs + a.x_rows.at(t, 0), a.x_rows.row, a.in_size, false);
}

// C[r, 0 .. G·L] += Σ_b A[b, r] · D[b, 0 .. G·L] for R rows: C row stride ldc, A [depth][lda], D [depth][G·L].
template <int R, int G>
__attribute__((noinline)) void OuterProductTile(float* C, int64_t ldc, const float* A, int64_t lda, const float* D,
                                                int64_t depth) {
  vf acc[R][G];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) acc[r][g] = load(C + r * ldc + g * kLanes);
  }
  TileProduct<R, G>(acc, A, 1, lda, D, kLanes, G * kLanes, depth);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) store(C + r * ldc + g * kLanes, acc[r][g]);
  }
}

// The column tiles of a backward block (hidden units lo .. hi of each gate): G vectors each (TileWidth<kRows>()),
// and the rest of a gate as one narrower tile. `sums` is where the tile's running sums start in the block's part
// of BackwardArgs::weight_sums: [I + H][width·L].
struct WeightTile {
  int64_t column;  // in dU, dW, db
  int width;       // vectors
  float* sums;
};

int WeightTiles(const BackwardArgs& a, int64_t lo, int64_t hi, WeightTile (&tiles)[4 * kWide]) {
  constexpr int G = TileWidth<kRows>();
  const int64_t H = a.hidden, depth = a.in_size + H, vectors = (hi - lo) / kLanes;
  float* sums = a.weight_sums + 4 * depth * lo;
  int count = 0;
  for (int q = 0; q < 4; ++q, sums += depth * (hi - lo)) {
    for (int64_t v = 0; v < vectors;) {
      const int width = static_cast<int>(std::min<int64_t>(G, vectors - v));
      tiles[count++] = WeightTile{q * H + lo + v * kLanes, width, sums + depth * v * kLanes};
      v += width;
    }
  }
  return count;
}

// dU, dW, db += step t's part for hidden units lo .. hi of every gate: [x_t, h_{t-1}]ᵀ δz_t, a product of depth B
// while δz_t is still in cache. Formed after the loop instead, as one [I+H, T·B]·[T·B, 4H] GEMM over δz read back
// from memory, XLA:CPU ran it at about half the peak matmul rate (benchmarks/RESULTS.md). The block's δz_t is first
// copied into `scratch` by tiles ([tile][B][width·L]), so that the products read it contiguously; in [T, B, 4H]
// its rows lie 16·H bytes apart, the same L1 set at H = 512.
void WeightGradients(const BackwardArgs& a, int64_t t, int64_t lo, int64_t hi, std::vector<float>& scratch) {
  constexpr int G = TileWidth<kRows>();
  const int64_t B = a.batch, H = a.hidden, I = a.in_size, H4 = 4 * H;
  WeightTile tiles[4 * kWide];
  const int count = WeightTiles(a, lo, hi, tiles);
  scratch.resize(4 * B * (hi - lo));
  const float* d[4 * kWide];
  float* out = scratch.data();
  for (int k = 0; k < count; ++k) {
    d[k] = out;
    const float* dz = StepDz(a, t) + tiles[k].column;
    for (int w = 0; w < tiles[k].width; ++w) {
      // The step's sum first, then the running one: added one by one to the running sum, db's T·B terms lost
      // up to 1.5e-7 of their absolute sum (1.7e-5 at (24, 40, 72, 64), against 4.5e-6 for XLA's reduction).
      vf sum = {};
      for (int64_t b = 0; b < B; ++b) {
        vf value = load(dz + b * H4 + w * kLanes);
        store(out + (b * tiles[k].width + w) * kLanes, value);
        sum += value;
      }
      store(a.db + tiles[k].column + w * kLanes, load(a.db + tiles[k].column + w * kLanes) + sum);
    }
    out += B * tiles[k].width * kLanes;
  }
  // Tiles outside, row blocks inside: a tile's δz_t (B·width·L floats, 16 KiB at B = 64 with AVX-512) stays in L1
  // while every row block reads it. With the row blocks outside, each row block read all the block's tiles of
  // δz_t (64 KiB, more than L1) from L2: training step, in-process A/B on the AVX-512 Xeon, 0.94x and 0.97x the
  // time at (64, 34, 200, 256), 0.99x at (128, 100, 256, 512), 0.98x at (32, 500, 64, 128).
  const float* packed = a.packed_inputs + (t & 1) * (I + H) * B;
  const int64_t blocks = RowBlockCount(a);
  for (int k = 0; k < count; ++k) {
    const int64_t ldc = tiles[k].width * kLanes;
    for (int64_t j = 0; j < blocks; ++j) {
      int64_t first;
      int rows;
      RowBlock(a, j, first, rows);
      ForEachRowBlock(rows, [&](auto r, int64_t) {  // one call, with R = rows
        constexpr int R = decltype(r)::value;
        float* c = tiles[k].sums + first * ldc;
        WithTileWidth<G>(tiles[k].width, [&](auto width) {
          OuterProductTile<R, decltype(width)::value>(c, ldc, packed + first * B, R, d[k], B);
        });
      });
    }
  }
}

// Copies a block's running sums into its columns of dU and dW.
void StoreWeightGradients(const BackwardArgs& a, int64_t lo, int64_t hi) {
  const int64_t I = a.in_size, H4 = 4 * a.hidden;
  WeightTile tiles[4 * kWide];
  const int count = WeightTiles(a, lo, hi, tiles);
  for (int k = 0; k < count; ++k) {
    const int64_t bytes = tiles[k].width * kLanes * sizeof(float);
    for (int64_t m = 0; m < I + a.hidden; ++m) {
      float* row = m < I ? a.dU + m * H4 : a.dW + (m - I) * H4;
      std::memcpy(row + tiles[k].column, tiles[k].sums + m * tiles[k].width * kLanes, bytes);
    }
  }
}

// Block `block` of `count` over `vectors` vectors of L columns, cut as evenly as the count allows: columns lo .. hi.
inline void VectorCut(int64_t vectors, int64_t block, int64_t count, int64_t& lo, int64_t& hi) {
  lo = vectors * block / count * kLanes;
  hi = vectors * (block + 1) / count * kLanes;
}

// Columns col .. col+L of Mᵀ, that is rows col .. col+L of M [rows][H4] (zero past `rows`), as the panel
// packed[k][L], k < H4, that DzProductBlock reads. XLA transposed W and U for the kernel before every call
// (with the padding of U's rows, 1.4 % of the training step's perf samples at (64, 34, 200, 256)); here each
// 16 x L tile of the transpose is read and written in L1. H4 is a multiple of 64 (H of 16).
void PackTransposedPanel(float* packed, const float* M, int64_t rows, int64_t col, int64_t H4) {
  constexpr int kDepth = 16;
  const int valid = static_cast<int>(std::min<int64_t>(kLanes, rows - col));
  for (int64_t k0 = 0; k0 < H4; k0 += kDepth) {
    for (int u = 0; u < kLanes; ++u) {
      const float* src = M + (col + u) * H4 + k0;
      float* dst = packed + k0 * kLanes + u;
      if (u < valid) {
        for (int j = 0; j < kDepth; ++j) dst[j * kLanes] = src[j];
      } else {
        for (int j = 0; j < kDepth; ++j) dst[j * kLanes] = 0.0f;
      }
    }
  }
}

// A hidden block is kWide column blocks (4L hidden units). Stage 0 packs their columns of Wᵀ; the stage of step t
// forms their columns of δh_t = δz_{t+1} Wᵀ (which reads every block's δz_{t+1}, finished in the stage
// before) and then their δz_t; the last stage forms δh before the first step. With the input gradient, input
// blocks are about kWide·L columns of dxs each, lagging blocks (Stages), since no later step reads dxs: stage 0
// packs their Uᵀ, the stage of step t forms dxs_{t+1}, the last stage dxs_0. Against input blocks that every
// step waited for (training step, in-process A/B, bit-identical): 0.974x at (64, 34, 200, 256), 0.981x at
// (128, 100, 256, 512), 0.963x at (32, 500, 64, 128).
void RunBackward(const BackwardArgs& a, int index, Stages& stages) {
  const int64_t H = a.hidden, H4 = 4 * H, width = kWide * kLanes, T = a.steps, threads = stages.threads();
  // Hidden blocks of up to kWide vectors, cut as evenly as the count allows, and at least one per thread where
  // there are vectors enough: at H = 64, one block of four vectors left the other thread only input blocks.
  // Training step, in-process A/B, bit-identical: 0.908x at (32, 50, 64, 64), 0.94x and 0.99x at
  // (64, 50, 128, 64). Rounding the count up to a multiple of the threads everywhere cost more than it gained
  // where it made the tiles narrower: 1.010x and 1.038x at (64, 30, 128, 192) (three blocks of 4 vectors made
  // four of 3).
  const int64_t hidden_vectors = H / kLanes;
  const int64_t blocks = std::min(hidden_vectors, std::max((H + width - 1) / width, threads));
  // Input blocks: a multiple of the thread count where there are vectors enough, so that each thread's range
  // holds as many. At (32, 500, 64, 128) the one input block (I = 64, four vectors) went to one thread, which
  // the other then waited for at the end of every step: two blocks took 0.923x and 0.954x the training time
  // (in-process A/B, 40 rounds each, bit-identical), 0.949x at (32, 100, 192, 256) (three blocks made four).
  const int64_t in_vectors = a.in_padded / kLanes;
  const int64_t input_blocks =
      std::min(in_vectors, ((a.in_padded + width - 1) / width + threads - 1) / threads * threads);
  const int64_t input_count = a.dxs != nullptr ? input_blocks : 0;
  std::vector<float> scratch;  // this thread's copy of a block's δz_t for WeightGradients
  // This block's share of the next step's packed inputs (see BackwardArgs::packed_inputs).
  auto pack_share = [&](int64_t t, int64_t block) {
    const int64_t n = RowBlockCount(a);
    PackInputs(a, t, n * block / blocks, n * (block + 1) / blocks);
  };
  auto input_block = [&](int64_t s, int64_t block) {
    // Whole vectors, cut as evenly as the block count allows: at I = 200, 13 vectors in 4 blocks as 3, 3, 3, 4.
    // Cut as 4, 4, 4, 1, one thread's range held a quarter block less work, and it waited for the other at the
    // end of every step: training step at (64, 34, 200, 256), in-process A/B, 0.974x, 0.972x and 0.978x the time
    // (60, 80 and 60 rounds, with the 6x3 tiles of DzProduct), 0.987x at (64, 50, 100, 256); bit-identical.
    int64_t lo, hi;
    VectorCut(in_vectors, block, input_count, lo, hi);
    if (s == 0) {
      for (int64_t col = lo; col < hi; col += kLanes) {
        PackTransposedPanel(a.packed_UT + (col / kLanes) * H4 * kLanes, a.U, a.in_size, col, H4);
      }
    } else if (s <= T) {
      if (T - s + 1 < T) InputGradient(a, T - s + 1, lo, hi);
    } else {
      InputGradient(a, 0, lo, hi);
    }
  };
  auto run = [&](int64_t s, int64_t block) {
    if (s == 0) a.prefaults.PopulatePart(block, blocks + input_count);
    int64_t lo, hi;
    VectorCut(hidden_vectors, block, blocks, lo, hi);
    if (s == 0) {
      for (int64_t col = lo; col < hi; col += kLanes) {
        PackTransposedPanel(a.packed + (col / kLanes) * H4 * kLanes, a.W, H, col, H4);
      }
      if (a.dW != nullptr) {  // this block's weight-gradient sums start at zero
        std::memset(a.weight_sums + 4 * (a.in_size + H) * lo, 0, 4 * (a.in_size + H) * (hi - lo) * sizeof(float));
        for (int q = 0; q < 4; ++q) std::memset(a.db + q * H + lo, 0, (hi - lo) * sizeof(float));
        pack_share(T - 1, block);
      }
    } else if (s <= T) {
      const int64_t t = T - s;
      if (t + 1 < T) BackwardProduct(a, t + 1, lo, hi);
      BackwardElementwise(a, t, lo, hi);
      if (a.dW != nullptr) {
        WeightGradients(a, t, lo, hi, scratch);
        if (t > 0) pack_share(t - 1, block);
      }
    } else {
      BackwardProduct(a, 0, lo, hi);
      if (a.dW != nullptr) StoreWeightGradients(a, lo, hi);
    }
  };
  stages.Execute(index, T + 2, [&](int64_t) { return blocks; }, [&](int64_t) { return input_count; }, run,
                 [&](int64_t s, int64_t block) {
                   if (s == 0) a.prefaults.PopulatePart(blocks + block, blocks + input_count);
                   input_block(s, block);
                 });
}

// Runs job(index, stages) on `count` threads sharing one Stages, or alone if the team is busy.
void RunOnTeam(int count, const std::function<void(int, Stages&)>& job) {
  if (count > 1) {
    Stages stages(count);
    if (Team::Get().TryRun(count, [&](int index, int) { job(index, stages); })) return;
  }
  Stages alone(1);
  job(0, alone);
}

// Whether the tape's gates are [T, H/16, B, 4, 16] and its cs holds T·B·H floats ([T, H/16, B, 16]).
template <typename Dims>
bool IsTape(Dims gates_dims, int64_t cs_count, int64_t steps, int64_t batch, int64_t hidden) {
  const int64_t expected[] = {steps, hidden / kTapeLanes, batch, 4, kTapeLanes};
  return std::equal(gates_dims.begin(), gates_dims.end(), std::begin(expected), std::end(expected)) &&
         cs_count == steps * batch * hidden;
}

ffi::Error LstmForward(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> U, ffi::Buffer<ffi::F32> W,
                       ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                       ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> h,
                       ffi::ResultBuffer<ffi::F32> c, ffi::ResultBuffer<ffi::F32> ys,
                       ffi::ResultBuffer<ffi::F32> gates, ffi::ResultBuffer<ffi::F32> cs,
                       ffi::ResultBuffer<ffi::F32> h_buffers, int64_t hoisted, int64_t has_lengths) {
  auto dims = xs.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("lstm_forward: xs must be [B, T, F]");
  const int64_t batch = dims[0], steps = dims[1];
  const int64_t hidden = W.dimensions()[0];
  if (hidden % kTapeLanes != 0) return ffi::Error::InvalidArgument("lstm_forward: hidden size must be a multiple of 16");
  if (gates->element_count() != 0 && !IsTape(gates->dimensions(), cs->element_count(), steps, batch, hidden))
    return ffi::Error::InvalidArgument("lstm_forward: the tape must be gates [T, H/16, B, 4, 16] and cs [T, H/16, B, 16]");
  ForwardArgs a{steps, batch, dims[2], hidden, xs.typed_data(), U.typed_data(),
                W.typed_data(), b.typed_data(), h0.typed_data(), c0.typed_data(),
                has_lengths ? lengths.typed_data() : nullptr, nullptr, h->typed_data(), c->typed_data(),
                ys->typed_data(), gates->element_count() ? gates->typed_data() : nullptr,
                cs->element_count() ? cs->typed_data() : nullptr, h_buffers->typed_data(), nullptr, nullptr,
                Prefaults{}};
  a.x_rows = TimeRows::Of(a.steps, a.in_size);
  a.y_rows = TimeRows::Of(a.steps, hidden);
  thread_local std::vector<float> packed, packed_rows;  // reused across calls: no fresh pages to fault in
  packed.resize((a.in_size + hidden) * 4 * hidden);
  a.packed = packed.data();
  packed_rows.resize(2 * a.batch * (a.in_size + hidden));
  a.packed_rows = packed_rows.data();
  // [T, B, 4H], not kept (it may be large); left uninitialised: stage 0 writes every element before use.
  std::unique_ptr<float[]> projected(hoisted ? new float[a.steps * a.batch * 4 * hidden] : nullptr);
  a.projected = projected.get();
  if (a.steps == 0 || a.batch == 0) {
    std::memcpy(a.h, a.h0, a.batch * hidden * sizeof(float));
    std::memcpy(a.c, a.c0, a.batch * hidden * sizeof(float));
    return ffi::Error::Success();
  }
  a.prefaults.Add(a.ys, ys->element_count());
  if (a.gates != nullptr) {
    a.prefaults.Add(a.gates, gates->element_count());
    a.prefaults.Add(a.cs, cs->element_count());
  }
  RunOnTeam(TeamSize(a.batch, a.in_size + hidden, hidden), [&](int index, Stages& stages) { RunForward(a, index, stages); });
  return ffi::Error::Success();
}

ffi::Error LstmBackward(ffi::Buffer<ffi::F32> W, ffi::Buffer<ffi::F32> gates, ffi::Buffer<ffi::F32> cs,
                        ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> dys, ffi::Buffer<ffi::S32> lengths,
                        ffi::Buffer<ffi::F32> dh_in, ffi::Buffer<ffi::F32> dc_in, ffi::Buffer<ffi::F32> xs,
                        ffi::Buffer<ffi::F32> ys, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> U,
                        ffi::ResultBuffer<ffi::F32> dh, ffi::ResultBuffer<ffi::F32> dc,
                        ffi::ResultBuffer<ffi::F32> dz, ffi::ResultBuffer<ffi::F32> dU,
                        ffi::ResultBuffer<ffi::F32> dW, ffi::ResultBuffer<ffi::F32> db,
                        ffi::ResultBuffer<ffi::F32> dxs, int64_t has_lengths, int64_t weight_grads,
                        int64_t keep_dz, int64_t input_grads) {
  auto dims = dys.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("lstm_backward: dys must be [B, T, H]");
  const int64_t batch = dims[0], steps = dims[1];
  const int64_t hidden = dims[2];
  if (hidden % kTapeLanes != 0) return ffi::Error::InvalidArgument("lstm_backward: hidden size must be a multiple of 16");
  if (!IsTape(gates.dimensions(), cs.element_count(), steps, batch, hidden))
    return ffi::Error::InvalidArgument("lstm_backward: the tape must be gates [T, H/16, B, 4, 16] and cs [T, H/16, B, 16]");
  if (W.dimensions().size() != 2 || W.dimensions()[0] != hidden || W.dimensions()[1] != 4 * hidden)
    return ffi::Error::InvalidArgument("lstm_backward: W must be [H, 4H] with the H of dys");
  BackwardArgs a{steps, batch, hidden, W.typed_data(), gates.typed_data(), cs.typed_data(), c0.typed_data(),
                 dys.typed_data(), has_lengths ? lengths.typed_data() : nullptr, dh->typed_data(),
                 dc->typed_data(), dz->typed_data(), nullptr, 0, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                 nullptr, nullptr, steps, 0, nullptr, nullptr, nullptr, Prefaults{}};
  a.y_rows = TimeRows::Of(a.steps, hidden);
  if (!keep_dz && !weight_grads)
    return ffi::Error::InvalidArgument("lstm_backward: without weight_grads, dz is the result and must be kept");
  if (weight_grads) {
    if (xs.dimensions().size() != 3 || xs.dimensions()[0] != dims[0] || xs.dimensions()[1] != dims[1])
      return ffi::Error::InvalidArgument("lstm_backward: xs must be [B, T, I] like dys");
    a.in_size = xs.dimensions()[2];
    a.xs = xs.typed_data();
    a.ys = ys.typed_data();
    a.h0 = h0.typed_data();
    a.dU = dU->typed_data();
    a.dW = dW->typed_data();
    a.db = db->typed_data();
  }
  thread_local std::vector<float> packed_UT;
  if (input_grads) {
    if (U.dimensions().size() != 2 || U.dimensions()[1] != 4 * hidden ||
        (weight_grads && U.dimensions()[0] != a.in_size))
      return ffi::Error::InvalidArgument("lstm_backward: U must be [I, 4H], with the I of xs");
    a.in_size = U.dimensions()[0];
    a.in_padded = (a.in_size + kLanes - 1) / kLanes * kLanes;
    auto dxs_dims = dxs->dimensions();
    if (dxs_dims.size() != 3 || dxs_dims[0] != dims[0] || dxs_dims[1] != dims[1] || dxs_dims[2] != a.in_size)
      return ffi::Error::InvalidArgument("lstm_backward: dxs must be [B, T, I] like dys, I of U");
    a.U = U.typed_data();
    a.dxs = dxs->typed_data();
    packed_UT.resize(4 * hidden * a.in_padded);
    a.packed_UT = packed_UT.data();
  }
  a.x_rows = TimeRows::Of(a.steps, a.in_size);  // of xs and dxs, where there are
  thread_local std::vector<float> weight_sums, packed_inputs, dz_ring;  // reused across calls, as `packed` below
  if (!keep_dz) {
    dz_ring.resize(3 * a.batch * 4 * hidden);
    a.dz = dz_ring.data();
    a.dz_steps = 3;
  }
  if (weight_grads) {
    weight_sums.resize(4 * (a.in_size + hidden) * hidden);
    a.weight_sums = weight_sums.data();
    packed_inputs.resize(2 * (a.in_size + hidden) * a.batch);
    a.packed_inputs = packed_inputs.data();
  }
  thread_local std::vector<float> packed;
  packed.resize(4 * hidden * hidden);
  a.packed = packed.data();
  std::memcpy(a.dh, dh_in.typed_data(), a.batch * hidden * sizeof(float));
  std::memcpy(a.dc, dc_in.typed_data(), a.batch * hidden * sizeof(float));
  if (a.steps == 0 || a.batch == 0) {
    if (input_grads) std::memset(a.dxs, 0, dxs->element_count() * sizeof(float));
    if (weight_grads) {
      std::memset(a.dU, 0, dU->element_count() * sizeof(float));
      std::memset(a.dW, 0, dW->element_count() * sizeof(float));
      std::memset(a.db, 0, db->element_count() * sizeof(float));
    }
    return ffi::Error::Success();
  }
  if (keep_dz) a.prefaults.Add(a.dz, dz->element_count());
  if (input_grads) a.prefaults.Add(a.dxs, dxs->element_count());
  // The team is sized by all of a step's products (δh, and the weight and input gradients where this loop forms
  // them), not δh's alone: at (32, 100, 200, 32) δh's 262 kFLOPs per step made one thread, the step's 3.6 M two
  // (training step, in-process A/B, bit-identical: 0.855x; 0.985x at (32, 200, 64, 32)).
  const int64_t depth = hidden + (weight_grads ? a.in_size + hidden : 0) + (input_grads ? a.in_padded : 0);
  RunOnTeam(TeamSize(a.batch, depth, hidden), [&](int index, Stages& stages) { RunBackward(a, index, stages); });
  return ffi::Error::Success();
}

}  // namespace

// The vector width this build chose (jaxseq.native.vector_lanes; the tests check it against the CPU's flags).
extern "C" int JaxseqLstmVectorLanes() { return kLanes; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxseqLstmForward, LstmForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("hoisted")
                                  .Attr<int64_t>("has_lengths"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxseqLstmBackward, LstmBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs, ys, h0: empty without weight_grads
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // U: empty without input_grads
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dz: empty without keep_dz
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dU, dW, db: empty without weight_grads
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dxs: empty without input_grads
                                  .Attr<int64_t>("has_lengths")
                                  .Attr<int64_t>("weight_grads")
                                  .Attr<int64_t>("keep_dz")
                                  .Attr<int64_t>("input_grads"));
