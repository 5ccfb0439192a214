//! candle custom ops for the backbone's hot spots on CPU.
//!
//! candle 0.11 runs a grouped convolution as one convolution per group, so a depthwise layer with
//! 1152 channels costs 1152 tiny convolutions. [`depthwise`] instead calls the slice kernel in
//! `petcam-shared` (the same code the device runs), one channel plane per rayon task.
//! [`pointwise`] runs a 1x1 convolution as one matrix product per image and per block of
//! pixels, with the folded-BatchNorm bias and ReLU6 applied while the block is still in cache
//! (candle would copy the input for im2col, then make two more passes for bias and activation).
//! [`bias_activation`] fuses bias and ReLU6 into one pass for the remaining convolutions.
//! On other devices (CUDA) the same layers run as candle expressions: [`depthwise_taps`], a
//! broadcast matrix product, and bias and clamp as two ops.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use petcam_shared::depthwise::{self, DepthwiseConv};
use rayon::prelude::*;

use super::{Activation, Padding};

fn shared_activation(a: Activation) -> depthwise::Activation {
    match a {
        Activation::Linear => depthwise::Activation::None,
        Activation::Relu6 => depthwise::Activation::Clamp { min: 0.0, max: 6.0 },
    }
}

/// The contiguous f32 slice behind a storage and layout.
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: expected an f32 tensor")
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

struct Depthwise {
    stride: usize,
    padding: Padding,
    activation: Activation,
}

impl CustomOp3 for Depthwise {
    fn name(&self) -> &'static str {
        "petcam-depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = xl.shape().dims4()?;
        let (wc, _, kh, kw) = wl.shape().dims4()?;
        if wc != c {
            candle_core::bail!("depthwise: weight has {wc} channels, input has {c}");
        }
        let x = f32_slice(xs, xl, "depthwise input")?;
        let weight = f32_slice(ws, wl, "depthwise weight")?;
        let bias = f32_slice(bs, bl, "depthwise bias")?;
        let conv = DepthwiseConv {
            channels: c,
            in_h: h,
            in_w: w,
            kernel_h: kh,
            kernel_w: kw,
            stride_h: self.stride,
            stride_w: self.stride,
            pad_top: self.padding.top,
            pad_left: self.padding.left,
            pad_bottom: self.padding.bottom,
            pad_right: self.padding.right,
            activation: shared_activation(self.activation),
        };
        let (oh, ow) = (conv.out_h(), conv.out_w());
        conv.validate(c * h * w, weight.len(), Some(bias.len()), c * oh * ow)
            .map_err(|e| candle_core::Error::Msg(format!("depthwise: {e}")))?;
        let mut out = vec![0f32; b * c * oh * ow];
        out.par_chunks_mut(oh * ow)
            .enumerate()
            .for_each_init(Vec::new, |scratch, (plane, o)| {
                let ch = plane % c;
                conv.run_channel_with_scratch(
                    ch,
                    &x[plane * h * w..(plane + 1) * h * w],
                    &weight[ch * kh * kw..(ch + 1) * kh * kw],
                    bias[ch],
                    o,
                    scratch,
                );
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }

    /// Gradients for the input, the weight and the bias, from the output's gradient.
    ///
    /// ReLU6 passes the gradient where the output is strictly inside (0, 6); at the bounds it
    /// is clamped, so nothing flows back (the subgradient PyTorch's `hardtanh` uses too).
    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, c, h, w) = x.dims4()?;
        let (_, _, kh, kw) = weight.dims4()?;
        let (_, _, oh, ow) = res.dims4()?;
        let values = |t: &Tensor| {
            t.flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()
        };
        let (xv, wv, yv, gv) = (values(x)?, values(weight)?, values(res)?, values(grad)?);
        let (s, p) = (self.stride, self.padding);
        let relu6 = self.activation == Activation::Relu6;
        // One task per channel: it owns that channel's weight, bias and input-gradient planes.
        let per_channel: Vec<(Vec<f32>, f32, Vec<f32>)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let wc = &wv[ch * kh * kw..(ch + 1) * kh * kw];
                let mut dw = vec![0f32; kh * kw];
                let mut db = 0f32;
                let mut dx = vec![0f32; b * h * w];
                for n in 0..b {
                    let plane = (n * c + ch) * h * w;
                    let out = (n * c + ch) * oh * ow;
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let y = yv[out + oy * ow + ox];
                            let g = gv[out + oy * ow + ox];
                            if g == 0.0 || (relu6 && !(y > 0.0 && y < 6.0)) {
                                continue;
                            }
                            db += g;
                            for ky in 0..kh {
                                let iy = (oy * s + ky) as isize - p.top as isize;
                                if iy < 0 || iy >= h as isize {
                                    continue;
                                }
                                for kx in 0..kw {
                                    let ix = (ox * s + kx) as isize - p.left as isize;
                                    if ix < 0 || ix >= w as isize {
                                        continue;
                                    }
                                    let i = iy as usize * w + ix as usize;
                                    dw[ky * kw + kx] += g * xv[plane + i];
                                    dx[n * h * w + i] += g * wc[ky * kw + kx];
                                }
                            }
                        }
                    }
                }
                (dw, db, dx)
            })
            .collect();
        let mut dx = vec![0f32; b * c * h * w];
        let mut dw = Vec::with_capacity(c * kh * kw);
        let mut db = Vec::with_capacity(c);
        for (ch, (w_c, b_c, x_c)) in per_channel.into_iter().enumerate() {
            dw.extend(w_c);
            db.push(b_c);
            for n in 0..b {
                let plane = (n * c + ch) * h * w;
                dx[plane..plane + h * w].copy_from_slice(&x_c[n * h * w..(n + 1) * h * w]);
            }
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (b, c, h, w), dev)?),
            Some(Tensor::from_vec(dw, weight.shape(), dev)?),
            Some(Tensor::from_vec(db, c, dev)?),
        ))
    }
}

