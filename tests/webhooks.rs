//! Webhooks end to end: a real HTTP receiver on loopback gets signed, at-least-once
//! deliveries of the states it subscribed to; failures are retried with backoff until
//! delivered or dead, visible on the job; URLs that reach internal addresses are refused at
//! Submit and again at delivery.

mod common;

use std::time::Duration;

use common::{
    webhook_receiver::{Hit, Receiver, Reply},
    *,
};
use hmac::{Hmac, Mac};
use longrun::{
    api::pb::{self, WebhookDeliveryState, WebhookEvents},
    config::Config,
    job::{NewAction, NewJob, WebhookEvents as DomainEvents, WebhookSpec},
};
use sha2::Sha256;
use tonic::Code;

const SECRET: &str = "whsec_test_secret";

/// The test config, letting webhooks reach the loopback receiver, with quick retries.
fn config() -> Config {
    let mut config = test_config();
    config.webhooks.allow_hosts = vec!["127.0.0.1".to_owned()];
    config.webhooks.backoff = Duration::from_millis(20);
    config.webhooks.backoff_max = Duration::from_millis(100);
    config.webhooks.timeout = Duration::from_secs(5);
    config
}

async fn server(config: Config) -> TestServer {
    TestServer::start_with(config, longrun::actions::Registry::with_builtins()).await
}

fn with_webhook(url: String, events: WebhookEvents) -> pb::SubmitRequest {
    pb::SubmitRequest {
        webhook: Some(pb::Webhook {
            url,
            secret: SECRET.to_owned(),
            events: events as i32,
        }),
        ..request(vec![action("echo", serde_json::json!({"message": "hi"}))])
    }
}

/// An echo job for in-process submission (no API checks) with a webhook to `url`.
fn echo_job_with_webhook(url: String, events: DomainEvents) -> NewJob {
    NewJob {
        actions: vec![NewAction {
            name: "echo".to_owned(),
            params: Default::default(),
            input: Default::default(),
        }],
        webhook: Some(WebhookSpec {
            url,
            secret: SECRET.to_owned(),
            events,
        }),
        ..NewJob::default()
    }
}

/// Recomputes the signature as a receiver would, with nothing of longrun's own code.
fn assert_signed(hit: &Hit, secret: &str) {
    let timestamp = hit.header("longrun-timestamp");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(&hit.body);
    let expected = format!("v1={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(hit.header("longrun-signature"), expected);
    let sent: u64 = timestamp.parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now.abs_diff(sent) < 60, "a current timestamp");
}

