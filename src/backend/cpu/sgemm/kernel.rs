//! The micro-kernels: `C[r x NR] (+)= A[r x kc] B[kc x NR]` for `r <= MR` rows of A (an
//! [`APanel`]) and one packed panel of B (`NR` columns, k-major; `NR / 2` for a half-width
//! panel). The accumulators live in registers for the whole `kc` loop; each k step is two vector
//! loads of B, `r` broadcasts of A and `2r` fused multiply-adds (one load and `r` FMAs at half
//! width).
//!
//! Each level is one generic function over the row count `R` (and half width `H`), so the
//! compiler unrolls the row loop and keeps `2R` accumulators in registers (AVX-512: 24 of 32,
//! AVX2: 12 of 16).

use super::SimdLevel as Level;

/// Where a micro-kernel reads its `r x kc` block of A: k runs through `segs.len()` segments of
/// `seg_k` steps each; in segment `s`, element `(i, t)` is at `ptr + segs[s] + i * rs + t * cs`.
/// Row-major rows are one segment with `rs` = their stride and `cs = 1`; a convolution's
/// windows have a segment per kernel row (its offset in the zero-padded input, `kw * cin`
/// adjacent values), `rs` the distance between adjacent output pixels' windows.
#[derive(Clone, Copy)]
pub(super) struct APanel<'s> {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
    pub segs: &'s [usize],
    pub seg_k: usize,
}

/// What the last slice of k does to its sums before the one store, in registers:
/// `clamp(scale * sum + bias[col] + res[row, col])`.
#[derive(Clone, Copy)]
pub(super) struct Finish {
    pub scale: f32,
    /// One value per column of the panel (`NR`, or `NR / 2` at half width), or null.
    pub bias: *const f32,
    /// `rows` rows of the panel's columns at stride `ldr`, or null.
    pub res: *const f32,
    pub ldr: usize,
    pub clamp: Clamp,
}

/// The activations the micro-kernels apply themselves (others run after the store).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Clamp {
    None,
    /// `max(v, 0)`.
    Relu,
    /// `min(max(v, 0), 6)`.
    Relu6,
}

impl Finish {
    /// The finished value of one element (the portable kernel, and the tests' reference).
    #[inline(always)]
    // max-then-min, not clamp: NaN becomes 0 as in the vector kernels (maxps returns its
    // second operand when the first is NaN).
    #[allow(clippy::manual_clamp)]
    pub(super) fn scalar(&self, v: f32, bias: f32, res: f32) -> f32 {
        let v = v * self.scale + bias + res;
        match self.clamp {
            Clamp::None => v,
            Clamp::Relu => v.max(0.0),
            Clamp::Relu6 => v.max(0.0).min(6.0),
        }
    }
}

/// One micro-kernel call: `c` has `rows` rows at stride `ldc` and `nr` columns (`nr` =
/// `level.nr()`, or half of it for a `half`-width panel); `accumulate` adds to what `c` holds,
/// else overwrites it; `fin`, on the last slice of k, finishes the sums before they are stored.
///
/// # Safety
/// `a` covers `rows` rows of its segments, `b` holds `segs.len() * seg_k * nr` values, `c`
/// covers `rows` rows of `nr` values at stride `ldc`, `fin`'s pointers cover what [`Finish`]
/// says, and the CPU has `level`'s instructions.
/// `pairs`: A and B in bf16 pairs (a step is two of k, `vdpbf16ps`), AVX-512 only.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn run(
    level: Level,
    pairs: bool,
    half: bool,
    rows: usize,
    a: APanel<'_>,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    fin: Option<&Finish>,
) {
    macro_rules! by_rows {
        ($f:ident, $($r:literal)+) => {
            match (rows, half) {
                $(($r, false) => $f::<$r, false>(a, b, c, ldc, accumulate, fin),)+
                $(($r, true) => $f::<$r, true>(a, b, c, ldc, accumulate, fin),)+
                _ => unreachable!("{rows} rows for a {level:?} micro-kernel"),
            }
        };
    }
    // SAFETY: forwarded from the caller; `rows <= level.mr()` selects an instance.
    unsafe {
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 if pairs => {
                use x86::avx512_pairs;
                by_rows!(avx512_pairs, 1 2 3 4 5 6 7 8 9 10 11 12)
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => {
                use x86::avx512;
                by_rows!(avx512, 1 2 3 4 5 6 7 8 9 10 11 12)
            }
            _ if pairs => unreachable!("bf16 pairs on {level:?}"),
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                use x86::avx2;
                by_rows!(avx2, 1 2 3 4 5 6)
            }
            _ => {
                assert!(!half, "the portable kernel has no half-width panels");
                match rows {
                    1 => generic::<1>(a, b, c, ldc, accumulate, fin),
                    2 => generic::<2>(a, b, c, ldc, accumulate, fin),
                    3 => generic::<3>(a, b, c, ldc, accumulate, fin),
                    4 => generic::<4>(a, b, c, ldc, accumulate, fin),
                    _ => unreachable!("{rows} rows for a {level:?} micro-kernel"),
                }
            }
        }
    }
}

