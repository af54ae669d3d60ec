//! Everything an engine loads before its threads start: the model, the ramps (checked against
//! the model and the `fixed` configuration), the profile (loaded, or measured briefly), and the
//! bootstrap outputs of every ramp for the first placement.

use std::time::Instant;

use super::EngineBuilder;
use crate::adapt::{ApparateConfig, BootEvidence, Mode};
use crate::backbone::Backbone;
use crate::backend::Backend;
use crate::dataset::Inputs;
use crate::error::{Error, Result};
use crate::format::{ModelFile, RampsFile};
use crate::profile::{Profile, ProfileConfig};
use crate::ramps::Ramps;
use crate::ramps::train::TrainedHead;

/// What [`load`] gives the engine.
pub(crate) struct Loaded<B: Backend> {
    pub backbone: Backbone<B>,
    pub ramps: Option<Ramps<B::Tensor>>,
    /// The adaptation settings, `enabled` off without ramps.
    pub cfg: ApparateConfig,
    /// Point of each ramp of the file, stage order.
    pub points: Vec<String>,
    pub profile: Profile,
    pub bootstrap: Option<BootEvidence>,
    /// Host copies of the ramps file's heads (stage order), for the live loops.
    pub heads: Vec<TrainedHead>,
}

pub(crate) fn load<B: Backend>(be: B, b: &EngineBuilder) -> Result<Loaded<B>> {
    let log = |s: &str| {
        if let Some(f) = &b.log {
            f(s)
        }
    };
    b.batching.validate()?;
    let file = ModelFile::open(&b.model)?;
    let backbone = Backbone::load(be, &file)?;
    let mut cfg = b
        .apparate
        .clone()
        .unwrap_or_else(|| ApparateConfig::for_family(&file.meta().family));
    cfg.validate()?;
    let ramps = load_ramps(&backbone, &file, b)?;
    if ramps.is_none() {
        cfg.enabled = false;
    }
    let points: Vec<String> = ramps
        .as_ref()
        .map(|(r, _)| r.iter().map(|x| x.point.clone()).collect())
        .unwrap_or_default();
    check_fixed(&cfg, &points)?;
    let profile = match &b.profile {
        Some(p) => Profile::load(p, &backbone.backend().device_id(), file.sha256())?,
        None => {
            let t0 = Instant::now();
            let inputs = b
                .bootstrap
                .clone()
                .unwrap_or_else(|| Inputs::synthetic(&backbone, 32));
            let pc = ProfileConfig {
                max_batch: b.batching.max_batch_size,
                warmup: 1,
                repeats: 3,
            };
            let p = crate::profile::measure(
                &backbone,
                file.sha256(),
                ramps.as_ref().map(|(r, sha)| (r, sha.clone())),
                &inputs,
                &pc,
                &mut |_, _, _| {},
            )?;
            log(&format!(
                "measured a start-up profile (batch 1..{}) in {:.1} s",
                pc.max_batch,
                t0.elapsed().as_secs_f64()
            ));
            p
        }
    };
    if let Some((r, _)) = &ramps
        && profile.batches.iter().any(|bp| bp.ramps.len() != r.len())
    {
        return Err(Error::Input(
            "the profile has no timings for these ramps: run `apparate profile --ramps` with \
             the same ramps file"
                .into(),
        ));
    }
    let bootstrap = match (&ramps, &b.bootstrap, cfg.enabled) {
        (Some((r, _)), Some(inputs), true) => {
            let t0 = Instant::now();
            let ev =
                crate::ramps::record_evidence(&backbone, r, inputs, b.batching.max_batch_size)?;
            log(&format!(
                "ran {} bootstrap inputs through all {} ramps in {:.1} s",
                inputs.len(),
                r.len(),
                t0.elapsed().as_secs_f64()
            ));
            Some(BootEvidence {
                rows: ev.rows,
                answers: ev.answers,
                // The paper's loops only use the outputs.
                features: if cfg.mode == Mode::Live {
                    ev.features
                } else {
                    Vec::new()
                },
            })
        }
        _ => None,
    };
    let heads = match (&b.ramps, cfg.mode) {
        (Some(p), Mode::Live) if ramps.is_some() => {
            crate::ramps::host_heads(&backbone, &RampsFile::open(p, &file)?)?
        }
        _ => Vec::new(),
    };
    Ok(Loaded {
        backbone,
        ramps: ramps.map(|(r, _)| r),
        cfg,
        points,
        profile,
        bootstrap,
        heads,
    })
}

/// The ramps file's heads on the backend and the file's sha256 (for the profile).
fn load_ramps<B: Backend>(
    backbone: &Backbone<B>,
    file: &ModelFile,
    b: &EngineBuilder,
) -> Result<Option<(Ramps<B::Tensor>, String)>> {
    let Some(p) = &b.ramps else {
        return Ok(None);
    };
    if !backbone.has_classifier() {
        return Err(Error::Input(format!(
            "{} has no classifier head: ramps need one",
            b.model.display()
        )));
    }
    let rf = RampsFile::open(p, file)?;
    let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
    Ok(Some((
        Ramps::load(backbone, &rf)?,
        crate::format::sha256_hex(&bytes),
    )))
}

/// Every `fixed` point must be a ramp of the file (ranges are [`ApparateConfig::validate`]'s).
fn check_fixed(cfg: &ApparateConfig, points: &[String]) -> Result<()> {
    for (p, _) in cfg.fixed.iter().flatten() {
        if !points.contains(p) {
            return Err(Error::config(
                "fixed",
                format!("`{p}`"),
                format!("the ramps of the ramps file ({})", points.join(", ")),
            ));
        }
    }
    Ok(())
}
