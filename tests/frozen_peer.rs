//! A client that stops reading while its kernel goes on acknowledging (a frozen process, a
//! paused VM): its connection must not outlive the keepalive's verdict, however much the server
//! had queued for it. Linux only: the test reads the kernel's connection table.

#![cfg(target_os = "linux")]

mod common;

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use async_trait::async_trait;
use common::*;
use longrun::{
    actions::{
        ActionContext, ActionDescription, Handler, HandlerError, ParamInfo, ParamType, Registry,
    },
    api::pb::{self, jobs_client::JobsClient},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tonic::transport::{Endpoint, Uri};

/// A connection whose reads and writes stop for good (pending, never woken) once frozen:
/// what the server meets when a client process is stopped. The socket stays open, so the
/// kernel keeps acknowledging what fits in its receive buffer, then advertises a zero window.
struct Freezable {
    stream: TcpStream,
    frozen: Arc<AtomicBool>,
}

impl AsyncRead for Freezable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Freezable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Reports progress as fast as it is let, until cancelled (bounded). Its job carries a large
/// `padding` param, so that every snapshot sent is large and a client that stops reading has
/// its window shut within a fraction of a second.
struct Flood;

#[async_trait]
impl Handler for Flood {
    fn describe(&self) -> ActionDescription {
        ActionDescription {
            description: "Reports progress in a tight loop.".to_owned(),
            params: vec![ParamInfo::optional(
                "padding",
                ParamType::String,
                "Makes the job's snapshots large.",
            )],
            uses_input: false,
        }
    }

    async fn run(&self, ctx: ActionContext) -> Result<Value, HandlerError> {
        let until = tokio::time::Instant::now() + PATIENCE * 2;
        let mut step = 0;
        while tokio::time::Instant::now() < until {
            if ctx.cancel.is_cancelled() {
                return Err(HandlerError::cancelled());
            }
            step += 1;
            ctx.progress.units(step, u64::MAX, "flooding");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(json!({}))
    }
}

fn open_watch_streams(server: &TestServer) -> f64 {
    let text = server.executor.metrics().render();
    text.lines()
        .find_map(|line| line.strip_prefix("longrun_open_watch_streams "))
        .and_then(|value| value.trim().parse().ok())
        .expect("the open streams gauge")
}

/// Whether the server still holds an established connection from `client` to `server`
/// (read from the kernel's table, the server being in this process).
fn established(server: std::net::SocketAddr, client: std::net::SocketAddr) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let port = |field: &str| {
        field
            .rsplit_once(':')
            .and_then(|(_, port)| u16::from_str_radix(port, 16).ok())
    };
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // `local_address rem_address st`, with ports in hex; 01 is ESTABLISHED.
        fields.len() > 3
            && port(fields[1]) == Some(server.port())
            && port(fields[2]) == Some(client.port())
            && fields[3] == "01"
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_client_with_a_full_window_is_cut_off_by_the_keepalive() {
    let mut config = test_config();
    config.keepalive_interval = Duration::from_secs(1);
    config.keepalive_timeout = Duration::from_secs(1);
    let mut registry = Registry::with_builtins();
    registry.register("flood", Flood);
    let server = TestServer::start_with(config, registry).await;
    let mut client = server.client.clone();
    let padding = "x".repeat(30_000);
    let job = submit(
        &mut client,
        request(vec![action("flood", json!({ "padding": padding }))]),
    )
    .await;

    let frozen = Arc::new(AtomicBool::new(false));
    let addr = server.addr;
    let (local_tx, local_rx) = tokio::sync::oneshot::channel();
    let local_tx = std::sync::Mutex::new(Some(local_tx));
    let connector_frozen = Arc::clone(&frozen);
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        // Windows far larger than the socket buffers, as clients that tune for throughput
        // open them: the server may queue more than the kernels can hold.
        .initial_stream_window_size(32 << 20)
        .initial_connection_window_size(32 << 20)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let frozen = Arc::clone(&connector_frozen);
            let local_tx = local_tx.lock().unwrap().take();
            async move {
                let socket = socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::STREAM,
                    None,
                )?;
                // A small fixed receive buffer: the window shuts soon after the reads stop.
                socket.set_recv_buffer_size(64 << 10)?;
                socket.set_nonblocking(true)?;
                let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
                let stream = socket.connect(addr).await?;
                if let Some(local_tx) = local_tx {
                    let _ = local_tx.send(stream.local_addr()?);
                }
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(Freezable { stream, frozen }))
            }
        }))
        .await
        .expect("connect");
    let local = local_rx.await.expect("the connection's address");
    let mut frozen_client = JobsClient::new(channel);
    let mut stream = frozen_client
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_version: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let first = stream.message().await.expect("a first message");
    let first = first.and_then(|m| m.job).expect("a job");
    assert_eq!(state(&first), pb::JobState::Running);
    assert!(established(addr, local));
    frozen.store(true, Ordering::SeqCst);

    // Unanswered, the keepalive gives up after 2 s; the kernel aborts the connection once
    // its window has been shut for as long. Bounded well beyond both.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while established(addr, local) || open_watch_streams(&server) > 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the frozen client's connection is still open ({} streams)",
            open_watch_streams(&server)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cancel(&mut client, &job.id).await;
    drop(stream);
}
