use keel_auth::{AuthConfig, AuthServer, StartError};
use keel_runtime::{Secret, Shutdown};
use serde_json::Value;

use crate::helpers::*;

fn kids(jwks: &Value) -> Vec<String> {
    let mut kids: Vec<String> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|key| key["kid"].as_str().unwrap().to_owned())
        .collect();
    kids.sort();
    kids
}

#[tokio::test]
async fn keys_are_kept_across_restarts_and_need_their_key_encryption_key() {
    for store in stores().await {
        let app = spawn(&store).await;
        let before = kids(&app.get_json("/jwks.json").await);
        app.server.stop().await;

        let app = spawn(&store).await;
        assert_eq!(
            kids(&app.get_json("/jwks.json").await),
            before,
            "same keys, none added"
        );
        app.server.stop().await;

        // Another key encryption key cannot open them: the start fails and says why.
        let other = AuthConfig {
            key_encryption_key: Some(Secret::new(
                "BAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8".to_owned(),
            )),
            ..config(&store)
        };
        let error = AuthServer::build(other, &Shutdown::new())
            .await
            .err()
            .unwrap();
        assert!(matches!(error, StartError::Keys(_)), "{error}");
        assert!(error.to_string().contains("key encryption key"), "{error}");
    }
}

#[tokio::test]
async fn a_malformed_key_encryption_key_is_refused_at_start() {
    let store = sqlite();
    let config = AuthConfig {
        key_encryption_key: Some(Secret::new("too short".to_owned())),
        ..config(&store)
    };
    let error = AuthServer::build(config, &Shutdown::new())
        .await
        .err()
        .unwrap();
    assert!(matches!(error, StartError::Kek(_)), "{error}");
    assert!(
        !error.to_string().contains("too short"),
        "the key is not echoed: {error}"
    );
}

#[tokio::test]
async fn without_a_configured_key_sqlite_keeps_one_beside_the_database() {
    let store = sqlite();
    let Store::Sqlite(file) = &store else {
        unreachable!()
    };
    let app = spawn_with(&store, |c| c.key_encryption_key = None).await;
    let before = kids(&app.get_json("/jwks.json").await);
    app.server.stop().await;
    let key_file = format!("{}.key", file.path.display());
    let meta = std::fs::metadata(&key_file).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    let app = spawn_with(&store, |c| c.key_encryption_key = None).await;
    assert_eq!(kids(&app.get_json("/jwks.json").await), before);
}

#[tokio::test]
async fn postgres_needs_a_configured_key() {
    if !keel_testkit::require(keel_testkit::Service::Postgres) {
        return;
    }
    let store = Store::Postgres(keel_testkit::TestDatabase::create().await);
    let config = AuthConfig {
        key_encryption_key: None,
        ..config(&store)
    };
    let error = AuthServer::build(config, &Shutdown::new())
        .await
        .err()
        .unwrap();
    assert!(matches!(error, StartError::KekRequired), "{error}");
}

#[tokio::test]
async fn servers_starting_together_on_one_database_make_one_key_per_algorithm() {
    if !keel_testkit::require(keel_testkit::Service::Postgres) {
        return;
    }
    let store = Store::Postgres(keel_testkit::TestDatabase::create().await);
    let (a, b) = tokio::join!(spawn(&store), spawn(&store));
    let (a, b) = (
        kids(&a.get_json("/jwks.json").await),
        kids(&b.get_json("/jwks.json").await),
    );
    assert_eq!(a.len(), 3, "{a:?}");
    assert_eq!(a, b);
}

#[tokio::test]
async fn listening_on_all_interfaces_needs_a_configured_issuer() {
    let store = sqlite();
    let config = AuthConfig {
        listen: "0.0.0.0:0".parse().unwrap(),
        ..config(&store)
    };
    let error = AuthServer::build(config, &Shutdown::new())
        .await
        .err()
        .unwrap();
    assert!(matches!(error, StartError::IssuerRequired(_)), "{error}");
}

