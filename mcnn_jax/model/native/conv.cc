// Direct stride-1 convolution kernels for the M-CNN's thin KxK layers on CPU (XLA FFI custom calls).
//
// Layouts: images NHWC, kernels HWIO, all float32; xpad is x zero-padded to 'SAME' (k odd: (k-1)/2 on each
// side), which is never built whole: each thread keeps the k padded rows it needs in a small ring buffer.
//
//   mcnn_conv_fwd: y[n, h, w, o]     = sum_{i, j, c} xpad[n, h + i, w + j, c] * kern[i, j, c, o]
//   mcnn_conv_dk:  dk[i, j, c, o]    = sum_{n, h, w} xpad[n, h + i, w + j, c] * ct[n, h, w, o]
//
// The input gradient of a 'SAME' convolution is mcnn_conv_fwd of the padded output gradient with the
// kernel flipped and transposed, so two kernels cover the forward and backward passes.
//
// Both kernels use one fact about NHWC: for a fixed kernel row i, the taps (j, c) of the pixel w sit at
// consecutive addresses xpad[n, h + i, w, 0 .. k*C), i.e. q = j*C + c indexes a contiguous run of k*C
// floats, and the kernel's [i, j, c, :] rows are contiguous in q too. No im2col buffer is ever built.
//
// Register blocking (the compiler keeps `acc` in vector registers):
//   fwd: P output pixels x NV vectors of output channels; per (i, q): NV kernel loads, P broadcasts,
//        P*NV fused multiply-adds.
//   dk:  Q taps x NV vectors of output channels, summed over the pixels of one image row; per pixel:
//        NV loads, Q broadcasts, Q*NV fused multiply-adds.
// P and Q are chosen so that P*NV (Q*NV) accumulators fill about 3/4 of the vector register file.
// Threads: OpenMP over image rows (omp_get_max_threads(), i.e. OMP_NUM_THREADS or the CPU affinity).

#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kVW = 16;  // floats per vector register
constexpr int kAcc = 24;  // accumulators (of 32 registers)
#else
constexpr int kVW = 8;
constexpr int kAcc = 12;  // of 16 (AVX2) registers
#endif

typedef float vf __attribute__((vector_size(kVW * sizeof(float))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }
inline vf bcast(float a) {
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(a);
#elif defined(__AVX__)
  return (vf)_mm256_set1_ps(a);
#else
  return vf{} + a;
#endif
}

// One kernel at a time: XLA may run independent custom calls concurrently, and each one already uses
// every core through OpenMP.
std::mutex g_mutex;

// dst[0 .. n) = x[at ..] where gate is null, else x[at ..] * (gate[at ..] > 0).
inline void Load(float* dst, const float* x, const float* gate, int64_t at, int64_t n) {
  if (gate == nullptr) {
    std::memcpy(dst, x + at, sizeof(float) * n);
    return;
  }
  x += at;
  gate += at;
  for (int64_t e = 0; e < n; ++e) dst[e] = gate[e] > 0.0f ? x[e] : 0.0f;
}

// The k zero-padded rows xpad[n, h .. h + k) of one image, for a thread that walks output rows mostly in
// order: each padded row is copied (into the middle of a zeroed buffer) once per thread, not once per use.
class RowRing {
 public:
  // gate != nullptr: the rows are x * (gate > 0) (the output gradient masked by the ReLU's output).
  RowRing(const float* x, const float* gate, int H, int W, int C, int k)
      : x_(x), gate_(gate), H_(H), W_(W), C_(C), k_(k), lo_((k - 1) / 2), width_(static_cast<int64_t>(W + k - 1) * C),
        buf_(static_cast<size_t>(k + 1) * width_, 0.0f), tag_(k, -1) {}

  // Pointers to the k padded rows of output row h of image n (row i: xpad[n, h + i, 0, 0]).
  void Rows(int64_t n, int h, const float** rows) {
    for (int i = 0; i < k_; ++i) {
      const int r = h + i - lo_;  // source row
      if (r < 0 || r >= H_) {
        rows[i] = zero();
        continue;
      }
      const int slot = r % k_;
      float* dst = buf_.data() + static_cast<int64_t>(slot) * width_;
      const int64_t tag = n * H_ + r;
      if (tag_[slot] != tag) {
        Load(dst + static_cast<int64_t>(lo_) * C_, x_, gate_, tag * W_ * C_, static_cast<int64_t>(W_) * C_);
        tag_[slot] = tag;
      }
      rows[i] = dst;
    }
  }

 private:
  const float* zero() const { return buf_.data() + static_cast<int64_t>(k_) * width_; }
  const float* x_;
  const float* gate_;
  int H_, W_, C_, k_, lo_;
  int64_t width_;
  std::vector<float> buf_;  // k ring slots + one row of zeros; the slots' borders stay zero
  std::vector<int64_t> tag_;
};

// ---------------------------------------------------------------------------------------------------- fwd
// y[0 .. P) pixels, channels [o0, o0 + NV*kVW): rows[i] + off points at xpad[n, h + i, w0, 0], w at
// kern[0, 0, 0, o0].
// CC: the input channels as a compile-time constant (0: use C), so that the P pixel offsets p*C are immediate
// displacements rather than registers (the register tile needs every general-purpose register it can get).
template <int NV, int P, int CC>
inline void FwdTile(const float* const* rows, int64_t off, const float* w, const float* b, bool relu, int k, int Crt,
                    int O, float* y) {
  const int C = CC ? CC : Crt;
  vf acc[P][NV];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v) acc[p][v] = vf{};
  const int kc = k * C;
  for (int i = 0; i < k; ++i) {
    const float* xr = rows[i] + off;
    const float* wr = w + static_cast<int64_t>(i) * kc * O;
    for (int q = 0; q < kc; ++q) {
      vf wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = load(wr + static_cast<int64_t>(q) * O + v * kVW);
      for (int p = 0; p < P; ++p) {
        const vf b = bcast(xr[p * C + q]);
        for (int v = 0; v < NV; ++v) acc[p][v] += b * wv[v];
      }
    }
  }
  vf bias[NV];
  for (int v = 0; v < NV; ++v) bias[v] = load(b + v * kVW);
  const vf zero = vf{};
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v) {
      vf out = acc[p][v] + bias[v];
      if (relu) out = out > zero ? out : zero;
      store(y + static_cast<int64_t>(p) * O + v * kVW, out);
    }
}

