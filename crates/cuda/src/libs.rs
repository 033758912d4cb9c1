//! Finding the CUDA libraries at run time.
//!
//! reel links no CUDA library: cudarc (`dynamic-loading`) `dlopen`s each one by a bare name
//! (`libcublasLt.so.13`, `libnvrtc.so.13`, `libcuda.so.1`, `libnccl.so`, …) on first use, so the
//! dynamic loader must find them. On the GPU machines they come from pip's NVIDIA wheels
//! (`site-packages/nvidia/cu13/lib`, `nvidia/nccl/lib`, …) and `/usr/local/cuda/lib64`, folders the
//! loader does not search. Two ways in, both built on [`lib_dirs`]:
//!
//! - [`preload`] (what [`crate::Gpu::open`] does): `dlopen`s each library by its full path first.
//!   The loader then answers cudarc's bare-name `dlopen` with the already-loaded library (it
//!   matches a loaded library's soname), and libraries that need each other resolve the same way.
//!   Works in-process, in tests too, with no restart. It cannot help a library whose soname is
//!   none of the names cudarc tries: pip's NCCL is only `libnccl.so.2`, while cudarc 0.19 tries
//!   `libnccl.so` and `.so.1/.9/.10/.11/.12/.13`.
//! - [`reexec_with_library_path`]: sets `LD_LIBRARY_PATH` to a shim folder (a `libnccl.so` link to
//!   `libnccl.so.2`) plus the library folders and re-executes the program once
//!   (`REEL_CUDA_REEXEC` marks the child). Needed for NCCL only.
//!
//! Folders searched, in order: `REEL_CUDA_LIB_DIRS` (colon list), `LD_LIBRARY_PATH`, the
//! `nvidia/*/lib` folders of every Python site-packages found (asking `python3`, then well-known
//! paths), `/usr/local/cuda/lib64` and the driver's usual folders. NVRTC 13 has no built-in
//! `cuda_bf16.h`; [`include_dirs`] finds the `include/` folder beside a library folder that holds
//! it (pip's `nvidia/cu13/include`), or `REEL_CUDA_INCLUDE_DIRS`, or `/usr/local/cuda/include`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A library reel may open, in the order [`preload`] opens them (dependencies first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LibSpec {
    /// File name stem, e.g. `libcublasLt`.
    pub stem: &'static str,
    /// The major version wanted (`libcublasLt.so.13`); other versions are taken when it is absent.
    pub major: &'static str,
}

/// The libraries [`preload`] opens: driver, cuBLASLt, cuBLAS (which needs cuBLASLt), NVRTC's
/// builtins (NVRTC itself opens them by bare name) and NVRTC.
pub const LIBS: &[LibSpec] = &[
    LibSpec {
        stem: "libcuda",
        major: "1",
    },
    LibSpec {
        stem: "libcublasLt",
        major: "13",
    },
    LibSpec {
        stem: "libcublas",
        major: "13",
    },
    LibSpec {
        stem: "libnvrtc-builtins",
        major: "13",
    },
    LibSpec {
        stem: "libnvrtc",
        major: "13",
    },
];

/// NCCL: not preloaded (its soname is none of cudarc's names; see the module docs).
pub const NCCL: LibSpec = LibSpec {
    stem: "libnccl",
    major: "2",
};

/// Environment variable marking a process started by [`reexec_with_library_path`].
pub const REEXEC_MARK: &str = "REEL_CUDA_REEXEC";

fn split_paths(v: &str) -> impl Iterator<Item = PathBuf> + '_ {
    v.split(':').filter(|s| !s.is_empty()).map(PathBuf::from)
}

fn holds_shared_lib(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().contains(".so"))
        })
        .unwrap_or(false)
}

/// `site/nvidia/*/lib` (and `lib64`) folders holding shared libraries, sorted.
pub fn nvidia_lib_dirs(site: &Path) -> Vec<PathBuf> {
    let mut subs: Vec<PathBuf> = match std::fs::read_dir(site.join("nvidia")) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(_) => return Vec::new(),
    };
    subs.sort();
    subs.iter()
        .flat_map(|s| [s.join("lib"), s.join("lib64")])
        .filter(|d| holds_shared_lib(d))
        .collect()
}

