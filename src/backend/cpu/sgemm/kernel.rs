//! The micro-kernels: `C[r x NR] (+)= A[r x kc] B[kc x NR]` for `r <= MR` rows of A (element
//! `(i, p)` at `a + i * rs + p * cs`: a packed panel, `rs = 1, cs = r`, or rows read in place,
//! `rs` = their stride, `cs = 1`) and one packed panel of B (`NR` columns, k-major). The accumulators live in registers for the whole `kc` loop; each k step
//! is two vector loads of B, `r` broadcasts of A and `2r` fused multiply-adds.
//!
//! Each level is one generic function over the row count `R`, so the compiler unrolls the row
//! loop and keeps `2R` accumulators in registers (AVX-512: 24 of 32, AVX2: 12 of 16).

use super::SimdLevel as Level;

/// One micro-kernel call: `c` has `rows` rows at stride `ldc` and `level.nr()` columns;
/// `accumulate` adds to what `c` holds, else overwrites it.
///
/// # Safety
/// `a` covers `rows x kc` values at strides `(rs, cs)`, `b` holds `kc * level.nr()`, `c` covers `rows` rows of
/// `level.nr()` values at stride `ldc`, and the CPU has `level`'s instructions.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn run(
    level: Level,
    rows: usize,
    kc: usize,
    a: *const f32,
    (rs, cs): (usize, usize),
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    macro_rules! by_rows {
        ($f:ident, $($r:literal)+) => {
            match rows {
                $($r => $f::<$r>(kc, a, rs, cs, b, c, ldc, accumulate),)+
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
    kc: usize,
    a: *const f32,
    rs: usize,
    cs: usize,
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
        for p in 0..kc {
            let bp = std::slice::from_raw_parts(b.add(p * NR), NR);
            for (i, row) in acc.iter_mut().enumerate() {
                let av = *a.add(i * rs + p * cs);
                for (x, &bv) in row.iter_mut().zip(bp) {
                    *x += av * bv;
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
    use std::arch::x86_64::*;

    /// 32 columns as two 16-lane registers; up to 12 rows.
    ///
    /// # Safety
    /// As [`super::run`]; the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512<const R: usize>(
        kc: usize,
        a: *const f32,
        rs: usize,
        cs: usize,
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
            let (mut a, mut b) = (a, b);
            for _ in 0..kc {
                let b0 = _mm512_loadu_ps(b);
                let b1 = _mm512_loadu_ps(b.add(16));
                for i in 0..R {
                    let av = _mm512_set1_ps(*a.add(i * rs));
                    lo[i] = _mm512_fmadd_ps(av, b0, lo[i]);
                    hi[i] = _mm512_fmadd_ps(av, b1, hi[i]);
                }
                a = a.add(cs);
                b = b.add(32);
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
        kc: usize,
        a: *const f32,
        rs: usize,
        cs: usize,
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
            let (mut a, mut b) = (a, b);
            for _ in 0..kc {
                let b0 = _mm256_loadu_ps(b);
                let b1 = _mm256_loadu_ps(b.add(8));
                for i in 0..R {
                    let av = _mm256_set1_ps(*a.add(i * rs));
                    lo[i] = _mm256_fmadd_ps(av, b0, lo[i]);
                    hi[i] = _mm256_fmadd_ps(av, b1, hi[i]);
                }
                a = a.add(cs);
                b = b.add(16);
            }
            for i in 0..R {
                _mm256_storeu_ps(c.add(i * ldc), lo[i]);
                _mm256_storeu_ps(c.add(i * ldc + 8), hi[i]);
            }
        }
    }
}
