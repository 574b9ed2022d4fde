//! How Shears writes: output directories and files that appear whole or not at all, and never
//! through a link.
//!
//! - [`StagedDir`]: a directory written into a hidden sibling, renamed into place on success and
//!   removed on failure;
//! - [`write_atomic`] / [`AtomicFile`]: one file written into a new temporary sibling (created
//!   exclusively, `O_EXCL`) and renamed over the target; a symbolic link at the target is
//!   refused, not followed;
//! - [`create_new`]: a file that must not exist yet (inside a fresh staging directory);
//! - [`open_append`]: a file appended to in place (a run's metrics and log), opened with
//!   `O_NOFOLLOW`;
//! - [`check_output_apart`]: an output may not be, contain or lie inside anything a command
//!   reads, compared after resolving every link.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// A directory being written. Dropped without [`StagedDir::commit`], it removes itself.
#[derive(Debug)]
pub struct StagedDir {
    target: PathBuf,
    staging: PathBuf,
    committed: bool,
}

/// Files whose presence means a directory holds a model.
const MODEL_MARKERS: &[&str] = &[
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
];

impl StagedDir {
    /// Prepare to write `target`. Refuses a target that already holds a model, or any non-empty
    /// directory, unless `overwrite` is set.
    pub fn new(target: impl AsRef<Path>, overwrite: bool) -> Result<Self> {
        let target = target.as_ref().to_path_buf();
        if target.exists() {
            if !target.is_dir() {
                return Err(Error::format(
                    &target,
                    "output path exists and is not a directory",
                ));
            }
            if !overwrite {
                if let Some(m) = MODEL_MARKERS.iter().find(|m| target.join(m).exists()) {
                    return Err(Error::format(
                        &target,
                        format!("output directory already holds a model ({m}); choose another --out or pass --force to replace it"),
                    ));
                }
                let nonempty = std::fs::read_dir(&target)
                    .at(&target, "cannot list")?
                    .next()
                    .is_some();
                if nonempty {
                    return Err(Error::format(
                        &target,
                        "output directory is not empty; choose another --out or pass --force to replace it",
                    ));
                }
            }
        }
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).at(&parent, "cannot create directory")?;
        let name = target
            .file_name()
            .ok_or_else(|| Error::invalid(format!("{}: not a directory name", target.display())))?
            .to_string_lossy()
            .to_string();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let staging = parent.join(format!(".{name}.partial-{}-{stamp}", std::process::id()));
        std::fs::create_dir(&staging).at(&staging, "cannot create directory")?;
        Ok(StagedDir {
            target,
            staging,
            committed: false,
        })
    }

    /// Prepare to write `target`, replacing it only when it is a previous output of the same
    /// kind, which holds `marker` (a report's `index.html`, a corpus's `report.json`), or an
    /// empty directory: a command that always regenerates its output never replaces anything
    /// else, whatever `--out` names.
    pub fn replacing(target: impl AsRef<Path>, marker: &str) -> Result<Self> {
        let target = target.as_ref();
        if std::fs::symlink_metadata(target).is_ok() {
            let previous = target.join(marker).is_file();
            let empty = target.is_dir()
                && std::fs::read_dir(target)
                    .at(target, "cannot list")?
                    .next()
                    .is_none();
            if !previous && !empty {
                return Err(Error::format(
                    target,
                    format!(
                        "exists and is not an earlier output of this command (no {marker}); \
                         choose another --out (only a previous output is ever replaced)"
                    ),
                ));
            }
        }
        Self::new(target, true)
    }

    /// Where to write the files now.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// The final location.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Move the finished directory into place (replacing an old one only now, at the end).
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.target.exists() {
            let old = self.staging.with_extension("old");
            std::fs::rename(&self.target, &old).at(&self.target, "cannot move aside")?;
            std::fs::rename(&self.staging, &self.target)
                .at(&self.target, "cannot rename into place")?;
            std::fs::remove_dir_all(&old).at(&old, "cannot remove")?;
        } else {
            std::fs::rename(&self.staging, &self.target)
                .at(&self.target, "cannot rename into place")?;
        }
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

/// Refuse a path that is a symbolic link (or a directory, where a file is to be written): a file
/// Shears writes replaces what is there, it never writes through a link into whatever the link
/// points at (an input, or anything else).
pub fn refuse_link(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::format(
            path,
            "is a symbolic link; Shears never writes through a link (remove it or choose another output)",
        )),
        Ok(m) if m.is_dir() => Err(Error::format(
            path,
            "is a directory; a file was to be written here",
        )),
        _ => Ok(()),
    }
}

