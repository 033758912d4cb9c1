//! A host tensor: a shape, a dtype and an owned buffer.

use crate::float::{DType, Float};
use half::bf16;

/// Where a tensor's buffer lives. The CUDA variant arrives with the GPU backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
}

/// Dimensions, outermost first (row-major).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Shape(pub Vec<usize>);

impl Shape {
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }
    pub fn dims(&self) -> &[usize] {
        &self.0
    }
    pub fn rank(&self) -> usize {
        self.0.len()
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<Vec<usize>> for Shape {
    fn from(d: Vec<usize>) -> Self {
        Shape(d)
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape(d.to_vec())
    }
}

/// An owned host buffer of one dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum Storage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
}

#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("shape {shape} holds {expected} elements but the buffer has {actual}")]
    SizeMismatch {
        shape: Shape,
        expected: usize,
        actual: usize,
    },
    #[error("byte length {len} is not a multiple of the {dtype:?} element size")]
    ByteLength { len: usize, dtype: DType },
}

/// A host tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Shape,
    pub storage: Storage,
}

impl Tensor {
    /// A tensor over `data`; fails when the element count does not match the shape.
    pub fn from_f32(shape: impl Into<Shape>, data: Vec<f32>) -> Result<Tensor, TensorError> {
        let shape = shape.into();
        check_len(&shape, data.len())?;
        Ok(Tensor {
            shape,
            storage: Storage::F32(data),
        })
    }

    pub fn zeros(shape: impl Into<Shape>, dtype: DType) -> Tensor {
        let shape = shape.into();
        let n = shape.numel();
        let storage = match dtype {
            DType::F32 => Storage::F32(vec![0.0; n]),
            DType::BF16 => Storage::BF16(vec![bf16::ZERO; n]),
        };
        Tensor { shape, storage }
    }

    /// Reads little-endian bytes (the safetensors layout) of `dtype`.
    pub fn from_le_bytes(
        shape: impl Into<Shape>,
        dtype: DType,
        bytes: &[u8],
    ) -> Result<Tensor, TensorError> {
        let shape = shape.into();
        if !bytes.len().is_multiple_of(dtype.size()) {
            return Err(TensorError::ByteLength {
                len: bytes.len(),
                dtype,
            });
        }
        check_len(&shape, bytes.len() / dtype.size())?;
        let storage = match dtype {
            DType::F32 => Storage::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::BF16 => Storage::BF16(
                bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
            ),
        };
        Ok(Tensor { shape, storage })
    }

    /// Little-endian bytes (the safetensors layout).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match &self.storage {
            Storage::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Storage::BF16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        }
    }

    pub fn dtype(&self) -> DType {
        match self.storage {
            Storage::F32(_) => DType::F32,
            Storage::BF16(_) => DType::BF16,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    /// The values widened to `f32`.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.storage {
            Storage::F32(v) => v.clone(),
            Storage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// The same values stored as `dtype` (rounding to nearest even for bf16).
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        let storage = match (dtype, &self.storage) {
            (DType::F32, _) => Storage::F32(self.to_f32_vec()),
            (DType::BF16, Storage::BF16(v)) => Storage::BF16(v.clone()),
            (DType::BF16, Storage::F32(v)) => {
                Storage::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect())
            }
        };
        Tensor {
            shape: self.shape.clone(),
            storage,
        }
    }
}

/// Converts a slice between element types.
pub fn convert<A: Float, B: Float>(src: &[A]) -> Vec<B> {
    src.iter().map(|x| B::from_f32(x.to_f32())).collect()
}

fn check_len(shape: &Shape, actual: usize) -> Result<(), TensorError> {
    if shape.numel() != actual {
        return Err(TensorError::SizeMismatch {
            shape: shape.clone(),
            expected: shape.numel(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_both_dtypes() {
        let t = Tensor::from_f32(vec![2, 3], vec![1.0, -2.5, 3.25, 0.0, 1e-3, -7.0]).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let c = t.to_dtype(dtype);
            let back = Tensor::from_le_bytes(vec![2, 3], dtype, &c.to_le_bytes()).unwrap();
            assert_eq!(back, c);
        }
        // bf16 keeps 8 bits of mantissa: 3.25 and -7 exactly, 1e-3 approximately.
        let b = t.to_dtype(DType::BF16).to_f32_vec();
        assert_eq!(b[2], 3.25);
        assert!((b[4] - 1e-3).abs() < 1e-5);
    }

    #[test]
    fn wrong_sizes_are_refused() {
        assert!(Tensor::from_f32(vec![2, 2], vec![0.0; 3]).is_err());
        assert!(Tensor::from_le_bytes(vec![1], DType::F32, &[0, 0, 0]).is_err());
    }
}
