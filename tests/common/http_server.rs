//! The controllable HTTP server (`tests/support/http_server.py`) for attachment URLs: files,
//! slow answers, redirects, any status code, big bodies with and without a length. See that
//! script's docstring for the routes. Killed on drop.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct HttpServer {
    child: Child,
    pub port: u16,
    /// Files served under `/file/<name>` and `/slow/<s>/<name>`; holds `requests.log`.
    pub dir: PathBuf,
}

impl HttpServer {
    /// Starts the server on a free port, serving the files of `dir` (created if missing).
    pub fn start(dir: &Path) -> HttpServer {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("create the HTTP server folder {}: {e}", dir.display()));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/http_server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--port", "0", "--dir"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs the test HTTP server");
        let stdout = child.stdout.take().expect("the HTTP server's stdout");
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let port = line
            .trim()
            .strip_prefix("READY ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("the HTTP server did not start (its first line: {line:?})")
            });
        HttpServer {
            child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    /// `http://127.0.0.1:<port><path>`; `path` starts with `/`, e.g. `/file/a.pdf`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Puts a file to be served as `/file/<name>`.
    pub fn put_file(&self, name: &str, body: &[u8]) {
        std::fs::write(self.dir.join(name), body)
            .unwrap_or_else(|e| panic!("write {name} for the HTTP server: {e}"));
    }

    /// Every request line so far, in order of arrival (`GET /file/a.pdf HTTP/1.1`).
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("requests.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
