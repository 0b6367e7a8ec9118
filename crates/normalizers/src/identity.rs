//! `none` (`identity`): y = x, no variables. The no-normalization baseline of a sweep, behind
//! the same interface as the normalizers, so that one command compares it with them.

use crate::input;
use crate::spec::{IdentityConfig, NormSpec};
use crate::Normalizer;
use candle_core::{Result, Tensor};
use candle_nn::ModuleT;

#[derive(Debug, Clone)]
pub struct Identity {
    spec: NormSpec,
    num_channels: usize,
}

impl Identity {
    /// The identity on (N, `num_channels`, ...) inputs.
    pub fn new(cfg: IdentityConfig, num_channels: usize) -> Self {
        Self {
            spec: NormSpec::Identity(cfg),
            num_channels,
        }
    }
}

impl ModuleT for Identity {
    /// Returns `x` itself (the same tensor, so gradients pass through unchanged) after checking
    /// its shape as every normalizer does.
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        input::check("none", x, self.num_channels)?;
        Ok(x.clone())
    }
}

impl Normalizer for Identity {
    fn norm_spec(&self) -> &NormSpec {
        &self.spec
    }

    fn num_channels(&self) -> usize {
        self.num_channels
    }
}

#[cfg(test)]
mod tests {
    use crate::from_spec;
    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::{VarBuilder, VarMap};

    #[test]
    fn none_returns_its_input_with_its_gradient_and_makes_no_variables() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let norm = from_spec("identity:eps=1e-3", 3, vb.pp("n")).unwrap();
        assert_eq!(norm.spec(), "none:eps=1e-3");
        assert!(!norm.norm_spec().affine());
        assert_eq!(
            "IDENTITY".parse::<crate::NormSpec>().unwrap().to_string(),
            "none"
        );
        assert!(varmap.all_vars().is_empty());
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 4, 4), &Device::Cpu).unwrap())
            .unwrap();
        for train in [true, false] {
            let y = norm.forward_t(x.as_tensor(), train).unwrap();
            let diff = (&y - x.as_tensor()).unwrap().abs().unwrap();
            assert_eq!(diff.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        }
        // d/dx sum(3·y) = 3 everywhere.
        let y = norm.forward_t(x.as_tensor(), true).unwrap();
        let grads = (y * 3.0).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(&x).unwrap().flatten_all().unwrap();
        assert!(g.to_vec1::<f32>().unwrap().iter().all(|&v| v == 3.0));
        let bad = Tensor::zeros((2, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let e = norm.forward_t(&bad, true).unwrap_err().to_string();
        assert!(e.contains("none: input has 4 channels"), "{e}");
        let e = from_spec("none:affine=true", 3, vb)
            .unwrap_err()
            .to_string();
        assert!(e.contains("valid options are eps, impl"), "{e}");
    }
}
