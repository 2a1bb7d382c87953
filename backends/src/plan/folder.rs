//! The record a plan folder keeps of how its kernels were built (`build.json`): the source
//! file (copied into the folder), the size bindings and the kernel options, so that
//! `run-plan DIR` can compute the reference on the same problem.

use crate::family::KernelOptions;
use crate::tile::{Elem, Loads, MmaUnit};
use crate::Target;

/// How a plan folder's kernels were built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRecord {
    /// The source's file name inside the folder.
    pub source: String,
    pub defines: Vec<(String, u64)>,
    /// The target asked for (`None`: the default).
    pub target: Option<Target>,
    pub options: KernelOptions,
}

impl BuildRecord {
    /// `build.json`.
    pub fn to_json(&self) -> String {
        let o = &self.options;
        let mut v = serde_json::json!({
        "source": self.source,
        "defines": self.defines.iter().map(|(n, v)| serde_json::json!([n, v])).collect::<Vec<_>>(),
        "target": self.target.map(|t| t.name()),
        "dtype": o.elem.map(|e| e.name()),
        "tiles": o.tiles.iter().map(|(n, v)| serde_json::json!([n, v])).collect::<Vec<_>>(),
        "warps": o.warps,
        "stages": o.stages,
        "mma": o.mma.map(|m| m.name()),
        "loads": o.loads.map(|l| l.name()),
        "optimize": o.optimize,
        "strategy": o.strategy,
        "chunk_tokens": o.chunk_tokens,
        });
        // Only when chosen: older records (and their goldens) have no such key.
        if let Some(map) = v.as_object_mut() {
            if let Some(p) = o.persistent {
                map.insert("persistent".into(), p.into());
            }
            if let Some(lazy) = o.lazy_rescale {
                map.insert("lazy_rescale".into(), lazy.into());
            }
            if let Some(tma) = o.store_tma {
                map.insert("store_tma".into(), tma.into());
            }
            if let Some(shared) = o.p_in_shared {
                map.insert("p_in_shared".into(), shared.into());
            }
            if let Some(pin) = o.pin_deferred_wait {
                map.insert("pin_deferred_wait".into(), pin.into());
            }
        }
        // Plain data with string keys: serialization cannot fail.
        serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
    }

    /// Reads `build.json` back; every number is checked to fit what it sets.
    pub fn from_json(text: &str) -> Result<BuildRecord, String> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let pairs = |key: &str| -> Result<Vec<(String, u64)>, String> {
            v.get(key)
                .and_then(|x| x.as_array())
                .map(|a| {
                    a.iter()
                        .map(|p| {
                            match (
                                p.get(0).and_then(|n| n.as_str()),
                                p.get(1).and_then(|x| x.as_u64()),
                            ) {
                                (Some(n), Some(x)) => Ok((n.to_string(), x)),
                                _ => Err(format!("`{key}` holds [name, number] pairs")),
                            }
                        })
                        .collect()
                })
                .unwrap_or_else(|| Ok(Vec::new()))
        };
        let text = |key: &str| v.get(key).and_then(|x| x.as_str()).map(str::to_string);
        let small = |key: &str| -> Result<Option<u32>, String> {
            v.get(key)
                .and_then(|x| x.as_u64())
                .map(|x| u32::try_from(x).map_err(|_| format!("`{key}` = {x} is too large")))
                .transpose()
        };
        let target = match text("target").as_deref() {
            None => None,
            Some("sm_80") => Some(Target::Sm80),
            Some("sm_90a") => Some(Target::Sm90a),
            Some(other) => return Err(format!("unknown target `{other}`")),
        };
        let options = KernelOptions {
            target: target.unwrap_or_default(),
            elem: match text("dtype").as_deref() {
                None => None,
                Some("bf16") => Some(Elem::Bf16),
                Some("f16") => Some(Elem::F16),
                Some(other) => return Err(format!("unknown dtype `{other}`")),
            },
            tiles: pairs("tiles")?,
            warps: small("warps")?,
            stages: small("stages")?,
            mma: match text("mma").as_deref() {
                None => None,
                Some("mma.sync") => Some(MmaUnit::Sync),
                Some("wgmma") => Some(MmaUnit::Warpgroup),
                Some(other) => return Err(format!("unknown mma `{other}`")),
            },
            loads: match text("loads").as_deref() {
                None => None,
                Some(name) => {
                    Some(Loads::from_name(name).ok_or_else(|| format!("unknown loads `{name}`"))?)
                }
            },
            optimize: v.get("optimize").and_then(|x| x.as_bool()).unwrap_or(false),
            strategy: text("strategy"),
            chunk_tokens: v.get("chunk_tokens").and_then(|x| x.as_u64()),
            persistent: v.get("persistent").and_then(|x| x.as_bool()),
            lazy_rescale: v.get("lazy_rescale").and_then(|x| x.as_bool()),
            store_tma: v.get("store_tma").and_then(|x| x.as_bool()),
            p_in_shared: v.get("p_in_shared").and_then(|x| x.as_bool()),
            pin_deferred_wait: v.get("pin_deferred_wait").and_then(|x| x.as_bool()),
        };
        Ok(BuildRecord {
            source: text("source").unwrap_or_else(|| "source.ein".to_string()),
            defines: pairs("defines")?,
            target,
            options,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_record_reads_back_what_was_written() {
        let record = BuildRecord {
            source: "source.ein".into(),
            defines: vec![("N".into(), 4096), ("D".into(), 128)],
            target: Some(Target::Sm90a),
            options: KernelOptions {
                target: Target::Sm90a,
                elem: Some(Elem::F16),
                tiles: vec![("e".into(), 64)],
                warps: Some(8),
                stages: Some(3),
                mma: Some(MmaUnit::Warpgroup),
                loads: Some(Loads::ProducerWarpgroup {
                    pingpong: true,
                    tma: true,
                }),
                persistent: Some(true),
                lazy_rescale: Some(true),
                store_tma: Some(true),
                p_in_shared: Some(true),
                pin_deferred_wait: Some(true),
                optimize: true,
                strategy: Some("chunked".into()),
                chunk_tokens: Some(1024),
            },
        };
        assert_eq!(BuildRecord::from_json(&record.to_json()), Ok(record));
    }

    #[test]
    fn numbers_that_do_not_fit_and_unknown_names_are_refused() {
        for bad in [
            r#"{"warps": 8589934592}"#,
            r#"{"target": "sm_75"}"#,
            r#"{"dtype": "f64"}"#,
            r#"{"defines": [["N"]]}"#,
            "not json",
        ] {
            assert!(BuildRecord::from_json(bad).is_err(), "{bad}");
        }
    }
}
