//! PostgreSQL for the tests that need it: they run when `LONGRUN_TEST_DATABASE_URL` is set
//! (`.ci/run` sets it), each in a schema of its own that is dropped afterwards.

/// The variable that names the test database.
pub const URL_VARIABLE: &str = "LONGRUN_TEST_DATABASE_URL";

/// The test database's URL, or `None` after saying that the test is skipped.
pub fn database_url() -> Option<String> {
    match std::env::var(URL_VARIABLE) {
        Ok(url) => Some(url),
        Err(_) => {
            println!("skipped: {URL_VARIABLE} not set");
            None
        }
    }
}

/// A schema of its own, dropped (with its tables) when this is dropped, passed or failed.
pub struct TestSchema {
    pub base_url: String,
    pub name: String,
}

impl TestSchema {
    /// Creates a fresh schema `lr_test_<random>`.
    pub fn create(base_url: &str) -> TestSchema {
        let name = format!("lr_test_{:016x}", rand::random::<u64>());
        run_sql(base_url, &format!("CREATE SCHEMA {name}")).expect("create the test schema");
        TestSchema {
            base_url: base_url.to_owned(),
            name,
        }
    }

    /// The URL that puts a store's tables in this schema.
    pub fn url(&self) -> String {
        let separator = if self.base_url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!(
            "{}{separator}options=-csearch_path%3D{}",
            self.base_url, self.name
        )
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let sql = format!(
            "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {} CASCADE",
            self.name
        );
        if let Err(error) = run_sql(&self.base_url, &sql) {
            eprintln!("could not drop test schema {}: {error}", self.name);
        }
    }
}

/// Runs `sql` on a connection of its own, on a thread and runtime of its own.
pub fn run_sql(url: &str, sql: &str) -> Result<(), String> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            client.batch_execute(&sql).await.map_err(|e| e.to_string())
        })
    })
    .join()
    .map_err(|_| "the SQL thread panicked".to_owned())?
}
