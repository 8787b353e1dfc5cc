//! What a reload changes: the tenants', providers' and mailboxes' ids added, removed and
//! changed, and the sections that only a restart applies.

use std::collections::BTreeMap;

use super::{Mailbox, Provider, Settings};

/// What a reload changes, by provider and mailbox id (contract §2: Vector-style diff).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConfigDiff {
    pub tenants_added: Vec<String>,
    pub tenants_removed: Vec<String>,
    pub providers_added: Vec<String>,
    pub providers_removed: Vec<String>,
    pub providers_changed: Vec<String>,
    pub mailboxes_added: Vec<String>,
    pub mailboxes_removed: Vec<String>,
    pub mailboxes_changed: Vec<String>,
    /// Sections outside the tenant files that differ: they apply at the next restart.
    pub restart_required: Vec<String>,
}

impl ConfigDiff {
    pub fn is_empty(&self) -> bool {
        *self == ConfigDiff::default()
    }
}

fn diff_by_id<'a, T: PartialEq + 'a>(
    old: impl Iterator<Item = (&'a str, &'a T)>,
    new: impl Iterator<Item = (&'a str, &'a T)>,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let old: BTreeMap<&str, &T> = old.collect();
    let new: BTreeMap<&str, &T> = new.collect();
    let added = new
        .keys()
        .filter(|k| !old.contains_key(*k))
        .map(|k| k.to_string())
        .collect();
    let removed = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .map(|k| k.to_string())
        .collect();
    let changed = new
        .iter()
        .filter(|(k, v)| old.get(*k).is_some_and(|o| o != *v))
        .map(|(k, _)| k.to_string())
        .collect();
    (added, removed, changed)
}

impl Settings {
    /// What a reload applies: the tenants (and the warnings about them) of `loaded`, every
    /// other section as it is running. Those sections were used to declare the topology and
    /// build the connections, so they change only with a restart (the diff lists them as
    /// `restart_required`) — a retry delay, say, is never used before its queue is declared.
    pub fn with_tenants_of(&self, loaded: Settings) -> Settings {
        Settings {
            tenants: loaded.tenants,
            tenants_dir: loaded.tenants_dir,
            warnings: loaded.warnings,
            ..self.clone()
        }
    }

