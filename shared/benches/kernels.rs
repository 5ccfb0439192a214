//! Benchmarks of the shared hot kernels: the depthwise convolutions of EfficientNet-Lite0 at a
//! 224x224 input, and the resize of a VGA camera frame to the model input.
//!
//! Depthwise throughput is reported in elements per second where one element is one
//! multiply-accumulate, so criterion's "Gelem/s" reads as GMAC/s.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use petcam_shared::depthwise::{Activation, DepthwiseConv};
use petcam_shared::preprocess::{resize_rgb_into, RgbResizer, DEFAULT_INPUT_SIZE};

/// The 16 depthwise layers of EfficientNet-Lite0 at 224 input: (kernel, stride, channels, input
/// side). Padding is symmetric `(k - 1) / 2`, as in the reference implementation.
const EFFICIENTNET_LITE0: [(usize, usize, usize, usize); 16] = [
    (3, 1, 32, 112),
    (3, 2, 96, 112),
    (3, 1, 144, 56),
    (5, 2, 144, 56),
    (5, 1, 240, 28),
    (3, 2, 240, 28),
    (3, 1, 480, 14),
    (3, 1, 480, 14),
    (5, 1, 480, 14),
    (5, 1, 672, 14),
    (5, 1, 672, 14),
    (5, 2, 672, 14),
    (5, 1, 1152, 7),
    (5, 1, 1152, 7),
    (5, 1, 1152, 7),
    (3, 1, 1152, 7),
];

/// One layer with deterministic data, so runs are comparable.
struct Layer {
    conv: DepthwiseConv,
    input: Vec<f32>,
    weight: Vec<f32>,
    bias: Vec<f32>,
    output: Vec<f32>,
}

impl Layer {
    fn new(kernel: usize, stride: usize, channels: usize, side: usize) -> Self {
        let pad = (kernel - 1) / 2;
        let conv = DepthwiseConv {
            channels,
            in_h: side,
            in_w: side,
            kernel_h: kernel,
            kernel_w: kernel,
            stride_h: stride,
            stride_w: stride,
            pad_top: pad,
            pad_left: pad,
            pad_bottom: pad,
            pad_right: pad,
            activation: Activation::RELU6,
        };
        let input = (0..channels * side * side)
            .map(|i| ((i * 7919) % 1024) as f32 / 256.0 - 1.0)
            .collect();
        let weight = (0..channels * kernel * kernel)
            .map(|i| ((i * 31) % 17) as f32 / 17.0 - 0.5)
            .collect();
        let bias = (0..channels).map(|i| (i % 5) as f32 * 0.1).collect();
        let output = vec![0.0; channels * conv.output_plane_len()];
        Layer {
            conv,
            input,
            weight,
            bias,
            output,
        }
    }

    fn macs(&self) -> u64 {
        (self.conv.channels * self.conv.output_plane_len() * self.conv.kernel_len()) as u64
    }

    fn run(&mut self) {
        self.conv
            .run(
                black_box(&self.input),
                &self.weight,
                Some(&self.bias),
                &mut self.output,
            )
            .unwrap();
        black_box(&self.output);
    }
}

fn depthwise(c: &mut Criterion) {
    let mut layers: Vec<Layer> = EFFICIENTNET_LITE0
        .iter()
        .map(|&(k, s, ch, side)| Layer::new(k, s, ch, side))
        .collect();
    let total_macs: u64 = layers.iter().map(Layer::macs).sum();

    let mut group = c.benchmark_group("depthwise");
    group.throughput(Throughput::Elements(total_macs));
    group.bench_function("efficientnet_lite0_224_all_16_layers", |b| {
        b.iter(|| layers.iter_mut().for_each(Layer::run))
    });
    group.finish();

    // Per layer, to see where the time goes; repeated shapes are measured once.
    let mut group = c.benchmark_group("depthwise_layer");
    for (i, layer) in layers.iter_mut().enumerate() {
        if i > 0 && EFFICIENTNET_LITE0[i] == EFFICIENTNET_LITE0[i - 1] {
            continue;
        }
        let (k, s, ch, side) = EFFICIENTNET_LITE0[i];
        group.throughput(Throughput::Elements(layer.macs()));
        let id = BenchmarkId::from_parameter(format!("k{k}_s{s}_c{ch}_{side}x{side}"));
        group.bench_function(id, |b| b.iter(|| layer.run()));
    }
    group.finish();
}

fn resize(c: &mut Criterion) {
    let (w, h) = (640u32, 480u32);
    let size = DEFAULT_INPUT_SIZE;
    let frame: Vec<u8> = (0..w * h * 3)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut out = vec![0u8; (size * size * 3) as usize];

    let mut group = c.benchmark_group("resize");
    group.throughput(Throughput::Elements(u64::from(size * size)));
    group.bench_function("640x480_to_224x224_one_shot", |b| {
        b.iter(|| resize_rgb_into(black_box(&frame), w, h, &mut out, size, size).unwrap())
    });
    let mut resizer = RgbResizer::new(w, h, size, size).unwrap();
    group.bench_function("640x480_to_224x224_reused", |b| {
        b.iter(|| resizer.resize_into(black_box(&frame), &mut out).unwrap())
    });
    group.finish();
}

criterion_group!(benches, depthwise, resize);
criterion_main!(benches);
