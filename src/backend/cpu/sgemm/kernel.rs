//! The micro-kernels: `C[r x NR] (+)= A[r x kc] B[kc x NR]` for `r <= MR` rows of A (an
//! [`APanel`]) and one packed panel of B (`NR` columns, k-major). The accumulators live in
//! registers for the whole `kc` loop; each k step is two vector loads of B, `r` broadcasts of A
//! and `2r` fused multiply-adds.
//!
//! Each level is one generic function over the row count `R`, so the compiler unrolls the row
//! loop and keeps `2R` accumulators in registers (AVX-512: 24 of 32, AVX2: 12 of 16).

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

/// One micro-kernel call: `c` has `rows` rows at stride `ldc` and `level.nr()` columns;
/// `accumulate` adds to what `c` holds, else overwrites it.
///
/// # Safety
/// `a` covers `rows` rows of its segments, `b` holds `segs.len() * seg_k * level.nr()` values,
/// `c` covers `rows` rows of `level.nr()` values at stride `ldc`, and the CPU has `level`'s
/// instructions.
pub(super) unsafe fn run(
    level: Level,
    rows: usize,
    a: APanel<'_>,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    macro_rules! by_rows {
        ($f:ident, $($r:literal)+) => {
            match rows {
                $($r => $f::<$r>(a, b, c, ldc, accumulate),)+
                _ => unreachable!("{rows} rows for a {level:?} micro-kernel"),
            }
        };
    }
    // SAFETY: forwarded from the caller; `rows <= level.mr()` selects an instance.
    unsafe {
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => {
                use x86::avx512;
                by_rows!(avx512, 1 2 3 4 5 6 7 8 9 10 11 12)
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                use x86::avx2;
                by_rows!(avx2, 1 2 3 4 5 6)
            }
            _ => by_rows!(generic, 1 2 3 4),
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
        for (i, row) in acc.iter().enumerate() {
            std::slice::from_raw_parts_mut(c.add(i * ldc), NR).copy_from_slice(row);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::APanel;
    use std::arch::x86_64::*;

    /// 32 columns as two 16-lane registers; up to 12 rows.
    ///
    /// # Safety
    /// As [`super::run`]; the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512<const R: usize>(
        a: APanel<'_>,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        // SAFETY: the caller guarantees every pointer covers what is read or written here.
        unsafe {
            if accumulate {
                for i in 0..R {
                    lo[i] = _mm512_loadu_ps(c.add(i * ldc));
                    hi[i] = _mm512_loadu_ps(c.add(i * ldc + 16));
                }
            }
            let mut b = b;
            for &seg in a.segs {
                let mut ap = a.ptr.add(seg);
                for _ in 0..a.seg_k {
                    let b0 = _mm512_loadu_ps(b);
                    let b1 = _mm512_loadu_ps(b.add(16));
                    for i in 0..R {
                        let av = _mm512_set1_ps(*ap.add(i * a.rs));
                        lo[i] = _mm512_fmadd_ps(av, b0, lo[i]);
                        hi[i] = _mm512_fmadd_ps(av, b1, hi[i]);
                    }
                    ap = ap.add(a.cs);
                    b = b.add(32);
                }
            }
            for i in 0..R {
                _mm512_storeu_ps(c.add(i * ldc), lo[i]);
                _mm512_storeu_ps(c.add(i * ldc + 16), hi[i]);
            }
        }
    }

    /// 16 columns as two 8-lane registers; up to 6 rows.
    ///
    /// # Safety
    /// As [`super::run`]; the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2<const R: usize>(
        a: APanel<'_>,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        // SAFETY: the caller guarantees every pointer covers what is read or written here.
        unsafe {
            if accumulate {
                for i in 0..R {
                    lo[i] = _mm256_loadu_ps(c.add(i * ldc));
                    hi[i] = _mm256_loadu_ps(c.add(i * ldc + 8));
                }
            }
            let mut b = b;
            for &seg in a.segs {
                let mut ap = a.ptr.add(seg);
                for _ in 0..a.seg_k {
                    let b0 = _mm256_loadu_ps(b);
                    let b1 = _mm256_loadu_ps(b.add(8));
                    for i in 0..R {
                        let av = _mm256_set1_ps(*ap.add(i * a.rs));
                        lo[i] = _mm256_fmadd_ps(av, b0, lo[i]);
                        hi[i] = _mm256_fmadd_ps(av, b1, hi[i]);
                    }
                    ap = ap.add(a.cs);
                    b = b.add(16);
                }
            }
            for i in 0..R {
                _mm256_storeu_ps(c.add(i * ldc), lo[i]);
                _mm256_storeu_ps(c.add(i * ldc + 8), hi[i]);
            }
        }
    }
}
