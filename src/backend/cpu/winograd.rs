//! 3x3 stride-1 convolutions by Winograd's minimal filtering, F(4x4, 3x3), over NHWC tensors.
//!
//! A 4x4 block of output pixels (a *tile*) of one output channel is
//! `Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A`, `d` the 6x6 input pixels the tile's windows cover and
//! `g` the 3x3 kernel (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks",
//! with the interpolation points 0, ±1, ±2). Summed over input channels, the element-wise
//! product becomes 36 independent GEMMs, one per position `ξ` of the 6x6 transformed tile:
//! `M_ξ[tiles x cout] = V_ξ[tiles x cin] U_ξ[cin x cout]`. A tile then costs 36 multiply-adds
//! per channel pair where the direct convolution costs 16 x 9 = 144: 4x fewer, for transforms
//! that are linear in the channels (not their product). Why: ResNets spend 83% (ResNet-18)
//! and 37% (ResNet-50) of their multiply-adds in 3x3 stride-1 convolutions (counted from the
//! layer shapes at 224x224), which the direct
//! path ran at the GEMM's speed and no faster.
//!
//! Steps, for blocks of tiles small enough that the block's `V` and `M` stay in cache:
//! 1. input transform: `V = B^T d B` per tile and channel, vectorised over channels (NHWC keeps
//!    them contiguous), windows read in place (taps outside the image read zeros: no padded
//!    copy);
//! 2. the 36 products on the GEMM micro-kernels ([`sgemm::gemm_batch`]), `U` the weight
//!    transformed and packed once per weight ([`Filters`], kept beside the tensor);
//! 3. output transform `A^T M A`, bias, residual and activation, stored for the pixels inside
//!    the output (tiles past its edge compute pixels nobody reads).
//!
//! Two ways to spread that over the team. With few channels and many tiles, each task takes
//! its own block (about 1 MiB of `V` and `M`, [`TASK_BYTES`]) through all three steps on its
//! core ([`per_task`]): its block never leaves that core's L2. Otherwise the blocks are larger
//! (2 MiB, [`BLOCK_BYTES`]) and each step of a block is spread over the team ([`in_blocks`]):
//! the 36 products are the tasks, so a few tiles still keep every thread busy and each
//! product's weight is read once per block. Measured (`cnn --convs`, 2 threads, three runs
//! each): per task took 0.47-0.78x the time of the team-wide steps on 56x56 layers with 64 to
//! 256 channels and on 28x28 and 14x14 ones at batch 8, level on VGG's 112x112 64 -> 128.
//!
//! Accuracy: the transforms add rounding (about 10x the direct path's error per layer, still
//! near f32's resolution); the golden tests pass at their tolerances with this path on.

use std::ops::Range;

use super::buffers;
use super::conv::{Conv, apply};
use super::sgemm::{self, PackedB, Rows, SimdLevel};
use super::team::{Exec, OutPtr};
use super::vector::Vector;
use crate::backend::op_check::ConvDims;
use crate::backend::{Activation, Conv2d};

/// Output tile side.
const TILE: usize = 4;
/// Input tile side: `TILE + 3 - 1`.
const SIDE: usize = 6;
/// Positions of a transformed tile: the products per block.
const POS: usize = SIDE * SIDE;

/// Bytes of `V` and `M` per block of tiles: the block's transformed input is written and read
/// back, and its products written and read back, while the block is in cache (the two cores'
/// L2 here, or L3), not from memory. Chosen from the cache sizes, not tuned.
const BLOCK_BYTES: usize = 2 << 20;
/// Fewest tiles per block: fewer rows make short GEMMs (the micro-kernel has 12 rows).
const MIN_BLOCK_TILES: usize = 48;

/// Bytes of `V` and `M` per task when each task does all three steps for its own tiles
/// ([`per_task`]): about half of a core's L2.
const TASK_BYTES: usize = 1 << 20;
/// Fewest tiles per task for that (fewer make short products: the micro-kernel has 12 rows),
/// with at least 4 tasks per thread.
const MIN_TASK_TILES: usize = 12;
/// Most input plus output channels for that: with more, every task streams the whole
/// transformed weight (36 x cin x cout values, 9.4 MB at 256 x 256) for a few tiles' work, and
/// the team-wide steps of [`in_blocks`] measured as fast or faster (28x28, 256 -> 512 and
/// 512 -> 512).
const MAX_TASK_CHANNELS: usize = 512;

