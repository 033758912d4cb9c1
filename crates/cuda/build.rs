//! With the `cudnn` feature: compiles csrc/cudnn_attention.cpp (a small C++ layer over the
//! header-only cudnn-frontend) into a static library. Nothing from CUDA is linked; libcudnn is
//! opened at run time. The headers are found in `REEL_CUDA_INCLUDE` (colon-separated include
//! folders) or in `<repo>/.cache/cuda-headers` (made by `scripts/cuda_build_deps.sh`, which this
//! script runs itself when they are missing). Without the feature this script does nothing.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cudnn")]
    cudnn::build_shim();
}

#[cfg(feature = "cudnn")]
mod cudnn {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// Headers the include folders must hold between them.
    const NEEDED: &[&str] = &[
        "cudnn_frontend.h",
        "cudnn.h",
        "cuda_runtime_api.h",
        "nvrtc.h",
    ];

    fn has_all(dirs: &[PathBuf]) -> bool {
        NEEDED
            .iter()
            .all(|h| dirs.iter().any(|d| d.join(h).is_file()))
    }

    fn cache_dirs(root: &Path) -> Vec<PathBuf> {
        ["include", "nvidia/cudnn/include", "nvidia/cu13/include"]
            .iter()
            .map(|d| root.join(d))
            .collect()
    }

    pub fn build_shim() {
        println!("cargo:rerun-if-changed=csrc/cudnn_attention.cpp");
        println!("cargo:rerun-if-env-changed=REEL_CUDA_INCLUDE");
        let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
        let repo = manifest.join("../..");
        let script = repo.join("scripts/cuda_build_deps.sh");
        let cache = repo.join(".cache/cuda-headers");
        // The pins live in the script: a change there fetches (and compiles against) new headers.
        println!("cargo:rerun-if-changed={}", script.display());

        let dirs: Vec<PathBuf> = match std::env::var("REEL_CUDA_INCLUDE") {
            Ok(v) if !v.is_empty() => {
                let dirs: Vec<PathBuf> = v
                    .split(':')
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
                    .collect();
                if !has_all(&dirs) {
                    panic!(
                    "reel-cuda (feature cudnn): REEL_CUDA_INCLUDE={v} lacks one of {NEEDED:?}; \
                     unset it to use the headers `{}` installs",
                    script.display()
                );
                }
                dirs
            }
            _ => {
                let dirs = cache_dirs(&cache);
                if !has_all(&dirs) {
                    let status = Command::new("bash").arg(&script).arg(&cache).status();
                    if !matches!(status, Ok(s) if s.success()) || !has_all(&dirs) {
                        panic!(
                        "reel-cuda (feature cudnn) needs the cuDNN/CUDA headers and could not fetch \
                         them ({status:?}). Run `{}` (python3 + pip + PyPI; no CUDA toolkit needed), \
                         or set REEL_CUDA_INCLUDE to the folders holding {NEEDED:?}",
                        script.display()
                    );
                    }
                }
                dirs
            }
        };

        let mut b = cc::Build::new();
        b.cpp(true)
            .std("c++17")
            .opt_level(2)
            .debug(false)
            .warnings(false)
            .define("NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING", None)
            .define("CUDNN_FRONTEND_SKIP_JSON_LIB", None)
            .file("csrc/cudnn_attention.cpp");
        for d in &dirs {
            b.include(d);
        }
        b.compile("reel_cudnn_attention");
        println!("cargo:rustc-link-lib=dylib=dl");
    }
}
