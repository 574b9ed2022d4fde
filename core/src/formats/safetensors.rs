//! Reading and writing the safetensors format (8-byte little-endian header length, a JSON header,
//! then raw little-endian tensor bytes). Written here rather than taken from a crate so that every
//! inconsistency in a file becomes an error that names the file and the tensor.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use serde_json::Value;

use crate::error::{Error, IoContext, Result};
use crate::tensor::{DType, HostData, HostTensor, WeightMap};

/// The reference implementation's cap on the JSON header (100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor's header entry as written. Deserialised with serde's derive, so a field given twice
/// is an error (a map of JSON values would silently keep the last), as in the reference loader.
#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// The header: tensor entries in file order and the `__metadata__` string map. A key given twice
/// at either level is an error; so is a metadata value that is not a string.
struct Header {
    tensors: Vec<(String, RawEntry)>,
    metadata: BTreeMap<String, String>,
}

impl<'de> serde::Deserialize<'de> for Header {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = Header;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Header, A::Error> {
                let mut seen = std::collections::BTreeSet::new();
                let mut h = Header {
                    tensors: Vec::new(),
                    metadata: BTreeMap::new(),
                };
                while let Some(k) = map.next_key::<String>()? {
                    if !seen.insert(k.clone()) {
                        return Err(serde::de::Error::custom(format!("key '{k}' appears twice")));
                    }
                    if k == "__metadata__" {
                        h.metadata = map.next_value::<UniqueStrings>()?.0;
                    } else {
                        let e = map
                            .next_value::<RawEntry>()
                            .map_err(|e| serde::de::Error::custom(format!("tensor '{k}': {e}")))?;
                        h.tensors.push((k, e));
                    }
                }
                Ok(h)
            }
        }
        d.deserialize_map(Entries)
    }
}

/// A string-to-string map that refuses a key given twice.
struct UniqueStrings(BTreeMap<String, String>);

impl<'de> serde::Deserialize<'de> for UniqueStrings {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Strings;
        impl<'de> serde::de::Visitor<'de> for Strings {
            type Value = UniqueStrings;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<UniqueStrings, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!(
                            "__metadata__ key '{k}' appears twice"
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(UniqueStrings(out))
            }
        }
        d.deserialize_map(Strings)
    }
}

/// Element types a safetensors file may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StDtype {
    Bool,
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F16,
    BF16,
    F32,
    F64,
}

impl StDtype {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "BOOL" => StDtype::Bool,
            "U8" => StDtype::U8,
            "I8" => StDtype::I8,
            "U16" => StDtype::U16,
            "I16" => StDtype::I16,
            "U32" => StDtype::U32,
            "I32" => StDtype::I32,
            "U64" => StDtype::U64,
            "I64" => StDtype::I64,
            "F16" => StDtype::F16,
            "BF16" => StDtype::BF16,
            "F32" => StDtype::F32,
            "F64" => StDtype::F64,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            StDtype::Bool | StDtype::U8 | StDtype::I8 => 1,
            StDtype::U16 | StDtype::I16 | StDtype::F16 | StDtype::BF16 => 2,
            StDtype::U32 | StDtype::I32 | StDtype::F32 => 4,
            StDtype::U64 | StDtype::I64 | StDtype::F64 => 8,
        }
    }
}