/// `G`, the filter transform (6 x 3).
const G: [[f64; 3]; SIDE] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// A 3x3 convolution's weight in the Winograd domain: `U_ξ = (G g G^T)_ξ` for every
/// (output, input) channel pair, as 36 packed GEMM operands `[cin x cout]`. Four times the
/// memory of the weight itself (36 values per channel pair instead of 9).
pub(crate) struct Filters {
    cin: usize,
    cout: usize,
    u: Vec<PackedB>,
}

impl std::fmt::Debug for Filters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "winograd::Filters({} -> {})", self.cin, self.cout)
    }
}

impl Filters {
    /// `w` `[cout, 3, 3, cin]` transformed (in f64, rounded once) and packed for `level`.
    pub(crate) fn new(level: SimdLevel, w: &[f32], cout: usize, cin: usize) -> Filters {
        assert_eq!(w.len(), cout * 9 * cin, "a 3x3 weight of {cout} x {cin}");
        // `[ξ][co][ci]`: each position's matrix as W^T (cout rows of cin), packed below.
        let mut mats = vec![0.0f32; POS * cout * cin];
        for co in 0..cout {
            for ci in 0..cin {
                let g = |i: usize, j: usize| w[((co * 3 + i) * 3 + j) * cin + ci] as f64;
                // t = G g (6 x 3), then U = t G^T (6 x 6).
                let mut t = [[0.0f64; 3]; SIDE];
                for (a, row) in t.iter_mut().enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = (0..3).map(|i| G[a][i] * g(i, j)).sum();
                    }
                }
                for a in 0..SIDE {
                    for b in 0..SIDE {
                        let u: f64 = (0..3).map(|j| t[a][j] * G[b][j]).sum();
                        mats[((a * SIDE + b) * cout + co) * cin + ci] = u as f32;
                    }
                }
            }
        }
        let u = mats
            .chunks_exact(cout * cin)
            .map(|m| PackedB::transposed(level, m, cout, cin))
            .collect();
        Filters { cin, cout, u }
    }

    pub(crate) fn level(&self) -> SimdLevel {
        self.u[0].level()
    }

    /// `(cin, cout)`.
    pub(crate) fn channels(&self) -> (usize, usize) {
        (self.cin, self.cout)
    }
}

/// Whether this path can run the convolution: dense, 3x3, stride 1 (any padding).
pub(crate) fn fits(d: &ConvDims, p: &Conv2d) -> bool {
    p.groups == 1 && (d.kh, d.kw) == (3, 3) && p.stride == [1, 1]
}

/// Whether this path is the faster one for a convolution that [`fits`] (the `auto` policy):
/// at least [`MIN_TILES`] tiles and [`MIN_CHANNELS`] channels in and out.
///
/// Measured (`cargo bench --bench cnn -- --convs`, docs/results.md) on the ResNet and VGG
/// shapes: 1.4-3x faster than the direct path from 8 tiles on (ResNet's last stage at batch 2),
/// but slower at 4 tiles (that stage at batch 1, inside the network: the transformed weight,
/// 38 MB there, streams from memory for 4 tiles' work) and 4x slower with 3 input channels
/// (VGG's first layer: the transforms cost more than the products they save). Nor where the
/// tiles' overhang wastes more than half of what they compute (a 1-pixel-wide image computes
/// 16 pixels per tile for 4 it keeps: 4x fewer multiply-adds per pixel do not pay for that).
pub(crate) fn pays(d: &ConvDims) -> bool {
    let per_image = d.oh.div_ceil(TILE) * d.ow.div_ceil(TILE);
    let tiles = d.n * per_image;
    tiles >= MIN_TILES
        && d.cin >= MIN_CHANNELS
        && d.cout >= MIN_CHANNELS
        && 2 * d.oh * d.ow >= per_image * TILE * TILE
}

/// Fewest tiles (per call, all images) for which `auto` takes this path.
const MIN_TILES: usize = 8;
/// Fewest input and output channels for which `auto` takes this path (smaller ones are
/// unmeasured but for 3 inputs, where it loses).
const MIN_CHANNELS: usize = 16;

