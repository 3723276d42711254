//! `atomtune train --config FILE.toml`: every flag of `train` as a key (`max-steps` or
//! `max_steps`), flags on the command line override the file, an unknown key is an error that
//! names it; and the run's effective configuration (every flag, defaults included) as TOML, which
//! `train` writes to `OUT/config.toml` so `--config OUT/config.toml` repeats the run.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Command};

/// The long names of `train`'s flags that a config file may set.
fn train_flags(cmd: &Command) -> Vec<(String, bool)> {
    let train = cmd.find_subcommand("train").expect("train exists");
    train
        .get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?.to_string();
            let is_switch = !a.get_action().takes_values();
            (long != "config" && long != "help").then_some((long, is_switch))
        })
        .collect()
}

/// `argv` with `train --config FILE` expanded: the file's flags first, then the command line's
/// (clap lets a later occurrence override an earlier one).
pub fn expand(argv: Vec<OsString>, cmd: &Command) -> Result<Vec<OsString>> {
    if argv.get(1).and_then(|a| a.to_str()) != Some("train") {
        return Ok(argv);
    }
    let mut path = None;
    for (i, a) in argv.iter().enumerate() {
        match a.to_str() {
            Some("--config") => path = argv.get(i + 1).cloned(),
            Some(s) if s.starts_with("--config=") => path = Some(s["--config=".len()..].into()),
            _ => {}
        }
    }
    let Some(path) = path else {
        return Ok(argv);
    };
    let file_args = read(Path::new(&path), cmd)?;
    let mut out: Vec<OsString> = argv[..2].to_vec();
    out.extend(file_args);
    out.extend(argv[2..].iter().cloned());
    Ok(out)
}

/// The flags a config file sets, as command-line arguments.
fn read(path: &Path, cmd: &Command) -> Result<Vec<OsString>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --config {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("--config {}: not valid TOML", path.display()))?;
    let flags = train_flags(cmd);
    let mut args = Vec::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let Some((_, is_switch)) = flags.iter().find(|(f, _)| *f == long) else {
            bail!(
                "--config {}: unknown key `{key}` (keys are the flags of `atomtune train`, such as max_steps)",
                path.display()
            );
        };
        let text = match &value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) if *is_switch => {
                if *b {
                    args.push(format!("--{long}").into());
                }
                continue;
            }
            toml::Value::Boolean(b) => b.to_string(),
            other => bail!(
                "--config {}: `{key}` is a {}: give a string, number or true/false",
                path.display(),
                other.type_str()
            ),
        };
        if *is_switch {
            bail!(
                "--config {}: `{key}` is a switch: give true or false",
                path.display()
            );
        }
        args.push(format!("--{long}").into());
        args.push(text.into());
    }
    Ok(args)
}

/// A TOML basic string of `s`.
fn quote(s: &str) -> String {
    let mut q = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            '\r' => q.push_str("\\r"),
            '\t' => q.push_str("\\t"),
            c if c.is_control() => q.push_str(&format!("\\u{:04X}", c as u32)),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// The effective configuration of a parsed `train` command: every flag with its value (given
/// or default), as TOML.
pub fn effective(cmd: &Command, matches: &ArgMatches) -> String {
    let Some(("train", m)) = matches.subcommand() else {
        return String::new();
    };
    let mut out = String::from("# atomtune train --config this file repeats the run\n");
    for (long, is_switch) in train_flags(cmd) {
        let id = cmd
            .find_subcommand("train")
            .and_then(|t| {
                t.get_arguments()
                    .find(|a| a.get_long() == Some(long.as_str()))
            })
            .map(|a| a.get_id().to_string())
            .unwrap_or_default();
        let key = long.replace('-', "_");
        if is_switch {
            let on = m.value_source(&id) == Some(ValueSource::CommandLine);
            out.push_str(&format!("{key} = {on}\n"));
            continue;
        }
        let Ok(Some(raw)) = m.try_get_raw(&id) else {
            continue;
        };
        let values: Vec<String> = raw.map(|v| v.to_string_lossy().into_owned()).collect();
        if let [one] = values.as_slice() {
            // numbers as numbers (read back, every value becomes its text again)
            let number = one.parse::<f64>().is_ok_and(f64::is_finite)
                && one.chars().all(|c| c.is_ascii_digit() || ".-e".contains(c));
            let v = if number { one.clone() } else { quote(one) };
            out.push_str(&format!("{key} = {v}\n"));
        }
    }
    out
}
