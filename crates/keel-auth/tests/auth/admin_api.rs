//! The admin REST API, protected by this server's own tokens with the keel-admin role.

use keel_auth::{AuthMethod, GrantType, Subject};
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::*;

/// A client-credentials token for a service client allowed the `keel-admin` scope, with
/// the keel-admin role or not, asking for `scope`.
async fn token_for(app: &App, id: &str, admin: bool, scope: &str) -> String {
    let (client, secret) = app
        .admin
        .create_client(new_client(
            id,
            AuthMethod::ClientSecretBasic,
            &[],
            &[GrantType::ClientCredentials],
            "keel-admin reports:read",
        ))
        .await
        .unwrap();
    if admin {
        // The role exists once; a second admin client only binds it.
        let _ = app
            .admin
            .create_role("keel-admin", None, "administers Keel", "keel-admin")
            .await;
        app.admin
            .grant_role("keel-admin", &Subject::Client(client.client_id.clone()))
            .await
            .unwrap();
    }
    let token = app
        .token(
            Some((&client.client_id, secret.as_deref().unwrap())),
            &[("grant_type", "client_credentials"), ("scope", scope)],
        )
        .await;
    token.body["access_token"].as_str().unwrap().to_owned()
}

async fn call(
    app: &App,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut request = app.http.request(method, app.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body, headers)
}

