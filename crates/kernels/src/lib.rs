//! reel-kernels: every op as a forward/backward pair over slices (llm.c style).
//!
//! Argument order: outputs, saved values, inputs, weights, dimensions. Parameter gradients
//! accumulate (`+=`), activation gradients overwrite (`=`). Buffers are generic over
//! [`reel_tensor::Float`] (f32 or bf16); every accumulation happens in f32.

pub mod attention;
pub mod cross_entropy;
pub mod embedding;
pub mod gelu;
mod gemm;
pub mod matmul;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;
