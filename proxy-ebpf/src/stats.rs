//! Per-reason counters.
use crate::maps::STATS;

#[inline(always)]
pub fn count(reason: u32) {
    if let Some(counter) = STATS.get_ptr_mut(reason) {
        // Per-CPU slot: no other program touches it concurrently.
        unsafe { *counter += 1 };
    }
}
