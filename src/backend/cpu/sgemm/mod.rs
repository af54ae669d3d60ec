//! Our f32 GEMM, `C[m x n] = A[m x k] B[k x n]`, with B packed ahead of time.
//!
//! Why not the `gemm` crate any more: it packs B on every call (for a linear layer, the same
//! weight every time), and its AVX-512 path had to be switched off because that per-call packing
//! doubled batch-1 time. Here a weight is packed once, into the layout the micro-kernel reads,
//! and kept beside the tensor ([`super::CpuTensor::packed_b`]); A (activations) is never packed:
//! the micro-kernel reads its rows where they are (packing A measured 11% of a MiniLM forward
//! at batch 8 x 32, and a fifth of ResNet-18 as an implicit GEMM).
//!
//! Blocking (BLIS-style, with the roles fitted to short activations and fixed weights):
//! a task owns an `mc x nc` tile of C; for every `KC`-deep slice of k and each `NR`-wide panel
//! of B (one panel slice, `KC x NR`, read from L1/L2) it runs the micro-kernel over the tile's
//! row panels of A (up to `MR` rows each, read in place from L1/L2). Tasks are spread over the
//! backend's team. [`conv`] does the same for a convolution's windows.
//!
//! Kernel levels ([`SimdLevel`]) are chosen at run time, so one binary runs on any x86-64 CPU.

mod direct;
mod kernel;

pub(crate) use direct::{Windows, conv};
use kernel::{APanel, Clamp, Finish};

use std::ops::Range;

use super::team::Exec;
use crate::backend::Activation;

/// Which micro-kernels the CPU backend runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SimdLevel {
    /// Portable loops (whatever the compiler makes of them for the baseline target).
    Generic,
    /// 256-bit AVX2 + FMA: 6 x 16 micro-tiles.
    Avx2,
    /// 512-bit AVX-512F: 12 x 32 micro-tiles.
    Avx512,
}

impl SimdLevel {
    /// Rows of A per micro-kernel call.
    pub(crate) const fn mr(self) -> usize {
        match self {
            SimdLevel::Generic => 4,
            SimdLevel::Avx2 => 6,
            SimdLevel::Avx512 => 12,
        }
    }

    /// Columns of B per micro-kernel call (the width of a packed panel).
    pub(crate) const fn nr(self) -> usize {
        match self {
            SimdLevel::Generic => 8,
            SimdLevel::Avx2 => 16,
            SimdLevel::Avx512 => 32,
        }
    }

    /// The name used by `APPARATE_SIMD` and in device ids.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Generic => "generic",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    /// The level named `s` (`generic`, `avx2`, `avx512`).
    pub fn parse(s: &str) -> Option<SimdLevel> {
        [SimdLevel::Generic, SimdLevel::Avx2, SimdLevel::Avx512]
            .into_iter()
            .find(|l| l.name() == s.trim())
    }

    /// Whether this CPU has the level's instructions.
    pub fn supported(self) -> bool {
        match self {
            SimdLevel::Generic => true,
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => super::simd::avx2_fma(),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every level this CPU can run, lowest first.
    pub fn available() -> Vec<SimdLevel> {
        [SimdLevel::Generic, SimdLevel::Avx2, SimdLevel::Avx512]
            .into_iter()
            .filter(|l| l.supported())
            .collect()
    }

    /// The default: the widest level this CPU has.
    pub fn best() -> SimdLevel {
        *SimdLevel::available()
            .last()
            .expect("generic is always there")
    }
}

/// Depth of one slice of k in [`gemm`]'s tiles. Each slice ends with the micro-kernel storing
/// its C tile and the next one starts by loading it again; the B panel slice (`KC x NR`, 64 KiB
/// at AVX-512) is read from L2 rather than L1, which the micro-kernel hides (two B vectors per
/// 2 x MR FMAs). Measured on the 2-core EPYC (Zen 4, 32 KiB L1D): 512 against the 256 that fit
/// B's slice in L1 made MiniLM-L6 batch 1 x 32 6-14% faster (no slice for its k of 384) and
/// changed ResNet-50 and the bf16 kernels by less than the noise; 768 and 1536 were no better.
const KC: usize = 512;
/// The same for the direct convolutions' slices of kernel rows ([`direct`]), which read A in
/// place from the input: kept at the depth whose B slice fits L1 (not measured deeper).
const DIRECT_KC: usize = 256;
/// Rows of A per task tile, in micro-panels (96 rows at AVX-512, 48 at AVX2): the block of A
/// a tile reads per slice of k (`MC x KC`) fits in L2.
const MC_PANELS: usize = 8;
/// Tasks per thread the tiling aims at when the matrix allows, so that the team's dynamic
/// hand-out evens out tiles of unequal cost.
const TASKS_PER_THREAD: usize = 2;

/// B packed for one [`SimdLevel`]: `ceil(n / NR)` panels, each `k x NR` (k-major, zero-padded
/// past column `n`), except a last one of at most `NR / 2` columns, packed `k x NR / 2`
/// ([`PackedB::panel_width`]).
///
/// Or, `pairs`, B rounded to bf16 for the AVX512-BF16 kernels: each k step of a panel holds
/// two rows of B, `NR` 32-bit words of which word `l` is column `l`'s values at rows `2p`
/// (low half) and `2p + 1` (high half, zero past `k`): the operand `vdpbf16ps` multiplies with
/// a broadcast pair of A's values ([`to_pairs`]). Its panels are `ceil(k / 2)` steps deep.
pub(crate) struct PackedB {
    level: SimdLevel,
    k: usize,
    n: usize,
    pairs: bool,
    data: Vec<f32>,
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedB({:?}, k {}, n {})", self.level, self.k, self.n)
    }
}

impl PackedB {
    pub(crate) fn new(level: SimdLevel) -> PackedB {
        PackedB {
            level,
            k: 0,
            n: 0,
            pairs: false,
            data: Vec::new(),
        }
    }