/// Portable version (8 columns, up to 4 rows), written so the compiler vectorises it with
/// whatever the baseline target has (SSE2 on x86-64).
///
/// # Safety
/// As [`run`], with 8 columns.
unsafe fn generic<const R: usize>(
    a: APanel<'_>,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    fin: Option<&Finish>,
) {
    const NR: usize = Level::Generic.nr();
    let mut acc = [[0.0f32; NR]; R];
    // SAFETY: the caller guarantees every pointer covers what is read or written here.
    unsafe {
        if accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                row.copy_from_slice(std::slice::from_raw_parts(c.add(i * ldc), NR));
            }
        }
        let mut b = b;
        for &seg in a.segs {
            let mut ap = a.ptr.add(seg);
            for _ in 0..a.seg_k {
                let bp = std::slice::from_raw_parts(b, NR);
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = *ap.add(i * a.rs);
                    for (x, &bv) in row.iter_mut().zip(bp) {
                        *x += av * bv;
                    }
                }
                ap = ap.add(a.cs);
                b = b.add(NR);
            }
        }
        if let Some(f) = fin {
            for (i, row) in acc.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    let bias = if f.bias.is_null() {
                        0.0
                    } else {
                        *f.bias.add(j)
                    };
                    let res = if f.res.is_null() {
                        0.0
                    } else {
                        *f.res.add(i * f.ldr + j)
                    };
                    *v = f.scalar(*v, bias, res);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            std::slice::from_raw_parts_mut(c.add(i * ldc), NR).copy_from_slice(row);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{APanel, Clamp, Finish};
    use std::arch::x86_64::*;

    /// One AVX-512 kernel: `$step(acc, a, b)` adds the products of one k step of A's row
    /// (`$bcast(ptr)`: its value, or its pair, in every lane) and a B register to `acc`.
    macro_rules! avx512_kernel {
        ($(#[$doc:meta])* $name:ident, $features:literal, $bcast:expr, $step:expr) => {
            $(#[$doc])*
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const R: usize, const H: bool>(
                a: APanel<'_>,
                b: *const f32,
                c: *mut f32,
                ldc: usize,
                accumulate: bool,
                fin: Option<&Finish>,
            ) {
                let mut lo = [_mm512_setzero_ps(); R];
                let mut hi = [_mm512_setzero_ps(); R];
                // SAFETY: the caller guarantees every pointer covers what is read or written here.
                unsafe {
                    if accumulate {
                        for i in 0..R {
                            lo[i] = _mm512_loadu_ps(c.add(i * ldc));
                            if !H {
                                hi[i] = _mm512_loadu_ps(c.add(i * ldc + 16));
                            }
                        }
                    }
                    let mut b = b;
                    for &seg in a.segs {
                        let mut ap = a.ptr.add(seg);
                        for _ in 0..a.seg_k {
                            let b0 = _mm512_loadu_ps(b);
                            let b1 = if H { b0 } else { _mm512_loadu_ps(b.add(16)) };
                            for i in 0..R {
                                let av = $bcast(ap.add(i * a.rs));
                                lo[i] = $step(lo[i], av, b0);
                                if !H {
                                    hi[i] = $step(hi[i], av, b1);
                                }
                            }
                            ap = ap.add(a.cs);
                            b = b.add(if H { 16 } else { 32 });
                        }
                    }
                    if let Some(f) = fin {
                        let scale = _mm512_set1_ps(f.scale);
                        let (b0, b1) = if f.bias.is_null() {
                            (_mm512_setzero_ps(), _mm512_setzero_ps())
                        } else {
                            let b0 = _mm512_loadu_ps(f.bias);
                            (
                                b0,
                                if H {
                                    b0
                                } else {
                                    _mm512_loadu_ps(f.bias.add(16))
                                },
                            )
                        };
                        let (zero, six) = (_mm512_setzero_ps(), _mm512_set1_ps(6.0));
                        // One simple loop per step, so that each is unrolled and the accumulators
                        // stay in registers (a loop with branches inside kept them on the stack).
                        for i in 0..R {
                            lo[i] = _mm512_fmadd_ps(lo[i], scale, b0);
                            if !H {
                                hi[i] = _mm512_fmadd_ps(hi[i], scale, b1);
                            }
                        }
                        if !f.res.is_null() {
                            for i in 0..R {
                                let r = f.res.add(i * f.ldr);
                                lo[i] = _mm512_add_ps(lo[i], _mm512_loadu_ps(r));
                                if !H {
                                    hi[i] = _mm512_add_ps(hi[i], _mm512_loadu_ps(r.add(16)));
                                }
                            }
                        }
                        if f.clamp != Clamp::None {
                            for i in 0..R {
                                lo[i] = _mm512_max_ps(lo[i], zero);
                                if !H {
                                    hi[i] = _mm512_max_ps(hi[i], zero);
                                }
                            }
                        }
                        if f.clamp == Clamp::Relu6 {
                            for i in 0..R {
                                lo[i] = _mm512_min_ps(lo[i], six);
                                if !H {
                                    hi[i] = _mm512_min_ps(hi[i], six);
                                }
                            }
                        }
                    }
                    for i in 0..R {
                        _mm512_storeu_ps(c.add(i * ldc), lo[i]);
                        if !H {
                            _mm512_storeu_ps(c.add(i * ldc + 16), hi[i]);
                        }
                    }
                }
            }
        };
    }

    avx512_kernel!(
        /// 32 columns as two 16-lane registers (16 as one when `H`, a half-width panel); up
        /// to 12 rows.
        ///
        /// # Safety
        /// As [`super::run`]; the CPU has AVX-512F.
        avx512,
        "avx512f",
        |p: *const f32| _mm512_set1_ps(*p),
        |acc, a, b| _mm512_fmadd_ps(a, b, acc)
    );

    avx512_kernel!(
        /// As [`avx512`], A and B in bf16 pairs: a step multiplies a pair of A's values
        /// (broadcast) with 32 columns' pairs of B and adds both products to the f32 sums
        /// (`vdpbf16ps`), two of k per instruction where the f32 kernel does one.
        ///
        /// # Safety
        /// As [`super::run`]; the CPU has AVX-512F and AVX512-BF16.
        avx512_pairs,
        "avx512f,avx512bf16",
        |p: *const f32| _mm512_set1_epi32(*(p as *const i32)),
        // The registers reinterpreted as 16 bf16 pairs, as `vdpbf16ps` takes them.
        |acc, a: __m512i, b: __m512| _mm512_dpbf16_ps(
            acc,
            std::mem::transmute::<__m512i, __m512bh>(a),
            std::mem::transmute::<__m512, __m512bh>(b)
        )
    );

    /// 16 columns as two 8-lane registers (8 as one when `H`); up to 6 rows.
    ///
    /// # Safety
    /// As [`super::run`]; the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2<const R: usize, const H: bool>(
        a: APanel<'_>,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        fin: Option<&Finish>,
    ) {
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        // SAFETY: the caller guarantees every pointer covers what is read or written here.
        unsafe {
            if accumulate {
                for i in 0..R {
                    lo[i] = _mm256_loadu_ps(c.add(i * ldc));
                    if !H {
                        hi[i] = _mm256_loadu_ps(c.add(i * ldc + 8));
                    }
                }
            }
            let mut b = b;
            for &seg in a.segs {
                let mut ap = a.ptr.add(seg);
                for _ in 0..a.seg_k {
                    let b0 = _mm256_loadu_ps(b);
                    let b1 = if H { b0 } else { _mm256_loadu_ps(b.add(8)) };
                    for i in 0..R {
                        let av = _mm256_set1_ps(*ap.add(i * a.rs));
                        lo[i] = _mm256_fmadd_ps(av, b0, lo[i]);
                        if !H {
                            hi[i] = _mm256_fmadd_ps(av, b1, hi[i]);
                        }
                    }
                    ap = ap.add(a.cs);
                    b = b.add(if H { 8 } else { 16 });
                }
            }
            if let Some(f) = fin {
                let scale = _mm256_set1_ps(f.scale);
                let (b0, b1) = if f.bias.is_null() {
                    (_mm256_setzero_ps(), _mm256_setzero_ps())
                } else {
                    let b0 = _mm256_loadu_ps(f.bias);
                    (
                        b0,
                        if H {
                            b0
                        } else {
                            _mm256_loadu_ps(f.bias.add(8))
                        },
                    )
                };
                let (zero, six) = (_mm256_setzero_ps(), _mm256_set1_ps(6.0));
                // One simple loop per step, so that each is unrolled and the accumulators
                // stay in registers (a loop with branches inside kept them on the stack).
                for i in 0..R {
                    lo[i] = _mm256_fmadd_ps(lo[i], scale, b0);
                    if !H {
                        hi[i] = _mm256_fmadd_ps(hi[i], scale, b1);
                    }
                }
                if !f.res.is_null() {
                    for i in 0..R {
                        let r = f.res.add(i * f.ldr);
                        lo[i] = _mm256_add_ps(lo[i], _mm256_loadu_ps(r));
                        if !H {
                            hi[i] = _mm256_add_ps(hi[i], _mm256_loadu_ps(r.add(8)));
                        }
                    }
                }
                if f.clamp != Clamp::None {
                    for i in 0..R {
                        lo[i] = _mm256_max_ps(lo[i], zero);
                        if !H {
                            hi[i] = _mm256_max_ps(hi[i], zero);
                        }
                    }
                }
                if f.clamp == Clamp::Relu6 {
                    for i in 0..R {
                        lo[i] = _mm256_min_ps(lo[i], six);
                        if !H {
                            hi[i] = _mm256_min_ps(hi[i], six);
                        }
                    }
                }
            }
            for i in 0..R {
                _mm256_storeu_ps(c.add(i * ldc), lo[i]);
                if !H {
                    _mm256_storeu_ps(c.add(i * ldc + 8), hi[i]);
                }
            }
        }
    }
}
