//! Orders placed over HTTP and carried out by the saga: confirmed, declined, out of
//! stock, payments away, idempotency keys, the last unit wanted twice, and who sees what.

use std::time::Duration;

use serde_json::{Value, json};

use crate::{Shop, shops, shops_with};

fn order(lines: Value, method: &str) -> Value {
    json!({"lines": lines, "payment_method": method})
}

#[tokio::test]
async fn an_order_is_confirmed_declined_or_out_of_stock_and_undone_work_is_undone() {
    for shop in shops(false, Duration::from_secs(10)).await {
        // Confirmed: the stock is sold and the payment captured.
        let (status, placed) = shop
            .place(
                &shop.ada,
                None,
                order(json!([{"sku": "MUG", "quantity": 2}]), "tok_visa"),
            )
            .await;
        assert_eq!(status, 202, "{placed} {}", shop.backend);
        assert_eq!(placed["status"], "pending");
        assert_eq!(placed["total"], json!({"minor": 2500, "currency": "EUR"}));
        let id = placed["id"].as_str().unwrap().to_owned();
        let confirmed = shop.settled(&id).await;
        assert_eq!(confirmed["status"], "confirmed", "{confirmed}");
        let steps = Shop::steps(&confirmed);
        assert_eq!(
            steps,
            [
                "reserve action sent",
                "reserve action done",
                "authorize action sent",
                "authorize action done",
                "commit action sent",
                "commit action done",
                "capture action sent",
                "capture action done"
            ]
        );
        assert_eq!(shop.stock("MUG").await, (3, 0));
        assert_eq!(shop.payment(&id).await.as_deref(), Some("captured"));

        // Declined by the provider: the stock held for it is released.
        let (_, placed) = shop
            .place(
                &shop.ada,
                None,
                order(json!([{"sku": "MUG", "quantity": 1}]), "tok_chargeDeclined"),
            )
            .await;
        let id = placed["id"].as_str().unwrap().to_owned();
        let rejected = shop.settled(&id).await;
        assert_eq!(rejected["status"], "rejected");
        assert!(
            rejected["reason"]
                .as_str()
                .unwrap()
                .contains("card declined"),
            "{rejected}"
        );
        assert_eq!(shop.stock("MUG").await, (3, 0), "released");
        assert_eq!(shop.payment(&id).await.as_deref(), Some("declined"));

        // Out of stock: nothing held, nothing charged.
        let (_, placed) = shop
            .place(
                &shop.ada,
                None,
                order(
                    json!([{"sku": "MUG", "quantity": 1}, {"sku": "TEA", "quantity": 2}]),
                    "tok_visa",
                ),
            )
            .await;
        let id = placed["id"].as_str().unwrap().to_owned();
        let rejected = shop.settled(&id).await;
        assert_eq!(rejected["status"], "rejected");
        assert!(
            rejected["reason"]
                .as_str()
                .unwrap()
                .starts_with("out of stock"),
            "{rejected}"
        );
        assert_eq!(shop.stock("MUG").await, (3, 0));
        assert_eq!(shop.stock("TEA").await, (1, 0));
        assert_eq!(shop.payment(&id).await, None);

        // Not orderable at all: refused at once.
        for (lines, method) in [
            (json!([{"sku": "OLD", "quantity": 1}]), "tok_visa"),
            (json!([{"sku": "NONE", "quantity": 1}]), "tok_visa"),
        ] {
            let (status, problem) = shop.place(&shop.ada, None, order(lines, method)).await;
            assert_eq!(status, 422, "{problem}");
        }
        for body in [
            order(json!([]), "tok_visa"),
            order(json!([{"sku": "MUG", "quantity": 0}]), "tok_visa"),
            order(json!([{"sku": "MUG", "quantity": 1}]), "4242424242424242"),
            json!({"lines": [{"sku": "MUG", "quantity": 1}]}),
        ] {
            assert_eq!(shop.place(&shop.ada, None, body).await.0, 400);
        }
        // Only customers place orders.
        let mug = order(json!([{"sku": "MUG", "quantity": 1}]), "tok_visa");
        assert_eq!(shop.place(&shop.admin, None, mug).await.0, 403);
    }
}

