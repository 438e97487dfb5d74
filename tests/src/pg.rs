//! A throwaway PostgreSQL server for tests and benchmarks: `initdb` in a temporary
//! folder, `pg_ctl start` on a free loopback port, a `voither` database, stopped on
//! drop. Uses Debian's server binaries (`apt-get install postgresql`; scripts/test.sh
//! installs it when missing). PostgreSQL refuses to run as root: as root, the server
//! runs as the `postgres` user the package creates.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::procs::{free_tcp_port, output_within};

/// A running PostgreSQL server.
#[derive(Debug)]
pub struct Postgres {
    /// Loopback port.
    pub port: u16,
    /// `bin` folder of the server binaries.
    pub bin: PathBuf,
    root: tempfile::TempDir,
    run_as: Option<String>,
}

/// The folder with `initdb`, `pg_ctl` and `psql`: `VOITHER_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin`, else the folder of `initdb` on `PATH`.
pub fn find_bin() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("VOITHER_PG_BIN") {
        return Ok(d.into());
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p)| p.join("initdb").exists())
        .collect();
    versions.sort();
    if let Some((_, p)) = versions.pop() {
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).find(|d| d.join("initdb").exists()).ok_or_else(|| {
        "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install -y postgresql \
                        (scripts/test.sh does), or set VOITHER_PG_BIN to their folder"
            .to_owned()
    })
}

fn uid() -> u32 {
    let out = Command::new("id").arg("-u").output().expect("id -u");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("uid")
}

fn user_ids(user: &str) -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").arg(flag).arg(user).output().expect("id");
        assert!(
            out.status.success(),
            "no user {user:?}: as root, PostgreSQL runs as the `postgres` user of Debian's package"
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("id number")
    };
    (id("-u"), id("-g"))
}

impl Postgres {
    /// initdb, start, create database `voither`. Panics with the server log on failure.
    pub fn start() -> Postgres {
        let bin = find_bin().unwrap_or_else(|e| panic!("{e}"));
        let root = tempfile::Builder::new().prefix("voither-pg-").tempdir().expect("tempdir");
        let run_as = (uid() == 0).then(|| "postgres".to_owned());
        if let Some(user) = &run_as {
            use std::os::unix::fs::PermissionsExt;
            let (u, g) = user_ids(user);
            std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
            std::os::unix::fs::chown(root.path(), Some(u), Some(g)).expect("chown");
        }
        let pg = Postgres { port: free_tcp_port(), bin, root, run_as };
        let data = pg.data();
        let out = output_within(
            pg.command("initdb").arg("-D").arg(&data).args([
                "-U",
                "voither",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ]),
            Duration::from_secs(120),
        );
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        pg.start_server();
        let out = output_within(
            pg.command("createdb").args(["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "voither", "voither"]),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "createdb failed: {}", String::from_utf8_lossy(&out.stderr));
        pg
    }

    fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// The server log.
    pub fn log_path(&self) -> PathBuf {
        self.root.path().join("server.log")
    }

    fn command(&self, tool: &str) -> Command {
        let mut c = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(self.bin.join(tool));
                c
            }
            None => Command::new(self.bin.join(tool)),
        };
        c.current_dir(self.root.path()).stdin(Stdio::null());
        c
    }

    fn start_server(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.root.path().display()
        );
        let out = output_within(
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.log_path())
                .args(["-o", &opts, "-w", "-t", "60", "start"]),
            Duration::from_secs(90),
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            crate::procs::tail(&self.log_path(), 30)
        );
    }

    /// Stops the server (`-m fast`: sessions are cut, what was committed stays).
    pub fn stop(&self) {
        let out = output_within(
            self.command("pg_ctl").arg("-D").arg(self.data()).args(["-m", "fast", "-w", "stop"]),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "pg_ctl stop failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts the stopped server again on the same port and data.
    pub fn restart(&self) {
        self.start_server();
    }

    /// Connection string for `[sink] url`.
    pub fn url(&self) -> String {
        format!("host=127.0.0.1 port={} user=voither dbname=voither", self.port)
    }

    /// The `[sink]` section of a hub config using this server.
    pub fn sink_toml(&self) -> String {
        format!("[sink]\nkind = \"postgres\"\nurl = \"{}\"\npool_size = 4\n", self.url())
    }

    /// Runs one SQL statement with psql and returns its unaligned output.
    pub fn sql(&self, sql: &str) -> String {
        let out = output_within(
            self.command("psql")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "voither", "-d", "voither"])
                .args(["-v", "ON_ERROR_STOP=1", "-tA", "-c", sql]),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "psql {sql:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The temporary folder (server log and data).
    pub fn dir(&self) -> &Path {
        self.root.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
