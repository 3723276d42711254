//! Process settings that large-tensor work on the CPU needs, applied once at start by
//! [`tune_process`].
//!
//! - **Thread count.** candle looks up how many threads to use on every CPU op: it reads
//!   `RAYON_NUM_THREADS` and, when that is not set, works out the number of physical cores from
//!   the OS again (files under `/sys`). On a small model that lookup costs as much as the
//!   arithmetic: a training step of the tiny fixture at latent 16 takes 0.30 s without the
//!   variable and 0.15 s with it.
//! - **Allocator (glibc).** Tensors of tens to hundreds of MB are allocated and freed at every op.
//!   glibc serves allocations above 32 MB with `mmap` and returns them with `munmap`, so each
//!   new tensor faults in fresh pages that the kernel must zero: a third of an SD 1.5 training
//!   step went to `clear_page` (perf). Serving everything from the heap and not trimming it keeps
//!   the pages: the step went from 23.6 s to 14.7 s. The cost is that freed memory stays with the
//!   process, which a training or sampling run wants anyway.

/// Applies the settings above. Call it first thing in `main`, before any thread starts (it
/// changes the environment) and before large allocations.
pub fn tune_process() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY (edition 2024 marks this unsafe): called at start, before other threads
        // read or write the environment.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation policy; it is called before threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
