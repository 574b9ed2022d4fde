//! Checkpoints that are either complete or absent. A checkpoint is written into a hidden
//! temporary directory; every file is fsynced, a `MANIFEST.json` with each file's size and
//! sha256 is written last, and only then is the directory renamed to `step-NNNNNNNN`. Loading
//! verifies the manifest, so a torn or tampered checkpoint is never resumed from.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shears_core::error::IoContext;
use shears_core::formats::safetensors;
use shears_core::{Error, ModelFiles, Result};
use shears_pruning::{L0Masks, Lagrangian, PerModule, PruningSpec};

use crate::records::LoopState;
use crate::records::CHECKPOINTS;

/// Manifest file name; its presence marks a complete checkpoint.
pub const MANIFEST: &str = "MANIFEST.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileEntry {
    bytes: u64,
    sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    step: usize,
    files: BTreeMap<String, FileEntry>,
}

/// The directory name of the checkpoint after `step` optimizer steps.
pub fn dir_name(step: usize) -> String {
    format!("step-{step:08}")
}

/// A checkpoint being written; dropped without [`Staging::commit`], it removes itself.
pub struct Staging {
    root: PathBuf,
    tmp: PathBuf,
    step: usize,
    done: bool,
}

impl Staging {
    /// Start the checkpoint of `step` under `root` (the run's `checkpoints/`).
    pub fn begin(root: &Path, step: usize) -> Result<Self> {
        std::fs::create_dir_all(root).at(root, "cannot create the checkpoint directory")?;
        let tmp = root.join(format!(".tmp-{}-{}", dir_name(step), std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).at(&tmp, "cannot remove a stale temporary checkpoint")?;
        }
        std::fs::create_dir_all(&tmp).at(&tmp, "cannot create")?;
        Ok(Staging {
            root: root.to_path_buf(),
            tmp,
            step,
            done: false,
        })
    }

