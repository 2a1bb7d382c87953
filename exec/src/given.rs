//! Values a user gives a run in place of drawn ones: `--param NAME=VALUE` and
//! `--input NAME=file.npy`, the same for `run` (the interpreter), `check` and `bench`, so
//! that a user can feed the tensors of their own PyTorch model and compare.

use crate::npy::{self, ReadError};
use crate::whole::Inputs;
use crate::{ExecError, Result};
use einattn_ir::cascade::{Cascade, TensorKind};
use einattn_ir::interp::{shape_of, TensorData};
use std::fmt::Write as _;
use std::path::PathBuf;

/// What the user gave, in command-line order (a later value for a name wins).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Given {
    /// `--param NAME=VALUE`: a scalar parameter, or every element of a parameter tensor.
    pub params: Vec<(String, f64)>,
    /// `--input NAME=file.npy`: an input or parameter read from a file of its shape.
    pub files: Vec<(String, PathBuf)>,
    /// Values computed in process (`check --grad`: the forward's saved tensors and the
    /// output gradient), applied first so that the user's flags override them.
    pub tensors: Vec<(String, TensorData)>,
}

impl Given {
    pub fn is_empty(&self) -> bool {
        self.params.is_empty() && self.files.is_empty() && self.tensors.is_empty()
    }

    /// Replaces drawn values in `inputs` with the given ones. A name the cascade does not
    /// take is a usage error (exit 2) that lists the names it takes; a file that cannot be
    /// read or has another shape is an input error (exit 1).
    pub fn apply(&self, cascade: &Cascade, inputs: &mut Inputs) -> Result<()> {
        for (name, data) in &self.tensors {
            let tensor = find(cascade, "a computed value for", name)?;
            let expected = shape_of(cascade, tensor);
            if data.shape != expected {
                return Err(ExecError::Input(format!(
                    "the value computed for `{name}` has shape {:?}, but `{name}` in `{}` has shape {expected:?}",
                    data.shape, cascade.name
                )));
            }
            inputs.insert(tensor, data.clone());
        }
        for (name, value) in &self.params {
            let tensor = find(cascade, "--param", name)?;
            if cascade.tensors[tensor].kind != TensorKind::Param {
                return Err(ExecError::Usage(format!(
                    "`--param {name}=...`: `{name}` is an input of `{}`, not a parameter (give it with --input {name}=FILE.npy)",
                    cascade.name
                )));
            }
            let shape = shape_of(cascade, tensor);
            let len = shape.iter().product();
            inputs.insert(
                tensor,
                TensorData {
                    shape,
                    values: vec![*value; len],
                    present: None,
                },
            );
        }
        for (name, path) in &self.files {
            let tensor = find(cascade, "--input", name)?;
            let expected = shape_of(cascade, tensor);
            let data = npy::read_as(path, &expected).map_err(|e| match e {
                ReadError::Shape(got) => ExecError::Input(format!(
                    "`{}` has shape {got:?}, but `{name}` in `{}` has shape {expected:?}",
                    path.display(),
                    cascade.name
                )),
                e => ExecError::Input(format!("cannot read `{}`: {e}", path.display())),
            })?;
            inputs.insert(tensor, data);
        }
        Ok(())
    }

    /// One line for a report: what was given (empty when nothing was).
    pub fn describe(&self) -> String {
        let mut s = String::new();
        if !self.tensors.is_empty() {
            let names: Vec<&str> = self.tensors.iter().map(|(n, _)| n.as_str()).collect();
            let _ = write!(s, "{} computed", names.join(", "));
        }
        for (name, value) in &self.params {
            let _ = write!(
                s,
                "{}{name} = {value}",
                if s.is_empty() { "" } else { ", " }
            );
        }
        for (name, path) in &self.files {
            let sep = if s.is_empty() { "" } else { ", " };
            let _ = write!(s, "{sep}{name} from {}", path.display());
        }
        s
    }
}

/// The input or parameter called `name`, or a usage error that lists them.
fn find(
    cascade: &Cascade,
    flag: &str,
    name: &str,
) -> Result<einattn_ir::Handle<einattn_ir::cascade::Tensor>> {
    cascade
        .inputs()
        .find(|&h| cascade.tensors[h].name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = cascade
                .inputs()
                .map(|h| cascade.tensors[h].name.as_str())
                .collect();
            ExecError::Usage(format!(
                "`{flag} {name}=...`: `{}` has no input or parameter `{name}` (it has: {})",
                cascade.name,
                names.join(", ")
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use einattn_ir::interp::random_inputs;

    fn cascade() -> Cascade {
        let src = "kernel k\nsize N = 4\nrank n: N\ninput X[n]: f32\nparam s: f32 = 2\nparam w[n]: f32\noutput Y[n]: f32\nY[n] = s * w[n] * X[n]\n";
        einattn_dsl::compile_source("k.ein", src, &[]).expect("valid")
    }

    #[test]
    fn given_values_replace_drawn_ones_and_the_rest_stay_drawn() {
        let c = cascade();
        let dir = std::env::temp_dir().join(format!("einattn-given-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let x = dir.join("x.npy");
        let data = TensorData {
            shape: vec![4],
            values: vec![1.0, 2.0, 3.0, 4.0],
            present: None,
        };
        npy::write(&x, &data).expect("write");
        let given = Given {
            params: vec![("s".into(), 0.5), ("w".into(), 3.0)],
            files: vec![("X".into(), x.clone())],
            ..Given::default()
        };
        let drawn = random_inputs(&c, 7);
        let mut inputs = drawn.clone();
        given.apply(&c, &mut inputs).expect("applies");
        let by = |n: &str| &inputs[&c.tensor_by_name(n).expect("tensor")];
        assert_eq!(by("s").values, vec![0.5]);
        assert_eq!(by("w").values, vec![3.0; 4]);
        assert_eq!(by("X").values, data.values);
        assert_ne!(
            drawn[&c.tensor_by_name("X").expect("X")].values,
            data.values
        );
        assert_eq!(
            given.describe(),
            format!("s = 0.5, w = 3, X from {}", x.display())
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn unknown_names_wrong_kinds_and_shapes_are_errors_with_their_exit_codes() {
        let c = cascade();
        let mut inputs = random_inputs(&c, 1);
        let unknown = Given {
            params: vec![("t".into(), 1.0)],
            ..Given::default()
        };
        let e = unknown.apply(&c, &mut inputs).expect_err("unknown");
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("it has: X, s, w"), "{e}");
        let input_as_param = Given {
            params: vec![("X".into(), 1.0)],
            ..Given::default()
        };
        let e = input_as_param.apply(&c, &mut inputs).expect_err("X");
        assert!(e.to_string().contains("--input X=FILE.npy"), "{e}");
        let dir = std::env::temp_dir().join(format!("einattn-given-s-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let wrong = dir.join("w.npy");
        let five = TensorData {
            shape: vec![5],
            values: vec![0.0; 5],
            present: None,
        };
        npy::write(&wrong, &five).expect("write");
        let shape = Given {
            files: vec![("X".into(), wrong)],
            ..Given::default()
        };
        let e = shape.apply(&c, &mut inputs).expect_err("shape");
        assert_eq!(e.exit_code(), 1);
        assert!(e.to_string().contains("has shape [5]"), "{e}");
        let missing = Given {
            files: vec![("X".into(), dir.join("none.npy"))],
            ..Given::default()
        };
        assert_eq!(
            missing
                .apply(&c, &mut inputs)
                .expect_err("missing")
                .exit_code(),
            1
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
