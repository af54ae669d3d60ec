//! Ramps files: the exit heads trained for one specific backbone, kept apart from the model so
//! ramps can be retrained, swapped or dropped without touching the (large) model file.
//!
//! A ramps file records the sha256 of the exact model file it was trained for; opening it with
//! any other backbone is refused with [`Error::BackboneMismatch`].

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::container::Container;
use super::meta::{FORMAT_VERSION, Family, FileKind, META_KEY};
use super::model_file::ModelFile;
use super::writer::{OwnedTensor, check_owned_tensor_set, write_container};
use crate::error::{Error, Result};
use crate::tensor::TensorView;

/// The head of one ramp. Tensors are named `ramps.<point>.<tensor>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RampHead {
    /// `softmax(W x + b)` on the pooled point output: `weight` [classes, width], `bias` [classes].
    Linear { width: usize, classes: usize },
    /// `softmax(W2 tanh(W1 x + b1) + b2)`: `dense.weight` [width, width], `dense.bias` [width],
    /// `out.weight` [classes, width], `out.bias` [classes].
    DenseTanhLinear { width: usize, classes: usize },
}

impl RampHead {
    pub fn width(&self) -> usize {
        match self {
            RampHead::Linear { width, .. } | RampHead::DenseTanhLinear { width, .. } => *width,
        }
    }
    pub fn classes(&self) -> usize {
        match self {
            RampHead::Linear { classes, .. } | RampHead::DenseTanhLinear { classes, .. } => {
                *classes
            }
        }
    }
    /// Tensor suffixes and shapes this head needs.
    pub fn tensors(&self) -> Vec<(&'static str, Vec<usize>)> {
        match *self {
            RampHead::Linear { width, classes } => {
                vec![("weight", vec![classes, width]), ("bias", vec![classes])]
            }
            RampHead::DenseTanhLinear { width, classes } => vec![
                ("dense.weight", vec![width, width]),
                ("dense.bias", vec![width]),
                ("out.weight", vec![classes, width]),
                ("out.bias", vec![classes]),
            ],
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RampMeta {
    /// The ramp-eligible point (stage name) whose output the ramp reads.
    pub point: String,
    pub head: RampHead,
    /// CNN ramps: the output is averaged over `grid x grid` cells and the head reads their
    /// `grid * grid * channels` means (see `ramps::grid`). 1 (the default, left out of the file)
    /// is the global average, and the only value for transformer ramps.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub grid: usize,
}

fn one() -> usize {
    1
}

fn is_one(g: &usize) -> bool {
    *g == 1
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RampsMeta {
    pub format_version: u32,
    pub kind: FileKind,
    /// sha256 (lowercase hex) of the model file these ramps were trained for.
    pub backbone_sha256: String,
    pub ramps: Vec<RampMeta>,
}

impl RampsMeta {
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.ramps
            .iter()
            .flat_map(|r| {
                r.head
                    .tensors()
                    .into_iter()
                    .map(move |(s, shape)| (format!("ramps.{}.{s}", r.point), shape))
            })
            .collect()
    }

    /// Checks these ramps against the backbone's metadata (not its hash).
    fn validate_against(&self, model: &ModelFile) -> Result<(), String> {
        if self.format_version != FORMAT_VERSION {
            return Err(format!(
                "format version {} is not supported (this build reads version {FORMAT_VERSION})",
                self.format_version
            ));
        }
        if self.kind != FileKind::Ramps {
            return Err("this is a model file, not a ramps file".into());
        }
        let meta = model.meta();
        let mut seen = std::collections::HashSet::new();
        for r in &self.ramps {
            if !seen.insert(r.point.as_str()) {
                return Err(format!("two ramps at point `{}`", r.point));
            }
            if !meta.graph.ramp_points.contains(&r.point) {
                return Err(format!(
                    "ramp at `{}`, which is not a ramp-eligible point of the model (eligible: {})",
                    r.point,
                    meta.graph.ramp_points.join(", ")
                ));
            }
            let g = r.grid;
            let width = match &meta.family {
                Family::Bert(c) if g == 1 => c.hidden_size,
                Family::Bert(_) => {
                    return Err(format!(
                        "ramp at `{}` has grid {g}: grids are for CNN ramps (a transformer's \
                         ramp pools tokens)",
                        r.point
                    ));
                }
                Family::Llama(_) => {
                    return Err(
                        "ramps files are for classifiers; a llama model's exits are \
                                per token (not built yet)"
                            .into(),
                    );
                }
                Family::Cnn(c) => match c.image_at(&r.point) {
                    Some((h, w, ch)) if crate::ramps::grid::fits(g, h, w) => ch * g * g,
                    Some((h, w, _)) => {
                        return Err(format!(
                            "ramp at `{}` has grid {g}, which does not fit the {h}x{w} output \
                             there (1..={})",
                            r.point,
                            h.min(w)
                        ));
                    }
                    None if g == 1 => c.width_at(&r.point).unwrap_or(0),
                    None => {
                        return Err(format!(
                            "ramp at `{}` has grid {g}, but the output there is not an image",
                            r.point
                        ));
                    }
                },
            };
            if r.head.width() != width {
                let grid = if g == 1 {
                    String::new()
                } else {
                    format!(" ({g}x{g} cells)")
                };
                return Err(format!(
                    "ramp at `{}` reads width {}, but the model's output there{grid} has width \
                     {width}",
                    r.point,
                    r.head.width()
                ));
            }
            if let Some(h) = &meta.head
                && r.head.classes() != h.labels.len()
            {
                return Err(format!(
                    "ramp at `{}` predicts {} classes, the model's head {}",
                    r.point,
                    r.head.classes(),
                    h.labels.len()
                ));
            }
        }
        Ok(())
    }
}

/// A validated ramps file bound to its backbone.
pub struct RampsFile {
    c: Container,
    meta: RampsMeta,
}

impl RampsFile {
    /// Opens a ramps file for `backbone`; refuses one trained for another model file.
    pub fn open(path: impl AsRef<Path>, backbone: &ModelFile) -> Result<RampsFile> {
        let path = path.as_ref();
        let c = Container::open(path, FileKind::Ramps)?;
        let meta: RampsMeta = c.json_entry(META_KEY, FileKind::Ramps)?;
        if meta.kind == FileKind::Ramps && meta.backbone_sha256 != backbone.sha256() {
            return Err(Error::BackboneMismatch {
                path: path.to_path_buf(),
                expected: meta.backbone_sha256.clone(),
                actual: backbone.sha256().to_string(),
            });
        }
        meta.validate_against(backbone)
            .map_err(|r| Error::format(path, r))?;
        c.check_tensor_set(&meta.expected_tensors())?;
        Ok(RampsFile { c, meta })
    }

    pub fn meta(&self) -> &RampsMeta {
        &self.meta
    }

    /// `ramps.<point>.<suffix>` as a view.
    pub fn tensor(&self, point: &str, suffix: &str) -> Result<TensorView<'_>> {
        let name = format!("ramps.{point}.{suffix}");
        self.c
            .view(&name)
            .ok_or_else(|| Error::tensor(&self.c.path, name, "missing"))
    }
}

/// Writes a ramps file for `backbone` after checking it as [`RampsFile::open`] would.
pub fn write_ramps(
    path: impl AsRef<Path>,
    backbone: &ModelFile,
    ramps: Vec<RampMeta>,
    tensors: Vec<(String, OwnedTensor)>,
) -> Result<()> {
    let path = path.as_ref();
    let meta = RampsMeta {
        format_version: FORMAT_VERSION,
        kind: FileKind::Ramps,
        backbone_sha256: backbone.sha256().to_string(),
        ramps,
    };
    meta.validate_against(backbone)
        .map_err(|r| Error::format(path, format!("refusing to write: {r}")))?;
    check_owned_tensor_set(path, &meta.expected_tensors(), &tensors)?;
    let mut metadata = HashMap::new();
    metadata.insert(
        META_KEY.to_string(),
        serde_json::to_string_pretty(&meta).expect("metadata serializes"),
    );
    write_container(path, metadata, &tensors)
}