/// Reads the job until its deliveries satisfy `wanted` (bounded).
async fn until_deliveries(
    client: &mut pb::jobs_client::JobsClient<tonic::transport::Channel>,
    job_id: &str,
    wanted: impl Fn(&[pb::WebhookDelivery]) -> bool,
) -> pb::Job {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let job = get(client, job_id).await;
        if wanted(&job.webhook_deliveries) {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "deliveries never got there: {:?}",
            job.webhook_deliveries
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn settled(state: WebhookDeliveryState) -> impl Fn(&[pb::WebhookDelivery]) -> bool {
    move |d| !d.is_empty() && d.iter().all(|d| d.state() == state)
}

/// Whole numbers in a Struct (doubles on the wire) are written as grpcurl, the CLI and the
/// Connect protocol write them: `1`, not `1.0`.
#[tokio::test]
async fn whole_numbers_in_a_delivered_snapshot_are_written_without_a_fraction() {
    let receiver = Receiver::ok().await;
    let server = server(config()).await;
    let mut client = server.client.clone();
    let request = pb::SubmitRequest {
        actions: vec![sleep(1, 1)],
        ..with_webhook(receiver.url("/hooks/longrun"), WebhookEvents::Terminal)
    };
    submit(&mut client, request).await;
    let hit = receiver.next().await;
    let action = &hit.json()["job"]["actions"][0];
    assert!(action["params"]["duration_ms"].is_u64(), "{action}");
    assert_eq!(action["result"]["slept_ms"], 1, "{action}");
    assert!(action["result"]["slept_ms"].is_u64(), "{action}");
}

#[tokio::test]
async fn terminal_delivery_is_signed_and_carries_the_final_snapshot() {
    let receiver = Receiver::ok().await;
    let server = server(config()).await;
    let mut client = server.client.clone();
    let submitted = submit(
        &mut client,
        with_webhook(receiver.url("/hooks/longrun"), WebhookEvents::Unspecified),
    )
    .await;
    let webhook = submitted.webhook.clone().expect("the webhook is echoed");
    assert_eq!(webhook.url, receiver.url("/hooks/longrun"));
    assert_eq!(webhook.secret, "", "the secret is never returned");
    assert_eq!(webhook.events(), WebhookEvents::Terminal);

    let hit = receiver.next().await;
    assert_signed(&hit, SECRET);
    assert_eq!(hit.header("content-type"), "application/json");
    assert_eq!(hit.header("longrun-event"), "job.finished");
    let body = hit.json();
    assert_eq!(body["delivery_id"], hit.header("longrun-delivery-id"));
    assert_eq!(body["event"]["type"], "job.finished");
    assert_eq!(body["event"]["state"], "JOB_STATE_SUCCEEDED");
    let job = &body["job"];
    assert_eq!(job["id"], submitted.id);
    assert_eq!(job["state"], "JOB_STATE_SUCCEEDED");
    assert_eq!(
        body["event"]["version"].as_i64().unwrap().to_string(),
        job["version"]
    );
    assert_eq!(job["actions"][0]["result"]["params"]["message"], "hi");
    assert_eq!(job["webhook"]["url"], receiver.url("/hooks/longrun"));
    assert!(
        !String::from_utf8_lossy(&hit.body).contains(SECRET),
        "the secret never travels"
    );

    let job = until_deliveries(
        &mut client,
        &submitted.id,
        settled(WebhookDeliveryState::Delivered),
    )
    .await;
    let [delivery] = job.webhook_deliveries.as_slice() else {
        panic!("one delivery: {:?}", job.webhook_deliveries);
    };
    assert_eq!(delivery.delivery_id, hit.header("longrun-delivery-id"));
    assert_eq!(delivery.job_state(), pb::JobState::Succeeded);
    assert_eq!(delivery.job_version, job.version);
    assert_eq!(delivery.attempts, 1);
    assert!(delivery.delivered_time.is_some());
    assert!(delivery.next_attempt_time.is_none());
    assert_eq!(receiver.count(), 1);
    let listed = list_all(&mut client).await;
    assert_eq!(listed[0].webhook.as_ref().unwrap().secret, "");
    assert!(
        listed[0].webhook_deliveries.is_empty(),
        "only GetStatus and WaitJob read them"
    );
}

#[tokio::test]
async fn all_events_arrive_once_each_in_order() {
    let receiver = Receiver::ok().await;
    let server = server(config()).await;
    let mut client = server.client.clone();
    let mut request = with_webhook(receiver.url("/all"), WebhookEvents::All);
    request.actions = vec![sleep(30, 3)]; // progress updates: not reported
    let submitted = submit(&mut client, request).await;

    let mut seen = Vec::new();
    for _ in 0..3 {
        let hit = receiver.next().await;
        assert_signed(&hit, SECRET);
        let body = hit.json();
        seen.push((
            body["event"]["state"].as_str().unwrap().to_owned(),
            body["event"]["version"].as_i64().unwrap(),
            hit.header("longrun-event"),
            hit.header("longrun-delivery-id"),
        ));
    }
    let states: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(
        states,
        [
            "JOB_STATE_QUEUED",
            "JOB_STATE_RUNNING",
            "JOB_STATE_SUCCEEDED"
        ]
    );
    assert!(seen.windows(2).all(|w| w[0].1 < w[1].1), "versions rise");
    let events: Vec<&str> = seen.iter().map(|s| s.2.as_str()).collect();
    assert_eq!(
        events,
        ["job.state_changed", "job.state_changed", "job.finished"]
    );
    let job = until_deliveries(
        &mut client,
        &submitted.id,
        settled(WebhookDeliveryState::Delivered),
    )
    .await;
    let ids: Vec<&str> = job
        .webhook_deliveries
        .iter()
        .map(|d| d.delivery_id.as_str())
        .collect();
    assert_eq!(ids, seen.iter().map(|s| s.3.as_str()).collect::<Vec<_>>());
    assert_eq!(receiver.count(), 3, "one request per state, no more");
}

#[tokio::test]
async fn a_receiver_failing_three_times_gets_exactly_four_attempts() {
    let receiver = Receiver::start(|n| Reply::Status(if n <= 3 { 500 } else { 204 })).await;
    let server = server(config()).await;
    let mut client = server.client.clone();
    let submitted = submit(
        &mut client,
        with_webhook(receiver.url("/flaky"), WebhookEvents::Terminal),
    )
    .await;

    let mut ids = Vec::new();
    for _ in 0..4 {
        let hit = receiver.next().await;
        assert_signed(&hit, SECRET);
        ids.push(hit.header("longrun-delivery-id"));
    }
    assert!(
        ids.windows(2).all(|w| w[0] == w[1]),
        "one delivery id on every attempt"
    );
    let job = until_deliveries(
        &mut client,
        &submitted.id,
        settled(WebhookDeliveryState::Delivered),
    )
    .await;
    let delivery = &job.webhook_deliveries[0];
    assert_eq!(delivery.attempts, 4);
    assert_eq!(delivery.delivery_id, ids[0]);
    assert_eq!(delivery.last_error, "HTTP 500 Internal Server Error");
    assert_eq!(receiver.count(), 4, "no attempt after the delivery");
    let metrics = server.executor.metrics().render();
    assert!(
        metrics.contains("longrun_webhook_attempts_total{outcome=\"retry\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("longrun_webhook_attempts_total{outcome=\"delivered\"} 1"));
    assert!(metrics.contains("longrun_webhook_deliveries_pending"));
}

#[tokio::test]
async fn a_receiver_that_always_fails_ends_dead_on_the_job() {
    let receiver = Receiver::start(|_| Reply::Status(503)).await;
    let mut config = config();
    config.webhooks.max_attempts = 3;
    let server = server(config).await;
    let mut client = server.client.clone();
    let submitted = submit(
        &mut client,
        with_webhook(receiver.url("/down"), WebhookEvents::Terminal),
    )
    .await;

    let job = until_deliveries(
        &mut client,
        &submitted.id,
        settled(WebhookDeliveryState::Dead),
    )
    .await;
    let delivery = &job.webhook_deliveries[0];
    assert_eq!(delivery.attempts, 3);
    assert_eq!(delivery.last_error, "HTTP 503 Service Unavailable");
    assert!(delivery.next_attempt_time.is_none());
    assert!(delivery.delivered_time.is_none());
    assert_eq!(receiver.count(), 3, "max_attempts attempts, no more");
    // WaitJob shows the outbox too.
    let waited = client
        .wait_job(pb::WaitJobRequest {
            job_id: submitted.id.clone(),
            timeout: None,
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(waited.webhook_deliveries, job.webhook_deliveries);
}

#[tokio::test]
async fn redirects_and_timeouts_are_failed_attempts() {
    let redirecting = Receiver::start(|_| Reply::Status(302)).await;
    let hanging = Receiver::start(|_| Reply::Hang).await;
    let mut config = config();
    config.webhooks.max_attempts = 1;
    config.webhooks.timeout = Duration::from_millis(200);
    let server = server(config).await;
    let mut client = server.client.clone();
    let redirected = submit(
        &mut client,
        with_webhook(redirecting.url("/r"), WebhookEvents::Terminal),
    )
    .await;
    let timed_out = submit(
        &mut client,
        with_webhook(hanging.url("/h"), WebhookEvents::Terminal),
    )
    .await;

    let job = until_deliveries(
        &mut client,
        &redirected.id,
        settled(WebhookDeliveryState::Dead),
    )
    .await;
    assert!(
        job.webhook_deliveries[0]
            .last_error
            .contains("redirects are not followed"),
        "{}",
        job.webhook_deliveries[0].last_error
    );
    let job = until_deliveries(
        &mut client,
        &timed_out.id,
        settled(WebhookDeliveryState::Dead),
    )
    .await;
    assert!(
        job.webhook_deliveries[0].last_error.contains("timed out"),
        "{}",
        job.webhook_deliveries[0].last_error
    );

    // https to a plaintext receiver: the TLS handshake fails, and the attempt with it.
    let plain = Receiver::ok().await;
    let tls = submit(
        &mut client,
        with_webhook(
            format!("https://{}/tls", plain.addr),
            WebhookEvents::Terminal,
        ),
    )
    .await;
    let job = until_deliveries(&mut client, &tls.id, settled(WebhookDeliveryState::Dead)).await;
    assert!(!job.webhook_deliveries[0].last_error.is_empty());
    assert_eq!(plain.count(), 0, "no request over a failed handshake");
}

#[tokio::test]
async fn internal_urls_are_refused_at_submit_and_nothing_is_stored() {
    let mut config = test_config();
    config.webhooks.secret = Some("server default".to_owned());
    let server = server(config).await;
    let mut client = server.client.clone();
    for url in [
        "http://127.0.0.1:8080/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://localhost:8080/hook",
        "https://192.168.0.10/",
        "ftp://example.com/",
        "http://user:pw@example.com/",
    ] {
        let mut request = with_webhook(url.to_owned(), WebhookEvents::All);
        request.webhook.as_mut().unwrap().secret.clear();
        let status = client.submit(request).await.expect_err(url);
        assert_eq!(status.code(), Code::InvalidArgument, "{url}: {status:?}");
        assert_eq!(bad_request_fields(&status), ["webhook.url"], "{url}");
    }
    assert!(list_all(&mut client).await.is_empty(), "nothing stored");
}

#[tokio::test]
async fn a_webhook_needs_a_secret_and_known_events() {
    let server = server(config()).await; // no default secret
    let mut client = server.client.clone();
    let mut request = with_webhook("http://127.0.0.1:9/hook".to_owned(), WebhookEvents::All);
    request.webhook.as_mut().unwrap().secret.clear();
    let status = client.submit(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(bad_request_fields(&status), ["webhook.secret"]);

    let mut request = with_webhook("http://127.0.0.1:9/hook".to_owned(), WebhookEvents::All);
    request.webhook.as_mut().unwrap().events = 9;
    let status = client.submit(request).await.unwrap_err();
    assert_eq!(bad_request_fields(&status), ["webhook.events"]);

    let request = with_webhook(String::new(), WebhookEvents::All);
    let status = client.submit(request).await.unwrap_err();
    assert_eq!(bad_request_fields(&status), ["webhook.url"]);

    // Every violation at once, the webhook's with the rest of the request's.
    let mut request = with_webhook("gopher://x".to_owned(), WebhookEvents::All);
    request.actions.clear();
    request.webhook.as_mut().unwrap().events = 9;
    request.webhook.as_mut().unwrap().secret.clear();
    let status = client.submit(request).await.unwrap_err();
    assert_eq!(
        bad_request_fields(&status),
        ["actions", "webhook.events", "webhook.secret", "webhook.url"]
    );
    assert!(list_all(&mut client).await.is_empty(), "nothing stored");

    // The server's default secret signs when the job brings none.
    let receiver = Receiver::ok().await;
    let mut config = config();
    config.webhooks.secret = Some("the server's own".to_owned());
    let server = self::server(config).await;
    let mut client = server.client.clone();
    let mut request = with_webhook(receiver.url("/d"), WebhookEvents::Terminal);
    request.webhook.as_mut().unwrap().secret.clear();
    submit(&mut client, request).await;
    assert_signed(&receiver.next().await, "the server's own");
}

#[tokio::test]
async fn delivery_rechecks_the_guard_for_jobs_that_bypassed_submit() {
    // In-process submissions skip the API's checks; the delivery side still refuses to reach
    // an internal address: by IP literal (checked before sending) and by name (the resolver).
    let receiver = Receiver::ok().await;
    let mut config = test_config();
    config.webhooks.max_attempts = 1;
    let server = server(config).await;
    let mut client = server.client.clone();
    let port = receiver.addr.port();
    let mut ids = Vec::new();
    for url in [
        format!("http://127.0.0.1:{port}/literal"),
        format!("http://localhost:{port}/name"),
    ] {
        let spec = echo_job_with_webhook(url, DomainEvents::Terminal);
        ids.push(server.executor.submit(spec).await.unwrap().id.to_string());
    }
    for id in ids {
        let job = until_deliveries(&mut client, &id, settled(WebhookDeliveryState::Dead)).await;
        let error = &job.webhook_deliveries[0].last_error;
        assert!(error.contains("internal"), "{error}");
    }
    assert_eq!(
        receiver.count(),
        0,
        "no request reached the internal address"
    );
}

#[tokio::test]
async fn a_jobs_next_delivery_waits_for_the_one_before_it() {
    // The QUEUED notification fails once: RUNNING and SUCCEEDED are held back until it is
    // delivered, so the receiver still sees the job's states in order.
    let receiver = Receiver::start(|n| Reply::Status(if n == 1 { 500 } else { 200 })).await;
    let server = server(config()).await;
    let mut client = server.client.clone();
    let submitted = submit(
        &mut client,
        with_webhook(receiver.url("/ordered"), WebhookEvents::All),
    )
    .await;
    let mut states = Vec::new();
    for _ in 0..4 {
        let hit = receiver.next().await;
        states.push(hit.json()["event"]["state"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        states,
        [
            "JOB_STATE_QUEUED",
            "JOB_STATE_QUEUED",
            "JOB_STATE_RUNNING",
            "JOB_STATE_SUCCEEDED"
        ]
    );
    let job = until_deliveries(
        &mut client,
        &submitted.id,
        settled(WebhookDeliveryState::Delivered),
    )
    .await;
    let attempts: Vec<i32> = job.webhook_deliveries.iter().map(|d| d.attempts).collect();
    assert_eq!(attempts, [2, 1, 1]);
}

#[tokio::test]
async fn deliveries_in_flight_are_bounded_by_the_concurrency() {
    let receiver = Receiver::start(|_| Reply::Hang).await;
    let mut config = config();
    config.webhooks.concurrency = 2;
    config.webhooks.timeout = Duration::from_secs(60);
    let server = server(config).await;
    let mut client = server.client.clone();
    for i in 0..4 {
        submit(
            &mut client,
            with_webhook(receiver.url(&format!("/slow/{i}")), WebhookEvents::Terminal),
        )
        .await;
    }
    receiver.next().await;
    receiver.next().await;
    // Two hang; the other two wait for a free slot. A short look is enough to catch a third.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.count(), 2);
}

/// Retries take half the slots at most: receivers that keep failing (here: failing at
/// once, then hanging) cannot hold every slot while a healthy receiver's delivery waits.
#[tokio::test]
async fn retries_of_failing_receivers_leave_slots_to_first_attempts() {
    // One receiver per failing job, each failing its first request at once (requests are
    // counted from 1) and hanging on the next: whichever order the attempts come in.
    let fail_then_hang = || {
        Receiver::start(|n| {
            if n == 1 {
                Reply::Status(500)
            } else {
                Reply::Hang
            }
        })
    };
    let failing = [fail_then_hang().await, fail_then_hang().await];
    let healthy = Receiver::ok().await;
    let mut config = config();
    config.webhooks.concurrency = 2;
    config.webhooks.timeout = Duration::from_secs(60);
    let server = server(config).await;
    let mut client = server.client.clone();
    for receiver in &failing {
        submit(
            &mut client,
            with_webhook(receiver.url("/bad"), WebhookEvents::Terminal),
        )
        .await;
    }
    // Both first attempts fail; one retry hangs, the other waits for the retry lane (past
    // its backoff: a short look is enough to catch it).
    for receiver in &failing {
        receiver.next().await;
    }
    let requests = || failing.iter().map(Receiver::count).sum::<usize>();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while requests() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "a retry is made");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(requests(), 3, "one retry in flight, not two");
    submit(
        &mut client,
        with_webhook(healthy.url("/good"), WebhookEvents::Terminal),
    )
    .await;
    healthy.next().await;
    assert_eq!(requests(), 3, "one retry in flight, not two");
    // Not stopped gracefully: the flush would wait out the hanging retry.
    drop(server);
}

/// On the SQLite store, whose reads are awaited on another thread while attempts end, each
/// delivery that the receiver accepts at once is sent exactly once: a scan that read the
/// deliveries before an attempt was recorded must not send that delivery again. (Before the
/// fix, 2 or 3 of 40 such deliveries went out twice.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_delivery_accepted_at_once_is_sent_once_on_sqlite() {
    let receiver = Receiver::ok().await;
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(
        longrun::store::SqliteStore::open(dir.path(), longrun::store::SqliteOptions::default())
            .unwrap(),
    );
    let server =
        TestServer::start_on(store, config(), longrun::actions::Registry::with_builtins()).await;
    let mut client = server.client.clone();
    let mut ids = Vec::new();
    for n in 0..20 {
        let job = submit(
            &mut client,
            with_webhook(receiver.url(&format!("/once/{n}")), WebhookEvents::All),
        )
        .await;
        ids.push(job.id);
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let delivered = loop {
        let mut delivered = 0;
        let mut pending = false;
        for id in &ids {
            let job = get(&mut client, id).await;
            pending |= job.state() != pb::JobState::Succeeded
                || job
                    .webhook_deliveries
                    .iter()
                    .any(|d| d.state() != WebhookDeliveryState::Delivered);
            delivered += job.webhook_deliveries.len();
        }
        if !pending {
            break delivered;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "all delivered in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A second, racing send would land within a few milliseconds of the first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.count(), delivered, "one request per delivery");
}

/// A job's deliveries have no count limit (each graceful shutdown that sets the job aside adds
/// a QUEUED and a RUNNING one), but GetStatus and WaitJob must still fit in one response: they
/// carry the newest deliveries that fit, the terminal one last, instead of failing.
#[tokio::test]
async fn a_job_with_more_deliveries_than_fit_shows_the_newest() {
    use longrun::{
        job::{Job, JobId},
        store::{MemoryStore, Store},
    };
    const MAX_MESSAGE_BYTES: usize = 16 * 1024;
    let store = std::sync::Arc::new(MemoryStore::new());
    // Never reached: the guard refuses it at delivery, and the deliveries stay on the job.
    let spec = echo_job_with_webhook("http://127.0.0.1:9/hook".to_owned(), DomainEvents::All);
    let now = std::time::SystemTime::now();
    let mut job = Job::new(JobId::generate(), spec, 1, now);
    store.create(&job).await.unwrap();
    for _ in 0..200 {
        job.start(now).unwrap();
        store.save(&job).await.unwrap();
        job.set_aside(now).unwrap();
        store.save(&job).await.unwrap();
    }
    job.start(now).unwrap();
    job.start_action(0, now).unwrap();
    job.succeed_action(0, serde_json::json!("done"), now)
        .unwrap();
    job.succeed(now).unwrap();
    store.save(&job).await.unwrap();
    let stored = store.deliveries(job.id).await.unwrap().len();
    assert_eq!(stored, 402, "one per state reported");

    let mut config = test_config();
    config.limits.max_message_bytes = MAX_MESSAGE_BYTES;
    config.webhooks.max_attempts = 1;
    let server =
        TestServer::start_on(store, config, longrun::actions::Registry::with_builtins()).await;
    let mut client = server.client.clone();
    let id = job.id.to_string();
    let got = client
        .get_status(pb::GetStatusRequest { job_id: id.clone() })
        .await
        .expect("GetStatus fits in one response")
        .into_inner()
        .job
        .unwrap();
    let shown = &got.webhook_deliveries;
    assert!(!shown.is_empty() && shown.len() < stored, "{}", shown.len());
    assert_eq!(
        shown.last().map(|d| d.job_state()),
        Some(pb::JobState::Succeeded)
    );
    assert!(
        shown
            .windows(2)
            .all(|w| w[0].job_version < w[1].job_version),
        "oldest first, the newest kept"
    );
    assert!(prost::Message::encoded_len(&got) <= MAX_MESSAGE_BYTES);
    let waited = client
        .wait_job(pb::WaitJobRequest {
            job_id: id,
            ..Default::default()
        })
        .await
        .expect("WaitJob fits in one response")
        .into_inner();
    assert!(waited.done);
    let last_id =
        |deliveries: &[pb::WebhookDelivery]| deliveries.last().map(|d| d.delivery_id.clone());
    assert_eq!(
        last_id(&waited.job.unwrap().webhook_deliveries),
        last_id(shown)
    );
}

/// A job that ends while the server drains has its webhook sent before the server stops, not
/// only at its next start.
#[tokio::test]
async fn a_job_ending_during_a_graceful_shutdown_is_delivered_before_the_server_stops() {
    let receiver = Receiver::ok().await;
    let server = server(config()).await;
    let mut client = server.client.clone();
    let mut request = with_webhook(receiver.url("/hooks/drain"), WebhookEvents::Terminal);
    request.actions = vec![sleep(300, 3)];
    let job = submit(&mut client, request).await;
    until_state(&mut client, &job.id, pb::JobState::Running).await;
    server.stop().await;
    assert_eq!(receiver.count(), 1, "delivered before the server stopped");
    let hit = receiver.next().await;
    assert_eq!(hit.json()["event"]["state"], "JOB_STATE_SUCCEEDED");
}
