//! The CLIP BPE tokenizer, from `tokenizer.json` or from `vocab.json` + `merges.txt` (what SD
//! repos ship), with padding, special tokens, maximum length and lower-casing taken from
//! `tokenizer_config.json` / `special_tokens_map.json`.
//!
//! Without a `tokenizer.json` we build the same pipeline transformers' fast `CLIPTokenizer` uses
//! (NFC, whitespace collapse, lower-case; CLIP's split pattern and byte-level pre-tokenizer; BPE
//! with the `</w>` suffix) around the repo's vocabulary and merges.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use serde_json::{json, Value};

use crate::{Error, Result};

/// The split pattern of CLIP's pre-tokenizer.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Token ids for one prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    /// `[bos, ..., eos, pad...]`, `max_length` long when padded.
    pub ids: Vec<u32>,
    /// When the prompt was too long: how many content tokens it had (before truncation).
    pub truncated_from: Option<usize>,
}

/// A CLIP tokenizer with SD's padding conventions.
pub struct ClipTokenizer {
    tok: tokenizers::Tokenizer,
    max_length: usize,
    bos: u32,
    eos: u32,
    pad: u32,
    path: PathBuf,
    /// Tokens added for learned embeddings (pivotal tuning), each with the id its text encoder
    /// gives its row; matched as whole words, case-insensitively when the tokenizer lower-cases.
    added: RwLock<Vec<(String, Vec<u32>)>>,
    lower: bool,
}

fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

/// CLIP's vocabulary and merges, built into the binary (`assets/clip-tokenizer`).
const VOCAB: &str = include_str!("../../../assets/clip-tokenizer/vocab.json");
const MERGES: &str = include_str!("../../../assets/clip-tokenizer/merges.txt");