#[tokio::test]
async fn one_idempotency_key_makes_one_order_and_customers_see_only_their_own() {
    for shop in shops(false, Duration::from_secs(10)).await {
        let mug = order(json!([{"sku": "MUG", "quantity": 1}]), "tok_visa");
        let (first_status, first) = shop.place(&shop.ada, Some("k-1"), mug.clone()).await;
        let (again_status, again) = shop.place(&shop.ada, Some("k-1"), mug.clone()).await;
        assert_eq!((first_status, again_status), (202, 200), "{}", shop.backend);
        assert_eq!(first["id"], again["id"]);
        // Another customer's key is theirs: a second order.
        let (_, bobs) = shop.place(&shop.bob, Some("k-1"), mug.clone()).await;
        assert_ne!(bobs["id"], first["id"]);
        // The same key for something else: refused.
        let tea = order(json!([{"sku": "TEA", "quantity": 1}]), "tok_visa");
        assert_eq!(shop.place(&shop.ada, Some("k-1"), tea).await.0, 422);

        let id = first["id"].as_str().unwrap();
        shop.settled(id).await;
        shop.settled(bobs["id"].as_str().unwrap()).await;
        assert_eq!(shop.stock("MUG").await, (3, 0), "two orders, not three");
        assert_eq!(shop.order(&shop.ada, id).await.0, 200);
        assert_eq!(shop.order(&shop.bob, id).await.0, 404, "not bob's");
        assert_eq!(shop.order(&shop.admin, id).await.0, 200);
        assert_eq!(shop.order(&shop.ada, "no-such-order").await.0, 404);
        let (_, _, mine) = keel_testkit::send(
            shop.http.get(format!("{}/orders", shop.orders)),
            Some(&shop.ada),
        )
        .await;
        assert_eq!(mine.as_array().unwrap().len(), 1);

        // The mug withdrawn: a new order for it is refused, but the repeat is still
        // answered with the order its key made.
        let withdrawn =
            json!({"name": "MUG", "price": {"minor": 1250, "currency": "EUR"}, "active": false});
        let put = shop
            .http
            .put(format!("{}/products/MUG", shop.catalog))
            .json(&withdrawn);
        assert_eq!(keel_testkit::send(put, Some(&shop.admin)).await.0, 200);
        assert_eq!(shop.place(&shop.ada, Some("k-2"), mug.clone()).await.0, 422);
        let (status, repeat) = shop.place(&shop.ada, Some("k-1"), mug).await;
        assert_eq!(
            (status, &repeat["id"]),
            (200, &first["id"]),
            "{}",
            shop.backend
        );
    }
}

#[tokio::test]
async fn one_idempotency_key_sent_twice_at_once_makes_one_order() {
    for shop in shops(false, Duration::from_secs(10)).await {
        let mug = order(json!([{"sku": "MUG", "quantity": 1}]), "tok_visa");
        let (a, b) = tokio::join!(
            shop.place(&shop.ada, Some("at-once"), mug.clone()),
            shop.place(&shop.ada, Some("at-once"), mug.clone())
        );
        let mut statuses = [a.0, b.0];
        statuses.sort_unstable();
        assert_eq!(statuses, [200, 202], "{} {} {}", a.1, b.1, shop.backend);
        assert_eq!(a.1["id"], b.1["id"]);
        shop.settled(a.1["id"].as_str().unwrap()).await;
        assert_eq!(shop.stock("MUG").await, (4, 0), "one mug sold");
    }
}

#[tokio::test]
async fn of_two_orders_for_the_last_unit_exactly_one_is_confirmed() {
    for shop in shops(false, Duration::from_secs(10)).await {
        let tea = order(json!([{"sku": "TEA", "quantity": 1}]), "tok_visa");
        let (a, b) = tokio::join!(
            shop.place(&shop.ada, None, tea.clone()),
            shop.place(&shop.bob, None, tea.clone())
        );
        let mut confirmed = 0;
        for (status, placed) in [a, b] {
            assert_eq!(status, 202);
            let settled = shop.settled(placed["id"].as_str().unwrap()).await;
            confirmed += usize::from(settled["status"] == "confirmed");
        }
        assert_eq!(confirmed, 1, "{}", shop.backend);
        assert_eq!(shop.stock("TEA").await, (0, 0));
    }
}

