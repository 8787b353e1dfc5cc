//! A private PostgreSQL cluster for one test: its own data folder, port and socket folder, so a
//! test can stop, restart or TLS-restrict *its* database server without touching the shared
//! system PostgreSQL (127.0.0.1:5432) or clusters of tests running beside it.
//!
//! `initdb` runs with the highest PostgreSQL installed under `/usr/lib/postgresql/<version>/bin`
//! (Debian's layout; elsewhere the `initdb` on PATH). As root, every PostgreSQL program runs as
//! the `postgres` OS user (initdb and postgres refuse root), set in the child process itself.
//! Durability is switched off (`fsync`, `synchronous_commit`, `full_page_writes`) for speed:
//! a test cluster never survives a machine crash anyway. initdb runs once per version (a
//! template in the temp folder that each cluster copies); start-up then takes ~0.3–0.6 s, the
//! first one ~1–3 s.

use super::sys::{self, OsUser};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

/// The bootstrap superuser of every cluster (trust authentication: no password).
pub const PG_SUPERUSER: &str = "postgres";

/// A private PostgreSQL cluster; see the module docs. Stopped (immediate) and deleted on drop.
pub struct PgCluster {
    /// The cluster's folder: `data/`, `sock/` (the unix socket), `tls/`, `postgres.log`.
    pub dir: PathBuf,
    pub data: PathBuf,
    /// 127.0.0.1 port, the same across stops and starts.
    pub port: u16,
    /// Whether `ssl = on`.
    pub tls: bool,
    /// Whether plain TCP connections are rejected (`hostnossl ... reject`).
    pub tls_only: bool,
    bin: PathBuf,
    owner: Option<OsUser>,
}

impl PgCluster {
    /// A new cluster in `dir` (emptied first). With `tls` (server certificate and key, PEM),
    /// `ssl = on` and both TLS and plain connections are accepted.
    pub fn start(dir: &Path, tls: Option<(&Path, &Path)>) -> PgCluster {
        Self::create(dir, tls, false)
    }

    /// Like [`PgCluster::start`] with TLS, but a plain (non-TLS) TCP connection is refused
    /// (`hostnossl all all 127.0.0.1/32 reject`): a client that connects really used TLS.
    pub fn start_tls_only(dir: &Path, cert: &Path, key: &Path) -> PgCluster {
        Self::create(dir, Some((cert, key)), true)
    }

    fn create(dir: &Path, tls: Option<(&Path, &Path)>, tls_only: bool) -> PgCluster {
        let started = Instant::now();
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("sock"))
            .unwrap_or_else(|e| panic!("create the cluster folder {}: {e}", dir.display()));
        let owner = if sys::is_root() {
            Some(sys::os_user("postgres").expect(
                "running as root, PostgreSQL must run as the OS user postgres, which is missing",
            ))
        } else {
            None
        };
        let mut pg = PgCluster {
            dir: dir.to_path_buf(),
            data: dir.join("data"),
            port: 0,
            tls: tls.is_some(),
            tls_only,
            bin: pg_bin_dir(),
            owner,
        };
        if let Some((cert, key)) = tls {
            let tls_dir = dir.join("tls");
            std::fs::create_dir_all(&tls_dir).expect("create the cluster's tls folder");
            std::fs::copy(cert, tls_dir.join("server.pem"))
                .unwrap_or_else(|e| panic!("copy {}: {e}", cert.display()));
            std::fs::copy(key, tls_dir.join("server.key"))
                .unwrap_or_else(|e| panic!("copy {}: {e}", key.display()));
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                tls_dir.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .expect("chmod 600 the server key (PostgreSQL refuses a key others can read)");
        }
        sys::open_parents(dir);
        sys::chown_to(dir, pg.owner.as_ref());

        let template = pg.template();
        let out = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(&pg.data)
            .output()
            .expect("run cp");
        assert!(
            out.status.success(),
            "copy the initdb template {} to {}: {}",
            template.display(),
            pg.data.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        pg.write_hba();

        // A free port can be taken by someone else before the server binds it: try others.
        let mut last_log = String::new();
        for _ in 0..3 {
            pg.port = super::free_port();
            pg.write_conf();
            if pg.try_start() {
                return pg;
            }
            last_log = pg.log_text();
            if !last_log.contains("could not bind") && !last_log.contains("could not create") {
                break;
            }
        }
        panic!(
            "the PostgreSQL cluster in {} did not start within {:?}:\n{last_log}",
            dir.display(),
            started.elapsed()
        );
    }

