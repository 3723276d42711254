//! A delta's metadata: what was trained, on which base, how. Stored as the safetensors
//! `__metadata__` string map.
//!
//! | key | value |
//! |---|---|
//! | `format` | `atomtune.delta` |
//! | `format_version` | `1` |
//! | `method` | `atoms`, `atoms-rec`, `lora` or `full` |
//! | `hparams` | JSON: `atoms` (m or null), `dictionary` (`svd`/`lasso`), `lasso_lambda`, `lasso_sweeps`, `lasso_tolerance`, `sub_atoms`, `rank`, `lora_alpha`, `block` (`4x4`), `init_seed` |
//! | `base_model` | the base's id (hub id or path) |
//! | `base_architecture` | the base's family: `sd1`, `sd2` or `sdxl` (optional: older deltas lack it) |
//! | `fingerprints` | JSON object: layer name -> fingerprint of its base weight |
//! | `base_fingerprint` | all of them combined (informational) |
//! | `targets`, `trigger`, `class`, `steps`, `seed`, `created` | optional |
//!
//! Any other key is kept as is in [`DeltaMeta::extra`] (the trainer records its learning rate
//! and schedule there).

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Map, Value};

use crate::{AdapterConfig, DictionaryKind, Error, LassoOptions, Method, Result};

/// The format name in `format`.
pub const FORMAT: &str = "atomtune.delta";
/// The newest format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

const KNOWN: [&str; 14] = [
    "format",
    "format_version",
    "method",
    "hparams",
    "base_model",
    "base_architecture",
    "fingerprints",
    "base_fingerprint",
    "targets",
    "trigger",
    "class",
    "steps",
    "seed",
    "created",
];

/// Everything a delta records besides its tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct DeltaMeta {
    /// The method and its hyper-parameters.
    pub config: AdapterConfig,
    /// The id of the base model it was trained on.
    pub base_model: String,
    /// The base's family (`sd1`, `sd2`, `sdxl`): a delta applies only to its own family.
    pub base_architecture: Option<String>,
    /// Fingerprint of each tuned layer's base weight (see [`crate::fingerprint`]).
    pub fingerprints: BTreeMap<String, String>,
    /// Which layers were targeted, as the user said it (`conv`, `attn`...).
    pub targets: Option<String>,
    /// The trigger token (`sks`).
    pub trigger: Option<String>,
    /// The subject's class (`dog`).
    pub class: Option<String>,
    /// Training steps done.
    pub steps: Option<u64>,
    /// The training seed.
    pub seed: Option<u64>,
    /// Creation time, RFC 3339.
    pub created: Option<String>,
    /// Other entries, kept verbatim.
    pub extra: BTreeMap<String, String>,
}

impl DeltaMeta {
    /// Metadata of a delta of `config` on `base_model`, everything optional left empty.
    pub fn new(config: AdapterConfig, base_model: impl Into<String>) -> Self {
        DeltaMeta {
            config,
            base_model: base_model.into(),
            base_architecture: None,
            fingerprints: BTreeMap::new(),
            targets: None,
            trigger: None,
            class: None,
            steps: None,
            seed: None,
            created: None,
            extra: BTreeMap::new(),
        }
    }

