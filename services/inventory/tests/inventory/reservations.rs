//! Reservations through the use cases, inside transactions as the command handlers run
//! them: idempotent commands, all-or-nothing lines, tombstones, expiry, and the last unit
//! wanted by many at once.

use std::time::Duration;

use keel_inventory::contract::Reserve;
use keel_inventory::domain::{Command, ReservationId, Sku, Status};
use keel_inventory::{Inventory, MIGRATIONS, Refused};
use keel_sdk::Database;
use keel_sdk::events::Bus;
use serde_json::json;

use crate::databases;

/// The inventory on `url` with `counts` on hand, and its database.
async fn stocked(url: &str, counts: &[(&str, u32)]) -> (Inventory, Database) {
    let db = Database::connect(url, &MIGRATIONS).await.unwrap();
    let inventory = Inventory::new(db.clone(), Bus::in_process("inventory"));
    for (text, on_hand) in counts {
        inventory
            .set_on_hand(&sku(text), *on_hand)
            .await
            .unwrap()
            .unwrap();
    }
    (inventory, db)
}

fn reserve(id: &str, lines: serde_json::Value, hold_seconds: Option<u32>) -> Reserve {
    serde_json::from_value(json!({
        "reservation": id,
        "lines": lines,
        "hold_seconds": hold_seconds,
    }))
    .unwrap()
}

fn sku(text: &str) -> Sku {
    text.parse().unwrap()
}

fn id(text: &str) -> ReservationId {
    text.parse().unwrap()
}

/// (on hand, reserved, available) of `sku`.
async fn counts(inventory: &Inventory, sku_text: &str) -> (u32, u32, u32) {
    let stock = inventory.stock(&sku(sku_text)).await.unwrap().unwrap();
    (stock.on_hand(), stock.reserved(), stock.available())
}

async fn do_reserve(
    inventory: &Inventory,
    db: &Database,
    command: &Reserve,
) -> Result<(), Refused> {
    let mut tx = db.begin().await.unwrap();
    let outcome = inventory.reserve(&mut tx, command).await.unwrap();
    tx.commit().await.unwrap();
    outcome
}

async fn do_apply(
    inventory: &Inventory,
    db: &Database,
    reservation: &str,
    command: Command,
) -> Result<Status, Refused> {
    let mut tx = db.begin().await.unwrap();
    let outcome = inventory
        .apply(&mut tx, &id(reservation), command)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    outcome.map(|applied| applied.status)
}

/// Reservation `order-1`: 2 TEA and 3 MUG.
fn tea_and_mugs() -> Reserve {
    reserve(
        "order-1",
        json!([{"sku": "TEA", "quantity": 2}, {"sku": "MUG", "quantity": 3}]),
        None,
    )
}