    /// A freshly initdb'ed data folder to copy, made once per PostgreSQL version and owner
    /// in the temp folder (`mbtest-pgtemplate-*`, which `scripts/test.sh` clears at each
    /// run), shared by all test processes: a copy takes ~0.1 s, initdb ~1–3 s on 2 busy cores.
    fn template(&self) -> PathBuf {
        let version = self
            .bin
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "path".into());
        let uid = self.owner.as_ref().map(|u| u.uid).unwrap_or(0);
        let template = std::env::temp_dir().join(format!("mbtest-pgtemplate-{version}-{uid}"));
        if template.join("PG_VERSION").exists() {
            return template;
        }
        // Built beside it and renamed into place, so a reader never sees half a template;
        // when another test won the race, its template is used and ours removed.
        let building = std::env::temp_dir().join(format!(
            "mbtest-pgtemplate-{version}-{uid}.{}",
            super::unique("building")
        ));
        let out = self
            .command("initdb")
            .current_dir(std::env::temp_dir())
            .arg("-D")
            .arg(&building)
            .args(["-U", PG_SUPERUSER, "-A", "trust", "-E", "UTF8"])
            .args(["--locale=C.UTF-8", "--no-sync", "--no-instructions"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb in {} failed: {}{}",
            building.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if std::fs::rename(&building, &template).is_err() {
            let _ = std::fs::remove_dir_all(&building);
            assert!(
                template.join("PG_VERSION").exists(),
                "the initdb template {} is missing",
                template.display()
            );
        }
        template
    }

    /// A PostgreSQL program from the cluster's version, run as the cluster's owner.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.current_dir(&self.dir)
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST")
            .env_remove("PGUSER")
            .stdin(Stdio::null());
        sys::run_as(&mut cmd, self.owner.as_ref());
        cmd
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        self.command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(args)
            .output()
            .expect("run pg_ctl")
    }

    fn write_conf(&self) {
        let mut conf = format!(
            "\n# mailbridge test cluster\nlisten_addresses = '127.0.0.1'\nport = {port}\n\
             unix_socket_directories = '{sock}'\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\nshared_buffers = 16MB\nmax_connections = 100\n\
             dynamic_shared_memory_type = posix\nlogging_collector = off\n",
            port = self.port,
            sock = self.dir.join("sock").display(),
        );
        if self.tls {
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                self.dir.join("tls/server.pem").display(),
                self.dir.join("tls/server.key").display()
            ));
        }
        // The settings go to a file of their own, included last, so a rewrite (other port)
        // replaces them instead of appending twice.
        let conf_path = self.data.join("postgresql.conf");
        let base = std::fs::read_to_string(&conf_path).expect("read postgresql.conf");
        if !base.contains("include = 'mbtest.conf'") {
            std::fs::write(&conf_path, format!("{base}\ninclude = 'mbtest.conf'\n"))
                .expect("write postgresql.conf");
        }
        std::fs::write(self.data.join("mbtest.conf"), conf).expect("write mbtest.conf");
    }

    fn write_hba(&self) {
        let tcp = if self.tls_only {
            "hostnossl all all 127.0.0.1/32 reject\nhostssl all all 127.0.0.1/32 trust\n"
        } else {
            "host all all 127.0.0.1/32 trust\n"
        };
        std::fs::write(
            self.data.join("pg_hba.conf"),
            format!("local all all trust\n{tcp}"),
        )
        .expect("write pg_hba.conf");
    }

    fn try_start(&self) -> bool {
        let log = self.dir.join("postgres.log");
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "30", "-s", "start"])
            .output()
            .expect("run pg_ctl start");
        if !out.status.success() {
            return false;
        }
        // Immediate shutdown (SIGQUIT to the postmaster) if the test process dies undropped.
        let pid = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()));
        if let Some(pid) = pid {
            sys::kill_when_we_die(pid, "QUIT");
        }
        true
    }

    /// The server URL without a database name, for tokio-postgres or the service's
    /// `[database] url` (append `/<db>`). The superuser `postgres` needs no password.
    pub fn server_url(&self) -> String {
        format!("postgres://{PG_SUPERUSER}@127.0.0.1:{}", self.port)
    }

    /// `server_url()` with `/db`.
    pub fn url(&self, db: &str) -> String {
        format!("{}/{db}", self.server_url())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the stopped cluster again: same port, same data.
    pub fn start_again(&self) {
        assert!(
            self.try_start(),
            "the PostgreSQL cluster in {} did not start again:\n{}",
            self.dir.display(),
            self.log_text()
        );
    }

    /// `pg_ctl stop -m fast` and waits: sessions are ended, a checkpoint is written.
    pub fn stop_fast(&self) {
        let out = self.pg_ctl(&["-w", "-t", "30", "-s", "-m", "fast", "stop"]);
        assert!(
            out.status.success(),
            "pg_ctl stop -m fast in {}: {}",
            self.dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl stop -m immediate`: like a crash (no checkpoint; recovery at the next start).
    pub fn stop_immediate(&self) {
        let out = self.pg_ctl(&["-w", "-t", "30", "-s", "-m", "immediate", "stop"]);
        assert!(
            out.status.success(),
            "pg_ctl stop -m immediate in {}: {}",
            self.dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `stop_fast` then `start_again`.
    pub fn restart_fast(&self) {
        self.stop_fast();
        self.start_again();
    }

    /// Whether the postmaster runs (`pg_ctl status`).
    pub fn is_running(&self) -> bool {
        self.pg_ctl(&["status"]).status.success()
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// Runs `sql` with psql on `conninfo` (a URL or `key=value` string); stdout (`-At`) or
    /// stderr as the error.
    pub fn psql(conninfo: &str, sql: &str) -> Result<String, String> {
        let out = Command::new("psql")
            .arg(conninfo)
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .env_remove("PGSSLMODE")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            let _ = self.pg_ctl(&["-w", "-t", "10", "-s", "-m", "immediate", "stop"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Debian's `/usr/lib/postgresql/<highest version>/bin`, else the folder of `initdb` on PATH.
fn pg_bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").exists().then_some((v, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .find(|p| p.join("initdb").exists())
        .expect("PostgreSQL's initdb: neither /usr/lib/postgresql/<version>/bin nor PATH has it")
}
