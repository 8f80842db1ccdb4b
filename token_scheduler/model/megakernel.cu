// tokenpool's batch-1 decode step as one persistent kernel (sm_90): every layer of a llama-family model without
// q/k norms (head_dim 128, bf16), then the final norm and the LM head, in one launch of one CTA an SM.
//
// Why (issue 20): a one-token step is a stream of weights, and the kernel-per-projection path loses ~3 us a
// projection to its stream's ramp and tail (measured: load_tests/diag_persist.py ramp). Grid barriers alone do not
// help (session 40: a barrier costs what a kernel boundary does). What does: a producer warp an SM streams that SM's
// share of every weight of the step, in step order, into a ring of shared-memory slots (cp.async.bulk, an mbarrier a
// slot) and never waits on the data dependencies -- only on free slots. The consumer warps wait on the previous op's
// completion counter (one a layer op, in global memory) and then find their weights already in shared memory. So
// HBM keeps streaming through the layer's sync points (norms, attention, the o -> MLP handoff).
//
// Layout of the step, for each layer l (CTA b of G takes rows [b*N/G, (b+1)*N/G) of each projection):
//   QKV   x += down_out (l > 0; the embedding row at l = 0); v = rmsnorm(x) * ln1; qkv_out = W_qkv v + b
//   ATTN  items (q head, split of SPL cached positions), item i on CTA i mod G: RoPE on q and the new k, the new
//         k/v written to the cache slot (by one item a kv head), partial softmax sums to `part`
//   O     v = the items' partials combined; o_out = W_o v
//   GU    x += o_out; v = rmsnorm(x) * ln2; act[j] = silu(W_gate v)[j] * (W_up v)[j] (rows j of the CTA)
//   DOWN  v = act; down_out = W_down v
// then HEAD: x += down_out; v = rmsnorm(x) * norm; logits = W_head v.
// Every CTA keeps the residual stream x itself (the same arithmetic in each), so only the op outputs cross CTAs.
// Rounding follows HF's bf16 modules (and the Triton path's): outputs of projections, the residual adds, RMSNorm's
// cast before its weight, RoPE's products and sums, silu and its product are each rounded to bf16.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define D 128            // head_dim
#define KP 1536          // columns of a weight piece
#define RG 8             // rows (segments) of a piece: one a consumer warp
#define NCW 8            // consumer warps
#define NCT (NCW * 32)   // consumer threads
#define SLOT (RG * KP * 2)
#ifndef SPL
#define SPL 128          // cached positions of an attention item (a multiple of NCW, <= NCW * 32; H100: 128 won)
#endif
#define PW (SPL / NCW)   // cached positions of an attention warp (lane j < PW: one)
static_assert(SPL % NCW == 0 && PW <= 32, "SPL: a multiple of NCW, at most NCW * 32");
#ifndef VL1
#define VL1 0            // 1: an attention warp's V rows prefetched into L1 before the wait (else L2)
#endif
#define NEG_INF __int_as_float(0xff800000)
#ifndef POLL_NS
#define POLL_NS 20       // the counter poll's sleep
#endif
#ifndef SIGNAL_FENCE
#define SIGNAL_FENCE 0   // 1: __threadfence + atomicAdd instead of red.release
#endif
#ifndef VB
#define VB 16            // V rows loaded at once by an attention warp
#endif
#define NBIAS 64         // qkv bias rows a CTA keeps in shared memory

// P: the step's int64 parameters (megakernel.py builds them; indices below)
enum {
  P_G, P_L, P_HID, P_INTER, P_NH, P_NKV, P_VOCAB, P_BS, P_KVB, P_KVL, P_KV2, P_KVT, P_KVH, P_EPS, P_SCALE,
  P_NSLOT, P_HAS_BIAS, P_SMAX, P_FLAGS, P_PFGU,
  P_TOK, P_POS, P_SB, P_SO, P_CTX, P_BT, P_KV, P_COS, P_SIN, P_EMBED, P_NORM, P_HEAD, P_LOGITS, P_CNT,
  P_QKV, P_OOUT, P_ACT, P_DOUT, P_PART, P_LAYERS, P_TRACE, P_N
};
enum { W_QKV, W_QKVB, W_O, W_GU, W_DOWN, W_LN1, W_LN2, W_N };