#[tokio::test]
async fn with_payments_away_the_saga_times_out_and_releases_the_stock() {
    for shop in shops(true, Duration::from_millis(800)).await {
        let mug = order(json!([{"sku": "MUG", "quantity": 2}]), "tok_visa");
        let (_, placed) = shop.place(&shop.ada, None, mug).await;
        let id = placed["id"].as_str().unwrap();
        // Still being placed (waiting for payments): not to be cancelled yet.
        let request = shop
            .http
            .post(format!("{}/orders/{id}/cancel", shop.orders));
        let (status, _, problem) = keel_testkit::send(request, Some(&shop.ada)).await;
        assert_eq!(status, 409);
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("still being placed"),
            "{problem}"
        );
        let rejected = shop.settled(id).await;
        assert_eq!(rejected["status"], "rejected", "{rejected}");
        assert_eq!(
            rejected["reason"], "the payment could not be made in time",
            "{rejected}"
        );
        assert_eq!(shop.stock("MUG").await, (5, 0), "{}", shop.backend);
    }
}

#[tokio::test]
async fn a_confirmed_order_is_cancelled_refunded_and_restocked_and_nothing_else_is() {
    for shop in shops(false, Duration::from_secs(10)).await {
        let cancel = |id: &str, token: &str, body: Option<Value>| {
            let mut request = shop
                .http
                .post(format!("{}/orders/{id}/cancel", shop.orders));
            if let Some(body) = body {
                request = request.json(&body);
            }
            let token = token.to_owned();
            async move {
                let (status, _, order) = keel_testkit::send(request, Some(&token)).await;
                (status, order)
            }
        };
        let (_, placed) = shop
            .place(
                &shop.ada,
                None,
                order(json!([{"sku": "MUG", "quantity": 2}]), "tok_visa"),
            )
            .await;
        let id = placed["id"].as_str().unwrap().to_owned();
        assert_eq!(shop.settled(&id).await["status"], "confirmed");
        assert_eq!(shop.stock("MUG").await, (3, 0));

        // Not bob's to cancel; a reason too long is refused.
        assert_eq!(
            cancel(&id, &shop.bob, None).await.0,
            404,
            "{}",
            shop.backend
        );
        let long = json!({"reason": "x".repeat(501)});
        assert_eq!(cancel(&id, &shop.ada, Some(long)).await.0, 400);
        let (status, cancelling) =
            cancel(&id, &shop.ada, Some(json!({"reason": "changed my mind"}))).await;
        assert_eq!(status, 202, "{cancelling}");
        assert_eq!(cancelling["status"], "cancelling");
        let cancelled = shop.until(&id, |status| status == "cancelled").await;
        assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
        assert_eq!(cancelled["reason"], "changed my mind");
        let steps = Shop::steps(&cancelled);
        assert_eq!(
            steps[steps.len() - 4..],
            [
                "refund action sent",
                "refund action done",
                "restock action sent",
                "restock action done"
            ],
            "the cancellation's steps after the placing's"
        );
        assert_eq!(shop.stock("MUG").await, (5, 0), "restocked");
        assert_eq!(shop.payment(&id).await.as_deref(), Some("refunded"));
        // Asking again changes nothing.
        let (status, again) = cancel(&id, &shop.ada, None).await;
        assert_eq!((status, again["status"].as_str()), (202, Some("cancelled")));
        assert_eq!(shop.stock("MUG").await, (5, 0));

        // A rejected order has nothing to cancel.
        let (_, declined) = shop
            .place(
                &shop.ada,
                None,
                order(json!([{"sku": "MUG", "quantity": 1}]), "tok_chargeDeclined"),
            )
            .await;
        let declined = declined["id"].as_str().unwrap().to_owned();
        assert_eq!(shop.settled(&declined).await["status"], "rejected");
        assert_eq!(cancel(&declined, &shop.ada, None).await.0, 409);
    }
}

