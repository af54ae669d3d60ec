//! One register of f32 lanes, as the hand-written vector loops (depthwise convolution, the
//! Winograd transforms) see it: the same loop is written once, generic over [`Vector`], and
//! instantiated for AVX-512 (`__m512`, 16 lanes), AVX2 (`__m256`, 8 lanes) and plain `f32`
//! (1 lane: the portable level and the channels after the last whole register).
//!
//! The x86 implementations are `#[inline(always)]` wrappers of the intrinsics: the generic
//! loops must be called from a function compiled with the matching `target_feature`.

/// The few vector operations the loops need, for one register width.
pub(crate) trait Vector: Copy {
    const LANES: usize;
    /// # Safety
    /// `p` is valid for `LANES` reads; the CPU has the width's instructions.
    unsafe fn load(p: *const f32) -> Self;
    /// # Safety
    /// `p` is valid for `LANES` writes; the CPU has the width's instructions.
    unsafe fn store(self, p: *mut f32);
    /// # Safety
    /// The CPU has the width's instructions (as every method below).
    unsafe fn splat(v: f32) -> Self;
    /// `self * b + c`.
    unsafe fn fma(self, b: Self, c: Self) -> Self;
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn sub(self, b: Self) -> Self;
    unsafe fn max(self, b: Self) -> Self;
    unsafe fn min(self, b: Self) -> Self;
}

/// The portable width (one lane), so that a vector loop also covers the channel tail and the
/// `generic` level.
impl Vector for f32 {
    const LANES: usize = 1;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        unsafe { p.read() }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { p.write(self) }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        v
    }
    #[inline(always)]
    unsafe fn fma(self, b: Self, c: Self) -> Self {
        // Not `mul_add`: without FMA in the baseline target that is a libm call.
        self * b + c
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        self + b
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        self - b
    }
    // max-then-min as the vector instructions do (NaN becomes the second operand).
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        if self > b { self } else { b }
    }
    #[inline(always)]
    unsafe fn min(self, b: Self) -> Self {
        if self < b { self } else { b }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Vector;
    use std::arch::x86_64::*;

    impl Vector for __m512 {
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self) }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            unsafe { _mm512_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn fma(self, b: Self, c: Self) -> Self {
            unsafe { _mm512_fmadd_ps(self, b, c) }
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            unsafe { _mm512_add_ps(self, b) }
        }
        #[inline(always)]
        unsafe fn sub(self, b: Self) -> Self {
            unsafe { _mm512_sub_ps(self, b) }
        }
        #[inline(always)]
        unsafe fn max(self, b: Self) -> Self {
            unsafe { _mm512_max_ps(self, b) }
        }
        #[inline(always)]
        unsafe fn min(self, b: Self) -> Self {
            unsafe { _mm512_min_ps(self, b) }
        }
    }

    impl Vector for __m256 {
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm256_storeu_ps(p, self) }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            unsafe { _mm256_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn fma(self, b: Self, c: Self) -> Self {
            unsafe { _mm256_fmadd_ps(self, b, c) }
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            unsafe { _mm256_add_ps(self, b) }
        }
        #[inline(always)]
        unsafe fn sub(self, b: Self) -> Self {
            unsafe { _mm256_sub_ps(self, b) }
        }
        #[inline(always)]
        unsafe fn max(self, b: Self) -> Self {
            unsafe { _mm256_max_ps(self, b) }
        }
        #[inline(always)]
        unsafe fn min(self, b: Self) -> Self {
            unsafe { _mm256_min_ps(self, b) }
        }
    }
}