    /// Whether this is B in bf16 pairs (its A must be too: [`to_pairs`]).
    pub(crate) fn pairs(&self) -> bool {
        self.pairs
    }

    /// k steps of the micro-kernel: `k`, or `ceil(k / 2)` in pairs.
    fn steps(&self) -> usize {
        if self.pairs {
            self.k.div_ceil(2)
        } else {
            self.k
        }
    }

    pub(crate) fn level(&self) -> SimdLevel {
        self.level
    }
    pub(crate) fn k(&self) -> usize {
        self.k
    }
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    fn reset(&mut self, k: usize, n: usize) {
        self.k = k;
        self.n = n;
        self.data.clear();
        let steps = self.steps();
        let len = (0..self.panels())
            .map(|q| steps * self.panel_width(q))
            .sum();
        self.data.resize(len, 0.0);
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(self.level.nr())
    }

    /// Columns of panel `q`: `NR`, except a last panel of at most `NR / 2` columns, which is
    /// packed half as wide and runs on the half-width micro-kernels (the SIMD levels), so that
    /// e.g. a 16-channel output does not cost a 32-wide product.
    fn panel_width(&self, q: usize) -> usize {
        let nr = self.level.nr();
        let rest = self.n - q * nr;
        if self.level != SimdLevel::Generic && rest <= nr / 2 {
            nr / 2
        } else {
            nr
        }
    }

    /// Panel `q`'s values, from step `k0` on, and its width.
    fn panel(&self, q: usize, k0: usize) -> (*const f32, usize) {
        let (width, steps) = (self.panel_width(q), self.steps());
        // Every panel before `q` is a full one.
        let at = q * steps * self.level.nr() + k0 * width;
        debug_assert!(at + (steps - k0) * width <= self.data.len());
        (self.data[at..].as_ptr(), width)
    }

    /// The slice of `data` holding panel `q` (`steps x width`, k-major).
    fn panel_mut(&mut self, q: usize) -> (&mut [f32], usize) {
        let (width, steps) = (self.panel_width(q), self.steps());
        let at = q * steps * self.level.nr();
        (&mut self.data[at..at + steps * width], width)
    }

    /// `B = W^T` for `W` given as `n` rows of `k` values at stride `ld`: a linear layer's
    /// `[out, in]` weight, or the keys of one attention head.
    pub(crate) fn pack_transposed(&mut self, w: &[f32], ld: usize, n: usize, k: usize) {
        self.reset(k, n);
        let nr = self.level.nr();
        for q in 0..self.panels() {
            let (panel, width) = self.panel_mut(q);
            for l in 0..width.min(n - q * nr) {
                let row = &w[(q * nr + l) * ld..][..k];
                for (p, &v) in row.iter().enumerate() {
                    panel[p * width + l] = v;
                }
            }
        }
    }

    /// `B` given as `k` rows of `n` values at stride `ld` (the values of one attention head).
    pub(crate) fn pack(&mut self, b: &[f32], ld: usize, k: usize, n: usize) {
        self.reset(k, n);
        let nr = self.level.nr();
        for q in 0..self.panels() {
            let (panel, width) = self.panel_mut(q);
            let cols = width.min(n - q * nr);
            for p in 0..k {
                panel[p * width..p * width + cols].copy_from_slice(&b[p * ld + q * nr..][..cols]);
            }
        }
    }

    /// A packed copy of `W^T` (see [`PackedB::pack_transposed`]).
    pub(crate) fn transposed(level: SimdLevel, w: &[f32], n: usize, k: usize) -> PackedB {
        let mut p = PackedB::new(level);
        p.pack_transposed(w, k, n, k);
        p
    }