/// Python site-packages folders: those `python3` reports, then well-known locations
/// (`/usr/local/lib/python3*/dist-packages`, `/opt/*/.venv/lib/python3*/site-packages`, …).
fn site_package_dirs() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let code = "import site,sys\nprint('\\n'.join(site.getsitepackages()+[site.getusersitepackages()]+[p for p in sys.path if p]))";
    for py in ["python3", "/usr/bin/python3"] {
        if let Ok(o) = std::process::Command::new(py)
            .args(["-c", code])
            .stderr(std::process::Stdio::null())
            .output()
        {
            if o.status.success() {
                out.extend(
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .map(|l| PathBuf::from(l.trim())),
                );
            }
        }
    }
    let mut roots: Vec<PathBuf> = vec![PathBuf::from("/usr/local/lib"), PathBuf::from("/usr/lib")];
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        roots.push(PathBuf::from(v).join("lib"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        roots.push(PathBuf::from(h).join(".local/lib"));
    }
    if let Ok(rd) = std::fs::read_dir("/opt") {
        for e in rd.flatten() {
            roots.push(e.path().join(".venv/lib"));
            roots.push(e.path().join("venv/lib"));
            roots.push(e.path().join("lib"));
        }
    }
    for root in roots {
        if let Ok(rd) = std::fs::read_dir(&root) {
            let mut pys: Vec<PathBuf> = rd
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
                .map(|e| e.path())
                .collect();
            pys.sort();
            for p in pys {
                out.push(p.join("site-packages"));
                out.push(p.join("dist-packages"));
            }
        }
    }
    out.push(PathBuf::from("/usr/lib/python3/dist-packages"));
    let mut seen = Vec::new();
    for p in out {
        if p.is_dir() && !seen.contains(&p) {
            seen.push(p);
        }
    }
    seen
}

/// Every candidate folder, in search order, before filtering: see the module docs.
fn candidate_dirs() -> Vec<PathBuf> {
    let mut c: Vec<PathBuf> = Vec::new();
    if let Ok(v) = std::env::var("REEL_CUDA_LIB_DIRS") {
        c.extend(split_paths(&v));
    }
    if let Ok(v) = std::env::var("LD_LIBRARY_PATH") {
        c.extend(split_paths(&v));
    }
    for site in site_package_dirs() {
        c.extend(nvidia_lib_dirs(&site));
    }
    c.extend(
        [
            "/usr/local/cuda/lib64",
            "/usr/local/cuda/targets/x86_64-linux/lib",
            "/usr/local/nvidia/lib64",
            "/usr/local/nvidia/lib",
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib64",
        ]
        .map(PathBuf::from),
    );
    c
}

/// The existing folders of `cands` that hold a shared library, without repeats.
pub fn usable_dirs(cands: impl IntoIterator<Item = PathBuf>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for d in cands {
        if d.is_dir() && holds_shared_lib(&d) && !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

/// The CUDA library folders of this machine (searched once per process).
pub fn lib_dirs() -> &'static [PathBuf] {
    static DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    DIRS.get_or_init(|| usable_dirs(candidate_dirs()))
}

/// The version suffix of `file` as a library of `stem` (`libnccl.so.2.28.9` → `Some("2.28.9")`,
/// `libnccl.so` → `Some("")`), or `None` when it is another library (`libnvrtc-builtins.so.13`
/// is not a `libnvrtc`).
fn version_suffix<'a>(file: &'a str, stem: &str) -> Option<&'a str> {
    let rest = file.strip_prefix(stem)?.strip_prefix(".so")?;
    if rest.is_empty() {
        Some("")
    } else {
        rest.strip_prefix('.')
    }
}

