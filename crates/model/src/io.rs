//! Hugging Face checkpoint folders: `config.json` + `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Tensor names are transformers' own, so a folder reel saves
//! loads in transformers and the other way round.
//!
//! Loading checks every tensor against the config: a missing tensor, an unexpected one or a
//! wrong shape is refused with the tensor's name and file. Files are memory-mapped.

use crate::config::Qwen2Config;
use crate::model::Qwen2;
use crate::params::ParamLayout;
use crate::ModelError;
use reel_tensor::DType;
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Largest shard written by [`save_checkpoint`] before it splits into several files.
pub const DEFAULT_MAX_SHARD_BYTES: usize = 2 << 30;

fn widen(view: &TensorView, name: &str, file: &Path) -> Result<Vec<f32>, ModelError> {
    use rayon::prelude::*;
    let data = view.data();
    // Values per parallel chunk (a 3B model's tensors widen on every core).
    const CHUNK: usize = 1 << 18;
    let par = |size: usize, f: fn(&[u8]) -> f32| -> Vec<f32> {
        let mut out = vec![0.0f32; data.len() / size];
        out.par_chunks_mut(CHUNK)
            .zip(data.par_chunks(CHUNK * size))
            .for_each(|(o, d)| {
                for (x, c) in o.iter_mut().zip(d.chunks_exact(size)) {
                    *x = f(c);
                }
            });
        out
    };
    let out = match view.dtype() {
        StDtype::F32 => par(4, |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        StDtype::BF16 => par(2, |c| {
            half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()
        }),
        StDtype::F16 => par(2, |c| {
            half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()
        }),
        other => {
            return Err(ModelError::Checkpoint {
                path: file.display().to_string(),
                msg: format!("tensor `{name}` has dtype {other:?}; expected F32, BF16 or F16"),
            })
        }
    };
    Ok(out)
}

/// The safetensors files of a checkpoint folder.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Err(ModelError::Checkpoint {
            path: dir.display().to_string(),
            msg: "no model.safetensors or model.safetensors.index.json in this folder".into(),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Checkpoint {
        path: index.display().to_string(),
        msg: e.to_string(),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Checkpoint {
            path: index.display().to_string(),
            msg: "no `weight_map` object".into(),
        })?;
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|f| f.as_str())
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// A named tensor widened to f32: its shape and values.
pub type NamedTensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// A tensor to write: name, shape and values.
pub type TensorRef<'a> = (String, Vec<usize>, &'a [f32]);

/// Reads every tensor of a checkpoint folder as f32, by name.
pub fn read_tensors(dir: &Path) -> Result<NamedTensors, ModelError> {
    let mut out = HashMap::new();
    for file in weight_files(dir)? {
        let f = std::fs::File::open(&file).map_err(|e| ModelError::io(&file, e))?;
        // SAFETY: the file is opened read-only and only read while the map is alive.
        let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| ModelError::io(&file, e))?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| ModelError::Checkpoint {
            path: file.display().to_string(),
            msg: e.to_string(),
        })?;
        for (name, view) in st.tensors() {
            let data = widen(&view, &name, &file)?;
            out.insert(name, (view.shape().to_vec(), data));
        }
    }
    Ok(out)
}

/// Loads a Qwen2 checkpoint folder.
pub fn load_checkpoint(dir: &Path) -> Result<Qwen2, ModelError> {
    let config = Qwen2Config::from_file(&dir.join("config.json"))?;
    let mut tensors = read_tensors(dir)?;
    let layout = ParamLayout::new(&config);
    let params = take_params(&layout.entries, layout.total(), &mut tensors, dir)?;
    // Tied checkpoints sometimes also store the (identical) head.
    if config.tie_word_embeddings {
        tensors.remove("lm_head.weight");
    }
    if let Some(extra) = tensors.keys().min() {
        return Err(ModelError::Checkpoint {
            path: dir.display().to_string(),
            msg: format!(
                "unexpected tensor `{extra}` ({} unexpected in all) for a Qwen2 config",
                tensors.len()
            ),
        });
    }
    Qwen2::from_params(config, params)
}

/// Moves the tensors `entries` name out of `tensors` into a flat buffer of `total` values;
/// a missing tensor or a wrong shape is refused naming the tensor.
pub(crate) fn take_params(
    entries: &[crate::params::ParamEntry],
    total: usize,
    tensors: &mut NamedTensors,
    dir: &Path,
) -> Result<Vec<f32>, ModelError> {
    let mut params = vec![0.0f32; total];
    for e in entries {
        let (shape, data) = tensors
            .remove(&e.name)
            .ok_or_else(|| ModelError::Checkpoint {
                path: dir.display().to_string(),
                msg: format!("tensor `{}` is missing", e.name),
            })?;
        if shape != e.shape {
            return Err(ModelError::Checkpoint {
                path: dir.display().to_string(),
                msg: format!(
                    "tensor `{}` has shape {:?}, the config needs {:?}",
                    e.name, shape, e.shape
                ),
            });
        }
        params[e.range.clone()].copy_from_slice(&data);
    }
    Ok(params)
}

