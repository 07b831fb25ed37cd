// Three bfloat16 kernels for XLA's CPU backend, registered as XLA FFI targets:
//   paligemma_bf16_matvec: y (X, O) float32 = x (X, I) float32 . w (O, I) bfloat16, for few
//     rows X (decoding);
//   paligemma_bf16_gemm: the same product for many rows (prefill);
//   paligemma_bf16_rows: rows (X, D) float32 = table (V, D) bfloat16 at index (X,) (the
//     embedding lookup).
//
// Why a kernel: on CPUs without bfloat16 arithmetic XLA widens bfloat16 weights to float32
// in a pass of its own before the dot, so a bfloat16 decode step reads and writes more bytes
// than a float32 one. Here each weight row is widened in registers (a bfloat16 is the top
// half of a float32) and read from memory once, for all X rows.
//
// The prefill product is bound by arithmetic, but XLA's pass still writes a float32 copy of
// each weight on every call, and holds those copies at once (the 3B model's prefill took
// 6.7 GiB more at its peak). Here a block of 12 weight rows x 256 inputs is widened into a
// buffer that stays in L1 while it meets every row of x (packed in panels of 32 rows).
//
// The lookup: XLA's CPU backend has no bfloat16 dynamic-slice or gather; it widens the whole
// table to float32 first, and in a decode loop that widening is hoisted out of the loop and
// runs on every decode call (1 GB written for a 257k x 1024 embedding).
//
// Built by cpu_kernels.py with the compiler of the machine (-march=native) and registered on
// the CPU platform.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "Widen reads bfloat16 pairs as words");

constexpr int kLanes = 16;
constexpr int kStep = 2 * kLanes;  // weights widened at a time
constexpr int kOut = 4;            // weight rows read side by side
typedef float Floats __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint32_t Words __attribute__((vector_size(kLanes * sizeof(uint32_t))));

// 32 bfloat16 weights as two float32 vectors without a shuffle: each 32-bit word holds
// weights 2k (low half) and 2k + 1 (high half), so a shift gives the even ones and a mask
// the odd ones. x is packed to match (`Pack`).
inline void Widen(const uint16_t* w, Floats& even, Floats& odd) {
  Words bits;
  std::memcpy(&bits, w, sizeof(bits));
  const Words lo = bits << 16, hi = bits & 0xFFFF0000u;
  std::memcpy(&even, &lo, sizeof(even));
  std::memcpy(&odd, &hi, sizeof(odd));
}

inline float Widen1(uint16_t w) {
  uint32_t bits = uint32_t(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline Floats Load(const float* x) {
  Floats f;
  std::memcpy(&f, x, sizeof(f));
  return f;
}

// Halving sums: a chain of 16 scalar adds would cost more than a row of 1024 weights.
inline float Sum(Floats v) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof(lanes));
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  return lanes[0];
}

// The R x OW block of y at rows [r0, r0 + R) and outputs [o, o + OW): each vector of x is
// loaded once for OW weight rows, and each widened weight vector used for R rows of x.
template <int R, int OW>
inline void Block(const float* x, const float* packed, const uint16_t* w, float* y, int64_t n,
                  int64_t num_out, int64_t r0, int64_t o) {
  Floats acc[R][OW] = {};
  const int64_t body = n - n % kStep;
  for (int64_t i = 0; i < body; i += kStep) {
    Floats even[OW], odd[OW];
    // The next block of OW rows is contiguous: fetch it OW lines per step, so that it is in
    // cache when this block is done.
    const uint16_t* next = w + (o + OW) * n + i * OW;
    for (int j = 0; j < OW; ++j) {
      __builtin_prefetch(next + j * kStep);
      Widen(w + (o + j) * n + i, even[j], odd[j]);
    }
    for (int r = 0; r < R; ++r) {
      const float* xr = packed + (r0 + r) * body + i;
      const Floats xe = Load(xr), xo = Load(xr + kLanes);
      for (int j = 0; j < OW; ++j) acc[r][j] += xe * even[j];
      for (int j = 0; j < OW; ++j) acc[r][j] += xo * odd[j];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < OW; ++j) {
      float s = Sum(acc[r][j]);
      for (int64_t i = body; i < n; ++i) s += x[(r0 + r) * n + i] * Widen1(w[(o + j) * n + i]);
      y[(r0 + r) * num_out + o + j] = s;
    }
  }
}

// x (X, I) with each group of 32 reordered as its 16 even then its 16 odd elements (the
// tail of I % 32 left out): the order in which `Widen` yields the weights.
std::vector<float> Pack(const float* x, int64_t rows, int64_t n) {
  const int64_t body = n - n % kStep;
  std::vector<float> packed(rows * body);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < body; i += kStep)
      for (int k = 0; k < kLanes; ++k) {
        packed[r * body + i + k] = x[r * n + i + 2 * k];
        packed[r * body + i + kLanes + k] = x[r * n + i + 2 * k + 1];
      }
  return packed;
}

