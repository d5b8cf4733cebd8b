//! A real OpenSSH server and client for relay tests: own host key, own
//! client key, no PAM. Needs `openssh-server`, `openssh-client` and `socat`
//! (installed by `tests/run.sh`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct SshFixture {
    pub dir: tempfile::TempDir,
    pub client_key: PathBuf,
}

impl SshFixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let keygen = |path: &Path| {
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(path)
                .status()
                .expect(
                    "ssh-keygen could not run; install openssh-client with `bash tests/run.sh`",
                );
            assert!(st.success());
        };
        keygen(&dir.path().join("host_key"));
        let client_key = dir.path().join("id");
        keygen(&client_key);
        std::fs::copy(
            dir.path().join("id.pub"),
            dir.path().join("authorized_keys"),
        )
        .unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        SshFixture { dir, client_key }
    }

    /// Writes an sshd config listening on `listen` (`addr:port`).
    pub fn config(&self, listen: &str) -> PathBuf {
        let d = self.dir.path().display();
        let path = self
            .dir
            .path()
            .join(format!("sshd_config_{}", listen.replace([':', '.'], "_")));
        std::fs::write(
            &path,
            format!(
                "ListenAddress {listen}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
                 UsePAM no\nStrictModes no\nPermitRootLogin yes\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPidFile none\nLogLevel ERROR\nUseDNS no\n"
            ),
        )
        .unwrap();
        path
    }

    /// Starts sshd in the foreground; `prefix` runs it elsewhere (for
    /// example `ip netns exec <ns>`).
    pub fn start_sshd(&self, prefix: &[&str], listen: &str) -> Child {
        let config = self.config(listen);
        let (cmd, args) = match prefix.split_first() {
            Some((c, rest)) => (*c, rest.to_vec()),
            None => ("/usr/sbin/sshd", vec![]),
        };
        let mut c = Command::new(cmd);
        c.args(args);
        if !prefix.is_empty() {
            c.arg("/usr/sbin/sshd");
        }
        c.arg("-D").arg("-e").arg("-f").arg(&config);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        c.spawn()
            .expect("sshd could not run; install openssh-server with `bash tests/run.sh`")
    }

    /// Runs `ssh` through the CONNECT proxy on loopback port `proxy_port`
    /// (socat as ProxyCommand, Basic auth with the token as password),
    /// feeding `stdin_file` if given.
    pub fn ssh(
        &self,
        proxy_port: u16,
        token: &str,
        host: &str,
        port: u16,
        command: &str,
        stdin_file: Option<&Path>,
    ) -> Output {
        self.ssh_via(
            ("127.0.0.1", proxy_port),
            token,
            host,
            port,
            command,
            stdin_file,
        )
    }

    /// Runs `echo <word>` on `host` through the proxy at `proxy` and asserts
    /// that it worked and printed the word.
    pub fn echo_via(&self, proxy: (&str, u16), token: &str, host: &str, word: &str) {
        let o = self.ssh_via(proxy, token, host, 22, &format!("echo {word}"), None);
        assert!(
            o.status.success(),
            "ssh to {host} through {proxy:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&o.stdout), format!("{word}\n"));
    }

    /// The same through the proxy at `proxy` (host, port).
    pub fn ssh_via(
        &self,
        proxy: (&str, u16),
        token: &str,
        host: &str,
        port: u16,
        command: &str,
        stdin_file: Option<&Path>,
    ) -> Output {
        let (proxy_host, proxy_port) = proxy;
        let proxy_command = format!(
            "socat - PROXY:{proxy_host}:%h:%p,proxyport={proxy_port},proxyauth=user:{token}"
        );
        self.ssh_through(&proxy_command, &[], host, port, command, stdin_file)
    }

    /// ssh with `proxy_command` as its ProxyCommand (and `env` set for it).
    pub fn ssh_through(
        &self,
        proxy_command: &str,
        env: &[(&str, &str)],
        host: &str,
        port: u16,
        command: &str,
        stdin_file: Option<&Path>,
    ) -> Output {
        let mut c = Command::new("ssh");
        c.envs(env.iter().copied());
        c.arg("-i")
            .arg(&self.client_key)
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "ConnectTimeout=20",
                "-o",
            ])
            .arg(format!("ProxyCommand={proxy_command}"))
            .arg("-p")
            .arg(port.to_string())
            .arg(format!("root@{host}"))
            .arg(command);
        c.stdin(match stdin_file {
            Some(f) => Stdio::from(std::fs::File::open(f).unwrap()),
            None => Stdio::null(),
        });
        c.output()
            .expect("ssh could not run; install openssh-client with `bash tests/run.sh`")
    }
}

/// Waits until `addr` accepts TCP connections (run in `prefix`'s namespace
/// through the given check command), or panics.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A file of `len` random bytes and its SHA-256 (hex).
pub fn random_file(dir: &Path, len: usize) -> (PathBuf, String) {
    use std::io::Write;
    let path = dir.join("payload.bin");
    let mut f = std::fs::File::create(&path).unwrap();
    let mut x = 0x9E3779B97F4A7C15u64 ^ (std::process::id() as u64);
    let mut buf = vec![0u8; 1 << 16];
    let mut left = len;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(buf.len());
        f.write_all(&buf[..n]).unwrap();
        left -= n;
    }
    drop(f);
    (path.clone(), sha256(&path))
}

pub fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}