/// The files of a transformers `CLIPTokenizer` folder for the built-in tokenizer padding with
/// `pad`: file name -> contents.
pub(crate) fn builtin_files(pad: &str) -> Vec<(&'static str, String)> {
    let special = serde_json::json!({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": pad,
        "unk_token": "<|endoftext|>",
    });
    let mut config = special.clone();
    config["model_max_length"] = 77.into();
    config["do_lower_case"] = true.into();
    config["tokenizer_class"] = "CLIPTokenizer".into();
    let json = |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("a JSON value");
    vec![
        ("vocab.json", VOCAB.to_string()),
        ("merges.txt", MERGES.to_string()),
        ("special_tokens_map.json", json(&special)),
        ("tokenizer_config.json", json(&config)),
    ]
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let err = |reason: String| Error::Tokenizer {
            path: dir.to_path_buf(),
            reason,
        };
        let read_json = |name: &str| -> Result<Option<Value>> {
            let p = dir.join(name);
            if !p.is_file() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| err(format!("{name}: not valid JSON: {e}")))
        };
        let config = read_json("tokenizer_config.json")?.unwrap_or(Value::Null);
        let special = read_json("special_tokens_map.json")?.unwrap_or(Value::Null);
        let lower = config
            .get("do_lower_case")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let tok = if dir.join("tokenizer.json").is_file() {
            tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
                .map_err(|e| err(format!("tokenizer.json: {e}")))?
        } else {
            Self::from_vocab_merges(dir, lower)?
        };
        let lookup = |key: &str, default: &str| -> String {
            special
                .get(key)
                .and_then(token_text)
                .or_else(|| config.get(key).and_then(token_text))
                .unwrap_or_else(|| default.to_string())
        };
        let id = |text: String| -> Result<u32> {
            tok.token_to_id(&text)
                .ok_or_else(|| err(format!("special token {text:?} is not in the vocabulary")))
        };
        let max_length = config
            .get("model_max_length")
            .and_then(Value::as_u64)
            .filter(|n| (2..=4096).contains(n))
            .unwrap_or(77) as usize;
        Ok(ClipTokenizer {
            bos: id(lookup("bos_token", "<|startoftext|>"))?,
            eos: id(lookup("eos_token", "<|endoftext|>"))?,
            pad: id(lookup("pad_token", "<|endoftext|>"))?,
            max_length,
            tok,
            path: dir.to_path_buf(),
            added: RwLock::new(Vec::new()),
            lower,
        })
    }

    fn from_vocab_merges(dir: &Path, lower: bool) -> Result<tokenizers::Tokenizer> {
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        for p in [&vocab_path, &merges_path] {
            if !p.is_file() {
                return Err(Error::MissingFile {
                    path: p.clone(),
                    what: "tokenizer file".into(),
                    hint: "a tokenizer folder needs tokenizer.json, or vocab.json and merges.txt"
                        .into(),
                });
            }
        }
        let vocab = std::fs::read_to_string(&vocab_path).map_err(|e| Error::io(&vocab_path, e))?;
        let merges =
            std::fs::read_to_string(&merges_path).map_err(|e| Error::io(&merges_path, e))?;
        Self::build_bpe(&vocab, &merges, lower, dir)
    }

    /// CLIP's tokenizer from the vocabulary and merges built into the binary
    /// (`assets/clip-tokenizer`), padding with `pad` (`<|endoftext|>` for OpenAI CLIP encoders,
    /// `!` for OpenCLIP ones): what a single-file checkpoint uses without a `--model-config`.
    pub fn builtin(pad: &str) -> Result<Self> {
        let path = PathBuf::from("<built-in CLIP tokenizer>");
        let tok = Self::build_bpe(VOCAB, MERGES, true, &path)?;
        let id = |text: &str| {
            tok.token_to_id(text).ok_or_else(|| Error::Tokenizer {
                path: path.clone(),
                reason: format!("special token {text:?} is not in the vocabulary"),
            })
        };
        Ok(ClipTokenizer {
            bos: id("<|startoftext|>")?,
            eos: id("<|endoftext|>")?,
            pad: id(pad)?,
            max_length: 77,
            tok,
            path,
            added: RwLock::new(Vec::new()),
            lower: true,
        })
    }

    /// The tokenizer transformers' fast `CLIPTokenizer` builds from `vocab` (JSON) and `merges`.
    fn build_bpe(
        vocab_text: &str,
        merges_text: &str,
        lower: bool,
        dir: &Path,
    ) -> Result<tokenizers::Tokenizer> {
        let vocab: Value = serde_json::from_str(vocab_text).map_err(|e| Error::Tokenizer {
            path: dir.join("vocab.json"),
            reason: format!("not valid JSON: {e}"),
        })?;
        let merges: Vec<Value> = merges_text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|l| {
                let mut parts = l.split(' ');
                json!([parts.next().unwrap_or(""), parts.next().unwrap_or("")])
            })
            .collect();
        let mut normalizers = vec![
            json!({"type": "NFC"}),
            json!({"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "}),
        ];
        if lower {
            normalizers.push(json!({"type": "Lowercase"}));
        }
        let added = |id: u64, content: &str| json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
        let id_of = |t: &str| vocab.get(t).and_then(Value::as_u64);
        let mut added_tokens = Vec::new();
        for t in ["<|startoftext|>", "<|endoftext|>"] {
            if let Some(id) = id_of(t) {
                added_tokens.push(added(id, t));
            }
        }
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens,
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": CLIP_PATTERN}, "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": "<|endoftext|>", "continuing_subword_prefix": "",
                "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges
            }
        });
        spec.to_string()
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| Error::Tokenizer {
                path: dir.to_path_buf(),
                reason: format!("vocab.json + merges.txt: {e}"),
            })
    }

    /// The maximum sequence length (77 for SD).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The padding id (the end token for SD 1.x, `!` for SD 2.x).
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Adds `text` as a word read as the ids `ids` (learned embedding rows: pivotal tuning, a
    /// bundled textual inversion of several vectors). It must be one word of letters, digits
    /// and `<>_-` not added before.
    pub fn add_token(&self, text: &str, ids: &[u32]) -> Result<()> {
        self.check_new_token(text)?;
        let mut added = self.added.write().expect("tokenizer lock");
        let key = self.fold(text);
        added.push((key, ids.to_vec()));
        Ok(())
    }

    /// Whether `text` can be added as a word ([`ClipTokenizer::add_token`]): one word of
    /// letters, digits and `<>_-`, not added before.
    pub fn check_new_token(&self, text: &str) -> Result<()> {
        let bad = |reason: &str| Err(Error::Input(format!("token {text:?}: {reason}")));
        if text.is_empty()
            || !text
                .chars()
                .all(|c| c.is_alphanumeric() || "<>_-".contains(c))
        {
            return bad(
                "a learned token is one word of letters, digits and <>_- (e.g. sks or <sks>)",
            );
        }
        let key = self.fold(text);
        if self
            .added
            .read()
            .expect("tokenizer lock")
            .iter()
            .any(|(t, _)| *t == key)
        {
            return bad("it already has a learned embedding (two deltas with the same trigger?)");
        }
        Ok(())
    }

    /// The added words and their ids.
    pub fn added_tokens(&self) -> Vec<(String, Vec<u32>)> {
        self.added.read().expect("tokenizer lock").clone()
    }

    fn fold(&self, text: &str) -> String {
        if self.lower {
            text.to_lowercase()
        } else {
            text.to_string()
        }
    }

    /// The BPE ids of `text`, no start or end token.
    fn bpe(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.tok.encode(text, false).map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            reason: format!("encoding {text:?}: {e}"),
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// The ids of `prompt`'s content: BPE between the added tokens, which are whole words
    /// (bounded by anything but letters and digits) and keep their own ids.
    fn content_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let added = self.added.read().expect("tokenizer lock");
        if added.is_empty() {
            return self.bpe(prompt);
        }
        let text = self.fold(prompt);
        let is_word = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
        let (mut ids, mut start, mut i) = (Vec::new(), 0, 0);
        while i < text.len() {
            let found = added.iter().find(|(t, _)| {
                text[i..].starts_with(t.as_str())
                    && !is_word(text[..i].chars().next_back())
                    && !is_word(text[i + t.len()..].chars().next())
            });
            match found {
                Some((t, own)) => {
                    ids.extend(self.bpe(&text[start..i])?);
                    ids.extend_from_slice(own);
                    i += t.len();
                    start = i;
                }
                None => i += text[i..].chars().next().map_or(1, char::len_utf8),
            }
        }
        ids.extend(self.bpe(&text[start..])?);
        Ok(ids)
    }

    /// The ids of a word's tokens (no start or end token), added tokens left as text.
    pub fn word_ids(&self, word: &str) -> Result<Vec<u32>> {
        self.bpe(word)
    }

    /// `[bos, tokens..., eos]`, truncated to the maximum length; padded to it when `pad`.
    pub fn encode(&self, prompt: &str, pad: bool) -> Result<Tokens> {
        let content = self.content_ids(prompt)?;
        let room = self.max_length - 2;
        let truncated_from = (content.len() > room).then_some(content.len());
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend_from_slice(&content[..content.len().min(room)]);
        ids.push(self.eos);
        if pad {
            ids.resize(self.max_length, self.pad);
        }
        Ok(Tokens {
            ids,
            truncated_from,
        })
    }
}
