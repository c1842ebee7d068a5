//! The values of the config that are names: `host`, `resources.device` and `training.model`,
//! each parsed once into a type. In the TOML file, the environment, the flags and the JSON
//! of `/api/v1/config` they stay the strings they were (written back exactly as given); a bad
//! one is refused with the key and the message validation always gave.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use neuroshard_shared::model::ModelConfig;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::{Config, ConfigError, lookup_mut};

fn invalid(key: &str, message: String) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message,
    }
}

/// Serialized as its text; deserialized from a string, a bad one failing with validation's
/// message (the key is added where the config is read: `Config::from_tree`, `Config::load`).
macro_rules! serde_as_text {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(|e| match e {
                    ConfigError::Invalid { message, .. } => serde::de::Error::custom(message),
                    other => serde::de::Error::custom(other),
                })
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// `host`: the IP address the REST API binds, with the text it was given in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    ip: IpAddr,
    text: String,
}

impl Host {
    pub const KEY: &str = "host";

    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl Default for Host {
    fn default() -> Host {
        Host {
            ip: IpAddr::from([127, 0, 0, 1]),
            text: "127.0.0.1".into(),
        }
    }
}

impl FromStr for Host {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Host, ConfigError> {
        let ip = s
            .parse()
            .map_err(|_| invalid(Host::KEY, format!("{s:?} is not an IP address")))?;
        Ok(Host { ip, text: s.into() })
    }
}

serde_as_text!(Host);

/// `training.dtype`: the compute dtype of training (LoadModel's `dtype`). bf16 is mixed
/// precision: bf16 GEMMs with f32 accumulation, f32 master weights and optimizer state, so
/// checkpoints, exports, DiLoCo and model hashes are the same f32 tensors in every dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrainDtype {
    /// bf16 where the engine's device has native bf16 arithmetic (AVX512-BF16, CUDA sm_80+),
    /// else f32 (the engine logs which).
    #[default]
    Auto,
    F32,
    Bf16,
}

impl TrainDtype {
    pub const KEY: &str = "training.dtype";

    /// The name in the config and in LoadModel.
    pub fn as_str(&self) -> &'static str {
        match self {
            TrainDtype::Auto => "auto",
            TrainDtype::F32 => "f32",
            TrainDtype::Bf16 => "bf16",
        }
    }
}

impl FromStr for TrainDtype {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<TrainDtype, ConfigError> {
        match s {
            "auto" => Ok(TrainDtype::Auto),
            "f32" => Ok(TrainDtype::F32),
            "bf16" => Ok(TrainDtype::Bf16),
            _ => Err(invalid(
                TrainDtype::KEY,
                format!("{s:?} is not one of auto, f32, bf16"),
            )),
        }
    }
}

serde_as_text!(TrainDtype);

/// `training.pipeline_wire`: the element type of the activations and their gradients sent
/// between pipeline stages. A receiver takes any of them (the dtype is named in each tensor)
/// and widens it to f32 for its engine; ids and labels stay u32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PipeWire {
    /// Half the bytes of f32 (rounded to nearest even).
    #[default]
    Bf16,
    F32,
    /// Each row of `hidden` values as one f32 scale and `hidden` integers of 4 to 8 bits
    /// (`int8`: about a quarter of the bytes of f32, `int4` an eighth).
    Int(u32),
}

impl PipeWire {
    pub const KEY: &str = "training.pipeline_wire";

    /// The name in the config and in a pipeline tensor's dtype.
    pub fn as_str(&self) -> &'static str {
        match self {
            PipeWire::Bf16 => "bf16",
            PipeWire::F32 => "f32",
            PipeWire::Int(4) => "int4",
            PipeWire::Int(5) => "int5",
            PipeWire::Int(6) => "int6",
            PipeWire::Int(7) => "int7",
            PipeWire::Int(_) => "int8",
        }
    }
}

impl FromStr for PipeWire {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<PipeWire, ConfigError> {
        match s {
            "bf16" => Ok(PipeWire::Bf16),
            "f32" => Ok(PipeWire::F32),
            "int4" => Ok(PipeWire::Int(4)),
            "int5" => Ok(PipeWire::Int(5)),
            "int6" => Ok(PipeWire::Int(6)),
            "int7" => Ok(PipeWire::Int(7)),
            "int8" => Ok(PipeWire::Int(8)),
            _ => Err(invalid(
                PipeWire::KEY,
                format!("{s:?} is not one of bf16, f32, int4, int5, int6, int7, int8"),
            )),
        }
    }
}

serde_as_text!(PipeWire);

/// `resources.device`: the compute device the engine is started with (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// CUDA when the driver, a device and the kernels are there, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl Device {
    pub const KEY: &str = "resources.device";

    /// The name in the config and on the engine's command line.
    pub fn as_str(&self) -> &'static str {
        match self {
            Device::Auto => "auto",
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

impl FromStr for Device {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Device, ConfigError> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            _ => Err(invalid(
                Device::KEY,
                format!("{s:?} is not one of auto, cpu, cuda"),
            )),
        }
    }
}

