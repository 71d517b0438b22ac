//! The README's first example, runnable: a counter kept in a session in Redis, shared by every
//! instance that uses the same Redis.
//!
//! ```text
//! cargo run --example counter
//! curl -c jar -b jar -X POST http://127.0.0.1:3000/count   # 1, then 2, 3, ...
//! ```
//!
//! The Redis connection is lazy: the server starts even while Redis is down, and each request
//! then gets an empty session (and a log line) until Redis answers. `REDIS_URL` and `BIND`
//! override the defaults.

use axum::{Router, routing::post};
use tower_turnstile::{
    backend::RedisBackend,
    session::{RedisStore, Session, SessionLayer},
};

async fn count(session: Session) -> String {
    let n: u64 = session.get("n").await.ok().flatten().unwrap_or(0) + 1;
    let _ = session.insert("n", n).await;
    n.to_string()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let redis = RedisBackend::new(&url)?;
    let app = Router::new()
        .route("/count", post(count))
        // Plain http on localhost: a `Secure` cookie would never come back.
        .layer(SessionLayer::new(RedisStore::new(redis)).with_secure(false));
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    println!("counting on http://{bind}/count");
    axum::serve(listener, app).await?;
    Ok(())
}