/// One tensor's header entry; `start..end` is relative to the start of the data section.
#[derive(Debug, Clone)]
pub struct Entry {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// A memory-mapped, validated safetensors file.
pub struct SafeTensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    entries: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for SafeTensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafeTensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl SafeTensorsFile {
    /// Open and validate `path`: the header must parse and every tensor's byte range must lie in
    /// the file and match its dtype and shape exactly.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).at(path, "cannot open")?;
        // SAFETY: the map is read-only; a file truncated underneath us is the user's doing and
        // is the documented hazard of memory-mapping.
        #[allow(unsafe_code)]
        let mmap = unsafe { Mmap::map(&file) }.at(path, "cannot memory-map")?;
        let bad = |msg: String| Error::format(path, format!("invalid safetensors file: {msg}"));
        if mmap.len() < 8 {
            return Err(bad(format!(
                "file is {} bytes, too short to hold the 8-byte header length",
                mmap.len()
            )));
        }
        let header_len = u64::from_le_bytes(mmap[..8].try_into().unwrap());
        let header_end = 8u64
            .checked_add(header_len)
            .filter(|&e| e <= mmap.len() as u64)
            .ok_or_else(|| {
                bad(format!(
                    "header length {header_len} runs past the end of the {}-byte file",
                    mmap.len()
                ))
            })? as usize;
        if header_len > MAX_HEADER_BYTES {
            return Err(bad(format!(
                "header length {header_len} exceeds the format's limit of {MAX_HEADER_BYTES} bytes"
            )));
        }
        let header: Header = serde_json::from_slice(&mmap[8..header_end])
            .map_err(|e| bad(format!("header is not a JSON object with unique keys: {e}")))?;
        let data_len = mmap.len() - header_end;
        let mut entries = BTreeMap::new();
        let metadata = header.metadata;
        for (name, raw) in header.tensors {
            let entry = parse_entry(raw).map_err(|m| bad(format!("tensor '{name}': {m}")))?;
            let numel = entry
                .shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("tensor '{name}': shape overflows")))?;
            let want = numel
                .checked_mul(entry.dtype.size())
                .ok_or_else(|| bad(format!("tensor '{name}': size overflows")))?;
            if entry.end < entry.start {
                return Err(bad(format!(
                    "tensor '{name}': data_offsets [{}, {}] are reversed",
                    entry.start, entry.end
                )));
            }
            if entry.end - entry.start != want {
                return Err(bad(format!(
                    "tensor '{name}': header says {:?} {:?} = {want} bytes but data_offsets [{}, {}] span {} bytes",
                    entry.dtype,
                    entry.shape,
                    entry.start,
                    entry.end,
                    entry.end - entry.start
                )));
            }
            if entry.end > data_len {
                return Err(bad(format!(
                    "tensor '{name}': data_offsets end at {} but the data section has only {data_len} bytes (file truncated?)",
                    entry.end
                )));
            }
            entries.insert(name, entry);
        }
        // The reference loader's rule: the tensors tile the data section exactly, in offset
        // order, with no gap, no overlap and no trailing bytes.
        let mut by_offset: Vec<(&String, &Entry)> = entries.iter().collect();
        by_offset.sort_by_key(|(_, e)| (e.start, e.end));
        let mut expected = 0usize;
        for (name, e) in by_offset {
            if e.start != expected {
                return Err(bad(format!(
                    "tensor '{name}': data_offsets [{}, {}] do not start where the tensors before it end ({expected}): {}",
                    e.start,
                    e.end,
                    if e.start < expected { "overlapping tensor data" } else { "a gap in the data section" }
                )));
            }
            expected = e.end;
        }
        if expected != data_len {
            return Err(bad(format!(
                "the tensors end at byte {expected} of the data section but it has {data_len} bytes (trailing bytes after the last tensor)"
            )));
        }
        Ok(SafeTensorsFile {
            path: path.to_path_buf(),
            mmap,
            data_start: header_end,
            entries,
            metadata,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|s| s.as_str())
    }

    /// The `__metadata__` string map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The header entry of `name`.
    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    fn get(&self, name: &str) -> Result<(&Entry, &[u8])> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| Error::format(&self.path, format!("no tensor named '{name}'")))?;
        let bytes = &self.mmap[self.data_start + e.start..self.data_start + e.end];
        Ok((e, bytes))
    }

    /// A floating-point tensor in its stored precision (F64 is narrowed to F32).
    pub fn tensor(&self, name: &str) -> Result<HostTensor> {
        let (e, b) = self.get(name)?;
        let data = match e.dtype {
            StDtype::F32 => HostData::F32(le_chunks::<4>(b).map(f32::from_le_bytes).collect()),
            StDtype::F16 => HostData::F16(le_chunks::<2>(b).map(f16::from_le_bytes).collect()),
            StDtype::BF16 => HostData::BF16(le_chunks::<2>(b).map(bf16::from_le_bytes).collect()),
            StDtype::F64 => HostData::F32(
                le_chunks::<8>(b)
                    .map(|c| f64::from_le_bytes(c) as f32)
                    .collect(),
            ),
            other => {
                return Err(Error::format(
                    &self.path,
                    format!(
                        "tensor '{name}' has dtype {other:?}; a floating-point tensor was expected"
                    ),
                ))
            }
        };
        Ok(HostTensor {
            shape: e.shape.clone(),
            data,
        })
    }

    /// Any floating-point tensor widened to f32.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self.tensor(name)?;
        Ok((t.shape.clone(), t.into_f32_vec()))
    }

    /// Any integer tensor widened to i64.
    pub fn read_i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let (e, b) = self.get(name)?;
        let v: Vec<i64> = match e.dtype {
            StDtype::I64 => le_chunks::<8>(b).map(i64::from_le_bytes).collect(),
            StDtype::I32 => le_chunks::<4>(b)
                .map(|c| i32::from_le_bytes(c) as i64)
                .collect(),
            StDtype::U32 => le_chunks::<4>(b)
                .map(|c| u32::from_le_bytes(c) as i64)
                .collect(),
            StDtype::I16 => le_chunks::<2>(b)
                .map(|c| i16::from_le_bytes(c) as i64)
                .collect(),
            StDtype::U16 => le_chunks::<2>(b)
                .map(|c| u16::from_le_bytes(c) as i64)
                .collect(),
            StDtype::U8 | StDtype::Bool => b.iter().map(|&x| x as i64).collect(),
            StDtype::I8 => b.iter().map(|&x| x as i8 as i64).collect(),
            other => {
                return Err(Error::format(
                    &self.path,
                    format!("tensor '{name}' has dtype {other:?}; an integer tensor was expected"),
                ))
            }
        };
        Ok((e.shape.clone(), v))
    }

    /// Every floating-point tensor of the file.
    pub fn all_tensors(&self) -> Result<WeightMap> {
        let mut out = WeightMap::new();
        for name in self.entries.keys() {
            out.insert(name.clone(), self.tensor(name)?);
        }
        Ok(out)
    }
}

