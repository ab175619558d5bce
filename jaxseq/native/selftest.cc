// A standalone check of lstm_cpu.cc for the sanitizers (scripts/check_native.sh builds it with
// -fsanitize=thread and with -fsanitize=address,undefined and runs it).
//
// Python and XLA are not instrumented, so a sanitizer preloaded into python reports their code and misses
// nothing of ours that this does not reach: here the FFI handlers are called directly on buffers of random
// data, at several shapes, thread counts, with and without lengths, hoisted or not, every backward variant,
// and from two threads at once, and every result is checked against a naive float64 LSTM and BPTT.
// Exit status 0: all results match; 1: a mismatch (printed); a sanitizer report exits with its own code.
#include "lstm_cpu.cc"

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <type_traits>

// The team has a thread per CPU this process may use (Team's constructor): claim kCpus of them, so that a
// 2-core CI machine also runs teams of 3 and 4 threads (more threads than cores: late and absent threads).
constexpr int kCpus = 4;
extern "C" int sched_getaffinity(pid_t, size_t size, cpu_set_t* set) __THROW {
  std::memset(set, 0, size);
  for (int cpu = 0; cpu < kCpus; ++cpu) CPU_SET_S(cpu, size, set);
  return 0;
}

namespace {

template <typename T, XLA_FFI_DataType kType>
struct Tensor {
  std::vector<T> data;
  std::vector<int64_t> dims;
  XLA_FFI_Buffer buffer;

  explicit Tensor(std::vector<int64_t> shape) : dims(std::move(shape)) {
    int64_t size = 1;
    for (int64_t d : dims) size *= d;
    data.assign(size, T{});
    // Poison the outputs: a result the kernel does not write shows as a mismatch.
    if constexpr (std::is_same_v<T, float>) std::fill(data.begin(), data.end(), NAN);
    buffer = {XLA_FFI_Buffer_STRUCT_SIZE, nullptr, kType, data.data(), static_cast<int64_t>(dims.size()),
              dims.data()};
  }
  Tensor(const Tensor&) = delete;
  T& operator[](int64_t i) { return data[i]; }
};
using F32 = Tensor<float, XLA_FFI_DataType_F32>;
using S32 = Tensor<int32_t, XLA_FFI_DataType_S32>;

ffi::Buffer<ffi::F32> In(const F32& t) { return ffi::Buffer<ffi::F32>(&t.buffer); }
ffi::Buffer<ffi::S32> In(const S32& t) { return ffi::Buffer<ffi::S32>(&t.buffer); }
ffi::ResultBuffer<ffi::F32> Out(F32& t) { return ffi::Buffer<ffi::F32>(&t.buffer); }

struct Case {
  int64_t B, T, I, H;
  bool hoisted, with_lengths;
  int threads;  // JAXSEQ_NATIVE_THREADS, set by the caller (setenv is not safe beside another thread's getenv)
  unsigned seed;
};

double Sigmoid(double x) { return 1 / (1 + std::exp(-x)); }

class Check {
 public:
  explicit Check(const Case& c) : c_(c) {}
  bool ok() const { return errors_ == 0; }

  // Compares n floats with the reference; prints the first few mismatches.
  void Near(const char* what, const float* got, const std::vector<double>& expected) {
    double worst = 0;
    int64_t worst_at = -1;
    for (size_t k = 0; k < expected.size(); ++k) {
      const double error = std::fabs(got[k] - expected[k]) / (1e-4 + 1e-4 * std::fabs(expected[k]));
      if (!(error <= worst)) worst = error, worst_at = static_cast<int64_t>(k);  // NaN included
    }
    if (!(worst <= 1)) {
      ++errors_;
      std::fprintf(stderr, "MISMATCH %s at %lld: got %g, expected %g (B=%lld T=%lld I=%lld H=%lld hoisted=%d "
                   "lengths=%d threads=%d seed=%u)\n", what, static_cast<long long>(worst_at), got[worst_at],
                   expected[worst_at], static_cast<long long>(c_.B), static_cast<long long>(c_.T),
                   static_cast<long long>(c_.I), static_cast<long long>(c_.H), c_.hoisted, c_.with_lengths,
                   c_.threads, c_.seed);
    }
  }
  void Ok(const ffi::Error& error, const char* what) {
    if (error.failure()) {
      ++errors_;
      std::fprintf(stderr, "ERROR %s: %s\n", what, error.message().c_str());
    }
  }