/// Depthwise convolution `[b, c, h, w]` with weight `[c, 1, kh, kw]` and bias `[c]`, on CPU,
/// with its backward pass: gradients reach the input, the weight and the bias.
pub fn depthwise(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: Padding,
    activation: Activation,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3(
        weight,
        bias,
        Depthwise {
            stride,
            padding,
            activation,
        },
    )
}

struct Pointwise(Activation);

/// Output pixels per block: keeps a block of the output (`cout` rows) around 256 KiB, so the
/// bias and clamp passes read it from L2 rather than memory.
fn pointwise_block(cout: usize, hw: usize) -> usize {
    (65536 / cout.max(1))
        .next_multiple_of(16)
        .max(64)
        .min(hw.max(1))
}

/// One image: `out[cout, hw] = act(w[cout, cin] x x[cin, hw] + bias)`. `out` need not be
/// initialised: gemm only writes it (`read_dst` is false), then bias and activation are applied
/// to each block while it is still in cache.
fn pointwise_image(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    out: &mut [MaybeUninit<f32>],
    (cin, cout, hw): (usize, usize, usize),
    act: Activation,
    parallelism: gemm::Parallelism,
) {
    assert!(x.len() >= cin * hw && w.len() >= cout * cin && bias.len() >= cout);
    assert!(out.len() >= cout * hw);
    let nb = pointwise_block(cout, hw);
    let dst = out.as_mut_ptr().cast::<f32>();
    for j0 in (0..hw).step_by(nb) {
        let n = nb.min(hw - j0);
        // SAFETY: the matrices lie inside the slices (asserted above): dst rows c*hw + j0 .. +n
        // for c < cout in `out`, lhs is `w` (row stride cin), rhs rows r*hw + j0 .. +n for
        // r < cin in `x`. dst does not alias lhs or rhs, and is written, not read.
        unsafe {
            gemm::gemm(
                cout,
                n,
                cin,
                dst.add(j0),
                1,
                hw as isize,
                false,
                w.as_ptr(),
                1,
                cin as isize,
                x.as_ptr().add(j0),
                1,
                hw as isize,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                parallelism,
            );
        }
        for (c, &b) in bias.iter().enumerate() {
            // SAFETY: gemm has just initialised these n values of row c.
            let row = unsafe { std::slice::from_raw_parts_mut(dst.add(c * hw + j0), n) };
            match act {
                Activation::Linear => row.iter_mut().for_each(|v| *v += b),
                Activation::Relu6 => row.iter_mut().for_each(|v| *v = (*v + b).clamp(0.0, 6.0)),
            }
        }
    }
}

/// An output buffer of `len` floats whose every element the caller will write.
fn output_buffer(len: usize) -> Vec<f32> {
    Vec::with_capacity(len)
}

