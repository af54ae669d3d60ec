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
//! of B (one panel slice, `KC x NR`, stays in L1) it runs the micro-kernel over the tile's
//! row panels of A (up to `MR` rows each, read in place from L2). Tasks are spread over the
//! backend's team. [`conv`] does the same for a convolution's windows.
//!
//! Kernel levels ([`SimdLevel`]) are chosen at run time, so one binary runs on any x86-64 CPU.

mod direct;
mod kernel;

pub(crate) use direct::{Windows, conv};
use kernel::APanel;

use std::ops::Range;

use super::team::Exec;

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

/// Depth of one slice of k: a packed B panel slice (`KC x NR`, 32 KiB at AVX-512) stays in L1
/// while the A panels stream from L2. Chosen from the cache sizes, not tuned by measurement.
const KC: usize = 256;
/// Rows of A per task tile, in micro-panels (96 rows at AVX-512, 48 at AVX2): the block of A
/// a tile reads per slice of k (`MC x KC`) fits in L2.
const MC_PANELS: usize = 8;
/// Tasks per thread the tiling aims at when the matrix allows, so that the team's dynamic
/// hand-out evens out tiles of unequal cost.
const TASKS_PER_THREAD: usize = 2;

/// B packed for one [`SimdLevel`]: `ceil(n / NR)` panels, each `k x NR` (k-major, zero-padded
/// past column `n`).
pub(crate) struct PackedB {
    level: SimdLevel,
    k: usize,
    n: usize,
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
            data: Vec::new(),
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
        let nr = self.level.nr();
        self.k = k;
        self.n = n;
        self.data.clear();
        self.data.resize(n.div_ceil(nr) * k * nr, 0.0);
    }

    /// `B = W^T` for `W` given as `n` rows of `k` values at stride `ld`: a linear layer's
    /// `[out, in]` weight, or the keys of one attention head.
    pub(crate) fn pack_transposed(&mut self, w: &[f32], ld: usize, n: usize, k: usize) {
        self.reset(k, n);
        let nr = self.level.nr();
        for (q, panel) in self.data.chunks_exact_mut((k * nr).max(1)).enumerate() {
            for l in 0..nr.min(n - q * nr) {
                let row = &w[(q * nr + l) * ld..][..k];
                for (p, &v) in row.iter().enumerate() {
                    panel[p * nr + l] = v;
                }
            }
        }
    }

    /// `B` given as `k` rows of `n` values at stride `ld` (the values of one attention head).
    pub(crate) fn pack(&mut self, b: &[f32], ld: usize, k: usize, n: usize) {
        self.reset(k, n);
        let nr = self.level.nr();
        for (q, panel) in self.data.chunks_exact_mut((k * nr).max(1)).enumerate() {
            let cols = nr.min(n - q * nr);
            for p in 0..k {
                panel[p * nr..p * nr + cols].copy_from_slice(&b[p * ld + q * nr..][..cols]);
            }
        }
    }

    /// A packed copy of `W^T` (see [`PackedB::pack_transposed`]).
    pub(crate) fn transposed(level: SimdLevel, w: &[f32], n: usize, k: usize) -> PackedB {
        let mut p = PackedB::new(level);
        p.pack_transposed(w, k, n, k);
        p
    }
}

/// A as row-major rows at stride `ld`, read in place by the micro-kernels: activations are
/// never packed (their rows are short-lived and each is read by every panel of B while in L2).
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a> {
    pub data: &'a [f32],
    pub ld: usize,
}

/// Called once per finished row of a task's tile: `(row, first column, that row's columns)`,
/// while the tile is still in cache (bias, residual, activation).
pub(crate) type Epilogue<'a> = &'a (dyn Fn(usize, usize, &mut [f32]) + Sync);

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