 private:
  Case c_;
  int errors_ = 0;
};

// One case: the forward and the three backward variants against the float64 reference.
bool Run(const Case& c) {
  const int64_t B = c.B, T = c.T, I = c.I, H = c.H, G = 4 * H;
  std::mt19937 rng(c.seed);
  std::uniform_real_distribution<float> uniform(-1, 1);
  F32 xs({B, T, I}), U({I, G}), W({H, G}), b({G}), h0({B, H}), c0({B, H}), dys({B, T, H}), dh_in({B, H}),
      dc_in({B, H});
  S32 lengths({c.with_lengths ? B : 0});
  for (auto& v : xs.data) v = uniform(rng);
  for (auto& v : U.data) v = 0.3f * uniform(rng);
  for (auto& v : W.data) v = 0.3f * uniform(rng);
  for (auto& v : b.data) v = 0.5f * uniform(rng);
  for (auto* t : {&h0, &c0, &dh_in, &dc_in}) for (auto& v : t->data) v = 0.5f * uniform(rng);
  for (auto& v : dys.data) v = uniform(rng);
  std::vector<int64_t> length(B, T);
  for (int64_t r = 1; r < B && c.with_lengths; ++r) length[r] = std::uniform_int_distribution<int64_t>(0, T)(rng);
  for (int64_t r = 0; r < B && c.with_lengths; ++r) lengths[r] = static_cast<int32_t>(length[r]);

  // The reference: forward, keeping each valid step's gates and cell states, then BPTT.
  std::vector<double> h(B * H), cell(B * H), ys(B * T * H, 0.0), gate(T * B * G, 0.0), c_prev(T * B * H, 0.0),
      c_new(T * B * H, 0.0), h_prev(T * B * H, 0.0);
  for (int64_t k = 0; k < B * H; ++k) h[k] = h0[k], cell[k] = c0[k];
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t r = 0; r < B; ++r) {
      if (t >= length[r]) continue;
      double* z = &gate[(t * B + r) * G];
      for (int64_t j = 0; j < G; ++j) {
        double sum = b[j];
        for (int64_t k = 0; k < I; ++k) sum += double(xs[(r * T + t) * I + k]) * U[k * G + j];
        for (int64_t k = 0; k < H; ++k) sum += h[r * H + k] * W[k * G + j];
        z[j] = sum;
      }
      for (int64_t j = 0; j < H; ++j) {
        const double i = Sigmoid(z[j]), f = Sigmoid(z[H + j]), g = std::tanh(z[2 * H + j]), o = Sigmoid(z[3 * H + j]);
        z[j] = i, z[H + j] = f, z[2 * H + j] = g, z[3 * H + j] = o;
        c_prev[(t * B + r) * H + j] = cell[r * H + j];
        h_prev[(t * B + r) * H + j] = h[r * H + j];
        cell[r * H + j] = f * cell[r * H + j] + i * g;
        c_new[(t * B + r) * H + j] = cell[r * H + j];
      }
      for (int64_t j = 0; j < H; ++j) h[r * H + j] = z[3 * H + j] * std::tanh(cell[r * H + j]);
      for (int64_t j = 0; j < H; ++j) ys[(r * T + t) * H + j] = h[r * H + j];
    }
  }
  std::vector<double> dh(B * H), dc(B * H), dz(T * B * G, 0.0), dU(I * G, 0.0), dW(H * G, 0.0), db(G, 0.0),
      dxs(B * T * I, 0.0);
  for (int64_t k = 0; k < B * H; ++k) dh[k] = dh_in[k], dc[k] = dc_in[k];
  for (int64_t t = T - 1; t >= 0; --t) {
    for (int64_t r = 0; r < B; ++r) {
      if (t >= length[r]) continue;  // δz_t = 0; the carry passes through
      const double* a = &gate[(t * B + r) * G];
      double* d = &dz[(t * B + r) * G];
      for (int64_t j = 0; j < H; ++j) {
        const double i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j];
        const double tc = std::tanh(c_new[(t * B + r) * H + j]), dhj = dh[r * H + j] + dys[(r * T + t) * H + j];
        const double dcj = dc[r * H + j] + dhj * o * (1 - tc * tc);
        d[j] = dcj * g * i * (1 - i);
        d[H + j] = dcj * c_prev[(t * B + r) * H + j] * f * (1 - f);
        d[2 * H + j] = dcj * i * (1 - g * g);
        d[3 * H + j] = dhj * tc * o * (1 - o);
        dc[r * H + j] = dcj * f;
      }
      for (int64_t k = 0; k < H; ++k) {
        double sum = 0;
        for (int64_t j = 0; j < G; ++j) sum += d[j] * W[k * G + j];
        dh[r * H + k] = sum;
      }
      for (int64_t k = 0; k < I; ++k) {
        double sum = 0;
        for (int64_t j = 0; j < G; ++j) sum += d[j] * U[k * G + j];
        dxs[(r * T + t) * I + k] = sum;
      }
      for (int64_t j = 0; j < G; ++j) {
        for (int64_t k = 0; k < I; ++k) dU[k * G + j] += xs[(r * T + t) * I + k] * d[j];
        for (int64_t k = 0; k < H; ++k) dW[k * G + j] += h_prev[(t * B + r) * H + k] * d[j];
        db[j] += d[j];
      }
    }
  }

  Check check(c);
  F32 h_out({B, H}), c_out({B, H}), ys_out({B, T, H}), tape_gates({T, H / kTapeLanes, B, 4, kTapeLanes}),
      tape_cs({T, H / kTapeLanes, B, kTapeLanes}), h_buffers({2, B, H});
  check.Ok(LstmForward(In(xs), In(U), In(W), In(b), In(h0), In(c0), In(lengths), Out(h_out), Out(c_out),
                       Out(ys_out), Out(tape_gates), Out(tape_cs), Out(h_buffers), c.hoisted, c.with_lengths),
           "forward");
  check.Near("h", h_out.data.data(), h);
  check.Near("c", c_out.data.data(), cell);
  check.Near("ys", ys_out.data.data(), ys);

  F32 empty({0});
  // keep_dz, weight_grads, input_grads: δz alone; the weight and input gradients without δz; δz and dxs.
  const bool variants[][3] = {{true, false, false}, {false, true, true}, {true, false, true}};
  for (const auto& v : variants) {
    const bool keep_dz = v[0], weight_grads = v[1], input_grads = v[2];
    F32 dh_out({B, H}), dc_out({B, H}), dz_out({keep_dz ? T : 0, B, G}), dU_out({weight_grads ? I : 0, G}),
        dW_out({weight_grads ? H : 0, G}), db_out({weight_grads ? G : 0}), dxs_out({input_grads ? B : 0, T, I});
    check.Ok(LstmBackward(In(W), In(tape_gates), In(tape_cs), In(c0), In(dys), In(lengths), In(dh_in), In(dc_in),
                          In(weight_grads ? xs : empty), In(weight_grads ? ys_out : empty),
                          In(weight_grads ? h0 : empty), In(input_grads ? U : empty), Out(dh_out), Out(dc_out),
                          Out(dz_out), Out(dU_out), Out(dW_out), Out(db_out), Out(dxs_out), c.with_lengths,
                          weight_grads, keep_dz, input_grads),
             "backward");
    check.Near("dh", dh_out.data.data(), dh);
    check.Near("dc", dc_out.data.data(), dc);
    if (keep_dz) check.Near("dz", dz_out.data.data(), dz);
    if (weight_grads) {
      check.Near("dU", dU_out.data.data(), dU);
      check.Near("dW", dW_out.data.data(), dW);
      check.Near("db", db_out.data.data(), db);
    }
    if (input_grads) check.Near("dxs", dxs_out.data.data(), dxs);
  }
  return check.ok();
}

}  // namespace

