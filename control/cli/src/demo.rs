//! The demo app `esper dev` puts behind the proxy when no `--upstream` is given: a tiny
//! shop with a login form that answers 401 to wrong credentials, so the example policies
//! have something to protect. Tests use it as a real upstream too.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Form, Router};
use esper_common::Shutdown;
use serde::Deserialize;

/// The only credentials the demo login accepts.
pub const DEMO_USER: &str = "demo";
/// Password of [`DEMO_USER`].
pub const DEMO_PASSWORD: &str = "demo";

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

const INDEX: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>Esper demo shop</title></head>
<body>
<h1>Esper demo shop</h1>
<p>This app sits behind the Esper proxy. Browse the <a href="/products/1">products</a>,
or try the <a href="/login">login</a> (demo / demo).</p>
</body></html>"#;

const LOGIN: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>Log in</title></head>
<body><h1>Log in</h1>
<form method="post" action="/login">
<input name="username" placeholder="username"> <input name="password" type="password" placeholder="password">
<button type="submit">Log in</button></form></body></html>"#;

async fn product(Path(id): Path<u32>) -> Response {
    if id == 0 || id > 1000 {
        return (StatusCode::NOT_FOUND, Html("<h1>No such product</h1>")).into_response();
    }
    Html(format!(
        "<!doctype html><html><body><h1>Product {id}</h1><p>Price: {}.00</p><a href=\"/\">home</a></body></html>",
        10 + id % 90
    ))
    .into_response()
}

async fn login(Form(form): Form<LoginForm>) -> Response {
    if form.username == DEMO_USER && form.password == DEMO_PASSWORD {
        (StatusCode::OK, Html("<h1>Welcome back</h1>")).into_response()
    } else {
        (
            StatusCode::UNAUTHORIZED,
            Html("<h1>Wrong username or password</h1>"),
        )
            .into_response()
    }
}

async fn whoami(ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap) -> Response {
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    axum::Json(serde_json::json!({
        "peer": peer.to_string(),
        "x_request_id": header("x-request-id"),
        "x_forwarded_for": header("x-forwarded-for"),
        "host": header("host"),
    }))
    .into_response()
}

/// The demo app's routes.
pub fn router() -> Router {
    Router::new()
        .route("/", get(|| async { Html(INDEX) }))
        .route("/login", get(|| async { Html(LOGIN) }).post(login))
        .route("/products/{id}", get(product))
        .route("/api/whoami", get(whoami))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async { (StatusCode::NOT_FOUND, Html("<h1>Not found</h1>")) })
}

/// Serves the demo app on `listener` until shutdown.
pub async fn serve(listener: tokio::net::TcpListener, shutdown: Shutdown) -> std::io::Result<()> {
    esper_common::http::serve(
        listener,
        router(),
        shutdown,
        std::time::Duration::from_secs(5),
    )
    .await
}
