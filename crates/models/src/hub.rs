//! Fetching a diffusers pipeline from the Hugging Face Hub with `hf-hub`.
//!
//! Files land in the user's cache (`$HF_HOME/hub`, the layout Python's `huggingface_hub` uses, so
//! both share downloads). The repo listing decides which weight files to fetch (variant, pickle-only
//! repos); without network the cache alone is used. `HF_TOKEN` is passed on for gated repos.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use crate::pipeline::LoadOptions;
use crate::{Error, Result};

const REQUIRED: [&str; 5] = [
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer_config.json",
];
const OPTIONAL: [&str; 1] = ["model_index.json"];
/// A tokenizer folder's files besides `tokenizer_config.json`, each fetched when the repo has it.
const TOKENIZER_FILES: [&str; 4] = [
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
];
const WEIGHTS: [(&str, &str); 3] = [
    ("unet", "diffusion_pytorch_model"),
    ("vae", "diffusion_pytorch_model"),
    ("text_encoder", "model"),
];
/// SDXL's second text encoder and tokenizer, fetched when the repo has them.
const SDXL_ENCODER: (&str, &str) = ("text_encoder_2", "tokenizer_2");

struct Fetcher {
    repo_id: String,
    api: Option<ApiRepo>,
    cache: hf_hub::CacheRepo,
    listing: Option<Vec<String>>,
    offline_reason: Option<String>,
}

impl Fetcher {
    fn has(&self, file: &str) -> bool {
        match &self.listing {
            Some(l) => l.iter().any(|f| f == file),
            None => self.cache.get(file).is_some(),
        }
    }

    fn get(&self, file: &str) -> Result<PathBuf> {
        if let Some(p) = self.cache.get(file) {
            return Ok(p);
        }
        let err = |reason: String| Error::Hub {
            repo: self.repo_id.clone(),
            file: file.into(),
            reason,
        };
        match (&self.api, &self.offline_reason) {
            (Some(api), None) => api.get(file).map_err(|e| err(explain(&e.to_string()))),
            (_, reason) => Err(err(format!(
                "not in the local cache and the hub is unreachable ({})",
                reason.as_deref().unwrap_or("offline")
            ))),
        }
    }
}

/// Hints for the failures users meet.
fn explain(e: &str) -> String {
    if e.contains("401") || e.contains("403") {
        format!(
            "{e} (a gated or private repo: accept its license on huggingface.co and set HF_TOKEN)"
        )
    } else if e.contains("404") {
        format!("{e} (no such repo, revision or file: check the id and --revision)")
    } else {
        e.to_string()
    }
}

