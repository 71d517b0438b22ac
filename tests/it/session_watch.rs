//! The connection registry's watch on the sessions of bound connections: what no one
//! announces (an expiry) still ends the connection, or the connection keeps its session alive.

use tower_turnstile::{
    backend::RedisBackend,
    session::{RedisStore, SessionKey, SessionLayer},
    tenant::Tenant,
};

use crate::support::{RedisServer, http::Client, session_app::app};

/// The registry's watch on the sessions of bound connections, on Redis with a 1 s inactivity
/// timeout, checked every 0.2 s: by default an expired session closes its connection;
/// with `SessionWatch::KeepAlive` the connection keeps its session alive.
#[tokio::test]
async fn a_watched_session_that_expires_ends_its_connection_or_is_kept_alive() {
    use std::time::{Duration, Instant};
    use tower_turnstile::connection::{Event, Registry, SessionWatch};

    let Some(server) = RedisServer::start() else {
        return;
    };
    for mode in [SessionWatch::CloseOnExpiry, SessionWatch::KeepAlive] {
        let layer = SessionLayer::new(RedisStore::new(RedisBackend::new(&server.url()).unwrap()))
            .with_secure(false)
            .with_inactivity_timeout(Duration::from_secs(1));
        let registry = Registry::builder(RedisBackend::new(&server.url()).unwrap())
            .lease(Duration::from_millis(600))
            .build()
            .unwrap();
        registry
            .watch_sessions(layer.store(), mode, Duration::from_millis(200))
            .unwrap();
        let app = app(layer);
        let mut alice = Client::new(app.clone());
        alice.post("/login/alice").await;
        let hash = alice.get("/key").await.body;
        let key = SessionKey::from_hash(&Tenant::default(), &hash).unwrap();
        let mut connection = registry
            .register_for_session(&key, "alice", "ws", 0)
            .await
            .unwrap();

        let start = Instant::now();
        let ended = tokio::time::timeout(Duration::from_millis(2500), connection.next()).await;
        match mode {
            SessionWatch::CloseOnExpiry => {
                assert_eq!(ended.unwrap(), Some(Event::SessionEnded));
                let took = start.elapsed();
                assert!(
                    took >= Duration::from_millis(900),
                    "not before it expired: {took:?}"
                );
                assert_eq!(alice.get("/user").await.body, "anonymous");
            }
            _ => {
                assert!(
                    ended.is_err(),
                    "no end while the connection lives: {ended:?}"
                );
                assert_eq!(alice.get("/user").await.body, "alice", "kept alive");
            }
        }
    }
}