    /// Where the files go.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Hash and fsync every file, write the manifest, rename into place. Returns the final path.
    pub fn commit(mut self) -> Result<PathBuf> {
        let mut files = BTreeMap::new();
        for rel in list_files(&self.tmp)? {
            let path = self.tmp.join(&rel);
            let (bytes, sha256) = hash_file(&path)?;
            File::open(&path)
                .and_then(|f| f.sync_all())
                .at(&path, "cannot sync")?;
            files.insert(rel, FileEntry { bytes, sha256 });
        }
        let manifest = Manifest {
            step: self.step,
            files,
        };
        let mpath = self.tmp.join(MANIFEST);
        shears_core::fsutil::write_atomic(
            &mpath,
            serde_json::to_string_pretty(&manifest)
                .expect("manifest")
                .as_bytes(),
            true,
        )?;
        sync_dir(&self.tmp)?;
        let target = self.root.join(dir_name(self.step));
        if target.exists() {
            std::fs::remove_dir_all(&target).at(&target, "cannot replace")?;
        }
        std::fs::rename(&self.tmp, &target)
            .at(&target, "cannot rename the checkpoint into place")?;
        sync_dir(&self.root)?;
        self.done = true;
        Ok(target)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    // Directory fsync makes the rename durable; not every platform allows it.
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
    Ok(())
}

fn list_files(dir: &Path) -> Result<Vec<String>> {
    let mut out = vec![];
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        for e in std::fs::read_dir(&abs).at(&abs, "cannot list")? {
            let e = e.at(&abs, "cannot list")?;
            let r = rel.join(e.file_name());
            if e.file_type().at(&abs, "cannot stat")?.is_dir() {
                stack.push(r);
            } else {
                out.push(r.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut f = File::open(path).at(path, "cannot open")?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).at(path, "cannot read")?;
        if k == 0 {
            break;
        }
        n += k as u64;
        h.update(&buf[..k]);
    }
    Ok((n, format!("{:x}", h.finalize())))
}

/// Check a checkpoint against its manifest: every file present with its size and hash.
pub fn verify(dir: &Path) -> Result<usize> {
    let mpath = dir.join(MANIFEST);
    let text = shears_core::fsutil::read_text(&mpath, shears_core::fsutil::SETTINGS_FILE_BYTES)?;
    let m: Manifest =
        serde_json::from_str(&text).map_err(|e| Error::format(&mpath, format!("invalid: {e}")))?;
    let mut on_disk = list_files(dir)?;
    on_disk.retain(|f| f != MANIFEST);
    let listed: Vec<&String> = m.files.keys().collect();
    if on_disk.iter().collect::<Vec<_>>() != listed {
        return Err(Error::format(
            &mpath,
            format!(
                "lists {} files but the checkpoint holds {} (files added, removed or renamed)",
                listed.len(),
                on_disk.len()
            ),
        ));
    }
    for (rel, want) in &m.files {
        let p = dir.join(rel);
        // Names come from list_files (inside, no links): only regular files are read.
        let meta = std::fs::symlink_metadata(&p).at(&p, "cannot stat")?;
        if !meta.is_file() || meta.len() != want.bytes {
            return Err(Error::format(
                &p,
                "does not match the checkpoint manifest (not a regular file, or its size differs)",
            ));
        }
        let (bytes, sha) = hash_file(&p)?;
        if bytes != want.bytes || sha != want.sha256 {
            return Err(Error::format(
                &p,
                "does not match the checkpoint manifest (size or sha256 differ)",
            ));
        }
    }
    Ok(m.step)
}

/// Every checkpoint directory under `root` (`step-NNNNNNNN`, complete or not), newest first.
/// Only a complete checkpoint is ever renamed to that name, so one without a valid manifest has
/// been damaged since.
pub fn list(root: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse::<usize>().ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort_by_key(|e| std::cmp::Reverse(e.0));
    out
}

/// A checkpoint that was not used, and why.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub path: PathBuf,
    pub why: String,
}

/// The newest checkpoint under `root` that verifies (`None` when none does), and the newer ones
/// rejected on the way with the reason of each.
pub fn newest_valid(root: &Path) -> (Option<(usize, PathBuf)>, Vec<Rejected>) {
    let mut rejected = vec![];
    for (step, p) in list(root) {
        match verify(&p) {
            Ok(s) if s == step => return (Some((step, p)), rejected),
            Ok(s) => rejected.push(Rejected {
                why: format!("its manifest is of step {s}"),
                path: p,
            }),
            Err(e) => rejected.push(Rejected {
                why: e.to_string(),
                path: p,
            }),
        }
    }
    (None, rejected)
}

/// The error when checkpoints exist but none can be used: each one with its reason.
pub fn nothing_valid(root: &Path, rejected: &[Rejected]) -> Error {
    let list: Vec<String> = rejected
        .iter()
        .map(|r| format!("{}: {}", r.path.display(), r.why))
        .collect();
    Error::format(
        root,
        format!(
            "no checkpoint verifies, so there is nothing to resume from (nothing was changed): {}; \
             restore or remove the damaged checkpoints, or start a new run in another directory",
            list.join("; ")
        ),
    )
}

/// Remove all but the newest `keep` checkpoints, and temporary leftovers of dead writers.
pub fn prune_old(root: &Path, keep: usize) -> Result<()> {
    for (_, p) in list(root).into_iter().skip(keep) {
        std::fs::remove_dir_all(&p).at(&p, "cannot remove an old checkpoint")?;
    }
    for e in std::fs::read_dir(root).at(root, "cannot list")?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(".tmp-") && !name.ends_with(&format!("-{}", std::process::id())) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    Ok(())
}

/// A run's checkpoint as readers outside the training loop see it (`eval`, `finalize`, later
/// stages): its directory, its state, its model and, for pruning runs, its masks.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// `RUN/checkpoints/step-NNNNNNNN`.
    pub dir: PathBuf,
    pub state: LoopState,
}

impl Checkpoint {
    /// The checkpoint of `run` after `step`, or its newest complete one; verified against its
    /// manifest.
    pub fn find(run: &Path, step: Option<usize>) -> Result<Checkpoint> {
        let root = run.join(CHECKPOINTS);
        let dir = match step {
            Some(s) => {
                let p = root.join(dir_name(s));
                verify(&p)?;
                p
            }
            None => match newest_valid(&root) {
                (Some((_, p)), rejected) => {
                    for r in rejected {
                        eprintln!(
                            "warning: skipping damaged checkpoint {}: {}",
                            r.path.display(),
                            r.why
                        );
                    }
                    p
                }
                (None, rejected) if !rejected.is_empty() => {
                    return Err(nothing_valid(&root, &rejected))
                }
                (None, _) => {
                    return Err(Error::format(
                        run,
                        "has no complete checkpoint (is it a run directory?)",
                    ))
                }
            },
        };
        let state = LoopState::read(&dir)?;
        Ok(Checkpoint { dir, state })
    }

    /// The model as saved (HF layout under `model/`).
    pub fn model_files(&self) -> Result<ModelFiles> {
        ModelFiles::load_hf_dir(self.dir.join("model"))
    }

