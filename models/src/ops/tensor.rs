//! Small tensor helpers the ops and the model share: exact-in-f64 activations and the dtype
//! casts of mixed precision.

use burn::tensor::{activation, backend::Backend, DType, Tensor};

/// `sigmoid`, exact in f64: burn's own computes in f32 whatever the input type, which is fine
/// for f32 and half models but not for f64 checks (finite differences).
pub fn sigmoid<const D: usize, B: Backend>(x: Tensor<B, D>) -> Tensor<B, D> {
    match x.dtype() {
        DType::F64 => x.neg().exp().add_scalar(1.0).recip(),
        _ => activation::sigmoid(x),
    }
}

/// `x · sigmoid(x)` (exact in f64).
pub fn silu<const D: usize, B: Backend>(x: Tensor<B, D>) -> Tensor<B, D> {
    match x.dtype() {
        DType::F64 => x.clone() * sigmoid(x),
        _ => activation::silu(x),
    }
}

/// Half-precision values are widened to f32 for reductions (as HF does); f32 and f64 stay.
pub fn upcast<const D: usize, B: Backend>(x: Tensor<B, D>) -> Tensor<B, D> {
    match x.dtype() {
        DType::F16 | DType::BF16 => x.cast(DType::F32),
        _ => x,
    }
}

/// `x` in `dtype` (a cast only when it differs): autocast's weight cast, in the graph so the
/// gradient comes back in the parameter's dtype.
pub fn to_dtype<const D: usize, B: Backend>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if x.dtype() == dtype {
        x
    } else {
        x.cast(dtype)
    }
}
