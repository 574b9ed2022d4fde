//! Element-wise helpers for the native CPU kernels: a vectorisable `exp` and run-time choice of
//! the widest instruction set the CPU has (AVX-512, else AVX2 + FMA, else the x86-64 baseline).
//!
//! The loops are written once, as plain Rust the compiler vectorises, and compiled three times
//! with different `target_feature`s; [`Isa::detect`] picks one per call (a cached CPUID test), so
//! one binary runs on every x86-64 CPU and uses AVX-512 where it exists.

/// Which compiled copy of a kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F (16 f32 lanes).
    Avx512,
    /// AVX2 with FMA (8 f32 lanes).
    Avx2,
    /// Whatever the target's baseline is (SSE2 on x86-64, NEON on aarch64).
    Baseline,
}

impl Isa {
    /// The widest instruction set this CPU supports.
    #[inline]
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    }

    /// Name for benchmark output.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512f",
            Isa::Avx2 => "avx2+fma",
            Isa::Baseline => "baseline",
        }
    }
}

/// Run `$body` (an expression) compiled for the CPU's widest instruction set. The body is
/// inlined into a `#[target_feature]` function per ISA, so the loops in it vectorise to that
/// width.
macro_rules! with_isa {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            match $crate::ops::simd::Isa::detect() {
                // SAFETY: `Isa::detect` found AVX-512F, AVX2 and FMA on this CPU.
                $crate::ops::simd::Isa::Avx512 => unsafe { avx512(|| $body) },
                // SAFETY: `Isa::detect` found AVX2 and FMA on this CPU.
                $crate::ops::simd::Isa::Avx2 => unsafe { avx2(|| $body) },
                $crate::ops::simd::Isa::Baseline => $body,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body
        }
    }};
}
pub(crate) use with_isa;

/// `e^x` for f32 in straight-line code the compiler vectorises: `2^k · p(r)` with
/// `x = k ln2 + r`, `|r| ≤ ln2/2`, and a degree-7 polynomial for `e^r` (relative error below
/// 2e-7, i.e. about 1-2 ulp, over the whole range). Below -87.3 it returns 0 (as `exp` rounds
/// to zero there, bar denormals); above 88.7 it returns `+inf`; NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so `k · ln2` is exact in its high part (Cody-Waite).
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = x.clamp(-87.336_55, 88.722_83);
    let k = (xc * LOG2E).round();
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    // Taylor coefficients of e^r to degree 7, Horner form.
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // 2^k through the exponent bits; k is in [-126, 128] after the clamp, or NaN (a NaN input
    // passes `clamp`), replaced by 0 here: the result is then overridden below. With NaN ruled
    // out the unchecked conversion is sound, and unlike `as i32` (saturating, NaN to 0) it
    // vectorises to one `vcvttps2dq` instead of a scalar convert-and-fix-up per lane.
    let kf = if k.is_nan() { 0.0 } else { k };
    // SAFETY: `kf` is finite and within [-126, 128].
    let ki: i32 = unsafe { kf.to_int_unchecked() };
    let scale = f32::from_bits(((ki.clamp(-126, 127) + 127) as u32) << 23);
    let mut y = p * scale;
    if ki > 127 {
        y *= 2.0;
    }
    if x < -87.336_55 {
        0.0
    } else if x > 88.722_83 {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// Real numbers the kernels compute in: f32 (the model's dtype) and f64 (checks).
pub trait Real:
    Copy
    + Send
    + Sync
    + 'static
    + PartialOrd
    + std::fmt::Debug
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// -∞.
    const NEG_INFINITY: Self;
    /// From an f64 constant.
    fn of(x: f64) -> Self;
    /// `e^x` (vectorisable for f32).
    fn exp(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// Square root.
    fn sqrt(self) -> Self;
    /// The larger of two (NaN-ignoring like `f32::max`).
    fn max(self, o: Self) -> Self;
    /// Widen to f64 (accumulation of diagnostics).
    fn to_f64(self) -> f64;
}

impl Real for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    const NEG_INFINITY: f32 = f32::NEG_INFINITY;
    #[inline(always)]
    fn of(x: f64) -> f32 {
        x as f32
    }
    #[inline(always)]
    fn exp(self) -> f32 {
        exp_f32(self)
    }
    #[inline(always)]
    fn ln(self) -> f32 {
        f32::ln(self)
    }
    #[inline(always)]
    fn sqrt(self) -> f32 {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn max(self, o: f32) -> f32 {
        f32::max(self, o)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Real for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    const NEG_INFINITY: f64 = f64::NEG_INFINITY;
    #[inline(always)]
    fn of(x: f64) -> f64 {
        x
    }
    #[inline(always)]
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> f64 {
        f64::ln(self)
    }
    #[inline(always)]
    fn sqrt(self) -> f64 {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn max(self, o: f64) -> f64 {
        f64::max(self, o)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_two_ulp_of_libm_everywhere() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.5 {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_3;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn every_isa_copy_agrees() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.05).collect();
        let base: Vec<f32> = xs.iter().map(|&x| exp_f32(x)).collect();
        let fast: Vec<f32> = with_isa!(xs.iter().map(|&x| exp_f32(x)).collect::<Vec<_>>());
        assert_eq!(base, fast);
    }
}