impl Fetcher {
    /// The repo at `revision` (default `main`): listed on the hub when it is reachable, else
    /// read from the cache alone.
    fn open(repo_id: &str, revision: Option<&str>) -> Self {
        let repo = Repo::with_revision(
            repo_id.to_string(),
            RepoType::Model,
            revision.unwrap_or("main").to_string(),
        );
        let mut builder = ApiBuilder::from_env();
        if let Ok(token) = std::env::var("HF_TOKEN") {
            builder = builder.with_token(Some(token));
        }
        let (api, build_err) = match builder.build() {
            Ok(api) => (Some(api.repo(repo.clone())), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let (listing, offline_reason) = match &api {
            Some(a) => match a.info() {
                Ok(info) => (
                    Some(info.siblings.into_iter().map(|s| s.rfilename).collect()),
                    None,
                ),
                Err(e) => (None, Some(explain(&e.to_string()))),
            },
            None => (None, build_err),
        };
        Fetcher {
            repo_id: repo_id.to_string(),
            api,
            cache: Cache::from_env().repo(repo),
            listing,
            offline_reason,
        }
    }
}

/// Downloads (or finds in the cache) `required` files of a hub repo, and those of `optional` it
/// has; returns the snapshot folder. `required[0]` must be at the repo's root.
pub fn fetch_files(
    repo_id: &str,
    revision: Option<&str>,
    required: &[&str],
    optional: &[&str],
) -> Result<PathBuf> {
    let f = Fetcher::open(repo_id, revision);
    let mut root = None;
    for file in required {
        let p = f.get(file)?;
        if root.is_none() {
            root = p.parent().map(Path::to_path_buf);
        }
    }
    for file in optional {
        if f.has(file) {
            f.get(file)?;
        }
    }
    root.ok_or_else(|| Error::Hub {
        repo: repo_id.into(),
        file: required.first().copied().unwrap_or("").into(),
        reason: "could not locate the snapshot folder".into(),
    })
}

/// A file of a hub repo (say a delta or LoRA repo), fetched into or read from the cache: `file`,
/// or else the repo's one `.safetensors` file at its root (an error lists them when there are
/// several).
pub fn fetch_file(repo_id: &str, file: Option<&str>, revision: Option<&str>) -> Result<PathBuf> {
    let f = Fetcher::open(repo_id, revision);
    let name = match file {
        Some(n) => n.to_string(),
        None => {
            let files: Vec<String> = match &f.listing {
                Some(l) => l.clone(),
                None => {
                    return Err(Error::Hub {
                        repo: repo_id.into(),
                        file: "<repo listing>".into(),
                        reason: format!(
                        "the hub is unreachable ({}), so name the file: {repo_id}:FILE.safetensors",
                        f.offline_reason.as_deref().unwrap_or("offline")
                    ),
                    })
                }
            };
            let mut st: Vec<&String> = files
                .iter()
                .filter(|n| n.ends_with(".safetensors") && !n.contains('/'))
                .collect();
            match st.len() {
                1 => st.remove(0).clone(),
                0 => {
                    return Err(Error::Hub {
                        repo: repo_id.into(),
                        file: "*.safetensors".into(),
                        reason: "no .safetensors file at the repo's root".into(),
                    })
                }
                _ => {
                    return Err(Error::Hub {
                        repo: repo_id.into(),
                        file: "*.safetensors".into(),
                        reason: format!(
                            "several files; name one as {repo_id}:FILE: {}",
                            st.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                    })
                }
            }
        }
    };
    f.get(&name)
}

/// Downloads (or finds in the cache) a pipeline repo's configs and tokenizers, not its weights:
/// what a single-file checkpoint's `--model-config` reads. Returns the snapshot folder.
pub fn fetch_config(repo_id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let mut optional: Vec<String> = vec![
        "text_encoder_2/config.json".into(),
        "tokenizer_2/tokenizer_config.json".into(),
    ];
    for dir in ["tokenizer", "tokenizer_2"] {
        optional.extend(TOKENIZER_FILES.iter().map(|f| format!("{dir}/{f}")));
    }
    let optional: Vec<&str> = optional.iter().map(String::as_str).collect();
    fetch_files(
        repo_id,
        revision,
        &[
            "model_index.json",
            "unet/config.json",
            "vae/config.json",
            "text_encoder/config.json",
            "scheduler/scheduler_config.json",
            "tokenizer/tokenizer_config.json",
        ],
        &optional,
    )
}

/// Downloads (or finds in the cache) what a pipeline needs; returns the snapshot folder, which
/// is laid out like a local diffusers folder.
pub fn fetch_pipeline(repo_id: &str, opts: &LoadOptions) -> Result<PathBuf> {
    let f = Fetcher::open(repo_id, opts.revision.as_deref());

    let mut root: Option<PathBuf> = None;
    let mut remember = |p: &Path, file: &str| {
        if root.is_none() {
            let depth = file.split('/').count();
            root = p.ancestors().nth(depth).map(Path::to_path_buf);
        }
    };
    for file in REQUIRED {
        let p = f.get(file)?;
        remember(&p, file);
    }
    for file in OPTIONAL {
        if f.has(file) {
            f.get(file)?;
        }
    }
    let mut weights = WEIGHTS.to_vec();
    let mut tokenizers = vec!["tokenizer"];
    let (encoder_2, tokenizer_2) = SDXL_ENCODER;
    if f.has(&format!("{encoder_2}/config.json")) {
        f.get(&format!("{encoder_2}/config.json"))?;
        f.get(&format!("{tokenizer_2}/tokenizer_config.json"))?;
        weights.push((encoder_2, "model"));
        tokenizers.push(tokenizer_2);
    }
    for tok in tokenizers {
        fetch_tokenizer(&f, tok)?;
    }
    for (folder, stem) in weights {
        for file in weight_files(&f, folder, stem, opts.variant.as_deref())? {
            f.get(&file)?;
        }
    }
    root.ok_or_else(|| Error::Hub {
        repo: repo_id.into(),
        file: "unet/config.json".into(),
        reason: "could not locate the snapshot folder".into(),
    })
}

/// The files of tokenizer folder `dir` the repo has; errors when it has no vocabulary.
fn fetch_tokenizer(f: &Fetcher, dir: &str) -> Result<()> {
    for file in TOKENIZER_FILES {
        let file = format!("{dir}/{file}");
        if f.has(&file) {
            f.get(&file)?;
        }
    }
    let has = |name: &str| f.has(&format!("{dir}/{name}"));
    if !(has("tokenizer.json") || (has("vocab.json") && has("merges.txt"))) {
        return Err(Error::Hub {
            repo: f.repo_id.clone(),
            file: format!("{dir}/"),
            reason: "neither tokenizer.json nor vocab.json + merges.txt".into(),
        });
    }
    Ok(())
}

/// Which weight files of `folder` to fetch, by the same rules as a local folder.
fn weight_files(
    f: &Fetcher,
    folder: &str,
    stem: &str,
    variant: Option<&str>,
) -> Result<Vec<String>> {
    let names: Vec<String> = match variant {
        Some(v) => vec![format!("{folder}/{stem}.{v}.safetensors")],
        None => vec![
            format!("{folder}/{stem}.safetensors"),
            format!("{folder}/{stem}.fp16.safetensors"),
        ],
    };
    for name in &names {
        if f.has(name) {
            return Ok(vec![name.clone()]);
        }
        let index = format!("{name}.index.json");
        if f.has(&index) {
            let path = f.get(&index)?;
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
                path: path.clone(),
                reason: format!("not valid JSON: {e}"),
            })?;
            let mut shards: Vec<String> = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| {
                    m.values()
                        .filter_map(|s| s.as_str())
                        .map(|s| format!("{folder}/{s}"))
                        .collect()
                })
                .ok_or_else(|| Error::Config {
                    path: path.clone(),
                    reason: "no `weight_map` object".into(),
                })?;
            if shards.is_empty() {
                return Err(Error::Config {
                    path,
                    reason: "`weight_map` names no shard files".into(),
                });
            }
            shards.sort();
            shards.dedup();
            return Ok(shards);
        }
    }
    if f.has(&format!("{folder}/{stem}.bin")) {
        return Err(Error::Pickle {
            path: PathBuf::from(format!("{}:{folder}/{stem}.bin", f.repo_id)),
        });
    }
    Err(Error::Hub {
        repo: f.repo_id.clone(),
        file: names[0].clone(),
        reason: match (&f.listing, variant) {
            (Some(_), Some(v)) => {
                format!("the repo has no `{v}` variant of {folder}; drop --variant")
            }
            (Some(_), None) => "the repo has no safetensors weights here".into(),
            (None, _) => format!(
                "not in the local cache and the hub is unreachable ({})",
                f.offline_reason.as_deref().unwrap_or("offline")
            ),
        },
    })
}