serde_as_text!(Device);

/// `training.model`: the name of a model preset, with the model it names.
#[derive(Debug, Clone)]
pub struct ModelPreset {
    name: String,
    model: ModelConfig,
}

impl ModelPreset {
    pub const KEY: &str = "training.model";

    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The model the preset names.
    pub fn config(&self) -> &ModelConfig {
        &self.model
    }
}

impl PartialEq for ModelPreset {
    fn eq(&self, other: &ModelPreset) -> bool {
        self.name == other.name
    }
}

impl Default for ModelPreset {
    fn default() -> ModelPreset {
        "default"
            .parse()
            .expect("the default preset is built in (tested below)")
    }
}

impl FromStr for ModelPreset {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<ModelPreset, ConfigError> {
        let model = ModelConfig::preset(s).map_err(|_| {
            invalid(
                ModelPreset::KEY,
                format!("unknown preset {s:?} (tiny, default, bench, gpt2-small)"),
            )
        })?;
        Ok(ModelPreset {
            name: s.into(),
            model,
        })
    }
}

serde_as_text!(ModelPreset);

/// How a config that did not deserialize is refused.
pub(super) enum Refusal {
    /// A bad host, device or model: the error validation gave for it (the port's when that
    /// is bad too; validation checks the port first).
    Typed(ConfigError),
    /// Some other value of the wrong type, reported before any validation as it always was.
    Type(serde_json::Error),
}

