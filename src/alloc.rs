//! The process-wide allocator of the `afa` binary: mimalloc, told to keep freed memory.
//!
//! candle allocates a fresh output buffer for nearly every CPU op, many of them tens of MiB.
//! glibc's malloc maps and unmaps such buffers each time, and mimalloc by default returns freed
//! memory to the OS after 10 ms, so either way every op page-faults its output in again (a third
//! of the UNet's CPU time went to the kernel zeroing pages). With purging off, freed blocks are
//! reused as they are; the cost is that RSS stays at its peak.
//!
//! Wire-up: `mod alloc;` in `main.rs`, and call [`keep_freed_memory`] first thing in `main`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (the same index in its v2 and v3
/// headers; `libmimalloc-sys` 0.1.49 has no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never return freed memory to the OS (mimalloc `purge_delay = -1`), so large tensors are
/// recycled instead of page-faulted in afresh on every op. Idempotent.
pub fn keep_freed_memory() {
    // SAFETY: mi_option_set only stores an integer in mimalloc's option table; it is safe to
    // call at any time from any thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
