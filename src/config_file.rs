//! The defaults file, `$XDG_CONFIG_HOME/blackmamba/config.toml` (else
//! `~/.config/blackmamba/config.toml`): the default of any long option, so that a machine with a
//! GPU or a favourite model needs no flags.
//!
//! ```toml
//! # top level: the options every command takes
//! device = "cuda"
//! dtype = "bf16"
//! model = "2.8b"
//! color = "never"
//! theme = "light"
//!
//! # a table per subcommand: its own long options
//! [generate]
//! temperature = 0.7
//! max-tokens = 256
//! stop = ["\n\n"]
//!
//! [bench]
//! json = true
//! ```
//!
//! Keys are long option names (dashes or underscores). A value becomes that option's default
//! (`--help` shows it as `[default: …]`), so a flag or an environment variable overrides it.
//! Values are checked as the command line checks them, when the file is read: an unknown key or a
//! bad value is a one-line error naming the file, the key and the fix.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, ColorChoice, Command};

use crate::error::{Error, Result};

/// Where the file is looked for: `$XDG_CONFIG_HOME/blackmamba/config.toml`, or under
/// `$HOME/.config` when `XDG_CONFIG_HOME` is unset or empty; `None` without either.
pub fn default_path(xdg_config_home: Option<&OsStr>, home: Option<&OsStr>) -> Option<PathBuf> {
    let base = match xdg_config_home.filter(|x| !x.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => Path::new(home.filter(|h| !h.is_empty())?).join(".config"),
    };
    Some(base.join("blackmamba").join("config.toml"))
}

/// A parsed defaults file.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    path: PathBuf,
    table: toml::Table,
}

