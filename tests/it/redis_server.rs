//! A `redis-server` of the test's own (Debian's package) on a free port, nothing saved, so
//! that fault tests can pause, stop or kill it without touching the shared one at 6379.
//! Stopped when dropped. Under CI a missing `redis-server` fails the test.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Child,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// With extra arguments (`--requirepass`, TLS). With `--tls-port`, `port` is the TLS port.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        RedisServer { port, child: RedisServer::spawn(port, extra) }
    }

    fn spawn(port: u16, extra: &[&str]) -> Child {
        let tls = extra.contains(&"--tls-port");
        let port_args: Vec<String> = if tls {
            vec!["--port".into(), "0".into(), "--tls-port".into(), port.to_string()]
        } else {
            vec!["--port".into(), port.to_string()]
        };
        let extra: Vec<&str> = extra.iter().copied().filter(|a| *a != "--tls-port").collect();
        let child = Command::new("redis-server")
            .args(&port_args)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--enable-debug-command", "yes"])
            .args(&extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed for the fleet rate-limit tests (apt-get install redis-server)");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// Kills the server (SIGKILL: no goodbye to its clients).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A new, empty server on the same port (after `kill`).
    pub fn restart(&mut self) {
        let fresh = RedisServer::spawn(self.port, &[]);
        self.child = fresh;
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs a command with `redis-cli` against this server.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
