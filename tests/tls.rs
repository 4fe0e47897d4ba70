//! TLS and mTLS with certificates generated in the test (rcgen): a TLS server serves Submit,
//! WatchJob and health; a plaintext client cannot talk to it; with a client CA configured,
//! only clients with a certificate signed by that CA get in; the CLI reaches an mTLS server
//! that also requires an API key.

mod common;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use common::*;
use longrun::{
    actions::Registry,
    api::pb::{self, jobs_client::JobsClient},
    config::{Config, TlsFiles},
    server::Server,
    store::MemoryStore,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use tokio::sync::oneshot;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A CA that signs certificates for the server (`localhost`) and for clients.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
struct Pair {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn sign(&self, names: &[&str]) -> Pair {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "longrun test");
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// Writes `text` to `name` in `dir` and returns the path.
fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A TLS server (mTLS when `client_ca` is given) on an ephemeral loopback port.
struct TlsServer {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn start(config: Config) -> TlsServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::start(
        Arc::new(MemoryStore::new()),
        Registry::with_builtins(),
        config,
    )
    .await
    .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        server
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
    });
    TlsServer { addr, _stop: stop }
}

fn tls_config(dir: &tempfile::TempDir, ca: &Ca, client_ca: Option<&Ca>) -> Config {
    let server = ca.sign(&["localhost"]);
    let mut config = test_config();
    config.tls = Some(TlsFiles {
        cert: write(dir, "server.pem", &server.cert),
        key: write(dir, "server.key", &server.key),
        client_ca: client_ca.map(|c| write(dir, "client-ca.pem", &c.pem())),
    });
    config
}

/// Connects over TLS trusting `ca`, with a client certificate when given. Errors are
/// returned: a refused handshake may surface at connect or at the first call.
async fn tls_channel(
    addr: SocketAddr,
    ca: &Ca,
    identity: Option<&Pair>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    if let Some(pair) = identity {
        tls = tls.identity(Identity::from_pem(&pair.cert, &pair.key));
    }
    Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

/// Whether a client on `channel` can list actions (waits, bounded, for the server to listen).
async fn can_call(channel: Result<Channel, tonic::transport::Error>) -> Result<(), String> {
    let channel = channel.map_err(|e| format!("connect: {e:?}"))?;
    JobsClient::new(channel)
        .list_actions(pb::ListActionsRequest::default())
        .await
        .map(|_| ())
        .map_err(|status| format!("{status:?}"))
}

/// Waits until the server answers a TLS client (the listener is bound before `start`
/// returns, so this only waits out recovery).
async fn until_ready(addr: SocketAddr, ca: &Ca, identity: Option<&Pair>) -> Channel {
    for _ in 0..200 {
        let channel = tls_channel(addr, ca, identity).await.expect("TLS connect");
        let mut health = HealthClient::new(channel.clone());
        if let Ok(answer) = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            && answer.into_inner().status() == ServingStatus::Serving
        {
            return channel;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the TLS server never became ready");
}

#[tokio::test]
async fn a_tls_server_serves_submit_watch_and_health_and_refuses_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let server = start(tls_config(&dir, &ca, None)).await;
    let channel = until_ready(server.addr, &ca, None).await;

    let mut client = JobsClient::new(channel);
    let job = client
        .submit(request(vec![sleep(20, 2)]))
        .await
        .expect("submit over TLS")
        .into_inner()
        .job
        .unwrap();
    let mut stream = client
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
            after_version: 0,
        })
        .await
        .expect("watch over TLS")
        .into_inner();
    let done = next_until(&mut stream, |j| state(j) == pb::JobState::Succeeded).await;
    assert_eq!(done.id, job.id);

    // Plaintext h2c against the TLS port: no answer.
    let plaintext = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        let answer = JobsClient::new(channel)
            .list_actions(pb::ListActionsRequest::default())
            .await;
        assert!(answer.is_err(), "a plaintext call must not succeed");
    }
    // A client that does not trust the server's CA refuses it.
    let stranger = Ca::new("another CA");
    assert!(
        can_call(tls_channel(server.addr, &stranger, None).await)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn mtls_lets_in_only_clients_with_a_certificate_from_the_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let server = start(tls_config(&dir, &ca, Some(&client_ca))).await;
    let trusted = client_ca.sign(&["client"]);
    let channel = until_ready(server.addr, &ca, Some(&trusted)).await;
    let mut client = JobsClient::new(channel);
    client
        .submit(request(vec![action("echo", serde_json::json!({}))]))
        .await
        .expect("a client with a trusted certificate gets in");

    let none = can_call(tls_channel(server.addr, &ca, None).await).await;
    assert!(none.is_err(), "no client certificate: refused");
    let other_ca = Ca::new("rogue CA");
    let rogue = other_ca.sign(&["client"]);
    let refused = can_call(tls_channel(server.addr, &ca, Some(&rogue)).await).await;
    assert!(refused.is_err(), "a certificate from another CA: refused");
}

