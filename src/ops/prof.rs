//! A coarse time breakdown of the fused forward (`bench --profile`) and of the training forward
//! by part (`bench --finetune --profile`: the half-blocks' norm, Mamba and MoE parts, the routing
//! decision): when switched on, named laps synchronise the device and add the time since the
//! previous lap to a total per name. Off by default, and then a lap costs one relaxed atomic load.
//! A caller that runs laps of its own inside another's (a block around its mixer) restarts its
//! timer with [`start`] after the inner call, so no time is counted twice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::Device;

use crate::error::Result;

static ON: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Vec<(&'static str, f64, usize)>> = Mutex::new(Vec::new());

/// Switches the laps on or off (and clears the totals).
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
    if let Ok(mut t) = TOTALS.lock() {
        t.clear();
    }
}

/// (name, total milliseconds, laps) since [`enable`], in first-seen order.
pub fn totals() -> Vec<(&'static str, f64, usize)> {
    TOTALS.lock().map(|t| t.clone()).unwrap_or_default()
}

/// A running lap timer (None while profiling is off).
pub struct Laps {
    dev: Device,
    t: Instant,
}

/// Starts timing on `dev` (synchronises first) when profiling is on.
pub fn start(dev: &Device) -> Result<Option<Laps>> {
    if !ON.load(Ordering::Relaxed) {
        return Ok(None);
    }
    dev.synchronize()?;
    Ok(Some(Laps {
        dev: dev.clone(),
        t: Instant::now(),
    }))
}

/// Ends the current lap as `name`: waits for the device, adds the time, starts the next lap.
pub fn lap(l: &mut Option<Laps>, name: &'static str) -> Result<()> {
    if let Some(l) = l.as_mut() {
        l.dev.synchronize()?;
        let ms = l.t.elapsed().as_secs_f64() * 1e3;
        if let Ok(mut t) = TOTALS.lock() {
            match t.iter_mut().find(|(n, _, _)| *n == name) {
                Some(e) => {
                    e.1 += ms;
                    e.2 += 1;
                }
                None => t.push((name, ms, 1)),
            }
        }
        l.t = Instant::now();
    }
    Ok(())
}
