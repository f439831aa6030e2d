//! The process's memory allocator: mimalloc, with its options for a
//! server that must stay small.
//!
//! Invariant: [`tune`] runs before the process's first allocation (`main`
//! calls it from the ELF constructors, where nothing has allocated yet:
//! mimalloc reserves its first arena at the first allocation, committed or
//! not as the option says then), allocates nothing itself, and never
//! overrides an option its `MIMALLOC_*` environment variable sets (an
//! operator's choice wins).
use std::ffi::CStr;
use std::os::raw::c_long;

use libmimalloc_sys as ffi;

/// The allocator `main` installs.
pub type Allocator = mimalloc::MiMalloc;

/// mimalloc v3's option numbers (`mi_option_t` in its `mimalloc.h`); the
/// Rust bindings name neither. `options_are_where_we_think` checks them
/// against their defaults, so an upgrade that moves them fails a test.
const ARENA_EAGER_COMMIT: ffi::mi_option_t = 4;
const PURGE_DELAY: ffi::mi_option_t = 15;

/// Freed memory goes back to the system after 10 ms, and arenas are
/// committed as they are used. Under a sustained closed loop (BENCHMARKS.md,
/// fifth session): the defaults held 120-127 MiB; these 62-63 MiB and
/// delivered 19.5-20.1k/s; a 0 ms delay 59 MiB but 15.8-18.0k/s (every
/// page freed and faulted in again, with a TLB shootdown each), 50 ms
/// 67-68 MiB for 20.2-20.5k/s. Set after the first allocation instead,
/// arena_eager_commit no longer counts (the first arena is reserved by
/// then): 91 MiB.
pub extern "C" fn tune() {
    set_unless_given(ARENA_EAGER_COMMIT, c"MIMALLOC_ARENA_EAGER_COMMIT", 0);
    set_unless_given(PURGE_DELAY, c"MIMALLOC_PURGE_DELAY", 10);
}

fn set_unless_given(option: ffi::mi_option_t, env: &CStr, value: c_long) {
    // SAFETY: getenv reads the environment the loader set up (no thread
    // changes it yet) and allocates nothing; mi_option_set sets one number
    // in mimalloc's option table, read at the option's next use.
    unsafe {
        if libc::getenv(env.as_ptr()).is_null() {
            ffi::mi_option_set(option, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_where_we_think() {
        // mimalloc v3's defaults: arena_eager_commit 2 (on where the OS
        // overcommits), purge_delay 1,000 ms.
        // SAFETY: reads mimalloc's option table.
        let (eager, delay) = unsafe {
            (
                ffi::mi_option_get(ARENA_EAGER_COMMIT),
                ffi::mi_option_get(PURGE_DELAY),
            )
        };
        assert_eq!((eager, delay), (2, 1000));
    }
}
