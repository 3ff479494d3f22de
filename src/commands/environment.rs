//! The process environment, read once at the edge: the hub's variables and the user's config
//! folder. Everything below `commands/` receives these as values ([`HubEnv`], a theme folder),
//! so no layer under the edge reads a variable, and tests pass their own.

use std::ffi::OsString;
use std::path::PathBuf;

use hf_hub::Cache;

use crate::hub::{default_convert_cache, HubEnv};
use crate::runtime::dist::DistEnv;

/// The hub settings of the standard variables: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE=1` for cache only; `HF_ENDPOINT`; `HF_TOKEN`
/// (else the token file of the cache); the conversion cache is `$XDG_CACHE_HOME/blackmamba`,
/// else `$HOME/.cache/blackmamba`.
pub fn hub_env() -> HubEnv {
    let cache_dir = std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Cache::from_env().path().clone());
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| truthy(&v));
    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| Cache::from_env().token());
    HubEnv {
        cache_dir,
        offline,
        endpoint: std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()),
        token,
        convert_cache: default_convert_cache(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME")),
    }
}

/// This process's place in a data-parallel run, from torchrun's, Slurm's or Open MPI's variables
/// (see [`DistEnv::from_vars`]).
pub fn dist_env() -> crate::error::Result<DistEnv> {
    DistEnv::from_vars(|k| std::env::var(k).ok())
}

/// The user's theme overlays: `$XDG_CONFIG_HOME/blackmamba/themes`, else
/// `~/.config/blackmamba/themes`.
pub fn theme_dir() -> Option<PathBuf> {
    user_theme_dir(std::env::var_os("XDG_CONFIG_HOME"), std::env::var_os("HOME"))
}

/// [`theme_dir`] from the two variables' values (an absolute `XDG_CONFIG_HOME` only, as the XDG
/// spec asks).
pub fn user_theme_dir(xdg_config_home: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    let xdg = xdg_config_home.map(PathBuf::from).filter(|p| p.is_absolute());
    let base = xdg.or_else(|| home.filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("blackmamba").join("themes"))
}

/// `1`, `true`, `yes`, `on` in any case (huggingface_hub's reading of its boolean variables).
fn truthy(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn theme_dir_follows_xdg_then_home() {
        let d = user_theme_dir(Some("/x/cfg".into()), Some("/home/u".into()));
        assert_eq!(d, Some(PathBuf::from("/x/cfg/blackmamba/themes")));
        // a relative XDG_CONFIG_HOME is ignored, as the XDG spec asks
        let d = user_theme_dir(Some("rel".into()), Some("/home/u".into()));
        assert_eq!(d, Some(PathBuf::from("/home/u/.config/blackmamba/themes")));
        assert_eq!(user_theme_dir(None, None), None);
    }

    #[test]
    fn offline_values() {
        assert!(truthy(" ON"));
        assert!(truthy("1"));
        assert!(!truthy("0"));
        assert!(!truthy(""));
    }
}
