//! A browser for the sign-in pages: keeps cookies, does not follow redirects, and reads
//! forms' hidden fields.

use std::collections::HashMap;
use std::time::Duration;

pub struct Browser {
    http: reqwest::Client,
    base: String,
    pub cookies: HashMap<String, String>,
    /// Sent as `X-Forwarded-For`, as a proxy in front of the server would.
    pub forwarded_for: Option<String>,
}

/// A page or redirect the browser got.
pub struct Page {
    pub status: u16,
    pub location: Option<String>,
    pub body: String,
}

impl Page {
    /// The value of hidden (or any) input `name`, unescaped.
    pub fn field(&self, name: &str) -> String {
        let marker = format!("name=\"{name}\" value=\"");
        let start = self
            .body
            .find(&marker)
            .unwrap_or_else(|| panic!("no field {name} in {}", self.body))
            + marker.len();
        let end = start + self.body[start..].find('"').unwrap();
        unescape(&self.body[start..end])
    }

    /// The query parameters of the redirect.
    pub fn redirect_params(&self) -> HashMap<String, String> {
        let location = self.location.as_deref().expect("a redirect");
        let query = location.split_once('?').map_or("", |(_, q)| q);
        serde_urlencoded::from_str::<Vec<(String, String)>>(query)
            .unwrap()
            .into_iter()
            .collect()
    }
}

fn unescape(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

impl Browser {
    pub fn new(base: &str) -> Self {
        Self {
            http: keel_runtime::http_client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            base: base.to_owned(),
            cookies: HashMap::new(),
            forwarded_for: None,
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn read(&mut self, response: reqwest::Response) -> Page {
        for value in response.headers().get_all("set-cookie") {
            let value = value.to_str().unwrap();
            let pair = value.split(';').next().unwrap();
            let (name, value) = pair.split_once('=').unwrap();
            self.cookies.insert(name.to_owned(), value.to_owned());
        }
        Page {
            status: response.status().as_u16(),
            location: response
                .headers()
                .get("location")
                .map(|l| l.to_str().unwrap().to_owned()),
            body: response.text().await.unwrap(),
        }
    }

    /// `request` with the cookies and `X-Forwarded-For`, if any.
    fn with_headers(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let request = request.header("cookie", self.cookie_header());
        match &self.forwarded_for {
            Some(address) => request.header("x-forwarded-for", address),
            None => request,
        }
    }

    pub async fn get(&mut self, path_and_query: &str) -> Page {
        let response = self
            .with_headers(self.http.get(format!("{}{path_and_query}", self.base)))
            .send()
            .await
            .unwrap();
        self.read(response).await
    }

    pub async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let response = self
            .with_headers(self.http.post(format!("{}{path}", self.base)))
            .form(form)
            .send()
            .await
            .unwrap();
        self.read(response).await
    }
}