fn le_chunks<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    b.chunks_exact(N).map(|c| c.try_into().unwrap())
}

fn parse_entry(raw: RawEntry) -> std::result::Result<Entry, String> {
    let dtype =
        StDtype::parse(&raw.dtype).ok_or_else(|| format!("unknown dtype '{}'", raw.dtype))?;
    let size = |v: u64| usize::try_from(v).map_err(|_| format!("{v} does not fit this machine"));
    Ok(Entry {
        dtype,
        shape: raw
            .shape
            .into_iter()
            .map(size)
            .collect::<std::result::Result<_, _>>()?,
        start: size(raw.data_offsets[0])?,
        end: size(raw.data_offsets[1])?,
    })
}

/// Write `tensors` (in name order) to `path` with the given `__metadata__`.
pub fn write(
    path: impl AsRef<Path>,
    tensors: &WeightMap,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    LazyTensors::borrowed(tensors).write(path, metadata)
}

/// Makes one tensor's host copy when the writer reaches it.
type Maker<'a> = Box<dyn FnOnce() -> Cow<'a, HostTensor> + 'a>;

/// Tensors to write whose host copies are made one at a time, as the writer reaches each: the
/// header needs only names, dtypes and shapes, so a checkpoint of a model whose weights and
/// optimizer moments live on a device (or in the autodiff graph's parameters) never holds more
/// than one tensor's host copy at once. Written in name order, like [`write()`].
#[derive(Default)]
pub struct LazyTensors<'a> {
    items: BTreeMap<String, (DType, Vec<usize>, Maker<'a>)>,
}

