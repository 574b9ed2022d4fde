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
//!
//! Walks (a directory, a glob's `**`) follow symbolic links but visit each real directory once,
//! so link cycles cost nothing, and take only regular files (a FIFO or a device inside a tree is
//! passed over, never opened). A JSONL line longer than [`MAX_LINE_BYTES`] decompressed is
//! skipped with a warning without being held in memory; a whole-file document may be at most
//! [`MAX_FILE_BYTES`].

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

/// The longest JSONL line read (decompressed); a longer one is skipped with a warning.
pub const MAX_LINE_BYTES: usize = 256 << 20;
/// The largest file read whole as one document.
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// A directory's identity on disk, so a walk enters each real directory once.
fn dir_id(p: &Path) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        let c = std::fs::canonicalize(p).ok()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&c, &mut h);
        Some((0, std::hash::Hasher::finish(&h)))
    }
}

/// Every regular file under `dir` (through symbolic links, each real directory once, at most
/// `max_depth` directories down), sorted per directory, for which `keep` holds.
fn walk(
    dir: &Path,
    max_depth: usize,
    keep: &dyn Fn(&Path) -> bool,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    while let Some((d, depth)) = stack.pop() {
        if !dir_id(&d).is_some_and(|id| seen.insert(id)) {
            continue;
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&d)
            .at(&d, "cannot list")?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        let mut subdirs = vec![];
        for p in entries {
            // metadata follows links: a link to a directory is walked (once), a link to a
            // regular file read; anything else (FIFO, socket, device, dangling link) skipped.
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() && depth < max_depth => subdirs.push((p, depth + 1)),
                Ok(m) if m.is_file() && keep(&p) => out.push(p),
                _ => {}
            }
        }
        // Depth first, in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(())
}

/// The files a glob pattern matches, found by walking the directory before its first
/// wildcard (see [`walk`]) and matching every regular file against the pattern (`*` stays
/// inside one path component, `**` spans directories).
fn glob_files(pattern: &str) -> Result<Vec<PathBuf>> {
    let pat = glob::Pattern::new(pattern)
        .map_err(|e| Error::invalid(format!("bad glob pattern '{pattern}': {e}")))?;
    let k = pattern.find(['*', '?', '[']).unwrap_or(pattern.len());
    let base = match pattern[..k].rfind('/') {
        Some(0) => PathBuf::from("/"),
        Some(j) => PathBuf::from(&pattern[..j]),
        None => PathBuf::from("."),
    };
    let opts = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    // The walk from "." puts "./" before what the pattern names without it.
    let relative = base == Path::new(".") && !pattern.starts_with("./");
    // Without `**` a match lies as many directories below the base as the pattern has
    // separators after it.
    let depth = if pattern.contains("**") {
        usize::MAX
    } else {
        pattern[base.as_os_str().len().min(k)..]
            .trim_start_matches('/')
            .matches('/')
            .count()
    };
    let mut found = vec![];
    if base.is_dir() {
        walk(
            &base,
            depth,
            &|p: &Path| {
                // Files under "." are matched without the "./" the walk puts in front.
                let p = if relative {
                    p.strip_prefix(".").unwrap_or(p)
                } else {
                    p
                };
                pat.matches_path_with(p, opts)
            },
            &mut found,
        )?;
    }
    Ok(found
        .into_iter()
        .map(|p| match relative {
            true => p.strip_prefix(".").map(Path::to_path_buf).unwrap_or(p),
            false => p,
        })
        .collect())
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
            let mut found = glob_files(input)?;
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
            let keep = |f: &Path| is_supported(f) || exts.contains(&extension_key(f));
            walk(&p, usize::MAX, &keep, &mut files)?;
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

/// Read one line (with its newline) into `buf`, keeping at most [`MAX_LINE_BYTES`]: a longer
/// line is read to its end but not kept (`buf` left empty). Returns the bytes consumed (0 at
/// the end) and whether the line was too long.
fn read_line_bounded(r: &mut dyn BufRead, buf: &mut Vec<u8>) -> std::io::Result<(usize, bool)> {
    let (mut total, mut long) = (0, false);
    loop {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            return Ok((total, long));
        }
        let (n, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        if !long && buf.len() + n > MAX_LINE_BYTES {
            long = true;
            *buf = Vec::new();
        }
        if !long {
            buf.extend_from_slice(&avail[..n]);
        }
        r.consume(n);
        total += n;
        if done {
            return Ok((total, long));
        }
    }
}

/// A whole-file document's bytes, at most [`MAX_FILE_BYTES`].
fn read_whole(path: &Path) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).at(path, "cannot open")?;
    let mut bytes = Vec::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .at(path, "cannot read")?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Error::format(
            path,
            format!("is larger than {MAX_FILE_BYTES} bytes, the most read as one document; split it or use JSONL"),
        ));
    }
    Ok(bytes)
}

