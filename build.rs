//! Build script.
//!
//! * Always: exports the git commit (`BLACKMAMBA_GIT_COMMIT`) for `--version`.
//! * With feature `cuda`: compiles every `kernels/*.cu` to a fat binary in `OUT_DIR` (SASS for each
//!   architecture of the list plus PTX of the newest, which newer GPUs compile when they load it;
//!   see `src/gpu_arch.rs`), writes `OUT_DIR/kernels.rs`, which embeds them, and exports the list
//!   as `BLACKMAMBA_CUDA_ARCHS`. Without the feature it compiles nothing, so CPU-only machines
//!   need no CUDA toolkit.
//!
//! Environment: `BLACKMAMBA_KERNEL_ARCHS`, a list such as `80,86,89,90` (the default; `90` alone
//! builds faster, for H100/H200 only). `CUDA_COMPUTE_CAP` is candle's: the one architecture of
//! its own PTX kernels (a binary for every card above needs 80 there). `NVCC` or `CUDA_ROOT`/`CUDA_PATH`/`CUDA_HOME` to find nvcc (else
//! `nvcc` on the PATH). Files compile in parallel (cargo's job count); a file whose source, headers
//! and flags are unchanged is not recompiled. The ptxas report of each file is kept beside its
//! binary (`OUT_DIR/<name>.ptxas.txt`); register spills are reported as build warnings.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

#[allow(dead_code)]
#[path = "src/gpu_arch.rs"]
mod gpu_arch;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/gpu_arch.rs");
    // the folder too: a new kernel file must rebuild (cargo scans a folder's files)
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    git_commit();
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        println!("cargo:rustc-env=BLACKMAMBA_CUDA_ARCHS=");
        return;
    }
    if let Err(e) = build_kernels() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

/// `BLACKMAMBA_GIT_COMMIT`: the short commit of HEAD (`unknown` outside a git checkout). Reruns
/// when HEAD or the branch it names moves. (No `-dirty` mark: edits to sources do not rerun this
/// script, so it would go stale.)
fn git_commit() {
    let commit = git(&["rev-parse", "--short=10", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=BLACKMAMBA_GIT_COMMIT={commit}");
    let mut watch = vec![git(&["rev-parse", "--git-path", "HEAD"])];
    if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.push(git(&["rev-parse", "--git-path", &r]));
        watch.push(git(&["rev-parse", "--git-path", "packed-refs"]));
    }
    // only files that exist: a missing one would make cargo rerun this script on every build
    for p in watch.into_iter().flatten().filter(|p| Path::new(p).is_file()) {
        println!("cargo:rerun-if-changed={p}");
    }
}

fn nvcc() -> PathBuf {
    println!("cargo:rerun-if-env-changed=NVCC");
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        println!("cargo:rerun-if-env-changed={var}");
        if let Some(root) = std::env::var_os(var) {
            let p = Path::new(&root).join("bin").join("nvcc");
            if p.is_file() {
                return p;
            }
        }
    }
    PathBuf::from("nvcc")
}

/// What compiling one file gave: its ptxas report (or the error).
type Compiled = Result<String, String>;

