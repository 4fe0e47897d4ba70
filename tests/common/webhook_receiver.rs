//! A real HTTP webhook receiver on loopback, scripted per attempt, that hands every request it
//! gets to the test.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use tokio::sync::{Mutex, mpsc};

use super::PATIENCE;

/// How the receiver answers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Answer with this HTTP status.
    Status(u16),
    /// Never answer (the sender times out, or is killed meanwhile).
    Hang,
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Hit {
    /// Its headers.
    pub headers: HeaderMap,
    /// Its raw body.
    pub body: Vec<u8>,
}

impl Hit {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("header {name} missing"))
            .to_str()
            .expect("ASCII header")
            .to_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

type Script = Arc<dyn Fn(usize) -> Reply + Send + Sync>;

struct Shared {
    script: Script,
    count: AtomicUsize,
    hits: mpsc::UnboundedSender<Hit>,
}

/// A receiver listening on `127.0.0.1`, answering the `n`th request (from 1) as its script
/// says.
pub struct Receiver {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    hits: Mutex<mpsc::UnboundedReceiver<Hit>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// A receiver that answers every request with 200.
    pub async fn ok() -> Self {
        Self::start(|_| Reply::Status(200)).await
    }

    /// A receiver that answers the `n`th request (counted from 1) with `script(n)`.
    pub async fn start(script: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("receiver addr");
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            script: Arc::new(script),
            count: AtomicUsize::new(0),
            hits: tx,
        });
        let app = Router::new()
            .route("/{*path}", post(hook))
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            shared,
            hits: Mutex::new(rx),
            task,
        }
    }

    /// The URL of `path` on this receiver.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    /// The next request received (bounded by [`PATIENCE`]).
    pub async fn next(&self) -> Hit {
        tokio::time::timeout(PATIENCE, self.hits.lock().await.recv())
            .await
            .expect("a webhook request arrives in time")
            .expect("receiver running")
    }

    /// Requests received so far.
    pub fn count(&self) -> usize {
        self.shared.count.load(Ordering::SeqCst)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn hook(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let n = shared.count.fetch_add(1, Ordering::SeqCst) + 1;
    let _ = shared.hits.send(Hit {
        headers,
        body: body.to_vec(),
    });
    match (shared.script)(n) {
        Reply::Status(code) => StatusCode::from_u16(code).expect("a valid status"),
        Reply::Hang => futures::future::pending().await,
    }
}
