//! Eureka's instance statuses and how they map to Keel's, in both directions.

use super::registration::STATUS;
use crate::model::{Instance, Status};

/// Eureka's instance statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EurekaStatus {
    Up,
    Down,
    Starting,
    OutOfService,
    Unknown,
}

impl EurekaStatus {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            EurekaStatus::Up => "UP",
            EurekaStatus::Down => "DOWN",
            EurekaStatus::Starting => "STARTING",
            EurekaStatus::OutOfService => "OUT_OF_SERVICE",
            EurekaStatus::Unknown => "UNKNOWN",
        }
    }

    /// A status by name, ignoring case; `None` for anything else.
    pub(super) fn from_name(name: &str) -> Option<Self> {
        match name.trim().to_ascii_uppercase().as_str() {
            "UP" => Some(EurekaStatus::Up),
            "DOWN" => Some(EurekaStatus::Down),
            "STARTING" => Some(EurekaStatus::Starting),
            "OUT_OF_SERVICE" => Some(EurekaStatus::OutOfService),
            "UNKNOWN" => Some(EurekaStatus::Unknown),
            _ => None,
        }
    }

    /// What a reported status means for Keel's checks:
    ///
    /// | Eureka           | Keel     | why |
    /// |------------------|----------|-----|
    /// | `UP`             | passing  | takes traffic |
    /// | `STARTING`       | warning  | alive but not ready: out of `?passing`, never evicted for it |
    /// | `UNKNOWN`        | warning  | as `STARTING`: no reason to think it dead |
    /// | `DOWN`           | critical | |
    /// | `OUT_OF_SERVICE` | critical | set by the instance itself (an operator's override is maintenance) |
    pub(super) fn keel_status(self) -> Status {
        match self {
            EurekaStatus::Up => Status::Passing,
            EurekaStatus::Starting | EurekaStatus::Unknown => Status::Warning,
            EurekaStatus::Down | EurekaStatus::OutOfService => Status::Critical,
        }
    }
}

/// The status an instance registered with through Eureka (`UP` for any other instance).
pub(super) fn registered_status(instance: &Instance) -> EurekaStatus {
    instance
        .meta
        .get(STATUS)
        .and_then(|name| EurekaStatus::from_name(name))
        .unwrap_or(EurekaStatus::Up)
}

/// How an instance reads in Eureka, and its `overriddenStatus`:
///
/// - in maintenance (a Eureka status override, or Consul's maintenance mode):
///   `OUT_OF_SERVICE`, overridden to `OUT_OF_SERVICE`;
/// - registered through Eureka with a status other than `UP` that its checks still bear out
///   (they are as healthy as that status maps to): that status, so `STARTING` reads
///   `STARTING` rather than `UP`;
/// - otherwise by its worst check: passing is `UP`, critical is `DOWN`, and warning is `UP`,
///   as Eureka has no "degraded" and a warning instance still serves.
///
/// Without an override, `overriddenStatus` is `UNKNOWN`, as Eureka writes it.
pub(super) fn eureka_status(instance: &Instance) -> (EurekaStatus, EurekaStatus) {
    if instance.maintenance().is_some() {
        return (EurekaStatus::OutOfService, EurekaStatus::OutOfService);
    }
    let registered = registered_status(instance);
    let status = if registered != EurekaStatus::Up && instance.status == registered.keel_status() {
        registered
    } else {
        match instance.status {
            Status::Passing | Status::Warning => EurekaStatus::Up,
            Status::Critical => EurekaStatus::Down,
        }
    };
    (status, EurekaStatus::Unknown)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::registration::registration;
    use super::super::registration::tests::{instance_of, spring_body};
    use super::*;
    use crate::model::{CheckSpec, CheckState, maintenance_check_id};

    #[test]
    fn statuses_read_back_as_eureka_shows_them() {
        let mut instance = instance_of(registration("orders", &spring_body()).expect("maps"));
        assert_eq!(
            eureka_status(&instance),
            (EurekaStatus::Up, EurekaStatus::Unknown)
        );
        instance.status = Status::Warning;
        assert_eq!(eureka_status(&instance).0, EurekaStatus::Up);
        instance.status = Status::Critical;
        assert_eq!(eureka_status(&instance).0, EurekaStatus::Down);

        let mut body = spring_body();
        body["instance"]["status"] = json!("STARTING");
        let mut starting = instance_of(registration("orders", &body).expect("maps"));
        assert_eq!(eureka_status(&starting).0, EurekaStatus::Starting);
        // Its lease expired: the checks no longer bear STARTING out.
        starting.status = Status::Critical;
        assert_eq!(eureka_status(&starting).0, EurekaStatus::Down);

        instance.checks.push(CheckState {
            id: maintenance_check_id(&instance.id),
            spec: CheckSpec::default(),
            status: Status::Critical,
            output: "override".into(),
        });
        assert_eq!(
            eureka_status(&instance),
            (EurekaStatus::OutOfService, EurekaStatus::OutOfService)
        );
    }
}
