//! Per-reason counters.
use crate::maps::STATS;

#[inline(always)]
pub fn count(reason: u32) {
    if let Some(counter) = STATS.get_ptr_mut(reason) {
        // Per-CPU slot: no other program touches it concurrently.
        unsafe { *counter += 1 };
    }
}

/// Adds `n` to a counter.
#[inline(always)]
pub fn add(reason: u32, n: u64) {
    if let Some(counter) = STATS.get_ptr_mut(reason) {
        unsafe { *counter += n };
    }
}