/// `act(conv(x, w) + b + residual)` for a convolution that [`fits`], `f` its weight
/// transformed.
pub(crate) fn conv(c: &Conv<'_>, f: &Filters, par: Exec<'_>) -> Vec<f32> {
    let (cin, cout) = f.channels();
    let per_tile = POS * (cin + cout) * std::mem::size_of::<f32>();
    let d = c.dims;
    let tiles = d.n * d.oh.div_ceil(TILE) * d.ow.div_ceil(TILE);
    let tb = (TASK_BYTES / per_tile).min(tiles.div_ceil(4 * par.threads()));
    if tb >= MIN_TASK_TILES && cin + cout <= MAX_TASK_CHANNELS {
        return per_task(c, f, par, tb);
    }
    in_blocks(c, f, par, (BLOCK_BYTES / per_tile).max(MIN_BLOCK_TILES))
}

/// [`conv`] with each task doing all three steps for its own `tb` tiles: the block's `V` and
/// `M` never leave the task's core.
fn per_task(c: &Conv<'_>, f: &Filters, par: Exec<'_>, tb: usize) -> Vec<f32> {
    let (t, mut out) = Tiles::new(c, f);
    if t.count == 0 || t.grid.cout == 0 {
        return out;
    }
    let (cin, cout) = (t.grid.cin, t.grid.cout);
    let tb = tb.clamp(1, t.count);
    let op = OutPtr(out.as_mut_ptr());
    par.for_each(t.count.div_ceil(tb), &|task| {
        let t0 = task * tb;
        let len = tb.min(t.count - t0);
        // Every element is written before it is read (transform, then products).
        let mut v = buffers::take(POS * len * cin);
        let mut m = buffers::take(POS * len * cout);
        // SAFETY: `v` and `m` are this task's own block; its tiles' output pixels are its own.
        unsafe { t.input(t0, len, 0..len, v.as_mut_ptr()) };
        for (xi, u) in f.u.iter().enumerate() {
            let a = Rows {
                data: &v[xi * len * cin..],
                ld: cin,
            };
            let mo = &mut m[xi * len * cout..(xi + 1) * len * cout];
            sgemm::gemm(Exec::Inline, a, len, u, mo, cout, &Default::default());
        }
        unsafe { t.output(t0, len, 0..len, m.as_ptr(), op) };
        buffers::give(v);
        buffers::give(m);
    });
    out
}

/// The operands checked against each other and against `f`, as the tile loops see them.
fn checked_grid(c: &Conv<'_>, f: &Filters) -> Grid {
    let [n, h, w, cin, cout, _, _, oh, ow] = c.dims.to_array();
    assert!(fits(&c.dims, c.p), "not a 3x3 stride-1 dense convolution");
    assert_eq!(f.channels(), (cin, cout), "filters of another weight");
    assert_eq!(f.level(), c.level, "filters packed for another level");
    assert!(
        c.level.supported(),
        "{:?} loops on a CPU without them",
        c.level
    );
    assert!(
        c.x.len() >= n * h * w * cin,
        "input smaller than its dimensions"
    );
    assert!(
        c.b.is_none_or(|b| b.len() >= cout),
        "bias shorter than the channels"
    );
    assert!(
        c.residual.is_none_or(|r| r.len() >= n * oh * ow * cout),
        "residual smaller than the output"
    );
    Grid {
        n,
        h,
        w,
        cin,
        cout,
        oh,
        ow,
        ty: oh.div_ceil(TILE),
        tx: ow.div_ceil(TILE),
        pad: c.p.padding,
    }
}

/// [`conv`] over blocks of `block` tiles, each step of a block spread over the team.
fn in_blocks(c: &Conv<'_>, f: &Filters, par: Exec<'_>, block: usize) -> Vec<f32> {
    let (t, mut out) = Tiles::new(c, f);
    if t.count == 0 || t.grid.cout == 0 {
        return out;
    }
    let (cin, cout) = (t.grid.cin, t.grid.cout);
    let block = block.clamp(1, t.count);
    // Every element of a block's V and M is written before it is read (steps 1 and 2).
    let mut v = buffers::take(POS * block * cin);
    let mut m = buffers::take(POS * block * cout);
    let threads = par.threads();
    let op = OutPtr(out.as_mut_ptr());
    for t0 in (0..t.count).step_by(block) {
        let len = block.min(t.count - t0);
        let groups = (threads * 4).min(len);
        let part = |g: usize| len * g / groups..len * (g + 1) / groups;
        let vp = OutPtr(v.as_mut_ptr());
        // SAFETY: each task transforms its own tiles of the block (its own rows of V).
        par.for_each(groups, &|g| unsafe { t.input(t0, len, part(g), vp.get()) });
        sgemm::gemm_batch(
            par,
            Rows { data: &v, ld: cin },
            len * cin,
            len,
            &f.u,
            &mut m,
            cout,
            len * cout,
        );
        let m = &m;
        // SAFETY: `m` holds the block's 36 products; each task writes its own tiles' pixels.
        par.for_each(groups, &|g| unsafe {
            t.output(t0, len, part(g), m.as_ptr(), op)
        });
    }
    buffers::give(v);
    buffers::give(m);
    out
}