__device__ __forceinline__ float bf2f(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ u16 f2bf(float f) {
  u32 u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (u16)(u >> 16);
}
__device__ __forceinline__ float rbf(float f) { return bf2f(f2bf(f)); }

__device__ __forceinline__ float dot8(uint4 a, uint4 b) {
  float s = 0.f;
  u32 aw[4] = {a.x, a.y, a.z, a.w}, bw[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    s = fmaf(__uint_as_float(aw[i] << 16), __uint_as_float(bw[i] << 16), s);
    s = fmaf(__uint_as_float(aw[i] & 0xffff0000u), __uint_as_float(bw[i] & 0xffff0000u), s);
  }
  return s;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// -- mbarriers and bulk copies ---------------------------------------------------------------------------------------
__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(u64* b, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(b)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(u64* b, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u64* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(u64* b, u32 parity) {
  u32 addr = smem_addr(b);
  asm volatile(
      "{\n .reg .pred p;\n"
      "WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra WAIT_%=;\n"
      "}\n" ::"r"(addr), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, u32 bytes, u64* bar, u64 policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
      ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)), "l"(policy) : "memory");
}

// -- cross-CTA completion counters -----------------------------------------------------------------------------------
__device__ __forceinline__ u32 ld_acquire(const u32* p) {
  u32 v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void cbar() { asm volatile("bar.sync 1, %0;" ::"n"(NCT) : "memory"); }
// every consumer thread: wait until *c >= target
// (nowait: diagnostics only, FLAGS bit 1 -- the weight stream without the dependencies, wrong outputs)
__device__ __forceinline__ void wait_count(const u32* c, u32 target, int nowait = 0) {
  if (threadIdx.x == 0 && !nowait) {
#if POLL_NS > 0
    while (ld_acquire(c) < target) __nanosleep(POLL_NS);
#else
    while (ld_acquire(c) < target) {
    }
#endif
  }
  cbar();  // the acquire, then (bar.sync) every consumer thread's reads
}
// every consumer thread, after its writes: count this CTA's part of an op done (the bar.sync orders the CTA's writes
// before thread 0's release)
__device__ __forceinline__ void signal(u32* c) {
  cbar();
#if SIGNAL_FENCE == 1
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(c, 1u);
  }
#elif SIGNAL_FENCE == 2  // (diagnostics only: no ordering of the data before the count)
  if (threadIdx.x == 0) atomicAdd(c, 1u);
#else
  if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(c) : "memory");
#endif
}
__device__ __forceinline__ u64 now_ns() {
  u64 t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}
// what another CTA wrote: read from L2, never a stale L1 line
__device__ __forceinline__ u16 ldcg16(const u16* p) { return __ldcg((const unsigned short*)p); }
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }
__device__ __forceinline__ void prefetch_l1(const void* p) { asm volatile("prefetch.global.L1 [%0];" ::"l"(p)); }
__device__ __forceinline__ void bulk_prefetch_l2(const void* p, u32 bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
}
__device__ __forceinline__ void unpack8(uint4 a, float* f) {
  u32 w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ uint4 pack8(const float* f) {
  u32 w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = (u32)f2bf(f[2 * i]) | ((u32)f2bf(f[2 * i + 1]) << 16);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// -- the walk of one projection's chunks (the producer and the consumers walk it alike) ------------------------------
// A chunk: up to RG row segments of columns [k0, k0 + kw). glu: rows j of gate (W row j) and up (W row inter + j),
// RG/2 of each. `produce` and `consume` walk a CTA's rows [n0, n1) in groups of RG (glu: RG/2) rows, each in pieces
// of KP columns: one chunk (a ring slot) a piece.
struct Walk {
  int n0, n1, K, glu, inter;
};
__device__ __forceinline__ Walk rows_of(int N, int K, int glu, int inter, int b, int G) {
  int n = glu ? inter : N;
  Walk w;
  w.n0 = (int)((long long)n * b / G);
  w.n1 = (int)((long long)n * (b + 1) / G);
  w.K = K;
  w.glu = glu;
  w.inter = inter;
  return w;
}

struct Ring {
  unsigned char* slots;
  u64* full;
  u64* empty;
  u32 nslot;
  u32 it;  // chunks walked so far
};

// producer: stream the chunks of W ([rows, K] row-major) this CTA owns
__device__ void produce(Ring& r, const u16* W, Walk w, u64 policy) {
  int per = w.glu ? RG / 2 : RG;
  for (int g0 = w.n0; g0 < w.n1; g0 += per) {
    int nr = min(per, w.n1 - g0);
    for (int k0 = 0; k0 < w.K; k0 += KP) {
      int kw = min(KP, w.K - k0);
      u32 s = r.it % r.nslot, round = r.it / r.nslot;
      ++r.it;
      mbar_wait(&r.empty[s], (round & 1) ^ 1);
      unsigned char* dst = r.slots + (size_t)s * SLOT;
      u32 seg = (u32)kw * 2;
      int nseg = w.glu ? 2 * nr : nr;
      mbar_expect_tx(&r.full[s], seg * nseg);
      if (kw == w.K) {  // whole rows: the group's rows are contiguous (glu: gate rows, then up rows)
        if (w.glu) {
          bulk_copy(dst, W + (size_t)g0 * w.K, seg * nr, &r.full[s], policy);
          bulk_copy(dst + (size_t)seg * nr, W + (size_t)(w.inter + g0) * w.K, seg * nr, &r.full[s], policy);
        } else {
          bulk_copy(dst, W + (size_t)g0 * w.K, seg * nr, &r.full[s], policy);
        }
      } else {
        for (int i = 0; i < nseg; ++i) {
          int row = w.glu ? (i < nr ? g0 + i : w.inter + g0 + i - nr) : g0 + i;
          bulk_copy(dst + (size_t)seg * i, W + (size_t)row * w.K + k0, seg, &r.full[s], policy);
        }
      }
    }
  }
}

// consumers: y = W v for this CTA's rows; v: bf16 [K] in shared memory. Each warp owns a segment (a row) of a chunk
// and sums it over the pieces; at a group's last piece the rows' sums go to res, and epi(row_index, sums) runs on
// threads < rows of the group (glu: sums[i] gate, sums[nr + i] up).
template <class Epi>
__device__ void consume(Ring& r, Walk w, const u16* v, float* res, Epi epi) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int per = w.glu ? RG / 2 : RG;
  int par = 0;
  for (int g0 = w.n0; g0 < w.n1; g0 += per) {
    int nr = min(per, w.n1 - g0);
    int nseg = w.glu ? 2 * nr : nr;
    float acc = 0.f;
    for (int k0 = 0; k0 < w.K; k0 += KP) {
      int kw = min(KP, w.K - k0);
      u32 s = r.it % r.nslot, round = r.it / r.nslot;
      ++r.it;
      mbar_wait(&r.full[s], round & 1);
      if (warp < nseg) {
        const uint4* wv = (const uint4*)(r.slots + (size_t)s * SLOT + (size_t)warp * kw * 2);
        const uint4* xv = (const uint4*)(v + k0);
        int n8 = kw >> 3;
#pragma unroll 4
        for (int i = lane; i < n8; i += 32) acc += dot8(wv[i], xv[i]);
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&r.empty[s]);
    }
    acc = warp_sum(acc);
    float* rs = res + par * RG;
    if (lane == 0 && warp < nseg) rs[warp] = acc;
    cbar();
    if ((int)threadIdx.x < nr) epi(g0 + (int)threadIdx.x, rs, (int)threadIdx.x, nr);
    par ^= 1;
  }
}

// A norm's weights, loaded before its op waits: thread t holds 8-wide vectors t and t + NCT (hidden <= 16 * NCT).
struct NormW {
  uint4 w[2];
};
__device__ __forceinline__ NormW norm_pre(const u16* nw, int n) {
  NormW r;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    int vi = threadIdx.x + j * NCT;
    r.w[j] = vi < n / 8 ? __ldg((const uint4*)nw + vi) : make_uint4(0, 0, 0, 0);
  }
  return r;
}
// x <- x + delta (bf16, another CTA's output; null: x unchanged); v <- rmsnorm(x) * w. Every consumer thread.
__device__ void add_norm(u16* x, const u16* delta, const NormW& nw, u16* v, int n, float eps, float* red) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float ss = 0.f;
  float xf[2][8];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    int vi = threadIdx.x + j * NCT;
    if (vi < n / 8) {
      unpack8(((const uint4*)x)[vi], xf[j]);
      if (delta) {
        float df[8];
        unpack8(__ldcg((const uint4*)delta + vi), df);
#pragma unroll
        for (int e = 0; e < 8; ++e) xf[j][e] = rbf(xf[j][e] + df[e]);
        ((uint4*)x)[vi] = pack8(xf[j]);
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) ss += xf[j][e] * xf[j][e];
    }
  }
  ss = warp_sum(ss);
  if (lane == 0) red[warp] = ss;
  cbar();
  float tot = 0.f;