    /// How `new` differs from `self`. Secrets take part in the comparison (a changed password
    /// restarts the connection) without ever being printed.
    pub fn diff(&self, new: &Settings) -> ConfigDiff {
        let providers = |s: &'_ Settings| -> Vec<(String, Provider)> {
            s.tenants
                .iter()
                .flat_map(|t| t.providers.iter().map(|p| (p.id.clone(), p.clone())))
                .collect()
        };
        let mailboxes = |s: &'_ Settings| -> Vec<(String, Mailbox)> {
            s.tenants
                .iter()
                .flat_map(|t| t.mailboxes.iter().map(|m| (m.id.clone(), m.clone())))
                .collect()
        };
        let (op, np) = (providers(self), providers(new));
        let (pa, pr, pc) = diff_by_id(
            op.iter().map(|(k, v)| (k.as_str(), v)),
            np.iter().map(|(k, v)| (k.as_str(), v)),
        );
        let (om, nm) = (mailboxes(self), mailboxes(new));
        let (ma, mr, mc) = diff_by_id(
            om.iter().map(|(k, v)| (k.as_str(), v)),
            nm.iter().map(|(k, v)| (k.as_str(), v)),
        );
        let ids = |s: &Settings| -> Vec<(String, ())> {
            s.tenants.iter().map(|t| (t.id.clone(), ())).collect()
        };
        let (ot, nt) = (ids(self), ids(new));
        let (ta, tr, _) = diff_by_id(
            ot.iter().map(|(k, v)| (k.as_str(), v)),
            nt.iter().map(|(k, v)| (k.as_str(), v)),
        );
        let mut restart_required = Vec::new();
        let sections: [(&str, String, String); 10] = [
            (
                "rabbitmq",
                format!(
                    "{:?}{:?}",
                    self.rabbitmq,
                    self.amqp_uri().ok().map(|u| u.to_string())
                ),
                format!(
                    "{:?}{:?}",
                    new.rabbitmq,
                    new.amqp_uri().ok().map(|u| u.to_string())
                ),
            ),
            (
                "queues",
                format!("{:?}", self.queues),
                format!("{:?}", new.queues),
            ),
            (
                "database",
                format!("{:?}{}", self.database, self.database.url.expose()),
                format!("{:?}{}", new.database, new.database.url.expose()),
            ),
            (
                "http",
                format!("{:?}{}", self.http, self.http_listen),
                format!("{:?}{}", new.http, new.http_listen),
            ),
            (
                "retry",
                format!("{:?}", self.retry),
                format!("{:?}", new.retry),
            ),
            (
                "outbound",
                format!("{:?}", self.outbound),
                format!("{:?}", new.outbound),
            ),
            (
                "attachments",
                // The link key by its hash: `Debug` shows a secret as `***`.
                format!(
                    "{:?}{}",
                    self.attachments,
                    crate::providers::Fingerprint::new()
                        .secret(self.attachments.link_key.as_ref())
                        .finish()
                ),
                format!(
                    "{:?}{}",
                    new.attachments,
                    crate::providers::Fingerprint::new()
                        .secret(new.attachments.link_key.as_ref())
                        .finish()
                ),
            ),
            (
                "inbound",
                format!("{:?}", self.inbound),
                format!("{:?}", new.inbound),
            ),
            (
                "cluster",
                format!("{:?}{}", self.cluster, self.instance_id),
                format!("{:?}{}", new.cluster, new.instance_id),
            ),
            (
                "shutdown",
                format!("{:?}", self.shutdown_grace),
                format!("{:?}", new.shutdown_grace),
            ),
        ];
        for (name, a, b) in sections {
            if a != b {
                restart_required.push(format!("[{name}]"));
            }
        }
        ConfigDiff {
            tenants_added: ta,
            tenants_removed: tr,
            providers_added: pa,
            providers_removed: pr,
            providers_changed: pc,
            mailboxes_added: ma,
            mailboxes_removed: mr,
            mailboxes_changed: mc,
            restart_required,
        }
    }
}

#[cfg(test)]
mod diff_tests {
    use super::*;

    #[test]
    fn the_diff_names_what_changed() {
        let d = std::env::temp_dir().join(format!("mb-diff-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("tenants.d")).unwrap();
        let main = d.join("m.toml");
        std::fs::write(&main, "").unwrap();
        let tenant = |pw: &str, extra: &str| {
            format!(
                "id = \"t1\"\n[[providers]]\nid = \"keep\"\nkind = \"file\"\ndir = \"x\"\n[[providers]]\nid = \"pw\"\nkind = \"smtp\"\nhost = \"h\"\nusername = \"u\"\npassword = \"{pw}\"\n{extra}"
            )
        };
        std::fs::write(
            d.join("tenants.d/t1.toml"),
            tenant(
                "one",
                "[[providers]]\nid = \"gone\"\nkind = \"file\"\ndir = \"y\"\n",
            ),
        )
        .unwrap();
        let old = Settings::load_with_env(&main, &BTreeMap::new()).unwrap();
        std::fs::write(d.join("tenants.d/t1.toml"), tenant("two", "")).unwrap();
        std::fs::write(
            d.join("tenants.d/t2.toml"),
            "id = \"t2\"\n[[providers]]\nid = \"new\"\nkind = \"file\"\ndir = \"z\"\n",
        )
        .unwrap();
        std::fs::write(&main, "[retry]\nmax_retries = 1\n").unwrap();
        let new = Settings::load_with_env(&main, &BTreeMap::new()).unwrap();
        let diff = old.diff(&new);
        assert_eq!(diff.tenants_added, ["t2"]);
        assert_eq!(diff.providers_added, ["new"]);
        assert_eq!(diff.providers_removed, ["gone"]);
        assert_eq!(
            diff.providers_changed,
            ["pw"],
            "a changed password is a change"
        );
        assert_eq!(diff.restart_required, ["[retry]"]);
        assert!(!format!("{diff:?}").contains("two"));
        assert!(old.diff(&old).is_empty());
    }
}
