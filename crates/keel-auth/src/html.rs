//! The server's pages: plain HTML and a little CSS, no script. Every value that comes from
//! a request or the database goes through [`escape`]. Pages forbid framing (clickjacking)
//! and caching, and allow no script or outside resource.

use axum::response::{Html, IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

/// Text made safe for HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;background:#f4f5f7;color:#1d2430;margin:0}\
main{max-width:26rem;margin:4rem auto;background:#fff;padding:2rem;border-radius:.5rem;box-shadow:0 1px 3px #0002}\
h1{font-size:1.4rem;margin-top:0}label{display:block;margin:1rem 0 .3rem;font-weight:600}\
input[type=text],input[type=password]{width:100%;box-sizing:border-box;padding:.6rem;font-size:1rem;border:1px solid #8a94a6;border-radius:.3rem}\
button{margin-top:1.2rem;padding:.6rem 1.2rem;font-size:1rem;border-radius:.3rem;border:1px solid #1f4fd1;background:#1f4fd1;color:#fff;cursor:pointer}\
button.secondary{background:#fff;color:#1f4fd1}button:focus,input:focus{outline:3px solid #f5b400}\
.error{background:#fde8e8;border:1px solid #c81e1e;color:#8a1212;padding:.7rem;border-radius:.3rem}\
ul{padding-left:1.2rem}";

/// A whole page with `title` and `body` (HTML, escaped by the caller).
pub fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title><style>{STYLE}</style></head>\
         <body><main>{body}</main></body></html>",
        title = escape(title),
    );
    let mut response = (status, Html(html)).into_response();
    let headers = response.headers_mut();
    // No `form-action`: Chromium and Safari hold the redirect after a form's submission
    // to it too, and the sign-in, consent and sign-out forms answer with a redirect to
    // the client (its code, or its post-logout page). The pages run no script and every
    // value in them is escaped, so there is no injected form for it to stop.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// An error shown to the person at the browser, for requests that cannot be sent back to
/// the client (an unknown client or redirect URI must never be redirected to).
pub fn error_page(status: StatusCode, message: &str) -> Response {
    page(
        status,
        "Sign-in error",
        &format!(
            "<h1>This sign-in request cannot be completed</h1><p class=\"error\" role=\"alert\">{}</p>\
             <p>Go back to the application and try again.</p>",
            escape(message)
        ),
    )
}

/// The hidden fields every form of the authorization flow carries.
fn flow_fields(request: &str, csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"request\" value=\"{}\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        escape(request),
        escape(csrf)
    )
}

/// The sign-in form; `request` is the authorization request's query, carried through.
pub fn login_page(
    status: StatusCode,
    client_name: &str,
    request: &str,
    csrf: &str,
    username: &str,
    error: Option<&str>,
    ask_code: bool,
) -> Response {
    let error = error.map_or_else(String::new, |e| {
        format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e))
    });
    page(
        status,
        "Sign in",
        &format!(
            "<h1>Sign in to continue to {client}</h1>{error}\
             <form method=\"post\" action=\"/login\">{fields}\
             <label for=\"username\">Username</label>\
             <input type=\"text\" id=\"username\" name=\"username\" value=\"{username}\" autocomplete=\"username\" required autofocus>\
             <label for=\"password\">Password</label>\
             <input type=\"password\" id=\"password\" name=\"password\" autocomplete=\"current-password\" required>\
             {code}<button type=\"submit\">Sign in</button></form>",
            client = escape(client_name),
            fields = flow_fields(request, csrf),
            username = escape(username),
            code = if ask_code { code_field() } else { "" },
        ),
    )
}

/// The second factor's field, shown once the password was right.
pub fn code_field() -> &'static str {
    "<label for=\"otp\">Code from your authenticator app</label>\
     <input type=\"text\" id=\"otp\" name=\"otp\" inputmode=\"numeric\" pattern=\"[0-9]{6}\" \
     autocomplete=\"one-time-code\" required autofocus>"
}

/// Asks the signed-in user to let `client_name` have `scopes`.
pub fn consent_page(
    client_name: &str,
    username: &str,
    scopes: &[&str],
    request: &str,
    csrf: &str,
) -> Response {
    let items: String = scopes
        .iter()
        .map(|scope| format!("<li>{}</li>", escape(describe_scope(scope))))
        .collect();
    page(
        StatusCode::OK,
        "Allow access",
        &format!(
            "<h1>{client} wants access to your account</h1>\
             <p>Signed in as <strong>{username}</strong>. It asks to:</p><ul>{items}</ul>\
             <form method=\"post\" action=\"/consent\">{fields}\
             <button type=\"submit\" name=\"decision\" value=\"allow\">Allow</button> \
             <button type=\"submit\" name=\"decision\" value=\"deny\" class=\"secondary\">Deny</button></form>",
            client = escape(client_name),
            username = escape(username),
            fields = flow_fields(request, csrf),
        ),
    )
}

fn describe_scope(scope: &str) -> &str {
    match scope {
        "openid" => "know who you are (sign you in)",
        "profile" => "see your name and username",
        "email" => "see your email address",
        "offline_access" => "keep access while you are away",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cannot_be_framed_but_their_forms_may_redirect_to_the_client() {
        let response = page(StatusCode::OK, "Sign in", "<form></form>");
        let policy = response.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
        assert!(policy.contains("default-src 'none'"), "{policy}");
        // Browsers that check a form's redirect against `form-action` would stop the
        // code on its way to the client.
        assert!(!policy.contains("form-action"), "{policy}");
    }

    #[test]
    fn hostile_text_is_escaped() {
        assert_eq!(
            escape("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
    }

    #[tokio::test]
    async fn pages_forbid_framing_caching_and_script() {
        let response = login_page(
            StatusCode::OK,
            "<b>app</b>",
            "client_id=a&x=\"><script>",
            "tok",
            "",
            Some("<i>bad</i>"),
            false,
        );
        let headers = response.headers();
        assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY");
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("frame-ancestors 'none'") && csp.contains("default-src 'none'"));
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(!body.contains("<script>") && !body.contains("<b>app") && !body.contains("<i>bad"));
        assert!(body.contains("&quot;&gt;&lt;script&gt;"));
    }
}
