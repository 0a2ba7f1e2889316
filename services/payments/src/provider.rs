//! A simulated payment provider, standing in for a card processor: every call takes the
//! configured latency, fails now and then as configured (a transient error: worth
//! retrying), and declines a configured share of authorizations.
//!
//! Test tokens behave the same every time, whatever the configuration (no latency is
//! skipped, but no failure or decline is drawn for them):
//!
//! | token | authorization |
//! |---|---|
//! | `tok_visa`, `tok_mastercard`, `tok_amex` | approved |
//! | `tok_chargeDeclined` | declined: card declined |
//! | `tok_chargeDeclinedInsufficientFunds` | declined: insufficient funds |
//! | `tok_processingError` | fails every time (the provider is down for it) |
//!
//! Any other token draws its decline from the payment's id (so one payment is always
//! answered the same) and each call's failure from a generator seeded by `seed`.

use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::{PaymentId, PaymentMethod};

/// `[payment_provider]` of the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderConfig {
    /// How long each call takes.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// The share of authorizations declined (0 to 1), for tokens that are not test tokens.
    pub decline_rate: f64,
    /// The share of calls that fail (0 to 1), for tokens that are not test tokens.
    pub failure_rate: f64,
    /// Seeds the declines, so that a run can be repeated.
    pub seed: u64,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(2),
            decline_rate: 0.0,
            failure_rate: 0.0,
            seed: 0,
        }
    }
}

impl ProviderConfig {
    /// Why the configuration cannot be used, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        for (name, rate) in [
            ("decline_rate", self.decline_rate),
            ("failure_rate", self.failure_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!(
                    "payment_provider.{name} is a share from 0 to 1, not {rate}"
                ));
            }
        }
        // The call happens inside the payment's transaction: well below the handler's
        // timeout and SQLite's busy timeout.
        if self.latency > Duration::from_secs(2) {
            return Err("payment_provider.latency is at most 2s".to_owned());
        }
        Ok(())
    }
}

/// The provider's answer to an authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Approved,
    Declined(String),
}

/// The provider did not answer (a timeout, a 5xx): try again later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the payment provider failed: {0}")]
pub struct ProviderFailure(String);

#[derive(Debug, Clone)]
pub struct Provider {
    config: ProviderConfig,
    /// Draws the failures, seeded: a run can be repeated.
    failures: Arc<Mutex<fastrand::Rng>>,
}

/// How a known test token behaves.
enum Known {
    Approves,
    Declines(&'static str),
    Fails,
}

fn known(method: &PaymentMethod) -> Option<Known> {
    Some(match method.as_str() {
        "tok_visa" | "tok_mastercard" | "tok_amex" => Known::Approves,
        "tok_chargeDeclined" => Known::Declines("card declined"),
        "tok_chargeDeclinedInsufficientFunds" => Known::Declines("insufficient funds"),
        "tok_processingError" => Known::Fails,
        _ => return None,
    })
}

impl Provider {
    pub fn new(config: ProviderConfig) -> Self {
        Self {
            failures: Arc::new(Mutex::new(fastrand::Rng::with_seed(config.seed))),
            config,
        }
    }

    /// Asks to hold payment `id`'s amount on `method`.
    pub async fn authorize(
        &self,
        id: &PaymentId,
        method: &PaymentMethod,
    ) -> Result<Decision, ProviderFailure> {
        self.call(method, "authorize").await?;
        Ok(match known(method) {
            Some(Known::Declines(reason)) => Decision::Declined(reason.to_owned()),
            Some(_) => Decision::Approved,
            None if self.draw(id) < self.config.decline_rate => {
                Decision::Declined("declined by the issuer".to_owned())
            }
            None => Decision::Approved,
        })
    }