/// Marks a buffer from [`output_buffer`] as fully written.
///
/// # Safety
/// All `len` elements must have been initialised through `spare_capacity_mut`.
unsafe fn assume_written(mut v: Vec<f32>, len: usize) -> Vec<f32> {
    // SAFETY: guaranteed by the caller.
    unsafe { v.set_len(len) };
    v
}

impl CustomOp3 for Pointwise {
    fn name(&self) -> &'static str {
        "petcam-pointwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, cin, h, w) = xl.shape().dims4()?;
        let (cout, wcin, _, _) = wl.shape().dims4()?;
        if wcin != cin {
            candle_core::bail!("pointwise: weight takes {wcin} channels, input has {cin}");
        }
        let x = f32_slice(xs, xl, "pointwise input")?;
        let weight = f32_slice(ws, wl, "pointwise weight")?;
        let bias = f32_slice(bs, bl, "pointwise bias")?;
        if weight.len() != cout * cin || bias.len() != cout {
            candle_core::bail!("pointwise: weight or bias has the wrong size for {cout} outputs");
        }
        let hw = h * w;
        let len = b * cout * hw;
        let mut out = output_buffer(len);
        let dims = (cin, cout, hw);
        let threads = rayon::current_num_threads();
        let spare = &mut out.spare_capacity_mut()[..len];
        // Inside a rayon task the caller already runs one image per thread (feature
        // extraction does): splitting each product again would only add synchronisation.
        if b >= threads || rayon::current_thread_index().is_some() {
            // One image per task, no sync inside gemm.
            spare
                .par_chunks_mut(cout * hw)
                .zip(x.par_chunks(cin * hw))
                .for_each(|(o, xi)| {
                    pointwise_image(xi, weight, bias, o, dims, self.0, gemm::Parallelism::None)
                });
        } else {
            for (o, xi) in spare.chunks_mut(cout * hw).zip(x.chunks(cin * hw)) {
                let par = gemm::Parallelism::Rayon(threads);
                pointwise_image(xi, weight, bias, o, dims, self.0, par);
            }
        }
        // SAFETY: pointwise_image wrote every element of every image.
        let out = unsafe { assume_written(out, len) };
        Ok((CpuStorage::F32(out), Shape::from((b, cout, h, w))))
    }
}

/// 1x1 convolution `[b, cin, h, w]` with weight `[cout, cin, 1, 1]` and bias `[cout]`, on CPU.
pub fn pointwise(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    activation: Activation,
) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op3_no_bwd(weight, bias, &Pointwise(activation))
}

/// The stem: normalisation of RGB bytes fused into an im2col convolution, so the network's first
/// layer reads the u8 NHWC photo directly (no float copy, no transpose pass).
struct StemFromRgb {
    stride: usize,
    padding: Padding,
    activation: Activation,
    mean: f32,
    std: f32,
}

impl CustomOp3 for StemFromRgb {
    fn name(&self) -> &'static str {
        "petcam-stem-conv2d-rgb"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = xl.shape().dims4()?;
        let (cout, wc, kh, kw) = wl.shape().dims4()?;
        let CpuStorage::U8(rgb) = xs else {
            candle_core::bail!("stem: expected u8 RGB input")
        };
        let Some((start, end)) = xl.contiguous_offsets() else {
            candle_core::bail!("stem: expected a contiguous input")
        };
        let rgb = &rgb[start..end];
        if wc != c {
            candle_core::bail!("stem: weight takes {wc} channels, input has {c}");
        }
        let weight = f32_slice(ws, wl, "stem weight")?;
        let bias = f32_slice(bs, bl, "stem bias")?;
        let p = self.padding;
        let oh = (h + p.top + p.bottom - kh) / self.stride + 1;
        let ow = (w + p.left + p.right - kw) / self.stride + 1;
        let (k, n) = (c * kh * kw, oh * ow);
        let (scale, shift) = (1.0 / self.std, -self.mean / self.std);
        let len = b * cout * n;
        let mut out = output_buffer(len);
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(cout * n)
            .zip(rgb.par_chunks(h * w * c))
            .for_each(|(o, img)| {
                // col[(ci, ky, kx), (oy, ox)]; padding is zero in normalised space.
                let mut col = vec![0f32; k * n];
                for ci in 0..c {
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let row = &mut col[((ci * kh + ky) * kw + kx) * n..][..n];
                            for oy in 0..oh {
                                let y = (oy * self.stride + ky) as isize - p.top as isize;
                                if y < 0 || y >= h as isize {
                                    continue;
                                }
                                for ox in 0..ow {
                                    let x = (ox * self.stride + kx) as isize - p.left as isize;
                                    if x >= 0 && x < w as isize {
                                        let px = img[(y as usize * w + x as usize) * c + ci];
                                        row[oy * ow + ox] = px as f32 * scale + shift;
                                    }
                                }
                            }
                        }
                    }
                }
                pointwise_image(
                    &col,
                    weight,
                    bias,
                    o,
                    (k, cout, n),
                    self.activation,
                    gemm::Parallelism::None,
                );
            });
        // SAFETY: pointwise_image wrote every element of every image.
        let out = unsafe { assume_written(out, len) };
        Ok((CpuStorage::F32(out), Shape::from((b, cout, oh, ow))))
    }
}

