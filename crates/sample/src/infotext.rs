//! The generation parameters a PNG carries, in AUTOMATIC1111's `parameters` format, so that a
//! PNG tells how to make it again and tools that read A1111 infotext show it:
//!
//! ```text
//! a photo of sks dog on the beach
//! Negative prompt: blurry
//! Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: stable-diffusion-v1-5/stable-diffusion-v1-5, Scheduler: dpmpp-2m-karras, Deltas: "out/delta.safetensors: 1", Version: atomtune 0.1.0
//! ```
//!
//! The prompt, then `Negative prompt: ...` when there is one, then `key: value` pairs joined by
//! `, ` on the last line; a value holding `,`, `:` or a newline is JSON-quoted (as A1111's
//! `quote`). `Sampler` uses A1111's names; `Scheduler` keeps atomtune's exact one.

use std::collections::BTreeMap;

/// Generation parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Infotext {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt ("" for none).
    pub negative_prompt: String,
    /// `key: value` pairs, in order.
    pub params: Vec<(String, String)>,
}

fn quote(v: &str) -> String {
    if v.contains(',') || v.contains(':') || v.contains('\n') {
        serde_json::to_string(v).unwrap_or_else(|_| v.to_string())
    } else {
        v.to_string()
    }
}

impl Infotext {
    /// What an image made by `req` with `model` carries (every PNG atomtune writes: `sample`'s,
    /// class images, validation images): steps, sampler, CFG scale, seed, size, model,
    /// scheduler, then `extra` pairs (deltas, latents, training step...), then the version.
    pub fn of_request(
        req: &crate::Request,
        model: &str,
        extra: impl IntoIterator<Item = (String, String)>,
    ) -> Self {
        let mut params = vec![
            ("Steps".to_string(), req.steps.to_string()),
            ("Sampler".into(), req.scheduler.a1111_name().into()),
            ("CFG scale".into(), req.guidance.to_string()),
            ("Seed".into(), req.seed.to_string()),
            ("Size".into(), format!("{}x{}", req.width, req.height)),
            ("Model".into(), model.to_string()),
            ("Scheduler".into(), req.scheduler.name().into()),
        ];
        params.extend(extra);
        params.push((
            "Version".into(),
            format!("atomtune {}", env!("CARGO_PKG_VERSION")),
        ));
        Infotext {
            prompt: req.prompt.clone(),
            negative_prompt: req.negative_prompt.clone().unwrap_or_default(),
            params,
        }
    }

    /// The `parameters` text.
    pub fn render(&self) -> String {
        let mut s = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            s.push_str("\nNegative prompt: ");
            s.push_str(&self.negative_prompt);
        }
        let line: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}: {}", quote(v)))
            .collect();
        s.push('\n');
        s.push_str(&line.join(", "));
        s
    }

    /// Parses a `parameters` text: the last line holds the parameters when it parses as at least
    /// three `key: value` pairs (A1111's rule); a `Negative prompt:` line starts the negative
    /// prompt.
    pub fn parse(text: &str) -> Self {
        let lines: Vec<&str> = text.split('\n').collect();
        let (body, params) = match lines.split_last() {
            Some((last, rest)) => match parse_params(last) {
                Some(p) if p.len() >= 3 => (rest.to_vec(), p),
                _ => (lines.clone(), Vec::new()),
            },
            None => (Vec::new(), Vec::new()),
        };
        let mut prompt = Vec::new();
        let mut negative = Vec::new();
        let mut in_negative = false;
        for l in body {
            if let Some(n) = l.strip_prefix("Negative prompt: ") {
                in_negative = true;
                negative.push(n);
            } else if in_negative {
                negative.push(l);
            } else {
                prompt.push(l);
            }
        }
        Infotext {
            prompt: prompt.join("\n"),
            negative_prompt: negative.join("\n"),
            params,
        }
    }

    /// The parameters as a map (later keys win).
    pub fn map(&self) -> BTreeMap<&str, &str> {
        self.params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}

/// `key: value, key: "quoted, value", ...`; `None` when the line is not of that form.
fn parse_params(line: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let colon = rest.find(": ")?;
        let key = rest[..colon].trim();
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_alphanumeric() || " -/_".contains(c))
        {
            return None;
        }
        rest = &rest[colon + 2..];
        let value;
        if rest.starts_with('"') {
            // a JSON string: find its end, honouring escapes
            let bytes = rest.as_bytes();
            let mut i = 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            if i >= bytes.len() {
                return None;
            }
            value = serde_json::from_str::<String>(&rest[..=i]).ok()?;
            rest = rest[i + 1..].trim_start();
            rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = rest[end..].strip_prefix(',').unwrap_or("").trim_start();
        }
        out.push((key.to_string(), value));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infotext_round_trips_with_quoting() {
        let t = Infotext {
            prompt: "a photo of sks dog, on the beach".into(),
            negative_prompt: "blurry: low quality".into(),
            params: vec![
                ("Steps".into(), "30".into()),
                ("Sampler".into(), "DPM++ 2M Karras".into()),
                ("CFG scale".into(), "7.5".into()),
                ("Seed".into(), "42".into()),
                (
                    "Deltas".into(),
                    "a.safetensors: 0.8, \"b\".safetensors: 1".into(),
                ),
            ],
        };
        let text = t.render();
        assert!(
            text.contains("Deltas: \"a.safetensors: 0.8, \\\"b\\\".safetensors: 1\""),
            "{text}"
        );
        assert_eq!(Infotext::parse(&text), t);
        let plain = Infotext::parse("just a prompt");
        assert_eq!(plain.prompt, "just a prompt");
        assert!(plain.params.is_empty());
    }

    #[test]
    fn parses_a1111_text() {
        let a = "a cat <lora:detail:0.8>\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: \"detail: 0123456789ab\", Version: v1.10.1";
        let t = Infotext::parse(a);
        assert_eq!(t.prompt, "a cat <lora:detail:0.8>");
        assert_eq!(t.negative_prompt, "blurry");
        let m = t.map();
        assert_eq!(m["Sampler"], "Euler a");
        assert_eq!(m["Lora hashes"], "detail: 0123456789ab");
        assert_eq!(m["Version"], "v1.10.1");
    }
}
