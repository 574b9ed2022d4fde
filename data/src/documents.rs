//! Reading a domain's input files into documents.
//!
//! Inputs are files, directories (searched recursively) or glob patterns.
//! - `.jsonl`, `.jsonl.gz`, `.jsonl.zst`: one JSON object per line, the text in a configurable
//!   field (default `text`). Blank lines are skipped silently. A line that is not valid UTF-8,
//!   not JSON, or has no string in the field is skipped with a warning naming `file:line`.
//! - `.txt`: the whole file is one document. It must be valid UTF-8: anything else is an error
//!   naming the file and the byte offset.
//! - Any other file (source code, Markdown, ...) that a glob matches or that is named itself,
//!   and in directories the files whose extension the domain lists (`extensions`, `--ext`): the
//!   whole file is one document. A file that is not text (a NUL byte, or not UTF-8) is skipped
//!   and counted, with a warning, so a code tree with a stray binary still prepares.
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
    /// Files skipped because they are not text (NUL bytes or not UTF-8), with the reason.
    pub binary: Vec<(PathBuf, String)>,
}

/// The extension a file is counted under in the manifest: the lower-cased text after the last
/// dot (`jsonl.gz` and `jsonl.zst` kept whole), or `(none)`.
pub fn extension_key(p: &Path) -> String {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    for two in ["jsonl.gz", "jsonl.zst"] {
        if name.ends_with(&format!(".{two}")) {
            return two.to_string();
        }
    }
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() && !ext.is_empty() => ext.to_string(),
        _ => "(none)".to_string(),
    }
}

/// Normalise a list of extensions (`rs`, `.PY`, ` md `) to lower case without dots; an empty or
/// path-like one is an error.
pub fn normalise_extensions(exts: &[String]) -> std::result::Result<Vec<String>, String> {
    let mut out = vec![];
    for e in exts {
        let e = e.trim().trim_start_matches('.').to_lowercase();
        if e.is_empty() || e.contains(['/', '\\', '*', '?', '[']) {
            return Err(format!(
                "extension '{e}' must be a plain file extension like rs or md"
            ));
        }
        if !out.contains(&e) {
            out.push(e);
        }
    }
    Ok(out)
}

fn is_jsonl(p: &Path) -> bool {
    matches!(
        extension_key(p).as_str(),
        "jsonl" | "jsonl.gz" | "jsonl.zst"
    )
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

fn walk(dir: &Path, exts: &[String], out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .at(dir, "cannot list")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, exts, out)?;
        } else if is_supported(&p) || exts.contains(&extension_key(&p)) {
            out.push(p);
        }
    }
    Ok(())
}

/// Expand inputs (files, directories, globs) into a sorted, de-duplicated file list. Globs and
/// named files take any file; directories take the standard formats and `extensions`.
pub fn resolve_inputs(inputs: &[String], extensions: &[String]) -> Result<Vec<PathBuf>> {
    let exts = normalise_extensions(extensions).map_err(Error::invalid)?;
    let standard = ".txt / .jsonl / .jsonl.gz / .jsonl.zst";
    let listed = if exts.is_empty() {
        format!(
            "{standard} file (other text files need their extensions listed, e.g. --ext rs,py,md)"
        )
    } else {
        format!("{standard} / .{} file", exts.join(" / ."))
    };
    let mut files = Vec::new();
    for input in inputs {
        if input.contains(['*', '?', '[']) {
            let matches = glob::glob(input)
                .map_err(|e| Error::invalid(format!("bad glob pattern '{input}': {e}")))?;
            let mut found: Vec<PathBuf> = matches
                .filter_map(|m| m.ok())
                .filter(|p| p.is_file())
                .collect();
            if found.is_empty() {
                return Err(Error::format(input, "glob pattern matches no file"));
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
            walk(&p, &exts, &mut files)?;
            if files.len() == before {
                return Err(Error::format(&p, format!("directory holds no {listed}")));
            }
        } else if p.is_file() {
            files.push(p);
        } else {
            return Err(Error::format(&p, "not a regular file or directory"));
        }
    }
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(f.canonicalize().unwrap_or_else(|_| f.clone())));
    Ok(files)
}