#[tokio::test]
async fn a_reservation_is_held_committed_and_returned_and_every_command_is_idempotent() {
    for database in databases().await {
        let (inventory, db) = stocked(&database.url, &[("MUG", 10), ("TEA", 5)]).await;
        let order = tea_and_mugs();
        assert_eq!(do_reserve(&inventory, &db, &order).await, Ok(()));
        assert_eq!(
            do_reserve(&inventory, &db, &order).await,
            Ok(()),
            "asked twice"
        );
        // The same id for other lines is not the same reservation.
        let other = reserve("order-1", json!([{"sku": "MUG", "quantity": 3}]), None);
        let refused = do_reserve(&inventory, &db, &other).await.unwrap_err();
        assert!(refused.0.contains("other lines"), "{refused}");
        assert_eq!(
            counts(&inventory, "MUG").await,
            (10, 3, 7),
            "{}",
            database.url
        );
        assert_eq!(counts(&inventory, "TEA").await, (5, 2, 3));

        // A stocktake cannot count below what is held.
        let below = inventory.set_on_hand(&sku("MUG"), 2).await.unwrap();
        assert!(below.is_err());
        assert_eq!(counts(&inventory, "MUG").await, (10, 3, 7));

        for _ in 0..2 {
            assert_eq!(
                do_apply(&inventory, &db, "order-1", Command::Commit).await,
                Ok(Status::Committed)
            );
        }
        assert_eq!(counts(&inventory, "MUG").await, (7, 0, 7));
        assert_eq!(counts(&inventory, "TEA").await, (3, 0, 3));
        // Sold and then undone: the units come back, once.
        for _ in 0..2 {
            assert_eq!(
                do_apply(&inventory, &db, "order-1", Command::Release).await,
                Ok(Status::Released)
            );
        }
        assert_eq!(counts(&inventory, "MUG").await, (10, 0, 10));
        assert_eq!(counts(&inventory, "TEA").await, (5, 0, 5));
        assert!(
            do_apply(&inventory, &db, "order-1", Command::Commit)
                .await
                .is_err()
        );
        let stored = inventory
            .reservation(&id("order-1"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.status, Status::Released);
        assert_eq!(stored.lines.len(), 2);
    }
}

/// A stock row gone from under a held reservation (no path of the service deletes one) is
/// stored data gone bad: the commit fails whole, rather than committing the other lines.
#[tokio::test]
async fn a_commit_missing_a_lines_stock_row_fails_whole() {
    for database in databases().await {
        let (inventory, db) = stocked(&database.url, &[("MUG", 10), ("TEA", 5)]).await;
        let order = tea_and_mugs();
        assert_eq!(do_reserve(&inventory, &db, &order).await, Ok(()));
        keel_sdk::sqlx::query("DELETE FROM stock WHERE sku = 'TEA'")
            .execute(db.pool())
            .await
            .unwrap();
        let mut tx = db.begin().await.unwrap();
        let failed = inventory
            .apply(&mut tx, &id("order-1"), Command::Commit)
            .await;
        drop(tx);
        assert!(failed.is_err(), "{}: {failed:?}", database.url);
        assert_eq!(
            counts(&inventory, "MUG").await,
            (10, 3, 7),
            "{}",
            database.url
        );
    }
}

#[tokio::test]
async fn a_reservation_is_all_or_nothing_and_a_refusal_or_an_early_release_is_final() {
    for database in databases().await {
        let (inventory, db) = stocked(&database.url, &[("MUG", 10), ("TEA", 1)]).await;

        let short = reserve(
            "order-2",
            json!([{"sku": "MUG", "quantity": 4}, {"sku": "TEA", "quantity": 2}]),
            None,
        );
        let refused = do_reserve(&inventory, &db, &short).await.unwrap_err();
        assert!(refused.0.contains("TEA"), "{refused}");
        assert_eq!(counts(&inventory, "MUG").await, (10, 0, 10), "nothing held");
        // Stock arrives; the refused reservation stays refused.
        inventory
            .set_on_hand(&sku("TEA"), 9)
            .await
            .unwrap()
            .unwrap();
        assert!(do_reserve(&inventory, &db, &short).await.is_err());
        assert_eq!(counts(&inventory, "TEA").await, (9, 0, 9));

        // A SKU never counted is out of stock.
        let unknown = reserve("order-3", json!([{"sku": "NONE", "quantity": 1}]), None);
        assert!(do_reserve(&inventory, &db, &unknown).await.is_err());

        // The release overtook its reservation (a saga's timeout): the late reservation
        // is refused, and holds nothing.
        assert_eq!(
            do_apply(&inventory, &db, "order-4", Command::Release).await,
            Ok(Status::Released)
        );
        let late = reserve("order-4", json!([{"sku": "MUG", "quantity": 1}]), None);
        assert!(do_reserve(&inventory, &db, &late).await.is_err());
        assert_eq!(counts(&inventory, "MUG").await, (10, 0, 10));
        assert!(
            do_apply(&inventory, &db, "order-5", Command::Commit)
                .await
                .is_err()
        );
    }
}

#[tokio::test]
async fn held_units_come_back_when_the_reservation_expires() {
    for database in databases().await {
        let (inventory, db) = stocked(&database.url, &[("MUG", 3)]).await;
        let brief = reserve("order-6", json!([{"sku": "MUG", "quantity": 2}]), Some(1));
        let late = reserve("order-8", json!([{"sku": "MUG", "quantity": 1}]), Some(1));
        do_reserve(&inventory, &db, &brief).await.unwrap();
        do_reserve(&inventory, &db, &late).await.unwrap();
        assert_eq!(inventory.expire_overdue().await.unwrap(), 0, "not yet");
        assert_eq!(counts(&inventory, "MUG").await, (3, 3, 0));
        tokio::time::sleep(Duration::from_millis(1200)).await;
        // Committed after its time but before the sweep: refused, and expired there.
        let refused = do_apply(&inventory, &db, "order-8", Command::Commit)
            .await
            .unwrap_err();
        assert!(refused.0.contains("expired"), "{refused}");
        assert_eq!(counts(&inventory, "MUG").await, (3, 2, 1));
        let long = reserve("order-7", json!([{"sku": "MUG", "quantity": 1}]), None);
        do_reserve(&inventory, &db, &long).await.unwrap();
        assert_eq!(inventory.expire_overdue().await.unwrap(), 1);
        assert_eq!(inventory.expire_overdue().await.unwrap(), 0, "once");
        assert_eq!(counts(&inventory, "MUG").await, (3, 1, 2));
        assert!(
            do_apply(&inventory, &db, "order-6", Command::Commit)
                .await
                .is_err()
        );
        assert_eq!(
            do_apply(&inventory, &db, "order-7", Command::Commit).await,
            Ok(Status::Committed)
        );
        assert_eq!(counts(&inventory, "MUG").await, (2, 0, 2));
    }
}

#[tokio::test]
async fn of_many_reservations_for_the_last_units_exactly_as_many_as_there_are_succeed() {
    for database in databases().await {
        let (inventory, db) = stocked(&database.url, &[("LAST", 3)]).await;
        let tasks: Vec<_> = (0..12)
            .map(|n| {
                let (inventory, db) = (inventory.clone(), db.clone());
                tokio::spawn(async move {
                    let command = reserve(
                        &format!("race-{n}"),
                        json!([{"sku": "LAST", "quantity": 1}]),
                        None,
                    );
                    do_reserve(&inventory, &db, &command).await.is_ok()
                })
            })
            .collect();
        let mut won = 0;
        for task in tasks {
            won += usize::from(task.await.unwrap());
        }
        assert_eq!(won, 3, "{}", database.url);
        assert_eq!(counts(&inventory, "LAST").await, (3, 3, 0));
    }
}

#[tokio::test]
async fn concurrent_reservations_commits_and_releases_of_shared_skus_neither_deadlock_nor_miscount()
{
    for database in databases().await {
        // Two SKUs that byte order and a natural-language collation sort differently.
        let (inventory, db) = stocked(&database.url, &[("A-B", 100), ("AB", 100)]).await;
        let tasks: Vec<_> = (0..16)
            .map(|n| {
                let (inventory, db) = (inventory.clone(), db.clone());
                tokio::spawn(async move {
                    let name = format!("mix-{n}");
                    let command = reserve(
                        &name,
                        json!([{"sku": "AB", "quantity": 1}, {"sku": "A-B", "quantity": 2}]),
                        None,
                    );
                    // Half the releases race their own reservation.
                    let early_release = {
                        let (inventory, db, name) = (inventory.clone(), db.clone(), name.clone());
                        tokio::spawn(async move {
                            if n % 2 == 0 {
                                do_apply(&inventory, &db, &name, Command::Release)
                                    .await
                                    .ok();
                            }
                        })
                    };
                    let reserved = do_reserve(&inventory, &db, &command).await.is_ok();
                    early_release.await.unwrap();
                    // The others are committed or released after.
                    let after = match n % 4 {
                        1 => Some(Command::Commit),
                        3 => Some(Command::Release),
                        _ => None,
                    };
                    if let (true, Some(command)) = (reserved, after) {
                        do_apply(&inventory, &db, &name, command).await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        // Whatever raced: nothing is left held, and exactly the committed units left.
        // (Four are committed: the odd ones reserve unopposed.)
        let mut sold = 0;
        for n in 0..16 {
            let stored = inventory
                .reservation(&id(&format!("mix-{n}")))
                .await
                .unwrap()
                .unwrap();
            assert_ne!(stored.status, Status::Held, "{n}: {stored:?}");
            sold += u32::from(stored.status == Status::Committed);
        }
        assert_eq!(sold, 4);
        let (on_hand, reserved, _) = counts(&inventory, "A-B").await;
        assert_eq!((on_hand, reserved), (100 - 2 * sold, 0), "{}", database.url);
        let (on_hand, reserved, _) = counts(&inventory, "AB").await;
        assert_eq!((on_hand, reserved), (100 - sold, 0));
    }
}
