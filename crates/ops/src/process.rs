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
//!   process, which a training or sampling run wants anyway. One arena serves every thread
//!   (a pool thread's own arena grows in `mmap`'d sub-heaps: three times the page faults).
//! - **candle's helper threads do not spin.** candle (0.11) runs its elementwise ops on a pool
//!   of its own (`candle-bp-*`), whose idle threads spin 25,000 `pause`s before they sleep: on
//!   two cores that spinning takes a core from the gemm workers after every elementwise op, 5%
//!   of an SD 1.5 training step's samples (perf). With a spin limit of 200 the latent-64 atoms
//!   step went from 6.64 to 6.26 s (`sd15 --mode train --latent 64`, this 2-core machine;
//!   `CANDLE_BARRIER_POOL_SPIN_LIMIT=25000` in the environment restores candle's default).
//! - **The model on a pool thread** ([`on_compute_thread`]), so that there are as many busy
//!   threads as cores.

/// candle's setting for how long its idle helper threads spin before they sleep.
const SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// Applies the settings above. Call it first thing in `main`, before any thread starts (it
/// changes the environment) and before large allocations.
pub fn tune_process() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY (edition 2024 marks this unsafe): called at start, before other threads
        // read or write the environment.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os(SPIN_LIMIT_VAR).is_none() {
        // SAFETY: as above.
        std::env::set_var(SPIN_LIMIT_VAR, "200");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation policy; it is called before threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        // One arena for every thread: the model runs on a pool thread, whose own arena would
        // grow in mmap'd sub-heaps and fault its pages in again.
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    // After the allocator settings, so the workers' first allocations follow them. Worker
    // stacks as large as a main thread's: candle's backward walks the graph recursively,
    // and the model runs on a worker ([`on_compute_thread`]). Fails only if a pool exists already.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(64 << 20)
        .build_global();
}

/// Runs `f` on one of the compute pool's threads and returns its result.
///
/// candle and our kernels split work over a pool of `RAYON_NUM_THREADS` workers. Called from
/// `main`, the model's sequential part would be one thread more than there are cores, and on
/// every parallel op the workers and the main thread hand the cores back and forth (a third of
/// a tiny model's step went to context switches and yields). Run on a worker, the model's own
/// thread is one of the pool: it works on each parallel op itself while the other workers help.
///
/// With `ATOMTUNE_MAIN_THREAD` set, `f` runs on the calling thread instead (for comparisons:
/// a tiny model's step at latent 16 took 0.052 s there against 0.044 s on a worker). A
/// [`crate::Kernels::scope`] around the call goes along to the worker.
pub fn on_compute_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if std::env::var_os("ATOMTUNE_MAIN_THREAD").is_some() {
        return f();
    }
    let kernels = crate::Kernels::overridden();
    let mut out = None;
    rayon::scope(|_| out = Some(crate::Kernels::scope_opt(kernels, f)));
    out.expect("the scope ran its body")
}
