//! One file per view; each draws the App without changing it.

pub mod chat;
pub mod compare;
pub mod finetune;
pub mod picker;
pub mod routing;
pub mod sinkhorn;
pub mod state;
