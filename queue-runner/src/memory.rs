//! How much heap the queue runner holds: a global allocator that wraps
//! mimalloc and counts the bytes currently allocated.
//!
//! The count is what `/status` reports as `heapBytes`, beside the resident
//! size the kernel reports: the two differ by what the allocator keeps
//! mapped but free (fragmentation, pages not yet returned). One relaxed
//! atomic add per allocation and per free; nothing else.
//!
//! mimalloc is built without transparent huge pages (a 2 MiB page with
//! one live object stays resident whole) and, from [`configure`] on,
//! returns freed pages at once: after loading a big queue the process goes
//! quiet, and pages freed with a delay would stay resident, as mimalloc
//! purges delayed pages only when it is called again.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// mimalloc (the derivation parser allocates many small strings, and
/// glibc's malloc was a quarter of its time: see `cargo bench -p
/// sluice-nix --bench derivations`), counting live bytes.
pub struct CountingAllocator;

// SAFETY: every call is forwarded unchanged to mimalloc, which upholds
// `GlobalAlloc`'s contract; the counter has no effect on the memory.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { mimalloc::MiMalloc.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

/// mimalloc's `mi_option_purge_delay` (its place in mimalloc 3's
/// `mi_option_t`, which the bindings leave out).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets mimalloc's options; call first thing in `main`.
pub fn configure() {
    // SAFETY: `mi_option_set` is thread-safe and takes any option and
    // value; mimalloc reads this one each time it purges.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

/// Bytes allocated through [`CountingAllocator`] and not yet freed; 0 in
/// a process that does not use it (tests, other binaries).
pub fn heap_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::MI_OPTION_PURGE_DELAY;

    #[test]
    fn the_purge_delay_option_is_the_one_named() {
        // mimalloc 3's default purge delay is 1000 ms; none of the options
        // around it defaults to 1000 (a wrong index would read another).
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: reads an option value.
            let value = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
            assert_eq!(value, 1000);
        }
    }
}
