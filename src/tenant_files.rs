//! Connecting accounts at run time: `PUT`/`DELETE /api/tenants/{tenant}/providers/{id}` and
//! `…/mailboxes/{id}` edit the tenant's file the way an operator would — the entry with that
//! id replaced, added or removed, every other line and comment kept — so the files stay the
//! source of truth. The supervisor validates the edited set of files exactly as a reload
//! would, writes the file atomically and reloads (`actors::supervisor::EditTenant`).

use std::path::{Path, PathBuf};

use toml_edit::{Array, ArrayOfTables, DocumentMut, InlineTable, Item, Table, Value};

/// Which list of a tenant file an entry is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Providers,
    Mailboxes,
}

impl Section {
    /// The key of the array of tables in the file (`[[providers]]`, `[[mailboxes]]`).
    pub fn key(self) -> &'static str {
        match self {
            Section::Providers => "providers",
            Section::Mailboxes => "mailboxes",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Section::Providers => "provider",
            Section::Mailboxes => "mailbox",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("the body must be a JSON object with the keys of a tenant file's [[{0}]] table")]
    NotAnObject(&'static str),
    #[error("`{0}` is null: leave the key out instead")]
    Null(String),
    #[error("the body's id `{given}` differs from the id in the path, `{path}`")]
    IdMismatch { given: String, path: String },
    #[error("tenant `{tenant}` has no {noun} `{id}`")]
    NotFound {
        tenant: String,
        noun: &'static str,
        id: String,
    },
    #[error("tenant `{0}` has no file yet, and `{0}` cannot name one: use letters, digits, `.`, `_` and `-` (at most 100, not starting with `.`), or write the file by hand")]
    BadTenantId(String),
    #[error(
        "cannot read or write {path}: {source}; check the service may write its tenants folder"
    )]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid TOML ({message}); fix the file by hand first")]
    Parse { path: String, message: String },
}

/// A tenant file's text before and after an edit.
#[derive(Debug, Clone)]
pub struct Edit {
    pub file: PathBuf,
    /// `None`: the file does not exist yet.
    pub old: Option<String>,
    pub new: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EditError + '_ {
    move |source| EditError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn parse(path: &Path, text: &str) -> Result<DocumentMut, EditError> {
    text.parse::<DocumentMut>().map_err(|e| EditError::Parse {
        path: path.display().to_string(),
        message: e.message().to_string(),
    })
}

/// The file of `tenant` in `dir` (the `*.toml` whose `id` is it) and its text, if any.
pub fn find(dir: &Path, tenant: &str) -> Result<Option<(PathBuf, String)>, EditError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        // A file that does not parse is another tenant's problem, reported by the reload.
        let Ok(doc) = text.parse::<DocumentMut>() else {
            continue;
        };
        if doc.get("id").and_then(Item::as_str) == Some(tenant) {
            return Ok(Some((path, text)));
        }
    }
    Ok(None)
}

fn valid_file_name(tenant: &str) -> bool {
    !tenant.is_empty()
        && tenant.len() <= 100
        && !tenant.starts_with('.')
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The tenant's file with the entry `id` of `section` set to `definition` (replacing the
/// entry with that id in place, else appended); a tenant without a file gets
/// `<tenant>.toml` with its id.
pub fn upsert(
    dir: &Path,
    tenant: &str,
    section: Section,
    id: &str,
    definition: &serde_json::Value,
) -> Result<Edit, EditError> {
    let serde_json::Value::Object(fields) = definition else {
        return Err(EditError::NotAnObject(section.key()));
    };
    if let Some(given) = fields.get("id") {
        if given.as_str() != Some(id) {
            return Err(EditError::IdMismatch {
                given: given.to_string().trim_matches('"').to_string(),
                path: id.to_string(),
            });
        }
    }
    let mut entry = Table::new();
    entry.insert("id", toml_edit::value(id));
    for (key, value) in fields.iter().filter(|(k, _)| k.as_str() != "id") {
        entry.insert(key, to_item(key, value)?);
    }
    let (file, old) = match find(dir, tenant)? {
        Some((file, text)) => (file, Some(text)),
        None if valid_file_name(tenant) => (dir.join(format!("{tenant}.toml")), None),
        None => return Err(EditError::BadTenantId(tenant.to_string())),
    };
    let mut doc = match &old {
        Some(text) => parse(&file, text)?,
        None => {
            let mut doc = DocumentMut::new();
            doc.insert("id", toml_edit::value(tenant));
            doc.insert("name", toml_edit::value(tenant));
            doc
        }
    };
    let list = doc
        .entry(section.key())
        .or_insert(Item::ArrayOfTables(ArrayOfTables::new()));
    let Some(list) = list.as_array_of_tables_mut() else {
        return Err(EditError::Parse {
            path: file.display().to_string(),
            message: format!("`{}` is not an array of tables", section.key()),
        });
    };
    let at = list
        .iter()
        .position(|t| t.get("id").and_then(Item::as_str) == Some(id));
    match at.and_then(|i| list.get_mut(i)) {
        Some(existing) => {
            // The comments above the entry stay with it.
            *entry.decor_mut() = existing.decor().clone();
            *existing = entry;
        }
        None => list.push(entry),
    }
    Ok(Edit {
        file,
        old,
        new: doc.to_string(),
    })
}

/// The tenant's file without the entry `id` of `section`.
pub fn remove(dir: &Path, tenant: &str, section: Section, id: &str) -> Result<Edit, EditError> {
    let not_found = || EditError::NotFound {
        tenant: tenant.to_string(),
        noun: section.noun(),
        id: id.to_string(),
    };
    let (file, text) = find(dir, tenant)?.ok_or_else(not_found)?;
    let mut doc = parse(&file, &text)?;
    let list = doc
        .get_mut(section.key())
        .and_then(Item::as_array_of_tables_mut)
        .ok_or_else(not_found)?;
    let before = list.len();
    list.retain(|t| t.get("id").and_then(Item::as_str) != Some(id));
    if list.len() == before {
        return Err(not_found());
    }
    if list.is_empty() {
        doc.remove(section.key());
    }
    Ok(Edit {
        file,
        old: Some(text),
        new: doc.to_string(),
    })
}

/// Writes the edit's new text: to a hidden temporary file in the same folder (which the
/// tenant loader ignores: not `*.toml`), then renamed over the file, so a reader sees the old
/// file or the new one, never half of it. A new file is readable by the service's group only:
/// it may hold secrets.
pub fn write(edit: &Edit) -> Result<(), EditError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = edit.file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = edit
        .file
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mode = std::fs::metadata(&edit.file)
        .map(|m| m.permissions().mode())
        .unwrap_or(0o640);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(edit.new.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &edit.file).map_err(io(&edit.file))?;
    Ok(())
}