#[tokio::test]
async fn the_cli_reaches_an_mtls_server_that_requires_an_api_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let mut config = tls_config(&dir, &ca, Some(&client_ca));
    config.auth = auth_config(&[("acme", "cli-key")]).auth;
    let server = start(config).await;
    let trusted = client_ca.sign(&["client"]);
    let channel = until_ready(server.addr, &ca, Some(&trusted)).await;
    drop(channel);

    let ca_path = write(&dir, "ca.pem", &ca.pem());
    let cert_path = write(&dir, "client.pem", &trusted.cert);
    let key_path = write(&dir, "client.key", &trusted.key);
    let port = server.addr.port();
    let run = move |key: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_longrun"));
        command
            .arg("submit")
            .arg("--addr")
            .arg(format!("https://localhost:{port}"))
            .arg("--ca-cert")
            .arg(&ca_path)
            .arg("--client-cert")
            .arg(&cert_path)
            .arg("--client-key")
            .arg(&key_path)
            .arg("--wait")
            .arg("5s")
            .arg("--output")
            .arg("json")
            .arg("--action")
            .arg("echo")
            .env_remove("LONGRUN_API_KEY");
        if let Some(key) = key {
            command.env("LONGRUN_API_KEY", key);
        }
        command.output().unwrap()
    };
    let output = tokio::task::spawn_blocking(move || (run(Some("cli-key")), run(None)))
        .await
        .unwrap();
    let (with_key, without_key) = output;
    let stdout = String::from_utf8_lossy(&with_key.stdout);
    assert!(
        with_key.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&with_key.stderr)
    );
    assert!(stdout.contains("\"tenant\":\"acme\""), "{stdout}");
    assert!(!without_key.status.success());
    let stderr = String::from_utf8_lossy(&without_key.stderr);
    assert!(stderr.to_lowercase().contains("api key"), "{stderr}");
}

/// A CLI without the client certificate an mTLS server requires is told what is the likely
/// cause, not only that its call was cancelled.
#[tokio::test]
async fn the_cli_without_a_client_certificate_is_told_the_server_wants_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let server = start(tls_config(&dir, &ca, Some(&client_ca))).await;
    let trusted = client_ca.sign(&["client"]);
    drop(until_ready(server.addr, &ca, Some(&trusted)).await);

    let ca_path = write(&dir, "ca.pem", &ca.pem());
    let stranger = Ca::new("another CA").sign(&["client"]);
    let stranger_cert = write(&dir, "stranger.pem", &stranger.cert);
    let stranger_key = write(&dir, "stranger.key", &stranger.key);
    let port = server.addr.port();
    let https = format!("https://localhost:{port}");
    let plaintext = format!("localhost:{port}");
    let ca = ca_path.to_str().unwrap().to_owned();
    let (cert, key) = (
        stranger_cert.to_str().unwrap().to_owned(),
        stranger_key.to_str().unwrap().to_owned(),
    );
    let cli = |args: Vec<String>| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_longrun"))
            .arg("list")
            .args(args)
            .env_remove("LONGRUN_API_KEY")
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let runs = tokio::task::spawn_blocking(move || {
        let args = |more: &[&str]| more.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        [
            cli(args(&["--addr", &https, "--ca-cert", &ca])),
            cli(args(&["--addr", &https])),
            cli(args(&["--addr", &plaintext])),
            cli(args(&[
                "--addr",
                &https,
                "--ca-cert",
                &ca,
                "--client-cert",
                &cert,
                "--client-key",
                &key,
            ])),
        ]
    })
    .await
    .unwrap();
    let [no_client_cert, untrusted_server, plaintext, stranger] = runs;
    for (code, stderr) in [&no_client_cert, &untrusted_server, &plaintext, &stranger] {
        assert_eq!(*code, Some(5), "{stderr}");
    }
    let (_, stderr) = no_client_cert;
    assert!(
        stderr.contains("give --client-cert and --client-key"),
        "the likely cause is named: {stderr}"
    );
    assert!(stderr.contains("cause: "), "{stderr}");
    // Each other mistake is told its own likely fix, not the mTLS one.
    let (_, stderr) = untrusted_server;
    assert!(
        stderr.contains("give --ca-cert") && !stderr.contains("--client-cert"),
        "{stderr}"
    );
    let (_, stderr) = plaintext;
    assert!(stderr.contains("use an https:// address"), "{stderr}");
    let (_, stderr) = stranger;
    assert!(
        stderr.contains("check that --client-cert is signed by the CA it trusts"),
        "{stderr}"
    );
}