/// A call's tiles and what their transforms read: the steps both ways share.
struct Tiles<'a> {
    c: &'a Conv<'a>,
    grid: Grid,
    /// Tiles in all images.
    count: usize,
    /// What taps outside the image read instead of the input.
    zeros: Vec<f32>,
    epi: Epi<'a>,
}

impl<'a> Tiles<'a> {
    /// The call's tiles (its operands checked) and its output, whose every pixel lies in
    /// exactly one tile and is written by that tile's output transform.
    fn new(c: &'a Conv<'a>, f: &Filters) -> (Tiles<'a>, Vec<f32>) {
        let grid = checked_grid(c, f);
        let out = buffers::take(grid.n * grid.oh * grid.ow * grid.cout);
        let t = Tiles {
            c,
            grid,
            count: grid.n * grid.ty * grid.tx,
            zeros: vec![0.0f32; grid.cin],
            epi: Epi {
                bias: c.b,
                residual: c.residual,
                act: c.act,
            },
        };
        (t, out)
    }

    /// The input transform of tiles `part` of the block of `len` tiles from tile `t0`, into
    /// the block's V at `v` (`[36][len][cin]`).
    ///
    /// # Safety
    /// `v` covers the block's V, and no other thread writes these tiles' rows of it.
    unsafe fn input(&self, t0: usize, len: usize, part: Range<usize>, v: *mut f32) {
        let cin = self.grid.cin;
        for t in part {
            let inputs = self.grid.inputs(self.c.x, &self.zeros, t0 + t);
            // SAFETY: `inputs` points at `cin` readable values for each of the 36 pixels;
            // tile `t`'s rows of V are the caller's.
            unsafe { transform_in(self.c.level, &inputs, cin, v.add(t * cin), len * cin) };
        }
    }

    /// The output transform of tiles `part` of the block of `len` tiles from tile `t0`, from
    /// the block's products at `m` (`[36][len][cout]`) into the output at `out`.
    ///
    /// # Safety
    /// `m` holds the block's products and `out` is this call's output; no other thread
    /// writes these tiles' pixels.
    unsafe fn output(&self, t0: usize, len: usize, part: Range<usize>, m: *const f32, out: OutPtr) {
        let cout = self.grid.cout;
        for t in part {
            let pixels = self.grid.outputs(t0 + t);
            // SAFETY: as the caller guarantees; the pixels are inside the output.
            unsafe {
                transform_out(
                    self.c.level,
                    m.add(t * cout),
                    len * cout,
                    &pixels,
                    out.get(),
                    cout,
                    &self.epi,
                )
            };
        }
    }
}

/// The convolution's sizes as the tile loops see them.
#[derive(Clone, Copy)]
struct Grid {
    n: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    oh: usize,
    ow: usize,
    /// Tiles per column and per row of an image.
    ty: usize,
    tx: usize,
    pad: [usize; 2],
}

impl Grid {
    /// Tile `t`'s image and its top-left output pixel.
    fn origin(&self, t: usize) -> (usize, usize, usize) {
        let per_image = self.ty * self.tx;
        let (img, r) = (t / per_image, t % per_image);
        (img, (r / self.tx) * TILE, (r % self.tx) * TILE)
    }

    /// Where each of tile `t`'s 6x6 input pixels starts (its `cin` channels): in `x`, or
    /// `zeros` for pixels outside the image (the padding and the tiles' overhang).
    fn inputs(&self, x: &[f32], zeros: &[f32], t: usize) -> [*const f32; POS] {
        let (img, y0, x0) = self.origin(t);
        debug_assert!(img < self.n && zeros.len() >= self.cin);
        let mut p = [zeros.as_ptr(); POS];
        for i in 0..SIDE {
            let Some(iy) = (y0 + i).checked_sub(self.pad[0]).filter(|&v| v < self.h) else {
                continue;
            };
            for j in 0..SIDE {
                if let Some(ix) = (x0 + j).checked_sub(self.pad[1]).filter(|&v| v < self.w) {
                    p[i * SIDE + j] = x[((img * self.h + iy) * self.w + ix) * self.cin..].as_ptr();
                }
            }
        }
        p
    }

