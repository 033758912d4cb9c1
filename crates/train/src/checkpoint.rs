//! Atomic checkpoints: a crash at any instant leaves either the previous complete checkpoint or
//! the new one, never a half-written file that looks complete.
//!
//! Layout under the run folder:
//!
//! ```text
//! <out>/checkpoints/step-<N>/        one complete checkpoint (files given to `save`)
//! <out>/checkpoints/step-<N>.tmp/    being written; renamed to step-<N> when complete
//! <out>/checkpoints/latest           the name of the newest complete checkpoint ("step-<N>")
//! ```
//!
//! Every file goes through [`write_atomic`] (temp file in the same folder, fsync, rename, fsync
//! of the folder). The trainer's own state is [`TrainerState`] (JSON); the optimizer's is
//! `optimizer.safetensors` with tensors `m.<i>`, `v.<i>` (f32, 1-D) and the step in the metadata
//! ([`optimizer_state_to_bytes`] / [`optimizer_state_from_bytes`]).

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use reel_optim::AdamWState;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

/// Name of the file (inside the checkpoints folder) naming the newest complete checkpoint.
pub const LATEST_FILE: &str = "latest";
/// File name of the trainer state inside a checkpoint.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// File name of the optimizer state inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// `format` metadata value of optimizer state files.
const OPTIMIZER_FORMAT: &str = "reel-adamw-v1";

/// Errors from writing or reading checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file name given to [`CheckpointDir::save`] is not a plain name.
    #[error("checkpoint file name `{0}` must be a plain file name (no separators, not `.`/`..`)")]
    BadFileName(String),
    /// The trainer state JSON is malformed.
    #[error("trainer state: {0}")]
    TrainerState(#[from] serde_json::Error),
    /// The optimizer state file is malformed or inconsistent.
    #[error("optimizer state: {0}")]
    OptimizerState(String),
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CheckpointError + 'a {
    move |source| CheckpointError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// fsync a directory so a rename inside it is durable (a no-op where directories cannot be opened).
fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    match File::open(dir) {
        Ok(f) => f.sync_all().map_err(io_err("fsync", dir)),
        Err(_) => Ok(()),
    }
}

/// Writes `bytes` to `path` atomically ([`reel_model::io::write_atomic`]: temp file, fsync,
/// rename, fsync of the folder). Readers see the old file or the new one.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<(), CheckpointError> {
    let path = path.as_ref();
    if path.file_name().is_none() {
        return Err(CheckpointError::BadFileName(path.display().to_string()));
    }
    reel_model::io::write_atomic(path, bytes).map_err(io_err("write", path))
}

/// The `step-<N>` name of a complete checkpoint, or `None` for anything else.
fn parse_step_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The step of a checkpoint folder (`…/step-120` → 120).
pub fn checkpoint_step(dir: &Path) -> Option<u64> {
    parse_step_name(dir.file_name()?.to_str()?)
}

/// The `<out>/checkpoints` folder of a run.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    root: PathBuf,
    keep_last: usize,
}

impl CheckpointDir {
    /// Opens (creating) `<out_dir>/checkpoints`, keeping `keep_last` complete checkpoints
    /// (0 = all), and removes what an interrupted save left behind (`*.tmp` folders and files).
    pub fn open(out_dir: impl AsRef<Path>, keep_last: usize) -> Result<Self, CheckpointError> {
        let root = out_dir.as_ref().join("checkpoints");
        fs::create_dir_all(&root).map_err(io_err("create", &root))?;
        let this = Self { root, keep_last };
        this.remove_stale_tmp()?;
        Ok(this)
    }

    /// The checkpoints folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn remove_stale_tmp(&self) -> Result<(), CheckpointError> {
        for entry in fs::read_dir(&self.root).map_err(io_err("list", &self.root))? {
            let entry = entry.map_err(io_err("list", &self.root))?;
            let path = entry.path();
            if !entry.file_name().to_string_lossy().ends_with(".tmp") {
                continue;
            }
            tracing::warn!("removing incomplete checkpoint data {}", path.display());
            let is_dir = entry.file_type().map_err(io_err("stat", &path))?.is_dir();
            let removed = if is_dir {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match removed {
                // Another process of the same run (`reel launch`) removed it first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                r => r.map_err(io_err("remove", &path))?,
            }
        }
        Ok(())
    }

