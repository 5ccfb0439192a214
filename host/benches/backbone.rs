//! Backbone forward throughput (photos/s) with 1 and 2 threads, run the way feature extraction
//! runs it on CPU: one photo per forward pass, one pass per thread.
//!
//! Needs `../shared/backbones/efficientnet-lite0-57934424.pth`; skips with a message without it.
//! Run: `cargo bench -p petcam-host --bench backbone`.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use petcam_host::backbone::Backbone;
use petcam_host::test_support::shared_fixture;
use rayon::prelude::*;

fn backbone_forward(c: &mut Criterion) {
    let Some(weights) = shared_fixture("backbones/efficientnet-lite0-57934424.pth") else {
        return;
    };
    let net = Backbone::load("efficientnet-lite0", &weights, &Device::Cpu).unwrap();
    let photos = 32;
    // A deterministic, photo-like input (smooth gradients with texture).
    let pixels: Vec<u8> = (0..224 * 224 * 3)
        .map(|i| ((i * 7 + (i / 672) * 3) % 251) as u8)
        .collect();
    let rgb = Tensor::from_vec(pixels, (1, 224, 224, 3), &Device::Cpu).unwrap();

    let mut group = c.benchmark_group("efficientnet_lite0_forward");
    group.sample_size(10);
    group.throughput(Throughput::Elements(photos as u64));
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        // candle sizes its matrix products from RAYON_NUM_THREADS, read on every call.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        group.bench_function(format!("threads{threads}"), |b| {
            b.iter(|| {
                pool.install(|| {
                    (0..photos).into_par_iter().for_each(|_| {
                        net.features(&rgb).unwrap();
                    })
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, backbone_forward);
criterion_main!(benches);