/// The best file for `spec` in `dirs`: the first folder holding it wins; within a folder the
/// exact `stem.so.MAJOR`, then `stem.so.MAJOR.*`, then any other version, then `stem.so`.
pub fn find_library(dirs: &[PathBuf], spec: LibSpec) -> Option<PathBuf> {
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(d) else {
            continue;
        };
        let mut best: Option<(u8, String)> = None;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(v) = version_suffix(&name, spec.stem) else {
                continue;
            };
            let rank = if v == spec.major {
                0
            } else if v.split('.').next() == Some(spec.major) {
                1
            } else if !v.is_empty() {
                2
            } else {
                3
            };
            if best.as_ref().is_none_or(|(r, n)| (rank, &name) < (*r, n)) {
                best = Some((rank, name));
            }
        }
        if let Some((_, name)) = best {
            return Some(d.join(name));
        }
    }
    None
}

/// Folders to pass NVRTC with `-I` so that `#include <cuda_bf16.h>` works: `REEL_CUDA_INCLUDE_DIRS`,
/// then the `include/` beside each library folder, then `/usr/local/cuda/include`; only those
/// holding `cuda_bf16.h`.
pub fn include_dirs(lib_dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut c: Vec<PathBuf> = Vec::new();
    if let Ok(v) = std::env::var("REEL_CUDA_INCLUDE_DIRS") {
        c.extend(split_paths(&v));
    }
    for d in lib_dirs {
        if let Some(p) = d.parent() {
            c.push(p.join("include"));
        }
    }
    c.push(PathBuf::from("/usr/local/cuda/include"));
    let mut out: Vec<PathBuf> = Vec::new();
    for d in c {
        if d.join("cuda_bf16.h").is_file() {
            let d = d.canonicalize().unwrap_or(d);
            if !out.contains(&d) {
                out.push(d);
            }
        }
    }
    out
}

/// What [`preload`] did for one library.
#[derive(Clone, Debug)]
pub struct Preloaded {
    pub stem: &'static str,
    /// The file opened, or why none was.
    pub result: Result<PathBuf, String>,
}