/// `conv(normalise(rgb))` for RGB bytes `[b, h, w, 3]`, producing NCHW floats, on CPU.
pub fn stem_from_rgb(
    rgb: &Tensor,
    conv: &super::Conv,
    normalization: super::Normalization,
) -> candle_core::Result<Tensor> {
    rgb.contiguous()?.apply_op3_no_bwd(
        &conv.weight,
        &conv.bias,
        &StemFromRgb {
            stride: conv.stride,
            padding: conv.padding,
            activation: conv.activation,
            mean: normalization.mean,
            std: normalization.std,
        },
    )
}

struct BiasActivation(Activation);

impl CustomOp2 for BiasActivation {
    fn name(&self) -> &'static str {
        "petcam-bias-activation"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, n) = xl.shape().dims3()?;
        let x = f32_slice(xs, xl, "bias input")?;
        let bias = f32_slice(bs, bl, "bias")?;
        if bias.len() != c {
            candle_core::bail!("bias has {} values for {c} channels", bias.len());
        }
        let mut out = vec![0f32; b * c * n];
        let act = self.0;
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .enumerate()
            .for_each(|(plane, (o, i))| {
                let bv = bias[plane % c];
                match act {
                    Activation::Linear => o.iter_mut().zip(i).for_each(|(o, &i)| *o = i + bv),
                    Activation::Relu6 => o
                        .iter_mut()
                        .zip(i)
                        .for_each(|(o, &i)| *o = (i + bv).clamp(0.0, 6.0)),
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// Depthwise convolution `[b, c, h, w]` by weight `[c, 1, kh, kw]`, without bias, as `kh * kw`
/// shifted multiply-adds of the whole tensor in candle's own ops. This is the path on a GPU,
/// where the custom op does not run and candle's grouped convolution would launch one
/// convolution per channel; candle differentiates it like any other expression.
pub fn depthwise_taps(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: Padding,
) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (_, _, kh, kw) = weight.dims4()?;
    let (hp, wp) = (
        h + padding.top + padding.bottom,
        w + padding.left + padding.right,
    );
    if hp < kh || wp < kw || stride == 0 {
        candle_core::bail!("depthwise: a {kh}x{kw} kernel does not fit a padded {hp}x{wp} input")
    }
    let (oh, ow) = ((hp - kh) / stride + 1, (wp - kw) / stride + 1);
    // `stride - 1` more zeros at the bottom and right let every tap take `stride * out` rows
    // and columns, of which a reshape keeps every stride-th; the extra zeros are never kept.
    let extra = stride - 1;
    let x = x
        .pad_with_zeros(2, padding.top, padding.bottom + extra)?
        .pad_with_zeros(3, padding.left, padding.right + extra)?;
    let mut sum: Option<Tensor> = None;
    for i in 0..kh {
        for j in 0..kw {
            let tap = x.narrow(2, i, stride * oh)?.narrow(3, j, stride * ow)?;
            let tap = if stride == 1 {
                tap
            } else {
                tap.reshape((b, c, oh, stride, ow, stride))?
                    .narrow(3, 0, 1)?
                    .narrow(5, 0, 1)?
                    .reshape((b, c, oh, ow))?
            };
            let w_ij = weight
                .narrow(2, i, 1)?
                .narrow(3, j, 1)?
                .reshape((1, c, 1, 1))?;
            let term = tap.broadcast_mul(&w_ij)?;
            sum = Some(match sum {
                Some(s) => (s + term)?,
                None => term,
            });
        }
    }
    sum.ok_or_else(|| candle_core::Error::Msg("depthwise: an empty kernel".into()))
}

/// `activation(x + bias)` for `x: [b, c, n]`, `bias: [c]`; one fused pass on CPU.
pub fn bias_activation(
    x: &Tensor,
    bias: &Tensor,
    activation: Activation,
) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() {
        return x
            .contiguous()?
            .apply_op2_no_bwd(bias, &BiasActivation(activation));
    }
    let c = bias.dim(0)?;
    let y = x.broadcast_add(&bias.reshape((1, c, 1))?)?;
    match activation {
        Activation::Linear => Ok(y),
        Activation::Relu6 => y.clamp(0f32, 6f32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The GPU path (candle expressions) computes what the CPU op computes, forward and
    /// backward, for both kernel sizes, both strides and EfficientNet's asymmetric padding.
    #[test]
    fn depthwise_taps_match_the_cpu_op_and_its_gradients() {
        use candle_core::Var;
        let dev = Device::Cpu;
        let asymmetric = |k: usize| Padding {
            top: (k - 2) / 2,
            left: (k - 2) / 2,
            bottom: k / 2,
            right: k / 2,
        };
        for (k, stride, padding, h) in [
            (3, 1, Padding::symmetric(1), 7),
            (5, 1, Padding::symmetric(2), 6),
            (3, 2, asymmetric(3), 8),
            (5, 2, asymmetric(5), 9),
            (3, 2, Padding::symmetric(1), 7),
        ] {
            let c = 4;
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, c, h, h), &dev).unwrap()).unwrap();
            let w =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (c, 1, k, k), &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, c, &dev).unwrap()).unwrap();
            let op = depthwise(&x, &w, &b, stride, padding, Activation::Relu6).unwrap();
            let taps = depthwise_taps(&x, &w, stride, padding)
                .unwrap()
                .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
                .unwrap()
                .clamp(0f32, 6f32)
                .unwrap();
            assert_eq!(op.dims(), taps.dims(), "k {k} stride {stride}");
            let d = crate::test_support::max_abs_diff(&op, &taps);
            assert!(d < 1e-5, "k {k} stride {stride}: outputs differ by {d}");

            let r = Tensor::randn(0f32, 1.0, op.shape(), &dev).unwrap();
            let grads = |y: &Tensor| y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            let (g_op, g_taps) = (grads(&op), grads(&taps));
            for (var, name) in [(&x, "input"), (&w, "weight"), (&b, "bias")] {
                let d = crate::test_support::max_abs_diff(
                    g_op.get(var).unwrap(),
                    g_taps.get(var).unwrap(),
                );
                assert!(
                    d < 1e-4,
                    "k {k} stride {stride}: {name} gradients differ by {d}"
                );
            }
        }
    }

    /// The backward pass against central finite differences of the forward pass (linear
    /// output), and the ReLU6 output against candle's own clamp on top of the linear op.
    #[test]
    fn depthwise_gradients_match_finite_differences() {
        use candle_core::Var;
        let dev = Device::Cpu;
        let asymmetric = Padding {
            top: 0,
            left: 0,
            bottom: 1,
            right: 1,
        };
        for (stride, padding, h) in [(1, Padding::symmetric(1), 6), (2, asymmetric, 8)] {
            let c = 3;
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, c, h, h), &dev).unwrap()).unwrap();
            let w =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (c, 1, 3, 3), &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, c, &dev).unwrap()).unwrap();
            let oh = h.div_ceil(stride);
            let r = Tensor::randn(0f32, 1.0, (2, c, oh, oh), &dev).unwrap();
            let loss = |x: &Tensor, w: &Tensor, b: &Tensor, act: Activation| -> Tensor {
                depthwise(x, w, b, stride, padding, act)
                    .unwrap()
                    .mul(&r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let grads = loss(&x, &w, &b, Activation::Linear).backward().unwrap();
            let eps = 1e-2f32;
            for (var, name) in [(&x, "input"), (&w, "weight"), (&b, "bias")] {
                let analytic: Vec<f32> = grads
                    .get(var)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let base: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
                // Every weight and bias element, every 7th input element.
                let step = if name == "input" { 7 } else { 1 };
                for i in (0..base.len()).step_by(step) {
                    let at = |delta: f32| -> f32 {
                        let mut v = base.clone();
                        v[i] += delta;
                        let t = Tensor::from_vec(v, var.shape(), &dev).unwrap();
                        let (xx, ww, bb) = match name {
                            "input" => (t, w.as_tensor().clone(), b.as_tensor().clone()),
                            "weight" => (x.as_tensor().clone(), t, b.as_tensor().clone()),
                            _ => (x.as_tensor().clone(), w.as_tensor().clone(), t),
                        };
                        loss(&xx, &ww, &bb, Activation::Linear)
                            .to_scalar::<f32>()
                            .unwrap()
                    };
                    let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                    let tol = 1e-2 * (1.0 + numeric.abs());
                    assert!(
                        (numeric - analytic[i]).abs() <= tol,
                        "stride {stride} {name}[{i}]: analytic {} numeric {numeric}",
                        analytic[i]
                    );
                }
            }
            // ReLU6 fused: the same gradients as the linear op followed by candle's clamp.
            let fused = loss(&x, &w, &b, Activation::Relu6).backward().unwrap();
            let clamped = depthwise(&x, &w, &b, stride, padding, Activation::Linear)
                .unwrap()
                .clamp(0f32, 6f32)
                .unwrap()
                .mul(&r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for var in [&x, &w, &b] {
                let d = crate::test_support::max_abs_diff(
                    fused.get(var).unwrap(),
                    clamped.get(var).unwrap(),
                );
                assert!(d < 1e-4, "stride {stride}: ReLU6 gradients differ by {d}");
            }
        }
    }

    /// The custom op must agree with candle's own grouped convolution.
    #[test]
    fn depthwise_matches_candle_grouped_conv() {
        let dev = Device::Cpu;
        for (k, stride, h) in [(3, 1, 9), (3, 2, 10), (5, 2, 11), (5, 1, 7)] {
            let c = 6;
            let x = Tensor::randn(0f32, 1.0, (2, c, h, h), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (c, 1, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, c, &dev).unwrap();
            let pad = (k - 1) / 2;
            let ours = depthwise(
                &x,
                &w,
                &b,
                stride,
                Padding::symmetric(pad),
                Activation::Relu6,
            )
            .unwrap();
            let reference = x
                .conv2d(&w, pad, stride, 1, c)
                .unwrap()
                .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
                .unwrap()
                .clamp(0f32, 6f32)
                .unwrap();
            let diff = crate::test_support::max_abs_diff(&ours, &reference);
            assert!(diff < 1e-4, "k={k} stride={stride}: max diff {diff}");
        }
    }

    #[test]
    fn pointwise_matches_candle_conv() {
        let dev = Device::Cpu;
        // Sizes that give several pixel blocks and a ragged last block.
        for (b, cin, cout, h) in [(1, 3, 5, 4), (3, 16, 96, 37), (2, 40, 8, 9)] {
            let x = Tensor::randn(0f32, 1.0, (b, cin, h, h), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (cout, cin, 1, 1), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
            for act in [Activation::Linear, Activation::Relu6] {
                let ours = pointwise(&x, &w, &bias, act).unwrap();
                let mut reference = x
                    .conv2d(&w, 0, 1, 1, 1)
                    .unwrap()
                    .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                    .unwrap();
                if act == Activation::Relu6 {
                    reference = reference.clamp(0f32, 6f32).unwrap();
                }
                let diff = crate::test_support::max_abs_diff(&ours, &reference);
                assert!(diff < 1e-4, "b={b} cin={cin} cout={cout}: max diff {diff}");
            }
        }
    }

    #[test]
    fn bias_activation_clamps() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[[-1f32, 2.0, 7.0], [0.5, 0.0, -3.0]]], &dev).unwrap();
        let b = Tensor::new(&[1f32, -1.0], &dev).unwrap();
        let y = bias_activation(&x, &b, Activation::Relu6).unwrap();
        assert_eq!(
            y.to_vec3::<f32>().unwrap(),
            vec![vec![vec![0.0, 3.0, 6.0], vec![0.0, 0.0, 0.0]]]
        );
        let y = bias_activation(&x, &b, Activation::Linear).unwrap();
        assert_eq!(y.to_vec3::<f32>().unwrap()[0][1], vec![-0.5, -1.0, -4.0]);
    }
}