impl<'a> LazyTensors<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every tensor of `map`, borrowed (nothing is copied but one tensor's bytes at a time).
    pub fn borrowed(map: &'a WeightMap) -> Self {
        let mut l = Self::new();
        for (name, t) in map {
            l.push(name.clone(), t.dtype(), t.shape.clone(), move || {
                Cow::Borrowed(t)
            });
        }
        l
    }

    /// Every tensor of `map` converted to `dtype` when it is written.
    pub fn converted(map: &'a WeightMap, dtype: DType) -> Self {
        let mut l = Self::new();
        for (name, t) in map {
            l.push(name.clone(), dtype, t.shape.clone(), move || {
                Cow::Owned(t.to_dtype(dtype))
            });
        }
        l
    }

    /// Add a tensor: `make` must return a tensor of exactly this dtype and shape (checked when
    /// it is written). A name given twice keeps the last.
    pub fn push(
        &mut self,
        name: String,
        dtype: DType,
        shape: Vec<usize>,
        make: impl FnOnce() -> Cow<'a, HostTensor> + 'a,
    ) {
        self.items.insert(name, (dtype, shape, Box::new(make)));
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The dtype of the first tensor in name order (what a model directory records as its
    /// `torch_dtype`).
    pub fn first_dtype(&self) -> Option<DType> {
        self.items.values().next().map(|(d, _, _)| *d)
    }

    /// Write the file: header first, then each tensor's bytes as its host copy is made.
    pub fn write(self, path: impl AsRef<Path>, metadata: &BTreeMap<String, String>) -> Result<()> {
        let path = path.as_ref();
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            header.insert(
                "__metadata__".into(),
                Value::Object(
                    metadata
                        .iter()
                        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                        .collect(),
                ),
            );
        }
        let mut offset = 0usize;
        for (name, (dtype, shape, _)) in &self.items {
            let n = shape.iter().product::<usize>() * dtype.size();
            header.insert(
                name.clone(),
                serde_json::json!({
                    "dtype": dtype.safetensors_name(),
                    "shape": shape,
                    "data_offsets": [offset, offset + n],
                }),
            );
            offset += n;
        }
        let mut header_bytes = serde_json::to_vec(&Value::Object(header)).expect("json");
        // Pad with spaces so the data section starts 8-byte aligned, as the reference writer does.
        while !header_bytes.len().is_multiple_of(8) {
            header_bytes.push(b' ');
        }
        let mut w = crate::fsutil::AtomicFile::create(path)?;
        w.write_all(&(header_bytes.len() as u64).to_le_bytes())
            .and_then(|_| w.write_all(&header_bytes))
            .at(path, "cannot write")?;
        for (name, (dtype, shape, make)) in self.items {
            let t = make();
            if t.dtype() != dtype || t.shape != shape {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor '{name}' was announced as {dtype:?} {shape:?} but is {:?} {:?}",
                        t.dtype(),
                        t.shape
                    ),
                ));
            }
            w.write_all(&t.to_le_bytes()).at(path, "cannot write")?;
        }
        w.commit(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> WeightMap {
        let mut m = WeightMap::new();
        m.insert(
            "b".into(),
            HostTensor::f32(vec![2, 3], (0..6).map(|i| i as f32).collect()),
        );
        m.insert(
            "a".into(),
            HostTensor::f32(vec![4], vec![1.5, -2.0, 0.25, 8.0]),
        );
        m
    }

    #[test]
    fn lazy_tensors_write_the_same_bytes_as_a_map_and_make_each_tensor_once() {
        let dir = tempfile::tempdir().unwrap();
        let m = map();
        write(dir.path().join("eager.safetensors"), &m, &BTreeMap::new()).unwrap();
        let made = std::cell::Cell::new(0);
        let mut lazy = LazyTensors::new();
        for (name, t) in &m {
            let made = &made;
            lazy.push(name.clone(), DType::F32, t.shape.clone(), move || {
                made.set(made.get() + 1);
                Cow::Owned(t.clone())
            });
        }
        assert_eq!(made.get(), 0, "nothing is made before the write");
        lazy.write(dir.path().join("lazy.safetensors"), &BTreeMap::new())
            .unwrap();
        assert_eq!(made.get(), 2);
        let eager = std::fs::read(dir.path().join("eager.safetensors")).unwrap();
        let lazy = std::fs::read(dir.path().join("lazy.safetensors")).unwrap();
        assert_eq!(eager, lazy);
        let back = SafeTensorsFile::open(dir.path().join("lazy.safetensors")).unwrap();
        assert_eq!(back.all_tensors().unwrap(), m);
    }

    #[test]
    fn a_tensor_unlike_its_announcement_is_an_error_naming_the_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let m = map();
        let mut lazy = LazyTensors::new();
        lazy.push("a".into(), DType::F32, vec![2, 2], || {
            Cow::Borrowed(&m["a"])
        });
        let path = dir.path().join("bad.safetensors");
        let err = lazy.write(&path, &BTreeMap::new()).unwrap_err().to_string();
        assert!(
            err.contains("bad.safetensors") && err.contains("'a'"),
            "{err}"
        );
        let mut lazy = LazyTensors::new();
        lazy.push("a".into(), DType::BF16, vec![4], || Cow::Borrowed(&m["a"]));
        assert!(lazy.write(&path, &BTreeMap::new()).is_err());
    }
}
