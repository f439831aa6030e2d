//! SQLite's process-wide settings (`src/store/sqlite/library.rs`) take hold
//! when made before its first connection, as `main` makes them: its memory
//! then comes from mimalloc and it keeps no statistics. A test binary of
//! its own, so that nothing has opened SQLite before.
use rusqlite::ffi;

#[test]
fn sqlite_takes_its_memory_from_mimalloc_and_keeps_no_statistics() {
    // SAFETY: this binary's one test; no other thread uses SQLite.
    assert!(unsafe { bucket::store::before_first_connection() });
    let conn = rusqlite::Connection::open_in_memory().unwrap();
    conn.execute_batch("CREATE TABLE t (x TEXT); INSERT INTO t VALUES (hex(randomblob(5000)));")
        .unwrap();
    let n: i64 = conn
        .query_row("SELECT length(x) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 10_000);
    // SAFETY: the pointer is SQLite's, freed once.
    unsafe {
        let p = ffi::sqlite3_malloc(64);
        assert!(libmimalloc_sys::mi_is_in_heap_region(p.cast()));
        ffi::sqlite3_free(p);
        assert_eq!(ffi::sqlite3_memory_used(), 0, "no statistics kept");
    }
    drop(conn);
    // Refused once SQLite has opened: live memory never changes allocator.
    // SAFETY: as above.
    assert!(!unsafe { bucket::store::before_first_connection() });
}