impl ConfigFile {
    /// Reads and parses the file (its keys are checked by [`ConfigFile::apply`]).
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Parses the text of the file at `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let msg = e.message().to_string();
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            Error::bad_file(
                path,
                match line {
                    Some(l) => format!("line {l}: {msg}; fix the TOML syntax"),
                    None => format!("{msg}; fix the TOML syntax"),
                },
            )
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            table,
        })
    }

    /// The top-level `color` value, if it is a valid choice (clap colours its own messages
    /// before the command line is parsed).
    pub fn color(&self) -> Option<ColorChoice> {
        use clap::ValueEnum;
        let v = self.table.get("color")?.as_str()?;
        ColorChoice::from_str(v, false).ok()
    }

    /// `cmd` with the file's values as the defaults of its options: top-level keys on `cmd`
    /// itself (its global options included), tables on the subcommand of that name.
    pub fn apply(&self, mut cmd: Command) -> Result<Command> {
        for (key, value) in &self.table {
            if let toml::Value::Table(sub) = value {
                let Some(s) = cmd.find_subcommand(key) else {
                    let names: Vec<&str> = cmd.get_subcommands().map(Command::get_name).collect();
                    return Err(self.err(format!(
                        "[{key}]: no such command; tables are named after commands ({})",
                        names.join(", ")
                    )));
                };
                let sets = sub
                    .iter()
                    .map(|(k, v)| self.default_of(s, &format!("[{key}] {k}"), k, v))
                    .collect::<Result<Vec<_>>>()?;
                cmd = cmd.mut_subcommand(key, |s| {
                    sets.into_iter()
                        .fold(s, |s, (id, values)| s.mut_arg(id, |a| a.default_values(values)))
                });
            } else {
                let (id, values) = self.default_of(&cmd, key, key, value)?;
                cmd = cmd.mut_arg(id, |a| a.default_values(values));
            }
        }
        Ok(cmd)
    }

    fn err(&self, msg: String) -> Error {
        Error::bad_file(&self.path, msg)
    }

    /// The option of `cmd` whose long name is `key`, and `value` as its default values, checked
    /// by the option's own parser.
    fn default_of(&self, cmd: &Command, label: &str, key: &str, value: &toml::Value) -> Result<(clap::Id, Vec<String>)> {
        let long = key.replace('_', "-");
        let Some(arg) = cmd.get_arguments().find(|a| a.get_long() == Some(long.as_str())) else {
            let hint = if cmd.get_name() == "blackmamba" {
                "the top-level keys are the options of `blackmamba --help`; a command's own options go in its [table]".to_string()
            } else {
                format!(
                    "the keys of this table are the long options of `blackmamba {} --help`",
                    cmd.get_name()
                )
            };
            return Err(self.err(format!("{label}: unknown option --{long}; {hint}")));
        };
        let values = scalars(value).ok_or_else(|| {
            self.err(format!(
                "{label}: expected a string, number, true/false or a list of them, found {}",
                value.type_str()
            ))
        })?;
        let many = matches!(arg.get_action(), ArgAction::Append) || arg.get_num_args().is_some_and(|n| n.max_values() > 1);
        if values.len() != 1 && !many {
            return Err(self.err(format!("{label}: --{long} takes one value, not a list")));
        }
        for v in &values {
            check_value(arg, v).map_err(|why| self.err(format!("{label} = {value}: {why}")))?;
        }
        Ok((arg.get_id().clone(), values))
    }
}

/// A TOML value as command-line strings: scalars, or a list of scalars.
fn scalars(v: &toml::Value) -> Option<Vec<String>> {
    fn one(v: &toml::Value) -> Option<String> {
        match v {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(i) => Some(i.to_string()),
            toml::Value::Float(f) => Some(f.to_string()),
            toml::Value::Boolean(b) => Some(b.to_string()),
            _ => None,
        }
    }
    match v {
        toml::Value::Array(items) => items.iter().map(one).collect(),
        other => one(other).map(|s| vec![s]),
    }
}

/// Runs the option's own value parser on `v` (in a one-option command, as on the command line);
/// the reason (clap's first line) if it fails. Flags take only `true` / `false`.
fn check_value(arg: &Arg, v: &str) -> std::result::Result<(), String> {
    if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
        return match v {
            "true" | "false" => Ok(()),
            _ => Err("a flag takes true or false".into()),
        };
    }
    let probe = Arg::new("value")
        .long("value")
        .value_parser(arg.get_value_parser().clone())
        .action(ArgAction::Set)
        .allow_hyphen_values(true);
    match Command::new("config")
        .arg(probe)
        .try_get_matches_from(["config", &format!("--value={v}")])
    {
        Ok(_) => Ok(()),
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid value");
            let mut why = first.trim_start_matches("error: ").replace(" for '--value <value>'", "");
            let names: Vec<String> = arg.get_possible_values().iter().map(|p| p.get_name().to_string()).collect();
            if !names.is_empty() {
                why.push_str(&format!("; use one of {}", names.join(", ")));
            }
            Err(why)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_path_follows_xdg_then_home() {
        let p = default_path(Some(OsStr::new("/x")), Some(OsStr::new("/h"))).unwrap();
        assert_eq!(p, Path::new("/x/blackmamba/config.toml"));
        let p = default_path(Some(OsStr::new("")), Some(OsStr::new("/h"))).unwrap();
        assert_eq!(p, Path::new("/h/.config/blackmamba/config.toml"));
        assert_eq!(default_path(None, None), None);
    }

    #[test]
    fn syntax_errors_name_the_file_and_line() {
        let e = ConfigFile::parse("device = \"cpu\"\ndtype = \n", Path::new("/c/config.toml")).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("/c/config.toml") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn scalars_and_lists_become_strings() {
        let t: toml::Table = "a = 0.5\nb = 3\nc = true\nd = [\"x\", \"y\"]\ne = { f = 1 }".parse().unwrap();
        assert_eq!(scalars(&t["a"]).unwrap(), vec!["0.5"]);
        assert_eq!(scalars(&t["b"]).unwrap(), vec!["3"]);
        assert_eq!(scalars(&t["c"]).unwrap(), vec!["true"]);
        assert_eq!(scalars(&t["d"]).unwrap(), vec!["x", "y"]);
        assert_eq!(scalars(&t["e"]), None);
    }
}