    /// Complete checkpoints, oldest first, as `(step, folder)`.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io_err("list", &self.root))? {
            let entry = entry.map_err(io_err("list", &self.root))?;
            let Some(step) = entry.file_name().to_str().and_then(parse_step_name) else {
                continue;
            };
            if entry
                .file_type()
                .map_err(io_err("stat", &entry.path()))?
                .is_dir()
            {
                out.push((step, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The newest complete checkpoint: the one `latest` names, or (if that file is missing or
    /// names a folder that is gone) the highest `step-<N>` folder.
    pub fn latest(&self) -> Option<PathBuf> {
        let named = fs::read_to_string(self.root.join(LATEST_FILE))
            .ok()
            .filter(|name| parse_step_name(name.trim()).is_some())
            .map(|name| self.root.join(name.trim()))
            .filter(|dir| dir.is_dir());
        named.or_else(|| self.list().ok()?.pop().map(|(_, dir)| dir))
    }

    /// Writes `files` as checkpoint `step-<step>`: into `step-<step>.tmp/`, then renamed, then
    /// `latest` updated, then older checkpoints pruned to `keep_last`. Saving a step that already
    /// exists replaces it. Returns the checkpoint folder.
    pub fn save<N: AsRef<str>>(
        &self,
        step: u64,
        files: &[(N, Vec<u8>)],
    ) -> Result<PathBuf, CheckpointError> {
        for (name, _) in files {
            let name = name.as_ref();
            let plain = Path::new(name).file_name().is_some_and(|f| f == name);
            if !plain || name.ends_with(".tmp") {
                return Err(CheckpointError::BadFileName(name.to_string()));
            }
        }
        let name = format!("step-{step}");
        let final_dir = self.root.join(&name);
        let tmp_dir = self.root.join(format!("{name}.tmp"));
        if tmp_dir.exists() {
            fs::remove_dir_all(&tmp_dir).map_err(io_err("remove", &tmp_dir))?;
        }
        fs::create_dir(&tmp_dir).map_err(io_err("create", &tmp_dir))?;
        for (file, bytes) in files {
            write_atomic(tmp_dir.join(file.as_ref()), bytes)?;
        }
        sync_dir(&tmp_dir)?;
        if final_dir.exists() {
            // Move the old one aside under a `.tmp` name, so a crash before the removal below
            // leaves debris that `open` cleans up rather than a second `step-<N>`.
            let old = self.root.join(format!("{name}.old.tmp"));
            fs::rename(&final_dir, &old).map_err(io_err("rename", &final_dir))?;
            fs::rename(&tmp_dir, &final_dir).map_err(io_err("rename", &tmp_dir))?;
            fs::remove_dir_all(&old).map_err(io_err("remove", &old))?;
        } else {
            fs::rename(&tmp_dir, &final_dir).map_err(io_err("rename", &tmp_dir))?;
        }
        sync_dir(&self.root)?;
        write_atomic(self.root.join(LATEST_FILE), name.as_bytes())?;
        self.prune()?;
        Ok(final_dir)
    }

    /// Deletes the oldest complete checkpoints beyond `keep_last`, never the one `latest` names.
    fn prune(&self) -> Result<(), CheckpointError> {
        if self.keep_last == 0 {
            return Ok(());
        }
        let latest = self.latest();
        let all = self.list()?;
        let excess = all.len().saturating_sub(self.keep_last);
        for (_, dir) in all.into_iter().take(excess) {
            if Some(&dir) != latest.as_ref() {
                fs::remove_dir_all(&dir).map_err(io_err("remove", &dir))?;
            }
        }
        Ok(())
    }
}

/// What the trainer needs besides weights and optimizer state to resume exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// The data sampler's state (epoch, position, shuffling seed: whatever it exports).
    pub data: serde_json::Value,
    /// State (or seed) of the trainer's random generator.
    pub rng: u64,
    /// The most recent losses, oldest first (for smoothed logging and NaN checks after resume).
    pub losses: Vec<f32>,
    /// [`crate::SftConfig::config_hash`] of the run that wrote it.
    pub config_hash: String,
}

impl TrainerState {
    /// Pretty JSON bytes, for `trainer_state.json`.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("TrainerState always serialises")
    }

    /// Parses `trainer_state.json` bytes.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self, CheckpointError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// Serialises AdamW state as safetensors: f32 1-D tensors `m.<i>` and `v.<i>`, metadata
/// `step`, `num_params` and `format`.
pub fn optimizer_state_to_bytes(state: &AdamWState) -> Result<Vec<u8>, CheckpointError> {
    if state.m.len() != state.v.len() {
        return Err(CheckpointError::OptimizerState(format!(
            "{} first moments but {} second moments",
            state.m.len(),
            state.v.len()
        )));
    }
    let mut tensors = Vec::with_capacity(2 * state.m.len());
    for (kind, vecs) in [("m", &state.m), ("v", &state.v)] {
        for (i, x) in vecs.iter().enumerate() {
            let view = safetensors::tensor::TensorView::new(
                Dtype::F32,
                vec![x.len()],
                bytemuck::cast_slice(x),
            )
            .map_err(|e| CheckpointError::OptimizerState(format!("{kind}.{i}: {e}")))?;
            tensors.push((format!("{kind}.{i}"), view));
        }
    }
    let metadata = HashMap::from([
        ("format".to_string(), OPTIMIZER_FORMAT.to_string()),
        ("step".to_string(), state.step.to_string()),
        ("num_params".to_string(), state.m.len().to_string()),
    ]);
    safetensors::serialize(tensors, Some(metadata))
        .map_err(|e| CheckpointError::OptimizerState(e.to_string()))
}

/// What [`optimizer_state_to_bytes`] wrote, parsed lazily: the step, and each moment tensor's
/// bytes (little-endian f32) read on demand.
struct OptimizerFile<'a> {
    step: u64,
    num_params: usize,
    tensors: SafeTensors<'a>,
}

impl<'a> OptimizerFile<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, CheckpointError> {
        let bad = |msg: String| CheckpointError::OptimizerState(msg);
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let field = |key: &str| -> Result<u64, CheckpointError> {
            let raw = meta
                .get(key)
                .ok_or_else(|| bad(format!("metadata lacks `{key}`")))?;
            raw.parse()
                .map_err(|_| bad(format!("metadata `{key}` = `{raw}` is not an integer")))
        };
        let step = field("step")?;
        let num_params = field("num_params")? as usize;
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        if tensors.len() != 2 * num_params {
            return Err(bad(format!(
                "{} tensors for {num_params} parameters",
                tensors.len()
            )));
        }
        Ok(OptimizerFile {
            step,
            num_params,
            tensors,
        })
    }