/// Read every document of `files`; `text_field` names the JSONL field.
pub fn read_documents(files: Vec<PathBuf>, text_field: &str) -> Result<DomainDocuments> {
    let mut out = DomainDocuments::default();
    for (fi, path) in files.iter().enumerate() {
        if !is_jsonl(path) {
            let bytes = read_whole(path)?;
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
            let (n, long) = read_line_bounded(&mut reader, &mut buf).map_err(|e| {
                Error::format(path, format!("read failed after line {line_no}: {e}"))
            })?;
            if n == 0 {
                break;
            }
            line_no += 1;
            let warn = |why: String| format!("{}:{line_no}: {why}; line skipped", path.display());
            if long {
                out.warnings.push(warn(format!(
                    "{n} bytes, longer than {MAX_LINE_BYTES} (the most read as one line)"
                )));
                continue;
            }
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

    /// Two link cycles in a tree (which made the walk exponential) cost nothing: each real
    /// directory is visited once, by a directory walk and by a `**` glob alike; a FIFO in the
    /// tree (which blocked the read forever) is passed over.
    #[cfg(unix)]
    #[test]
    fn walks_visit_each_directory_once_and_read_only_regular_files() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("tree");
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/one.txt"), "one").unwrap();
        std::fs::write(d.join("a/b/two.txt"), "two").unwrap();
        std::os::unix::fs::symlink(&d, d.join("a/b/up")).unwrap();
        std::os::unix::fs::symlink(d.join("a"), d.join("a/b/again")).unwrap();
        let fifo = d.join("a/pipe.txt");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        let s = |p: &Path| p.to_string_lossy().to_string();
        let t = std::time::Instant::now();
        let files = resolve_inputs(&[s(&d)], &[]).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| s(f.strip_prefix(&d).unwrap()))
            .collect();
        assert_eq!(names, ["a/one.txt", "a/b/two.txt"]);
        let files = resolve_inputs(&[format!("{}/**/*.txt", s(&d))], &[]).unwrap();
        assert_eq!(files.len(), 2, "{files:?}");
        let docs = read_documents(files, "text").unwrap();
        assert_eq!(docs.documents.len(), 2);
        assert!(t.elapsed().as_secs() < 10);
        // Named itself, the FIFO is refused, not opened.
        let e = resolve_inputs(&[s(&fifo)], &[]).unwrap_err().to_string();
        assert!(
            e.contains("pipe.txt") && e.contains("not a regular file"),
            "{e}"
        );
        // A glob without `**` stays at its depth.
        let files = resolve_inputs(&[format!("{}/a/*.txt", s(&d))], &[]).unwrap();
        assert_eq!(files.len(), 1, "{files:?}");
    }

    /// A JSONL line longer than the bound (here a gzip that decompresses to one huge line) is
    /// skipped with a warning naming file and line, never held whole.
    #[test]
    fn overlong_lines_are_skipped_unread() {
        let mut r: &[u8] = b"short\nxxxxxxxxxxxxxxxxxxxx\nlast";
        let mut buf = vec![];
        assert_eq!(read_line_bounded(&mut r, &mut buf).unwrap(), (6, false));
        assert_eq!(buf, b"short\n");
        buf.clear();
        // 21 bytes with a bound of MAX_LINE_BYTES: kept.
        assert_eq!(read_line_bounded(&mut r, &mut buf).unwrap(), (21, false));
        buf.clear();
        assert_eq!(read_line_bounded(&mut r, &mut buf).unwrap(), (4, false));
        buf.clear();
        assert_eq!(read_line_bounded(&mut r, &mut buf).unwrap(), (0, false));
        // One line of MAX_LINE_BYTES + 1 bytes streamed from a gzip.
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("bomb.jsonl.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"{\"text\": \"").unwrap();
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..(MAX_LINE_BYTES >> 20) {
            gz.write_all(&chunk).unwrap();
        }
        gz.write_all(b"\"}\n{\"text\": \"fine\"}\n").unwrap();
        std::fs::write(&p, gz.finish().unwrap()).unwrap();
        let docs = read_documents(vec![p], "text").unwrap();
        assert_eq!(docs.documents.len(), 1);
        assert_eq!(docs.documents[0].text, "fine");
        assert!(
            docs.warnings[0].contains("bomb.jsonl.gz:1")
                && docs.warnings[0].contains("longer than")
        );
    }
}
