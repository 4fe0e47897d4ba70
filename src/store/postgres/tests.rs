//! The PostgreSQL store against the shared conformance suite, and what only it owes: migrations
//! under an advisory lock, schema versions, group commit, event numbers in commit order across
//! stores, the serve lock, and what replicas share: claims, leases and the change feed.
//!
//! Every test runs only when `LONGRUN_TEST_DATABASE_URL` is set (`.ci/run` sets it), each store
//! in a fresh schema of its own that is dropped when the test ends, passed or not.

use std::{collections::BTreeSet, sync::Arc, sync::Mutex, time::SystemTime};

use super::*;
use crate::job::{JobError, JobState};
use crate::store::conformance::{self, sample_job};

/// The variable naming the database the tests may use.
const URL_VARIABLE: &str = "LONGRUN_TEST_DATABASE_URL";

/// The test database's URL, or `None` (after saying so) when tests must skip.
fn database_url() -> Option<String> {
    match std::env::var(URL_VARIABLE) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            println!("skipped: {URL_VARIABLE} not set");
            None
        }
    }
}

/// A schema of its own for one test, dropped (with everything in it) when this is dropped,
/// also while a failing test unwinds.
struct TestSchema {
    base_url: String,
    name: String,
}

impl TestSchema {
    async fn create(base_url: &str) -> TestSchema {
        let name = format!("lr_test_{:016x}", rand::random::<u64>());
        let (client, connection) = tokio_postgres::connect(base_url, NoTls).await.unwrap();
        tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await
            .unwrap();
        TestSchema {
            base_url: base_url.to_owned(),
            name,
        }
    }

    /// The database URL with this schema as the `search_path`.
    fn url(&self) -> String {
        with_schema(&self.base_url, &self.name)
    }

    /// A store in this schema.
    async fn open(&self, options: PostgresOptions) -> Result<PostgresStore, StoreError> {
        PostgresStore::open(&self.url(), options).await
    }

    /// A plain connection in this schema, around the store.
    async fn raw(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(), NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        // Its own thread and runtime: Drop cannot await, and may run inside a runtime.
        let (url, name) = (self.base_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let (client, connection) = tokio_postgres::connect(&url, NoTls).await?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!(
                        "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {name} CASCADE"
                    ))
                    .await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test schema {}: {dropped:?}", self.name);
        }
    }
}

/// `url` with `schema` as its `search_path`, for URLs and for key=value strings.
fn with_schema(url: &str, schema: &str) -> String {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}options=-csearch_path%3D{schema}")
    } else {
        format!("{url} options='-csearch_path={schema}'")
    }
}

#[tokio::test]
async fn postgres_store_conforms() {
    let Some(url) = database_url() else { return };
    let schemas = Mutex::new(Vec::new());
    let (schemas, url) = (&schemas, &url);
    conformance::run_all(move || async move {
        let schema = TestSchema::create(url).await;
        let store = schema.open(PostgresOptions::default()).await.unwrap();
        schemas.lock().unwrap().push(schema);
        store
    })
    .await;
}