    /// All layer fingerprints combined into one.
    pub fn base_fingerprint(&self) -> String {
        crate::fingerprint::combine(
            self.fingerprints
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
    }

    /// The safetensors `__metadata__` map of this metadata (the table above).
    pub fn to_metadata(&self) -> HashMap<String, String> {
        let c = &self.config;
        let mut h = json!({
            "atoms": c.atoms,
            "dictionary": c.dictionary.name(),
            "sub_atoms": c.sub_atoms,
            "rank": c.rank,
            "lora_alpha": c.lora_alpha,
            "block": c.block.to_string(),
            "init_seed": c.seed,
        });
        if let DictionaryKind::Lasso(o) = c.dictionary {
            h["lasso_lambda"] = json!(o.lambda);
            h["lasso_iterations"] = json!(o.iterations);
            h["lasso_sweeps"] = json!(o.sweeps);
            h["lasso_tolerance"] = json!(o.tolerance);
        }
        let mut m: HashMap<String, String> = self.extra.clone().into_iter().collect();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        put("format", FORMAT.into());
        put("format_version", FORMAT_VERSION.to_string());
        put("method", c.method.to_string());
        put("hparams", h.to_string());
        put("base_model", self.base_model.clone());
        put("fingerprints", json!(self.fingerprints).to_string());
        put("base_fingerprint", self.base_fingerprint());
        let opt = [
            ("base_architecture", self.base_architecture.clone()),
            ("targets", self.targets.clone()),
            ("trigger", self.trigger.clone()),
            ("class", self.class.clone()),
            ("steps", self.steps.map(|s| s.to_string())),
            ("seed", self.seed.map(|s| s.to_string())),
            ("created", self.created.clone()),
        ];
        for (k, v) in opt {
            if let Some(v) = v {
                put(k, v);
            }
        }
        m
    }

    /// Parses a safetensors `__metadata__` map, checking format, version and hyper-parameters.
    pub fn from_metadata(m: &HashMap<String, String>) -> Result<Self> {
        let format = m.get("format");
        if format.map(String::as_str) != Some(FORMAT) {
            return Err(Error::NotADelta {
                found: format.cloned(),
            });
        }
        let version: u32 = parse(m, "format_version")?;
        if version > FORMAT_VERSION {
            return Err(Error::FormatVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if version == 0 {
            return Err(Error::meta("format_version", "version 0 does not exist"));
        }
        let method: Method = required(m, "method")?
            .parse()
            .map_err(|e: Error| Error::meta("method", e.to_string()))?;
        let config = parse_hparams(method, required(m, "hparams")?)?;
        let fingerprints: BTreeMap<String, String> =
            serde_json::from_str(required(m, "fingerprints")?).map_err(|e| {
                Error::meta("fingerprints", format!("not a JSON object of strings: {e}"))
            })?;
        let num = |k: &str| m.get(k).map(|_| parse::<u64>(m, k)).transpose();
        Ok(DeltaMeta {
            config,
            base_model: required(m, "base_model")?.to_string(),
            base_architecture: m.get("base_architecture").cloned(),
            fingerprints,
            targets: m.get("targets").cloned(),
            trigger: m.get("trigger").cloned(),
            class: m.get("class").cloned(),
            steps: num("steps")?,
            seed: num("seed")?,
            created: m.get("created").cloned(),
            extra: m
                .iter()
                .filter(|(k, _)| !KNOWN.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }
}

fn required<'a>(m: &'a HashMap<String, String>, key: &str) -> Result<&'a str> {
    m.get(key)
        .map(String::as_str)
        .ok_or_else(|| Error::meta(key, "missing"))
}

fn parse<T: std::str::FromStr>(m: &HashMap<String, String>, key: &str) -> Result<T> {
    let v = required(m, key)?;
    v.trim()
        .parse()
        .map_err(|_| Error::meta(key, format!("`{v}` is not a valid number")))
}

fn parse_hparams(method: Method, text: &str) -> Result<AdapterConfig> {
    let bad = |k: &str, why: &str| Error::meta("hparams", format!("`{k}`: {why}"));
    let v: Value =
        serde_json::from_str(text).map_err(|e| Error::meta("hparams", format!("not JSON: {e}")))?;
    let o: &Map<String, Value> = v
        .as_object()
        .ok_or_else(|| bad("hparams", "not a JSON object"))?;
    let uint = |k: &str| -> Result<usize> {
        o.get(k)
            .ok_or_else(|| bad(k, "missing"))?
            .as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| bad(k, "not a non-negative integer"))
    };
    let float = |k: &str| -> Result<f64> {
        o.get(k)
            .ok_or_else(|| bad(k, "missing"))?
            .as_f64()
            .ok_or_else(|| bad(k, "not a number"))
    };
    // Every key is read when present; the ones the method needs must be present.
    let atoms_method = matches!(method, Method::Atoms | Method::AtomsRec);
    let needs = |k: &str| match k {
        "dictionary" => atoms_method,
        "sub_atoms" => method == Method::AtomsRec,
        "rank" | "lora_alpha" => method == Method::Lora,
        _ => false,
    };
    let opt_uint = |k: &str| -> Result<Option<usize>> {
        match o.get(k) {
            None if needs(k) => Err(bad(k, "missing")),
            None => Ok(None),
            Some(_) => uint(k).map(Some),
        }
    };
    let mut c = AdapterConfig::new(method);
    if let Some(v) = opt_uint("init_seed")? {
        c.seed = v as u64;
    }
    if let Some(b) = o.get("block") {
        c.block = b
            .as_str()
            .ok_or_else(|| bad("block", "not a string"))?
            .parse()
            .map_err(|e: Error| bad("block", &e.to_string()))?;
    }
    c.atoms = match o.get("atoms") {
        None | Some(Value::Null) => None,
        Some(_) => Some(uint("atoms")?),
    };
    c.dictionary = match o.get("dictionary").map(Value::as_str) {
        None if !needs("dictionary") => DictionaryKind::Svd,
        Some(Some("svd")) => DictionaryKind::Svd,
        Some(Some("lasso")) => DictionaryKind::Lasso(LassoOptions {
            lambda: float("lasso_lambda")?,
            iterations: opt_uint("lasso_iterations")?.unwrap_or(0),
            sweeps: uint("lasso_sweeps")?,
            tolerance: float("lasso_tolerance")?,
        }),
        _ => return Err(bad("dictionary", "expected \"svd\" or \"lasso\"")),
    };
    if let Some(v) = opt_uint("sub_atoms")? {
        c.sub_atoms = v;
    }
    if let Some(v) = opt_uint("rank")? {
        c.rank = v;
    }
    if o.contains_key("lora_alpha") || needs("lora_alpha") {
        c.lora_alpha = float("lora_alpha")?;
    }
    c.validate()
        .map_err(|e| Error::meta("hparams", e.to_string()))?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_for_every_method() {
        for method in Method::ALL {
            let mut config = AdapterConfig::new(method);
            config.atoms = Some(5);
            config.seed = 9;
            if method == Method::AtomsRec {
                config.dictionary = DictionaryKind::Lasso(LassoOptions::default());
            }
            let mut meta = DeltaMeta::new(config.clone(), "org/model");
            meta.fingerprints
                .insert("conv_in".into(), "0123456789abcdef".into());
            meta.trigger = Some("sks".into());
            meta.steps = Some(400);
            meta.extra.insert("lr".into(), "0.01".into());
            let back = DeltaMeta::from_metadata(&meta.to_metadata()).unwrap();
            assert_eq!(back, meta, "{method}");
        }
    }

    #[test]
    fn malformed_metadata_names_the_key() {
        let good = DeltaMeta::new(AdapterConfig::new(Method::Lora), "m").to_metadata();
        let with = |k: &str, v: Option<&str>| {
            let mut m = good.clone();
            match v {
                Some(v) => m.insert(k.into(), v.into()),
                None => m.remove(k),
            };
            DeltaMeta::from_metadata(&m).unwrap_err().to_string()
        };
        assert!(with("format", None).contains("not an atomtune delta"));
        assert!(with("format_version", Some("2")).contains("newer"));
        assert!(with("format_version", Some("x")).contains("format_version"));
        assert!(with("method", Some("dora")).contains("method"));
        assert!(with("hparams", Some("{")).contains("hparams"));
        assert!(with("hparams", Some(r#"{"rank": 0, "lora_alpha": 1}"#)).contains("rank"));
        assert!(with("hparams", Some(r#"{"lora_alpha": 1}"#)).contains("`rank`: missing"));
        assert!(with("fingerprints", Some("[1]")).contains("fingerprints"));
        assert!(with("base_model", None).contains("base_model"));
        assert!(with("steps", Some("-3")).contains("steps"));
    }
}
