//! dcflow's end-to-end tests: the real binary against the emulator, a real Kafka broker and a
//! real dCache, one module per area (one test binary: one link instead of nine). Helpers in
//! `util`. Tests that need the broker hold it shared ([`util::broker`]); the one that
//! restarts it holds it alone ([`util::broker_alone`]).

mod util;

mod chaos;
mod cli;
mod fault_matrix;
mod kafka;
mod kafka_outage;
mod pipeline;
mod real_dcache;
mod rucio;
mod slurm;
mod sse;
mod sync;
mod tape;
mod workflow;
