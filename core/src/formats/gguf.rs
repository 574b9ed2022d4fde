//! Reading GGUF files (llama.cpp's format, versions 2 and 3): metadata, tensor directory and
//! tensor data, validated against the file's size before anything is dequantised.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::dequant::{self, GgmlType};
use crate::error::{Error, IoContext, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    /// The value as a signed integer.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float (integers are converted).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in ggml order (fastest-varying first): the reverse of the row-major shape.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data, relative to the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Row-major shape (the reverse of ggml's dimension order).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A memory-mapped, validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    /// Format version (2 or 3).
    pub version: u32,
    /// All metadata key/value pairs.
    pub metadata: BTreeMap<String, Value>,
    /// The tensor directory in file order.
    pub tensors: Vec<TensorInfo>,
    data_start: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Metadata array elements still allowed: a parsed value takes ~32 bytes per element of as
    /// little as one byte in the file, so the count is bounded across all arrays.
    elements_left: u64,
}

/// Metadata array elements a file may hold in total (the largest real vocabularies and merge
/// lists hold a few million).
const MAX_METADATA_ELEMENTS: u64 = 1 << 25;

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(Error::format(
                self.path,
                format!(
                    "truncated GGUF: reading {what} needs {n} bytes at offset {} but the file has {} bytes",
                    self.pos,
                    self.buf.len()
                ),
            )),
        }
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let len = usize::try_from(len).map_err(|_| self.err(format!("{what}: absurd length")))?;
        let b = self.take(len, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err(format!("{what} is not valid UTF-8")))
    }
    fn err(&self, msg: String) -> Error {
        Error::format(self.path, msg)
    }

    /// `n_kv` metadata entries; a key given twice is an error.
    fn metadata(&mut self, n_kv: u64) -> Result<BTreeMap<String, Value>> {
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = self.string(&format!("metadata key #{i}"))?;
            let ty = self.u32(&key)?;
            let v = self.value(ty, &key, 0)?;
            if metadata.contains_key(&key) {
                return Err(Error::format(
                    self.path,
                    format!("metadata key '{key}' appears twice"),
                ));
            }
            metadata.insert(key, v);
        }
        Ok(metadata)
    }

    /// The tensor directory: `n` entries, each with a known type, a shape whose byte size fits
    /// 64 bits, whole blocks per row, an aligned offset and a name not seen before.
    fn tensor_directory(&mut self, n: u64, alignment: u64) -> Result<Vec<TensorInfo>> {
        let mut tensors = Vec::with_capacity((n as usize).min(4096));
        let mut names = std::collections::HashSet::new();
        for i in 0..n {
            let name = self.string(&format!("tensor name #{i}"))?;
            if !names.insert(name.clone()) {
                return Err(Error::format(
                    self.path,
                    format!("tensor '{name}' appears twice in the tensor directory"),
                ));
            }
            let n_dims = self.u32(&name)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(Error::format(
                    self.path,
                    format!("tensor '{name}': {n_dims} dimensions (1 to 4 allowed)"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(self.u64(&name)?);
            }
            let type_id = self.u32(&name)?;
            let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
                Error::format(
                    self.path,
                    format!("tensor '{name}': unknown ggml type id {type_id}"),
                )
            })?;
            let offset = self.u64(&name)?;
            let numel = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| {
                    Error::format(self.path, format!("tensor '{name}': shape overflows"))
                })?;
            let (block, block_bytes) = ggml_type.block();
            if dims[0] % block as u64 != 0 {
                return Err(Error::format(
                    self.path,
                    format!(
                        "tensor '{name}': row length {} is not a multiple of the {} block size {block}",
                        dims[0],
                        ggml_type.name()
                    ),
                ));
            }
            let n_bytes = (numel / block as u64)
                .checked_mul(block_bytes as u64)
                .ok_or_else(|| {
                    Error::format(self.path, format!("tensor '{name}': size overflows"))
                })?;
            if offset % alignment != 0 {
                return Err(Error::format(
                    self.path,
                    format!("tensor '{name}': offset {offset} is not aligned to {alignment}"),
                ));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                n_bytes,
            });
        }
        Ok(tensors)
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8(key)?),
            1 => Value::I8(self.u8(key)? as i8),
            2 => Value::U16(self.u16(key)?),
            3 => Value::I16(self.u16(key)? as i16),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(self.u32(key)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(key)?)),
            7 => {
                let b = self.u8(key)?;
                if b > 1 {
                    return Err(self.err(format!("metadata '{key}': bool value {b} is not 0 or 1")));
                }
                Value::Bool(b == 1)
            }
            8 => Value::String(self.string(key)?),
            9 => {
                if depth > 4 {
                    return Err(self.err(format!("metadata '{key}': arrays nested too deeply")));
                }
                let elem_ty = self.u32(key)?;
                let n = self.u64(key)?;
                // Every element takes at least one byte: a count beyond the rest of the file is a lie.
                if n > (self.buf.len() - self.pos) as u64 {
                    return Err(self.err(format!(
                        "truncated GGUF: metadata '{key}' claims {n} array elements but only {} bytes remain",
                        self.buf.len() - self.pos
                    )));
                }
                self.elements_left = self.elements_left.checked_sub(n).ok_or_else(|| {
                    self.err(format!(
                        "metadata '{key}': {n} array elements put the file past the limit of {MAX_METADATA_ELEMENTS} metadata elements"
                    ))
                })?;
                let mut v = Vec::with_capacity((n as usize).min(4096));
                for _ in 0..n {
                    v.push(self.value(elem_ty, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(self.u64(key)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(key)?)),
            other => return Err(self.err(format!("metadata '{key}': unknown value type {other}"))),
        })
    }
}

