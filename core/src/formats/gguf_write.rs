//! Writing GGUF v3 files: metadata, tensor directory, and tensor data aligned to
//! `general.alignment`, streamed one tensor at a time into a temporary file that is renamed over
//! the target only when every byte is written (a failed export leaves nothing behind).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::dequant::GgmlType;
use super::gguf::Value;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::AtomicFile;

/// The alignment Shears writes (llama.cpp's default), stored as `general.alignment`.
pub const ALIGNMENT: u64 = 32;

/// One tensor of the directory: name, row-major shape and storage type. The data comes later
/// from the producer given to [`write_gguf`], which must return exactly
/// [`TensorEntry::n_bytes`] bytes.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorEntry {
    /// Bytes of data.
    pub fn n_bytes(&self) -> u64 {
        let numel: u64 = self.shape.iter().map(|&d| d as u64).product();
        let (block, bytes) = self.ty.block();
        numel / block as u64 * bytes as u64
    }
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) -> std::result::Result<(), String> {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_str(out, s),
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
        Value::Array(items) => {
            // An empty array still needs an element type; strings are what empty lists of
            // tokens or merges would hold.
            let ty = items.first().map_or(8, type_id);
            if items.iter().any(|i| type_id(i) != ty) {
                return Err("array elements of different types".into());
            }
            out.extend(ty.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i)?;
            }
        }
    }
    Ok(())
}

fn padding(len: u64) -> usize {
    ((ALIGNMENT - len % ALIGNMENT) % ALIGNMENT) as usize
}

/// The header, metadata and tensor directory, padded to the start of the data section.
fn header(
    metadata: &[(String, Value)],
    tensors: &[TensorEntry],
) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    let has_alignment = metadata.iter().any(|(k, _)| k == "general.alignment");
    out.extend(((metadata.len() + usize::from(!has_alignment)) as u64).to_le_bytes());
    let mut seen = std::collections::HashSet::new();
    let align = (
        "general.alignment".to_string(),
        Value::U32(ALIGNMENT as u32),
    );
    for (k, v) in metadata.iter().chain((!has_alignment).then_some(&align)) {
        if !seen.insert(k.as_str()) {
            return Err(format!("metadata key '{k}' given twice"));
        }
        if k == "general.alignment" && v.as_u64() != Some(ALIGNMENT) {
            return Err(format!("general.alignment must be {ALIGNMENT}"));
        }
        put_str(&mut out, k);
        out.extend(type_id(v).to_le_bytes());
        put_value(&mut out, v).map_err(|e| format!("metadata '{k}': {e}"))?;
    }
    let mut offset = 0u64;
    let mut names = std::collections::HashSet::new();
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            return Err(format!("tensor '{}' given twice", t.name));
        }
        let (block, _) = t.ty.block();
        if t.shape.is_empty() || t.shape.len() > 4 || t.shape.last().unwrap() % block != 0 {
            return Err(format!(
                "tensor '{}' of shape {:?} cannot be stored as {}",
                t.name,
                t.shape,
                t.ty.name()
            ));
        }
        put_str(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            out.extend((d as u64).to_le_bytes());
        }
        out.extend(t.ty.id().to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += t.n_bytes();
        offset += padding(offset) as u64;
    }
    out.resize(out.len() + padding(out.len() as u64), 0);
    Ok(out)
}

/// Write a GGUF v3 file at `path` (replacing it only if `overwrite`): `metadata` in order
/// (`general.alignment` added when absent), then the directory of `tensors` and their data,
/// `data(i)` giving tensor `i`'s bytes. Nothing exists at `path` unless the whole file was
/// written.
pub fn write_gguf(
    path: &Path,
    overwrite: bool,
    metadata: &[(String, Value)],
    tensors: &[TensorEntry],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    if path.is_dir() {
        return Err(Error::format(
            path,
            "is a directory; give a .gguf file name",
        ));
    }
    if !overwrite && path.exists() {
        return Err(Error::format(
            path,
            "already exists (pass --force to replace it)",
        ));
    }
    let head = header(metadata, tensors).map_err(|m| Error::format(path, m))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(Error::format(
            path,
            format!("the folder {} does not exist", dir.display()),
        ));
    }
    let mut w = AtomicFile::create(path)?;
    w.write_all(&head).at(path, "cannot write")?;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = data(i)?;
        if bytes.len() as u64 != t.n_bytes() {
            return Err(Error::invalid(format!(
                "tensor '{}': {} bytes produced for {} expected",
                t.name,
                bytes.len(),
                t.n_bytes()
            )));
        }
        w.write_all(&bytes).at(path, "cannot write")?;
        w.write_all(&vec![0u8; padding(bytes.len() as u64)])
            .at(path, "cannot write")?;
    }
    w.commit(true)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::GgufFile;

    #[test]
    fn written_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("x.count".to_string(), Value::U32(7)),
            ("x.f".to_string(), Value::F32(1.5)),
            ("x.flag".to_string(), Value::Bool(true)),
            (
                "x.list".to_string(),
                Value::Array(vec![Value::String("a b".into()), Value::String("c".into())]),
            ),
        ];
        let tensors = vec![
            TensorEntry {
                name: "a".into(),
                shape: vec![3],
                ty: GgmlType::F32,
            },
            TensorEntry {
                name: "b".into(),
                shape: vec![2, 32],
                ty: GgmlType::F16,
            },
        ];
        let a = [1f32, 2.0, 3.0];
        let b: Vec<f32> = (0..64).map(|i| i as f32).collect();
        write_gguf(&path, false, &meta, &tensors, |i| {
            let mut out = vec![];
            let x: &[f32] = if i == 0 { &a } else { &b };
            super::super::quantize::encode(tensors[i].ty, x, &mut out);
            Ok(out)
        })
        .unwrap();
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.get("x.count"), Some(&Value::U32(7)));
        assert_eq!(g.get("x.flag"), Some(&Value::Bool(true)));
        assert_eq!(
            g.get("general.alignment").and_then(|v| v.as_u64()),
            Some(32)
        );
        assert_eq!(g.metadata["x.list"], meta[4].1);
        let ta = g.tensor_info("a").unwrap();
        assert_eq!(g.dequantize(ta).unwrap(), (vec![3], a.to_vec()));
        let tb = g.tensor_info("b").unwrap();
        assert_eq!(tb.offset % ALIGNMENT, 0);
        assert_eq!(g.dequantize(tb).unwrap(), (vec![2, 32], b));
        // No temporary file left next to it; an existing file is refused without --force.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let e = write_gguf(&path, false, &meta, &tensors, |_| Ok(vec![])).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
    }

    #[test]
    fn failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let tensors = vec![TensorEntry {
            name: "a".into(),
            shape: vec![4],
            ty: GgmlType::F32,
        }];
        let e = write_gguf(&path, false, &[], &tensors, |_| Ok(vec![0u8; 3])).unwrap_err();
        assert!(e.to_string().contains("3 bytes produced"), "{e}");
        let e = write_gguf(&path, false, &[], &tensors, |_| {
            Err(Error::invalid("producer failed"))
        })
        .unwrap_err();
        assert!(e.to_string().contains("producer failed"));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // A block type needs whole blocks per row.
        let bad = vec![TensorEntry {
            name: "q".into(),
            shape: vec![2, 30],
            ty: GgmlType::Q8_0,
        }];
        let e = write_gguf(&path, false, &[], &bad, |_| Ok(vec![])).unwrap_err();
        assert!(e.to_string().contains("cannot be stored as"), "{e}");
    }
}