#[tokio::test]
async fn rotation_publishes_first_signs_later_and_retires_after_the_last_token() {
    for store in stores().await {
        let app = spawn(&store).await;
        let (id, secret) = app
            .service_client(keel_auth::AuthMethod::ClientSecretBasic, "a", None)
            .await;
        let signing_kid = || async {
            let token = app
                .token(
                    Some((&id, &secret)),
                    &[("grant_type", "client_credentials")],
                )
                .await;
            let jwt = token.body["access_token"].as_str().unwrap().to_owned();
            let header = jwt.split('.').next().unwrap().to_owned();
            let header: Value = serde_json::from_slice(
                &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header)
                    .unwrap(),
            )
            .unwrap();
            header["kid"].as_str().unwrap().to_owned()
        };
        let old = signing_kid().await;
        let rotated = app
            .admin
            .rotate_keys(Some(keel_auth::SigningAlg::RS256))
            .await
            .unwrap();
        let new = rotated[0].clone();
        let published = kids(&app.get_json("/jwks.json").await);
        assert!(
            published.contains(&new) && published.contains(&old),
            "{published:?}"
        );
        assert_eq!(published.len(), 4);
        // Published, not yet signing: verifiers get to know it first.
        assert_eq!(signing_kid().await, old);
        app.admin.clock().advance(15 * 60);
        assert_eq!(signing_kid().await, new);
        assert!(
            kids(&app.get_json("/jwks.json").await).contains(&old),
            "its tokens live on"
        );
        // Once no token it signed can be alive, the old key leaves the set.
        app.admin.clock().advance(86_400 + 301);
        let published = kids(&app.get_json("/jwks.json").await);
        assert!(
            !published.contains(&old) && published.contains(&new),
            "{published:?}"
        );
    }
}

/// `auth.key_rotation_interval` (90 days): a key that has signed that long is rotated out
/// as by hand (the next one published at once, signing a lead later), once, whichever of
/// the servers sharing the database looks first; younger keys are left alone; `0s` turns
/// it off.
#[tokio::test]
async fn keys_that_signed_for_the_rotation_interval_are_rotated_once() {
    for store in stores().await {
        let (app, other) = (spawn(&store).await, spawn(&store).await);
        assert!(app.admin.rotate_due_keys().await.unwrap().is_empty());
        let first = kids(&app.get_json("/jwks.json").await);
        assert_eq!(first.len(), 3, "{first:?}");

        // (The servers' own minute loops rotate too, with the same clock: what is
        // checked is the key set, whoever rotated; an hour's margin, since the clock runs
        // on from when the keys were made.)
        let interval = 90 * 86_400;
        app.admin.clock().advance(interval - 3600);
        assert!(app.admin.rotate_due_keys().await.unwrap().is_empty());
        assert_eq!(kids(&app.get_json("/jwks.json").await), first);
        app.admin.clock().advance(3600);
        app.admin.rotate_due_keys().await.unwrap();
        let second = kids(&app.get_json("/jwks.json").await);
        assert_eq!(second.len(), 6, "old and new: {second:?}");
        assert!(first.iter().all(|kid| second.contains(kid)));
        // The other server, behind on its key set, finds the rotation done under the lock.
        other.admin.clock().advance(interval);
        assert!(other.admin.rotate_due_keys().await.unwrap().is_empty());
        assert!(app.admin.rotate_due_keys().await.unwrap().is_empty());
        assert_eq!(kids(&app.get_json("/jwks.json").await), second);

        // The new keys' interval runs from when they sign.
        app.admin.clock().advance(15 * 60 + interval - 3600);
        assert!(app.admin.rotate_due_keys().await.unwrap().is_empty());
        app.admin.clock().advance(3600);
        app.admin.rotate_due_keys().await.unwrap();
        let third = kids(&app.get_json("/jwks.json").await);
        assert_eq!(
            third.iter().filter(|kid| !second.contains(kid)).count(),
            3,
            "three more: {third:?}"
        );
        assert!(
            first.iter().all(|kid| !third.contains(kid)),
            "the first keys are long gone: {third:?}"
        );
    }

    let store = sqlite();
    let off = spawn_with(&store, |config| {
        config.key_rotation_interval = std::time::Duration::ZERO;
    })
    .await;
    off.admin.clock().advance(10 * 365 * 86_400);
    assert!(off.admin.rotate_due_keys().await.unwrap().is_empty());
}
