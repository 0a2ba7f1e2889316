//! The in-process bus of the embedded profile: a queue per consumer group in memory, the
//! same retry and dead-letter behaviour as RabbitMQ. Nothing survives the process; the
//! outbox keeps what was staged but not yet handed over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use keel_runtime::Shutdown;
use tokio::sync::mpsc;

use super::consumer::{ConsumerCore, Outcome};
use super::{BusError, DeadLetter, Outgoing};

/// Dead letters kept per group; the oldest go first beyond this.
const MAX_DEAD_LETTERS: usize = 10_000;

struct Delivery {
    payload: Arc<[u8]>,
    attempt: u32,
}

struct Group {
    sender: mpsc::UnboundedSender<Delivery>,
    /// Competing consumers of the group take turns at the one receiver.
    receiver: tokio::sync::Mutex<mpsc::UnboundedReceiver<Delivery>>,
    dead: Mutex<Vec<DeadLetter>>,
}

#[derive(Default)]
struct State {
    groups: HashMap<String, Arc<Group>>,
    /// Event type → the groups bound to it.
    bindings: HashMap<String, Vec<Arc<Group>>>,
}

#[derive(Clone, Default)]
pub(crate) struct InProcess {
    state: Arc<Mutex<State>>,
}

impl InProcess {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn group(&self, name: &str) -> Option<Arc<Group>> {
        self.state().groups.get(name).cloned()
    }

    pub fn publish(&self, batch: &[Outgoing], mandatory: bool) -> Result<(), BusError> {
        let state = self.state();
        for message in batch {
            let groups = state.bindings.get(&message.event_type);
            if mandatory && groups.is_none_or(Vec::is_empty) {
                return Err(BusError::Unroutable(message.event_type.clone()));
            }
            let payload: Arc<[u8]> = message.payload.as_slice().into();
            for group in groups.into_iter().flatten() {
                // The receiver lives as long as the group, which the state holds.
                let _ = group.sender.send(Delivery {
                    payload: payload.clone(),
                    attempt: 1,
                });
            }
        }
        Ok(())
    }

    /// Creates the group's queue when new and binds it to the consumer's event types.
    pub fn bind(&self, core: &ConsumerCore) {
        let mut state = self.state();
        let group = state
            .groups
            .entry(core.group.clone())
            .or_insert_with(|| {
                let (sender, receiver) = mpsc::unbounded_channel();
                Arc::new(Group {
                    sender,
                    receiver: tokio::sync::Mutex::new(receiver),
                    dead: Mutex::new(Vec::new()),
                })
            })
            .clone();
        for event_type in core.event_types() {
            let bound = state.bindings.entry(event_type.to_owned()).or_default();
            if !bound.iter().any(|other| Arc::ptr_eq(other, &group)) {
                bound.push(group.clone());
            }
        }
    }

    pub async fn consume(&self, core: &ConsumerCore, shutdown: Shutdown) {
        let Some(group) = self.group(&core.group) else {
            return;
        };
        loop {
            let delivery = {
                let mut receiver = tokio::select! {
                    receiver = group.receiver.lock() => receiver,
                    () = shutdown.wait() => return,
                };
                tokio::select! {
                    delivery = receiver.recv() => delivery,
                    () = shutdown.wait() => return,
                }
            };
            let Some(delivery) = delivery else { return };
            match core
                .process(&delivery.payload, delivery.attempt, &shutdown)
                .await
            {
                Outcome::Done | Outcome::Duplicate => {}
                Outcome::GiveBack => {
                    let _ = group.sender.send(delivery);
                    return;
                }
                Outcome::Retry { delay, .. } => {
                    let sender = group.sender.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = sender.send(Delivery {
                            payload: delivery.payload,
                            attempt: delivery.attempt + 1,
                        });
                    });
                }
                Outcome::Dead {
                    id,
                    event_type,
                    error,
                } => {
                    let mut dead = group.dead.lock().unwrap_or_else(PoisonError::into_inner);
                    if dead.len() >= MAX_DEAD_LETTERS {
                        dead.remove(0);
                    }
                    dead.push(DeadLetter::new(
                        &id,
                        &event_type,
                        delivery.attempt,
                        &error,
                        &delivery.payload,
                    ));
                }
            }
        }
    }

    pub fn dead_letters(&self, group: &str, limit: usize) -> Vec<DeadLetter> {
        self.group(group).map_or_else(Vec::new, |group| {
            let dead = group.dead.lock().unwrap_or_else(PoisonError::into_inner);
            dead.iter().take(limit).cloned().collect()
        })
    }

    pub fn replay(&self, group: &str, id: Option<&str>) -> usize {
        let Some(group) = self.group(group) else {
            return 0;
        };
        let mut dead = group.dead.lock().unwrap_or_else(PoisonError::into_inner);
        let (replayed, kept): (Vec<_>, Vec<_>) = dead
            .drain(..)
            .partition(|letter| id.is_none_or(|id| letter.id == id));
        *dead = kept;
        for letter in &replayed {
            let _ = group.sender.send(Delivery {
                payload: letter.payload.as_bytes().into(),
                attempt: 1,
            });
        }
        replayed.len()
    }
}