    /// `W^T` in bf16 pairs for the AVX512-BF16 kernels, `W` given as `n` rows of `k`: each
    /// value rounded to the nearest bf16 (exact for weights stored as bf16).
    pub(crate) fn transposed_pairs(w: &[f32], n: usize, k: usize) -> PackedB {
        let mut p = PackedB::new(SimdLevel::Avx512);
        p.pairs = true;
        p.reset(k, n);
        let nr = p.level.nr();
        let steps = p.steps();
        for q in 0..p.panels() {
            let (panel, width) = p.panel_mut(q);
            for l in 0..width.min(n - q * nr) {
                let row = &w[(q * nr + l) * k..][..k];
                for s in 0..steps {
                    let hi = row.get(2 * s + 1).copied().unwrap_or(0.0);
                    panel[s * width + l] = pair(row[2 * s], hi);
                }
            }
        }
        p
    }
}

/// Whether this CPU runs the bf16-pair kernels (AVX512-BF16, with AVX-512F).
pub(crate) fn pairs_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Two values rounded to bf16 as `vcvtneps2bf16` rounds them (to nearest, ties to even,
/// subnormals to a zero of their sign) in one 32-bit word, `lo` in the low half, carried in an
/// f32 slot. (`vdpbf16ps` reads subnormal inputs as zeros anyway; flushing them here keeps the
/// portable conversion bit for bit the vector one.)
fn pair(lo: f32, hi: f32) -> f32 {
    let b = |v: f32| {
        if v.is_subnormal() {
            (v.to_bits() >> 16) & 0x8000
        } else {
            u32::from(half::bf16::from_f32(v).to_bits())
        }
    };
    f32::from_bits(b(lo) | (b(hi) << 16))
}

/// The stride, in pairs, of A converted by [`to_pairs`] for rows of `k` values: `ceil(k / 2)`,
/// one cache line more when that is a multiple of 4 KiB (rows 4 KiB apart fall in one set of
/// the L1 cache, and a micro-panel's 12 rows would evict each other).
pub(crate) fn pairs_ld(k: usize) -> usize {
    let steps = k.div_ceil(2);
    if steps.is_multiple_of(1024) {
        steps + 16
    } else {
        steps
    }
}

/// `m` rows of `k` values at stride `ld` (A) in bf16 pairs, the A of a product with a
/// [`PackedB::transposed_pairs`] B: row `i`'s pair `p` (`x[2p]`, `x[2p + 1]`, zero past `k`)
/// at `out[i * lp + p]`, `lp >= ceil(k / 2)` ([`pairs_ld`] for a product's A; `k / 2` for a
/// convolution's pixels). Spread over `exec` by rows.
pub(crate) fn to_pairs(
    exec: Exec<'_>,
    x: &[f32],
    m: usize,
    k: usize,
    ld: usize,
    lp: usize,
) -> Vec<f32> {
    assert!(lp >= k.div_ceil(2), "rows of {k} values in {lp} pairs");
    assert!(
        x.len() >= m.saturating_sub(1) * ld + k || m == 0,
        "A too small"
    );
    // Every pair of a row is written below (the padding too).
    let mut out = super::buffers::take(m * lp);
    let vector = pairs_supported();
    exec.for_chunks(&mut out, lp, |i, row| {
        pairs_row_on(vector, &x[i * ld..][..k], row)
    });
    out
}

/// One row of [`to_pairs`]: by `vcvtneps2bf16` when `vector` (the CPU has AVX512-BF16), else
/// portably.
fn pairs_row_on(vector: bool, src: &[f32], row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: the caller checked that the CPU has AVX512-BF16.
        unsafe { x86::to_pairs_avx512(src, row) };
        return;
    }
    let _ = vector;
    pairs_row(src, row);
}

/// One row of [`to_pairs`], portably (the reference of the vector version).
fn pairs_row(src: &[f32], row: &mut [f32]) {
    for (p, v) in row.iter_mut().enumerate() {
        let lo = src.get(2 * p).copied().unwrap_or(0.0);
        let hi = src.get(2 * p + 1).copied().unwrap_or(0.0);
        *v = pair(lo, hi);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::pairs_row`] with `vcvtneps2bf16`: 16 values to 16 bf16 (8 pairs) at a time.
    ///
    /// # Safety
    /// The CPU has AVX-512F and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn to_pairs_avx512(src: &[f32], row: &mut [f32]) {
        let whole = (src.len() / 16).min(row.len() / 8);
        // SAFETY: 16 values of `src` and 8 words of `row` from `16 * i` and `8 * i`, inside.
        unsafe {
            for i in 0..whole {
                let v = _mm512_loadu_ps(src.as_ptr().add(16 * i));
                let h: __m256bh = _mm512_cvtneps_pbh(v);
                _mm256_storeu_si256(
                    row.as_mut_ptr().add(8 * i) as *mut __m256i,
                    std::mem::transmute::<__m256bh, __m256i>(h),
                );
            }
        }
        super::pairs_row(&src[16 * whole..], &mut row[8 * whole..]);
    }
}

/// A as row-major rows at stride `ld`, read in place by the micro-kernels: activations are
/// never packed (their rows are short-lived and each is read by every panel of B while in L2).
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a> {
    pub data: &'a [f32],
    pub ld: usize,
}

/// What is done to each element of C once its sum is complete, while it is still in registers
/// (before the micro-kernel's one store): `act(scale * sum + bias[col] + residual[row, col])`.
/// ReLU and ReLU6 are applied in registers too; GELU and tanh run over the micro-tile just
/// stored (still in L1).
#[derive(Clone, Copy)]
pub(crate) struct Epilogue<'a> {
    pub scale: f32,
    /// One value per column of C.
    pub bias: Option<&'a [f32]>,
    /// `(values, ld)`: row `i` of the residual starts at `values[i * ld]`.
    pub residual: Option<(&'a [f32], usize)>,
    pub act: Activation,
}

impl Default for Epilogue<'_> {
    fn default() -> Self {
        Epilogue {
            scale: 1.0,
            bias: None,
            residual: None,
            act: Activation::None,
        }
    }
}

impl Epilogue<'_> {
    /// Whether there is anything to do.
    pub(crate) fn is_noop(&self) -> bool {
        self.scale == 1.0
            && self.bias.is_none()
            && self.residual.is_none()
            && self.act == Activation::None
    }

    /// Panics unless the bias and residual cover C's `m x n`.
    fn check(&self, m: usize, n: usize) {
        if let Some(b) = self.bias {
            assert!(b.len() >= n, "bias shorter than C's columns");
        }
        if let Some((r, ld)) = self.residual {
            assert!(
                ld >= n && r.len() >= (m - 1) * ld + n,
                "residual smaller than C"
            );
        }
    }

    /// The activation the micro-kernel applies, and the one left for after the store.
    fn split_act(&self) -> (Clamp, Option<Activation>) {
        match self.act {
            Activation::None => (Clamp::None, None),
            Activation::Relu => (Clamp::Relu, None),
            Activation::Relu6 => (Clamp::Relu6, None),
            act @ (Activation::GeluErf | Activation::Tanh) => (Clamp::None, Some(act)),
        }
    }

    /// The micro-kernel's part for the tile whose top-left element is C's `(row, col)`.
    fn finish(&self, row: usize, col: usize) -> Finish {
        Finish {
            scale: self.scale,
            bias: self.bias.map_or(std::ptr::null(), |b| b[col..].as_ptr()),
            res: self
                .residual
                .map_or(std::ptr::null(), |(r, ld)| r[row * ld + col..].as_ptr()),
            ldr: self.residual.map_or(0, |(_, ld)| ld),
            clamp: self.split_act().0,
        }
    }
}

/// C's columns cut into runs of whole panels, one per task column, when the rows alone give
/// too few tasks: `TASKS_PER_THREAD` tasks per thread where the panels split evenly into such
/// a number of runs, else one run per thread, as even as whole panels allow. Why not always
/// `TASKS_PER_THREAD * threads` runs: with 6 panels (192 columns) that made runs of 2, 2 and 2,
/// three tasks for two threads, one of which then did twice the other's work (a batch-1
/// EfficientNet's 7x7 layers).
#[derive(Clone, Copy)]
pub(super) struct ColTiles {
    n: usize,
    nr: usize,
    panels: usize,
    pub tiles: usize,
}

impl ColTiles {
    /// For `n` columns of `nr`-wide panels, when the rows make `row_tasks` tasks.
    pub(super) fn new(n: usize, nr: usize, row_tasks: usize, threads: usize) -> ColTiles {
        let panels = n.div_ceil(nr).max(1);
        let want = (TASKS_PER_THREAD * threads).div_ceil(row_tasks.max(1));
        let tiles = if want <= 1 {
            1
        } else {
            (1..=want.min(panels))
                .rev()
                .find(|&t| panels.is_multiple_of(t) && t.is_multiple_of(threads))
                .unwrap_or(threads.min(panels))
        };
        ColTiles {
            n,
            nr,
            panels,
            tiles,
        }
    }

    /// The columns of run `t`: panels `t * panels / tiles .. (t + 1) * panels / tiles`.
    pub(super) fn range(&self, t: usize) -> Range<usize> {
        let q = |t: usize| t * self.panels / self.tiles * self.nr;
        q(t).min(self.n)..q(t + 1).min(self.n)
    }
}

/// C as a raw pointer, so that tasks can write their disjoint tiles.
#[derive(Clone, Copy)]
struct COut {
    ptr: *mut f32,
    ld: usize,
}
// SAFETY: tasks write disjoint tiles of C (see `gemm`); the pointer outlives the op.
unsafe impl Send for COut {}
unsafe impl Sync for COut {}

impl COut {
    /// A method (not the field) so closures capture the whole `Sync` wrapper.
    fn ptr(self) -> *mut f32 {
        self.ptr
    }
}

/// `C = epi(A B)`, C row-major at stride `ldc` in `c`; A has `m` rows and `b.k()` columns.
/// Runs on `exec`, one task per tile.
pub(crate) fn gemm(
    exec: Exec<'_>,
    a: Rows<'_>,
    m: usize,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    epi: &Epilogue<'_>,
) {
    let (n, level) = (b.n, b.level);
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "C too small");
    let steps = b.steps();
    assert!(
        a.ld >= steps && a.data.len() >= (m - 1) * a.ld + steps,
        "A too small"
    );
    assert!(level.supported(), "{level:?} kernels on a CPU without them");
    assert!(
        !b.pairs || pairs_supported(),
        "bf16 kernels on a CPU without them"
    );
    epi.check(m, n);
    let (mr, nr, threads) = (level.mr(), level.nr(), exec.threads());
    // Tiles of equal rows, as many as a multiple of the threads when there are enough rows:
    // 1024 rows make 12 tiles of 86 for 2 threads, not 11 of 96 (one thread idle at the end).
    let mut m_tiles = m.div_ceil(MC_PANELS * mr);
    if m_tiles >= threads {
        m_tiles = m_tiles.next_multiple_of(threads);
    }
    let mc = m.div_ceil(m_tiles);
    let m_tiles = m.div_ceil(mc);
    // Columns are split only to give every thread work: a task that owns whole rows of C reads
    // its rows of A from L2 for every panel of B, and streams B's panels from L2/L3.
    let cols = ColTiles::new(n, nr, m_tiles, threads);
    let out = COut {
        ptr: c.as_mut_ptr(),
        ld: ldc,
    };
    exec.for_each(m_tiles * cols.tiles, &|t| {
        let i0 = (t / cols.tiles) * mc;
        let rows = i0..(i0 + mc).min(m);
        let cols = cols.range(t % cols.tiles);
        // SAFETY: `rows x cols` lies inside C (checked above) and belongs to task `t` only.
        unsafe { tile(a, b, out, rows, cols, epi) }
    });
}

/// [`gemm`] with A in f32 whatever B is: A rounded to bf16 pairs first ([`to_pairs`]) when B
/// is in pairs.
pub(crate) fn gemm_f32_a(
    exec: Exec<'_>,
    a: Rows<'_>,
    m: usize,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    epi: &Epilogue<'_>,
) {
    if !b.pairs {
        return gemm(exec, a, m, b, c, ldc, epi);
    }
    let lp = pairs_ld(b.k);
    let pairs = to_pairs(exec, a.data, m, b.k, a.ld, lp);
    gemm(
        exec,
        Rows {
            data: &pairs,
            ld: lp,
        },
        m,
        b,
        c,
        ldc,
        epi,
    );
    super::buffers::give(pairs);
}

/// `bs.len()` products of one shape in one dispatch: `C_i = A_i B_i`, A_i the `m` rows at
/// `a.data[i * a_step..]` (stride `a.ld`), C_i row-major at stride `ldc` from `c[i * c_step]`
/// (Winograd's 36 products of a block of tiles: one hand-out for all of them instead of 36).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_batch(
    exec: Exec<'_>,
    a: Rows<'_>,
    a_step: usize,
    m: usize,
    bs: &[PackedB],
    c: &mut [f32],
    ldc: usize,
    c_step: usize,
) {
    let Some(b0) = bs.first() else { return };
    let (k, n, level) = (b0.k, b0.n, b0.level);
    assert!(bs.iter().all(|b| !b.pairs), "f32 products only");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        bs.iter().all(|b| (b.k, b.n, b.level) == (k, n, level)),
        "products of one shape"
    );
    let last = bs.len() - 1;
    assert!(
        ldc >= n && c.len() >= last * c_step + (m - 1) * ldc + n,
        "C too small"
    );
    assert!(
        a.ld >= k && a.data.len() >= last * a_step + (m - 1) * a.ld + k,
        "A too small"
    );
    assert!(
        c_step >= (m - 1) * ldc + n || bs.len() == 1,
        "products' C overlap"
    );
    assert!(level.supported(), "{level:?} kernels on a CPU without them");
    let (mr, nr, threads) = (level.mr(), level.nr(), exec.threads());
    let m_tiles = m.div_ceil(MC_PANELS * mr);
    let mc = m.div_ceil(m_tiles);
    let m_tiles = m.div_ceil(mc);
    let col_tiles = ColTiles::new(n, nr, m_tiles * bs.len(), threads);
    let n_tiles = col_tiles.tiles;
    let per = m_tiles * n_tiles;
    let out = c.as_mut_ptr();
    let out = super::team::OutPtr(out);
    exec.for_each(bs.len() * per, &|t| {
        let (i, t) = (t / per, t % per);
        let i0 = (t / n_tiles) * mc;
        let rows = i0..(i0 + mc).min(m);
        let cols = col_tiles.range(t % n_tiles);
        let ai = Rows {
            data: &a.data[i * a_step..],
            ld: a.ld,
        };
        let ci = COut {
            // SAFETY: product i's C starts inside `c` (checked above).
            ptr: unsafe { out.get().add(i * c_step) },
            ld: ldc,
        };
        // SAFETY: `rows x cols` of product i lies inside C, and the products' C do not
        // overlap (checked above); the tile belongs to this task only.
        unsafe { tile(ai, &bs[i], ci, rows, cols, &Epilogue::default()) }
    });
}

/// One task's tile of C.
///
/// # Safety
/// `c` covers `rows x cols` at stride `c.ld`, and no other thread touches that part.
unsafe fn tile(
    a: Rows<'_>,
    b: &PackedB,
    c: COut,
    rows: Range<usize>,
    cols: Range<usize>,
    epi: &Epilogue<'_>,
) {
    let (level, k) = (b.level, b.steps());
    let mc = rows.len();
    // Panels of (nearly) equal rows: 32 rows run as 11 + 11 + 10, not 12 + 12 + 8.
    let mr = mc.div_ceil(mc.div_ceil(level.mr()));
    let nr = level.nr();
    // SAFETY (every pointer below): inside C's tile (caller), A (checked by `gemm`) or B's
    // panel (`k x width` values, `PackedB::panel`).
    unsafe {
        if k == 0 {
            // No slice of k: the sums are zeros, finished here.
            let f = (!epi.is_noop()).then_some(epi);
            for i in rows.clone() {
                let row =
                    std::slice::from_raw_parts_mut(c.ptr().add(i * c.ld + cols.start), cols.len());
                row.fill(0.0);
                if let Some(e) = f {
                    finish_scalar(e, i, cols.start, row);
                }
            }
        }
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            for j in cols.clone().step_by(nr) {
                let width = nr.min(cols.end - j);
                let (bp, pw) = b.panel(j / nr, pc);
                for ir in (0..mc).step_by(mr) {
                    let r = mr.min(mc - ir);
                    let ap = APanel {
                        ptr: a.data.as_ptr().add((rows.start + ir) * a.ld + pc),
                        rs: a.ld,
                        cs: 1,
                        segs: &[0],
                        seg_k: kc,
                    };
                    let cp = c.ptr().add((rows.start + ir) * c.ld + j);
                    let last = (pc + kc == k).then_some((epi, rows.start + ir, j));
                    micro(
                        level,
                        b.pairs,
                        r,
                        ap,
                        (bp, pw),
                        cp,
                        c.ld,
                        width,
                        pc > 0,
                        last,
                    );
                }
            }
        }
    }
}

/// `epi` on one row of C (`row`, columns from `col`), element by element: for C's values the
/// micro-kernels did not finish (a product with no k).
fn finish_scalar(epi: &Epilogue<'_>, row: usize, col: usize, values: &mut [f32]) {
    let f = epi.finish(row, col);
    for (j, v) in values.iter_mut().enumerate() {
        let bias = epi.bias.map_or(0.0, |b| b[col + j]);
        let res = epi.residual.map_or(0.0, |(r, ld)| r[row * ld + col + j]);
        *v = f.scalar(*v, bias, res);
    }
    if let (_, Some(act)) = epi.split_act() {
        super::linear::bias_act(values, None, None, act);
    }
}

/// One micro-kernel call onto `width` columns of C from a B panel `(values, its width nr)`,
/// `width <= nr` (a ragged panel goes through a scratch tile of the panel's width); `last`, on
/// the last slice of k, is the epilogue and the C position `(row, col)` of the tile's top-left
/// element.
///
/// # Safety
/// As [`kernel::run`], with `c` covering `rows x width` at stride `ldc`.
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    level: SimdLevel,
    pairs: bool,
    rows: usize,
    a: APanel<'_>,
    (b, nr): (*const f32, usize),
    c: *mut f32,
    ldc: usize,
    width: usize,
    accumulate: bool,
    last: Option<(&Epilogue<'_>, usize, usize)>,
) {
    let half = nr < level.nr();
    let last = last.filter(|(e, _, _)| !e.is_noop());
    // SAFETY: forwarded from the caller; the scratch tile holds MR x NR of every level; the
    // epilogue's slices cover C's rows and columns (`Epilogue::check`).
    unsafe {
        if width == nr {
            let fin = last.map(|(e, i, j)| e.finish(i, j));
            kernel::run(
                level,
                pairs,
                half,
                rows,
                a,
                b,
                c,
                ldc,
                accumulate,
                fin.as_ref(),
            );
            if let Some((e, _, _)) = last
                && let (_, Some(act)) = e.split_act()
            {
                for i in 0..rows {
                    let row = std::slice::from_raw_parts_mut(c.add(i * ldc), width);
                    super::linear::bias_act(row, None, None, act);
                }
            }
            return;
        }
        const MAX: usize = 12 * 32;
        let mut tmp = [0.0f32; MAX];
        if accumulate {
            for i in 0..rows {
                let src = std::slice::from_raw_parts(c.add(i * ldc), width);
                tmp[i * nr..i * nr + width].copy_from_slice(src);
            }
        }
        // The epilogue's bias and residual, copied to full-width scratch too, so that the
        // kernel finishes the tile in registers without reading past C's last column.
        // (The residual's scratch is made only for a residual: this path runs for every
        // micro-tile of a product whose columns end in a ragged panel.)
        let (mut bias, mut res_store) = ([0.0f32; 32], None::<[f32; MAX]>);
        let fin = last.map(|(e, r0, c0)| {
            let mut f = e.finish(r0, c0);
            if let Some(b) = e.bias {
                bias[..width].copy_from_slice(&b[c0..c0 + width]);
                f.bias = bias.as_ptr();
            }
            if let Some((r, ld)) = e.residual {
                let res = res_store.insert([0.0f32; MAX]);
                for i in 0..rows {
                    res[i * nr..i * nr + width].copy_from_slice(&r[(r0 + i) * ld + c0..][..width]);
                }
                (f.res, f.ldr) = (res.as_ptr(), nr);
            }
            f
        });
        kernel::run(
            level,
            pairs,
            half,
            rows,
            a,
            b,
            tmp.as_mut_ptr(),
            nr,
            accumulate,
            fin.as_ref(),
        );
        let after = last.and_then(|(e, _, _)| e.split_act().1);
        for i in 0..rows {
            let row = &mut tmp[i * nr..i * nr + width];
            if let Some(act) = after {
                super::linear::bias_act(row, None, None, act);
            }
            std::slice::from_raw_parts_mut(c.add(i * ldc), width).copy_from_slice(row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let acc: f64 = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                    .sum();
                c[i * n + j] = acc as f32;
            }
        }
        c
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 1009) as f32 - 504.0) / 300.0)
            .collect()
    }

    /// Every level this CPU has, against an f64 reference, on shapes that leave ragged row
    /// panels, ragged column panels and a ragged last slice of k; both packings of B; inline
    /// and on a team of two.
    #[test]
    fn every_level_matches_naive_on_odd_shapes() {
        let team = super::super::team::Team::new(2).unwrap();
        // Last panels: a half-width one filled exactly (n = 48 at AVX-512, 24 at AVX2, also
        // with k over one slice), a ragged full-width one (n = 25 at AVX-512) and a ragged
        // half-width one (n = 40 at AVX-512).
        let shapes = [
            (1, 1, 1),
            (3, 5, 7),
            (11, 48, 20),
            (11, 48, 600),
            (11, 24, 600),
            (13, 25, 40),
            (9, 24, 33),
            (14, 40, 9),
            (13, 33, 65),
            (25, 47, 300),
            (97, 70, 513),
            (130, 96, 256),
            (4, 3, 0),
        ];
        for level in SimdLevel::available() {
            for &(m, n, k) in &shapes {
                let a = values(m * k, 1);
                let b = values(k * n, 2);
                let want = naive(&a, &b, m, n, k);
                let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
                let mut direct = PackedB::new(level);
                direct.pack(&b, n, k, n);
                let transposed = PackedB::transposed(level, &bt, n, k);
                for packed in [&direct, &transposed] {
                    for exec in [Exec::Inline, Exec::Team(&team)] {
                        let mut c = vec![f32::NAN; m * n];
                        gemm(
                            exec,
                            Rows { data: &a, ld: k },
                            m,
                            packed,
                            &mut c,
                            n,
                            &Default::default(),
                        );
                        for (g, w) in c.iter().zip(&want) {
                            assert!(
                                (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                                "{level:?} {m}x{n}x{k}: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The bf16-pair kernels (where the CPU has AVX512-BF16) against an f64 reference on the
    /// bf16-rounded operands: odd k (a last pair half zero), ragged row, column and half-width
    /// panels, several slices of k, the epilogue; inline and on a team. Elsewhere it says so
    /// and checks only the portable conversion.
    #[test]
    fn bf16_pairs_match_naive_on_odd_shapes() {
        let round = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .map(|&x| half::bf16::from_f32(x).to_f32())
                .collect()
        };
        // The conversion: pairs in order, the odd tail zero, rounding to nearest even.
        let x = [1.0f32, -2.5, 3.0e-3, 1.0 + 1.0 / 256.0, 7.0];
        let mut row = vec![0.0f32; 3];
        pairs_row(&x, &mut row);
        let words: Vec<u32> = row.iter().map(|v| v.to_bits()).collect();
        let bf = |v: f32| u32::from(half::bf16::from_f32(v).to_bits());
        assert_eq!(
            words,
            vec![
                bf(1.0) | bf(-2.5) << 16,
                bf(3.0e-3) | bf(1.0 + 1.0 / 256.0) << 16,
                bf(7.0)
            ]
        );
        // A tie (halfway between two bf16 values) goes to the even one.
        assert_eq!(bf(1.0 + 1.0 / 256.0), bf(1.0));
        if pairs_supported() {
            // The vector conversion rounds as the portable one, bit for bit: ties both ways,
            // subnormals, infinities, NaN, and a row whose length leaves a tail (and an odd
            // last value) after the 16-wide steps.
            let mut src: Vec<f32> = (0..75)
                .map(|i| (i as f32 - 37.0) * (1.0 + 3.0 / 256.0) / 7.0)
                .collect();
            src.extend([
                1.0 + 1.0 / 256.0,
                1.0 + 3.0 / 256.0,
                -(1.0 + 1.0 / 256.0),
                1e-40,
                -3e-39,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::MAX,
                0.0,
                -0.0,
            ]);
            let nan_at = src.len();
            src.push(f32::NAN);
            let mut vector = vec![0.0f32; src.len().div_ceil(2) + 3];
            let mut portable = vector.clone();
            pairs_row_on(true, &src, &mut vector);
            pairs_row_on(false, &src, &mut portable);
            for (p, (v, w)) in vector.iter().zip(&portable).enumerate() {
                let (v, w) = (v.to_bits(), w.to_bits());
                if p == nan_at / 2 {
                    // NaN stays NaN (its payload bits may differ).
                    let hi = |x: u32| half::bf16::from_bits((x >> 16) as u16);
                    assert!(hi(v).is_nan() && hi(w).is_nan(), "pair {p}");
                    assert_eq!(v & 0xffff, w & 0xffff, "pair {p}");
                } else {
                    assert_eq!(v, w, "pair {p}: {v:#010x} vs {w:#010x}");
                }
            }
        }
        if !pairs_supported() {
            eprintln!("no AVX512-BF16 on this CPU: the bf16 kernels are not tested here");
            return;
        }
        let team = super::super::team::Team::new(2).unwrap();
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 5, 7),
            (13, 25, 40),
            (11, 48, 301),
            (14, 40, 9),
            (25, 47, 513),
            (97, 70, 1025),
            (130, 96, 2048),
        ] {
            let a = values(m * k, 7);
            let w = values(n * k, 8);
            let bias = values(n, 9);
            let res = values(m * n, 10);
            let (ar, wr) = (round(&a), round(&w));
            // W is [n, k]: the reference's B is its transpose.
            let bt: Vec<f32> = (0..k * n).map(|i| wr[(i % n) * k + i / n]).collect();
            let raw = naive(&ar, &bt, m, n, k);
            let packed = PackedB::transposed_pairs(&w, n, k);
            assert!(packed.pairs());
            for exec in [Exec::Inline, Exec::Team(&team)] {
                let pa = to_pairs(exec, &a, m, k, k, pairs_ld(k));
                for act in [Activation::None, Activation::Relu] {
                    let epi = Epilogue {
                        scale: 1.0,
                        bias: Some(&bias),
                        residual: Some((&res, n)),
                        act,
                    };
                    let mut c = vec![f32::NAN; m * n];
                    gemm(
                        exec,
                        Rows {
                            data: &pa,
                            ld: pairs_ld(k),
                        },
                        m,
                        &packed,
                        &mut c,
                        n,
                        &epi,
                    );
                    for i in 0..m {
                        for j in 0..n {
                            let w = crate::backend::cpu::conv::apply(
                                raw[i * n + j] + bias[j] + res[i * n + j],
                                act,
                            );
                            let g = c[i * n + j];
                            // Sums of k exact products in f32, in another order.
                            let tol = 1e-5 * (k as f32).sqrt() * 4.0 * w.abs().max(1.0);
                            assert!(
                                (g - w).abs() <= tol,
                                "{m}x{n}x{k} {act:?} ({i}, {j}): {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Column runs cover every column once, in whole panels, and split evenly over the threads
    /// where the panels allow.
    #[test]
    fn column_runs_cover_the_columns_evenly() {
        for (n, row_tasks, threads, want_tiles) in [
            (192, 1, 2, 2),   // 6 panels: 2 runs of 3, not 3 of 2
            (1152, 1, 2, 4),  // 36 panels: 4 runs of 9
            (320, 1, 2, 2),   // 10 panels: 2 runs of 5
            (48, 1, 2, 2),    // 2 panels (the last ragged): one each
            (20, 1, 2, 1),    // 1 panel
            (1152, 12, 2, 1), // enough row tasks: whole rows
            (96, 1, 4, 3),    // 3 panels, 4 threads: as many runs as panels
        ] {
            let t = ColTiles::new(n, 32, row_tasks, threads);
            assert_eq!(t.tiles, want_tiles, "{n} columns, {row_tasks} row tasks");
            let mut next = 0;
            let mut sizes = Vec::new();
            for i in 0..t.tiles {
                let r = t.range(i);
                assert_eq!(r.start, next, "{n}: run {i} starts where the last ended");
                assert!(
                    r.start.is_multiple_of(32) && r.end > r.start,
                    "{n}: run {i} {r:?}"
                );
                sizes.push(r.end.div_ceil(32) - r.start / 32);
                next = r.end;
            }
            assert_eq!(next, n, "{n}: the runs end at the last column");
            let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(hi - lo <= 1, "{n}: runs of {sizes:?} panels");
        }
    }

    /// A strided C (a column block of a wider matrix) is written only where it should be, and
    /// the epilogue (scale, bias, a residual at its own stride, each activation) is applied
    /// once, after the last slice of k: on full and ragged panels, with k of one slice, of
    /// several and of none, at every level, inline and on a team.
    #[test]
    fn strided_output_and_epilogue() {
        let team = super::super::team::Team::new(2).unwrap();
        let acts = [
            Activation::Relu6,
            Activation::GeluErf,
            Activation::Relu,
            Activation::Tanh,
            Activation::None,
        ];
        for level in SimdLevel::available() {
            for (si, &(m, n, k)) in [
                (29, 40, 17),
                (13, 64, 300),
                (30, 33, 600),
                (5, 7, 0),
                (17, 48, 40),
                (9, 24, 270),
            ]
            .iter()
            .enumerate()
            {
                let (ldc, ldr) = (n + 60, n + 3);
                let a = values(m * k, 3);
                let b = values(k * n, 4);
                let bias = values(n, 5);
                let res = values(m * ldr, 6);
                let mut packed = PackedB::new(level);
                packed.pack(&b, n, k, n);
                let want_raw = naive(&a, &b, m, n, k);
                for (ai, &act) in acts.iter().enumerate() {
                    let epi = Epilogue {
                        scale: 0.5 + ai as f32,
                        bias: (ai % 2 == 0).then_some(&bias[..]),
                        residual: (ai != 1).then_some((&res[..], ldr)),
                        act,
                    };
                    for exec in [Exec::Inline, Exec::Team(&team)] {
                        let mut c = vec![7.0f32; m * ldc];
                        gemm(
                            exec,
                            Rows { data: &a, ld: k },
                            m,
                            &packed,
                            &mut c,
                            ldc,
                            &epi,
                        );
                        for i in 0..m {
                            for j in 0..ldc {
                                let g = c[i * ldc + j];
                                if j >= n {
                                    assert_eq!(g, 7.0, "{level:?}: column {j} outside C written");
                                    continue;
                                }
                                let mut w = want_raw[i * n + j] * epi.scale;
                                w += epi.bias.map_or(0.0, |b| b[j]);
                                w += epi.residual.map_or(0.0, |(r, ld)| r[i * ld + j]);
                                let w = crate::backend::cpu::conv::apply(w, act);
                                assert!(
                                    (g - w).abs() <= 2e-4 * w.abs().max(1.0),
                                    "{level:?} shape {si} {act:?} ({i}, {j}): {g} vs {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
