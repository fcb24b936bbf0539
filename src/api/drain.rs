//! Reading what a refused request is still sending, so that its client sees the answer.
//!
//! A request refused before its body was read (a 413 over the body limit, a 401 before a large
//! upload) would otherwise be answered while the client is still writing, and the connection
//! closed under it: the client's write fails with a reset and most clients (the OpenAI SDK,
//! reqwest, curl) report a connection error instead of the 413. Like nginx's lingering close,
//! the rest of such a body is read and thrown away (never kept: memory stays constant) before
//! the answer goes out, bounded in bytes and in time; past the bounds the connection is closed.
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use futures_util::StreamExt;
use http_body::{Body as _, Frame, SizeHint};
use tokio::sync::oneshot;

/// How much of an unread body is read and discarded before the connection is given up.
#[derive(Debug, Clone, Copy)]
pub struct DrainBounds {
    /// The most bytes read.
    pub max_bytes: u64,
    /// The longest a client may pause.
    pub idle: Duration,
    /// The longest it may take in all.
    pub total: Duration,
}

/// What the server uses: 64 MiB, 5 s of silence, 30 s in all (the times are nginx's defaults
/// for `lingering_timeout` and `lingering_time`).
pub const DRAIN: DrainBounds = DrainBounds {
    max_bytes: 64 * 1024 * 1024,
    idle: Duration::from_secs(5),
    total: Duration::from_secs(30),
};

/// A request body that hands itself back, through `back`, when dropped before its end.
struct ReturnUnread {
    inner: Option<Body>,
    back: Option<oneshot::Sender<Body>>,
}

impl http_body::Body for ReturnUnread {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        match self.get_mut().inner.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for ReturnUnread {
    fn drop(&mut self) {
        if let (Some(body), Some(back)) = (self.inner.take(), self.back.take())
            && !body.is_end_stream()
        {
            let _ = back.send(body);
        }
    }
}

/// Serves the request; if its handler left part of the body unread, reads that part (within
/// [`DRAIN`]) before answering.
pub async fn drain_unread(req: Request, next: Next) -> Response {
    let (back, mut unread) = oneshot::channel();
    let req = req.map(|body| {
        Body::new(ReturnUnread {
            inner: Some(body),
            back: Some(back),
        })
    });
    let response = next.run(req).await;
    // The handler has returned, so the body is dropped or read by now: never wait for it.
    if let Ok(rest) = unread.try_recv() {
        discard(rest, DRAIN).await;
    }
    response
}

/// Reads `body` to its end or to the bounds, keeping nothing; returns the bytes read.
async fn discard(body: Body, bounds: DrainBounds) -> u64 {
    let mut read = 0u64;
    let mut chunks = body.into_data_stream();
    let reading = async {
        while read <= bounds.max_bytes {
            match tokio::time::timeout(bounds.idle, chunks.next()).await {
                Ok(Some(Ok(chunk))) => read += chunk.len() as u64,
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(bounds.total, reading).await;
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(n: usize, size: usize) -> Body {
        let stream = futures_util::stream::iter(
            (0..n).map(move |_| Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; size]))),
        );
        Body::from_stream(stream)
    }

    #[tokio::test]
    async fn a_body_dropped_unread_comes_back_and_one_read_to_the_end_does_not() {
        let (back, unread) = oneshot::channel();
        let body = ReturnUnread {
            inner: Some(Body::from("abc")),
            back: Some(back),
        };
        assert_eq!(body.size_hint().exact(), Some(3));
        drop(body);
        let rest = unread.await.expect("an unread body is handed back");
        assert_eq!(discard(rest, DRAIN).await, 3);

        let (back, unread) = oneshot::channel();
        let body = Body::new(ReturnUnread {
            inner: Some(Body::from("abc")),
            back: Some(back),
        });
        let bytes = axum::body::to_bytes(body, 10).await.unwrap();
        assert_eq!(&bytes[..], b"abc");
        assert!(
            unread.await.is_err(),
            "a body read to its end is not drained"
        );
    }

    #[tokio::test]
    async fn discarding_stops_at_the_byte_bound() {
        let chunk = 4 * 1024 * 1024;
        let n = (DRAIN.max_bytes as usize / chunk) * 4;
        let read = discard(chunks(n, chunk), DRAIN).await;
        assert!(read > DRAIN.max_bytes && read <= DRAIN.max_bytes + chunk as u64);
    }

    #[tokio::test]
    async fn discarding_stops_when_the_client_pauses_and_at_the_time_bound() {
        let bounds = DrainBounds {
            idle: Duration::from_millis(50),
            total: Duration::from_secs(20),
            ..DRAIN
        };
        let stalled = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from("ab"))])
            .chain(futures_util::stream::pending());
        let started = std::time::Instant::now();
        assert_eq!(discard(Body::from_stream(stalled), bounds).await, 2);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the pause ended it"
        );

        // A trickle that never pauses long enough is cut off by the total bound.
        let trickle = futures_util::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Some((Ok::<_, std::io::Error>(Bytes::from("a")), ()))
        });
        let bounds = DrainBounds {
            idle: Duration::from_secs(5),
            total: Duration::from_millis(300),
            ..DRAIN
        };
        let started = std::time::Instant::now();
        let read = discard(Body::from_stream(trickle), bounds).await;
        let took = started.elapsed();
        assert!(read > 0 && took >= bounds.total && took < Duration::from_secs(5));
    }
}
