//! petcam's tract operators, one per file, each running a kernel of `petcam_shared` on the
//! threads the model was loaded with. [`crate::rewrite`] puts them in a graph.
//!
//! - [`depthwise::PetcamDepthwise`]: a depthwise convolution, channels-first (the shared kernel
//!   channel by channel, or by bands of rows on large planes) or channels-last (a kernel that
//!   vectorises across channels, split by output rows).
//! - [`stem_conv::PetcamStemConv`]: the dense channels-last stem with a few (RGB) inputs, which
//!   can read the model's u8 image and normalise it itself.

pub mod depthwise;
pub mod stem_conv;

use petcam_shared::depthwise::DepthwiseConv;
use tract_onnx::prelude::*;

/// How the op's input and output are laid out. Without a batch axis (`Chw`, `Hwc`) is how
/// tract's decluttering leaves one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    Nchw,
    Chw,
    Nhwc,
    Hwc,
}

impl Layout {
    pub(crate) fn channels_last(self) -> bool {
        matches!(self, Layout::Nhwc | Layout::Hwc)
    }
}

/// Below this many output values per channel group, a second thread costs more than it saves.
pub(crate) const MIN_PER_THREAD: usize = 16 * 1024;

/// What an op computes on: the convolution's geometry, and how its tensors are laid out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Frame {
    pub(crate) geometry: DepthwiseConv,
    pub(crate) batch: usize,
    pub(crate) layout: Layout,
}

impl Frame {
    fn out_shape(&self) -> TVec<usize> {
        let g = &self.geometry;
        let (c, h, w) = (g.channels, g.out_h(), g.out_w());
        match self.layout {
            Layout::Nchw => tvec!(self.batch, c, h, w),
            Layout::Chw => tvec!(c, h, w),
            Layout::Nhwc => tvec!(self.batch, h, w, c),
            Layout::Hwc => tvec!(h, w, c),
        }
    }

    /// The op's output, as tract declares it.
    pub(crate) fn fact(&self) -> TypedFact {
        f32::fact(&*self.out_shape())
    }

    /// A zeroed output tensor.
    pub(crate) fn output(&self) -> TractResult<Tensor> {
        Tensor::zero::<f32>(&self.out_shape())
    }

    /// The line tract prints for the op.
    pub(crate) fn describe(&self, threads: usize) -> String {
        let g = &self.geometry;
        format!(
            "{}x{} stride {} on {}x{}x{}, {} thread(s)",
            g.kernel_h, g.kernel_w, g.stride_h, g.channels, g.in_h, g.in_w, threads
        )
    }

    /// Runs `row(n, oy, values)` for every output row of a channels-last op (`batch` images of
    /// `out_h` rows), contiguous runs of rows on each of up to `threads` threads.
    pub(crate) fn for_each_row(
        &self,
        threads: usize,
        output: &mut [f32],
        row: impl Fn(usize, usize, &mut [f32]) + Sync,
    ) {
        let g = &self.geometry;
        let row_len = g.out_w() * g.channels;
        let rows = self.batch * g.out_h();
        let threads = threads
            .min(pool_threads())
            .min(output.len() / MIN_PER_THREAD)
            .clamp(1, rows.max(1));
        let per = rows.div_ceil(threads);
        fork(runs(output, row_len, per), |(first, out)| {
            for (i, values) in out.chunks_exact_mut(row_len).enumerate() {
                let (n, oy) = ((first + i) / g.out_h(), (first + i) % g.out_h());
                row(n, oy, values);
            }
        });
    }
}

/// Output rows per thread below which a plane is split by channels instead of by rows.
pub(crate) const MIN_BAND_ROWS: usize = 8;

/// The geometry that computes output rows `r0..r1` of `g` alone, from input rows
/// `first..last` (returned with it): the same convolution on a horizontal band, its padding
/// adjusted so the band's edges that are inside the image read real rows.
pub(crate) fn row_band(g: &DepthwiseConv, r0: usize, r1: usize) -> (DepthwiseConv, usize, usize) {
    let first = (r0 * g.stride_h).saturating_sub(g.pad_top);
    let last = ((r1 - 1) * g.stride_h + g.kernel_h)
        .saturating_sub(g.pad_top)
        .min(g.in_h);
    let pad_top = g.pad_top + first - r0 * g.stride_h;
    let in_h = last - first;
    let band = DepthwiseConv {
        in_h,
        pad_top,
        // Exactly enough for r1 - r0 output rows.
        pad_bottom: (r1 - r0 - 1) * g.stride_h + g.kernel_h - in_h - pad_top,
        ..*g
    };
    debug_assert_eq!(band.out_h(), r1 - r0);
    (band, first, last)
}

/// `output` cut into runs of `per` blocks of `len` values: (index of the run's first block, run).
pub(crate) fn runs(output: &mut [f32], len: usize, per: usize) -> Vec<(usize, &mut [f32])> {
    output
        .chunks_mut(per * len)
        .enumerate()
        .map(|(t, out)| (t * per, out))
        .collect()
}

/// Runs `f` on every part: the first on this thread, the others on the pool tract runs the
/// plan with. The first part staying here matters: the matrix products give this thread the
/// first part of their output too, so the data it reads is already in its cache.
/// Threads of the pool this inference runs on: 1 when it runs on the calling thread alone
/// (a model loaded with `Threads::Auto` may run either way).
pub(crate) fn pool_threads() -> usize {
    match tract_linalg::multithread::current_tract_executor() {
        tract_linalg::multithread::Executor::MultiThread(pool) => pool.current_num_threads(),
        _ => 1,
    }
}

pub(crate) fn fork<T: Send>(parts: Vec<T>, f: impl Fn(T) + Sync) {
    let mut parts = parts.into_iter();
    let Some(first) = parts.next() else { return };
    match tract_linalg::multithread::current_tract_executor() {
        tract_linalg::multithread::Executor::MultiThread(pool) if parts.len() > 0 => {
            let f = &f;
            pool.scope(move |s| {
                for part in parts {
                    s.spawn(move |_| f(part));
                }
                f(first);
            });
        }
        _ => {
            f(first);
            parts.for_each(&f);
        }
    }
}