/// Create `path` as a new file; fails when anything (a file, a link, a FIFO) is already there,
/// so nothing is written through a link planted in its place.
pub fn create_new(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .at(path, "cannot create a new file")
}

/// Open `path` for appending, creating it if needed, without following a symbolic link at it.
pub fn open_append(path: &Path) -> Result<File> {
    refuse_link(path)?;
    let mut o = OpenOptions::new();
    o.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.custom_flags(libc::O_NOFOLLOW);
    }
    o.open(path).at(path, "cannot open for appending")
}

/// A fresh name beside `path` for its temporary copy: hidden, with the process id and a
/// counter, so two writers never share one.
fn temp_sibling(path: &Path) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a file name", path.display())))?
        .to_string_lossy();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    Ok(path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id())))
}

fn sync_parent(path: &Path) {
    // Directory fsync makes a rename durable; not every platform allows it.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(f) = File::open(dir) {
            let _ = f.sync_all();
        }
    }
}

/// A file written whole or not at all: the bytes go into a new temporary sibling (created
/// exclusively) which [`AtomicFile::commit`] renames over the target; dropped without a commit,
/// the temporary file is removed and the target is untouched. A symbolic link at the target is
/// refused when the file is created.
#[derive(Debug)]
pub struct AtomicFile {
    target: PathBuf,
    tmp: PathBuf,
    file: Option<std::io::BufWriter<File>>,
}

impl AtomicFile {
    /// Start writing `target`.
    pub fn create(target: &Path) -> Result<Self> {
        refuse_link(target)?;
        let tmp = temp_sibling(target)?;
        let file = create_new(&tmp)?;
        Ok(AtomicFile {
            target: target.to_path_buf(),
            tmp,
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// The final location.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Flush (and with `sync`, fsync the file and its directory), then rename into place.
    pub fn commit(mut self, sync: bool) -> Result<()> {
        let w = self.file.take().expect("an uncommitted file");
        let f = w
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, "cannot write", e.into_error()))?;
        if sync {
            f.sync_all().at(&self.tmp, "cannot sync")?;
        }
        drop(f);
        // Checked again just before the rename: a link planted meanwhile is refused too.
        refuse_link(&self.target)?;
        std::fs::rename(&self.tmp, &self.target)
            .at(&self.target, "cannot move the finished file into place")?;
        if sync {
            sync_parent(&self.target);
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.as_mut().expect("an uncommitted file").write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().expect("an uncommitted file").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Write `bytes` to `path` whole or not at all (see [`AtomicFile`]); with `sync`, durable
/// before this returns.
pub fn write_atomic(path: &Path, bytes: &[u8], sync: bool) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes).at(&f.tmp, "cannot write")?;
    f.commit(sync)
}

/// The most bytes read from a settings file (a config, a plan, a manifest, a tokenizer's
/// settings, a checkpoint's state): far above any real one.
pub const SETTINGS_FILE_BYTES: u64 = 64 << 20;
/// The most bytes read whole from a larger text file (a `tokenizer.json`, a data manifest, a
/// text to score).
pub const TEXT_FILE_BYTES: u64 = 1 << 30;

/// Read a text file whole, refusing anything but a regular file (a FIFO would block forever,
/// a device never end) and more than `max` bytes, before allocating for it.
pub fn read_text(path: &Path, max: u64) -> Result<String> {
    use std::io::Read;
    let meta = std::fs::metadata(path).at(path, "cannot read")?;
    if !meta.is_file() {
        return Err(Error::format(path, "is not a regular file"));
    }
    if meta.len() > max {
        return Err(Error::format(
            path,
            format!(
                "is {} bytes, more than the {max} read from such a file",
                meta.len()
            ),
        ));
    }
    let mut text = String::with_capacity(meta.len() as usize);
    File::open(path)
        .at(path, "cannot read")?
        .take(max + 1)
        .read_to_string(&mut text)
        .at(path, "cannot read")?;
    if text.len() as u64 > max {
        return Err(Error::format(
            path,
            format!("grew past {max} bytes while it was read"),
        ));
    }
    Ok(text)
}

/// Write `bytes` into a new file at `path` (inside a directory this process just created, such
/// as a [`StagedDir`]); fails when anything is already there.
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    create_new(path)?.write_all(bytes).at(path, "cannot write")
}

/// Whether `name`, read from a file (an index, a manifest), names something inside the directory
/// it is resolved against: non-empty, relative, no `..`, no root or drive prefix. Symlinks inside
/// the directory are the caller's to follow (the HF hub cache links shards to blobs).
pub fn is_inside_name(name: &str) -> bool {
    !name.is_empty()
        && Path::new(name)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// `p` as an absolute path with every existing prefix resolved through the filesystem
/// (symlinks, `.` and `..`) and the part that does not exist yet normalised lexically, so two
/// spellings of one place compare equal.
pub fn resolved(p: &Path) -> PathBuf {
    use std::path::Component;
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(p)
    };
    let settle = |acc: PathBuf| std::fs::canonicalize(&acc).unwrap_or(acc);
    let mut acc = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => acc.push(c.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                acc = settle(acc);
                acc.pop();
            }
            Component::Normal(n) => {
                acc.push(n);
                acc = settle(acc);
            }
        }
    }
    acc
}