    /// Captures, voids or refunds payment `id` (the provider knows its amount; `id` is
    /// the call's idempotency key there, so a call repeated after a lost answer does
    /// nothing twice).
    pub async fn settle(
        &self,
        id: &PaymentId,
        method: &PaymentMethod,
        what: &str,
    ) -> Result<(), ProviderFailure> {
        self.call(method, what)
            .await
            .map_err(|failure| ProviderFailure(format!("{} ({id})", failure.0)))
    }

    /// Waits the latency, then fails as configured.
    async fn call(&self, method: &PaymentMethod, what: &str) -> Result<(), ProviderFailure> {
        tokio::time::sleep(self.config.latency).await;
        let fails = match known(method) {
            Some(Known::Fails) => true,
            Some(_) => false,
            None => self
                .failures
                .lock()
                .map_or(true, |mut rng| rng.f64() < self.config.failure_rate),
        };
        if fails {
            return Err(ProviderFailure(format!("{what} timed out")));
        }
        Ok(())
    }

    /// A number in [0, 1) fixed by the seed and the payment's id.
    fn draw(&self, id: &PaymentId) -> f64 {
        let mut hasher = foldhash::fast::FixedState::with_seed(self.config.seed).build_hasher();
        hasher.write(id.as_str().as_bytes());
        // The top 53 bits, as a double's mantissa holds.
        (hasher.finish() >> 11) as f64 / (1_u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(decline_rate: f64, failure_rate: f64) -> Provider {
        Provider::new(ProviderConfig {
            latency: Duration::ZERO,
            decline_rate,
            failure_rate,
            seed: 7,
        })
    }

    fn id(n: usize) -> PaymentId {
        format!("p-{n}").parse().unwrap()
    }

    #[tokio::test]
    async fn test_tokens_answer_the_same_whatever_the_rates() {
        let always_bad = provider(1.0, 1.0);
        let visa = "tok_visa".parse().unwrap();
        assert_eq!(
            always_bad.authorize(&id(1), &visa).await,
            Ok(Decision::Approved)
        );
        assert!(always_bad.settle(&id(1), &visa, "capture").await.is_ok());
        let poor = "tok_chargeDeclinedInsufficientFunds".parse().unwrap();
        assert_eq!(
            provider(0.0, 0.0).authorize(&id(1), &poor).await,
            Ok(Decision::Declined("insufficient funds".into()))
        );
        let broken = "tok_processingError".parse().unwrap();
        assert!(provider(0.0, 0.0).authorize(&id(1), &broken).await.is_err());
    }

    #[tokio::test]
    async fn other_tokens_are_declined_and_fail_at_about_the_configured_rates() {
        let chance: PaymentMethod = "tok_chance".parse().unwrap();
        let provider = provider(0.3, 0.2);
        let (mut declined, mut failed) = (0, 0);
        for n in 0..2000 {
            match provider.authorize(&id(n), &chance).await {
                Ok(Decision::Declined(_)) => declined += 1,
                Ok(Decision::Approved) => {}
                Err(_) => failed += 1,
            }
        }
        // Declines are drawn from the 80 % that did not fail.
        assert!((350..=610).contains(&declined), "{declined}");
        assert!((300..=500).contains(&failed), "{failed}");
        // One payment is always answered the same.
        let calm = super::Provider::new(ProviderConfig {
            latency: Duration::ZERO,
            decline_rate: 0.5,
            failure_rate: 0.0,
            seed: 7,
        });
        for n in 0..50 {
            let first = calm.authorize(&id(n), &chance).await;
            assert_eq!(calm.authorize(&id(n), &chance).await, first);
        }
    }

    #[test]
    fn rates_outside_zero_to_one_are_refused() {
        for (decline_rate, failure_rate) in [(-0.1, 0.0), (0.0, 1.5), (f64::NAN, 0.0)] {
            let config = ProviderConfig {
                decline_rate,
                failure_rate,
                ..ProviderConfig::default()
            };
            assert!(config.check().is_err());
        }
        assert!(ProviderConfig::default().check().is_ok());
    }
}