#[tokio::test]
async fn a_customer_waits_for_the_outcome_with_one_request() {
    // Payments away: the saga gives up after three seconds and rejects the order.
    for shop in shops(true, Duration::from_secs(3)).await {
        let mug = order(json!([{"sku": "MUG", "quantity": 1}]), "tok_visa");
        let (_, placed) = shop.place(&shop.ada, None, mug).await;
        let id = placed["id"].as_str().unwrap();
        let look_at = |id: &str, query: &str, token: &str| {
            let request = shop.http.get(format!("{}/orders/{id}{query}", shop.orders));
            let token = token.to_owned();
            async move {
                let started = std::time::Instant::now();
                let (status, _, order) = keel_testkit::send(request, Some(&token)).await;
                (status, order, started.elapsed())
            }
        };
        let look = |query: &str, token: &str| look_at(id, query, token);
        // A short wait ends with the order as it is.
        let (status, pending, took) = look("?wait=200ms", &shop.ada).await;
        assert_eq!((status, pending["status"].as_str()), (200, Some("pending")));
        assert!(took >= Duration::from_millis(200), "{took:?}");
        // Another customer's order is not there to wait on; a wait that is no duration is
        // refused.
        let (status, _, took) = look("?wait=10s", &shop.bob).await;
        assert_eq!(status, 404);
        assert!(took < Duration::from_secs(5), "{took:?}");
        let (status, problem, _) = look("?wait=soon", &shop.ada).await;
        assert_eq!(status, 400, "{problem}");
        // A long wait is answered when the order moves on, not when the wait is over.
        let (status, rejected, took) = look("?wait=15s", &shop.ada).await;
        assert_eq!(status, 200);
        assert_eq!(
            rejected["status"], "rejected",
            "{} {rejected}",
            shop.backend
        );
        assert!(took < Duration::from_secs(10), "{took:?}");
        // Final already: answered at once.
        let (status, again, took) = look("?wait=15s", &shop.ada).await;
        assert_eq!((status, again["status"].as_str()), (200, Some("rejected")));
        assert!(took < Duration::from_secs(5), "{took:?}");
        // The waiter was answered from what moved the order (its reason) and the saga's
        // steps: the same as the order read afresh.
        assert_eq!(rejected, again, "{}", shop.backend);

        // The service stopping answers its waiters at once, with the order as it is.
        let mug = order(json!([{"sku": "MUG", "quantity": 1}]), "tok_visa");
        let (_, placed) = shop.place(&shop.ada, None, mug).await;
        let stop = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            shop.shutdown.trigger();
        };
        let (answer, ()) = tokio::join!(
            look_at(placed["id"].as_str().unwrap(), "?wait=15s", &shop.ada),
            stop
        );
        let (status, pending, took) = answer;
        assert_eq!((status, pending["status"].as_str()), (200, Some("pending")));
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
}

/// A customer may have only so many orders being placed at once (each holds its stock
/// until its saga ends): beyond, 429 with `Retry-After`, while a repeat under a key already
/// used still gets its order, other customers still order, and an ended order frees a place.
#[tokio::test]
async fn a_customer_has_only_so_many_orders_being_placed() {
    let options = keel_orders::OrdersOptions {
        step_timeout: Duration::from_secs(2),
        max_pending_per_customer: 2,
        ..keel_orders::OrdersOptions::default()
    };
    // Payments away: placed orders stay pending until the step times out.
    for shop in shops_with(true, options.clone()).await {
        let mug = || {
            order(
                json!([{"sku": "MUG", "quantity": 1}]),
                "tok_processingError",
            )
        };
        let (first, placed) = shop.place(&shop.ada, Some("one"), mug()).await;
        assert_eq!(first, 202, "{placed}");
        assert_eq!(shop.place(&shop.ada, Some("two"), mug()).await.0, 202);
        let request = shop
            .http
            .post(format!("{}/orders", shop.orders))
            .header("idempotency-key", "three")
            .json(&mug());
        let response = request.bearer_auth(&shop.ada).send().await.unwrap();
        assert_eq!(response.status(), 429, "{}", shop.backend);
        assert!(response.headers().contains_key("retry-after"));
        let problem: Value = response.json().await.unwrap();
        assert!(
            problem["type"]
                .as_str()
                .unwrap()
                .ends_with("too-many-pending-orders"),
            "{problem}"
        );
        // The first request again: its order, not a refusal.
        let (again, repeated) = shop.place(&shop.ada, Some("one"), mug()).await;
        assert_eq!(again, 200, "{repeated}");
        assert_eq!(repeated["id"], placed["id"]);
        // Someone else is not held back.
        assert_eq!(shop.place(&shop.bob, Some("one"), mug()).await.0, 202);
        // Once the first ends (rejected, payments away), there is a place again.
        let id = placed["id"].as_str().unwrap();
        assert_eq!(shop.settled(id).await["status"], "rejected");
        let mut placed_again = 0;
        for _ in 0..50 {
            placed_again = shop.place(&shop.ada, Some("four"), mug()).await.0;
            if placed_again == 202 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(placed_again, 202);
    }
}
