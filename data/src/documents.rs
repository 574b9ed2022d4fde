//! Reading a domain's input files into documents.
//!
//! Inputs are files, directories (searched recursively) or glob patterns. Supported files:
//! - `.txt`: the whole file is one document. It must be valid UTF-8: anything else is an error
//!   naming the file and the byte offset.
//! - `.jsonl`, `.jsonl.gz`, `.jsonl.zst`: one JSON object per line, the text in a configurable
//!   field (default `text`). Blank lines are skipped silently. A line that is not valid UTF-8,
//!   not JSON, or has no string in the field is skipped with a warning naming `file:line`.
//!
//! A missing input is an error; a domain that ends up with no documents is an error. Documents
//! whose text is empty are skipped and counted.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use shears_core::error::IoContext;
use shears_core::{Error, Result};

/// One document and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub text: String,
    /// Index of the source file in [`DomainDocuments::files`].
    pub file: usize,
    /// Line number (JSONL, 1-based) or 0 (whole-file `.txt`).
    pub line: usize,
}

/// A domain's documents with the files they came from and what was skipped.
#[derive(Debug, Clone, Default)]
pub struct DomainDocuments {
    pub files: Vec<PathBuf>,
    pub documents: Vec<Document>,
    /// `file:line: reason` for every skipped line.
    pub warnings: Vec<String>,
    /// Documents skipped because their text was empty.
    pub empty: usize,
}

fn is_supported(p: &Path) -> bool {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    name.ends_with(".txt")
        || name.ends_with(".jsonl")
        || name.ends_with(".jsonl.gz")
        || name.ends_with(".jsonl.zst")
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .at(dir, "cannot list")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_supported(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Expand inputs (files, directories, globs) into a sorted, de-duplicated file list.
pub fn resolve_inputs(inputs: &[String]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        if input.contains(['*', '?', '[']) {
            let matches = glob::glob(input)
                .map_err(|e| Error::invalid(format!("bad glob pattern '{input}': {e}")))?;
            let mut found: Vec<PathBuf> = matches
                .filter_map(|m| m.ok())
                .filter(|p| p.is_file() && is_supported(p))
                .collect();
            if found.is_empty() {
                return Err(Error::format(
                    input,
                    "glob pattern matches no .txt / .jsonl / .jsonl.gz / .jsonl.zst file",
                ));
            }
            found.sort();
            files.extend(found);
            continue;
        }
        let p = PathBuf::from(input);
        if !p.exists() {
            return Err(Error::format(&p, "input does not exist"));
        }
        if p.is_dir() {
            let before = files.len();
            walk(&p, &mut files)?;
            if files.len() == before {
                return Err(Error::format(
                    &p,
                    "directory holds no .txt / .jsonl / .jsonl.gz / .jsonl.zst file",
                ));
            }
        } else if is_supported(&p) {
            files.push(p);
        } else {
            return Err(Error::format(
                &p,
                "unsupported input (expected .txt, .jsonl, .jsonl.gz or .jsonl.zst)",
            ));
        }
    }
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(f.canonicalize().unwrap_or_else(|_| f.clone())));
    Ok(files)
}

fn open_lines(path: &Path) -> Result<Box<dyn BufRead>> {
    let f = std::fs::File::open(path).at(path, "cannot open")?;
    let name = path.to_string_lossy().to_lowercase();
    let reader: Box<dyn Read> = if name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(f))
    } else if name.ends_with(".zst") {
        Box::new(
            ruzstd::decoding::StreamingDecoder::new(f)
                .map_err(|e| Error::format(path, format!("not a zstd file: {e}")))?,
        )
    } else {
        Box::new(f)
    };
    Ok(Box::new(BufReader::with_capacity(1 << 20, reader)))
}