#[tokio::test]
async fn data_survives_close_and_reopen() {
    let Some(url) = database_url() else { return };
    let schema = TestSchema::create(&url).await;
    let now = SystemTime::now();
    let mut job = sample_job(2, &[("team", "a")], Some("key-1"));
    {
        let store = schema.open(PostgresOptions::default()).await.unwrap();
        store.create(&job).await.unwrap();
        job.start(now).unwrap();
        store.save(&job).await.unwrap();
        store.close().await;
        assert!(matches!(store.get(job.id).await, Err(StoreError::Closed)));
        assert!(matches!(store.save(&job).await, Err(StoreError::Closed)));
    }
    let store = schema.open(PostgresOptions::default()).await.unwrap();
    assert_eq!(store.get(job.id).await.unwrap(), Some(job.clone()));
    let versions: Vec<i64> = store
        .transitions(job.id, 0)
        .await
        .unwrap()
        .iter()
        .map(|j| j.version)
        .collect();
    assert_eq!(versions, vec![1, 2]);
    let retry = sample_job(1, &[], Some("key-1"));
    assert_eq!(
        store.create(&retry).await.unwrap(),
        Created::Existing(Box::new(job))
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_opening_together_migrate_once() {
    let Some(url) = database_url() else { return };
    let schema = TestSchema::create(&url).await;
    let opens: Vec<_> = (0..3)
        .map(|_| {
            let url = schema.url();
            tokio::spawn(async move { PostgresStore::open(&url, PostgresOptions::default()).await })
        })
        .collect();
    let mut stores = Vec::new();
    for open in opens {
        stores.push(open.await.unwrap().expect("every store opens"));
    }
    // And once more, over a migrated schema.
    stores.push(schema.open(PostgresOptions::default()).await.unwrap());
    let applied: Vec<i64> = schema
        .raw()
        .await
        .query("SELECT version FROM longrun_schema ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        applied,
        (1..=schema::supported_version()).collect::<Vec<_>>()
    );
    // All of them work on the one schema.
    let job = sample_job(1, &[], None);
    stores[0].create(&job).await.unwrap();
    assert_eq!(stores[3].get(job.id).await.unwrap(), Some(job));
    for store in stores {
        store.close().await;
    }
}

/// A fresh schema that a store has migrated to this build's newest version, then let go of.
async fn migrated_schema(url: &str) -> TestSchema {
    let schema = TestSchema::create(url).await;
    schema
        .open(PostgresOptions::default())
        .await
        .unwrap()
        .close()
        .await;
    schema
}

#[tokio::test]
async fn a_newer_schema_is_refused_and_left_alone() {
    let Some(url) = database_url() else { return };
    let schema = migrated_schema(&url).await;
    let newer = schema::supported_version() + 1;
    let raw = schema.raw().await;
    raw.execute(
        "INSERT INTO longrun_schema (version, name) VALUES ($1, 'from_the_future')",
        &[&newer],
    )
    .await
    .unwrap();
    match schema.open(PostgresOptions::default()).await {
        Err(StoreError::IncompatibleSchema { found, supported }) => {
            assert_eq!((found, supported), (newer, schema::supported_version()));
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a newer schema was opened"),
    }
    let count: i64 = raw
        .query_one("SELECT count(*) FROM longrun_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, newer, "nothing was written");
}

#[tokio::test]
async fn a_schema_migrated_by_another_build_is_refused_naming_the_migration() {
    let Some(url) = database_url() else { return };
    let schema = migrated_schema(&url).await;
    let raw = schema.raw().await;
    raw.execute(
        "UPDATE longrun_schema SET name = 'something_else' WHERE version = 2",
        &[],
    )
    .await
    .unwrap();
    match schema.open(PostgresOptions::default()).await {
        Err(StoreError::SchemaMismatch {
            version,
            found,
            expected,
        }) => {
            assert_eq!(version, 2);
            assert_eq!(found, "something_else");
            assert_eq!(expected, "0002_leases");
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a schema of another build was opened"),
    }
}

#[tokio::test]
async fn a_missing_schema_is_a_clear_error() {
    let Some(url) = database_url() else { return };
    let url = with_schema(&url, "lr_test_does_not_exist");
    let error = PostgresStore::open(&url, PostgresOptions::default())
        .await
        .err()
        .expect("no schema, no store");
    assert!(
        error.to_string().contains("opening the PostgreSQL store"),
        "{error}"
    );
}

#[tokio::test]
async fn the_database_checks_rows() {
    let Some(url) = database_url() else { return };
    let schema = TestSchema::create(&url).await;
    let store = schema.open(PostgresOptions::default()).await.unwrap();
    let job = sample_job(1, &[], Some("k"));
    store.create(&job).await.unwrap();
    let raw = schema.raw().await;
    let insert = |id: uuid::Uuid, tenant: &str, state: &str, key: Option<&str>| {
        let (tenant, state, key) = (tenant.to_owned(), state.to_owned(), key.map(str::to_owned));
        let raw = &raw;
        async move {
            raw.execute(
                "INSERT INTO jobs (id, tenant, state, version, priority, idempotency_key, snapshot)
                 VALUES ($1, $2, $3, 1, 0, $4, '{}')",
                &[&id, &tenant, &state, &key],
            )
            .await
        }
    };
    assert!(
        insert(uuid::Uuid::now_v7(), "default", "BOGUS", None)
            .await
            .is_err(),
        "CHECK on state"
    );
    assert!(
        insert(uuid::Uuid::now_v7(), &job.tenant, "QUEUED", Some("k"))
            .await
            .is_err(),
        "UNIQUE (tenant, idempotency_key)"
    );
    assert!(
        insert(uuid::Uuid::now_v7(), "other", "QUEUED", Some("k"))
            .await
            .is_ok(),
        "the same key in another tenant"
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_share_commits() {
    let Some(url) = database_url() else { return };
    let schema = TestSchema::create(&url).await;
    let store = Arc::new(schema.open(PostgresOptions::default()).await.unwrap());
    let tasks: Vec<_> = (0..300)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.create(&sample_job(1, &[], None)).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), Created::New);
    }
    let stats = store.stats();
    assert_eq!(stats.commands, 300);
    assert!(
        stats.batches < stats.commands / 4,
        "300 concurrent creates took {} commits",
        stats.batches
    );
    store.close().await;
}

/// Holds the writer, runs `spawn` (whose tasks queue `count` writes), waits until all are
/// queued and lets the writer go, so that the writes share one batch. Returns their results
/// and how many batches committed meanwhile.
async fn queued_together<T>(
    store: &PostgresStore,
    count: usize,
    spawn: impl FnOnce() -> Vec<tokio::task::JoinHandle<T>>,
) -> (Vec<T>, u64) {
    let release = store.hold_writer().await;
    let tasks = spawn();
    for _ in 0..100_000 {
        if store.queued() >= count {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(store.queued() >= count, "the writes were queued");
    let before = store.stats();
    drop(release);
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    (results, store.stats().batches - before.batches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_save_fails_alone_in_its_batch() {
    let Some(url) = database_url() else { return };
    let schema = TestSchema::create(&url).await;
    let store = Arc::new(schema.open(PostgresOptions::default()).await.unwrap());
    let now = SystemTime::now();
    let mut jobs = Vec::new();
    for _ in 0..4 {
        let job = sample_job(1, &[], None);
        store.create(&job).await.unwrap();
        jobs.push(job);
    }
    let mut stale = jobs[1].clone();
    for job in &mut jobs {
        job.start(now).unwrap();
    }
    stale.version = 1;
    let missing = {
        let mut job = sample_job(1, &[], None);
        job.start(now).unwrap();
        job
    };
    let saves = vec![
        jobs[0].clone(),
        jobs[1].clone(),
        stale,
        missing.clone(),
        jobs[2].clone(),
        jobs[3].clone(),
    ];
    let (results, commits) = queued_together(&store, saves.len(), || {
        saves
            .into_iter()
            .map(|job| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.save(&job).await })
            })
            .collect()
    })
    .await;
    assert_eq!(commits, 1);
    assert!(
        matches!(
            results[2],
            Err(StoreError::StaleVersion { attempted: 1, .. })
        ),
        "{:?}",
        results[2]
    );
    assert!(
        matches!(results[3], Err(StoreError::Missing(id)) if id == missing.id),
        "{:?}",
        results[3]
    );
    for (i, result) in results
        .iter()
        .enumerate()
        .filter(|(i, _)| ![2, 3].contains(i))
    {
        assert!(result.is_ok(), "save {i} failed: {result:?}");
    }
    for job in &jobs {
        assert_eq!(store.get(job.id).await.unwrap().as_ref(), Some(job));
        assert_eq!(
            store.transitions(job.id, 1).await.unwrap(),
            vec![job.clone()]
        );
    }
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_twice_in_one_batch_stores_one_job() {
    let Some(url) = database_url() else { return };
    let schema = TestSchema::create(&url).await;
    let store = Arc::new(schema.open(PostgresOptions::default()).await.unwrap());
    let jobs = [sample_job(1, &[], Some("k")), sample_job(1, &[], Some("k"))];
    let creates = jobs.clone();
    let (results, commits) = queued_together(&store, 2, || {
        creates
            .into_iter()
            .map(|job| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.create(&job).await.unwrap() })
            })
            .collect()
    })
    .await;
    assert_eq!(commits, 1);
    let winner = if results[0] == Created::New { 0 } else { 1 };
    assert_eq!(
        results[1 - winner],
        Created::Existing(Box::new(jobs[winner].clone()))
    );
    assert_eq!(store.get(jobs[1 - winner].id).await.unwrap(), None);
    store.close().await;
}

/// Two stores on one schema (as two processes would be) write concurrently while a reader
/// follows the event log with a cursor: the reader never skips a number, because committed
/// numbers always form a prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_numbers_commit_in_order_across_stores() {
    let Some(url) = database_url() else { return };
    let schema = TestSchema::create(&url).await;
    let stores = [
        Arc::new(schema.open(PostgresOptions::default()).await.unwrap()),
        Arc::new(schema.open(PostgresOptions::default()).await.unwrap()),
    ];
    let writers: Vec<_> = (0..6)
        .map(|i| {
            let store = Arc::clone(&stores[i % 2]);
            tokio::spawn(async move {
                for _ in 0..25 {
                    let mut job = sample_job(1, &[], None);
                    store.create(&job).await.unwrap();
                    job.start(SystemTime::now()).unwrap();
                    store.save(&job).await.unwrap();
                }
            })
        })
        .collect();
    let reader = {
        let store = Arc::clone(&stores[0]);
        let labels = BTreeMap::new();
        async move {
            let mut cursor = 0;
            let mut seen = Vec::new();
            // Bounded: 300 events, and every read that finds nothing yields first.
            for _ in 0..100_000 {
                let page = store.events_after(cursor, None, &labels, 7).await.unwrap();
                for (seq, _) in &page.events {
                    seen.push(*seq);
                }
                cursor = page.scanned_to;
                if seen.len() >= 300 {
                    break;
                }
                if page.events.is_empty() {
                    tokio::task::yield_now().await;
                }
            }
            seen
        }
    };
    let (seen, _) = tokio::join!(reader, async {
        for writer in writers {
            writer.await.unwrap();
        }
    });
    assert_eq!(
        seen,
        (1..=300).collect::<Vec<i64>>(),
        "a number was skipped"
    );
    for store in stores {
        store.close().await;
    }
}

#[tokio::test]
async fn only_one_exclusive_store_per_schema() {
    let Some(url) = database_url() else { return };
    let schema = TestSchema::create(&url).await;
    let exclusive = PostgresOptions {
        exclusive: true,
        ..PostgresOptions::default()
    };
    let first = schema.open(exclusive.clone()).await.unwrap();
    match schema.open(exclusive.clone()).await {
        Err(error @ StoreError::ReplicaRunning { .. }) => {
            let message = error.to_string();
            assert!(
                message.contains("holds this database exclusively"),
                "{message}"
            );
            assert!(message.contains(&schema.name), "{message}");
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("two exclusive stores on one schema"),
    }
    // Another schema of the same database is another service.
    let other = TestSchema::create(&url).await;
    other.open(exclusive.clone()).await.unwrap().close().await;
    // Once the first is closed, its lock is free.
    first.close().await;
    schema.open(exclusive).await.unwrap().close().await;
}

#[tokio::test]
async fn purge_and_delete_mark_removed_events() {
    let Some(url) = database_url() else { return };
    let schema = TestSchema::create(&url).await;
    let store = schema.open(PostgresOptions::default()).await.unwrap();
    let mut job = sample_job(1, &[], None);
    store.create(&job).await.unwrap();
    job.cancel(
        JobError::new("CANCELLED", "CANCELLED", "x"),
        SystemTime::now(),
    )
    .unwrap();
    store.save(&job).await.unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    let removed = store
        .purge_finished(SystemTime::now() + Duration::from_secs(1), 10)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    let page = store
        .events_after(0, None, &BTreeMap::new(), 10)
        .await
        .unwrap();
    assert!(page.events.is_empty());
    assert_eq!((page.removed_through, page.scanned_to), (2, 2));
    // A number is never handed out again.
    let next = sample_job(1, &[], None);
    store.create(&next).await.unwrap();
    let seqs: BTreeSet<i64> = store
        .events_after(0, None, &BTreeMap::new(), 10)
        .await
        .unwrap()
        .events
        .iter()
        .map(|(seq, _)| *seq)
        .collect();
    assert_eq!(seqs, BTreeSet::from([3]));
    store.close().await;
}

/// Takes (or gives back) the schema's write lock on a plain connection, as another process
/// would hold it.
async fn hold_write_lock(client: &tokio_postgres::Client, hold: bool) {
    let sql = if hold {
        "SELECT pg_advisory_lock($1, hashtext(current_schema()))"
    } else {
        "SELECT pg_advisory_unlock($1, hashtext(current_schema()))"
    };
    client.execute(sql, &[&WRITE_LOCK]).await.unwrap();
}

/// Every write transaction takes the schema's write lock first, also against another process:
/// while a plain connection holds it, a store's write waits, and it commits once released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_for_the_write_lock_of_other_processes() {
    let Some(url) = database_url() else { return };
    let schema = TestSchema::create(&url).await;
    let store = Arc::new(schema.open(PostgresOptions::default()).await.unwrap());
    let other = schema.raw().await;
    hold_write_lock(&other, true).await;
    let job = sample_job(1, &[], None);
    let create = tokio::spawn({
        let (store, job) = (Arc::clone(&store), job.clone());
        async move { store.create(&job).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!create.is_finished(), "the write waited for the lock");
    assert_eq!(store.get(job.id).await.unwrap(), None, "reads do not wait");
    hold_write_lock(&other, false).await;
    assert_eq!(create.await.unwrap().unwrap(), Created::New);
    assert_eq!(store.get(job.id).await.unwrap(), Some(job));
    store.close().await;
}

/// A renewal locks many job rows in one statement, so it takes the write lock first, as a
/// write batch does: the two can then never lock the same rows in opposite orders (which
/// PostgreSQL would end by aborting one of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_renewals_wait_for_the_write_lock() {
    let Some(url) = database_url() else { return };
    let schema = TestSchema::create(&url).await;
    let store = Arc::new(schema.open(PostgresOptions::default()).await.unwrap());
    let job = sample_job(1, &[], None);
    store.create(&job).await.unwrap();
    let claimed = SharedStore::claim(&*store, 1, &[]).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let other = schema.raw().await;
    hold_write_lock(&other, true).await;
    let renew = tokio::spawn({
        let store = Arc::clone(&store);
        async move { SharedStore::renew_leases(&*store).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!renew.is_finished(), "the renewal waited for the lock");
    hold_write_lock(&other, false).await;
    let renewal = renew.await.unwrap().unwrap();
    assert_eq!(renewal.held, [job.id]);
    store.close().await;
}

/// `count` jobs with priorities cycling 0..3, created in `store`.
async fn queued_jobs(store: &PostgresStore, count: usize) -> Vec<Job> {
    let mut jobs = Vec::new();
    for n in 0..count {
        let mut job = sample_job(1, &[], None);
        job.priority = (n % 3) as i32;
        store.create(&job).await.unwrap();
        jobs.push(job);
    }
    jobs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_claiming_together_never_take_the_same_job() {
    let Some(url) = database_url() else { return };
    let schema = TestSchema::create(&url).await;
    let a = Arc::new(schema.open(PostgresOptions::default()).await.unwrap());
    let b = Arc::new(schema.open(PostgresOptions::default()).await.unwrap());
    let jobs = queued_jobs(&a, 40).await;

    // The first claim takes the highest priority first, then the oldest.
    let first = SharedStore::claim(&*a, 2, &[]).await.unwrap();
    let mut expected: Vec<&Job> = jobs.iter().collect();
    expected.sort_by(|x, y| y.priority.cmp(&x.priority).then(x.id.cmp(&y.id)));
    assert_eq!(
        first.iter().map(|job| job.id).collect::<Vec<_>>(),
        expected[..2].iter().map(|job| job.id).collect::<Vec<_>>()
    );

    let claim_all = |store: Arc<PostgresStore>| async move {
        let mut taken = Vec::new();
        for _ in 0..100 {
            let claimed = SharedStore::claim(&*store, 3, &[]).await.unwrap();
            if claimed.is_empty() {
                break;
            }
            taken.extend(claimed.into_iter().map(|job| job.id));
        }
        taken
    };
    let (from_a, from_b) = tokio::join!(
        tokio::spawn(claim_all(Arc::clone(&a))),
        tokio::spawn(claim_all(Arc::clone(&b)))
    );
    let mut all: Vec<JobId> = first.iter().map(|job| job.id).collect();
    all.extend(from_a.unwrap());
    all.extend(from_b.unwrap());
    let distinct: BTreeSet<JobId> = all.iter().copied().collect();
    assert_eq!(all.len(), jobs.len(), "every job claimed once: {all:?}");
    assert_eq!(distinct.len(), jobs.len());
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_lease_ran_out_cannot_overwrite_the_job() {
    let Some(url) = database_url() else { return };
    let schema = TestSchema::create(&url).await;
    let short = PostgresOptions {
        lease: std::time::Duration::from_millis(200),
        ..PostgresOptions::default()
    };
    let owner = schema.open(short.clone()).await.unwrap();
    let reaper = schema.open(short).await.unwrap();
    queued_jobs(&owner, 1).await;
    let mut job = SharedStore::claim(&owner, 1, &[]).await.unwrap().remove(0);
    // Claimed: nobody else can claim it while the lease holds.
    assert!(
        SharedStore::claim(&reaper, 1, &[])
            .await
            .unwrap()
            .is_empty()
    );
    job.start(SystemTime::now()).unwrap();
    owner.save(&job).await.unwrap();
    assert_eq!(owner.renew_leases().await.unwrap().held, vec![job.id]);
    assert!(reaper.expired(10).await.unwrap().is_empty(), "lease holds");
    // A Cancel made on another replica that the owner never stored in the snapshot.
    reaper.request_cancel(job.id).await.unwrap();

    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let mut taken = reaper.expired(10).await.unwrap().remove(0);
    assert_eq!(taken.id, job.id);
    assert!(taken.cancel_requested, "the reaper sees the cancel request");
    taken.interrupt(SystemTime::now()).unwrap();
    reaper.save_expired(&taken).await.unwrap();
    // A second reaper finds nothing to do, and cannot save over the first.
    assert!(reaper.expired(10).await.unwrap().is_empty());

    // The old owner's next save (even one far ahead in versions) is refused.
    job.version = taken.version + 10;
    job.logged_version = job.version;
    assert!(matches!(
        owner.save(&job).await,
        Err(StoreError::LeaseLost(id)) if id == job.id
    ));
    assert!(owner.renew_leases().await.unwrap().held.is_empty());
    // Not by the old owner while its stale run still winds down there (a second run beside
    // it, whose lease would hide the first one's loss); by anyone else, at attempt 2.
    assert!(
        SharedStore::claim(&owner, 1, &[job.id])
            .await
            .unwrap()
            .is_empty()
    );
    let again = SharedStore::claim(&reaper, 1, &[]).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 2);
    owner.close().await;
    reaper.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_brings_other_replicas_events_and_cancels() {
    let Some(url) = database_url() else { return };
    let schema = TestSchema::create(&url).await;
    let writer = schema.open(PostgresOptions::default()).await.unwrap();
    let follower = schema.open(PostgresOptions::default()).await.unwrap();
    let mut feed = follower.feed().await.unwrap();
    let jobs = queued_jobs(&writer, 2).await;
    for job in &jobs {
        match next_change(&mut feed).await {
            crate::store::Change::Event(seen) => assert_eq!(seen.id, job.id),
            other => panic!("expected an event, got {other:?}"),
        }
    }
    // A cancel request reaches the feed, and marks a RUNNING job for its runner's renewal.
    let mut running = SharedStore::claim(&writer, 1, &[]).await.unwrap().remove(0);
    running.start(SystemTime::now()).unwrap();
    writer.save(&running).await.unwrap();
    match next_change(&mut feed).await {
        crate::store::Change::Event(seen) => assert_eq!(seen.state, JobState::Running),
        other => panic!("expected an event, got {other:?}"),
    }
    assert!(
        writer
            .renew_leases()
            .await
            .unwrap()
            .cancel_requested
            .is_empty()
    );
    writer.request_cancel(running.id).await.unwrap();
    assert!(
        follower
            .get(running.id)
            .await
            .unwrap()
            .unwrap()
            .cancel_requested,
        "any replica reads the stored request at once"
    );
    assert_eq!(
        writer.renew_leases().await.unwrap().cancel_requested,
        vec![running.id]
    );
    assert_eq!(
        next_change(&mut feed).await,
        crate::store::Change::Cancel(running.id)
    );
    writer.close().await;
    follower.close().await;
}

/// A Cancel made on one replica while another's attempt of the job ends in a retry is never
/// lost: marked while RUNNING, the release of the retried job reports it; once the job is
/// QUEUED, the mark is refused, so the canceller reads the job again and cancels it itself.
#[tokio::test]
async fn a_cancel_around_a_retry_is_seen_by_the_release_or_refused_to_the_canceller() {
    let Some(url) = database_url() else { return };
    let schema = TestSchema::create(&url).await;
    let runner = schema.open(PostgresOptions::default()).await.unwrap();
    let canceller = schema.open(PostgresOptions::default()).await.unwrap();
    let backoff = std::time::Duration::from_secs(60);
    queued_jobs(&runner, 2).await;
    for marked_first in [true, false] {
        let mut job = SharedStore::claim(&runner, 1, &[]).await.unwrap().remove(0);
        job.start(SystemTime::now()).unwrap();
        runner.save(&job).await.unwrap();
        if marked_first {
            assert!(canceller.request_cancel(job.id).await.unwrap(), "marked");
        }
        job.retry(SystemTime::now(), backoff).unwrap();
        runner.save(&job).await.unwrap();
        if marked_first {
            assert!(
                SharedStore::release(&runner, job.id).await.unwrap(),
                "the release reports the mark"
            );
        } else {
            assert!(
                !canceller.request_cancel(job.id).await.unwrap(),
                "a QUEUED job is not marked: the canceller must cancel it itself"
            );
            assert!(!SharedStore::release(&runner, job.id).await.unwrap());
        }
    }
    runner.close().await;
    canceller.close().await;
}

/// A QUEUED job that one replica claimed and another cancelled stays CANCELLED: the claimer's
/// start, a version ahead of the cancel (start and first action in one write), is refused as
/// a lost lease, and the cancel gave the lease up. Nothing changes a terminal job's state.
#[tokio::test]
async fn a_cancel_of_a_claimed_queued_job_outranks_the_claimer_s_start() {
    let Some(url) = database_url() else { return };
    let schema = TestSchema::create(&url).await;
    let claimer = schema.open(PostgresOptions::default()).await.unwrap();
    let canceller = schema.open(PostgresOptions::default()).await.unwrap();
    queued_jobs(&claimer, 1).await;
    let mut claimed = SharedStore::claim(&claimer, 1, &[])
        .await
        .unwrap()
        .remove(0);
    let mut cancelled = canceller.get(claimed.id).await.unwrap().unwrap();
    cancelled
        .cancel(
            JobError::new("CANCELLED", "CANCELLED", "cancelled"),
            SystemTime::now(),
        )
        .unwrap();
    canceller.save(&cancelled).await.unwrap();

    claimed.start(SystemTime::now()).unwrap();
    claimed.start_action(0, SystemTime::now()).unwrap();
    assert!(claimed.version > cancelled.version);
    assert!(matches!(
        claimer.save(&claimed).await,
        Err(StoreError::LeaseLost(id)) if id == claimed.id
    ));
    let stored = claimer.get(claimed.id).await.unwrap().unwrap();
    assert_eq!(stored.state, JobState::Cancelled);
    assert_eq!(stored.version, cancelled.version);
    assert!(
        claimer.renew_leases().await.unwrap().held.is_empty(),
        "lease given up"
    );

    // Not even by a save that would hold no lease: a terminal state is final.
    let mut again = stored.clone();
    again.version += 5;
    again.logged_version = again.version;
    again.state = JobState::Queued;
    assert!(canceller.save(&again).await.is_err());
    assert_eq!(
        canceller.get(claimed.id).await.unwrap().unwrap().state,
        JobState::Cancelled
    );
    claimer.close().await;
    canceller.close().await;
}

/// A Cancel that marked a job as its attempt ended in a retry stays visible once the job is
/// QUEUED again, to every replica's read, so whoever takes the job next cancels it.
#[tokio::test]
async fn a_queued_job_s_cancel_mark_is_read_with_it() {
    let Some(url) = database_url() else { return };
    let schema = TestSchema::create(&url).await;
    let runner = schema.open(PostgresOptions::default()).await.unwrap();
    let other = schema.open(PostgresOptions::default()).await.unwrap();
    queued_jobs(&runner, 1).await;
    let mut job = SharedStore::claim(&runner, 1, &[]).await.unwrap().remove(0);
    job.start(SystemTime::now()).unwrap();
    runner.save(&job).await.unwrap();
    assert!(other.request_cancel(job.id).await.unwrap());
    job.retry(SystemTime::now(), std::time::Duration::ZERO)
        .unwrap();
    runner.save(&job).await.unwrap();
    let read = other.get(job.id).await.unwrap().unwrap();
    assert_eq!(read.state, JobState::Queued);
    assert!(
        read.cancel_requested,
        "the mark is read with the QUEUED job"
    );
    runner.close().await;
    other.close().await;
}

/// The feed's next change, bounded.
async fn next_change(
    feed: &mut tokio::sync::mpsc::Receiver<crate::store::Change>,
) -> crate::store::Change {
    tokio::time::timeout(std::time::Duration::from_secs(10), feed.recv())
        .await
        .expect("a change in time")
        .expect("feed open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_takes_each_due_delivery() {
    let Some(url) = database_url() else { return };
    let schema = TestSchema::create(&url).await;
    let a = schema.open(PostgresOptions::default()).await.unwrap();
    let b = schema.open(PostgresOptions::default()).await.unwrap();
    let mut job = sample_job(1, &[], None);
    job.webhook = Some(crate::job::WebhookSpec {
        url: "https://example.com/hook".to_owned(),
        secret: "kept".to_owned(),
        events: crate::job::WebhookEvents::All,
    });
    a.create(&job).await.unwrap();
    let now = SystemTime::now();
    let due = a.due_deliveries(now, 10).await.unwrap();
    assert_eq!(due.len(), 1, "the QUEUED notification is due");
    let id = due[0].delivery.id;
    let hold = std::time::Duration::from_secs(15);
    assert!(a.claim_delivery(id, now, hold).await.unwrap());
    assert!(
        !b.claim_delivery(id, now, hold).await.unwrap(),
        "taken once"
    );
    assert!(b.due_deliveries(now, 10).await.unwrap().is_empty());
    a.close().await;
    b.close().await;
}

/// Jobs stored before migration 5, and those a replica older than it still inserts, keep their
/// place in line by submission: neither jumps ahead of (nor falls behind) the jobs written
/// after it.
#[tokio::test]
async fn jobs_from_before_the_readiness_column_keep_their_place_by_submission() {
    let Some(url) = database_url() else { return };
    let schema = TestSchema::create(&url).await;
    let raw = schema.raw().await;
    raw.batch_execute(
        "CREATE TABLE longrun_schema (
             version bigint PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .unwrap();
    for (index, (name, sql)) in schema::MIGRATIONS[..4].iter().enumerate() {
        raw.batch_execute(sql).await.unwrap();
        raw.execute(
            "INSERT INTO longrun_schema (version, name) VALUES ($1, $2)",
            &[&(index as i64 + 1), name],
        )
        .await
        .unwrap();
    }
    // As a version-4 replica writes a job: no readiness column.
    let insert_as_version_4 = |job: Job| {
        let raw = &raw;
        async move {
            let snapshot = serde_json::to_string(&job).unwrap();
            raw.execute(
                "INSERT INTO jobs (id, tenant, state, version, priority, snapshot)
                 VALUES ($1, $2, 'QUEUED', 1, 0, $3)",
                &[job.id.as_uuid(), &job.tenant, &snapshot],
            )
            .await
            .unwrap();
        }
    };
    let fresh = || {
        let mut job = sample_job(1, &[], None);
        job.priority = 0;
        job.schedule_time = None;
        job
    };
    let before = fresh();
    insert_as_version_4(before.clone()).await;
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;

    let store = schema.open(PostgresOptions::default()).await.unwrap();
    let written_after = fresh();
    store.create(&written_after).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    let by_an_old_replica = fresh();
    insert_as_version_4(by_an_old_replica.clone()).await;

    // One at a time: which job a claim picks is the database's order (a batch is sorted
    // again here).
    let mut claimed = Vec::new();
    for _ in 0..3 {
        let jobs = SharedStore::claim(&store, 1, &[]).await.unwrap();
        assert_eq!(jobs.len(), 1, "a claim of one takes one");
        claimed.push(jobs[0].id);
    }
    assert_eq!(
        claimed,
        [before.id, written_after.id, by_an_old_replica.id],
        "claimed by submission"
    );
    store.close().await;
}
