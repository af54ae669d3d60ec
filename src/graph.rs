//! The stage graph of a model and its ramp-eligible points.
//!
//! A model is a DAG of named stages listed in topological order; each stage names the stages it
//! reads. A point (the output of a stage) is *ramp-eligible* when it is a cut vertex of the
//! graph: every later stage depends on earlier ones only through it, so a ramp there sees all the
//! information the rest of the model will. With stages in topological order that is exact and
//! cheap: `v` is a cut point iff no edge `a -> b` jumps over it (`pos(a) < pos(v) < pos(b)`).
//! The output of the last stage is the model's answer itself and the first stage only embeds the
//! raw input, so neither is ever a ramp point.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub name: String,
    /// Names of the stages whose outputs this stage reads. Empty for the input stage.
    #[serde(default)]
    pub inputs: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageGraph {
    /// Stages in execution (topological) order.
    pub stages: Vec<Stage>,
    /// Ramp-eligible points (stage names), as computed by [`StageGraph::eligible_points`] at
    /// conversion; stored so that any safetensors tool shows them.
    pub ramp_points: Vec<String>,
}

impl StageGraph {
    /// A straight chain of stages: each reads the previous one.
    pub fn chain(names: impl IntoIterator<Item = String>) -> StageGraph {
        let mut stages: Vec<Stage> = Vec::new();
        for name in names {
            let inputs = stages
                .last()
                .map(|s| vec![s.name.clone()])
                .unwrap_or_default();
            stages.push(Stage { name, inputs });
        }
        let mut g = StageGraph {
            stages,
            ramp_points: Vec::new(),
        };
        g.ramp_points = g.eligible_points().unwrap_or_default();
        g
    }

    /// Checks structure: unique names, inputs refer to earlier stages, one input stage.
    pub fn validate(&self) -> Result<(), String> {
        if self.stages.is_empty() {
            return Err("stage graph has no stages".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, s) in self.stages.iter().enumerate() {
            if !seen.insert(s.name.as_str()) {
                return Err(format!("stage `{}` is listed twice", s.name));
            }
            if i > 0 && s.inputs.is_empty() {
                return Err(format!(
                    "stage `{}` has no inputs but is not the first",
                    s.name
                ));
            }
            for inp in &s.inputs {
                if !self.stages[..i].iter().any(|p| &p.name == inp) {
                    return Err(format!(
                        "stage `{}` reads `{inp}`, which is not an earlier stage",
                        s.name
                    ));
                }
            }
        }
        if !self.stages[0].inputs.is_empty() {
            return Err(format!(
                "first stage `{}` must have no inputs",
                self.stages[0].name
            ));
        }
        let eligible = self.eligible_points()?;
        for p in &self.ramp_points {
            if !eligible.contains(p) {
                return Err(format!(
                    "`{p}` is listed as a ramp point but is not ramp-eligible (eligible: {})",
                    eligible.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Position of a stage by name.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }

    /// Cut vertices of the DAG, excluding the final stage (see module docs).
    pub fn eligible_points(&self) -> Result<Vec<String>, String> {
        let n = self.stages.len();
        // covered[v] = some edge jumps strictly over v.
        let mut covered = vec![false; n];
        for (b, s) in self.stages.iter().enumerate() {
            for inp in &s.inputs {
                let a = self
                    .position(inp)
                    .ok_or_else(|| format!("stage `{}` reads unknown stage `{inp}`", s.name))?;
                for c in covered.iter_mut().take(b).skip(a + 1) {
                    *c = true;
                }
            }
        }
        Ok((1..n.saturating_sub(1))
            .filter(|&v| !covered[v])
            .map(|v| self.stages[v].name.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(name: &str, inputs: &[&str]) -> Stage {
        Stage {
            name: name.into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn chain_is_eligible_everywhere_but_the_ends() {
        let g = StageGraph::chain(["a", "b", "c", "d"].map(String::from));
        assert_eq!(g.ramp_points, vec!["b", "c"]);
        g.validate().unwrap();
    }

    #[test]
    fn skip_connection_hides_points_inside_it() {
        let g = StageGraph {
            stages: vec![
                st("in", &[]),
                st("conv1", &["in"]),
                st("conv2", &["conv1"]),
                st("add", &["conv2", "in"]),
                st("out", &["add"]),
            ],
            ramp_points: vec![],
        };
        assert_eq!(g.eligible_points().unwrap(), vec!["add"]);
    }

    #[test]
    fn rejects_bad_graphs() {
        let dup = StageGraph {
            stages: vec![st("a", &[]), st("a", &["a"])],
            ramp_points: vec![],
        };
        assert!(dup.validate().unwrap_err().contains("twice"));
        let fwd = StageGraph {
            stages: vec![st("a", &[]), st("b", &["c"]), st("c", &["a"])],
            ramp_points: vec![],
        };
        assert!(fwd.validate().unwrap_err().contains("not an earlier stage"));
        let mut bad_point = StageGraph::chain(["a", "b", "c"].map(String::from));
        bad_point.ramp_points = vec!["c".into()];
        assert!(
            bad_point
                .validate()
                .unwrap_err()
                .contains("not ramp-eligible")
        );
    }
}