/// Entries below a directory input that [`check_output_apart`] resolves one by one (a model's
/// files, a corpus tree, a run's checkpoints); past this many it compares the rest by the
/// directory alone.
const MAX_INPUT_ENTRIES: usize = 1 << 20;

/// `root` and, when it is a directory, every entry beneath it (files, links, directories; links
/// are listed, not walked), up to [`MAX_INPUT_ENTRIES`].
fn input_entries(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let is_dir = std::fs::symlink_metadata(root).is_ok_and(|m| m.is_dir())
        || std::fs::metadata(root).is_ok_and(|m| m.is_dir());
    if !is_dir {
        return out;
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if out.len() >= MAX_INPUT_ENTRIES {
                return out;
            }
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// Refuse an output location that is, contains, or lies inside one of a command's inputs:
/// writing (and with `--force`, replacing) it would destroy what the command reads. An input
/// directory stands for itself and every entry beneath it, so a file a model or corpus reads
/// through a symbolic link (a weights file linked from another directory) counts where it
/// really is. Paths are compared after [`resolved`], so aliases (symlinks, `..`, relative
/// spellings) are caught.
pub fn check_output_apart<'a>(
    out: &Path,
    inputs: impl IntoIterator<Item = (&'a str, &'a Path)>,
) -> Result<()> {
    let o = resolved(out);
    for (what, input) in inputs {
        for entry in input_entries(input) {
            let i = resolved(&entry);
            let relation = if o == i {
                "is"
            } else if i.starts_with(&o) {
                "contains"
            } else if o.starts_with(&i) {
                "is inside"
            } else {
                continue;
            };
            let via = if entry == input {
                String::new()
            } else {
                format!(" (its file {}, read from {})", entry.display(), i.display())
            };
            return Err(Error::format(
                out,
                format!(
                    "the output {relation} the {what} {}{via}; choose an --out apart from the \
                     command's inputs (--force only ever replaces an output, never an input)",
                    input.display()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_overlapping_inputs_are_refused_through_aliases() {
        let tmp = tempfile::tempdir().unwrap();
        let corpus = tmp.path().join("corpus");
        std::fs::create_dir_all(corpus.join("sub")).unwrap();
        std::fs::write(corpus.join("a.txt"), "x").unwrap();
        let link = tmp.path().join("link");
        #[cfg(unix)]
        std::os::unix::fs::symlink(&corpus, &link).unwrap();
        let file = corpus.join("a.txt");
        let check = |out: PathBuf| check_output_apart(&out, [("input", file.as_path())]);
        // The directory holding the input, the input itself, a path inside a directory input.
        assert!(check(corpus.clone())
            .unwrap_err()
            .to_string()
            .contains("contains"));
        assert!(check(file.clone())
            .unwrap_err()
            .to_string()
            .contains(" is the input"));
        let e = check_output_apart(&corpus.join("new"), [("corpus", corpus.as_path())]);
        assert!(e.unwrap_err().to_string().contains("is inside the corpus"));
        // Aliases: `..` through a directory that does not exist yet, `.`, a symlink.
        assert!(check(tmp.path().join("nothing/../corpus")).is_err());
        assert!(check(corpus.join("./sub/..")).is_err());
        #[cfg(unix)]
        assert!(check(link.clone()).is_err());
        // Apart: a sibling, and a name that merely shares a prefix.
        assert!(check(tmp.path().join("out")).is_ok());
        assert!(check(tmp.path().join("corpus2")).is_ok());
    }

    /// A file Shears writes replaces what is at its name and never writes through a link
    /// planted there; a temporary file that is not committed leaves nothing.
    #[cfg(unix)]
    #[test]
    fn writes_never_go_through_links() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim.bin");
        std::fs::write(&victim, "precious").unwrap();
        let link = tmp.path().join("out.json");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        for e in [
            write_atomic(&link, b"new", true).unwrap_err(),
            open_append(&link).unwrap_err(),
            create_new(&link).unwrap_err(),
            AtomicFile::create(&link).unwrap_err(),
        ] {
            let m = e.to_string();
            assert!(m.contains("out.json"), "{m}");
        }
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        // A plain file is replaced whole; an abandoned one leaves no temporary behind.
        let plain = tmp.path().join("plain.json");
        write_atomic(&plain, b"one", false).unwrap();
        write_atomic(&plain, b"two", true).unwrap();
        assert_eq!(std::fs::read_to_string(&plain).unwrap(), "two");
        {
            let mut f = AtomicFile::create(&plain).unwrap();
            f.write_all(b"half").unwrap();
        }
        assert_eq!(std::fs::read_to_string(&plain).unwrap(), "two");
        let mut names: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["out.json", "plain.json", "victim.bin"]);
        // Appending creates and extends a plain file.
        let log = tmp.path().join("log.txt");
        open_append(&log).unwrap().write_all(b"a").unwrap();
        open_append(&log).unwrap().write_all(b"b").unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "ab");
    }

    /// An input directory counts with every file beneath it where that file really is: a
    /// weights file linked in from elsewhere makes that elsewhere an input too.
    #[cfg(unix)]
    #[test]
    fn inputs_count_where_their_files_really_are() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("model");
        let store = tmp.path().join("store");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::create_dir_all(&store).unwrap();
        std::fs::write(store.join("w.safetensors"), "w").unwrap();
        std::os::unix::fs::symlink(store.join("w.safetensors"), model.join("model.safetensors"))
            .unwrap();
        let e = check_output_apart(&store, [("model", model.as_path())])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("contains the model") && e.contains("model.safetensors"),
            "{e}"
        );
        let e = check_output_apart(&store.join("w.safetensors"), [("model", model.as_path())]);
        assert!(e.unwrap_err().to_string().contains(" is the model"));
        assert!(check_output_apart(&tmp.path().join("out"), [("model", model.as_path())]).is_ok());
    }

    /// A command that always regenerates its output replaces only an earlier output of its
    /// own (or an empty directory), whatever `--out` names.
    #[test]
    fn replacing_only_replaces_an_earlier_output() {
        let tmp = tempfile::tempdir().unwrap();
        let mine = tmp.path().join("notes");
        std::fs::create_dir(&mine).unwrap();
        std::fs::write(mine.join("todo.txt"), "mine").unwrap();
        let e = StagedDir::replacing(&mine, "index.html")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no index.html"), "{e}");
        assert_eq!(
            std::fs::read_to_string(mine.join("todo.txt")).unwrap(),
            "mine"
        );
        let report = tmp.path().join("report");
        for _ in 0..2 {
            let s = StagedDir::replacing(&report, "index.html").unwrap();
            std::fs::write(s.path().join("index.html"), "r").unwrap();
            s.commit().unwrap();
        }
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(StagedDir::replacing(&empty, "index.html").is_ok());
    }

    #[test]
    fn dropped_stage_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        {
            let s = StagedDir::new(&out, false).unwrap();
            std::fs::write(s.path().join("config.json"), "{}").unwrap();
        }
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn refuses_existing_model_and_commits() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let s = StagedDir::new(&out, false).unwrap();
        std::fs::write(s.path().join("config.json"), "{}").unwrap();
        s.commit().unwrap();
        let e = StagedDir::new(&out, false).unwrap_err().to_string();
        assert!(e.contains("already holds a model"), "{e}");
        let s = StagedDir::new(&out, true).unwrap();
        std::fs::write(s.path().join("config.json"), "{\"v\":2}").unwrap();
        s.commit().unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("config.json")).unwrap(),
            "{\"v\":2}"
        );
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}
