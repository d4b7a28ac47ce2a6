//! What the generated `time` and `received_at` columns cost at insert: SQLite computes every
//! generated column, virtual ones included, for each inserted row (then leaves the virtual
//! ones out of the record). Inserts the bench's row shape (three reals) into the same table
//! without the two columns, with format version 1's (`strftime`) and with version 2's
//! (`datetime(..., 'subsec')`, same text), on the bundled SQLite, and prints µs per row.
//!
//! ```sh
//! cargo run --release -p cairn-gateway --example generated_columns
//! ```

use std::time::Instant;

use cairn_gateway::db::schema::{STORED_TIME_COLUMNS, TIME_COLUMNS, TIME_COLUMNS_V1};
use rusqlite::Connection;

const ROWS: i64 = 300_000;

fn per_row(time_columns: Option<&str>) -> rusqlite::Result<f64> {
    let conn = Connection::open_in_memory()?;
    let generated = time_columns.map(|c| format!(", {c}")).unwrap_or_default();
    conn.execute_batch(&format!(
        "CREATE TABLE climate (device_id INTEGER NOT NULL, seq INTEGER NOT NULL{generated}, \
         temperature REAL, humidity REAL, pressure REAL, {STORED_TIME_COLUMNS}, \
         PRIMARY KEY (device_id, seq)) WITHOUT ROWID"
    ))?;
    let started = Instant::now();
    let tx = conn.unchecked_transaction()?;
    {
        let mut insert = tx.prepare(
            "INSERT OR IGNORE INTO climate (device_id, seq, time_ms, age_ms, temperature, \
             humidity, pressure) VALUES (?1, ?2, ?3, ?4, 20.1, 48.25, 1013.0)",
        )?;
        for i in 0..ROWS {
            insert.execute(rusqlite::params![i % 100, i, 1_764_873_840_123 + i * 7, 15])?;
        }
    }
    tx.commit()?;
    Ok(started.elapsed().as_secs_f64() * 1e6 / ROWS as f64)
}

fn main() -> rusqlite::Result<()> {
    // Twice each, alternated, so that no variant always runs first.
    for _ in 0..2 {
        println!(
            "without time columns:             {:.2} µs/row",
            per_row(None)?
        );
        println!(
            "with version 1's (strftime):      {:.2} µs/row",
            per_row(Some(TIME_COLUMNS_V1))?
        );
        println!(
            "with version 2's (datetime, T, Z): {:.2} µs/row",
            per_row(Some(TIME_COLUMNS))?
        );
    }
    Ok(())
}
