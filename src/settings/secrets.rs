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

pub(super) fn resolve_secret(
    env: &dyn Env,
    base: &Path,
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
            key("password"),
            "give only one of `password`, `password_env` and `password_file`".into(),
        );
        return None;
    }
    if inline.is_some() {
        return inline;
    }
    if let Some(name) = from_env {
        return match env.var(name) {
            Some(v) => Some(Secret::new(v)),
            None => {
                problem(
                    key("password_env"),
                    format!("environment variable `{name}` is not set"),
                );
                None
            }
        };
    }
    if let Some(file) = from_file {
        let path = if file.is_absolute() {
            file.to_path_buf()
        } else {
            base.join(file)
        };
        return match std::fs::read_to_string(&path) {
            Ok(v) => Some(Secret::new(v.trim_end_matches(['\r', '\n']))),
            Err(e) => {
                problem(
                    key("password_file"),
                    format!("cannot read {}: {e}", path.display()),
                );
                None
            }
        };
    }
    None
}
