//! A dense convolution on the GEMM micro-kernels with the input read in place (no im2col, no
//! packing of A): the `r` output pixels of one micro-panel lie on one output row, so the window of
//! each starts `stride * cin` values after the previous one's in a zero-padded NHWC input, and
//! each kernel row (`kw * cin` adjacent values) is one segment of k ([`super::kernel::APanel`]). B is the weight packed once,
//! `[cout, kh * kw * cin]` as for the implicit GEMM.
//!
//! Why: packing A for a 3x3 convolution copies each input value nine times, and with 64 output
//! channels that copy costs about as much as the multiply-adds (ResNet-18's first stages spent a
//! fifth of their time packing).

use std::ops::Range;

use super::kernel::APanel;
use super::{COut, ColTiles, DIRECT_KC as KC, Epilogue, MC_PANELS, PackedB, micro};
use crate::backend::cpu::team::Exec;

/// A convolution's input as windows: output pixel `(b, y, x)` reads the `kh x kw x cin` window
/// that starts at pixel `(y * stride[0], x * stride[1])` of image `b` of `x`, an NHWC tensor
/// `[n, hp, wp, cin]` already zero-padded so that every window lies inside it.
pub(crate) struct Windows<'a> {
    pub x: &'a [f32],
    pub n: usize,
    pub hp: usize,
    pub wp: usize,
    pub cin: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: [usize; 2],
    pub oh: usize,
    pub ow: usize,
}

/// One slice of k: `segs` (offsets of taps, or of a part of one tap's channels) of `seg_k`
/// steps each, starting at row `k0` of B.
struct Slice {
    segs: Vec<usize>,
    seg_k: usize,
    k0: usize,
}

/// `C = epi(conv(x, W))`, C `[n * oh * ow, cout]` row-major in `c`, `b` the weight as packed
/// B. Runs on `exec`, one task per group of output rows and
/// columns.
pub(crate) fn conv(
    exec: Exec<'_>,
    w: &Windows<'_>,
    b: &PackedB,
    c: &mut [f32],
    epi: &Epilogue<'_>,
) {
    // In bf16 pairs, `x` holds a pair of channels per value and `cin` counts pairs.
    let (level, n, k) = (b.level, b.n, b.steps());
    let (cin, [sy, sx]) = (w.cin, w.stride);
    let m = w.n * w.oh * w.ow;
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        cin > 0 && k == w.kh * w.kw * cin,
        "weight does not match the windows"
    );
    assert!(
        (w.oh - 1) * sy + w.kh <= w.hp
            && (w.ow - 1) * sx + w.kw <= w.wp
            && w.x.len() >= w.n * w.hp * w.wp * cin,
        "windows outside the input"
    );
    assert!(c.len() >= m * n, "C too small");
    epi.check(m, n);
    assert!(level.supported(), "{level:?} kernels on a CPU without them");
    let (mr, nr, threads) = (level.mr(), level.nr(), exec.threads());

    // Slices of k about KC deep. A kernel row's `kw` taps are adjacent in an NHWC input
    // (`kw * cin` values), so a segment is a kernel row, or part of one when a row alone is
    // deeper than KC: an RGB stem's 7x7 kernel is 7 segments of 21, not 49 of 3.
    let run = w.kw * cin;
    let rows_at: Vec<usize> = (0..w.kh).map(|i| i * w.wp * cin).collect();
    let mut slices = Vec::new();
    if run >= KC {
        for (i, &off) in rows_at.iter().enumerate() {
            for c0 in (0..run).step_by(KC) {
                slices.push(Slice {
                    segs: vec![off + c0],
                    seg_k: KC.min(run - c0),
                    k0: i * run + c0,
                });
            }
        }
    } else {
        let per = KC / run;
        for (g, group) in rows_at.chunks(per).enumerate() {
            slices.push(Slice {
                segs: group.to_vec(),
                seg_k: run,
                k0: g * per * run,
            });
        }
    }

    // Tasks: groups of whole output rows (about MC pixels), times column tiles when there are
    // too few groups to keep every thread busy.
    let group = (MC_PANELS * mr / w.ow).clamp(1, w.oh);
    let groups = w.oh.div_ceil(group);
    let m_tasks = w.n * groups;
    let col_tiles = ColTiles::new(n, nr, m_tasks, threads);
    let n_tiles = col_tiles.tiles;
    // Micro-panels of (nearly) equal pixels along an output row.
    let xr = w.ow.div_ceil(w.ow.div_ceil(mr));
    let out = COut {
        ptr: c.as_mut_ptr(),
        ld: n,
    };
    exec.for_each(m_tasks * n_tiles, &|t| {
        let mt = t / n_tiles;
        let (img, y0) = (mt / groups, (mt % groups) * group);
        let rows = y0..(y0 + group).min(w.oh);
        let cols = col_tiles.range(t % n_tiles);
        // SAFETY: the output rows `rows` of image `img`, columns `cols`, belong to task `t`
        // only; every window lies inside `x` (checked above).
        unsafe { task(w, b, &slices, out, img, rows, cols, xr, epi) }
    });
}

/// One task: output rows `rows` of image `img`, columns `cols`.
///
/// # Safety
/// As [`conv`] checks, and no other thread touches this part of C.
#[allow(clippy::too_many_arguments)]
unsafe fn task(
    w: &Windows<'_>,
    b: &PackedB,
    slices: &[Slice],
    c: COut,
    img: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    xr: usize,
    epi: &Epilogue<'_>,
) {
    let level = b.level;
    let nr = level.nr();
    let (cin, [sy, sx]) = (w.cin, w.stride);
    // SAFETY (every pointer below): windows inside `x`, B panels of `k x width`
    // (`PackedB::panel`), C inside the task's part (caller).
    unsafe {
        for (si, s) in slices.iter().enumerate() {
            for j in cols.clone().step_by(nr) {
                let width = nr.min(cols.end - j);
                let bp = b.panel(j / nr, s.k0);
                for y in rows.clone() {
                    for x0 in (0..w.ow).step_by(xr) {
                        let r = xr.min(w.ow - x0);
                        let at = ((img * w.hp + y * sy) * w.wp + x0 * sx) * cin;
                        let a = APanel {
                            ptr: w.x.as_ptr().add(at),
                            rs: sx * cin,
                            cs: 1,
                            segs: &s.segs,
                            seg_k: s.seg_k,
                        };
                        let i = (img * w.oh + y) * w.ow + x0;
                        let cp = c.ptr().add(i * c.ld + j);
                        let last = (si + 1 == slices.len()).then_some((epi, i, j));
                        micro(level, b.pairs, r, a, bp, cp, c.ld, width, si > 0, last);
                    }
                }
            }
        }
    }
}