/// Every tensor's bytes lie inside the file, and the tensors are packed in directory order,
/// each at the aligned end of the one before (llama.cpp's rule).
fn check_layout(
    path: &Path,
    tensors: &[TensorInfo],
    data_start: u64,
    file_len: u64,
    alignment: u64,
) -> Result<()> {
    for t in tensors {
        let end = data_start
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.n_bytes));
        if end.is_none_or(|e| e > file_len) {
            return Err(Error::format(
                path,
                format!(
                    "tensor '{}': data at offset {} + {} bytes runs past the end of the file ({} bytes; data section starts at {data_start}); the file is truncated or corrupt",
                    t.name, t.offset, t.n_bytes, file_len
                ),
            ));
        }
    }
    // llama.cpp's rule: tensors are packed in directory order, each at the aligned end of the
    // one before. A size that disagrees with the type and shape (a type id changed from
    // Q4_1 to Q8_0, say) moves every later offset, so it cannot pass unnoticed, and no two
    // tensors' bytes can overlap.
    let mut expected = 0u64;
    for t in tensors {
        if t.offset != expected {
            return Err(Error::format(
                path,
                format!(
                    "tensor '{}': data offset {} but the tensors before it end at {expected}; its size ({} bytes of {} {:?}) or an earlier tensor's disagrees with the data layout (overlapping or misplaced tensor data)",
                    t.name,
                    t.offset,
                    t.n_bytes,
                    t.ggml_type.name(),
                    t.shape()
                ),
            ));
        }
        expected = t
            .n_bytes
            .checked_next_multiple_of(alignment)
            .and_then(|n| expected.checked_add(n))
            .ok_or_else(|| Error::format(path, format!("tensor '{}': size overflows", t.name)))?;
    }
    Ok(())
}

impl GgufFile {
    /// Open and validate `path`: header, metadata and tensor directory must parse, every tensor
    /// type must be known and every tensor's data must lie inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).at(path, "cannot open")?;
        // SAFETY: read-only map; see SafeTensorsFile::open.
        #[allow(unsafe_code)]
        let mmap = unsafe { Mmap::map(&file) }.at(path, "cannot memory-map")?;
        let mut c = Cursor {
            buf: &mmap,
            pos: 0,
            path,
            elements_left: MAX_METADATA_ELEMENTS,
        };
        let magic = c.take(4, "the magic number")?;
        if magic != MAGIC {
            return Err(Error::format(
                path,
                format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"),
            ));
        }
        let version = c.u32("the version")?;
        if version != 2 && version != 3 {
            return Err(Error::format(
                path,
                format!("unsupported GGUF version {version} (2 and 3 are supported)"),
            ));
        }
        let n_tensors = c.u64("the tensor count")?;
        let n_kv = c.u64("the metadata count")?;
        let remaining = (mmap.len() - c.pos) as u64;
        if n_tensors > remaining || n_kv > remaining {
            return Err(Error::format(
                path,
                format!(
                    "truncated or corrupt GGUF: header claims {n_tensors} tensors and {n_kv} metadata entries but only {remaining} bytes follow"
                ),
            ));
        }
        let metadata = c.metadata(n_kv)?;
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two())
                .ok_or_else(|| {
                    Error::format(
                        path,
                        format!("general.alignment {v:?} is not a power of two"),
                    )
                })?,
        };
        let tensors = c.tensor_directory(n_tensors, alignment)?;
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        check_layout(path, &tensors, data_start, mmap.len() as u64, alignment)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            tensors,
            data_start,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor directory entry of `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw (possibly quantised) bytes of a tensor.
    pub fn raw(&self, info: &TensorInfo) -> &[u8] {
        let s = (self.data_start + info.offset) as usize;
        &self.mmap[s..s + info.n_bytes as usize]
    }

    /// A tensor dequantised to f32, in row-major shape.
    pub fn dequantize(&self, info: &TensorInfo) -> Result<(Vec<usize>, Vec<f32>)> {
        let v = dequant::dequantize(info.ggml_type, self.raw(info), info.numel() as usize)
            .map_err(|m| Error::format(&self.path, format!("tensor '{}': {m}", info.name)))?;
        Ok((info.shape(), v))
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
}