    /// The pruning problem of a pruning checkpoint whose model is `files` (an error naming the
    /// checkpoint for a continued pre-training one).
    pub fn pruning_spec(&self, files: &ModelFiles) -> Result<PruningSpec> {
        let p = self.state.pruning(&self.dir)?;
        PruningSpec::new(&files.config, p.target, Some(&p.modules))
    }

    /// The masks and multipliers of a pruning checkpoint.
    pub fn masks<B: burn::tensor::backend::Backend>(
        &self,
        spec: &PruningSpec,
        device: &B::Device,
    ) -> Result<(L0Masks<B>, Lagrangian<B>)> {
        read_pruning(&self.dir, spec, device)
    }
}

/// The masks and multipliers of a checkpoint's `pruning.safetensors`.
pub fn read_pruning<B: burn::tensor::backend::Backend>(
    dir: &Path,
    spec: &PruningSpec,
    device: &B::Device,
) -> Result<(L0Masks<B>, Lagrangian<B>)> {
    let path = dir.join("pruning.safetensors");
    let f = safetensors::SafeTensorsFile::open(&path)?;
    let mut las = PerModule::new();
    for m in &spec.modules {
        let (shape, v) = f.read_f32(&format!("log_alpha.{}", m.name()))?;
        let (rows, n) = spec.mask_shape(*m);
        if shape != [rows, n] {
            return Err(Error::format(
                &path,
                format!(
                    "log_alpha.{} has shape {shape:?}, the plan's target needs [{rows}, {n}]",
                    m.name()
                ),
            ));
        }
        las.insert(*m, v);
    }
    let (_, l1) = f.read_f32("lambda_1")?;
    let (_, l2) = f.read_f32("lambda_2")?;
    if l1.len() != spec.modules.len() || l2.len() != spec.modules.len() {
        return Err(Error::format(
            &path,
            "the multipliers do not match the pruned modules",
        ));
    }
    Ok((
        L0Masks::from_values(spec, &las, device),
        Lagrangian::from_values(spec, &l1, &l2, device),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_verify_keep_and_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("checkpoints");
        for step in [1, 2, 3] {
            let s = Staging::begin(&root, step).unwrap();
            std::fs::create_dir_all(s.path().join("model")).unwrap();
            std::fs::write(s.path().join("model/w.bin"), vec![step as u8; 10]).unwrap();
            std::fs::write(s.path().join("state.json"), "{}").unwrap();
            s.commit().unwrap();
        }
        // An abandoned write leaves nothing.
        {
            let s = Staging::begin(&root, 4).unwrap();
            std::fs::write(s.path().join("state.json"), "{}").unwrap();
        }
        assert_eq!(list(&root).len(), 3);
        prune_old(&root, 2).unwrap();
        let l = list(&root);
        assert_eq!(l.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 2]);
        assert_eq!(verify(&l[0].1).unwrap(), 3);
        // Damage the newest: resume falls back to the previous one.
        std::fs::write(l[0].1.join("model/w.bin"), vec![9u8; 10]).unwrap();
        let (found, rejected) = newest_valid(&root);
        assert_eq!(found.unwrap().0, 2);
        assert!(rejected[0].why.contains("w.bin"), "{rejected:?}");
        // A garbled manifest, a planted file, a manifest of another step: each is rejected
        // with its reason, and with nothing valid left there is nothing to resume.
        std::fs::write(l[1].1.join(MANIFEST), "{garbled").unwrap();
        let (found, rejected) = newest_valid(&root);
        assert!(found.is_none());
        assert_eq!(rejected.len(), 2);
        assert!(rejected[1].why.contains("invalid"), "{rejected:?}");
        let e = nothing_valid(&root, &rejected).to_string();
        assert!(
            e.contains("nothing to resume") && e.contains("step-00000002"),
            "{e}"
        );
        let s = Staging::begin(&root, 5).unwrap();
        std::fs::write(s.path().join("state.json"), "{}").unwrap();
        let p5 = s.commit().unwrap();
        std::fs::write(p5.join("extra.bin"), "x").unwrap();
        assert!(verify(&p5)
            .unwrap_err()
            .to_string()
            .contains("lists 1 files"));
        std::fs::remove_file(p5.join("extra.bin")).unwrap();
        std::fs::rename(&p5, root.join(dir_name(6))).unwrap();
        let (found, rejected) = newest_valid(&root);
        assert!(found.is_none());
        assert!(rejected[0].why.contains("of step 5"), "{rejected:?}");
    }
}
