//! The new classification head: dropout and one linear layer over the pooled backbone features.

use candle_core::{DType, Device, Tensor, Var};

/// Trainable head parameters.
#[derive(Debug)]
pub struct Head {
    /// `[classes, features]`.
    pub weight: Var,
    /// `[classes]`.
    pub bias: Var,
    pub dropout: f32,
}

/// A trained head as plain numbers, for export and for the report.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadWeights {
    pub classes: usize,
    pub features: usize,
    /// Row-major `[classes, features]`.
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

impl Head {
    /// A zero-initialised head. The problem is convex in the head's parameters (logistic
    /// regression on frozen features), so zero is a fine start and needs no random draw.
    pub fn new(
        features: usize,
        classes: usize,
        dropout: f32,
        device: &Device,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            weight: Var::zeros((classes, features), DType::F32, device)?,
            bias: Var::zeros(classes, DType::F32, device)?,
            dropout,
        })
    }

    pub fn vars(&self) -> Vec<Var> {
        vec![self.weight.clone(), self.bias.clone()]
    }

    /// Logits `[batch, classes]`. `keep_mask` (training only) holds 0 or 1/(1-p) per input value:
    /// inverted dropout, drawn by the caller from its seeded generator so runs are reproducible.
    pub fn forward(&self, x: &Tensor, keep_mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let x = match keep_mask {
            Some(m) => x.mul(m)?,
            None => x.clone(),
        };
        x.matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())
    }

    pub fn weights(&self) -> candle_core::Result<HeadWeights> {
        let (classes, features) = self.weight.as_tensor().dims2()?;
        Ok(HeadWeights {
            classes,
            features,
            weight: self.weight.as_tensor().flatten_all()?.to_vec1()?,
            bias: self.bias.as_tensor().to_vec1()?,
        })
    }
}

impl HeadWeights {
    /// Class probabilities for one feature vector (softmax of the logits), on the CPU.
    pub fn probabilities(&self, features: &[f32]) -> Vec<f32> {
        let logits: Vec<f32> = (0..self.classes)
            .map(|c| {
                let row = &self.weight[c * self.features..(c + 1) * self.features];
                row.iter().zip(features).map(|(w, x)| w * x).sum::<f32>() + self.bias[c]
            })
            .collect();
        softmax(&logits)
    }
}

pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_probabilities_match_the_tensor_forward() {
        let dev = Device::Cpu;
        let head = Head::new(3, 2, 0.0, &dev).unwrap();
        head.weight
            .set(&Tensor::new(&[[1f32, 0.0, -1.0], [0.5, 0.5, 0.5]], &dev).unwrap())
            .unwrap();
        head.bias
            .set(&Tensor::new(&[0.1f32, -0.2], &dev).unwrap())
            .unwrap();
        let x = [2f32, 1.0, 0.5];
        let logits = head
            .forward(&Tensor::new(&[x], &dev).unwrap(), None)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let p = head.weights().unwrap().probabilities(&x);
        let expected = softmax(&logits[0]);
        assert!((p[0] - expected[0]).abs() < 1e-6);
        assert!((p[0] + p[1] - 1.0).abs() < 1e-6);
        assert!(p[0] > p[1]); // logits 1.6 vs 1.55
    }
}
