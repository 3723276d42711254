//! `winograd.rs`'s tests again, with every left operand (Winograd's transformed filters among
//! them) tiled for AMX and its products on the emulated tile unit
//! (`ops::cpu_bf16::amx::set_emulated`). Its own binary: the switches are process-wide.

#[path = "winograd.rs"]
mod winograd;
