//! SQLite's process-wide settings, made before its first connection.
//!
//! - Its memory comes from mimalloc, the process's allocator, instead of
//!   the C library's malloc: glibc's malloc and free took 6–7 % of the
//!   fold thread's samples, and with mimalloc's the thread's samples fell
//!   by a ninth (BENCHMARKS.md, seventeenth session).
//! - It keeps no memory statistics, which nothing here reads: while they
//!   are kept, every allocation of every connection takes one process-wide
//!   mutex, and under a sustained load the fold thread spent a twentieth
//!   of its time waking threads that waited on it.
//!
//! Invariant: either both settings hold for the process's whole life or
//! neither does. SQLite refuses them once a connection has opened
//! (`SQLITE_MISUSE`), so memory it allocated before is never handed to
//! the other allocator.
use std::os::raw::{c_int, c_void};

use libmimalloc_sys as mi;
use rusqlite::ffi;

unsafe extern "C" fn malloc(n: c_int) -> *mut c_void {
    // SAFETY: mimalloc takes any size; SQLite never asks for a negative one.
    unsafe { mi::mi_malloc(n.max(0) as usize) }
}

unsafe extern "C" fn free(p: *mut c_void) {
    // SAFETY: SQLite frees only what `malloc` and `realloc` gave it.
    unsafe { mi::mi_free(p) }
}

unsafe extern "C" fn realloc(p: *mut c_void, n: c_int) -> *mut c_void {
    // SAFETY: as `free`; mimalloc's realloc keeps the contents.
    unsafe { mi::mi_realloc(p, n.max(0) as usize) }
}

unsafe extern "C" fn size(p: *mut c_void) -> c_int {
    // SAFETY: as `free`.
    let n = unsafe { mi::mi_usable_size(p) };
    c_int::try_from(n).unwrap_or(c_int::MAX)
}

/// SQLite's own rounding (8-byte multiples), which mimalloc's size
/// classes hold.
extern "C" fn roundup(n: c_int) -> c_int {
    n.max(0).saturating_add(7) & !7
}

extern "C" fn init(_: *mut c_void) -> c_int {
    ffi::SQLITE_OK
}

extern "C" fn shutdown(_: *mut c_void) {}

/// Applies the settings; false if SQLite had already opened a connection
/// and kept its own.
///
/// # Safety
/// No other thread may use SQLite during the call (`sqlite3_config`'s
/// rule): `main` calls it before it starts any.
pub unsafe fn before_first_connection() -> bool {
    let methods = ffi::sqlite3_mem_methods {
        xMalloc: Some(malloc),
        xFree: Some(free),
        xRealloc: Some(realloc),
        xSize: Some(size),
        xRoundup: Some(roundup),
        xInit: Some(init),
        xShutdown: Some(shutdown),
        pAppData: std::ptr::null_mut(),
    };
    // SAFETY: the caller's promise above, with the argument type each
    // option takes (SQLite copies the methods). The allocator goes first:
    // if it is refused, so is the other (both need SQLite uninitialized).
    unsafe {
        ffi::sqlite3_config(ffi::SQLITE_CONFIG_MALLOC, &raw const methods) == ffi::SQLITE_OK
            && ffi::sqlite3_config(ffi::SQLITE_CONFIG_MEMSTATUS, 0 as c_int) == ffi::SQLITE_OK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_methods_are_mimallocs() {
        // SAFETY: each pointer is used only while live and within its size.
        unsafe {
            let p = malloc(100);
            assert!(mi::mi_is_in_heap_region(p));
            assert!(size(p) >= 100);
            p.cast::<u8>().write_bytes(7, 100);
            let q = realloc(p, 5000);
            assert!(size(q) >= 5000);
            assert_eq!(*q.cast::<u8>().add(99), 7, "realloc keeps the contents");
            free(q);
        }
        assert_eq!(roundup(1), 8);
        assert_eq!(roundup(16), 16);
    }
}
