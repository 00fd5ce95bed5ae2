//! Element-wise and row-wise operators, in f32 as the reference computes them.

/// Runs `pass` (a whole forward pass) on a thread of rayon's global pool
/// and waits for it; in place when the caller is one already.
///
/// A pass is a chain of parallel loops with short serial parts between
/// them. Started from outside the pool, each loop is handed to the pool
/// while the caller sleeps, and every loop pays a cross-thread wake-up;
/// started on a worker, the worker runs its share of the loop itself and
/// its neighbours steal the rest. On 2 cores this made SmolLM2's batch-1
/// decode 15-23% faster (`cargo xtask bench model`) and the tiny Qwen3-VL's
/// decode 4.7-6x (`cargo xtask bench e2e`, all phases off), where the
/// loops are short and the wake-ups were most of the time.
pub fn on_compute_pool<R: Send>(pass: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return pass();
    }
    rayon::scope(|_| pass())
}

/// RMSNorm of each row of `x` (width `weight.len()`), in place:
/// `x / sqrt(mean(x^2) + eps) * weight`.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    for row in x.chunks_exact_mut(d) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = w * (*v * inv);
        }
    }
}

/// LayerNorm of each row of `x`, in place: `(x - mean) / sqrt(var + eps) * w + b`.
pub fn layer_norm(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let d = weight.len();
    for row in x.chunks_exact_mut(d) {
        let mean = row.iter().sum::<f32>() / d as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, w), b) in row.iter_mut().zip(weight).zip(bias) {
            *v = (*v - mean) * inv * w + b;
        }
    }
}

/// SiLU: `x * sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU with the tanh approximation (`gelu_pytorch_tanh`).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// Exact GELU: `x * Phi(x)` with the error function (`nn.GELU()`),
/// written as `0.5 x erfc(-x / sqrt 2)`.
#[inline]
pub fn gelu_erf(x: f32) -> f32 {
    let xd = f64::from(x);
    (0.5 * xd * erfc(-xd / std::f64::consts::SQRT_2)) as f32
}

/// The complementary error function, to a relative error below 1.2e-7
/// everywhere (the Chebyshev fit of Numerical Recipes' `erfcc`), far
/// inside f32 resolution.
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// The activations configs name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`.
    Silu,
    /// `gelu_pytorch_tanh` / `gelu_new`.
    GeluTanh,
    /// `gelu` (exact).
    Gelu,
}

impl Activation {
    /// Parses a Hugging Face `hidden_act` name.
    pub fn from_name(name: &str) -> Option<Activation> {
        Some(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            _ => return None,
        })
    }

    /// Applies the activation in place.
    pub fn apply(self, x: &mut [f32]) {
        match self {
            Activation::Silu => x.iter_mut().for_each(|v| *v = silu(*v)),
            Activation::GeluTanh => x.iter_mut().for_each(|v| *v = gelu_tanh(*v)),
            Activation::Gelu => x.iter_mut().for_each(|v| *v = gelu_erf(*v)),
        }
    }
}

/// Rotates one head vector in place with the "rotate half" convention:
/// `x * cos + rotate_half(x) * sin`, where `cos`/`sin` hold `x.len() / 2`
/// values each used for both halves.
#[inline]
pub fn rotate_half_apply(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i] + a * sin[i];
    }
}

/// In-place softmax of a row (max-subtracted).
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Index of the largest value; the first one on ties (as torch.argmax).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norms_and_activations() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        rms_norm(&mut x, &[1.0, 1.0, 1.0, 1.0], 0.0);
        let rms = (7.5f32).sqrt();
        assert!((x[3] - 4.0 / rms).abs() < 1e-6);
        let mut y = vec![1.0, 3.0];
        layer_norm(&mut y, &[2.0, 2.0], &[0.5, 0.5], 0.0);
        assert!((y[0] + 1.5).abs() < 1e-6 && (y[1] - 2.5).abs() < 1e-6);
        assert!((gelu_erf(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        let mut s = vec![0.0, 0.0];
        softmax(&mut s);
        assert_eq!(s, [0.5, 0.5]);
        let mut v = vec![1.0, 0.0];
        rotate_half_apply(&mut v, &[0.0], &[1.0]);
        assert_eq!(v, [0.0, 1.0]);
    }
}
