//! The `keel` binary as a user runs it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use keel_testkit::TestSqlite;

fn keel() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
    command.env("KEEL_TELEMETRY__LOG_FORMAT", "json");
    // Never the default ports: tests run beside each other and beside a running stack.
    command.env("KEEL_GATEWAY__LISTEN", "127.0.0.1:0");
    command.env("KEEL_GATEWAY__ADMIN_LISTEN", "127.0.0.1:0");
    command.env("KEEL_AUTH__LISTEN", "127.0.0.1:0");
    command
}

#[test]
fn up_exits_non_zero_naming_the_taken_port() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let database = TestSqlite::new("keel-cli-taken");
    let output = keel()
        .arg("up")
        .env("KEEL_REGISTRY__LISTEN", addr.to_string())
        .env("KEEL_AUTH__DATABASE", database.url())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&addr.to_string()), "{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
}

#[test]
fn a_bad_configuration_value_stops_the_start_with_key_and_value() {
    let output = keel()
        .arg("up")
        .env("KEEL_REGISTRY__SWEEP_INTERVAL", "often")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("registry.sweep_interval"), "{stderr}");
    assert!(stderr.contains("often"), "{stderr}");
    assert!(stderr.contains("KEEL_REGISTRY__SWEEP_INTERVAL"), "{stderr}");
}

#[test]
fn config_prints_the_effective_configuration_with_secrets_redacted() {
    let output = keel()
        .arg("config")
        .env("KEEL_REGISTRY__ACL_TOKEN", "very-secret")
        .env("KEEL_AUTH__KEY_ENCRYPTION_KEY", "very-secret-key")
        .env(
            "KEEL_AUTH__DATABASE",
            "postgres://keel:very-secret-pw@db/auth",
        )
        .env("KEEL_REGISTRY__LISTEN", "127.0.0.1:9500")
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("listen = \"127.0.0.1:9500\""), "{stdout}");
    assert!(stdout.contains("acl_token = \"<redacted>\""), "{stdout}");
    assert!(
        stdout.contains("key_encryption_key = \"<redacted>\""),
        "{stdout}"
    );
    assert!(!stdout.contains("very-secret"));
}

#[test]
fn auth_key_prints_a_new_key_encryption_key() {
    let keys: Vec<String> = (0..2)
        .map(|_| {
            let output = keel().args(["auth", "key"]).output().unwrap();
            assert!(output.status.success());
            String::from_utf8(output.stdout).unwrap().trim().to_owned()
        })
        .collect();
    assert_eq!(
        keys[0].len(),
        43,
        "32 bytes, unpadded base64url: {}",
        keys[0]
    );
    assert!(
        keys[0]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    assert_ne!(keys[0], keys[1]);
}

#[test]
fn up_serves_prints_its_table_and_stops_cleanly_on_sigterm() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let database = TestSqlite::new("keel-cli-up");
    let mut child = keel()
        .arg("up")
        .env("KEEL_REGISTRY__LISTEN", addr.to_string())
        .env("KEEL_AUTH__DATABASE", database.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let table: Vec<String> = lines.by_ref().take(7).map(Result::unwrap).collect();
    assert!(
        table
            .iter()
            .any(|line| line.contains("registry") && line.contains(&addr.to_string())),
        "{table:?}"
    );
    assert!(
        table
            .iter()
            .any(|line| line.trim_start().starts_with("auth ")
                && line.contains("issuer http://127.0.0.1:")),
        "{table:?}"
    );
    assert!(
        database.path.exists(),
        "the embedded profile keeps auth data in SQLite"
    );
    let mut up = false;
    for _ in 0..50 {
        if std::net::TcpStream::connect(addr).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(up, "the registry answers on {addr}");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut status = None;
    for _ in 0..100 {
        if let Some(exit) = child.try_wait().unwrap() {
            status = Some(exit);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = status.expect("keel up stops within 10s of SIGTERM");
    assert!(status.success(), "clean exit: {status:?}");
}