#[tokio::test]
async fn grpc_web_over_http1_works_over_tls() {
    use prost::Message as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::rustls::{
        self,
        pki_types::{CertificateDer, ServerName, pem::PemObject},
    };

    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let server = start(tls_config(&dir, &ca, None)).await;
    let channel = until_ready(server.addr, &ca, None).await;
    let job = JobsClient::new(channel)
        .submit(request(vec![action("echo", serde_json::json!({}))]))
        .await
        .expect("submit")
        .into_inner()
        .job
        .unwrap();

    // A browser-like client: TLS without ALPN, then a gRPC-Web request over HTTP/1.1.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    let message = pb::GetStatusRequest {
        job_id: job.id.clone(),
    }
    .encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    let head = format!(
        "POST /longrun.v1.Jobs/GetStatus HTTP/1.1\r\nhost: localhost\r\n\
         content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(&body).await.unwrap();
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    // Read until the server closes; a close without close_notify ends the read with an error.
    while let Ok(Ok(n)) = tokio::time::timeout(PATIENCE, tls.read(&mut chunk)).await {
        if n == 0 {
            break;
        }
        response.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&response).to_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(
        text.contains("content-type: application/grpc-web+proto"),
        "{text}"
    );
    assert!(
        text.contains("grpc-status:0") || text.contains("grpc-status: 0"),
        "{text}"
    );
    assert!(
        response
            .windows(job.id.len())
            .any(|w| w == job.id.as_bytes()),
        "the job in the response"
    );
}

/// Why a server with `config` does not start.
async fn refused_at_start(config: Config) -> String {
    Server::start(
        Arc::new(MemoryStore::new()),
        Registry::with_builtins(),
        config,
    )
    .await
    .err()
    .expect("refused at start")
    .to_string()
}

/// A key that is not the certificate's stops the server at start, saying so, rather than at
/// serve time with tonic's bare "transport error".
#[tokio::test]
async fn a_key_that_does_not_match_the_certificate_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let mut config = tls_config(&dir, &ca, None);
    let other = ca.sign(&["localhost"]);
    config.tls.as_mut().unwrap().key = write(&dir, "other.key", &other.key);
    let text = refused_at_start(config).await;
    assert!(
        text.contains("tls_key") && text.contains("KeyMismatch"),
        "{text}"
    );
}

/// A file that holds no PEM block of what its setting takes (a key given as the client CA,
/// an empty file) is refused naming that setting, not the certificate and key.
#[tokio::test]
async fn a_tls_file_holding_the_wrong_thing_is_refused_naming_its_setting() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let empty = write(&dir, "empty.pem", "");
    for (setting, edit) in [
        (
            "tls_client_ca",
            Box::new(|tls: &mut TlsFiles| tls.client_ca = Some(tls.key.clone()))
                as Box<dyn Fn(&mut TlsFiles)>,
        ),
        (
            "tls_client_ca",
            Box::new(|tls: &mut TlsFiles| tls.client_ca = Some(empty.clone())),
        ),
        (
            "tls_cert",
            Box::new(|tls: &mut TlsFiles| tls.cert = tls.key.clone()),
        ),
        (
            "tls_key",
            Box::new(|tls: &mut TlsFiles| tls.key = tls.cert.clone()),
        ),
    ] {
        let mut config = tls_config(&dir, &ca, None);
        edit(config.tls.as_mut().unwrap());
        let text = refused_at_start(config).await;
        assert!(
            text.contains(&format!("{setting}: ")) && text.contains("holds no PEM"),
            "{setting}: {text}"
        );
    }
}
