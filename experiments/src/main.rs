//! The normbench experiment runner. Its `sweep` lands with the runner issue; until then the
//! binary lists the normalizers it can build, to check a spec from the command line.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("spec") => {
            let [_, spec, channels] = args.as_slice() else {
                bail!("usage: experiments spec SPEC CHANNELS   (e.g. experiments spec gn:groups=8 64)");
            };
            let channels: usize = channels
                .parse()
                .with_context(|| format!("CHANNELS must be a whole number, got {channels:?}"))?;
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            let norm = normalizers::from_spec(spec, channels, vb)
                .with_context(|| format!("cannot build {spec:?}"))?;
            println!("{}", norm.spec());
            Ok(())
        }
        Some(other) => bail!("unknown command {other:?}; available: spec (sweep is not built yet)"),
        None => bail!("usage: experiments spec SPEC CHANNELS"),
    }
}