fn build_kernels() -> Result<(), String> {
    println!("cargo:rerun-if-env-changed=BLACKMAMBA_KERNEL_ARCHS");
    let archs = match std::env::var("BLACKMAMBA_KERNEL_ARCHS") {
        Ok(s) => gpu_arch::parse_archs(&s)?,
        Err(_) => gpu_arch::DEFAULT_ARCHS.to_vec(),
    };
    let list: Vec<String> = archs.iter().map(u32::to_string).collect();
    println!("cargo:rustc-env=BLACKMAMBA_CUDA_ARCHS={}", list.join(","));
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let dir = Path::new("kernels");
    let mut sources = Vec::new();
    let mut headers = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| format!("kernels/: {e}"))? {
        let path = entry.map_err(|e| format!("kernels/: {e}"))?.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("cu") => sources.push(path),
            Some("cuh") => headers.push(path),
            _ => {}
        }
    }
    sources.sort();
    headers.sort();
    let mut header_hash = std::collections::hash_map::DefaultHasher::new();
    for h in &headers {
        println!("cargo:rerun-if-changed={}", h.display());
        std::fs::read(h)
            .map_err(|e| format!("{}: {e}", h.display()))?
            .hash(&mut header_hash);
    }
    let nvcc = nvcc();
    let mut flags: Vec<String> = ["--fatbin", "-O3", "-std=c++17", "-lineinfo", "-Xptxas", "-v"]
        .iter()
        .map(ToString::to_string)
        .collect();
    flags.extend(gpu_arch::gencode_args(&archs));
    flags.hash(&mut header_hash);
    nvcc.hash(&mut header_hash);
    let mut stems = Vec::new();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| format!("{}: bad file name", src.display()))?;
        stems.push(stem.to_string());
    }
    let jobs = std::env::var("NUM_JOBS")
        .ok()
        .and_then(|j| j.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, sources.len().max(1));
    let next = AtomicUsize::new(0);
    let mut results: Vec<Option<Compiled>> = vec![None; sources.len()];
    let done: Vec<Vec<(usize, Compiled)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..jobs)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(src) = sources.get(i) else { break };
                        mine.push((i, compile(&nvcc, &flags, dir, src, &out.join(&stems[i]), &header_hash)));
                    }
                    mine
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_default()).collect()
    });
    for (i, r) in done.into_iter().flatten() {
        results[i] = Some(r);
    }
    let mut rs = String::from("// Generated by build.rs: the kernels of kernels/*.cu as fat binaries.\n");
    for ((src, stem), r) in sources.iter().zip(&stems).zip(results) {
        let report = r.ok_or_else(|| format!("{}: a compile thread panicked", src.display()))??;
        for line in report
            .lines()
            .filter(|l| l.contains("bytes spill") && !l.contains(" 0 bytes spill stores"))
        {
            println!("cargo:warning={stem}.cu: {}", line.trim());
        }
        let name = stem.to_ascii_uppercase();
        rs.push_str(&format!(
            "pub const {name}: &[u8] = include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{stem}.fatbin\"));\n"
        ));
    }
    std::fs::write(out.join("kernels.rs"), rs).map_err(|e| format!("writing kernels.rs: {e}"))
}

/// Compiles `src` to `<base>.fatbin` unless `<base>.key` shows the same source, headers and flags
/// were compiled before; returns the ptxas report.
fn compile(nvcc: &Path, flags: &[String], dir: &Path, src: &Path, base: &Path, headers: &impl Hasher) -> Compiled {
    let bin = base.with_extension("fatbin");
    let report_path = base.with_extension("ptxas.txt");
    let key_path = base.with_extension("key");
    let text = std::fs::read(src).map_err(|e| format!("{}: {e}", src.display()))?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    headers.finish().hash(&mut h);
    text.hash(&mut h);
    let key = format!("{:016x}", h.finish());
    if bin.is_file() && std::fs::read_to_string(&key_path).is_ok_and(|k| k == key) {
        if let Ok(report) = std::fs::read_to_string(&report_path) {
            return Ok(report);
        }
    }
    let output = Command::new(nvcc)
        .args(flags)
        .arg("-I")
        .arg(dir)
        .arg("-o")
        .arg(&bin)
        .arg(src)
        .output()
        .map_err(|e| {
            format!(
                "running {}: {e}; set NVCC or CUDA_ROOT, or build without --features cuda",
                nvcc.display()
            )
        })?;
    let report = String::from_utf8_lossy(&output.stderr).to_string();
    if !output.status.success() {
        return Err(format!("nvcc failed on {}:\n{report}", src.display()));
    }
    std::fs::write(&report_path, &report).map_err(|e| format!("writing ptxas report: {e}"))?;
    std::fs::write(&key_path, key).map_err(|e| format!("writing {}: {e}", key_path.display()))?;
    Ok(report)
}
