//! The element types reel stores: `f32` and `bf16`. Arithmetic always happens in `f32`.

use half::bf16;

/// A storage dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
        }
    }

    /// The name safetensors and `config.json` (`torch_dtype`) use.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::BF16 => "BF16",
        }
    }

    /// Parses `float32`/`bfloat16` (HF `torch_dtype`) or `F32`/`BF16` (safetensors).
    pub fn parse(s: &str) -> Option<DType> {
        match s {
            "float32" | "F32" | "f32" | "fp32" => Some(DType::F32),
            "bfloat16" | "BF16" | "bf16" => Some(DType::BF16),
            _ => None,
        }
    }
}

/// An element type kernels read and write. Loads widen to `f32`, stores round from `f32`.
pub trait Float:
    Copy + Send + Sync + Default + PartialEq + std::fmt::Debug + bytemuck::Pod + 'static
{
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Float for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Float for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