/// Opens `name` (a bare name: the loader's own search; a path: that file) and keeps it loaded
/// for the life of the process (cudarc keeps function pointers into it).
fn open_forever(name: &std::ffi::OsStr) -> Result<(), String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_LAZY};
    // SAFETY: loading a CUDA library runs its initialisers, as cudarc's first use would.
    match unsafe { Library::open(Some(name), RTLD_LAZY | RTLD_GLOBAL) } {
        Ok(lib) => {
            std::mem::forget(lib);
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Loads every library of [`LIBS`], once per process, so that cudarc's bare-name `dlopen`s find
/// them (see the module docs), each as [`open_library`] does.
pub fn preload() -> &'static [Preloaded] {
    static DONE: OnceLock<Vec<Preloaded>> = OnceLock::new();
    DONE.get_or_init(|| {
        LIBS.iter()
            .map(|&spec| Preloaded {
                stem: spec.stem,
                result: open_library(spec),
            })
            .collect()
    })
}

/// Loads `spec` for the life of the process: the loader's own `stem.so.MAJOR` when it has one (a
/// system install wins), else the file [`find_library`] picks in [`lib_dirs`], by full path.
/// Answers what was opened (the bare name or the path), or why nothing was.
pub fn open_library(spec: LibSpec) -> Result<PathBuf, String> {
    open_library_ordered(spec, false)
}

/// As [`open_library`], but the file [`find_library`] picks in [`lib_dirs`] comes first and the
/// loader's own search second: for cuDNN, so that reel runs the pip wheel's version (the one
/// PyTorch on the same machine runs) rather than an older system install.
pub fn open_library_dirs_first(spec: LibSpec) -> Result<PathBuf, String> {
    open_library_ordered(spec, true)
}

fn open_library_ordered(spec: LibSpec, dirs_first: bool) -> Result<PathBuf, String> {
    let dirs = lib_dirs();
    let bare = format!("{}.so.{}", spec.stem, spec.major);
    let found = find_library(dirs, spec);
    if dirs_first {
        if let Some(path) = &found {
            if open_forever(path.as_os_str()).is_ok() {
                return Ok(path.clone());
            }
        }
    }
    if open_forever(bare.as_ref()).is_ok() {
        return Ok(PathBuf::from(bare));
    }
    match found {
        None => Err(format!(
            "{bare} not found by the loader nor in {} library folders",
            dirs.len()
        )),
        Some(path) => open_forever(path.as_os_str())
            .map(|_| path.clone())
            .map_err(|e| format!("{}: {e}", path.display())),
    }
}

/// NCCL's version (2, 28, 9) when cudarc can open it under one of its names, which for pip's
/// NCCL takes [`reexec_with_library_path`]'s shim.
pub fn nccl_version() -> Option<(i32, i32, i32)> {
    let v = std::panic::catch_unwind(|| {
        // SAFETY: only tries to dlopen.
        if unsafe { cudarc::nccl::sys::is_culib_present() } {
            cudarc::nccl::result::get_nccl_version().ok()
        } else {
            None
        }
    })
    .ok()
    .flatten()?;
    Some((v / 10000, (v / 100) % 100, v % 100))
}

/// Makes `shim/libnccl.so` → the `libnccl.so.2` found in `dirs` (cudarc 0.19 never asks for
/// `libnccl.so.2`, the only name pip's NCCL has). Returns whether a link was made.
pub fn make_nccl_shim(dirs: &[PathBuf], shim: &Path) -> std::io::Result<bool> {
    if dirs.iter().any(|d| d.join("libnccl.so").exists()) {
        return Ok(false);
    }
    let Some(target) = find_library(dirs, NCCL) else {
        return Ok(false);
    };
    std::fs::create_dir_all(shim)?;
    let link = shim.join("libnccl.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&target, &link)?;
    Ok(true)
}

/// `LD_LIBRARY_PATH` for a process that must find every library by bare name: the shim folder
/// (when it holds a link), the library folders, then `old`.
pub fn library_path(shim: Option<&Path>, dirs: &[PathBuf], old: Option<&str>) -> String {
    let mut parts: Vec<String> = Vec::new();
    parts.extend(shim.map(|s| s.display().to_string()));
    parts.extend(dirs.iter().map(|d| d.display().to_string()));
    parts.extend(old.filter(|o| !o.is_empty()).map(str::to_string));
    parts.join(":")
}

/// Re-executes this program once with `LD_LIBRARY_PATH` covering [`lib_dirs`] and an NCCL shim
/// (needed by NCCL only; see the module docs). Returns only when it does not re-execute: in the
/// child (`REEL_CUDA_REEXEC` set), when no library folder was found, or when exec failed (the
/// error says why).
pub fn reexec_with_library_path() -> Result<(), String> {
    if std::env::var_os(REEXEC_MARK).is_some() {
        return Ok(());
    }
    let dirs = lib_dirs();
    if dirs.is_empty() {
        return Err("no CUDA library folder found; not re-executing".into());
    }
    let shim = std::env::temp_dir().join(format!("reel-cuda-shim-{}", std::process::id()));
    let shim = make_nccl_shim(dirs, &shim)
        .ok()
        .filter(|&m| m)
        .map(|_| shim);
    let old = std::env::var("LD_LIBRARY_PATH").ok();
    let path = library_path(shim.as_deref(), dirs, old.as_deref());
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", path)
        .env(REEXEC_MARK, "1")
        .exec();
    Err(format!("re-exec failed: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }

    #[test]
    fn finds_pip_layout_and_prefers_the_major_version() {
        let t = tempfile::tempdir().unwrap();
        let site = t.path().join("site-packages");
        touch(&site.join("nvidia/cu13/lib/libcublasLt.so.13"));
        touch(&site.join("nvidia/cu13/lib/libcublasLt.so.12"));
        touch(&site.join("nvidia/cu13/lib/libnvrtc.so.13"));
        touch(&site.join("nvidia/cu13/lib/libnvrtc-builtins.so.13.0"));
        touch(&site.join("nvidia/nccl/lib/libnccl.so.2"));
        touch(&site.join("nvidia/cu13/include/cuda_bf16.h"));
        std::fs::create_dir_all(site.join("nvidia/empty/lib")).unwrap();
        let dirs = nvidia_lib_dirs(&site);
        assert_eq!(
            dirs,
            vec![site.join("nvidia/cu13/lib"), site.join("nvidia/nccl/lib")]
        );

        let lt = LibSpec {
            stem: "libcublasLt",
            major: "13",
        };
        assert_eq!(
            find_library(&dirs, lt).unwrap(),
            site.join("nvidia/cu13/lib/libcublasLt.so.13")
        );
        let nvrtc = LibSpec {
            stem: "libnvrtc",
            major: "13",
        };
        assert_eq!(
            find_library(&dirs, nvrtc).unwrap(),
            site.join("nvidia/cu13/lib/libnvrtc.so.13")
        );
        let builtins = LibSpec {
            stem: "libnvrtc-builtins",
            major: "13",
        };
        assert_eq!(
            find_library(&dirs, builtins).unwrap(),
            site.join("nvidia/cu13/lib/libnvrtc-builtins.so.13.0")
        );
        assert_eq!(
            find_library(&dirs, NCCL).unwrap(),
            site.join("nvidia/nccl/lib/libnccl.so.2")
        );
        assert!(find_library(
            &dirs,
            LibSpec {
                stem: "libcuda",
                major: "1"
            }
        )
        .is_none());

        let inc = include_dirs(&dirs);
        // First the folder beside the pip libraries; a system CUDA's may follow.
        assert_eq!(
            inc.first(),
            Some(&site.join("nvidia/cu13/include").canonicalize().unwrap())
        );
    }

    #[test]
    fn version_suffix_separates_libraries() {
        assert_eq!(
            version_suffix("libnccl.so.2.28.9", "libnccl"),
            Some("2.28.9")
        );
        assert_eq!(version_suffix("libnccl.so", "libnccl"), Some(""));
        assert_eq!(version_suffix("libnvrtc-builtins.so.13", "libnvrtc"), None);
        assert_eq!(version_suffix("libcublasLt.so.13", "libcublas"), None);
        assert_eq!(version_suffix("libcuda.so.1", "libcuda"), Some("1"));
        assert_eq!(version_suffix("libcudart.so.13", "libcuda"), None);
    }

    #[test]
    fn falls_back_to_other_versions_in_order() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        let b = t.path().join("b");
        touch(&a.join("libcublas.so"));
        touch(&b.join("libcublas.so.13.0.2"));
        let spec = LibSpec {
            stem: "libcublas",
            major: "13",
        };
        // The first folder holding the library wins, even with a worse name.
        assert_eq!(
            find_library(&[a.clone(), b.clone()], spec).unwrap(),
            a.join("libcublas.so")
        );
        assert_eq!(
            find_library(std::slice::from_ref(&b), spec).unwrap(),
            b.join("libcublas.so.13.0.2")
        );
        assert_eq!(
            usable_dirs([a.clone(), a.clone(), t.path().join("none"), b.clone()]),
            vec![a, b]
        );
    }

    #[test]
    fn nccl_shim_links_the_unversioned_name() {
        let t = tempfile::tempdir().unwrap();
        let lib = t.path().join("nccl/lib");
        touch(&lib.join("libnccl.so.2"));
        let shim = t.path().join("shim");
        assert!(make_nccl_shim(std::slice::from_ref(&lib), &shim).unwrap());
        assert_eq!(
            std::fs::read_link(shim.join("libnccl.so")).unwrap(),
            lib.join("libnccl.so.2")
        );
        // Already reachable under the unversioned name: no shim.
        touch(&lib.join("libnccl.so"));
        assert!(!make_nccl_shim(std::slice::from_ref(&lib), &t.path().join("shim2")).unwrap());
        let p = library_path(Some(&shim), std::slice::from_ref(&lib), Some("/x"));
        assert_eq!(p, format!("{}:{}:/x", shim.display(), lib.display()));
        assert_eq!(library_path(None, &[], Some("")), "");
    }
}