/// For a config `tree` that failed to deserialize: how to refuse it when a typed value is
/// bad (the first in validation's order: host, device, model), `None` when none is.
pub(super) fn refusal(mut tree: Value) -> Option<Refusal> {
    let mut first = None;
    for (key, good) in [
        (Host::KEY, "127.0.0.1"),
        (Device::KEY, "auto"),
        (ModelPreset::KEY, "default"),
    ] {
        let Some(slot) = lookup_mut(&mut tree, key) else {
            continue;
        };
        let Some(text) = slot.as_str() else {
            continue;
        };
        let err = match key {
            Host::KEY => text.parse::<Host>().err(),
            Device::KEY => text.parse::<Device>().err(),
            _ => text.parse::<ModelPreset>().err(),
        };
        if let Some(err) = err {
            first.get_or_insert(err);
            // One that parses in its place, so what else the tree holds can be checked.
            *slot = Value::String(good.into());
        }
    }
    let bad = first?;
    Some(match serde_json::from_value::<Config>(tree) {
        Err(other) => Refusal::Type(other),
        Ok(rest) => Refusal::Typed(rest.check_port().err().unwrap_or(bad)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back_as_given() {
        for text in ["127.0.0.1", "0.0.0.0", "::", "0:0::0", "fe80::1"] {
            let h: Host = text.parse().unwrap();
            assert_eq!(h.as_str(), text);
            assert_eq!(h.ip(), text.parse::<IpAddr>().unwrap());
        }
        for d in [Device::Auto, Device::Cpu, Device::Cuda] {
            assert_eq!(d.as_str().parse::<Device>().unwrap(), d);
        }
        for name in ["tiny", "default", "bench", "gpt2-small"] {
            let m: ModelPreset = name.parse().unwrap();
            assert_eq!(m.as_str(), name);
            assert_eq!(*m.config(), ModelConfig::preset(name).unwrap());
        }
        assert_eq!(Host::default().as_str(), "127.0.0.1");
        assert_eq!(Device::default(), Device::Auto);
        assert_eq!(ModelPreset::default().as_str(), "default");
    }

    #[test]
    fn pipeline_wire_and_topk_settings_load_and_are_checked() {
        use crate::diloco::compress::Encoding;
        use crate::diloco::sparse::TopK;
        for w in [
            PipeWire::Bf16,
            PipeWire::F32,
            PipeWire::Int(4),
            PipeWire::Int(8),
        ] {
            assert_eq!(w.as_str().parse::<PipeWire>().unwrap(), w);
        }
        assert!("f16".parse::<PipeWire>().is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(super::super::CONFIG_FILE);
        let load = |text: &str| {
            std::fs::write(&path, text).unwrap();
            crate::config::Config::load(&path)
        };
        let cfg = load(
            "[training]\ndiloco_encoding = \"topk\"\ndiloco_topk_ratio = 0.03\n\
             diloco_topk_bits = 4\npipeline_wire = \"f32\"\n",
        )
        .unwrap();
        assert_eq!(cfg.training.pipeline_wire, PipeWire::F32);
        assert_eq!(
            cfg.diloco_settings().encoding,
            Encoding::Topk(TopK::new(0.03, 4).unwrap())
        );
        // The other encodings ignore the topk keys.
        let cfg = load("[training]\ndiloco_encoding = \"int8\"\n").unwrap();
        assert_eq!(cfg.diloco_settings().encoding, Encoding::Int8);
        let key = |text: &str| match load(text) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            key("[training]\ndiloco_topk_ratio = 0.0\n"),
            "training.diloco_topk_ratio"
        );
        assert_eq!(
            key("[training]\ndiloco_topk_bits = 1\n"),
            "training.diloco_topk_bits"
        );
        assert_eq!(
            load("[training]\npipeline_wire = \"int8\"\n")
                .unwrap()
                .training
                .pipeline_wire,
            PipeWire::Int(8)
        );
        assert!("int3".parse::<PipeWire>().is_err());
        assert!(load("[training]\ndiloco_encoding = \"zip\"\n").is_err());
        assert!(load("[training]\npipeline_wire = \"f16\"\n").is_err());
    }

    #[test]
    fn bad_names_give_validation_messages() {
        let msg = |e: ConfigError| e.to_string();
        assert_eq!(
            msg("localhost".parse::<Host>().unwrap_err()),
            "invalid configuration: host: \"localhost\" is not an IP address"
        );
        assert_eq!(
            msg("cuda:0".parse::<Device>().unwrap_err()),
            "invalid configuration: resources.device: \"cuda:0\" is not one of auto, cpu, cuda"
        );
        assert_eq!(
            msg("huge".parse::<ModelPreset>().unwrap_err()),
            "invalid configuration: training.model: unknown preset \"huge\" \
             (tiny, default, bench, gpt2-small)"
        );
        let e = serde_json::from_value::<Device>(serde_json::json!("gpu")).unwrap_err();
        assert_eq!(e.to_string(), "\"gpu\" is not one of auto, cpu, cuda");
        let e = serde_json::from_value::<Device>(serde_json::json!(1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid type: integer `1`, expected a string"
        );
    }
    fn refused(patch: serde_json::Value) -> (String, String) {
        match Config::default().merged(&patch) {
            Err(ConfigError::Invalid { key, message }) => (key, message),
            other => panic!("{patch}: {other:?}"),
        }
    }

    #[test]
    fn a_bad_value_is_refused_with_validations_key_and_order() {
        let (key, message) = refused(serde_json::json!({"host": "nope"}));
        assert_eq!(key, "host");
        assert_eq!(message, "\"nope\" is not an IP address");
        // The first changed key is not the culprit: the key is still the typed value's.
        let (key, _) = refused(serde_json::json!({"api": {"max_body_kb": 10}, "host": "x"}));
        assert_eq!(key, "host");
        let (key, _) = refused(serde_json::json!({"resources": {"device": "gpu"}}));
        assert_eq!(key, "resources.device");
        let (key, _) = refused(serde_json::json!({"training": {"model": "huge"}}));
        assert_eq!(key, "training.model");
        // Validation's order: the port, then host, device and model.
        let (key, _) = refused(serde_json::json!({"port": 65000, "training": {"model": "x"}}));
        assert_eq!(key, "port");
        let (key, _) = refused(
            serde_json::json!({"resources": {"device": "gpu"}, "training": {"model": "x"}}),
        );
        assert_eq!(key, "resources.device");
        // A value of the wrong type comes before any of them, as before (under the first
        // changed key, as before).
        let (key, message) =
            refused(serde_json::json!({"host": "x", "training": {"batch_size": -1}}));
        assert_eq!(key, "host");
        assert!(message.contains("-1"), "{message}");
        // The CLI's flags: a bad port is reported before a bad host.
        let cfg = Config {
            port: 65000,
            ..Config::default()
        };
        let Err(ConfigError::Invalid { key, .. }) = cfg.parse_value::<Host>("x") else {
            panic!("a bad host is refused");
        };
        assert_eq!(key, "port");
    }

    #[test]
    fn a_bad_value_in_the_file_is_refused_as_validation_refused_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(super::super::CONFIG_FILE);
        std::fs::write(
            &path,
            "host = \"localhost\"\n[training]\nmodel = \"tiny\"\n",
        )
        .unwrap();
        assert_eq!(
            Config::load(&path).unwrap_err().to_string(),
            "invalid configuration: host: \"localhost\" is not an IP address"
        );
        std::fs::write(&path, "port = 65000\n[resources]\ndevice = \"gpu\"\n").unwrap();
        let Err(ConfigError::Invalid { key, .. }) = Config::load(&path) else {
            panic!("refused");
        };
        assert_eq!(key, "port");
        std::fs::write(&path, "host = \"x\"\nnonsense = 1\n").unwrap();
        assert!(matches!(
            Config::load(&path),
            Err(ConfigError::Parse { .. })
        ));
        std::fs::write(&path, "host = \"::1\"\n[training]\nmodel = \"tiny\"\n").unwrap();
        let cfg = Config::load(&path).unwrap();
        assert_eq!(cfg.host.as_str(), "::1");
        assert_eq!(cfg.training.model.config().layers, 2);
        assert!(toml::to_string(&cfg).unwrap().contains("host = \"::1\""));
    }
}
