//! Keel's load harnesses (one binary per component under `src/bin/`) and what they share:
//! process figures from `/proc`, latency percentiles, a reader for Prometheus text and
//! PostgreSQL URLs.
//!
//! Results are recorded in `bench/README.md` with the date and the command; nothing here
//! asserts timings in tests.

pub mod procfs;
pub mod prometheus;
pub mod stats;

/// The URL of `database` on the PostgreSQL at `postgres` (user postgres, trust
/// authentication): host:port, where a host starting with `/` is the directory of the
/// server's Unix socket (`/var/run/postgresql:5432`), as a harness's `--postgres` takes it.
pub fn postgres_url(postgres: &str, database: &str) -> String {
    match postgres.split_once(':') {
        Some((socket, port)) if socket.starts_with('/') => {
            format!("postgres://postgres@localhost:{port}/{database}?host={socket}")
        }
        _ => format!("postgres://postgres@{postgres}/{database}"),
    }
}

#[cfg(test)]
mod tests {
    use super::postgres_url;

    #[test]
    fn a_host_starting_with_a_slash_is_a_socket_directory() {
        assert_eq!(
            postgres_url("127.0.0.1:5432", "shop"),
            "postgres://postgres@127.0.0.1:5432/shop"
        );
        assert_eq!(
            postgres_url("/var/run/postgresql:5433", "shop"),
            "postgres://postgres@localhost:5433/shop?host=/var/run/postgresql"
        );
    }
}
