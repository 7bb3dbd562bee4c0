// Direct stride-1 convolution kernels for the M-CNN's thin KxK layers on CPU (XLA FFI custom calls).
//
// Layouts: images NHWC, kernels HWIO, all float32. The callers (mcnn_jax/native.py) pad the input to
// 'SAME' first, so every kernel reads only in-bounds memory:
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

// ---------------------------------------------------------------------------------------------------- fwd
// y[0 .. P) pixels, channels [o0, o0 + NV*kVW): x points at xpad[n, h, w0, 0], w at kern[0, 0, 0, o0].
template <int NV, int P>
inline void FwdTile(const float* x, int64_t xrow, const float* w, int k, int C, int O, float* y) {
  vf acc[P][NV];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v) acc[p][v] = vf{};
  const int kc = k * C;
  for (int i = 0; i < k; ++i) {
    const float* xr = x + i * xrow;
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
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v) store(y + static_cast<int64_t>(p) * O + v * kVW, acc[p][v]);
}

template <int NV, int P>
inline void FwdTail(int r, const float* x, int64_t xrow, const float* w, int k, int C, int O, float* y) {
  if constexpr (P > 0) {
    if (r == P) return FwdTile<NV, P>(x, xrow, w, k, C, O, y);
    FwdTail<NV, P - 1>(r, x, xrow, w, k, C, O, y);
  }
}

template <int NV>
void FwdRow(const float* x, int64_t xrow, const float* w, int k, int C, int O, int W, float* y) {
  constexpr int P = kAcc / NV;
  for (int o0 = 0; o0 < O; o0 += NV * kVW) {
    int w0 = 0;
    for (; w0 + P <= W; w0 += P)
      FwdTile<NV, P>(x + static_cast<int64_t>(w0) * C, xrow, w + o0, k, C, O, y + static_cast<int64_t>(w0) * O + o0);
    if (w0 < W)
      FwdTail<NV, P - 1>(W - w0, x + static_cast<int64_t>(w0) * C, xrow, w + o0, k, C, O,
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

// acc[i, q, o] += the contribution of output row (n, h): x points at xpad[n, h, 0, 0], ct at ct[n, h, 0, 0].
template <int NV>
void DkRow(const float* x, int64_t xrow, const float* ct, int k, int C, int O, int W, float* acc) {
  constexpr int Q = kAcc / NV;
  const int kc = k * C;
  for (int i = 0; i < k; ++i) {
    const float* xr = x + i * xrow;
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
  if (x.dimensions()[1] < k || x.dimensions()[2] < k)
    return ffi::Error::InvalidArgument("mcnn conv: padded input smaller than the kernel");
  if (O % kVW != 0)
    return ffi::Error::InvalidArgument("mcnn conv: output channels must be a multiple of " +
                                       std::to_string(kVW));
  return ffi::Error::Success();
}

ffi::Error ConvFwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  if (wd.size() != 4 || wd[0] != wd[1]) return ffi::Error::InvalidArgument("mcnn conv: kernel must be KxKxCxO");
  const int k = static_cast<int>(wd[0]), C = static_cast<int>(wd[2]), O = static_cast<int>(wd[3]);
  if (auto e = CheckShapes(x, k, C, O); e.failure()) return e;
  auto xd = x.dimensions();
  const int64_t N = xd[0], Hp = xd[1], Wp = xd[2];
  const int H = static_cast<int>(Hp - k + 1), W = static_cast<int>(Wp - k + 1);
  auto yd = y->dimensions();
  if (yd.size() != 4 || yd[0] != N || yd[1] != H || yd[2] != W || yd[3] != O)
    return ffi::Error::InvalidArgument("mcnn conv: output shape mismatch");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t xrow = Wp * C;
  const int nv = PickNV(O);
  std::lock_guard<std::mutex> lock(g_mutex);
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int h = 0; h < H; ++h) {
      const float* xs = xp + (n * Hp + h) * xrow;
      float* ys = yp + (n * H + h) * static_cast<int64_t>(W) * O;
      if (nv == 2)
        FwdRow<2>(xs, xrow, wp, k, C, O, W, ys);
      else
        FwdRow<1>(xs, xrow, wp, k, C, O, W, ys);
    }
  return ffi::Error::Success();
}

ffi::Error ConvDkImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> ct, ffi::ResultBuffer<ffi::F32> dk) {
  auto kd = dk->dimensions();
  auto cd = ct.dimensions();
  if (kd.size() != 4 || kd[0] != kd[1]) return ffi::Error::InvalidArgument("mcnn conv dk: kernel must be KxKxCxO");
  const int k = static_cast<int>(kd[0]), C = static_cast<int>(kd[2]), O = static_cast<int>(kd[3]);
  if (auto e = CheckShapes(x, k, C, O); e.failure()) return e;
  auto xd = x.dimensions();
  const int64_t N = xd[0], Hp = xd[1], Wp = xd[2];
  const int H = static_cast<int>(Hp - k + 1), W = static_cast<int>(Wp - k + 1);
  if (cd.size() != 4 || cd[0] != N || cd[1] != H || cd[2] != W || cd[3] != O)
    return ffi::Error::InvalidArgument("mcnn conv dk: output-gradient shape mismatch");
  const float* xp = x.typed_data();
  const float* cp = ct.typed_data();
  float* out = dk->typed_data();
  const int64_t xrow = Wp * C;
  const int64_t size = static_cast<int64_t>(k) * k * C * O;
  const int nv = PickNV(O);
  std::lock_guard<std::mutex> lock(g_mutex);
  const int threads = omp_get_max_threads();
  std::vector<float> partial(static_cast<size_t>(threads) * size, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    float* acc = partial.data() + static_cast<int64_t>(omp_get_thread_num()) * size;
#pragma omp for collapse(2) schedule(static)
    for (int64_t n = 0; n < N; ++n)
      for (int h = 0; h < H; ++h) {
        const float* xs = xp + (n * Hp + h) * xrow;
        const float* cs = cp + (n * H + h) * static_cast<int64_t>(W) * O;
        if (nv == 2)
          DkRow<2>(xs, xrow, cs, k, C, O, W, acc);
        else
          DkRow<1>(xs, xrow, cs, k, C, O, W, acc);
      }
  }
  for (int64_t e = 0; e < size; ++e) {
    float s = 0.0f;
    for (int t = 0; t < threads; ++t) s += partial[static_cast<size_t>(t) * size + e];
    out[e] = s;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(McnnConvFwd, ConvFwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(McnnConvDk, ConvDkImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int mcnn_vector_width() { return kVW; }
extern "C" int mcnn_max_threads() { return omp_get_max_threads(); }
