//! The `keel` binary as a user runs it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "cli/shop.rs"]
mod shop;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use keel_jwt::testing::{AUDIENCE, TestIssuer};
use keel_testkit::TestSqlite;
use keel_testkit::tls::TestCa;

fn keel() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
    command.env("KEEL_TELEMETRY__LOG_FORMAT", "json");
    // Never the default ports: tests run beside each other and beside a running stack.
    command.env("KEEL_GATEWAY__LISTEN", "127.0.0.1:0");
    command.env("KEEL_GATEWAY__ADMIN_LISTEN", "127.0.0.1:0");
    command.env("KEEL_AUTH__LISTEN", "127.0.0.1:0");
    for service in ["CATALOG", "INVENTORY", "PAYMENTS", "ORDERS"] {
        command.env(format!("KEEL_{service}__LISTEN"), "127.0.0.1:0");
    }
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
fn up_refuses_one_port_for_two_components_naming_both() {
    let output = keel()
        .arg("up")
        .env("KEEL_AUTH__LISTEN", "127.0.0.1:18399")
        .env("KEEL_ORDERS__LISTEN", "0.0.0.0:18399")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("auth.listen (127.0.0.1:18399) and orders.listen (0.0.0.0:18399)"),
        "{stderr}"
    );
    assert!(!stderr.contains("another process"), "{stderr}");
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
fn an_unusable_worker_thread_count_is_an_error_not_a_panic() {
    let output = keel()
        .arg("config")
        .env("TOKIO_WORKER_THREADS", "many")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("TOKIO_WORKER_THREADS=\"many\""), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_configuration_error_never_prints_a_password() {
    let output = keel()
        .arg("config")
        .env("KEEL_CATALOG__BUS", "amqp://app:very-secret-pw@mq:5672/%2f")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("catalog.bus"), "{stderr}");
    assert!(!stderr.contains("very-secret"), "{stderr}");
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

/// A plain HTTP/1.1 GET (the test is synchronous): the whole answer as text.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

/// The shop's services, in the order `Up` keeps their databases.
const SHOP_SERVICES: [&str; 4] = ["catalog", "inventory", "payments", "orders"];

/// A running `keel up` and the lines it printed up to its first blank line after the
/// table (and, on a first start, after the demo credentials).
struct Up {
    child: std::process::Child,
    printed: Vec<String>,
    /// Its log lines (standard error), as they come.
    log: std::sync::mpsc::Receiver<String>,
    /// The shop's databases: catalog, inventory, payments, orders.
    _shop: Vec<TestSqlite>,
}

impl Up {
    fn start(registry: std::net::SocketAddr, database: &TestSqlite) -> Self {
        Self::start_with(registry, database, &[])
    }

    /// [`Up::start`] with more environment variables.
    fn start_with(
        registry: std::net::SocketAddr,
        database: &TestSqlite,
        env: &[(&str, &str)],
    ) -> Self {
        let shop: Vec<TestSqlite> = SHOP_SERVICES
            .iter()
            .map(|service| TestSqlite::new(&format!("keel-cli-{service}")))
            .collect();
        let mut command = keel();
        command
            .args(["up", "--replicas", "orders=2"])
            .env("KEEL_REGISTRY__LISTEN", registry.to_string())
            .env("KEEL_AUTH__DATABASE", database.url())
            .env("KEEL_CATALOG__DATABASE", shop[0].url())
            .env("KEEL_INVENTORY__DATABASE", shop[1].url())
            .env("KEEL_PAYMENTS__DATABASE", shop[2].url())
            .env("KEEL_ORDERS__DATABASE", shop[3].url())
            .envs(env.iter().copied());
        Self::spawn(command, shop)
    }

    /// Runs `command` (a `keel up`) and reads its table.
    fn spawn(mut command: Command, shop: Vec<TestSqlite>) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = log_lines(child.stderr.take().unwrap());
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut printed = Vec::new();
        let mut blanks = 0;
        for line in lines.by_ref() {
            let line = line.unwrap();
            blanks += usize::from(line.is_empty());
            printed.push(line);
            // The header's blank, the table's, and the credentials' when there are some.
            let first_start = printed.iter().any(|l| l.starts_with("First start"));
            if blanks == if first_start { 3 } else { 2 } {
                break;
            }
        }
        Self {
            child,
            printed,
            log,
            _shop: shop,
        }
    }

    /// The word after `key` on the line that starts with `prefix`.
    fn value(&self, prefix: &str, key: &str) -> String {
        let line = self
            .printed
            .iter()
            .find(|l| l.trim_start().starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line in {:?}", self.printed));
        let mut words = line.split_whitespace();
        words.find(|w| *w == key);
        words.next().unwrap().to_owned()
    }

    /// SIGTERM, then a clean exit within 10 s.
    fn stop(mut self) {
        signal(&self.child, "-TERM");
        let status = exit_within(&mut self.child, Duration::from_secs(10))
            .expect("keel up stops within 10s of SIGTERM");
        assert!(status.success(), "clean exit: {status:?}");
    }
}

/// How `child` exited, if it does within `limit` (it is killed otherwise).
fn exit_within(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if let Some(exit) = child.try_wait().unwrap() {
            return Some(exit);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn a_component_run_alone_logs_what_its_start_warns_of() {
    let database = TestSqlite::new("keel-cli-auth-alone");
    let mut child = keel()
        .arg("auth")
        .env("KEEL_AUTH__DATABASE", database.url())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let read = log_lines(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    while let Ok(line) = read.recv_timeout(Duration::from_secs(30)) {
        let listening = line.contains("listening");
        seen.push(line);
        if listening {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.iter().any(|l| l.contains("listening")), "{seen:?}");
    // Made while the server was built, before it listened.
    assert!(
        seen.iter()
            .any(|l| l.contains("generated a key encryption key")),
        "{seen:?}"
    );
}

/// `[runtime] ca_file`: the gateway fetches an `https` issuer's keys, its certificate
/// signed by a private CA, only when that CA is configured; without it tokens cannot be
/// checked (503), and the log says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_calls_trust_the_configured_ca() {
    let ca = TestCa::new();
    let issuer = TestIssuer::start_https(&ca).await;
    let dir = std::env::temp_dir().join(keel_testkit::unique_name("keel-cli-ca"));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let config = dir.join("keel.toml");
    // The route leads to the issuer's own plain port: any upstream answering will do.
    std::fs::write(
        &config,
        format!(
            r#"
[gateway.auth]
issuer = "{}"
audiences = ["{AUDIENCE}"]

[[gateway.routes]]
name = "keys"
match = {{ path_prefix = "/" }}
upstreams = ["http://{}"]
auth = {{ require = "authenticated" }}
"#,
            issuer.issuer(),
            issuer.addr()
        ),
    )
    .unwrap();
    let token = issuer.mint(serde_json::json!({}));
    let client = keel_testkit::http();

    for trusted in [true, false] {
        let mut command = keel();
        if trusted {
            command.env("KEEL_RUNTIME__CA_FILE", &ca_file);
        }
        let GatewayChild {
            child: mut gateway,
            mut log,
            lines,
            addr: listening,
        } = start_gateway(command, &config);
        let response = client
            .get(format!("http://{listening}/jwks.json"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let _ = gateway.kill();
        let _ = gateway.wait();
        log.extend(lines.iter());
        if trusted {
            assert_eq!(status, 200, "{log:?}");
        } else {
            assert_eq!(status, 503, "{log:?}");
            assert!(
                log.iter()
                    .any(|line| line.contains("signing keys unavailable")
                        && line.contains("certificate")),
                "{log:?}"
            );
        }
    }
    // The metadata was read by the trusting gateway only (the other's handshake failed).
    assert_eq!(issuer.metadata_fetch_count(), 1);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A `keel gateway` child: its JSON log lines read so far (up to "listening"), those still
/// to come, and the address it listens on.
struct GatewayChild {
    child: std::process::Child,
    log: Vec<String>,
    lines: std::sync::mpsc::Receiver<String>,
    addr: String,
}

/// Runs `command` as `keel --config <config> gateway` until it listens.
fn start_gateway(mut command: Command, config: &std::path::Path) -> GatewayChild {
    let mut child = command
        .arg("--config")
        .arg(config)
        .arg("gateway")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = log_lines(child.stderr.take().unwrap());
    let mut log = Vec::new();
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(30)) {
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        log.push(line);
        if parsed["message"] == "gateway listening"
            && let Some(addr) = parsed["addr"].as_str()
        {
            let addr = addr.to_owned();
            return GatewayChild {
                child,
                log,
                lines,
                addr,
            };
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the gateway did not listen: {log:?}");
}

fn signal(child: &std::process::Child, name: &str) {
    let sent = Command::new("kill")
        .args([name, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// An upstream that accepts connections and never answers until told to let them go: a
/// request through it holds a gateway's drain.
struct HeldUpstream {
    addr: std::net::SocketAddr,
    accepted: std::sync::mpsc::Receiver<()>,
    release: std::sync::mpsc::Sender<()>,
}

impl HeldUpstream {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, seen) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            // Until let go, or until the test drops its end.
            while matches!(
                released.try_recv(),
                Err(std::sync::mpsc::TryRecvError::Empty)
            ) {
                if let Ok((stream, _)) = listener.accept() {
                    held.push(stream);
                    let _ = accepted.send(());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self {
            addr,
            accepted: seen,
            release,
        }
    }

    /// Sends `GET /held` to the gateway at `gateway` (on a thread of its own) and waits
    /// until it reaches this upstream.
    fn hold_a_request(&self, gateway: &str) {
        let gateway = gateway.to_owned();
        std::thread::spawn(move || http_get(&gateway, "/held"));
        self.accepted
            .recv_timeout(Duration::from_secs(10))
            .expect("the request reached the upstream");
    }

    /// Closes the held connections (the gateway answers its client 502).
    fn let_go(&self) {
        let _ = self.release.send(());
    }
}

/// A directory with a `keel.toml` routing `/held` to `upstream`.
fn held_route_config(
    prefix: &str,
    upstream: &HeldUpstream,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(keel_testkit::unique_name(prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("keel.toml");
    std::fs::write(
        &config,
        format!(
            "[[gateway.routes]]\nname = \"held\"\nmatch = {{ path_prefix = \"/held\" }}\nupstreams = [\"http://{}\"]\n",
            upstream.addr
        ),
    )
    .unwrap();
    (dir, config)
}

/// The first SIGTERM waits for the drain (here a request an upstream never answers,
/// within the 10 s drain timeout); a second one ends the process at once.
#[test]
fn a_second_signal_stops_without_waiting_for_the_drain() {
    let upstream = HeldUpstream::start();
    let (dir, config) = held_route_config("keel-cli-signals", &upstream);
    let GatewayChild {
        child: mut gateway,
        mut log,
        lines,
        addr: listening,
    } = start_gateway(keel(), &config);
    upstream.hold_a_request(&listening);

    signal(&gateway, "-TERM");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        gateway.try_wait().unwrap().is_none(),
        "draining the held request"
    );
    signal(&gateway, "-TERM");
    let status = exit_within(&mut gateway, Duration::from_secs(5))
        .expect("the second signal stops it at once, not after the 10 s drain");
    assert_eq!(status.code(), Some(130));
    log.extend(lines.iter());
    assert!(
        log.iter()
            .any(|line| line.contains("second shutdown signal")),
        "{log:?}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A child's stderr, line by line, as it comes.
fn log_lines(stderr: std::process::ChildStderr) -> std::sync::mpsc::Receiver<String> {
    let (lines, read) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    read
}

#[test]
fn a_ca_file_without_a_certificate_stops_the_start() {
    let output = keel()
        .arg("config")
        .env("KEEL_RUNTIME__CA_FILE", "/nonexistent/ca.pem")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("runtime.ca_file") && stderr.contains("/nonexistent/ca.pem"),
        "{stderr}"
    );
}

/// `[runtime] client_cert` and `client_key`: both or neither, and a pair that matches;
/// anything else stops the start, saying why.
#[test]
fn a_client_certificate_without_its_key_stops_the_start() {
    let dir = std::env::temp_dir().join(keel_testkit::unique_name("keel-cli-client-cert"));
    let ca = keel_testkit::tls::TestCa::new();
    let (cert, key) = ca.client_files(&dir);
    let (_, other_key) = ca.client_files(&dir.join("other"));
    let start = |pair: &[(&str, &std::path::Path)]| {
        let mut command = keel();
        command.arg("config");
        for (name, path) in pair {
            command.env(name, path);
        }
        let output = command.output().unwrap();
        let printed = [&output.stdout[..], &output.stderr[..]].concat();
        assert!(
            !String::from_utf8_lossy(&printed).contains("PRIVATE KEY"),
            "key material printed"
        );
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stderr) = start(&[("KEEL_RUNTIME__CLIENT_CERT", &cert)]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("client_cert and client_key go together"),
        "{stderr}"
    );
    let (code, stderr) = start(&[
        ("KEEL_RUNTIME__CLIENT_CERT", &cert),
        ("KEEL_RUNTIME__CLIENT_KEY", &other_key),
    ]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("not a usable pair"), "{stderr}");
    let (code, stderr) = start(&[
        ("KEEL_RUNTIME__CLIENT_CERT", &cert),
        ("KEEL_RUNTIME__CLIENT_KEY", &key),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `keel up` stops in tiers: while the gateway drains a request it holds, the services
/// behind it still answer; once it has drained, the rest stop and the process exits.
#[test]
fn up_stops_the_gateway_before_the_services_behind_it() {
    let upstream = HeldUpstream::start();
    let (dir, config) = held_route_config("keel-cli-tiers", &upstream);
    let database = TestSqlite::new("keel-cli-tiers");
    let shop: Vec<TestSqlite> = SHOP_SERVICES
        .iter()
        .map(|service| TestSqlite::new(&format!("keel-cli-tiers-{service}")))
        .collect();
    let mut command = keel();
    command
        .arg("--config")
        .arg(&config)
        .arg("up")
        .env("KEEL_REGISTRY__LISTEN", "127.0.0.1:0")
        .env("KEEL_AUTH__DATABASE", database.url());
    for (service, database) in SHOP_SERVICES.iter().zip(&shop) {
        command.env(
            format!("KEEL_{}__DATABASE", service.to_uppercase()),
            database.url(),
        );
    }
    let mut up = Up::spawn(command, shop);
    let address = |name: &str| {
        up.value(&format!("{name} "), name)
            .trim_start_matches("http://")
            .to_owned()
    };
    let (gateway, catalog) = (address("gateway"), address("catalog"));
    upstream.hold_a_request(&gateway);

    signal(&up.child, "-TERM");
    std::thread::sleep(Duration::from_millis(500));
    assert!(up.child.try_wait().unwrap().is_none(), "the gateway drains");
    let answer = http_get(&catalog, "/health/ready");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");

    upstream.let_go();
    let status = exit_within(&mut up.child, Duration::from_secs(10))
        .expect("keel up stops once the gateway has drained");
    assert!(status.success(), "clean exit: {status:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `keel up`'s gateway follows the registry beside it: a `gateway.registry` given anyway
/// is not used, and the log says so.
#[test]
fn up_says_it_does_not_use_a_configured_gateway_registry() {
    let database = TestSqlite::new("keel-cli-up-registry");
    let up = Up::start_with(
        "127.0.0.1:0".parse().unwrap(),
        &database,
        &[("KEEL_GATEWAY__REGISTRY", "http://10.9.8.7:8500")],
    );
    let mut seen = Vec::new();
    while let Ok(line) = up.log.recv_timeout(Duration::from_secs(10)) {
        let said = line.contains("gateway.registry is not used") && line.contains("10.9.8.7");
        seen.push(line);
        if said {
            break;
        }
    }
    assert!(
        seen.iter()
            .any(|line| line.contains("gateway.registry is not used")),
        "{seen:?}"
    );
    up.stop();
}

#[test]
fn up_serves_prints_its_table_and_stops_cleanly_on_sigterm() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let database = TestSqlite::new("keel-cli-up");
    let up = Up::start(addr, &database);
    let table = &up.printed;
    assert!(
        table
            .iter()
            .any(|line| line.contains("registry") && line.contains(&addr.to_string())),
        "{table:?}"
    );
    let issuer = up.value("auth ", "issuer").trim_end_matches(',').to_owned();
    assert!(issuer.starts_with("http://127.0.0.1:"), "{table:?}");
    assert!(
        database.path.exists(),
        "the embedded profile keeps auth data in SQLite"
    );
    let mut serving = false;
    for _ in 0..50 {
        if std::net::TcpStream::connect(addr).is_ok() {
            serving = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(serving, "the registry answers on {addr}");

    // The shop's catalog registered itself: the gateway routes /catalog/… to it.
    let gateway = up
        .value("gateway ", "gateway")
        .trim_start_matches("http://")
        .to_owned();
    let mut answer = String::new();
    for _ in 0..50 {
        answer = http_get(&gateway, "/catalog/products");
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("[]"), "no products yet: {answer}");
    // `--replicas orders=2`: two instances of orders, both registered.
    let orders_rows = table
        .iter()
        .filter(|line| line.trim_start().starts_with("orders "))
        .count();
    assert_eq!(orders_rows, 2, "{table:?}");
    let mut registered = String::new();
    for _ in 0..50 {
        registered = http_get(&addr.to_string(), "/v1/services/orders");
        if registered.matches("\"port\"").count() == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(registered.matches("\"port\"").count(), 2, "{registered}");

    // First start: demo credentials, and `keel token` turns the client's into a token.
    let client = up.value("client", "client");
    let secret = up.value("client", "secret");
    assert_eq!(client, "keel-demo");
    assert_eq!(up.value("user admin", "password").len(), 22);
    let token = keel()
        .args(["token", "--client", &client, "--url", &issuer])
        .env("KEEL_CLIENT_SECRET", &secret)
        .output()
        .unwrap();
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token = String::from_utf8(token.stdout).unwrap();
    assert_eq!(token.trim().split('.').count(), 3, "a JWT: {token}");
    let refused = keel()
        .args(["token", "--client", &client, "--url", &issuer])
        .env("KEEL_CLIENT_SECRET", "wrong")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("invalid_client"));

    // The shop's tour, through the gateway with the demo client's real tokens: three
    // orders, each ending as it should, with its saga's steps.
    let demo = keel()
        .args([
            "demo",
            "--gateway",
            &format!("http://{gateway}"),
            "--auth",
            &issuer,
        ])
        .env("KEEL_CLIENT_SECRET", &secret)
        .output()
        .unwrap();
    let told = String::from_utf8_lossy(&demo.stdout);
    assert!(
        demo.status.success(),
        "{told}{}",
        String::from_utf8_lossy(&demo.stderr)
    );
    for expected in [
        "a mug, paid with a card that works (tok_visa): confirmed",
        "capture    action        done",
        "a mug, paid with a card the provider declines (tok_chargeDeclined): rejected",
        "reason: payment refused (declined: card declined)",
        "reserve    compensation  done",
        "a teapot, out of stock (tok_visa): rejected",
        "reason: out of stock (DEMO-TEAPOT: 1 wanted, 0 available)",
    ] {
        assert!(told.contains(expected), "{expected:?} in {told}");
    }
    up.stop();

    // The credentials are shown once: not on the next start.
    let again = Up::start(addr, &database);
    assert!(
        !again.printed.iter().any(|l| l.starts_with("First start")),
        "{:?}",
        again.printed
    );
    again.stop();
}

#[test]
fn auth_administers_users_roles_and_clients() {
    let database = TestSqlite::new("keel-cli-admin");
    let run = |args: &[&str], stdin: Option<&str>| {
        let mut child = keel()
            .arg("auth")
            .args(args)
            .env("KEEL_AUTH__DATABASE", database.url())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    };
    let user = run(
        &["user", "add", "bob", "--password-stdin"],
        Some("correct horse\n"),
    );
    assert!(
        user.status.success(),
        "{}",
        String::from_utf8_lossy(&user.stderr)
    );
    assert!(String::from_utf8_lossy(&user.stdout).starts_with("user bob"));
    let generated = run(&["user", "add", "carol"], None);
    assert!(String::from_utf8_lossy(&generated.stdout).contains("password "));
    let totp = run(&["user", "totp", "bob"], None);
    assert!(
        totp.status.success(),
        "{}",
        String::from_utf8_lossy(&totp.stderr)
    );
    assert!(String::from_utf8_lossy(&totp.stdout).starts_with("otpauth://totp/Keel%3Abob?secret="));
    for (args, stdin, said) in [
        (vec!["user", "disable", "bob"], None, "user bob disabled"),
        (vec!["user", "enable", "bob"], None, "user bob enabled"),
        (
            vec!["user", "password", "bob"],
            Some("another long one\n"),
            "password of bob set",
        ),
    ] {
        let output = run(&args, stdin);
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            String::from_utf8_lossy(&output.stdout).contains(said),
            "{args:?}"
        );
    }
    let role = run(&["role", "add", "editor", "--scopes", "docs:write"], None);
    assert!(
        role.status.success(),
        "{}",
        String::from_utf8_lossy(&role.stderr)
    );
    let grant = run(&["role", "grant", "editor", "--user", "bob"], None);
    assert!(
        grant.status.success(),
        "{}",
        String::from_utf8_lossy(&grant.stderr)
    );
    let client = run(
        &[
            "client",
            "add",
            "cli-app",
            "--grant",
            "client_credentials",
            "--scopes",
            "docs:read",
        ],
        None,
    );
    assert!(
        client.status.success(),
        "{}",
        String::from_utf8_lossy(&client.stderr)
    );
    let printed = String::from_utf8_lossy(&client.stdout).to_string();
    assert!(
        printed.contains("client cli-app") && printed.contains("secret "),
        "{printed}"
    );

    // Keys: a rotation publishes the next key (no server has run on this database, so
    // there is no older key to retire).
    let rotated = run(&["keys", "rotate", "--alg", "ES256"], None);
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    assert!(String::from_utf8_lossy(&rotated.stdout).starts_with("key "));

    // Mistakes are refused with a message and a non-zero exit.
    for (args, message) in [
        (
            vec!["role", "grant", "editor", "--user", "nobody"],
            "nobody",
        ),
        (vec!["user", "add", "bob", "--password-stdin"], "exists"),
        (
            vec!["client", "add", "x", "--grant", "password"],
            "unknown grant",
        ),
    ] {
        let output = run(&args, Some("another password\n"));
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

/// An event no consumer accepts, to make dead letters of.
#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct Doomed {
    id: String,
}

impl keel_sdk::Event for Doomed {
    const TYPE: &'static str = "keel.test.doomed.v1";
    fn key(&self) -> String {
        self.id.clone()
    }
}

struct Refuse;

impl keel_sdk::Handler<Doomed> for Refuse {
    async fn handle(
        &self,
        _: &mut keel_sdk::Tx,
        _: keel_sdk::Received<Doomed>,
    ) -> Result<(), keel_sdk::HandlerError> {
        Err(keel_sdk::HandlerError::reject("refused by the test"))
    }
}

#[tokio::test]
async fn dead_letters_are_listed_and_replayed_from_the_command_line() {
    use keel_sdk::events::{Bus, RabbitMqOptions};
    use keel_testkit::{Service, require, unique_name};

    if require(Service::RabbitMq) {
        let exchange = unique_name("keel-cli");
        let options = RabbitMqOptions {
            exchange: exchange.clone(),
            queue_expiry: Some(Duration::from_secs(120)),
            auto_delete_exchange: true,
            ..RabbitMqOptions::default()
        };
        let bus = Bus::rabbitmq("cli-test", options).await.unwrap();
        // The broker the test's own bus uses, whatever the environment says.
        let url = RabbitMqOptions::default().url.expose().clone();
        let args = ["--exchange", &exchange];
        dead_letters_through_the_cli(&bus, &args, &[("KEEL_RABBITMQ_URL", &url)]).await;
    }
    #[cfg(feature = "kafka")]
    if require(Service::Kafka) {
        let namespace = unique_name("keel-cli");
        let options = keel_sdk::events::KafkaOptions {
            namespace: namespace.clone(),
            fetch_wait: keel_testkit::KAFKA_FETCH_WAIT,
            ..keel_sdk::events::KafkaOptions::default()
        };
        let brokers = options.brokers.clone();
        let bus = Bus::kafka("cli-test", options).await.unwrap();
        let args = ["--exchange", &namespace, "--kafka", &brokers];
        dead_letters_through_the_cli(&bus, &args, &[]).await;
    }
}

/// A message dead-lettered on `bus`, listed and replayed by `keel events` with `args` (and
/// `env`) naming the same broker.
async fn dead_letters_through_the_cli(
    bus: &keel_sdk::events::Bus,
    args: &[&str],
    env: &[(&str, &str)],
) {
    let file = TestSqlite::new("keel-cli-events");
    let db = keel_sdk::Database::connect(&file.url(), &keel_sdk::Migrations::none())
        .await
        .unwrap();
    let group = keel_testkit::unique_name("ledger");
    let consumer = bus
        .consumer(&group, &db)
        .on::<Doomed, _>(Refuse)
        .start()
        .await
        .unwrap();
    let stats = consumer.stats();
    let shutdown = keel_runtime::Shutdown::new();
    let running = tokio::spawn(consumer.run(shutdown.clone()));
    bus.publish(&Doomed { id: "d-1".into() }).await.unwrap();
    let dead = || {
        stats
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    for _ in 0..400 {
        if dead() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(dead(), 1, "the message was dead-lettered");
    // Stopped, so that the replayed message stays on the queue to be seen there.
    shutdown.trigger();
    running.await.unwrap();

    let cli = |command: &[&str]| {
        let output = keel()
            .arg("events")
            .args(command)
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let listed = cli(&["dead-letters", "--group", &group]);
    let letter: serde_json::Value = serde_json::from_str(listed.trim()).unwrap();
    assert_eq!(letter["error"], "refused by the test");
    assert_eq!(letter["event_type"], "keel.test.doomed.v1");
    assert_eq!(cli(&["replay", "--group", &group]).trim(), "replayed 1");
    assert!(bus.dead_letters(&group, 10).await.unwrap().is_empty());
}

/// The shop on the production profile, as an operator sets it up: PostgreSQL (a database
/// per service, and the authorization server's), RabbitMQ for events and commands, etcd as
/// the registry's state when the binary has it; a client made with `keel auth`, then the
/// tour through the gateway with its real tokens.
#[test]
fn the_shop_runs_its_tour_on_the_production_profile() {
    use keel_testkit::{Service, TestDatabase, require, unique_name};
    if !require(Service::Postgres) || !require(Service::RabbitMq) {
        return;
    }
    let etcd = cfg!(feature = "etcd") && require(Service::Etcd);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // The authorization server's, then the catalog's, inventory's, payments' and orders'.
    let databases: Vec<TestDatabase> = runtime.block_on(async {
        let mut databases = Vec::new();
        for _ in 0..5 {
            databases.push(TestDatabase::create().await);
        }
        databases
    });
    let key = keel().args(["auth", "key"]).output().unwrap();
    let key = String::from_utf8(key.stdout).unwrap().trim().to_owned();
    let registry = {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        free.local_addr().unwrap()
    };
    let exchange = unique_name("keel-prod");
    let bus = format!(
        r#"bus = {{ rabbitmq = {{ exchange = "{exchange}", auto_delete_exchange = true, queue_expiry = "2m" }} }}"#
    );
    let mut toml = format!(
        "[registry]\nlisten = \"{registry}\"\nbackend = \"{}\"\n[registry.etcd]\nprefix = \"/{}/registry\"\n\
         [auth]\ndatabase = \"{}\"\nkey_encryption_key = \"{key}\"\n",
        if etcd { "etcd" } else { "memory" },
        unique_name("keel-prod"),
        databases[0].url,
    );
    for (service, database) in ["catalog", "inventory", "payments", "orders"]
        .iter()
        .zip(&databases[1..])
    {
        toml.push_str(&format!(
            "[{service}]\ndatabase = \"{}\"\n{bus}\n",
            database.url
        ));
    }
    let file = std::env::temp_dir().join(format!("{}.toml", unique_name("keel-prod")));
    std::fs::write(&file, toml).unwrap();
    let config = file.to_str().unwrap();

    // The operator's part: the shop's roles, and a client that plays both.
    let admin = |args: &[&str]| {
        let output = keel()
            .args(["--config", config, "auth"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    admin(&["role", "add", "admin"]);
    admin(&["role", "add", "customer"]);
    let added = admin(&[
        "client",
        "add",
        "shop-tour",
        "--grant",
        "client_credentials",
    ]);
    let secret = added
        .lines()
        .find_map(|line| line.strip_prefix("secret "))
        .unwrap()
        .to_owned();
    admin(&["role", "grant", "admin", "--client", "shop-tour"]);
    admin(&["role", "grant", "customer", "--client", "shop-tour"]);

    let mut command = keel();
    command.args(["--config", config, "up"]);
    let up = Up::spawn(command, Vec::new());
    let gateway = up.value("gateway ", "gateway");
    let issuer = up.value("auth ", "issuer").trim_end_matches(',').to_owned();
    // The tour waits for the services to register and be routed, then runs once.
    let demo = keel()
        .args([
            "demo",
            "--client",
            "shop-tour",
            "--gateway",
            &gateway,
            "--auth",
            &issuer,
        ])
        .env("KEEL_CLIENT_SECRET", &secret)
        .output()
        .unwrap();
    let told = format!(
        "{}{}",
        String::from_utf8_lossy(&demo.stdout),
        String::from_utf8_lossy(&demo.stderr)
    );
    assert!(demo.status.success(), "{told}");
    for expected in [
        "(tok_visa): confirmed",
        "reason: payment refused (declined: card declined)",
        "reason: out of stock (DEMO-TEAPOT: 1 wanted, 0 available)",
    ] {
        assert!(told.contains(expected), "{expected:?} in {told}");
    }
    up.stop();
    std::fs::remove_file(&file).unwrap();
    drop(databases);
}