/// `C = A B` (then `epi` on each finished row), C row-major at stride `ldc` in `c`; A has `m`
/// rows and `b.k()` columns. Runs on `exec`, one task per tile.
pub(crate) fn gemm(
    exec: Exec<'_>,
    a: Rows<'_>,
    m: usize,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    epi: Option<Epilogue<'_>>,
) {
    let (n, level) = (b.n, b.level);
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "C too small");
    assert!(
        a.ld >= b.k && a.data.len() >= (m - 1) * a.ld + b.k,
        "A too small"
    );
    assert!(level.supported(), "{level:?} kernels on a CPU without them");
    let (mr, nr, threads) = (level.mr(), level.nr(), exec.threads());
    // Tiles of equal rows, as many as a multiple of the threads when there are enough rows:
    // 1024 rows make 12 tiles of 86 for 2 threads, not 11 of 96 (one thread idle at the end).
    let mut m_tiles = m.div_ceil(MC_PANELS * mr);
    if m_tiles >= threads {
        m_tiles = m_tiles.next_multiple_of(threads);
    }
    let mc = m.div_ceil(m_tiles);
    let m_tiles = m.div_ceil(mc);
    let panels = n.div_ceil(nr);
    let want = (TASKS_PER_THREAD * threads).div_ceil(m_tiles);
    // Columns are split only to give every thread work: a task that owns whole rows of C reads
    // its rows of A from L2 for every panel of B, and streams B's panels from L2/L3.
    let n_tiles = want.min(panels);
    let nc = panels.div_ceil(n_tiles) * nr;
    let n_tiles = n.div_ceil(nc);
    let out = COut {
        ptr: c.as_mut_ptr(),
        ld: ldc,
    };
    exec.for_each(m_tiles * n_tiles, &|t| {
        let (i0, j0) = ((t / n_tiles) * mc, (t % n_tiles) * nc);
        let rows = i0..(i0 + mc).min(m);
        let cols = j0..(j0 + nc).min(n);
        // SAFETY: `rows x cols` lies inside C (checked above) and belongs to task `t` only.
        unsafe { tile(a, b, out, rows, cols, epi) }
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
    epi: Option<Epilogue<'_>>,
) {
    let (level, k) = (b.level, b.k);
    let mc = rows.len();
    // Panels of (nearly) equal rows: 32 rows run as 11 + 11 + 10, not 12 + 12 + 8.
    let mr = mc.div_ceil(mc.div_ceil(level.mr()));
    let nr = level.nr();
    // SAFETY (every pointer below): inside C's tile (caller), A (checked by `gemm`) or B's
    // panel (`k x NR` values per panel).
    unsafe {
        if k == 0 {
            for i in rows.clone() {
                std::slice::from_raw_parts_mut(c.ptr().add(i * c.ld + cols.start), cols.len())
                    .fill(0.0);
            }
        }
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            for j in cols.clone().step_by(nr) {
                let width = nr.min(cols.end - j);
                let bp = b.data.as_ptr().add((j / nr) * k * nr + pc * nr);
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
                    micro(level, r, ap, bp, cp, c.ld, width, pc > 0);
                }
            }
        }
        if let Some(epi) = epi {
            for i in rows {
                let row =
                    std::slice::from_raw_parts_mut(c.ptr().add(i * c.ld + cols.start), cols.len());
                epi(i, cols.start, row);
            }
        }
    }
}

/// One micro-kernel call onto `width <= NR` columns of C (a ragged last panel goes through a
/// full-width scratch tile).
///
/// # Safety
/// As [`kernel::run`], with `c` covering `rows x width` at stride `ldc`.
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    level: SimdLevel,
    rows: usize,
    a: APanel<'_>,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    width: usize,
    accumulate: bool,
) {
    let nr = level.nr();
    // SAFETY: forwarded from the caller; the scratch tile holds MR x NR of every level.
    unsafe {
        if width == nr {
            return kernel::run(level, rows, a, b, c, ldc, accumulate);
        }
        let mut tmp = [0.0f32; 12 * 32];
        if accumulate {
            for i in 0..rows {
                let src = std::slice::from_raw_parts(c.add(i * ldc), width);
                tmp[i * nr..i * nr + width].copy_from_slice(src);
            }
        }
        kernel::run(level, rows, a, b, tmp.as_mut_ptr(), nr, accumulate);
        for i in 0..rows {
            std::slice::from_raw_parts_mut(c.add(i * ldc), width)
                .copy_from_slice(&tmp[i * nr..i * nr + width]);
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
        let shapes = [
            (1, 1, 1),
            (3, 5, 7),
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
                        gemm(exec, Rows { data: &a, ld: k }, m, packed, &mut c, n, None);
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

    /// A strided C (a column block of a wider matrix) is written only where it should be, and
    /// the epilogue sees every row once with its first column.
    #[test]
    fn strided_output_and_epilogue() {
        for level in SimdLevel::available() {
            let (m, n, k, ldc) = (29, 40, 17, 100);
            let a = values(m * k, 3);
            let b = values(k * n, 4);
            let mut packed = PackedB::new(level);
            packed.pack(&b, n, k, n);
            let mut c = vec![7.0f32; m * ldc];
            let epi = |_i: usize, j0: usize, row: &mut [f32]| {
                for (j, v) in row.iter_mut().enumerate() {
                    *v += (j0 + j) as f32;
                }
            };
            gemm(
                Exec::Inline,
                Rows { data: &a, ld: k },
                m,
                &packed,
                &mut c,
                ldc,
                Some(&epi),
            );
            let want = naive(&a, &b, m, n, k);
            for i in 0..m {
                for j in 0..ldc {
                    let g = c[i * ldc + j];
                    if j < n {
                        let w = want[i * n + j] + j as f32;
                        assert!(
                            (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                            "{level:?} {g} vs {w}"
                        );
                    } else {
                        assert_eq!(g, 7.0, "{level:?}: column {j} outside C was written");
                    }
                }
            }
        }
    }
}
