//! Small operating-system helpers shared by the private servers the tests start (PostgreSQL
//! clusters, RabbitMQ nodes): who we run as, which OS user a server must run as, waiting for a
//! port, finding a port.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// An OS account from /etc/passwd.
#[derive(Debug, Clone)]
pub struct OsUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// The account called `name`, if it exists.
pub fn os_user(name: &str) -> Option<OsUser> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 6 || f[0] != name {
            return None;
        }
        Some(OsUser {
            name: name.to_string(),
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: PathBuf::from(f[5]),
        })
    })
}

/// Whether this process runs as root (the owner of /proc/self is our effective uid).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Runs `cmd` as `user` when given (set in the child itself: no su/runuser process between
/// us and the server, so the child's pid is the server's).
pub fn run_as(cmd: &mut Command, user: Option<&OsUser>) {
    use std::os::unix::process::CommandExt;
    if let Some(u) = user {
        cmd.uid(u.uid)
            .gid(u.gid)
            .env("HOME", &u.home)
            .env("USER", &u.name);
    }
}

/// Gives `path` (recursively) to `user`, when given.
pub fn chown_to(path: &Path, user: Option<&OsUser>) {
    let Some(u) = user else { return };
    std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
        .unwrap_or_else(|e| panic!("chown {} to {}: {e}", path.display(), u.name));
    if path.is_dir() && !path.is_symlink() {
        let entries =
            std::fs::read_dir(path).unwrap_or_else(|e| panic!("read_dir {}: {e}", path.display()));
        for e in entries.flatten() {
            chown_to(&e.path(), Some(u));
        }
    }
}

/// Lets other users pass through the folders above `path` that lie in the temp folder (a
/// server running as another OS user must reach its own folder there).
pub fn open_parents(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = std::env::temp_dir();
    let mut p = path.parent();
    while let Some(dir) = p {
        if !dir.starts_with(&tmp) || dir == tmp {
            break;
        }
        if let Ok(meta) = std::fs::metadata(dir) {
            let mode = meta.permissions().mode();
            if mode & 0o001 == 0 {
                let _ =
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o001));
            }
        }
        p = dir.parent();
    }
}

/// Polls until 127.0.0.1:`port` accepts a TCP connection; false when `timeout` passed first.
pub fn wait_port(port: u16, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free port that is not in the range rabbitmqctl uses for its own Erlang distribution
/// (35672–35682), so a node's port never collides with a CLI run by a parallel test.
pub fn free_port_for_erlang() -> u16 {
    loop {
        let p = super::free_port();
        if !(35672..=35682).contains(&p) {
            return p;
        }
    }
}

/// `kill -<sig> <pid>`; true when the signal was delivered.
pub fn send_signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Sends `sig` to `target` if this test process dies first (killed by a timeout or Ctrl-C,
/// when no `Drop` runs), so a private server does not outlive its test. A detached shell
/// loop checks once a second and ends by itself when `target` ends.
pub fn kill_when_we_die(target: u32, sig: &str) {
    let me = std::process::id();
    let watch = format!(
        "(while kill -0 {me} 2>/dev/null; do kill -0 {target} 2>/dev/null || exit 0; sleep 1; done; \
         kill -{sig} {target}) </dev/null >/dev/null 2>&1 &"
    );
    let _ = Command::new("sh").arg("-c").arg(watch).status();
}