/// Read every document of `files`; `text_field` names the JSONL field.
pub fn read_documents(files: Vec<PathBuf>, text_field: &str) -> Result<DomainDocuments> {
    let mut out = DomainDocuments::default();
    for (fi, path) in files.iter().enumerate() {
        let name = path.to_string_lossy().to_lowercase();
        if name.ends_with(".txt") {
            let bytes = std::fs::read(path).at(path, "cannot read")?;
            let text = String::from_utf8(bytes).map_err(|e| {
                Error::format(
                    path,
                    format!("not valid UTF-8 (at byte {})", e.utf8_error().valid_up_to()),
                )
            })?;
            if text.is_empty() {
                out.empty += 1;
            } else {
                out.documents.push(Document {
                    text,
                    file: fi,
                    line: 0,
                });
            }
            continue;
        }
        let mut reader = open_lines(path)?;
        let mut buf = Vec::new();
        let mut line_no = 0;
        loop {
            buf.clear();
            let n = reader.read_until(b'\n', &mut buf).map_err(|e| {
                Error::format(path, format!("read failed after line {line_no}: {e}"))
            })?;
            if n == 0 {
                break;
            }
            line_no += 1;
            let warn = |why: String| format!("{}:{line_no}: {why}; line skipped", path.display());
            let Ok(line) = std::str::from_utf8(&buf) else {
                out.warnings.push(warn("not valid UTF-8".into()));
                continue;
            };
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let value: serde_json::Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(e) => {
                    out.warnings.push(warn(format!("not JSON ({e})")));
                    continue;
                }
            };
            match value.get(text_field) {
                Some(serde_json::Value::String(t)) if t.is_empty() => out.empty += 1,
                Some(serde_json::Value::String(t)) => out.documents.push(Document {
                    text: t.clone(),
                    file: fi,
                    line: line_no,
                }),
                Some(_) => out
                    .warnings
                    .push(warn(format!("field '{text_field}' is not a string"))),
                None => out.warnings.push(warn(format!("no field '{text_field}'"))),
            }
        }
    }
    out.files = files;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn formats_and_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("a.txt"), "whole file").unwrap();
        std::fs::write(d.join("empty.txt"), "").unwrap();
        std::fs::write(
            d.join("b.jsonl"),
            "{\"text\": \"one\"}\n\nnot json\n{\"other\": 1}\n{\"text\": 5}\n{\"text\": \"\"}\n{\"text\": \"two\"}\n",
        )
        .unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"{\"body\": \"zipped\"}\n").unwrap();
        std::fs::write(d.join("c.jsonl.gz"), gz.finish().unwrap()).unwrap();
        let mut bad = b"{\"text\": \"ok\"}\n".to_vec();
        bad.extend([0xff, 0xfe, b'\n']);
        std::fs::write(d.join("d.jsonl"), bad).unwrap();

        let files = resolve_inputs(&[d.to_string_lossy().to_string()]).unwrap();
        assert_eq!(files.len(), 5);
        let docs = read_documents(files, "text").unwrap();
        let texts: Vec<&str> = docs.documents.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(texts, ["whole file", "one", "two", "ok"]);
        assert_eq!(docs.empty, 2);
        assert_eq!(docs.warnings.len(), 5, "{:?}", docs.warnings);
        assert!(docs.warnings[0].contains("b.jsonl:3: not JSON"));
        assert!(docs.warnings[1].contains("b.jsonl:4: no field 'text'"));
        assert!(docs.warnings[2].contains("b.jsonl:5: field 'text' is not a string"));
        assert!(docs.warnings[3].contains("c.jsonl.gz:1: no field 'text'"));
        assert!(docs.warnings[4].contains("d.jsonl:2: not valid UTF-8"));

        let gz_only = read_documents(vec![d.join("c.jsonl.gz")], "body").unwrap();
        assert_eq!(gz_only.documents[0].text, "zipped");
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let e = resolve_inputs(&[d.join("missing.jsonl").to_string_lossy().to_string()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing.jsonl") && e.contains("does not exist"),
            "{e}"
        );
        std::fs::write(d.join("bad.txt"), [b'o', b'k', 0xc3]).unwrap();
        let e = read_documents(vec![d.join("bad.txt")], "text")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bad.txt") && e.contains("not valid UTF-8 (at byte 2)"),
            "{e}"
        );
        let e = resolve_inputs(&[format!("{}/*.nothing", d.display())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("matches no"), "{e}");
    }
}