/// Writes `bytes` to `path` atomically: a temp file in the same folder (`.<name>.<pid>.tmp`),
/// fsync, rename over `path`, fsync of the folder. Readers see the old file or the new one; the
/// temp file is removed on failure. The one implementation every atomic write in reel uses.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name")
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // fsync the folder so the rename is durable (skipped where folders cannot be opened).
    if let Ok(d) = std::fs::File::open(dir) {
        d.sync_all()?;
    }
    Ok(())
}

/// Serialises named f32 tensors as a safetensors file in `dtype`.
pub fn safetensors_bytes(
    tensors: &[TensorRef],
    dtype: DType,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, ModelError> {
    let encoded: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, data)| match dtype {
            DType::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            DType::BF16 => data
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
                .collect(),
        })
        .collect();
    let st_dtype = match dtype {
        DType::F32 => StDtype::F32,
        DType::BF16 => StDtype::BF16,
    };
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&encoded)
        .map(|((name, shape, _), bytes)| {
            TensorView::new(st_dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::Invalid(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<_, _>>()?;
    safetensors::serialize(views, metadata).map_err(|e| ModelError::Invalid(e.to_string()))
}

/// The files of an HF checkpoint folder for `model` in `dtype`, in memory: `config.json`
/// (its `dtype` set to match) and `model.safetensors`, or, past `max_shard_bytes`,
/// `model-0000i-of-0000n.safetensors` shards with `model.safetensors.index.json`.
pub fn model_files(
    model: &Qwen2,
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<Vec<(String, Vec<u8>)>, ModelError> {
    let mut config = model.config.clone();
    config.dtype = dtype;
    let tensors = model
        .layout
        .entries
        .iter()
        .map(|e| {
            (
                e.name.clone(),
                e.shape.clone(),
                &model.params[e.range.clone()],
            )
        })
        .collect();
    folder_files(&config.to_json(), tensors, dtype, max_shard_bytes)
}

/// The files of an HF checkpoint folder: `config.json` (the given object) and the tensors in
/// `dtype`, in `model.safetensors` or, past `max_shard_bytes`, in shards with an index.
pub(crate) fn folder_files(
    config: &serde_json::Value,
    tensors: Vec<TensorRef>,
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<Vec<(String, Vec<u8>)>, ModelError> {
    let cfg_text = serde_json::to_string_pretty(config).expect("json");
    let mut files = vec![("config.json".to_string(), cfg_text.into_bytes())];

    let mut shards: Vec<Vec<TensorRef>> = vec![Vec::new()];
    let mut shard_bytes = 0usize;
    for t in tensors {
        let bytes = t.2.len() * dtype.size();
        if shard_bytes > 0 && shard_bytes + bytes > max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shard_bytes += bytes;
        shards.last_mut().expect("one shard").push(t);
    }
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    if shards.len() == 1 {
        let bytes = safetensors_bytes(&shards[0], dtype, meta)?;
        files.push(("model.safetensors".to_string(), bytes));
        return Ok(files);
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    for (i, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        for (t, _, data) in shard {
            weight_map.insert(t.clone(), name.clone());
            total += data.len() * dtype.size();
        }
        files.push((name, safetensors_bytes(shard, dtype, meta.clone())?));
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let text = serde_json::to_string_pretty(&index).expect("json");
    files.push((
        "model.safetensors.index.json".to_string(),
        text.into_bytes(),
    ));
    Ok(files)
}

/// Saves a model as an HF checkpoint folder in `dtype` ([`model_files`]), each file written
/// atomically; a single-file save removes a stale index and the other way round.
pub fn save_checkpoint(
    model: &Qwen2,
    dir: &Path,
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<(), ModelError> {
    let files = model_files(model, dtype, max_shard_bytes)?;
    write_folder(dir, &files)
}

/// Writes the files of a checkpoint folder, each atomically; a single-file save removes a stale
/// index and the other way round.
pub(crate) fn write_folder(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let sharded = files
        .iter()
        .any(|(name, _)| name == "model.safetensors.index.json");
    for (name, bytes) in files {
        let path = dir.join(name);
        write_atomic(&path, bytes).map_err(|e| ModelError::io(&path, e))?;
    }
    let stale = if sharded {
        "model.safetensors"
    } else {
        "model.safetensors.index.json"
    };
    let _ = std::fs::remove_file(dir.join(stale));
    Ok(())
}