/// A file's bytes as text, or why they are not: a NUL byte (binary) or invalid UTF-8.
fn text_of(bytes: Vec<u8>) -> std::result::Result<String, String> {
    if let Some(at) = bytes.iter().position(|&b| b == 0) {
        return Err(format!("not a text file (NUL byte at {at})"));
    }
    String::from_utf8(bytes)
        .map_err(|e| format!("not valid UTF-8 (at byte {})", e.utf8_error().valid_up_to()))
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
        if !is_jsonl(path) {
            let bytes = std::fs::read(path).at(path, "cannot read")?;
            let strict = extension_key(path) == "txt";
            let text = match text_of(bytes) {
                Ok(t) => t,
                Err(why) if strict => return Err(Error::format(path, why)),
                Err(why) => {
                    out.binary.push((path.clone(), why));
                    continue;
                }
            };
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

        let files = resolve_inputs(&[d.to_string_lossy().to_string()], &[]).unwrap();
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
        let e = resolve_inputs(
            &[d.join("missing.jsonl").to_string_lossy().to_string()],
            &[],
        )
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
        let e = resolve_inputs(&[format!("{}/*.nothing", d.display())], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("matches no"), "{e}");
    }

    /// A code tree: globs take any file, directories the listed extensions, binaries are
    /// skipped and counted, and the extension keys are what the manifest counts.
    #[test]
    fn code_trees_by_glob_and_extension() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("src/nested")).unwrap();
        std::fs::write(d.join("src/main.rs"), "fn main() {}\n").unwrap();
        std::fs::write(d.join("src/nested/lib.rs"), "pub fn f() {}\n").unwrap();
        std::fs::write(d.join("src/tool.py"), "print('hi')\n").unwrap();
        std::fs::write(d.join("src/README.md"), "# Title\n").unwrap();
        std::fs::write(d.join("src/logo.rs"), [0x89, b'P', b'N', b'G', 0, 1]).unwrap();
        std::fs::write(d.join("src/latin1.rs"), [b'c', 0xe9]).unwrap();
        std::fs::write(d.join("src/Makefile"), "all:\n").unwrap();
        let s = |p: &Path| p.to_string_lossy().to_string();

        // A glob takes every file it matches, whatever the extension.
        let files = resolve_inputs(&[format!("{}/src/**/*.rs", d.display())], &[]).unwrap();
        assert_eq!(files.len(), 4, "{files:?}");
        let docs = read_documents(files, "text").unwrap();
        assert_eq!(docs.documents.len(), 2);
        assert_eq!(docs.binary.len(), 2, "{:?}", docs.binary);
        assert!(docs.binary[0].0.ends_with("latin1.rs"));
        assert!(docs.binary[0].1.contains("not valid UTF-8 (at byte 1)"));
        assert!(
            docs.binary[1].1.contains("NUL byte at 4"),
            "{:?}",
            docs.binary
        );

        // A directory takes the standard formats only, unless extensions are listed.
        let e = resolve_inputs(&[s(&d.join("src"))], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--ext rs,py,md"), "{e}");
        let files = resolve_inputs(&[s(&d.join("src"))], &[".PY".into(), "md".into()]).unwrap();
        let keys: Vec<String> = files.iter().map(|f| extension_key(f)).collect();
        assert_eq!(keys, ["md", "py"]);
        let e = resolve_inputs(&[s(&d.join("src"))], &["json".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no .txt / .jsonl / .jsonl.gz / .jsonl.zst / .json file"),
            "{e}"
        );
        assert!(resolve_inputs(&[s(&d.join("src"))], &["*.rs".into()]).is_err());
        assert!(resolve_inputs(&[s(&d.join("src"))], &["".into()]).is_err());

        // A file named itself is taken whatever its extension.
        let files = resolve_inputs(&[s(&d.join("src/Makefile"))], &[]).unwrap();
        assert_eq!(extension_key(&files[0]), "(none)");
        assert_eq!(
            read_documents(files, "text").unwrap().documents[0].text,
            "all:\n"
        );
        assert_eq!(extension_key(Path::new("a/b.JSONL.GZ")), "jsonl.gz");
        assert_eq!(extension_key(Path::new(".bashrc")), "(none)");
    }
}