// All rows of x against weight rows [o, o + OW): after the first group of rows, the OW
// weight rows are read again from the L1 cache, not from memory.
template <int OW>
inline void Rows(const float* x, const float* packed, const uint16_t* w, float* y,
                 int64_t rows, int64_t n, int64_t num_out, int64_t o) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) Block<4, OW>(x, packed, w, y, n, num_out, r, o);
  for (; r < rows; ++r) Block<1, OW>(x, packed, w, y, n, num_out, r, o);
}

struct Work {
  const float* x;
  std::vector<float> packed;
  const uint16_t* w;
  float* y;
  int64_t rows, n, num_out, chunk, num_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Claims chunks of outputs until none are left. A task that starts after the last chunk was
// claimed touches nothing but the counter, so the caller never waits on an idle thread.
void Drain(Work& work) {
  for (int64_t c; (c = work.next.fetch_add(1)) < work.num_chunks;) {
    const int64_t end = std::min(work.num_out, (c + 1) * work.chunk);
    const float* packed = work.packed.data();
    int64_t o = c * work.chunk;
    for (; o + kOut <= end; o += kOut)
      Rows<kOut>(work.x, packed, work.w, work.y, work.rows, work.n, work.num_out, o);
    for (; o < end; ++o)
      Rows<1>(work.x, packed, work.w, work.y, work.rows, work.n, work.num_out, o);
    work.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error MatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("paligemma_bf16_matvec: x (X, I) and w (O, I) expected");
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->w = reinterpret_cast<const uint16_t*>(w.typed_data());
  work->y = y->typed_data();
  work->rows = xd[0];
  work->packed = Pack(work->x, xd[0], xd[1]);
  work->n = xd[1];
  work->num_out = wd[0];
  // About 256 KiB of weights per chunk: small enough to balance two threads, large enough
  // that claiming a chunk costs nothing next to reading it.
  work->chunk = std::max<int64_t>(1, (256 << 10) / (2 * std::max<int64_t>(1, work->n)));
  work->num_chunks = (work->num_out + work->chunk - 1) / work->chunk;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->num_chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { Drain(*work); });
  Drain(*work);
  while (work->done.load(std::memory_order_acquire) < work->num_chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

// ---- many rows (prefill): y (X, O) = x (X, I) . w (O, I), w bfloat16 widened as it is packed.
constexpr int kPanel = 2 * kLanes;  // rows of x per packed panel
constexpr int kMr = 12;             // weight rows per micro-kernel: 24 accumulators
constexpr int kKc = 256;            // inputs per block: a block of kMr widened rows fits L1
constexpr int kWs = kKc + kLanes;   // their padded stride (rows kKc apart would share L1 sets)
constexpr int kChunkOut = 4 * kMr;  // outputs a thread claims at a time

inline void Store(float* p, Floats v) { std::memcpy(p, &v, sizeof(v)); }

// acc (MR, NV vectors of rows) = sum over kc of panel (kc, NV * 16) x widened rows (MR, kWs);
// stored to, or added into, ct (MR rows of stride ldc).
template <int MR, int NV>
inline void Micro(const float* panel, const float* wp, int64_t kc, float* ct, int64_t ldc,
                  bool first) {
  Floats acc[MR][NV] = {};
  for (int64_t k = 0; k < kc; ++k) {
    Floats xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = Load(panel + (k * NV + v) * kLanes);
    for (int r = 0; r < MR; ++r) {
      const float b = wp[r * kWs + k];
      for (int v = 0; v < NV; ++v) acc[r][v] += xv[v] * b;
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      float* c = ct + r * ldc + v * kLanes;
      Store(c, first ? acc[r][v] : Load(c) + acc[r][v]);
    }
}

struct GemmWork {
  const float* x;
  const uint16_t* w;
  float* y;
  int64_t rows, n, num_out, num_panels, num_chunks, padded_rows;
  std::vector<float> packed;  // panel p: (n, width_p) at p * n * kPanel
  std::atomic<int64_t> next_panel{0}, panels_done{0}, next{0}, done{0};
};

inline int64_t PanelWidth(const GemmWork& g, int64_t p) {
  return g.rows - p * kPanel > kLanes ? kPanel : kLanes;
}

// x's rows [32p, 32p + 32) transposed to (n, width), zero past the last row.
void PackPanel(GemmWork& g, int64_t p) {
  const int64_t t0 = p * kPanel, width = PanelWidth(g, p);
  const int64_t valid = std::min(width, g.rows - t0), n = g.n;
  float* dst = g.packed.data() + p * n * kPanel;
  for (int64_t k0 = 0; k0 < n; k0 += kLanes) {
    const int64_t kn = std::min<int64_t>(kLanes, n - k0);
    for (int64_t j = 0; j < width; ++j) {
      const float* src = g.x + (t0 + j) * n + k0;
      for (int64_t k = 0; k < kn; ++k) dst[(k0 + k) * width + j] = j < valid ? src[k] : 0.f;
    }
  }
}

template <int MR>
void Panels(GemmWork& g, const float* wp, int64_t kc, int64_t k0, float* ct, bool first) {
  for (int64_t p = 0; p < g.num_panels; ++p) {
    const int64_t width = PanelWidth(g, p);
    const float* panel = g.packed.data() + p * g.n * kPanel + k0 * width;
    if (width == kPanel) Micro<MR, 2>(panel, wp, kc, ct + p * kPanel, g.padded_rows, first);
    else Micro<MR, 1>(panel, wp, kc, ct + p * kPanel, g.padded_rows, first);
  }
}

template <int MR>
void PanelsUpTo(int mr, GemmWork& g, const float* wp, int64_t kc, int64_t k0, float* ct,
                bool first) {
  if (mr == MR) Panels<MR>(g, wp, kc, k0, ct, first);
  else if constexpr (MR > 1) PanelsUpTo<MR - 1>(mr, g, wp, kc, k0, ct, first);
}

// Packs panels until none are left, waits for the others' panels, then claims chunks of
// kChunkOut outputs: for each block of kKc inputs, kMr weight rows at a time are widened
// into wp and run against every panel; the chunk's (outputs, rows) sums are transposed into y.
void GemmDrain(GemmWork& g) {
  for (int64_t p; (p = g.next_panel.fetch_add(1)) < g.num_panels;) {
    PackPanel(g, p);
    g.panels_done.fetch_add(1, std::memory_order_release);
  }
  if (g.next.load() >= g.num_chunks) return;
  while (g.panels_done.load(std::memory_order_acquire) < g.num_panels) std::this_thread::yield();
  std::vector<float> ct(kChunkOut * g.padded_rows);
  alignas(64) float wp[kMr * kWs];
  const int64_t n = g.n;
  for (int64_t c; (c = g.next.fetch_add(1)) < g.num_chunks;) {
    const int64_t o0 = c * kChunkOut, end = std::min(g.num_out, o0 + kChunkOut);
    for (int64_t k0 = 0; k0 < n; k0 += kKc) {
      const int64_t kc = std::min<int64_t>(kKc, n - k0);
      for (int64_t o = o0; o < end; o += kMr) {
        const int mr = std::min<int64_t>(kMr, end - o);
        for (int r = 0; r < mr; ++r)
          for (int64_t k = 0; k < kc; ++k) wp[r * kWs + k] = Widen1(g.w[(o + r) * n + k0 + k]);
        PanelsUpTo<kMr>(mr, g, wp, kc, k0, ct.data() + (o - o0) * g.padded_rows, k0 == 0);
      }
    }
    for (int64_t t = 0; t < g.rows; ++t)
      for (int64_t o = o0; o < end; ++o) g.y[t * g.num_out + o] = ct[(o - o0) * g.padded_rows + t];
    g.done.fetch_add(1, std::memory_order_release);
  }
}

std::shared_ptr<GemmWork> NewGemm(const float* x, const uint16_t* w, float* y, int64_t rows,
                                  int64_t n, int64_t num_out) {
  auto g = std::make_shared<GemmWork>();
  g->x = x; g->w = w; g->y = y; g->rows = rows; g->n = n; g->num_out = num_out;
  g->num_panels = (rows + kPanel - 1) / kPanel;
  g->padded_rows = (g->num_panels - 1) * kPanel + PanelWidth(*g, g->num_panels - 1);
  g->packed.resize(g->num_panels * n * kPanel);
  g->num_chunks = (num_out + kChunkOut - 1) / kChunkOut;
  return g;
}

ffi::Error GemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("paligemma_bf16_gemm: x (X, I) and w (O, I) expected");
  if (xd[0] == 0 || wd[0] == 0) return ffi::Error::Success();
  if (xd[1] == 0) {
    std::fill_n(y->typed_data(), xd[0] * wd[0], 0.f);
    return ffi::Error::Success();
  }
  auto work = NewGemm(x.typed_data(), reinterpret_cast<const uint16_t*>(w.typed_data()),
                      y->typed_data(), xd[0], xd[1], wd[0]);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->num_chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { GemmDrain(*work); });
  GemmDrain(*work);
  while (work->done.load(std::memory_order_acquire) < work->num_chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

// Index r is clamped to [0, V) as XLA's dynamic-slice clamps a start index.
ffi::Error RowsImpl(ffi::Buffer<ffi::BF16> table, ffi::Buffer<ffi::S32> index,
                    ffi::ResultBuffer<ffi::F32> rows) {
  const auto td = table.dimensions(), id = index.dimensions();
  if (td.size() != 2 || id.size() != 1 || td[0] < 1)
    return ffi::Error::InvalidArgument("paligemma_bf16_rows: table (V >= 1, D), index (X,)");
  const int64_t v = td[0], d = td[1];
  const auto* w = reinterpret_cast<const uint16_t*>(table.typed_data());
  float* out = rows->typed_data();
  for (int64_t r = 0; r < id[0]; ++r) {
    const int64_t i = std::clamp<int64_t>(index.typed_data()[r], 0, v - 1);
    for (int64_t j = 0; j < d; ++j) out[r * d + j] = Widen1(w[i * d + j]);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PaligemmaBf16Rows, RowsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PaligemmaBf16Matvec, MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PaligemmaBf16Gemm, GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
