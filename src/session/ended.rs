//! Telling the rest of the application when sessions end: [`SessionEndListener`], called by the
//! layer's store after every removal of a session, whichever path removed it.

use std::{fmt, sync::Arc};

use async_trait::async_trait;

use super::store::{
    LoginHold, Patch, Record, SessionInfo, SessionKey, SessionStore, StoreError, UserKey, Written,
};

/// Told when sessions end, so that what hangs on them (live connections, say) ends too; see
/// [`SessionLayer::on_session_end`](super::SessionLayer::on_session_end).
///
/// It is called after the store removed the session, on the instance that removed it, for
/// every way the layer removes one: [`Session::destroy`](super::Session::destroy) (a logout),
/// [`Session::cycle_id`](super::Session::cycle_id) and
/// [`Session::set_user`](super::Session::set_user) (the old id ends), and "log out everywhere"
/// ([`Session::destroy_user_sessions`](super::Session::destroy_user_sessions),
/// [`UserSessions::destroy_all`](super::UserSessions::destroy_all)). A session that expires is
/// not announced. [`connection::Registry`](crate::connection::Registry) implements it: the
/// connections registered under the session are told on every instance.
#[async_trait]
pub trait SessionEndListener: fmt::Debug + Send + Sync + 'static {
    /// The session under `key` ended; `user` is the user it was bound to, when the request that
    /// ended it knew.
    async fn session_ended(&self, key: &SessionKey, user: Option<&str>);

    /// Every session of `user` ended ("log out everywhere").
    async fn user_sessions_ended(&self, user: &UserKey);
}

/// The layer's store, announcing each session it removes to a listener.
#[derive(Debug)]
pub(super) struct Announcing {
    pub(super) store: Arc<dyn SessionStore>,
    pub(super) listener: Arc<dyn SessionEndListener>,
}

#[async_trait]
impl SessionStore for Announcing {
    async fn load(&self, key: &SessionKey) -> Result<Option<Record>, StoreError> {
        self.store.load(key).await
    }

    async fn create(&self, key: &SessionKey, record: &Record) -> Result<(), StoreError> {
        self.store.create(key, record).await
    }

    async fn update(&self, key: &SessionKey, patch: &Patch) -> Result<Written, StoreError> {
        self.store.update(key, patch).await
    }

    async fn cycle(
        &self,
        old: &SessionKey,
        old_user: Option<&str>,
        new: &SessionKey,
        record: &Record,
    ) -> Result<Written, StoreError> {
        let written = self.store.cycle(old, old_user, new, record).await?;
        if written == Written::Applied {
            self.listener.session_ended(old, old_user).await;
        }
        Ok(written)
    }

    async fn delete(&self, key: &SessionKey, user: Option<&str>) -> Result<(), StoreError> {
        self.store.delete(key, user).await?;
        self.listener.session_ended(key, user).await;
        Ok(())
    }

    async fn list_user_sessions(&self, user: &UserKey) -> Result<Vec<SessionInfo>, StoreError> {
        self.store.list_user_sessions(user).await
    }

    async fn exists(&self, key: &SessionKey) -> Result<bool, StoreError> {
        self.store.exists(key).await
    }

    async fn sessions_over_cap(
        &self,
        user: &UserKey,
        login: &SessionKey,
        max: usize,
        held: Option<&str>,
    ) -> Result<Vec<SessionKey>, StoreError> {
        self.store.sessions_over_cap(user, login, max, held).await
    }

    async fn hold_login(
        &self,
        user: &UserKey,
        login: Option<&SessionKey>,
        max: usize,
    ) -> Result<LoginHold, StoreError> {
        self.store.hold_login(user, login, max).await
    }

    async fn delete_user_sessions(&self, user: &UserKey) -> Result<usize, StoreError> {
        let ended = self.store.delete_user_sessions(user).await?;
        self.listener.user_sessions_ended(user).await;
        Ok(ended)
    }
}

#[cfg(all(test, feature = "memory"))]
mod tests {
    use std::{sync::Mutex, time::Duration};

    use super::*;
    use crate::{session::MemoryStore, tenant::Tenant};

    /// Writes down what it is told.
    #[derive(Debug, Default)]
    struct Heard(Mutex<Vec<String>>);

    #[async_trait]
    impl SessionEndListener for Arc<Heard> {
        async fn session_ended(&self, key: &SessionKey, user: Option<&str>) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{}:{user:?}", key.hash()));
        }

        async fn user_sessions_ended(&self, user: &UserKey) {
            self.0.lock().unwrap().push(format!("user {}", user.user()));
        }
    }

    fn key(c: char) -> SessionKey {
        let hash = format!("{}A", c.to_string().repeat(42));
        SessionKey::from_hash(&Tenant::default(), &hash).unwrap()
    }

    #[tokio::test]
    async fn every_removal_is_told_after_it_happened_and_nothing_else() {
        let heard = Arc::new(Heard::default());
        let store = Announcing {
            store: Arc::new(MemoryStore::builder().build()),
            listener: Arc::new(Arc::clone(&heard)),
        };
        let mut record = Record::new(Duration::from_secs(60), Duration::from_secs(600));
        record.user = Some("alice".into());
        store.create(&key('A'), &record).await.unwrap();
        store.load(&key('A')).await.unwrap();
        store.update(&key('A'), &Patch::default()).await.unwrap();
        assert!(heard.0.lock().unwrap().is_empty(), "no end yet");

        store
            .cycle(&key('A'), Some("alice"), &key('B'), &record)
            .await
            .unwrap();
        // A move from a session that is gone moves nothing, and ends nothing.
        store
            .cycle(&key('C'), None, &key('D'), &record)
            .await
            .unwrap();
        store.delete(&key('B'), Some("alice")).await.unwrap();
        let user = UserKey::new(&Tenant::default(), "alice");
        store.delete_user_sessions(&user).await.unwrap();
        assert_eq!(
            *heard.0.lock().unwrap(),
            [
                format!("{}:Some(\"alice\")", key('A').hash()),
                format!("{}:Some(\"alice\")", key('B').hash()),
                "user alice".to_owned(),
            ]
        );
    }
}
