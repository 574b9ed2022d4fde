//! Host-side tensors: the currency between file formats and the model. They hold their data in
//! the element type the file had (f32, f16 or bf16), so a half-precision checkpoint is not
//! doubled in memory before it reaches the device.

use half::{bf16, f16};

/// Element type of a [`HostTensor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Name as safetensors spells it.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    /// Name as HF `config.json` (`torch_dtype`) spells it.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(DType::F32),
            "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            other => Err(format!(
                "unknown dtype '{other}' (expected f32, f16 or bf16)"
            )),
        }
    }
}

/// The elements of a [`HostTensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

/// A dense row-major tensor in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostTensor {
    /// An f32 tensor; panics if `data.len()` does not match `shape` (a programming error).
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape/data mismatch"
        );
        HostTensor {
            shape,
            data: HostData::F32(data),
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        match self.data {
            HostData::F32(_) => DType::F32,
            HostData::F16(_) => DType::F16,
            HostData::BF16(_) => DType::BF16,
        }
    }

    /// The values widened to f32 (exact for every supported dtype).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            HostData::F32(v) => v.clone(),
            HostData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Consume into f32 values without copying when already f32.
    pub fn into_f32_vec(self) -> Vec<f32> {
        match self.data {
            HostData::F32(v) => v,
            _ => self.to_f32_vec(),
        }
    }

    /// Convert to another element type (round-to-nearest-even when narrowing).
    pub fn to_dtype(&self, dtype: DType) -> HostTensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        let f = self.to_f32_vec();
        let data = match dtype {
            DType::F32 => HostData::F32(f),
            DType::F16 => HostData::F16(f.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => HostData::BF16(f.iter().map(|&x| bf16::from_f32(x)).collect()),
        };
        HostTensor {
            shape: self.shape.clone(),
            data,
        }
    }

    /// Little-endian bytes of the elements, as safetensors and GGUF store them.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match &self.data {
            HostData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            HostData::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            HostData::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// Bit-level equality (NaNs with equal payloads compare equal, -0.0 != 0.0).
    pub fn bit_eq(&self, other: &HostTensor) -> bool {
        self.shape == other.shape
            && self.dtype() == other.dtype()
            && self.to_le_bytes() == other.to_le_bytes()
    }
}

/// Named tensors, ordered by name so every writer is deterministic.
pub type WeightMap = std::collections::BTreeMap<String, HostTensor>;