    /// The bytes of `m.i` and `v.i`, each checked to be a 1-D f32 tensor, the two of one length.
    fn moments(&self, i: usize) -> Result<[&[u8]; 2], CheckpointError> {
        let bad = |msg: String| CheckpointError::OptimizerState(msg);
        let read = |kind: &str| {
            let name = format!("{kind}.{i}");
            let t = self
                .tensors
                .tensor(&name)
                .map_err(|e| bad(format!("{name}: {e}")))?;
            if t.dtype() != Dtype::F32 || t.shape().len() != 1 {
                return Err(bad(format!(
                    "{name}: expected 1-D F32, found {:?} {:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            Ok(t.data())
        };
        let (m, v) = (read("m")?, read("v")?);
        if m.len() != v.len() {
            return Err(bad(format!(
                "m.{i} has {} elements but v.{i} has {}",
                m.len() / 4,
                v.len() / 4
            )));
        }
        Ok([m, v])
    }
}

fn f32s(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Parses what [`optimizer_state_to_bytes`] wrote.
pub fn optimizer_state_from_bytes(bytes: &[u8]) -> Result<AdamWState, CheckpointError> {
    let f = OptimizerFile::parse(bytes)?;
    let mut state = AdamWState {
        step: f.step,
        m: Vec::with_capacity(f.num_params),
        v: Vec::with_capacity(f.num_params),
    };
    for i in 0..f.num_params {
        let [m, v] = f.moments(i)?;
        state.m.push(f32s(m).collect());
        state.v.push(f32s(v).collect());
    }
    Ok(state)
}

/// Part `part` of the flat moments (the parameters' layout: tensor i at `entries[i]`) of the
/// optimizer state file `path` — a sharded rank's shard, or everything — read through a memory
/// map, so a rank never holds the whole state: (step, m, v), `part.len()` values each, zeros
/// past the last tensor (a shard's padding). Every tensor's length is checked against
/// `entries`.
pub fn optimizer_state_part(
    path: &Path,
    entries: &[std::ops::Range<usize>],
    part: std::ops::Range<usize>,
) -> Result<(u64, Vec<f32>, Vec<f32>), CheckpointError> {
    let file = fs::File::open(path).map_err(io_err("opening", path))?;
    // SAFETY: the checkpoint is written once (atomically renamed) and only read here.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err("mapping", path))?;
    let f = OptimizerFile::parse(&map)?;
    if f.num_params != entries.len() {
        return Err(CheckpointError::OptimizerState(format!(
            "{}: {} tensors' moments, the model has {}",
            path.display(),
            f.num_params,
            entries.len()
        )));
    }
    let mut out = [vec![0.0f32; part.len()], vec![0.0f32; part.len()]];
    for (i, r) in entries.iter().enumerate() {
        let moments = f.moments(i)?;
        if moments[0].len() != 4 * r.len() {
            return Err(CheckpointError::OptimizerState(format!(
                "{}: m.{i} has {} elements, the parameter {}",
                path.display(),
                moments[0].len() / 4,
                r.len()
            )));
        }
        let (lo, hi) = (r.start.max(part.start), r.end.min(part.end));
        if lo >= hi {
            continue;
        }
        for (data, dst) in moments.into_iter().zip(out.iter_mut()) {
            let src = &data[4 * (lo - r.start)..4 * (hi - r.start)];
            for (d, x) in dst[lo - part.start..hi - part.start]
                .iter_mut()
                .zip(f32s(src))
            {
                *d = x;
            }
        }
    }
    let [m, v] = out;
    Ok((f.step, m, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        write_atomic(&path, b"first").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first");
        write_atomic(&path, b"second, longer").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second, longer");
        assert_eq!(names(dir.path()), vec!["a.bin"]);
    }

    #[test]
    fn write_atomic_failure_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        write_atomic(&path, b"good").unwrap();
        // Renaming a file over a non-empty folder fails: the target stays as it was.
        let blocked = dir.path().join("sub");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("x"), b"x").unwrap();
        assert!(write_atomic(&blocked, b"new").is_err());
        assert_eq!(fs::read(&path).unwrap(), b"good");
        assert_eq!(names(dir.path()), vec!["a.bin", "sub"]);
    }

    #[test]
    fn save_latest_and_prune() {
        let out = tempfile::tempdir().unwrap();
        let ck = CheckpointDir::open(out.path(), 2).unwrap();
        assert_eq!(ck.latest(), None);
        for step in [10, 20, 30] {
            let dir = ck
                .save(step, &[("a.txt", format!("step {step}").into_bytes())])
                .unwrap();
            assert_eq!(dir, ck.root().join(format!("step-{step}")));
            assert_eq!(ck.latest(), Some(dir.clone()));
            assert_eq!(checkpoint_step(&dir), Some(step));
        }
        assert_eq!(names(ck.root()), vec!["latest", "step-20", "step-30"]);
        assert_eq!(
            fs::read_to_string(ck.root().join("latest")).unwrap(),
            "step-30"
        );
        assert_eq!(
            fs::read(ck.root().join("step-30/a.txt")).unwrap(),
            b"step 30"
        );
        // Re-saving an existing step replaces its contents.
        ck.save(30, &[("a.txt", b"again".to_vec())]).unwrap();
        assert_eq!(fs::read(ck.root().join("step-30/a.txt")).unwrap(), b"again");
        assert_eq!(names(ck.root()), vec!["latest", "step-20", "step-30"]);
    }

    #[test]
    fn prune_never_deletes_latest() {
        // After a resume from an older checkpoint, `latest` may name a step lower than others.
        let out = tempfile::tempdir().unwrap();
        let ck = CheckpointDir::open(out.path(), 1).unwrap();
        ck.save::<&str>(50, &[]).unwrap();
        fs::create_dir(ck.root().join("step-90")).unwrap();
        ck.save::<&str>(40, &[]).unwrap();
        assert_eq!(ck.latest(), Some(ck.root().join("step-40")));
        assert_eq!(names(ck.root()), vec!["latest", "step-40", "step-90"]);
    }

    #[test]
    fn stale_tmp_is_removed_and_latest_falls_back() {
        let out = tempfile::tempdir().unwrap();
        let ck = CheckpointDir::open(out.path(), 0).unwrap();
        ck.save(5, &[("x", vec![1])]).unwrap();
        // A crash mid-save: a half-written folder and a temp file of `latest`.
        fs::create_dir(ck.root().join("step-10.tmp")).unwrap();
        fs::write(ck.root().join("step-10.tmp/x"), [0]).unwrap();
        fs::write(ck.root().join(".latest.1234.tmp"), "step-10").unwrap();
        let ck = CheckpointDir::open(out.path(), 0).unwrap();
        assert_eq!(names(ck.root()), vec!["latest", "step-5"]);
        assert_eq!(ck.latest(), Some(ck.root().join("step-5")));
        // `latest` naming a folder that is gone: fall back to the newest complete one.
        fs::create_dir(ck.root().join("step-7")).unwrap();
        fs::write(ck.root().join("latest"), "step-99").unwrap();
        assert_eq!(ck.latest(), Some(ck.root().join("step-7")));
        fs::remove_file(ck.root().join("latest")).unwrap();
        assert_eq!(ck.latest(), Some(ck.root().join("step-7")));
        assert_eq!(
            ck.list()
                .unwrap()
                .iter()
                .map(|(s, _)| *s)
                .collect::<Vec<_>>(),
            vec![5, 7]
        );
    }

    #[test]
    fn save_refuses_paths_as_file_names() {
        let out = tempfile::tempdir().unwrap();
        let ck = CheckpointDir::open(out.path(), 2).unwrap();
        for bad in ["../x", "a/b", "..", "", "x.tmp"] {
            assert!(
                matches!(
                    ck.save(1, &[(bad, vec![])]),
                    Err(CheckpointError::BadFileName(_))
                ),
                "{bad}"
            );
        }
        assert_eq!(ck.latest(), None);
    }

    #[test]
    fn trainer_state_json_round_trip() {
        let s = TrainerState {
            step: 42,
            data: serde_json::json!({"epoch": 1, "cursor": 17}),
            rng: 0xdead_beef,
            losses: vec![2.5, 2.25, 2.125],
            config_hash: "0123456789abcdef".into(),
        };
        assert_eq!(
            TrainerState::from_json_bytes(&s.to_json_bytes()).unwrap(),
            s
        );
        assert!(TrainerState::from_json_bytes(b"{\"step\": 1}").is_err());
    }

    #[test]
    fn optimizer_state_bytes_round_trip() {
        let state = AdamWState {
            step: 123,
            m: vec![vec![0.5, -1.25, 3.0e-7], vec![], vec![f32::MIN_POSITIVE]],
            v: vec![vec![0.25, 1.5, 9.0e-14], vec![], vec![1.0]],
        };
        let bytes = optimizer_state_to_bytes(&state).unwrap();
        let back = optimizer_state_from_bytes(&bytes).unwrap();
        assert_eq!(back, state);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut names = st.names();
        names.sort();
        assert_eq!(names, vec!["m.0", "m.1", "m.2", "v.0", "v.1", "v.2"]);

        let mut torn = bytes.clone();
        torn.truncate(bytes.len() - 4);
        assert!(optimizer_state_from_bytes(&torn).is_err());

        // Parts of the flat layout read from the file: across tensors, empty, into padding.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(OPTIMIZER_FILE);
        fs::write(&path, &bytes).unwrap();
        let entries = [0..3, 3..3, 3..4];
        let flat = |x: &[Vec<f32>]| x.concat();
        let (fm, fv) = (flat(&state.m), flat(&state.v));
        for part in [0..4, 1..3, 2..4, 3..4, 0..0, 2..6] {
            let (step, m, v) = optimizer_state_part(&path, &entries, part.clone()).unwrap();
            assert_eq!(step, 123);
            let want = |f: &[f32]| -> Vec<f32> {
                part.clone()
                    .map(|i| f.get(i).copied().unwrap_or(0.0))
                    .collect()
            };
            assert_eq!((m, v), (want(&fm), want(&fv)), "part {part:?}");
        }
        // A layout that does not match the file is refused by name.
        let e = optimizer_state_part(&path, &[0..3, 3..3, 3..5], 0..5).unwrap_err();
        assert!(
            e.to_string().contains("v.2 has 1 elements")
                || e.to_string().contains("m.2 has 1 elements"),
            "{e}"
        );
        let e = optimizer_state_part(&path, &[0..3, 3..4], 0..4).unwrap_err();
        assert!(
            e.to_string()
                .contains("3 tensors' moments, the model has 2"),
            "{e}"
        );
        let uneven = AdamWState {
            step: 1,
            m: vec![vec![1.0]],
            v: vec![],
        };
        assert!(optimizer_state_to_bytes(&uneven).is_err());
    }
}
