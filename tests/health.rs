//! Health over the server's life: NOT_SERVING while the previous run's jobs are recovered,
//! SERVING once they are and the listener accepts, NOT_SERVING again while draining.

mod common;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use common::{
    hooked_store::{HookedStore, StoreHooks},
    *,
};
use longrun::{
    actions::Registry,
    api::pb::{self, JobState},
    job::{Job, JobId, MAX_UNPERSISTED_VERSIONS, NewAction, NewJob},
    store::Store,
};
use tokio::sync::Semaphore;
use tonic::transport::Channel;

/// Hooks that hold `unfinished` (what recovery reads) until the test lets it go on.
struct Recovery {
    go: Semaphore,
}

#[async_trait]
impl StoreHooks for Recovery {
    async fn before_unfinished(&self) {
        let _permit = self.go.acquire().await.expect("open");
    }
}

/// A memory store whose recovery waits for the test.
type SlowRecovery = HookedStore<Recovery>;

async fn check(health: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    health
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap_or_else(|status| panic!("health of {service:?}: {status}"))
        .into_inner()
        .status()
}

const SERVICES: [&str; 3] = ["", "longrun.v1.Jobs", "google.longrunning.Operations"];

#[tokio::test]
async fn not_serving_while_recovering_then_serving_then_not_serving_while_draining() {
    let store = Arc::new(SlowRecovery::new(Recovery {
        go: Semaphore::new(0),
    }));
    let gate = Gate::default();
    let mut server = TestServer::start_unready(store.clone(), test_config(), gate.registry()).await;
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .expect("the listener accepts while recovering");
    let mut health = HealthClient::new(channel);
    for service in SERVICES {
        assert_eq!(
            check(&mut health, service).await,
            ServingStatus::NotServing,
            "{service:?}"
        );
    }

    // A Submit made meanwhile waits for recovery instead of racing it.
    let mut client = server.client.clone();
    let submitting = tokio::spawn(async move { submit(&mut client, request(vec![gated()])).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!submitting.is_finished(), "Submit waits for recovery");

    store.hooks.go.add_permits(1);
    server.until_health(ServingStatus::Serving).await;
    for service in SERVICES {
        assert_eq!(
            check(&mut health, service).await,
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    let job = tokio::time::timeout(PATIENCE, submitting)
        .await
        .expect("Submit answers after recovery")
        .expect("submit task");
    gate.next_started().await;

    // The gated job holds the drain open: health reads NOT_SERVING meanwhile.
    server.begin_stop();
    tokio::time::timeout(PATIENCE, async {
        while check(&mut health, "").await != ServingStatus::NotServing {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("NOT_SERVING once draining");
    for service in SERVICES {
        assert_eq!(
            check(&mut health, service).await,
            ServingStatus::NotServing,
            "{service:?}"
        );
    }
    assert_eq!(
        get(&mut server.client.clone(), &job.id).await.state,
        JobState::Running as i32,
        "still draining"
    );
    gate.release(1);
    server.stop().await;
}

/// Reads wait for recovery as Submit does: until it has run, the store holds what the
/// previous process left, such as a job RUNNING at its last saved version, below the
/// progress versions its watchers were shown. A watch resumed after one of those in that
/// window was refused as "from the future" (and the CLI gave up on it).
#[tokio::test]
async fn reads_made_while_recovering_wait_for_it_and_see_its_outcome() {
    let store = Arc::new(SlowRecovery::new(Recovery {
        go: Semaphore::new(0),
    }));
    // As a killed server leaves it: running, its progress saved some versions back.
    let now = SystemTime::now();
    let spec = NewJob {
        actions: vec![NewAction {
            name: "sleep".to_owned(),
            params: serde_json::Map::new(),
            input: Default::default(),
        }],
        // An attempt to spare, so that recovery re-queues it.
        max_attempts: Some(2),
        ..NewJob::default()
    };
    let mut left = Job::new(JobId::generate(), spec, 1, now);
    left.start(now).unwrap();
    left.start_action(0, now).unwrap();
    store.create(&left).await.unwrap();
    let shown_before_the_crash = left.version + 20;

    let server =
        TestServer::start_unready(store.clone(), test_config(), Registry::with_builtins()).await;
    let id = left.id.to_string();
    let mut client = server.client.clone();
    let watch_id = id.clone();
    let watching = tokio::spawn(async move {
        let mut stream = client
            .watch_job(pb::WatchJobRequest {
                job_id: watch_id,
                after_version: shown_before_the_crash,
            })
            .await?
            .into_inner();
        stream.message().await
    });
    let mut client = server.client.clone();
    let status_id = id.clone();
    let reading = tokio::spawn(async move { get(&mut client, &status_id).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!watching.is_finished(), "WatchJob waits for recovery");
    assert!(!reading.is_finished(), "GetStatus waits for recovery");

    store.hooks.go.add_permits(1);
    let first = tokio::time::timeout(PATIENCE, watching)
        .await
        .expect("the watch answers after recovery")
        .expect("watch task")
        .expect("resumed, not refused")
        .expect("a message")
        .job
        .expect("job");
    assert!(
        first.version > left.version + MAX_UNPERSISTED_VERSIONS,
        "{}",
        first.version
    );
    let read = tokio::time::timeout(PATIENCE, reading)
        .await
        .expect("GetStatus answers after recovery")
        .expect("status task");
    assert!(
        read.attempt >= 2,
        "the interrupted run was re-queued: {read:?}"
    );
}
