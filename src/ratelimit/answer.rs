//! An answer known at once, or once some I/O is done.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

/// An answer known at once, or once some I/O is done: what a
/// [`RateLimitStore`](super::RateLimitStore) check and a [`KeyExtractor`](super::KeyExtractor)
/// return.
///
/// It is a future either way (`answer.await`). The layer takes a ready answer without polling
/// it ([`Answer::now`]), so a decision made in memory costs neither a boxed future nor a task
/// wake-up; only an answer that needs I/O (a Redis round trip, the session's user) is awaited.
///
/// ```
/// use tower_turnstile::ratelimit::Answer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let now = Answer::ready(1);
/// assert_eq!(now.now().ok(), Some(1));
/// let later = Answer::later(async { 2 });
/// let later = later.now().expect_err("needs polling");
/// assert_eq!(later.await, 2);
/// # }
/// ```
#[must_use = "an answer does nothing until it is taken or awaited"]
pub struct Answer<T>(Kind<T>);

enum Kind<T> {
    /// `None` once taken by a poll.
    Ready(Option<T>),
    Later(Pin<Box<dyn Future<Output = T> + Send>>),
}

impl<T> Answer<T> {
    /// An answer known at once.
    pub fn ready(value: T) -> Self {
        Self(Kind::Ready(Some(value)))
    }

    /// An answer that `future` finds.
    pub fn later(future: impl Future<Output = T> + Send + 'static) -> Self {
        Self(Kind::Later(Box::pin(future)))
    }

    /// The answer, if it is known without waiting; otherwise the same `Answer` back, to await.
    pub fn now(self) -> Result<T, Self> {
        match self.0 {
            Kind::Ready(Some(value)) => Ok(value),
            kind => Err(Self(kind)),
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Answer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Kind::Ready(value) => f.debug_tuple("Answer::Ready").field(value).finish(),
            Kind::Later(_) => f.write_str("Answer::Later(..)"),
        }
    }
}

impl<T> Future for Answer<T> {
    type Output = T;

    /// # Panics
    ///
    /// When polled again after it returned its answer, as `std::future::Ready` does.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        // `Answer` is `Unpin`: its only field that may not be is boxed.
        match &mut self.get_mut().0 {
            Kind::Ready(value) => {
                Poll::Ready(value.take().expect("`Answer` polled after completion"))
            }
            Kind::Later(future) => future.as_mut().poll(cx),
        }
    }
}

impl<T> Unpin for Answer<T> {}
