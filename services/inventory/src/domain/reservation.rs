//! Reservations: units of several SKUs set aside for one order until they are committed
//! (sold), released, or expire. Every command is idempotent, keyed by the reservation's
//! id, and a release that comes before its reservation leaves a tombstone so that the
//! late reservation is refused instead of holding stock forever.

use std::collections::BTreeSet;

use keel_shop_kernel::{Quantity, Sku};

/// A reservation's id: the business key its commands name (an order's id).
pub use keel_shop_kernel::Reference as ReservationId;
use serde::{Deserialize, Serialize};

use super::stock::Effect;

/// Most lines in one reservation.
pub const MAX_LINES: usize = 50;

/// One SKU of a reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Line {
    pub sku: Sku,
    pub quantity: Quantity,
}

/// The lines of a reservation: 1 to [`MAX_LINES`], each SKU once, in SKU order (so that a
/// repeated command compares equal line by line, however its lines were listed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct Lines(#[schemars(length(min = 1, max = 50))] Vec<Line>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinesError {
    #[error("a reservation has 1 to {MAX_LINES} lines")]
    Count,
    #[error("{0} appears on more than one line")]
    Repeated(Sku),
}

impl Lines {
    pub fn new(mut lines: Vec<Line>) -> Result<Self, LinesError> {
        if !(1..=MAX_LINES).contains(&lines.len()) {
            return Err(LinesError::Count);
        }
        lines.sort_by(|a, b| a.sku.cmp(&b.sku));
        let mut seen = BTreeSet::new();
        if let Some(line) = lines.iter().find(|line| !seen.insert(&line.sku)) {
            return Err(LinesError::Repeated(line.sku.clone()));
        }
        Ok(Self(lines))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Line> {
        self.0.iter()
    }

    pub fn as_slice(&self) -> &[Line] {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Lines {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::new(Vec::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

/// Where a reservation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Units set aside.
    Held,
    /// Sold: the units left the stock.
    Committed,
    /// Given back (or released before it was ever made: a tombstone without lines).
    Released,
    /// Refused when asked for (not enough stock): closed, without lines.
    Refused,
    /// Not committed in time: its units became available again.
    Expired,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Held => "held",
            Self::Committed => "committed",
            Self::Released => "released",
            Self::Expired => "expired",
            Self::Refused => "refused",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "held" => Self::Held,
            "committed" => Self::Committed,
            "released" => Self::Released,
            "expired" => Self::Expired,
            "refused" => Self::Refused,
            _ => return None,
        })
    }
}

/// What can be asked of an existing reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Commit,
    Release,
    Expire,
}

/// Why a command cannot be done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("the reservation was {}: it cannot be committed", .0.as_str())]
    NotHeld(Status),
}

/// What a command does to a reservation in `status`: its next status and what happens to
/// the stock of its lines (none for a command already done: every command is idempotent).
pub fn transition(
    status: Status,
    command: Command,
) -> Result<(Status, Option<Effect>), TransitionError> {
    use {Command::*, Status::*};
    Ok(match (status, command) {
        (Held, Commit) => (Committed, Some(Effect::Deduct)),
        (Held, Release) => (Released, Some(Effect::Unreserve)),
        (Held, Expire) => (Expired, Some(Effect::Unreserve)),
        (Committed, Commit) => (Committed, None),
        // Sold units given back: the order that bought them was undone after all.
        (Committed, Release) => (Released, Some(Effect::Restock)),
        (Released | Expired | Refused, Release) => (status, None),
        (Committed | Released | Expired | Refused, Expire) => (status, None),
        (Released | Expired | Refused, Commit) => return Err(TransitionError::NotHeld(status)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(sku: &str, quantity: i64) -> Line {
        Line {
            sku: sku.parse().unwrap(),
            quantity: Quantity::new(quantity).unwrap(),
        }
    }

    #[test]
    fn lines_are_sorted_distinct_and_bounded() {
        let lines = Lines::new(vec![line("B", 1), line("A", 2)]).unwrap();
        let skus: Vec<&str> = lines.iter().map(|l| l.sku.as_str()).collect();
        assert_eq!(skus, ["A", "B"]);
        assert_eq!(Lines::new(vec![]), Err(LinesError::Count));
        assert_eq!(
            Lines::new(vec![line("A", 1), line("A", 2)]),
            Err(LinesError::Repeated("A".parse().unwrap()))
        );
        let many = (0..=MAX_LINES).map(|i| line(&format!("S{i}"), 1)).collect();
        assert_eq!(Lines::new(many), Err(LinesError::Count));
        assert!(serde_json::from_str::<Lines>(r#"[{"sku":"A","quantity":0}]"#).is_err());
        assert!(serde_json::from_str::<Lines>(r#"[{"sku":"A","quantity":1,"price":3}]"#).is_err());
    }

    #[test]
    fn commands_are_idempotent_and_a_released_reservation_is_never_committed() {
        use Command::*;
        use Status::*;
        for status in [Held, Committed, Released, Expired, Refused] {
            for command in [Commit, Release, Expire] {
                let Ok((next, _)) = transition(status, command) else {
                    continue;
                };
                // The same command again changes nothing more.
                assert_eq!(
                    transition(next, command),
                    Ok((next, None)),
                    "{status:?} {command:?}"
                );
            }
        }
        assert!(transition(Released, Commit).is_err());
        assert!(transition(Expired, Commit).is_err());
        assert_eq!(transition(Refused, Release), Ok((Refused, None)));
        assert_eq!(transition(Committed, Expire), Ok((Committed, None)));
    }
}
