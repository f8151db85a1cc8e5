//! A program step's outcome through a global BPF function's `i32` return value (the only kind of
//! value a global function may return): a tc action (≥ 0), minus the counted reason of a drop, or
//! [`NEXT`] — not this step's packet, the caller goes on.

use proxy_common::STAT_MAX;

/// Not handled by the step.
pub const NEXT: i32 = -(STAT_MAX as i32) - 1;
/// The packet opens a new connection: the caller creates it, then runs the step again.
pub const NEW_CONNECTION: i32 = NEXT - 1;

#[inline(always)]
pub fn encode(result: Result<i32, u32>) -> i32 {
    match result {
        Ok(action) => action,
        Err(reason) => -(reason as i32),
    }
}

#[inline(always)]
pub fn decode(value: i32) -> Result<i32, u32> {
    if value >= 0 { Ok(value) } else { Err((-value) as u32) }
}