int main() {
  std::printf("lstm_cpu selftest: %d-float vectors, a team of up to %d threads\n", kLanes, Team::Get().max_threads());
  // (B, T, I, H): one 16-unit block; a batch of 6-row tiles and a rest, a depth past the 96-row passes; two and
  // more threads' work per step (TeamSize: 8·B·(I+H)·H FLOPs over 200 k each, a vector of units each).
  const int64_t shapes[][4] = {{3, 5, 7, 16}, {11, 6, 100, 32}, {24, 8, 72, 64}, {40, 4, 20, 128}};
  int failures = 0, cases = 0;
  unsigned seed = 1;
  for (const auto& s : shapes) {
    for (int threads : {1, 2, 4}) {
      setenv("JAXSEQ_NATIVE_THREADS", std::to_string(threads).c_str(), 1);
      for (int variant = 0; variant < 4; ++variant) {
        failures += !Run({s[0], s[1], s[2], s[3], (variant & 1) != 0, (variant & 2) != 0, threads, seed++});
        ++cases;
      }
    }
  }
  // Two callers at once, as XLA may run two custom calls: one gets the team, the other runs alone (TryRun).
  setenv("JAXSEQ_NATIVE_THREADS", "4", 1);
  for (int round = 0; round < 4; ++round) {
    bool ok[2];
    std::thread other([&] { ok[1] = Run({24, 8, 72, 64, false, true, 4, 1000 + 2u * round}); });
    ok[0] = Run({40, 4, 20, 128, true, true, 4, 1001 + 2u * round});
    other.join();
    failures += !ok[0] + !ok[1];
    cases += 2;
  }
  std::printf("%d of %d cases match the float64 reference\n", cases - failures, cases);
  return failures == 0 ? 0 : 1;
}
