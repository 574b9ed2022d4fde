//! Output directories that appear whole or not at all: everything is written into a hidden
//! sibling directory which is renamed into place on success and removed on failure.

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

/// Refuse an output location that is, contains, or lies inside one of a command's inputs:
/// writing (and with `--force`, replacing) it would destroy what the command reads. Paths are
/// compared after [`resolved`], so aliases (symlinks, `..`, relative spellings) are caught.
pub fn check_output_apart<'a>(
    out: &Path,
    inputs: impl IntoIterator<Item = (&'a str, &'a Path)>,
) -> Result<()> {
    let o = resolved(out);
    for (what, input) in inputs {
        let i = resolved(input);
        let relation = if o == i {
            "is"
        } else if i.starts_with(&o) {
            "contains"
        } else if o.starts_with(&i) {
            "is inside"
        } else {
            continue;
        };
        return Err(Error::format(
            out,
            format!(
                "the output {relation} the {what} {}; choose an --out apart from the command's \
                 inputs (--force only ever replaces an output, never an input)",
                input.display()
            ),
        ));
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