template <int NV, int P, int CC>
inline void FwdTail(int r, const float* const* rows, int64_t off, const float* w, const float* b, bool relu, int k,
                    int C, int O, float* y) {
  if constexpr (P > 0) {
    if (r == P) return FwdTile<NV, P, CC>(rows, off, w, b, relu, k, C, O, y);
    FwdTail<NV, P - 1, CC>(r, rows, off, w, b, relu, k, C, O, y);
  }
}

template <int NV, int CC>
void FwdRow(const float* const* rows, const float* w, const float* b, bool relu, int k, int C, int O, int W, float* y) {
  constexpr int P = kAcc / NV;
  for (int o0 = 0; o0 < O; o0 += NV * kVW) {
    int w0 = 0;
    for (; w0 + P <= W; w0 += P)
      FwdTile<NV, P, CC>(rows, static_cast<int64_t>(w0) * C, w + o0, b + o0, relu, k, C, O,
                     y + static_cast<int64_t>(w0) * O + o0);
    if (w0 < W)
      FwdTail<NV, P - 1, CC>(W - w0, rows, static_cast<int64_t>(w0) * C, w + o0, b + o0, relu, k, C, O,
                         y + static_cast<int64_t>(w0) * O + o0);
  }
}

// ----------------------------------------------------------------------------------------------------- dk
// out[q, o0 .. o0 + NV*kVW) += sum_w x[w*C + q] * ct[w*O + o], q in [0, Q), over the W pixels of one row.
template <int NV, int Q>
inline void DkTile(const float* x, const float* ct, int W, int C, int O, float* out) {
  vf acc[Q][NV];
  for (int q = 0; q < Q; ++q)
    for (int v = 0; v < NV; ++v) acc[q][v] = vf{};
  for (int w = 0; w < W; ++w) {
    vf cv[NV];
    for (int v = 0; v < NV; ++v) cv[v] = load(ct + static_cast<int64_t>(w) * O + v * kVW);
    const float* xw = x + static_cast<int64_t>(w) * C;
    for (int q = 0; q < Q; ++q) {
      const vf b = bcast(xw[q]);
      for (int v = 0; v < NV; ++v) acc[q][v] += b * cv[v];
    }
  }
  for (int q = 0; q < Q; ++q)
    for (int v = 0; v < NV; ++v) {
      float* o = out + static_cast<int64_t>(q) * O + v * kVW;
      store(o, load(o) + acc[q][v]);
    }
}

template <int NV, int Q>
inline void DkTail(int r, const float* x, const float* ct, int W, int C, int O, float* out) {
  if constexpr (Q > 0) {
    if (r == Q) return DkTile<NV, Q>(x, ct, W, C, O, out);
    DkTail<NV, Q - 1>(r, x, ct, W, C, O, out);
  }
}

