//! Secrets: given inline, by an environment variable or by a file, and kept in a type that
//! never prints them.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Deserializer};

use super::Env;

/// A secret value: compared and used, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself, for the one place that must hand it to a server.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// A secret given as `<name>` (inline), `<name>_env` (an environment variable) or
/// `<name>_file` (a file, relative to `base`): at most one of them. Problems go to `problem`
/// under the key `key` makes of `<name>`, `<name>_env` or `<name>_file`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn resolve_secret(
    env: &dyn Env,
    base: &Path,
    name: &str,
    inline: Option<Secret>,
    from_env: Option<&str>,
    from_file: Option<&Path>,
    key: &dyn Fn(&str) -> String,
    problem: &mut dyn FnMut(String, String),
) -> Option<Secret> {
    let given = [inline.is_some(), from_env.is_some(), from_file.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    if given > 1 {
        problem(
            key(name),
            format!("give only one of `{name}`, `{name}_env` and `{name}_file`"),
        );
        return None;
    }
    if inline.is_some() {
        return inline;
    }
    if let Some(var) = from_env {
        return match env.var(var) {
            Some(v) => Some(Secret::new(v)),
            None => {
                problem(
                    key(&format!("{name}_env")),
                    format!("environment variable `{var}` is not set"),
                );
                None
            }
        };
    }
    if let Some(file) = from_file {
        let path = super::resolve_path(base, file);
        return match std::fs::read_to_string(&path) {
            Ok(v) => Some(Secret::new(v.trim_end_matches(['\r', '\n']))),
            Err(e) => {
                problem(
                    key(&format!("{name}_file")),
                    format!("cannot read {}: {e}", path.display()),
                );
                None
            }
        };
    }
    None
}