#[tokio::test]
async fn only_keel_admins_administer_and_errors_are_problems() {
    for store in stores().await {
        let app = spawn(&store).await;
        let plain = token_for(&app, "plain", false, "keel-admin reports:read").await;
        let root = token_for(&app, "root", true, "keel-admin").await;
        // An admin's token asked for something else does not administer.
        let unscoped = token_for(&app, "root2", true, "reports:read").await;
        let user = json!({"username": "dana", "password": "correct horse"});

        let (status, problem, headers) = call(
            &app,
            Method::POST,
            "/admin/v1/users",
            None,
            Some(user.clone()),
        )
        .await;
        assert_eq!(status, 401);
        assert_eq!(problem["status"], 401);
        assert!(
            headers["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
        assert_eq!(headers["content-type"], "application/problem+json");
        let (status, _, headers) = call(
            &app,
            Method::POST,
            "/admin/v1/users",
            Some(&plain),
            Some(user.clone()),
        )
        .await;
        assert_eq!(status, 403);
        assert!(
            headers["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("insufficient_scope")
        );
        let (status, _, _) = call(
            &app,
            Method::POST,
            "/admin/v1/users",
            Some("garbage"),
            Some(user.clone()),
        )
        .await;
        assert_eq!(status, 401);
        let (status, _, _) = call(
            &app,
            Method::POST,
            "/admin/v1/users",
            Some(&unscoped),
            Some(user.clone()),
        )
        .await;
        assert_eq!(status, 403, "an admin's token without the keel-admin scope");

        let (status, created, _) = call(
            &app,
            Method::POST,
            "/admin/v1/users",
            Some(&root),
            Some(user.clone()),
        )
        .await;
        assert_eq!(status, 201, "{created}");
        let user_id = created["user_id"].as_str().unwrap().to_owned();
        let (status, _, _) = call(
            &app,
            Method::POST,
            "/admin/v1/users",
            Some(&root),
            Some(user),
        )
        .await;
        assert_eq!(status, 409);
        let short = json!({"username": "erin", "password": "short"});
        assert_eq!(
            call(
                &app,
                Method::POST,
                "/admin/v1/users",
                Some(&root),
                Some(short)
            )
            .await
            .0,
            400
        );
        let unknown_field = json!({"username": "erin", "password": "long enough", "admin": true});
        assert_eq!(
            call(
                &app,
                Method::POST,
                "/admin/v1/users",
                Some(&root),
                Some(unknown_field)
            )
            .await
            .0,
            400
        );

        let path = format!("/admin/v1/users/{user_id}");
        let change = json!({"disabled": true, "password": "an even longer one"});
        assert_eq!(
            call(&app, Method::PATCH, &path, Some(&root), Some(change))
                .await
                .0,
            204
        );
        let ghost = json!({"disabled": true});
        assert_eq!(
            call(
                &app,
                Method::PATCH,
                "/admin/v1/users/nobody",
                Some(&root),
                Some(ghost)
            )
            .await
            .0,
            404
        );
        let weak = json!({"password": "short"});
        assert_eq!(
            call(&app, Method::PATCH, &path, Some(&root), Some(weak))
                .await
                .0,
            400
        );

        let role = json!({"name": "editor", "scopes": "docs:write"});
        assert_eq!(
            call(
                &app,
                Method::POST,
                "/admin/v1/roles",
                Some(&root),
                Some(role)
            )
            .await
            .0,
            201
        );
        assert_eq!(
            call(
                &app,
                Method::POST,
                "/admin/v1/groups",
                Some(&root),
                Some(json!({"name": "staff"}))
            )
            .await
            .0,
            201
        );
        let member = json!({"user_id": user_id});
        assert_eq!(
            call(
                &app,
                Method::POST,
                "/admin/v1/groups/staff/members",
                Some(&root),
                Some(member)
            )
            .await
            .0,
            204
        );
        let binding = json!({"group": "staff"});
        assert_eq!(
            call(
                &app,
                Method::POST,
                "/admin/v1/roles/editor/bindings",
                Some(&root),
                Some(binding)
            )
            .await
            .0,
            204
        );
        assert_eq!(
            call(
                &app,
                Method::POST,
                "/admin/v1/roles/nope/bindings",
                Some(&root),
                Some(json!({"group": "staff"}))
            )
            .await
            .0,
            404
        );
        let two = json!({"group": "staff", "user_id": "x"});
        assert_eq!(
            call(
                &app,
                Method::POST,
                "/admin/v1/roles/editor/bindings",
                Some(&root),
                Some(two)
            )
            .await
            .0,
            400
        );
        assert_eq!(
            call(
                &app,
                Method::DELETE,
                "/admin/v1/roles/editor/bindings?group=staff",
                Some(&root),
                None
            )
            .await
            .0,
            204
        );
        assert_eq!(
            call(
                &app,
                Method::DELETE,
                "/admin/v1/roles/editor/bindings?group=staff",
                Some(&root),
                None
            )
            .await
            .0,
            404
        );

        let client = json!({"client_id": "reporting", "name": "Reporting", "auth_method": "client_secret_basic", "grant_types": ["client_credentials"], "scopes": "docs:read"});
        let (status, created, headers) = call(
            &app,
            Method::POST,
            "/admin/v1/clients",
            Some(&root),
            Some(client),
        )
        .await;
        assert_eq!(status, 201, "{created}");
        assert_eq!(created["client_secret"].as_str().unwrap().len(), 43);
        assert_eq!(headers["cache-control"], "no-store");

        let (status, rotated, _) = call(
            &app,
            Method::POST,
            "/admin/v1/keys/rotate",
            Some(&root),
            Some(json!({"alg": "ES256"})),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(rotated["published"].as_array().unwrap().len(), 1);

        let (status, audit, _) = call(
            &app,
            Method::GET,
            "/admin/v1/audit?limit=50",
            Some(&root),
            None,
        )
        .await;
        assert_eq!(status, 200);
        let kinds: Vec<&str> = audit["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        assert!(
            kinds.contains(&"admin_change") && kinds.contains(&"user_created"),
            "{kinds:?}"
        );
        // Changes through the API name their caller; the test's own, made locally, none.
        let created_by = |client: &str| {
            audit["events"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["kind"] == "client_created" && e["client_id"] == client)
                .cloned()
                .unwrap_or_else(|| panic!("{client} created: {audit}"))
        };
        assert_eq!(created_by("reporting")["actor"], "client root");
        assert!(created_by("root")["actor"].is_null());
        let rotation = audit["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| {
                e["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("rotated in"))
            })
            .unwrap();
        assert_eq!(rotation["actor"], "client root");
        assert!(
            !audit
                .to_string()
                .contains(created["client_secret"].as_str().unwrap()),
            "no secret in the audit"
        );
    }
}

#[tokio::test]
async fn the_admin_api_describes_itself_in_openapi() {
    let store = sqlite();
    let app = spawn(&store).await;
    let document = app.get_json("/admin/v1/openapi.json").await;
    assert_eq!(document["openapi"], "3.1.0");
    let paths = document["paths"].as_object().unwrap();
    for path in [
        "/admin/v1/users",
        "/admin/v1/clients",
        "/admin/v1/roles/{role}/bindings",
        "/admin/v1/audit",
    ] {
        assert!(paths.contains_key(path), "{path}");
    }
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}