// acc[i, q, o] += the contribution of output row (n, h): rows[i] points at xpad[n, h + i, 0, 0], ct at
// ct[n, h, 0, 0].
template <int NV>
void DkRow(const float* const* rows, const float* ct, int k, int C, int O, int W, float* acc) {
  constexpr int Q = kAcc / NV;
  const int kc = k * C;
  for (int i = 0; i < k; ++i) {
    const float* xr = rows[i];
    float* a = acc + static_cast<int64_t>(i) * kc * O;
    for (int o0 = 0; o0 < O; o0 += NV * kVW) {
      int q0 = 0;
      for (; q0 + Q <= kc; q0 += Q) DkTile<NV, Q>(xr + q0, ct + o0, W, C, O, a + static_cast<int64_t>(q0) * O + o0);
      if (q0 < kc) DkTail<NV, Q - 1>(kc - q0, xr + q0, ct + o0, W, C, O, a + static_cast<int64_t>(q0) * O + o0);
    }
  }
}

// NV: vectors of output channels per tile, the largest of 1, 2 that divides O / kVW (O % kVW == 0 checked).
inline int PickNV(int O) { return (O / kVW) % 2 == 0 ? 2 : 1; }

ffi::Error CheckShapes(ffi::Buffer<ffi::F32>& x, int64_t k, int64_t C, int64_t O) {
  if (x.dimensions().size() != 4) return ffi::Error::InvalidArgument("mcnn conv: input must be NHWC");
  if (x.dimensions()[3] != C) return ffi::Error::InvalidArgument("mcnn conv: input channels != kernel's");
  if (k % 2 == 0) return ffi::Error::InvalidArgument("mcnn conv: the kernel size must be odd");
  if (O % kVW != 0)
    return ffi::Error::InvalidArgument("mcnn conv: output channels must be a multiple of " +
                                       std::to_string(kVW));
  return ffi::Error::Success();
}

template <int NV>
void FwdRowC(const float* const* rows, const float* w, const float* b, bool relu, int k, int C, int O, int W,
             float* y) {
  switch (C) {  // the M-CNN's input widths as constants; any other C works too, a little slower
    case 3: return FwdRow<NV, 3>(rows, w, b, relu, k, C, O, W, y);
    case 16: return FwdRow<NV, 16>(rows, w, b, relu, k, C, O, W, y);
    case 32: return FwdRow<NV, 32>(rows, w, b, relu, k, C, O, W, y);
    case 64: return FwdRow<NV, 64>(rows, w, b, relu, k, C, O, W, y);
    default: return FwdRow<NV, 0>(rows, w, b, relu, k, C, O, W, y);
  }
}

inline void FwdRowFor(int nv, const float* const* rows, const float* w, const float* b, bool relu, int k, int C,
                      int O, int W, float* y) {
  if (nv == 2)
    FwdRowC<2>(rows, w, b, relu, k, C, O, W, y);
  else
    FwdRowC<1>(rows, w, b, relu, k, C, O, W, y);
}

bool SameShape(ffi::Buffer<ffi::F32>& a, ffi::Buffer<ffi::F32>& b) {
  auto da = a.dimensions(), db = b.dimensions();
  if (da.size() != db.size()) return false;
  for (size_t i = 0; i < da.size(); ++i)
    if (da[i] != db[i]) return false;
  return true;
}

// y = conv(x * (gate > 0) if gated else x, kern) + bias, then max(., 0) if relu.
ffi::Error ConvFwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gate, ffi::Buffer<ffi::F32> w,
                       ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, bool gated, bool relu) {
  auto wd = w.dimensions();
  if (wd.size() != 4 || wd[0] != wd[1]) return ffi::Error::InvalidArgument("mcnn conv: kernel must be KxKxCxO");
  const int k = static_cast<int>(wd[0]), C = static_cast<int>(wd[2]), O = static_cast<int>(wd[3]);
  if (auto e = CheckShapes(x, k, C, O); e.failure()) return e;
  if (gated && !SameShape(x, gate)) return ffi::Error::InvalidArgument("mcnn conv: gate shape != input shape");
  if (bias.element_count() != O) return ffi::Error::InvalidArgument("mcnn conv: bias size != output channels");
  auto xd = x.dimensions();
  const int64_t N = xd[0];
  const int H = static_cast<int>(xd[1]), W = static_cast<int>(xd[2]);
  auto yd = y->dimensions();
  if (yd.size() != 4 || yd[0] != N || yd[1] != H || yd[2] != W || yd[3] != O)
    return ffi::Error::InvalidArgument("mcnn conv: output shape mismatch");
  const float* xp = x.typed_data();
  const float* gp = gated ? gate.typed_data() : nullptr;
  const float* wp = w.typed_data();
  const float* bp = bias.typed_data();
  float* yp = y->typed_data();
  const int nv = PickNV(O);
  std::lock_guard<std::mutex> lock(g_mutex);
#pragma omp parallel
  {
    RowRing ring(xp, gp, H, W, C, k);
    std::vector<const float*> rows(k);
#pragma omp for collapse(2) schedule(static)
    for (int64_t n = 0; n < N; ++n)
      for (int h = 0; h < H; ++h) {
        ring.Rows(n, h, rows.data());
        float* ys = yp + (n * H + h) * static_cast<int64_t>(W) * O;
        FwdRowFor(nv, rows.data(), wp, bp, relu, k, C, O, W, ys);
      }
  }
  return ffi::Error::Success();
}