    /// Tile `t`'s 4x4 output pixels: their offsets (in values) in the output, or `None` past
    /// its edge.
    fn outputs(&self, t: usize) -> [Option<usize>; TILE * TILE] {
        let (img, y0, x0) = self.origin(t);
        let mut p = [None; TILE * TILE];
        for i in 0..TILE {
            for j in 0..TILE {
                let (y, x) = (y0 + i, x0 + j);
                if y < self.oh && x < self.ow {
                    p[i * TILE + j] = Some(((img * self.oh + y) * self.ow + x) * self.cout);
                }
            }
        }
        p
    }
}

/// The output transform's epilogue.
struct Epi<'a> {
    bias: Option<&'a [f32]>,
    residual: Option<&'a [f32]>,
    act: Activation,
}

/// `B^T x` for one column of 6 (the input transform along one axis).
#[inline(always)]
unsafe fn input_1d<V: Vector>(x: [V; SIDE]) -> [V; SIDE] {
    let [x0, x1, x2, x3, x4, x5] = x;
    // SAFETY: the caller runs on a CPU with V's instructions.
    unsafe {
        let (c2, c4) = (V::splat(2.0), V::splat(4.0));
        let (m2, m4, m5) = (V::splat(-2.0), V::splat(-4.0), V::splat(-5.0));
        let s = x3.sub(x1);
        let t = x4.sub(x2);
        [
            x0.fma(c4, x2.fma(m5, x4)),
            x1.add(x2).fma(m4, x3.add(x4)),
            x1.sub(x2).fma(c4, x4.sub(x3)),
            s.fma(c2, t),
            s.fma(m2, t),
            x1.fma(c4, x3.fma(m5, x5)),
        ]
    }
}

/// `A^T m` for one column of 6 (the output transform along one axis).
#[inline(always)]
unsafe fn output_1d<V: Vector>(m: [V; SIDE]) -> [V; TILE] {
    let [m0, m1, m2, m3, m4, m5] = m;
    // SAFETY: the caller runs on a CPU with V's instructions.
    unsafe {
        let (a, b) = (m1.add(m2), m1.sub(m2));
        let (c, d) = (m3.add(m4), m3.sub(m4));
        [
            m0.add(a).add(c),
            d.fma(V::splat(2.0), b),
            c.fma(V::splat(4.0), a),
            d.fma(V::splat(8.0), b).add(m5),
        ]
    }
}

/// One tile's input transform: `V_ξ[c] = (B^T d B)_ξ` for every channel, `d`'s pixels at
/// `inputs`, written to `v + ξ * vstride + c`.
///
/// # Safety
/// Each `inputs[i]` is valid for `cin` reads, `v` for the 36 rows of `cin` writes; the CPU has
/// `level`'s instructions.
unsafe fn transform_in(
    level: SimdLevel,
    inputs: &[*const f32; POS],
    cin: usize,
    v: *mut f32,
    vstride: usize,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        match level {
            SimdLevel::Avx512 => return x86::transform_in_avx512(inputs, cin, v, vstride),
            SimdLevel::Avx2 => return x86::transform_in_avx2(inputs, cin, v, vstride),
            SimdLevel::Generic => {}
        }
        let _ = level;
        transform_in_from::<f32>(inputs, 0, cin, v, vstride);
    }
}

/// Channels `c0..cin` of one tile's input transform: whole registers of `V`, then the rest one
/// lane at a time.
///
/// # Safety
/// As [`transform_in`].
#[inline(always)]
// `b` walks a column: it indexes every row of `e`, not one slice.
#[allow(clippy::needless_range_loop)]
unsafe fn transform_in_from<V: Vector>(
    inputs: &[*const f32; POS],
    c0: usize,
    cin: usize,
    v: *mut f32,
    vstride: usize,
) -> usize {
    let mut c = c0;
    // SAFETY: every read is a pixel's channel `c .. c + LANES <= cin`, every write row ξ's.
    unsafe {
        while c + V::LANES <= cin {
            // Rows first: e[i] = (d B)[i], kept in registers (or L1) for the columns.
            let e: [[V; SIDE]; SIDE] = std::array::from_fn(|i| {
                input_1d(std::array::from_fn(|j| {
                    V::load(inputs[i * SIDE + j].add(c))
                }))
            });
            for b in 0..SIDE {
                let col = input_1d(std::array::from_fn(|i| e[i][b]));
                for (a, val) in col.into_iter().enumerate() {
                    val.store(v.add((a * SIDE + b) * vstride + c));
                }
            }
            c += V::LANES;
        }
    }
    c
}