/// A JSON value as the TOML a tenant file would hold: objects are tables (`[providers.oauth2]`),
/// arrays of objects inline tables; `null` has no TOML form.
fn to_item(key: &str, value: &serde_json::Value) -> Result<Item, EditError> {
    match value {
        serde_json::Value::Object(fields) => {
            let mut table = Table::new();
            for (k, v) in fields {
                table.insert(k, to_item(&format!("{key}.{k}"), v)?);
            }
            Ok(Item::Table(table))
        }
        other => Ok(Item::Value(to_value(key, other)?)),
    }
}

fn to_value(key: &str, value: &serde_json::Value) -> Result<Value, EditError> {
    Ok(match value {
        serde_json::Value::Null => return Err(EditError::Null(key.to_string())),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::from(i),
            None => Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => {
            let mut array = Array::new();
            for (i, item) in items.iter().enumerate() {
                array.push(to_value(&format!("{key}[{i}]"), item)?);
            }
            Value::Array(array)
        }
        serde_json::Value::Object(fields) => {
            let mut table = InlineTable::new();
            for (k, v) in fields {
                table.insert(k, to_value(&format!("{key}.{k}"), v)?);
            }
            Value::InlineTable(table)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mb-tf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn an_entry_is_replaced_in_place_and_comments_are_kept() {
        let d = dir("replace");
        let text = "# the acme tenant\nid = \"acme\"\n\n# our relay\n[[providers]]\nid = \"p1\"\nkind = \"smtp\"\nhost = \"old\"\n\n[[providers]]\nid = \"p2\"\nkind = \"file\"\ndir = \"x\"\n";
        std::fs::write(d.join("a.toml"), text).unwrap();
        let def = serde_json::json!({"kind": "smtp", "host": "new", "port": 587, "oauth2": {"kind": "google", "client_id": "c"}});
        let edit = upsert(&d, "acme", Section::Providers, "p1", &def).unwrap();
        assert_eq!(edit.file, d.join("a.toml"));
        assert!(
            edit.new.starts_with("# the acme tenant\nid = \"acme\"\n"),
            "{}",
            edit.new
        );
        assert!(
            edit.new
                .contains("# our relay\n[[providers]]\nid = \"p1\"\n"),
            "{}",
            edit.new
        );
        assert!(edit.new.contains("host = \"new\"\n") && edit.new.contains("port = 587\n"));
        assert!(edit.new.contains("[providers.oauth2]\n"), "{}", edit.new);
        assert!(!edit.new.contains("old"));
        let parsed: toml::Table = toml::from_str(&edit.new).unwrap();
        let providers = parsed["providers"].as_array().unwrap();
        assert_eq!(providers.len(), 2);
        assert_eq!(providers[0]["id"].as_str(), Some("p1"));
        assert_eq!(providers[1]["id"].as_str(), Some("p2"));

        let removed = remove(&d, "acme", Section::Providers, "p2").unwrap();
        assert!(!removed.new.contains("p2") && removed.new.contains("p1"));
        assert!(matches!(
            remove(&d, "acme", Section::Mailboxes, "m1"),
            Err(EditError::NotFound { .. })
        ));
    }

    #[test]
    fn a_tenant_without_a_file_gets_one_and_bad_bodies_are_refused() {
        let d = dir("new");
        let def = serde_json::json!({"user_id": "u", "protocol": "imap"});
        let edit = upsert(&d, "beta", Section::Mailboxes, "m1", &def).unwrap();
        assert_eq!(edit.file, d.join("beta.toml"));
        assert!(edit.old.is_none());
        write(&edit).unwrap();
        let parsed: toml::Table =
            toml::from_str(&std::fs::read_to_string(d.join("beta.toml")).unwrap()).unwrap();
        assert_eq!(parsed["id"].as_str(), Some("beta"));
        assert_eq!(parsed["mailboxes"][0]["id"].as_str(), Some("m1"));
        let refused = |tenant: &str, body: serde_json::Value| {
            upsert(&d, tenant, Section::Mailboxes, "m1", &body).unwrap_err()
        };
        assert!(matches!(
            refused("../etc", def.clone()),
            EditError::BadTenantId(_)
        ));
        assert!(matches!(
            refused("beta", serde_json::json!([1])),
            EditError::NotAnObject(_)
        ));
        assert!(matches!(
            refused("beta", serde_json::json!({"id": "m2"})),
            EditError::IdMismatch { .. }
        ));
        assert!(matches!(
            refused("beta", serde_json::json!({"host": null})),
            EditError::Null(_)
        ));
    }
}