// dk = the kernel gradient and db = the bias gradient of conv(x, kern) + bias, for the output gradient
// ct * (gate > 0) if gated else ct.
ffi::Error ConvDkImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> ct, ffi::Buffer<ffi::F32> gate,
                      ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> db, bool gated) {
  auto kd = dk->dimensions();
  auto cd = ct.dimensions();
  if (kd.size() != 4 || kd[0] != kd[1]) return ffi::Error::InvalidArgument("mcnn conv dk: kernel must be KxKxCxO");
  const int k = static_cast<int>(kd[0]), C = static_cast<int>(kd[2]), O = static_cast<int>(kd[3]);
  if (auto e = CheckShapes(x, k, C, O); e.failure()) return e;
  if (gated && !SameShape(ct, gate)) return ffi::Error::InvalidArgument("mcnn conv dk: gate shape != ct shape");
  auto xd = x.dimensions();
  const int64_t N = xd[0];
  const int H = static_cast<int>(xd[1]), W = static_cast<int>(xd[2]);
  if (cd.size() != 4 || cd[0] != N || cd[1] != H || cd[2] != W || cd[3] != O)
    return ffi::Error::InvalidArgument("mcnn conv dk: output-gradient shape mismatch");
  if (db->element_count() != O) return ffi::Error::InvalidArgument("mcnn conv dk: db size != output channels");
  const float* xp = x.typed_data();
  const float* cp = ct.typed_data();
  const float* gp = gated ? gate.typed_data() : nullptr;
  const int64_t size = static_cast<int64_t>(k) * k * C * O + O;  // dk, then db
  const int64_t row = static_cast<int64_t>(W) * O;
  const int nv = PickNV(O);
  std::lock_guard<std::mutex> lock(g_mutex);
  const int threads = omp_get_max_threads();
  std::vector<float> partial(static_cast<size_t>(threads) * size, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    float* acc = partial.data() + static_cast<int64_t>(omp_get_thread_num()) * size;
    float* dbacc = acc + size - O;
    RowRing ring(xp, nullptr, H, W, C, k);
    std::vector<const float*> rows(k);
    std::vector<float> masked(gp ? row : 0);
#pragma omp for collapse(2) schedule(static)
    for (int64_t n = 0; n < N; ++n)
      for (int h = 0; h < H; ++h) {
        ring.Rows(n, h, rows.data());
        const int64_t at = (n * H + h) * row;
        const float* cs = cp + at;
        if (gp) {
          Load(masked.data(), cp, gp, at, row);
          cs = masked.data();
        }
        for (int w = 0; w < W; ++w)
          for (int o = 0; o < O; ++o) dbacc[o] += cs[static_cast<int64_t>(w) * O + o];
        if (nv == 2)
          DkRow<2>(rows.data(), cs, k, C, O, W, acc);
        else
          DkRow<1>(rows.data(), cs, k, C, O, W, acc);
      }
  }
  float* out = dk->typed_data();
  float* dbo = db->typed_data();
  for (int64_t e = 0; e < size; ++e) {
    float s = 0.0f;
    for (int t = 0; t < threads; ++t) s += partial[static_cast<size_t>(t) * size + e];
    if (e < size - O)
      out[e] = s;
    else
      dbo[e - (size - O)] = s;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(McnnConvFwd, ConvFwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gate (read only if gated)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<bool>("gated")
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(McnnConvDk, ConvDkImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ct
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gate (read only if gated)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // db
                                  .Attr<bool>("gated"));

extern "C" int mcnn_vector_width() { return kVW; }
extern "C" int mcnn_max_threads() { return omp_get_max_threads(); }