/// One tile's output transform and epilogue: `Y = A^T M A` for every output channel, `M_ξ`'s
/// row at `m + ξ * mstride`, stored at `out + pixels[p]` for the pixels inside the output.
///
/// # Safety
/// `m` covers 36 rows of `cout` values at stride `mstride`; each `Some(pixels[p])` is an output
/// pixel's `cout` values in `out`, this tile's alone; the epilogue's slices cover the output;
/// the CPU has `level`'s instructions.
unsafe fn transform_out(
    level: SimdLevel,
    m: *const f32,
    mstride: usize,
    pixels: &[Option<usize>; TILE * TILE],
    out: *mut f32,
    cout: usize,
    epi: &Epi<'_>,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        let c = match level {
            SimdLevel::Avx512 => x86::transform_out_avx512(m, mstride, pixels, out, cout, epi),
            SimdLevel::Avx2 => x86::transform_out_avx2(m, mstride, pixels, out, cout, epi),
            SimdLevel::Generic => 0,
        };
        #[cfg(not(target_arch = "x86_64"))]
        let c = {
            let _ = level;
            0
        };
        transform_out_from::<f32>(m, mstride, pixels, out, c, cout, epi);
    }
}

/// Channels `c0..cout` of one tile's output transform (see [`transform_out`]).
///
/// # Safety
/// As [`transform_out`].
#[inline(always)]
unsafe fn transform_out_from<V: Vector>(
    m: *const f32,
    mstride: usize,
    pixels: &[Option<usize>; TILE * TILE],
    out: *mut f32,
    c0: usize,
    cout: usize,
    epi: &Epi<'_>,
) -> usize {
    let mut c = c0;
    // SAFETY: forwarded from the caller; reads and writes stay within channel `c + LANES`.
    unsafe {
        let (zero, six) = (V::splat(0.0), V::splat(6.0));
        while c + V::LANES <= cout {
            // Rows first: f[a] = (M A)[a], 4 values per row.
            let f: [[V; TILE]; SIDE] = std::array::from_fn(|a| {
                output_1d(std::array::from_fn(|b| {
                    V::load(m.add((a * SIDE + b) * mstride + c))
                }))
            });
            let bias = epi.bias.map_or(zero, |b| V::load(b.as_ptr().add(c)));
            for q in 0..TILE {
                let col = output_1d(std::array::from_fn(|a| f[a][q]));
                for (p, val) in col.into_iter().enumerate() {
                    let Some(at) = pixels[p * TILE + q] else {
                        continue;
                    };
                    let mut y = val.add(bias);
                    if let Some(r) = epi.residual {
                        y = y.add(V::load(r.as_ptr().add(at + c)));
                    }
                    y = match epi.act {
                        Activation::Relu => y.max(zero),
                        Activation::Relu6 => y.max(zero).min(six),
                        _ => y,
                    };
                    let dst = out.add(at + c);
                    y.store(dst);
                    if matches!(epi.act, Activation::GeluErf | Activation::Tanh) {
                        for l in 0..V::LANES {
                            *dst.add(l) = apply(*dst.add(l), epi.act);
                        }
                    }
                }
            }
            c += V::LANES;
        }
    }
    c
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Epi, POS, TILE, transform_in_from, transform_out_from};
    use std::arch::x86_64::*;

    /// # Safety
    /// As [`super::transform_in`], on a CPU with AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transform_in_avx512(
        inputs: &[*const f32; POS],
        cin: usize,
        v: *mut f32,
        vstride: usize,
    ) {
        unsafe {
            let c = transform_in_from::<__m512>(inputs, 0, cin, v, vstride);
            let c = transform_in_from::<__m256>(inputs, c, cin, v, vstride);
            transform_in_from::<f32>(inputs, c, cin, v, vstride);
        }
    }

    /// # Safety
    /// As [`super::transform_in`], on a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transform_in_avx2(
        inputs: &[*const f32; POS],
        cin: usize,
        v: *mut f32,
        vstride: usize,
    ) {
        unsafe {
            let c = transform_in_from::<__m256>(inputs, 0, cin, v, vstride);
            transform_in_from::<f32>(inputs, c, cin, v, vstride);
        }
    }

    /// # Safety
    /// As [`super::transform_out`], on a CPU with AVX-512F; returns the channels done.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transform_out_avx512(
        m: *const f32,
        mstride: usize,
        pixels: &[Option<usize>; TILE * TILE],
        out: *mut f32,
        cout: usize,
        epi: &Epi<'_>,
    ) -> usize {
        unsafe {
            let c = transform_out_from::<__m512>(m, mstride, pixels, out, 0, cout, epi);
            transform_out_from::<__m256>(m, mstride, pixels, out, c, cout, epi)
        }
    }

    /// # Safety
    /// As [`super::transform_out`], on a CPU with AVX2 and FMA; returns the channels done.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transform_out_avx2(
        m: *const f32,
        mstride: usize,
        pixels: &[Option<usize>; TILE * TILE],
        out: *mut f32,
        cout: usize,
        epi: &Epi<'_>,
    ) -> usize {
        unsafe { transform_out_from::<__m256>(m, mstride, pixels, out, 0, cout, epi) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::conv::tests::data;
    use crate::backend::op_check::conv_dims;

    /// Against the direct path (itself tested against the plain loop), at every level, inline
    /// and on a team: shapes with and without padding, outputs that are not a multiple of the
    /// tile (overhang), channels that leave a ragged register, blocks of tiles cut mid-image,
    /// and each epilogue.
    #[test]
    fn matches_the_direct_path() {
        let team = Exec::Team(crate::backend::cpu::team::test_team());
        for (n, h, w, cin, cout, pad, act) in [
            (1, 8, 8, 16, 32, 1, Activation::Relu),
            (2, 7, 9, 3, 5, 1, Activation::None),
            (1, 14, 14, 64, 64, 1, Activation::Relu6),
            (3, 5, 6, 20, 40, 0, Activation::GeluErf),
            (1, 3, 3, 8, 8, 1, Activation::Relu),
            (2, 29, 31, 24, 17, 1, Activation::Relu),
            (1, 6, 6, 300, 9, 1, Activation::None),
        ] {
            let geo = Conv2d {
                stride: [1, 1],
                padding: [pad, pad],
                groups: 1,
                padding_extra: [0, 0],
            };
            let (xs, ws) = ([n, h, w, cin], [cout, 3, 3, cin]);
            let d = conv_dims(&xs, &ws, None, &geo, None).unwrap();
            let out_shape = [n, d.oh, d.ow, cout];
            let dims = conv_dims(&xs, &ws, Some(&[cout]), &geo, Some(&out_shape)).unwrap();
            let x = data(n * h * w * cin, 11);
            let wt = data(cout * 9 * cin, 12);
            let b = data(cout, 13);
            let r = data(out_shape.iter().product(), 14);
            for level in SimdLevel::available() {
                let c = Conv {
                    x: &x,
                    w: &wt,
                    b: Some(&b),
                    residual: Some(&r),
                    dims,
                    p: &geo,
                    act,
                    packed: None,
                    taps: None,
                    level,
                };
                let want = super::super::conv::conv2d(c, Exec::Inline);
                let f = Filters::new(level, &wt, cout, cin);
                for (exec, block, tasks) in [
                    (Exec::Inline, 1000, false),
                    (team, 1000, false),
                    (team, 7, false),
                    (Exec::Inline, 1, false),
                    (team, 5, true),
                    (Exec::Inline, 3, true),
                ] {
                    let got = match (block, tasks) {
                        (1000, _) => conv(&c, &f, exec),
                        (_, false) => in_blocks(&c, &f, exec, block),
                        (_, true) => per_task(&c, &f, exec, block),
                    };
                    assert_eq!(got.len(), want.len());
                    let scale = (9 * cin) as f32;
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        // The sums have up to 9 * cin terms of magnitude <= 1.
                        let tol = 2e-6 * scale.max(1.0) * w.abs().max(1.0);
                        assert!(
                            (g - w).abs() <= tol,
                            "{level:?} {n}x{h}x{w}x{cin} -> {cout} pad {pad}, value {i}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