#pragma unroll
  for (int i = 0; i < NCW; ++i) tot += red[i];
  float inv = rsqrtf(tot / (float)n + eps);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    int vi = threadIdx.x + j * NCT;
    if (vi < n / 8) {
      float wf[8], o[8];
      unpack8(nw.w[j], wf);
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = wf[e] * rbf(xf[j][e] * inv);
      ((uint4*)v)[vi] = pack8(o);
    }
  }
  cbar();  // v complete, red free
}

extern "C" __global__ void __launch_bounds__(NCT + 32, 1) tp_decode_step(const long long* __restrict__ P) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int G = (int)P[P_G], L = (int)P[P_L], HID = (int)P[P_HID], INTER = (int)P[P_INTER];
  const int NH = (int)P[P_NH], NKV = (int)P[P_NKV], VOCAB = (int)P[P_VOCAB];
  const int QS = NH * D, NQKV = (NH + 2 * NKV) * D;
  const u32 nslot = (u32)P[P_NSLOT];
  const int b = blockIdx.x;
  const long long* LW = (const long long*)P[P_LAYERS];

  // shared memory: ring | v (bf16, max K) | x (bf16, HID) | attention scratch | reductions | bias | barriers
  const int kmax = max(max(HID, QS), INTER);
  unsigned char* p = smem;
  Ring ring;
  ring.slots = p;
  p += (size_t)nslot * SLOT;
  u16* v = (u16*)p;
  p += ((size_t)kmax * 2 + 127) / 128 * 128;
  u16* x = (u16*)p;
  p += ((size_t)HID * 2 + 127) / 128 * 128;
  float* qf = (float*)p;        // q (roped) [D]
  float* kf = qf + D;           // new k (roped) [D]
  float* vf = kf + D;           // new v [D]
  float* wpart = vf + D;        // per-warp attention partials [NCW][D + 2]
  float* red = wpart + NCW * (D + 2);  // [NCW]
  float* res = red + NCW;       // [2][RG]
  float* pbias = res + 2 * RG;  // the CTA's qkv bias rows [NBIAS]
  p = (unsigned char*)(pbias + NBIAS);
  p = (unsigned char*)(((size_t)p + 7) / 8 * 8);
  ring.full = (u64*)p;
  ring.empty = ring.full + nslot;
  ring.nslot = nslot;
  ring.it = 0;

  if (threadIdx.x == 0) {
    for (u32 i = 0; i < nslot; ++i) {
      mbar_init(&ring.full[i], 1);
      mbar_init(&ring.empty[i], NCW);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  const u16* head_w = (const u16*)P[P_HEAD];
  if (threadIdx.x >= NCT) {  // the producer warp: one thread streams the CTA's weights for the whole step
    if (threadIdx.x == NCT) {
      u64 policy;
      asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
      const int pf = (int)P[P_PFGU];
      for (int l = 0; l < L; ++l) {
        const long long* lw = LW + (size_t)l * W_N;
        Walk gu = rows_of(0, HID, 1, INTER, b, G);
        if (pf > 0 && gu.n1 > gu.n0) {
          // the first rows of this layer's gate and up into L2 now: they are streamed while the consumers wait out
          // qkv -> attention -> o, when the ring alone would be full and HBM idle
          u32 bytes = (u32)min(pf, gu.n1 - gu.n0) * HID * 2;
          const u16* wg = (const u16*)lw[W_GU];
          bulk_prefetch_l2(wg + (size_t)gu.n0 * HID, bytes);
          bulk_prefetch_l2(wg + (size_t)(INTER + gu.n0) * HID, bytes);
        }
        produce(ring, (const u16*)lw[W_QKV], rows_of(NQKV, HID, 0, 0, b, G), policy);
        produce(ring, (const u16*)lw[W_O], rows_of(HID, QS, 0, 0, b, G), policy);
        produce(ring, (const u16*)lw[W_GU], gu, policy);
        produce(ring, (const u16*)lw[W_DOWN], rows_of(HID, INTER, 0, 0, b, G), policy);
      }
      produce(ring, head_w, rows_of(VOCAB, HID, 0, 0, b, G), policy);
    }
    return;
  }

  // -- the consumer warps --
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const float eps = __int_as_float((int)P[P_EPS]), scale = __int_as_float((int)P[P_SCALE]);
  const int BS = (int)P[P_BS], SMAX = (int)P[P_SMAX];
  const long long KVB = P[P_KVB], KVL = P[P_KVL], KV2 = P[P_KV2], KVT = P[P_KVT], KVH = P[P_KVH];
  const long long* tok = (const long long*)P[P_TOK];
  const long long pos = ((const long long*)P[P_POS])[0];
  const long long sblk = ((const long long*)P[P_SB])[0], soff = ((const long long*)P[P_SO])[0];
  const int ctx = ((const int*)P[P_CTX])[0];
  const int* bt = (const int*)P[P_BT];
  u16* kv = (u16*)P[P_KV];
  const float* cosp = (const float*)P[P_COS] + pos * D;
  const float* sinp = (const float*)P[P_SIN] + pos * D;
  u32* cnt = (u32*)P[P_CNT];
  u16* qkv_out = (u16*)P[P_QKV];
  u16* o_out = (u16*)P[P_OOUT];
  u16* act = (u16*)P[P_ACT];
  u16* d_out = (u16*)P[P_DOUT];
  float* part = (float*)P[P_PART];
  const int has_bias = (int)P[P_HAS_BIAS];
  const int group = NH / NKV;
  // diagnostics (FLAGS): bit 1 no waits; bit 2 a timestamp (ns) at each op's start (its inputs ready) and end
  const int flags = (int)P[P_FLAGS], nw = flags & 1, no_attn = flags & 4;
  u64* trace = (flags & 2) ? (u64*)P[P_TRACE] + (size_t)b * (L * 5 + 1) * 2 : nullptr;
#define TR(op, end) \
  if (trace && threadIdx.x == 0) trace[(op) * 2 + (end)] = now_ns();
  const int past = ctx - 1;  // cached positions before the new token
  const int S = max(1, (past + SPL - 1) / SPL);  // partials a head
  const int items = NH * S;
  // RoPE's tables at this position, as rope_pair rounds them (threads < D/2: pair i, i + D/2)
  float c1, c2, s1, s2;
  {
    const int i = threadIdx.x % (D / 2);
    c1 = rbf(cosp[i]);
    c2 = rbf(cosp[D / 2 + i]);
    s1 = rbf(sinp[i]);
    s2 = rbf(sinp[D / 2 + i]);
  }
  const Walk wq = rows_of(NQKV, HID, 0, 0, b, G);
  const bool bias_pre = has_bias && wq.n1 - wq.n0 <= NBIAS;

  {  // the embedding row of the token
    const u16* e = (const u16*)P[P_EMBED] + (size_t)tok[0] * HID;
    for (int i = threadIdx.x; i < HID / 8; i += NCT) ((uint4*)x)[i] = __ldg((const uint4*)e + i);
    cbar();
  }

  for (int l = 0; l < L; ++l) {
    const long long* lw = LW + (size_t)l * W_N;
    u32* c = cnt + l * 5;
    // QKV (what does not depend on the step's data is loaded before the wait: the norm's weights, the bias)
    {
      NormW nw1 = norm_pre((const u16*)lw[W_LN1], HID);
      const u16* bias = has_bias ? (const u16*)lw[W_QKVB] : nullptr;
      if (bias_pre && (int)threadIdx.x < wq.n1 - wq.n0) pbias[threadIdx.x] = bf2f(__ldg(bias + wq.n0 + threadIdx.x));
      if (l > 0) wait_count(cnt + (l - 1) * 5 + 4, G, nw);
      TR(l * 5, 0);
      add_norm(x, l > 0 ? d_out : nullptr, nw1, v, HID, eps, red);
      consume(ring, wq, v, res, [&](int row, const float* rs, int i, int) {
        float y = rs[i];
        if (bias) y += bias_pre ? pbias[row - wq.n0] : bf2f(__ldg(bias + row));
        qkv_out[row] = f2bf(y);
      });
    }
    TR(l * 5, 1);
    signal(c + 0);
    // ATTN
    if (b < items) {
      for (int it = b; it < items; it += G) {
        if (no_attn) {  // (diagnostics: FLAGS bit 4, the items' work skipped, their counts kept)
          if (it == b) wait_count(c + 0, G, nw);
          signal(c + 1);
          continue;
        }
        const int h = it / S, s = it % S, g = h / group;
        // before the wait: this warp's 32 cached positions (lane j: position base + j), their K rows into
        // registers and V rows into L2 -- the cache holds them since earlier steps
        const int base = s * SPL + warp * PW, p_end = min((s + 1) * SPL, past);
        const int pj = base + lane;
        const bool ok = lane < PW && pj < p_end;
        const u16* kvl = kv + (long long)l * KVL + (long long)g * KVH;
        long long off = 0;
        uint4 kr[D / 8];
        if (ok) {
          off = (long long)__ldg(bt + pj / BS) * KVB + (long long)(pj % BS) * KVT;
#pragma unroll
          for (int i = 0; i < D / 8; ++i) kr[i] = ((const uint4*)(kvl + off))[i];
          if (VL1) {
            prefetch_l1(kvl + KV2 + off);
            prefetch_l1(kvl + KV2 + off + 64);
          } else {
            prefetch_l2(kvl + KV2 + off);
            prefetch_l2(kvl + KV2 + off + 64);
          }
        }
        if (it == b) {
          wait_count(c + 0, G, nw);
          TR(l * 5 + 1, 0);
        }
        // q and the new k roped (bf16 roundings as rope_pair), the new v
        if (threadIdx.x < D / 2) {
          int i = threadIdx.x;
          float x1 = bf2f(ldcg16(qkv_out + h * D + i)), x2 = bf2f(ldcg16(qkv_out + h * D + D / 2 + i));
          float k1 = bf2f(ldcg16(qkv_out + QS + g * D + i)), k2 = bf2f(ldcg16(qkv_out + QS + g * D + D / 2 + i));
          qf[i] = rbf(rbf(x1 * c1) + rbf(-x2 * s1));
          qf[D / 2 + i] = rbf(rbf(x2 * c2) + rbf(x1 * s2));
          kf[i] = rbf(rbf(k1 * c1) + rbf(-k2 * s1));
          kf[D / 2 + i] = rbf(rbf(k2 * c2) + rbf(k1 * s2));
        } else if (threadIdx.x < D / 2 + D) {
          int i = threadIdx.x - D / 2;
          vf[i] = bf2f(ldcg16(qkv_out + QS + NKV * D + g * D + i));
        }
        cbar();
        if (s == 0 && h % group == 0 && threadIdx.x < D) {  // the new k and v into their cache slot
          u16* slot = kv + sblk * KVB + (long long)l * KVL + soff * KVT + (long long)g * KVH;
          slot[threadIdx.x] = f2bf(kf[threadIdx.x]);
          slot[KV2 + threadIdx.x] = f2bf(vf[threadIdx.x]);
        }
        float m = NEG_INF, lsum = 0.f, a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
        if (base < p_end) {
          float sc = NEG_INF;
          if (ok) {
            float d = 0.f;
#pragma unroll
            for (int i = 0; i < D / 8; ++i) {
              float kk[8];
              unpack8(kr[i], kk);
#pragma unroll
              for (int t = 0; t < 8; ++t) d = fmaf(qf[i * 8 + t], kk[t], d);
            }
            sc = d * scale;
          }
          m = warp_max(sc);
          float pr = ok ? __expf(sc - m) : 0.f;
          lsum = warp_sum(pr);
          const int nv = min(PW, p_end - base);
#pragma unroll
          for (int j0 = 0; j0 < PW; j0 += VB) {
            uint2 vv[VB];
#pragma unroll
            for (int j = 0; j < VB; ++j) {  // VB rows' loads in flight at once
              long long oj = __shfl_sync(0xffffffffu, off, j0 + j);
              vv[j] = j0 + j < nv ? *(const uint2*)(kvl + KV2 + oj + lane * 4) : make_uint2(0, 0);
            }
#pragma unroll
            for (int j = 0; j < VB; ++j) {
              float pj_ = __shfl_sync(0xffffffffu, pr, j0 + j);
              a0 = fmaf(pj_, __uint_as_float(vv[j].x << 16), a0);
              a1 = fmaf(pj_, __uint_as_float(vv[j].x & 0xffff0000u), a1);
              a2 = fmaf(pj_, __uint_as_float(vv[j].y << 16), a2);
              a3 = fmaf(pj_, __uint_as_float(vv[j].y & 0xffff0000u), a3);
            }
          }
        }
        if (warp == 0 && s == S - 1) {  // the new token, from shared memory (the cache walk stops before it)
          float d = qf[lane * 4] * kf[lane * 4] + qf[lane * 4 + 1] * kf[lane * 4 + 1] +
                    qf[lane * 4 + 2] * kf[lane * 4 + 2] + qf[lane * 4 + 3] * kf[lane * 4 + 3];
          float sc = warp_sum(d) * scale;
          float mn = fmaxf(m, sc);
          float f = __expf(m - mn), pn = __expf(sc - mn);
          lsum = lsum * f + pn;
          a0 = a0 * f + pn * vf[lane * 4];
          a1 = a1 * f + pn * vf[lane * 4 + 1];
          a2 = a2 * f + pn * vf[lane * 4 + 2];
          a3 = a3 * f + pn * vf[lane * 4 + 3];
          m = mn;
        }
        float* wp = wpart + warp * (D + 2);
        wp[lane * 4] = a0;
        wp[lane * 4 + 1] = a1;
        wp[lane * 4 + 2] = a2;
        wp[lane * 4 + 3] = a3;
        if (lane == 0) {
          wp[D] = m;
          wp[D + 1] = lsum;
        }
        cbar();
        if (threadIdx.x < D + 2) {  // this item's partial: the warps' sums rescaled to their max
          float mm = NEG_INF;
#pragma unroll
          for (int w = 0; w < NCW; ++w) mm = fmaxf(mm, wpart[w * (D + 2) + D]);
          float out = 0.f;
          int t = threadIdx.x;
#pragma unroll
          for (int w = 0; w < NCW; ++w) {
            float mw = wpart[w * (D + 2) + D];
            float f = mw == NEG_INF ? 0.f : __expf(mw - mm);
            if (t < D) out += f * wpart[w * (D + 2) + t];
            else if (t == D + 1) out += f * wpart[w * (D + 2) + D + 1];
          }
          if (t == D) out = mm;
          part[((size_t)h * SMAX + s) * (D + 2) + t] = out;
        }
        signal(c + 1);  // also frees qf/kf/vf/wpart for the next item
      }
      TR(l * 5 + 1, 1);
    }
    // O: the attention output from the items' partials, one pass over the splits
    wait_count(c + 1, (u32)items, nw);
    TR(l * 5 + 2, 0);
    for (int t = threadIdx.x; t < QS; t += NCT) {
      const float* ph = part + (size_t)(t / D) * SMAX * (D + 2);
      const int d = t % D;
      float mm = NEG_INF, num = 0.f, den = 0.f;
#pragma unroll 4
      for (int s = 0; s < S; ++s) {
        float ms = __ldcg(ph + s * (D + 2) + D), ls = __ldcg(ph + s * (D + 2) + D + 1);
        float as = __ldcg(ph + s * (D + 2) + d);
        float mn = fmaxf(mm, ms), f0 = __expf(mm - mn), f1 = __expf(ms - mn);
        num = num * f0 + as * f1;
        den = den * f0 + ls * f1;
        mm = mn;
      }
      v[t] = f2bf(num / den);
    }
    cbar();
    consume(ring, rows_of(HID, QS, 0, 0, b, G), v, res,
            [&](int row, const float* rs, int i, int) { o_out[row] = f2bf(rs[i]); });
    TR(l * 5 + 2, 1);
    signal(c + 2);
    // GU
    {
      NormW nw2 = norm_pre((const u16*)lw[W_LN2], HID);
      wait_count(c + 2, G, nw);
      TR(l * 5 + 3, 0);
      add_norm(x, o_out, nw2, v, HID, eps, red);
    }
    consume(ring, rows_of(0, HID, 1, INTER, b, G), v, res, [&](int j, const float* rs, int i, int nr) {
      float gt = rbf(rs[i]), up = rbf(rs[nr + i]);
      float a = rbf(gt / (1.f + __expf(-gt)));
      act[j] = f2bf(a * up);
    });
    TR(l * 5 + 3, 1);
    signal(c + 3);
    // DOWN
    wait_count(c + 3, G, nw);
    TR(l * 5 + 4, 0);
    for (int i = threadIdx.x; i < INTER / 8; i += NCT) ((uint4*)v)[i] = __ldcg((const uint4*)act + i);
    cbar();
    consume(ring, rows_of(HID, INTER, 0, 0, b, G), v, res,
            [&](int row, const float* rs, int i, int) { d_out[row] = f2bf(rs[i]); });
    TR(l * 5 + 4, 1);
    signal(c + 4);
  }
  // HEAD
  {
    NormW nwf = norm_pre((const u16*)P[P_NORM], HID);
    wait_count(cnt + (L - 1) * 5 + 4, G, nw);
    TR(L * 5, 0);
    add_norm(x, d_out, nwf, v, HID, eps, red);
  }
  u16* logits = (u16*)P[P_LOGITS];
  consume(ring, rows_of(VOCAB, HID, 0, 0, b, G), v, res,
          [&](int row, const float* rs, int i, int) { logits[row] = f2bf(rs[i]); });
  TR(L * 5, 1);
}
